"""The attention function TokenTune registers with transformers.

A TokenTune step runs the model twice (see :mod:`tokentune_peft.engine`). Both passes reach every
self-attention through transformers' attention-function registry, which hands this module the
step's state as the ``tokentune_step`` keyword:

* pass 1 (no autograd, all tokens): :meth:`TokenTuneStep.record` keeps each attention module's keys,
  values and mask, then the stock attention runs as usual;
* pass 2 (autograd, selected tokens only): :meth:`TokenTuneStep.attend` writes the selected tokens'
  own, differentiable keys and values into the recorded ones and lets the selected queries attend to
  all of them, under the selected rows of the model's own mask.

Without a step (evaluation, generation, plain forwards) the registered function is the stock one,
so outputs are bit-identical to the unwrapped model. The implementation name stays set for good,
which is what keeps gradient checkpointing's recomputation consistent with the first forward.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

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


@dataclass
class TokenTuneStep:
    """State of one TokenTune step, passed to every attention call as ``tokentune_step``.

    Args:
        batch_index: [n] row of each selected token (valid slots only).
        slot_index: [n] slot of each selected token in the pass-2 batch.
        positions: [batch, k] selected sequence index per slot; padded slots hold a valid dummy index.
        valid_slots: [batch, k] bool, True for real selected tokens.
        seq_len: length N of the full sequences.
    """

    batch_index: torch.Tensor
    slot_index: torch.Tensor
    positions: torch.Tensor
    valid_slots: torch.Tensor
    seq_len: int
    recording: bool = True
    keys: dict[nn.Module, torch.Tensor] = field(default_factory=dict)
    values: dict[nn.Module, torch.Tensor] = field(default_factory=dict)
    masks: dict[nn.Module, tuple[torch.Tensor | None, bool]] = field(default_factory=dict)
    _row_masks: dict[tuple, torch.Tensor | None] = field(default_factory=dict)

    @property
    def num_recorded(self) -> int:
        return len(self.keys)

    def record(self, module: nn.Module, key: torch.Tensor, value: torch.Tensor, mask, is_causal: bool) -> None:
        """Pass 1: keep this module's keys, values and mask for pass 2."""
        # Pass 2 writes into these tensors in place, which autograd refuses on views made without grad.
        self.keys[module] = key.clone() if key._is_view() else key
        self.values[module] = value.clone() if value._is_view() else value
        self.masks[module] = (mask, is_causal)

    def attend(self, module: nn.Module, query, key, value, attend_all: Callable, kwargs: dict):
        """Pass 2: selected queries attend to all keys and values, the selected ones with gradient."""
        if module not in self.keys:
            raise RuntimeError(
                f"TokenTune recorded no keys for {type(module).__name__} in the no-grad pass; the model's "
                "attention modules must run in the same order in both passes."
            )
        all_keys = self._insert_selected(self.keys[module], key)
        all_values = self._insert_selected(self.values[module], value)
        mask, is_causal = self.masks[module]
        row_mask = self._row_mask(mask, is_causal, query.dtype)
        kwargs = {**kwargs, "is_causal": False}
        return attend_all(module, query, all_keys, all_values, row_mask, **kwargs)

    def _insert_selected(self, recorded: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        # recorded: [B, H, N, D]; selected: [B, H, k, D]. Indexing by (row, position) on the
        # [B, N, H, D] view makes autograd keep only the indices, not the tensors.
        rows = selected.transpose(1, 2)[self.batch_index, self.slot_index]
        positions = self.positions[self.batch_index, self.slot_index]
        recorded.transpose(1, 2).index_put_((self.batch_index, positions), rows)
        return recorded

    def _row_mask(self, mask: torch.Tensor | None, is_causal: bool, dtype: torch.dtype) -> torch.Tensor | None:
        """Rows of the model's own mask for the selected queries, as one additive float mask.

        The result is cached per source mask, so every layer that shares a mask shares its rows too
        (one saved copy for backward, not one per layer).
        """
        cache_key = (id(mask), is_causal, dtype)
        if cache_key not in self._row_masks:
            self._row_masks[cache_key] = self._build_row_mask(mask, is_causal, dtype)
        return self._row_masks[cache_key]

    def _build_row_mask(self, mask: torch.Tensor | None, is_causal: bool, dtype: torch.dtype):
        batch, _ = self.positions.shape
        device = self.positions.device
        if mask is None:
            if not is_causal:
                return None
            key_index = torch.arange(self.seq_len, device=device)
            allowed = (key_index[None, None, :] <= self.positions[:, :, None])[:, None]
        else:
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"TokenTune supports tensor attention masks, got {type(mask).__name__}.")
            # Both indices must be tensors: an integer row index would be basic indexing and put the
            # selected positions before the heads dimension.
            rows = torch.arange(batch, device=device) if mask.shape[0] > 1 else torch.zeros(batch, dtype=torch.long)
            picked = mask[rows.to(device)[:, None], :, self.positions].transpose(1, 2)  # [B, heads, k, N]
            allowed = picked if mask.dtype == torch.bool else picked == 0
        allowed = allowed | ~self.valid_slots[:, None, :, None]  # padded slots attend anywhere: no NaN
        additive = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return additive.masked_fill_(~allowed, torch.finfo(dtype).min)


def _sdpa_over_all_keys(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Pass-2 attention on the sdpa base: torch's SDPA with grouped-query heads left unexpanded.

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
        if tokentune_step is None:
            return stock(module, query, key, value, attention_mask, **kwargs)
        if tokentune_step.recording:
            is_causal = kwargs.get("is_causal")
            is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
            tokentune_step.record(module, key, value, attention_mask, is_causal)
            return stock(module, query, key, value, attention_mask, **kwargs)
        over_all_keys = _sdpa_over_all_keys if base == "sdpa" else stock
        return tokentune_step.attend(module, query, key, value, over_all_keys, kwargs)

    attention.__name__ = tokentune_implementation_name(base)
    return attention


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
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
