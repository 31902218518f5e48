"""The attention function TokenTune registers with transformers.

A TokenTune step runs the model twice (see :mod:`tokentune_peft.engine`). Both passes reach every
self-attention through transformers' attention-function registry, which hands this module the
step's state as the ``tokentune_step`` keyword:

* pass 1 (no autograd, all tokens): :meth:`TokenTuneStep.record` keeps each attention module's keys,
  values and mask (and shows the call to an optional observer, which an importance-guided selection
  uses to score tokens), then the stock attention runs as usual;
* pass 2 (autograd, selected tokens only): :meth:`TokenTuneStep.attend` writes the selected tokens'
  own, differentiable keys and values into the recorded ones and lets the selected queries attend to
  all of them, under the selected rows of the model's own mask.

Without a step (evaluation, generation, plain forwards) the registered function is the stock one,
so outputs are bit-identical to the unwrapped model. The implementation name stays set for good,
which is what keeps gradient checkpointing's recomputation consistent with the first forward.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Protocol

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .blockwise_attention import KEY_BLOCK, QUERY_BLOCK, MaskBlock, blockwise_attention
from .slots import Slots
from .whole_batch import WholeBatchRows

#: Stock attention implementations TokenTune can sit on top of.
SUPPORTED_BASE_IMPLEMENTATIONS = ("sdpa", "eager")
_PREFIX = "tokentune_"


def tokentune_implementation_name(base: str) -> str:
    """Name under which the TokenTune attention wrapping ``base`` is registered.

    Example:
        >>> tokentune_implementation_name("sdpa")
        'tokentune_sdpa'
    """
    return f"{_PREFIX}{base}"


def base_implementation_name(name: str | None) -> str | None:
    """The stock implementation behind a TokenTune one, or None if ``name`` is not TokenTune's.

    Example:
        >>> base_implementation_name("tokentune_eager"), base_implementation_name("sdpa")
        ('eager', None)
    """
    if name is not None and name.startswith(_PREFIX):
        return name[len(_PREFIX) :]
    return None


def _stock_attention(base: str, module: nn.Module) -> Callable:
    if base == "eager":
        # Every transformers model file defines its own eager attention next to its modules.
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base]


def allowed_keys(
    mask: torch.Tensor | None, is_causal: bool, query_positions: torch.Tensor, key_start: int, key_end: int
) -> torch.Tensor | None:
    """Which keys in ``key_start:key_end`` the queries at ``query_positions`` may attend to, under an attention call's
    own mask.

    Args:
        mask: the mask the model passed to its attention function (bool, True = allowed, or additive
            float, 0 = allowed), [batch or 1, heads or 1, queries, keys]; or None.
        is_causal: whether a missing mask means causal attention.
        query_positions: [batch, q] sequence index of each query; -1 on padded slots, which may attend anywhere.
        key_start, key_end: the keys asked about.

    Returns: bool [batch, heads or 1, q, key_end - key_start], or None when every key is allowed.

    Example:
        >>> allowed_keys(None, True, torch.tensor([[0, 2, -1]]), 0, 3).int().tolist()
        [[[[1, 0, 0], [1, 1, 1], [1, 1, 1]]]]
    """
    batch = query_positions.shape[0]
    device = query_positions.device
    padded = (query_positions < 0)[:, None, :, None]
    positions = query_positions.clamp(min=0)
    if mask is None:
        if not is_causal:
            return None
        key_index = torch.arange(key_start, key_end, device=device)
        allowed = (key_index[None, None, :] <= positions[:, :, None])[:, None]
    else:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"TokenTune supports tensor attention masks, got {type(mask).__name__}.")
        # Both indices must be tensors: an integer row index would be basic indexing and put the
        # query positions before the heads dimension.
        rows = torch.arange(batch, device=device) if mask.shape[0] > 1 else torch.zeros(batch, dtype=torch.long)
        picked = mask[rows.to(device)[:, None], :, positions, key_start:key_end].transpose(1, 2)  # [B, heads, q, keys]
        allowed = picked if mask.dtype == torch.bool else picked == 0
    return allowed | padded


class QueryRows:
    """Queries at sequence positions, and their rows of the masks recorded in a step.

    Args:
        positions: [batch, q] sequence index of each query, -1 on padded slots.
        seq_len: number of keys N.

    The blockwise kernel (:func:`~tokentune_peft.blockwise_attention.blockwise_attention`) reads the rows one
    block at a time (:meth:`mask_block`); a dense additive mask of the rows (:meth:`dense_mask`), needed by eager
    attention and attention dropout, is built once per source mask and shared by all layers (one saved copy for
    backward, not one per layer).

    Example:
        >>> rows = QueryRows(torch.tensor([[1, -1]]), seq_len=3)
        >>> rows.mask_block(None, True)(rows.positions, 0, 3).int().tolist()
        [[[[1, 1, 0], [0, 0, 0]]]]
        >>> rows.dense_mask(None, True, torch.float32, float("-inf")).tolist()
        [[[[0.0, 0.0, -inf], [0.0, 0.0, 0.0]]]]
    """

    def __init__(self, positions: torch.Tensor, seq_len: int) -> None:
        self.positions = positions
        self.seq_len = seq_len
        self._dense: dict[tuple, torch.Tensor | None] = {}

    def mask_block(self, mask: torch.Tensor | None, is_causal: bool) -> MaskBlock:
        """A ``mask_block`` of the rows under ``mask`` (and ``is_causal``); padded slots attend to no key."""

        def block(positions: torch.Tensor, key_start: int, key_end: int) -> torch.Tensor:
            allowed = allowed_keys(mask, is_causal, positions, key_start, key_end)
            valid = (positions >= 0)[:, None, :, None]
            return valid if allowed is None else allowed & valid

        return block

    def dense_mask(
        self, mask: torch.Tensor | None, is_causal: bool, dtype: torch.dtype, blocked: float
    ) -> torch.Tensor | None:
        """[batch, heads or 1, q, N]: 0 where allowed, ``blocked`` elsewhere (padded slots attend anywhere); None
        when every key is allowed."""
        key = (id(mask), is_causal, dtype, blocked)
        if key not in self._dense:
            allowed = allowed_keys(mask, is_causal, self.positions, 0, self.seq_len)
            if allowed is not None:
                allowed = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, blocked)
            self._dense[key] = allowed
        return self._dense[key]


#: The rows of a batch row whose dense mask has at most this many elements (one block of the kernel) attend in one
#: SDPA call; longer ones block by block.
ONE_CALL_ELEMENTS = QUERY_BLOCK * KEY_BLOCK


def over_all_keys(base: str, stock: Callable) -> Callable:
    """The attention of queries at chosen positions over every key, on the ``base`` implementation.

    On sdpa it is the blockwise kernel, whose memory is linear in the sequence length, unless the rows' whole mask
    is no larger than one of the kernel's blocks: then one SDPA call with that mask is the faster way to the same
    block. With attention dropout (which the kernel does not draw) and on eager it is the stock function with the
    rows' dense mask.
    """

    def attend(module, query, keys, values, rows: QueryRows, mask, is_causal: bool, kwargs: dict):
        kwargs = {**kwargs, "is_causal": False}
        one_call = rows.positions.shape[1] * rows.seq_len <= ONE_CALL_ELEMENTS
        if base == "sdpa" and not kwargs.get("dropout") and not one_call:
            block = rows.mask_block(mask, is_causal)
            output = blockwise_attention(query, keys, values, rows.positions, block, scale=kwargs.get("scaling"))
            return output.transpose(1, 2).contiguous(), None
        blocked = float("-inf") if base == "sdpa" else torch.finfo(query.dtype).min
        dense = _sdpa_over_all_keys if base == "sdpa" else stock
        return dense(module, query, keys, values, rows.dense_mask(mask, is_causal, query.dtype, blocked), **kwargs)

    return attend


def call_is_causal(module: nn.Module, kwargs: dict) -> bool:
    """Whether an attention call is causal where its mask is None: its ``is_causal`` keyword, else its module's.

    Example:
        >>> call_is_causal(nn.Module(), {"is_causal": False}), call_is_causal(nn.Module(), {})
        (False, True)
    """
    is_causal = kwargs.get("is_causal")
    return getattr(module, "is_causal", True) if is_causal is None else is_causal


def no_attention_error() -> RuntimeError:
    """The error of a step in which no attention call reached TokenTune's attention function."""
    return RuntimeError(
        "No attention call reached TokenTune's attention function: the model's attention does not go "
        "through transformers' attention registry, or its attention implementation was changed after "
        "wrapping."
    )


