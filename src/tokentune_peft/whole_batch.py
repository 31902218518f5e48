"""The whole-batch grad call: the model's stock call on every token, its transformer layers hooked to run rows.

Two kinds of step use it, resolved once when the model is wrapped (:mod:`tokentune_peft.grad_call`):

* **dense top layers** (``TokenTuneConfig(dense_top_layers=L)``): every token trains in the last L layers;
* **image classifiers** (:mod:`tokentune_peft.vision`), whose sequence the model builds from ``pixel_values``:
  there L = 0, and the hooks only make the first layer take the selected rows.

The gradient of dense top layers, by definition: the full-sequence forward in which, in every layer below
the top L, the unselected rows of the layer's input and the unselected keys and values are detached
(TokenTune's own definition); the input of the first dense layer has its unselected rows detached; nothing
is detached above it; and the loss is the model's own loss over every position.

How a step runs it, with either engine. The call that carries gradient (pass 2, or the single pass's
grad group) is the model's stock call on the **whole** batch, with the caller's labels, so embeddings,
masks, position embeddings, the top layers, the head and the loss are the model's own. Forward
pre-hooks on the transformer layers (installed once, by :func:`install_layer_hooks`, and inert without
a step) change only what the layers below the top see:

* the first layer takes the selected rows of its input; each layer below the top gets the arguments
  it would get in a call on the selected tokens alone (rotary tables at their positions, ...), recorded
  by a short **selected probe** that runs the model on the selected tokens with every layer skipped
  (:func:`record_lower_layer_inputs`); so these layers run exactly as pass 2 of a plain TokenTune step;
* the first dense layer takes every row again: the selected rows from below, with gradient, and the
  others from the no-grad computation of the same layer input (pass 1 skips the top layers, keeping the
  first one's input; the single pass's no-grad group stops there).

Self-attention inside the top layers runs the stock attention function (:meth:`WholeBatchRows.runs_stock`).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from .layers import Call, hidden_of, skipping, transformer_layers, with_hidden


def check_dense_top_layers(model: nn.Module, count: int) -> list[nn.Module]:
    """The model's transformer layers, after checking that ``count`` dense top layers fit in them.

    Raises ValueError naming ``dense_top_layers`` and the model's layer count, and refuses what the
    mode cannot make exact: a router load-balancing loss (``output_router_logits``), whose terms would
    mix the selected tokens of the layers below with every token of the layers above.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                                      num_attention_heads=2, vocab_size=64))
        >>> check_dense_top_layers(model, 3)
        Traceback (most recent call last):
        ...
        ValueError: `dense_top_layers` must be between 0 and the model's number of transformer layers (2); got 3.
    """
    layers = transformer_layers(model)
    if count == 0:
        return layers
    if count > len(layers):
        raise ValueError(
            f"`dense_top_layers` must be between 0 and the model's number of transformer layers ({len(layers)}); "
            f"got {count}."
        )
    if getattr(model.config, "output_router_logits", False):
        refuse_router_loss(f"{type(model).__name__}'s config")
    return layers


def refuse_router_loss(source: str) -> None:
    """Raise the ValueError that refuses a router load-balancing loss with dense top layers; ``source`` says where
    it was asked for.

    Example:
        >>> refuse_router_loss("passed to the forward")
        Traceback (most recent call last):
        ...
        ValueError: `output_router_logits=True` cannot be combined with `dense_top_layers` (passed to the forward): ...
    """
    raise ValueError(
        f"`output_router_logits=True` cannot be combined with `dense_top_layers` ({source}): the router's "
        "load-balancing loss would mix the selected tokens of the layers below with every token of the top layers. "
        "Set output_router_logits=False, or dense_top_layers=0."
    )


class WholeBatchRows:
    """Which rows each transformer layer runs in one step's whole-batch grad call; held by the step as ``step.rows``.

    Args:
        layers: the model's transformer layers (:func:`~tokentune_peft.layers.transformer_layers`).
        dense_count: how many of the last ones run every row (0 for an image classifier's step: then only the
            first layer's input changes, to its selected rows).
        seq_len: length N of the full sequences.

    The hooks act only while :attr:`running` (the grad call); pass 1 and the probes see the layers as they are.
    """

    def __init__(self, layers: list[nn.Module], dense_count: int, seq_len: int) -> None:
        self.lower = layers[: len(layers) - dense_count]
        self.top = layers[len(layers) - dense_count :]
        self.first_dense = self.top[0] if self.top else None
        self.top_modules = {module for layer in self.top for module in layer.modules()}
        self.seq_len = seq_len
        self.running = False
        #: Each layer below the top: its ``(args, kwargs)`` in a call on the selected tokens.
        self.lower_inputs: dict[nn.Module, Call] = {}
        #: The first dense layer's input, every row, without gradient (None when every row is selected).
        self.base: torch.Tensor | None = None

    def runs_stock(self, module: nn.Module) -> bool:
        """Whether ``module`` (an attention module) is in a top layer, where attention is the stock one."""
        return module in self.top_modules

    def layer_inputs(self, step: Any, layer: nn.Module, args: tuple, kwargs: dict) -> Call | None:
        """What ``layer`` runs on instead of ``(args, kwargs)`` (None: unchanged) in the call that carries
        gradient: the layers below the top run the selected rows as in a call on the selected tokens (with
        their own arguments where none were recorded: layers that take no per-token ones), and the first
        dense layer every row. ``step`` gives the slots (:class:`~tokentune_peft.slots.Slots`).
        """
        if not self.running:
            return None
        hidden = hidden_of(args, kwargs)
        first = layer is (self.lower[0] if self.lower else self.first_dense)
        if first:  # the whole batch's embeddings
            hidden = hidden[step.slots.rows, step.slots.positions]
        if layer in self.lower_inputs:
            selected_args, selected_kwargs = self.lower_inputs[layer]
            return with_hidden(selected_args, {**selected_kwargs, "tokentune_step": step}, hidden)
        if layer is self.first_dense:
            return with_hidden(args, kwargs, self._every_row(step, hidden))
        return with_hidden(args, kwargs, hidden) if first else None

    def _every_row(self, step: Any, selected: torch.Tensor) -> torch.Tensor:
        """[B, N, H]: the slots' rows (the selected ones with gradient) written over a copy of :attr:`base`."""
        if self.base is None:
            if selected.shape[1] != self.seq_len:
                raise RuntimeError("TokenTune's dense top layers got no input for the unselected rows.")
            full = selected.new_zeros(selected.shape)
        else:
            full = self.base.to(selected.dtype, copy=True)
        return step.slots.write(full, selected, partial(step.stand_in, full, selected))


def _layer_pre_hook(layer: nn.Module, args: tuple, kwargs: dict) -> Call | None:
    step = kwargs.get("tokentune_step")
    return None if step is None else step.layer_inputs(layer, args, kwargs)


def install_layer_hooks(layers: list[nn.Module]) -> None:
    """Hook every transformer layer for the whole-batch grad call; the hooks act only in a step that runs one."""
    for layer in layers:
        layer.register_forward_pre_hook(_layer_pre_hook, with_kwargs=True)


def record_lower_layer_inputs(backbone: nn.Module, rows: WholeBatchRows, selected_inputs: dict, step: Any) -> None:
    """The selected probe: run ``backbone`` on the selected tokens without autograd, every layer skipped, and
    keep what each layer below the top receives in :attr:`WholeBatchRows.lower_inputs`."""
    if not rows.lower:
        return
    record: dict[nn.Module, Call] = {}
    with torch.no_grad(), skipping(rows.lower + rows.top, record):
        backbone(**selected_inputs, tokentune_step=step)
    for layer in rows.lower:
        args, kwargs = record[layer]
        # The grad call's own hidden states go in, and the step: kept here, it would make a reference cycle
        # (step -> rows -> inputs -> step) that holds the step's tensors until the garbage collector runs.
        kwargs = {name: value for name, value in kwargs.items() if name != "tokentune_step"}
        rows.lower_inputs[layer] = with_hidden(args, kwargs, None)
