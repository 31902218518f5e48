"""FSDP2 (torch's ``fully_shard``) with TokenTune: an explicit backward prefetch order.

FSDP2 prefetches, in backward, the parameter group that ran forward just before the current one, by
the order it recorded at each post-forward. A TokenTune step runs every layer twice (the no-grad
pass, then the grad pass), so after the first layer's backward FSDP2 prefetches the last layer again
(its no-grad pass came just before): one extra all-gather per step, and that layer stays unsharded
until the next forward. An explicit order (each layer prefetches the one before it, the first layer
the root) removes both; the gradients are unchanged.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.fsdp import FSDPModule


def set_backward_prefetch(model: nn.Module) -> None:
    """Make each ``fully_shard`` unit inside ``model`` prefetch the previous one in backward.

    ``model`` is the root that ``fully_shard`` (or accelerate's ``prepare`` with FSDP2) returned; the
    units inside it (the decoder layers) are taken in the order the model registers them, which is
    the order a decoder runs them.

    Example:
        >>> from torch.distributed.fsdp import fully_shard  # doctest: +SKIP
        >>> for layer in model.base_model.model.model.layers:  # doctest: +SKIP
        ...     fully_shard(layer)
        >>> set_backward_prefetch(fully_shard(model))  # doctest: +SKIP
    """
    if not isinstance(model, FSDPModule):
        raise TypeError(
            f"set_backward_prefetch needs the root module returned by fully_shard; got {type(model).__name__}."
        )
    units = [module for module in model.modules() if isinstance(module, FSDPModule) and module is not model]
    if not units:
        raise ValueError("The model has no fully_shard unit besides its root; shard its decoder layers first.")
    for previous, unit in zip([model, *units[:-1]], units, strict=True):
        unit.set_modules_to_backward_prefetch([previous])