class PassOneObserver(Protocol):
    """Something that looks at every self-attention call of pass 1 (e.g. to score tokens)."""

    def observe(self, query, key, value, mask, is_causal: bool, scaling: float | None) -> None: ...


class TokenTuneStep:
    """State of one TokenTune step, passed to every attention call as ``tokentune_step``.

    Pass 1 records every attention's keys, values and mask (and shows them to ``observer``, if any);
    :meth:`select` then sets the selected positions that pass 2 runs.

    A plain class on purpose, not a dataclass, named tuple or container: whatever moves a forward's
    arguments (FSDP's pre-forward device move and input cast, DDP, accelerate's ``send_to_device``,
    pytree maps) rebuilds those from their fields, and both passes must share this one instance.

    Args:
        seq_len: length N of the full sequences.
        observer: optional :class:`PassOneObserver` called on every pass-1 attention.
        rows: the rows each layer runs in a whole-batch grad call (:mod:`tokentune_peft.whole_batch`), if the
            step's grad call is one.
    """

    def __init__(
        self, seq_len: int, observer: PassOneObserver | None = None, rows: WholeBatchRows | None = None
    ) -> None:
        self.seq_len = seq_len
        self.observer = observer
        self.rows = rows
        self.recording = True
        self.keys: dict[nn.Module, torch.Tensor] = {}
        self.values: dict[nn.Module, torch.Tensor] = {}
        self.masks: dict[nn.Module, tuple[torch.Tensor | None, bool]] = {}

    def __repr__(self) -> str:
        return f"TokenTuneStep(seq_len={self.seq_len}, recording={self.recording}, recorded={self.num_recorded})"

    @property
    def num_recorded(self) -> int:
        return len(self.keys)

    def attention(self, module: nn.Module, query, key, value, mask, stock: Callable, over_all_keys: Callable, kwargs):
        """One self-attention call of the step: pass 1 records and runs ``stock``; pass 2 attends over all keys."""
        if self.recording:
            self.record(module, query, key, value, mask, call_is_causal(module, kwargs), kwargs.get("scaling"))
            return stock(module, query, key, value, mask, **kwargs)
        return self.attend(module, query, key, value, over_all_keys, kwargs)

    def record(self, module: nn.Module, query, key, value, mask, is_causal: bool, scaling: float | None) -> None:
        """Pass 1: keep this module's keys, values and mask for pass 2."""
        # Pass 2 writes into these tensors in place, which autograd refuses on views made without grad.
        self.keys[module] = key.clone() if key._is_view() else key
        self.values[module] = value.clone() if value._is_view() else value
        self.masks[module] = (mask, is_causal)
        if self.observer is not None:
            self.observer.observe(query, key, value, mask, is_causal, scaling)

    def runs_stock(self, module: nn.Module) -> bool:
        """Whether ``module``'s attention is the stock one in this step (it sits in a dense top layer)."""
        return self.rows is not None and self.rows.runs_stock(module)

    def layer_inputs(self, layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """What a transformer layer runs on in this step (None: its own arguments); see :mod:`~.whole_batch`."""
        return None if self.rows is None else self.rows.layer_inputs(self, layer, args, kwargs)

    def select(self, slots: Slots) -> None:
        """End pass 1: pass 2 runs the selected tokens' ``slots``."""
        self.recording = False
        self.slots = slots
        self.queries = QueryRows(self.slots.positions, self.seq_len)

    def stand_in(self, recorded: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """A stand-in slot's rows of keys, values or hidden states ([batch, width, ...]): pass 1 recorded them.

        Detached: gradient checkpointing's replay finds the recorded tensors already written with gradient.
        """
        return recorded.detach()[self.slots.rows, self.slots.positions]

    def attend(self, module: nn.Module, query, key, value, over_all_keys: Callable, kwargs: dict):
        """Pass 2: selected queries attend to all keys and values, the selected ones with gradient."""
        if module not in self.keys:
            raise RuntimeError(
                f"TokenTune recorded no keys for {type(module).__name__} in the no-grad pass; the model's "
                "attention modules must run in the same order in both passes."
            )
        all_keys = self._insert_selected(self.keys[module], key)
        all_values = self._insert_selected(self.values[module], value)
        mask, is_causal = self.masks[module]
        return over_all_keys(module, query, all_keys, all_values, self.queries, mask, is_causal, kwargs)

    def _insert_selected(self, recorded: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        # recorded: [B, H, N, D]; selected: [B, H, k, D]; written on the [B, N, H, D] view.
        full, own = recorded.transpose(1, 2), selected.transpose(1, 2)
        self.slots.write(full, own, partial(self.stand_in, full, own))
        return recorded


def _sdpa_over_all_keys(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention over all keys on the sdpa base with a dense mask: torch's SDPA, grouped-query heads unexpanded.

    transformers' sdpa wrapper repeats the key/value heads whenever a mask is given, and autograd
    would then keep the repeated copies; ``enable_gqa`` keeps only the originals.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    output = nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=groups > 1
    )
    return output.transpose(1, 2).contiguous(), None


def _tokentune_attention(base: str) -> Callable:
    def attention(module, query, key, value, attention_mask, tokentune_step: TokenTuneStep | None = None, **kwargs):
        stock = _stock_attention(base, module)
        if tokentune_step is None or tokentune_step.runs_stock(module):
            return stock(module, query, key, value, attention_mask, **kwargs)
        attend = over_all_keys(base, stock)
        return tokentune_step.attention(module, query, key, value, attention_mask, stock, attend, kwargs)

    attention.__name__ = tokentune_implementation_name(base)
    return attention


_MASK_HOOK = threading.local()


@contextmanager
def mask_hook(hook: Callable) -> Iterator[None]:
    """In this thread, let ``hook(build, *args, **kwargs)`` stand in for TokenTune's mask functions.

    ``build`` is the stock mask function the model asked for. The single-pass step uses it to give
    each row group the masks built from the whole batch.

    Example:
        >>> with mask_hook(lambda build, *args, **kwargs: None):
        ...     ALL_MASK_ATTENTION_FUNCTIONS["tokentune_sdpa"](batch_size=1, q_length=2, kv_length=2) is None
        True
    """
    previous = getattr(_MASK_HOOK, "hook", None)
    _MASK_HOOK.hook = hook
    try:
        yield
    finally:
        _MASK_HOOK.hook = previous


def _tokentune_mask(base: str) -> Callable:
    build = ALL_MASK_ATTENTION_FUNCTIONS[base]

    def mask(*args, **kwargs):
        hook = getattr(_MASK_HOOK, "hook", None)
        return build(*args, **kwargs) if hook is None else hook(build, *args, **kwargs)

    mask.__name__ = tokentune_implementation_name(base) + "_mask"
    return mask


def register_attention_functions() -> None:
    """Register ``tokentune_<base>`` attention and mask functions for every supported stock base.

    Example:
        >>> register_attention_functions()
        >>> "tokentune_sdpa" in ALL_ATTENTION_FUNCTIONS
        True
    """
    for base in SUPPORTED_BASE_IMPLEMENTATIONS:
        name = tokentune_implementation_name(base)
        AttentionInterface.register(name, _tokentune_attention(base))
        AttentionMaskInterface.register(name, _tokentune_mask(base))
