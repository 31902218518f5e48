"""Measuring activation memory: the bytes of tensors autograd keeps for backward."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

#: Bytes in a mebibyte, for reports.
MIB = 2**20


class SavedTensorMeter:
    """Count the bytes of tensors saved for backward while the context is open.

    Each storage counts once however many tensors view it, and storages of the model's parameters
    and buffers are left out: what remains is activation memory.

    Args:
        model: the model whose weights are not activations (optional).
        measure_only: the graph recorded in the context will never be backpropagated (a forward run only
            to measure it). Tensors are then saved as detached aliases: a tensor saved by the node that
            made it would otherwise hold that node, a cycle through autograd's C++ graph that Python's
            garbage collector cannot see, so the graph, and the model's parameters it holds, would never
            be freed. Leave it False when backward runs: it frees the saved tensors, and double backward
            needs them attached.

    Example:
        >>> layer = nn.Linear(4, 4)
        >>> with SavedTensorMeter(layer) as meter:
        ...     out = layer(torch.randn(8, 4, requires_grad=True)).relu()
        >>> meter.saved_bytes  # the input of the linear layer and the output of relu: 2 x 8 x 4 floats
        256
    """

    def __init__(self, model: nn.Module | None = None, measure_only: bool = False) -> None:
        self._excluded: set[int] = set()
        if model is not None:
            # A parameter sharded by FSDP2 is a DTensor: its own storage is its local shard.
            tensors = [t.to_local() if isinstance(t, DTensor) else t for t in [*model.parameters(), *model.buffers()]]
            self._excluded = {t.untyped_storage().data_ptr() for t in tensors}
        self._storages: dict[int, int] = {}
        self._measure_only = measure_only
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in self._excluded and pointer != 0:
            self._storages[pointer] = storage.nbytes()
        return tensor.detach() if self._measure_only else tensor

    @property
    def saved_bytes(self) -> int:
        """Bytes of the unique non-weight storages saved so far."""
        return sum(self._storages.values())

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._hooks.__exit__(*exc_info)


def saved_activation_bytes(model: nn.Module, forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of activations autograd keeps for backward when ``forward()`` runs (no backward is run).

    Example:
        >>> layer = nn.Linear(4, 4)
        >>> saved_activation_bytes(layer, lambda: layer(torch.randn(8, 4, requires_grad=True)).sum())
        128
    """
    with SavedTensorMeter(model, measure_only=True) as meter:
        forward()
    return meter.saved_bytes
