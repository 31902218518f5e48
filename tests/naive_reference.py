"""An independent, naive implementation of the TokenTune gradient, for the tests.

It runs the stock model on the full sequence, with:
1. every transformer layer's input detached at rows outside S (a forward pre-hook on each layer), so
   what computes the first layer's input (embeddings, ``inputs_embeds``) gets the gradient of S's rows;
2. inside every self-attention, keys and values of positions outside S detached (an attention
   function that wraps transformers' own sdpa), under the model's own masks;
3. the loss taken on positions in S only; for mixture-of-experts models that return router logits,
   plus ``router_aux_loss_coef`` x the router's load-balancing loss over the tokens in S.
With ``dense_top_layers=L``, (1) applies to the layers below the top L and to the first of the top L,
(2) to the layers below the top L only, and the loss is the model's own over every position.
It shares no code with tokentune_peft.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

_current_selection: dict[str, torch.Tensor] = {}


def _detach_outside(tensor: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep, tensor, tensor.detach())


def _naive_attention(module, query, key, value, attention_mask, **kwargs):
    if module not in _current_selection["selective_modules"]:  # dense top layers, a vision tower
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)
    keep = selection_mask(_current_selection["positions"], key.shape[2])[:, None, :, None]  # over [B, heads, N, D]
    key, value = _detach_outside(key, keep), _detach_outside(value, keep)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


def _register_naive_attention() -> None:
    AttentionInterface.register("naive_tokentune", _naive_attention)
    AttentionMaskInterface.register("naive_tokentune", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _detach_layer_input(module, args, kwargs):
    hidden = args[0] if args else kwargs["hidden_states"]
    keep = selection_mask(_current_selection["positions"], hidden.shape[1])[..., None]
    if args:
        return (_detach_outside(hidden, keep), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": _detach_outside(hidden, keep)}


def selection_mask(selected_positions: torch.Tensor, seq_len: int) -> torch.Tensor:
    mask = torch.zeros(selected_positions.shape[0], seq_len, dtype=torch.bool, device=selected_positions.device)
    for row, positions in enumerate(selected_positions.tolist()):
        mask[row, [p for p in positions if p >= 0]] = True
    return mask


def naive_tokentune_loss(
    model: nn.Module,
    batch: dict,
    selected_positions: torch.Tensor,
    task: str,
    dense_top_layers: int = 0,
    selective: nn.Module | None = None,
):
    """Loss of the naive definition; ``model`` is a transformers model (with or without LoRA layers).

    The batch may bring ``input_ids``, ``inputs_embeds`` or ``pixel_values``: the selection applies to the
    sequence each transformer layer receives. ``selective`` (default: ``model``) holds the layers it applies
    to: a vision-language model's language model, whose vision tower runs stock."""
    _register_naive_attention()
    layers = [m for m in (selective or model).modules() if isinstance(m, GradientCheckpointingLayer)]
    below = len(layers) - dense_top_layers
    _current_selection["positions"] = selected_positions
    _current_selection["selective_modules"] = {m for layer in layers[:below] for m in layer.modules()}
    previous = model.config._attn_implementation
    model.config._attn_implementation = "naive_tokentune"
    hooks = [layer.register_forward_pre_hook(_detach_layer_input, with_kwargs=True) for layer in layers[: below + 1]]
    try:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if task == "CAUSAL_LM":
            inputs["use_cache"] = False  # with a cache, transformers would let packed documents attend to each other
        if task == "SEQ_CLS" or dense_top_layers:
            return model(**inputs, labels=batch["labels"]).loss
        outputs = model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
        model.config._attn_implementation = previous
    labels = batch["labels"]
    in_s = selection_mask(selected_positions, labels.shape[1])
    if task == "CAUSAL_LM":
        labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    targets = torch.where(in_s, labels, torch.full_like(labels, -100))
    logits = outputs.logits
    loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
    if getattr(outputs, "router_logits", None) is not None:
        loss = loss + model.config.router_aux_loss_coef * load_balancing_loss_func(
            outputs.router_logits, model.num_experts, model.num_experts_per_tok, in_s.long()
        )
    return loss
