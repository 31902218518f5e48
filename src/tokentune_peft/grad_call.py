"""The call of a TokenTune step that carries gradient, in its two variants, resolved when the model is wrapped.

* :class:`SelectedTokensCall` (plain TokenTune): the model runs on the selected tokens only, with their ids
  (or embeddings), original positions and types, and the selected slots' targets; its own forward computes
  the loss on them.
* :class:`WholeBatchCall`: the model's stock call on every token, with the caller's labels, its transformer
  layers hooked to run the selected rows (:mod:`tokentune_peft.whole_batch`). Dense top layers use it, and so
  do image classifiers, whose sequence only the model can build.

Both have one protocol, which the engines call in order: :meth:`~SelectedTokensCall.new_rows` when the step
starts, :meth:`~SelectedTokensCall.inputs` for the call's keywords, :meth:`~SelectedTokensCall.start` just
before the call, :meth:`~SelectedTokensCall.masks` around it (two passes), :meth:`~SelectedTokensCall.finish`
on its output.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from peft.utils import TaskType
from torch import nn
from transformers.utils import ModelOutput

from .attention import mask_hook
from .outputs import with_selected_positions
from .selection.labels import IGNORE_INDEX
from .selection.sampling import gather_positions
from .slots import Slots
from .step_inputs import StepBatch
from .whole_batch import WholeBatchRows, record_lower_layer_inputs, refuse_router_loss


def without_masks() -> AbstractContextManager:
    """Context for a call on the selected tokens: the model builds no attention mask (each would be [k x k]), since
    their attention reads the masks recorded on the whole batch.

    Example:
        >>> from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
        >>> with without_masks():
        ...     ALL_MASK_ATTENTION_FUNCTIONS["tokentune_sdpa"](batch_size=1, q_length=2, kv_length=2) is None
        True
    """
    return mask_hook(lambda build, *args, **kwargs: None)


def selected_inputs(model: nn.Module, batch: StepBatch, slots: Slots, task_type: str) -> dict | None:
    """The inputs of a call of ``model`` on the slots of the selected tokens (:class:`~tokentune_peft.slots.Slots`):
    their ids (or embeddings), original positions and types; None when the model builds its sequence itself (no
    such call exists).

    Example:
        >>> from tokentune_peft.step_inputs import TextFeed
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                              intermediate_size=64, vocab_size=64))
        >>> batch = TextFeed().read(model, {"input_ids": torch.tensor([[5, 6, 7]])})
        >>> selected_inputs(model, batch, Slots(torch.tensor([[0, 2]]), 3, None), "TOKEN_CLS")["input_ids"].tolist()
        [[5, 7]]
    """
    if not batch.tokens:
        return None
    inputs = gather_positions(batch.per_token, slots.positions)
    pad_id = getattr(model.config, "pad_token_id", None)
    if task_type == TaskType.SEQ_CLS and "input_ids" in inputs and pad_id is not None:
        # A decoder's classification head reads the last slot whose id is not the pad id: the last selected one.
        inputs["input_ids"] = inputs["input_ids"].masked_fill(~slots.selected, pad_id)
    # Which slots hold a selected token. The selected queries' attention uses the recorded masks; this one is
    # for what the model computes per token, such as an MoE router's load-balancing loss.
    inputs["attention_mask"] = slots.selected.long()
    inputs["use_cache"] = False
    return inputs


class SelectedTokensCall:
    """The model's call on the selected tokens only, with their targets.

    Args:
        task_type: the model's task (CAUSAL_LM, SEQ_CLS or TOKEN_CLS).
    """

    #: Whether the call's outputs and loss cover every position (they cover the selected slots).
    covers_every_position = False

    def __init__(self, task_type: str) -> None:
        self.task_type = task_type

    def new_rows(self, seq_len: int) -> WholeBatchRows | None:
        """The step's layer routing: none, every layer runs the call's own rows."""
        return None

    def check(self, batch: StepBatch) -> None:
        """Refuse what this call cannot make exact (nothing here)."""

    def inputs(
        self, batch: StepBatch, selected: dict | None, targets: torch.Tensor | None
    ) -> tuple[dict, torch.Tensor | None]:
        """The call's keywords, and whether any selected target is supervised (a bool tensor on the device; None
        when the loss does not count tokens)."""
        inputs, supervised = {**selected, **batch.extra}, None
        if targets is not None:
            inputs["labels"] = targets
            if self.task_type == TaskType.CAUSAL_LM:
                inputs["shift_labels"] = targets  # aligned with the slots: nothing shifts across non-neighbours
            if self.task_type != TaskType.SEQ_CLS:
                supervised = (targets != IGNORE_INDEX).any()
        return inputs, supervised

    def start(self, model: nn.Module, step, selected: dict | None) -> None:
        """Just before the call (nothing to prepare)."""

    def masks(self) -> AbstractContextManager:
        """Context for the call in a two-pass step: it needs no mask of its own (:func:`without_masks`)."""
        return without_masks()

    def finish(
        self, output: ModelOutput, supervised: torch.Tensor | None, selected_positions: torch.Tensor
    ) -> ModelOutput:
        """The step's output: the model's, with the selected positions. A loss over no supervised slot (a mean over
        no terms, 0 / 0) is 0, chosen on the device: the host never waits to read whether there was one."""
        if supervised is not None and output.get("loss") is not None:
            output["loss"] = torch.where(supervised, output["loss"], output["loss"].new_zeros(()))
        return with_selected_positions(output, selected_positions)


class WholeBatchCall(SelectedTokensCall):
    """The model's stock call on every token, its layers running the rows :class:`WholeBatchRows` gives them.

    Args:
        task_type: the model's task.
        layers: the transformer layers the call runs (a vision-language model's are its language model's).
        dense_count: how many of the last layers run every token (``TokenTuneConfig.dense_top_layers``).
    """

    covers_every_position = True

    def __init__(self, task_type: str, layers: list[nn.Module], dense_count: int) -> None:
        super().__init__(task_type)
        self.layers = layers
        self.dense_count = dense_count

    def new_rows(self, seq_len: int) -> WholeBatchRows:
        """The step's layer routing."""
        return WholeBatchRows(self.layers, self.dense_count, seq_len)

    def check(self, batch: StepBatch) -> None:
        """Refuse a router load-balancing loss asked for in the forward, with dense top layers."""
        if self.dense_count and batch.extra.get("output_router_logits"):
            refuse_router_loss("passed to the forward")

    def inputs(
        self, batch: StepBatch, selected: dict | None, targets: torch.Tensor | None
    ) -> tuple[dict, torch.Tensor | None]:
        """The whole batch's keywords with the caller's labels (the model's own loss covers every position)."""
        inputs = {**batch.whole_batch_inputs, **batch.extra}
        if batch.labels is not None:
            inputs["labels"] = batch.labels
        return inputs, None

    def start(self, model: nn.Module, step, selected: dict | None) -> None:
        """Record what the layers below the top receive in a call on the selected tokens, and turn the hooks on."""
        if selected is not None:
            record_lower_layer_inputs(model.base_model, step.rows, selected, step)
        step.rows.running = True

    def masks(self) -> AbstractContextManager:
        """Context for the call in a two-pass step: the model's own masks, which its top layers read."""
        return nullcontext()


def grad_call_for(task_type: str, layers: list[nn.Module], dense_count: int, fed_pixel_values: bool):
    """The grad call of a model: whole-batch with dense top layers or for an image classifier, else selected tokens.

    Example:
        >>> type(grad_call_for("CAUSAL_LM", [], 0, fed_pixel_values=False)).__name__
        'SelectedTokensCall'
    """
    if dense_count or fed_pixel_values:
        return WholeBatchCall(task_type, layers, dense_count)
    return SelectedTokensCall(task_type)
