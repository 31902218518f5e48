"""TokenTune in the Hugging Face Trainer: a mixin for any ``Trainer`` subclass, and ``TokenTuneTrainer``."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import safetensors.torch
import torch
from peft import PeftModel
from peft.utils import TaskType
from torch import nn
from transformers import Trainer
from transformers.trainer_pt_utils import LabelSmoother
from transformers.utils import SAFE_WEIGHTS_NAME

from .engine import TokenTuneEngine
from .memory import MIB, SavedTensorMeter
from .selection.labels import selected_targets
from .tuner import TokenTuneLoraModel, TokenTuneModel

SELECTION_STATE_FILE = "tokentune_selection_rng_{}.pth"

logger = logging.getLogger(__name__)


def tokentune_engine_of(model: nn.Module) -> TokenTuneEngine | None:
    """The TokenTune engine of a model wrapped by ``get_peft_model(model, TokenTuneConfig(...))``, or None
    for any other model (a plain transformers model, a plain LoRA ``PeftModel``).

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> tokentune_engine_of(BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                                          intermediate_size=64))) is None
        True
    """
    tuner = getattr(model, "base_model", None) if isinstance(model, PeftModel) else None
    return tuner.tokentune_engine if isinstance(tuner, (TokenTuneModel, TokenTuneLoraModel)) else None


@dataclass
class SelectedTargetsLabelSmoother(LabelSmoother):
    """The Trainer's label smoothing, on the targets of a TokenTune step's selected slots.

    A TokenTune step returns logits for its selected slots only; the Trainer hands the smoother the
    whole sequence's labels. This smoother picks the targets of the slots (for causal LM the next
    token's label, already shifted) and smooths over them. Outputs without ``selected_positions``
    (evaluation) are smoothed as the stock smoother does.

    Example:
        >>> smoother = SelectedTargetsLabelSmoother(epsilon=0.1, task_type="CAUSAL_LM")
        >>> output = {"logits": torch.zeros(1, 2, 4), "selected_positions": torch.tensor([[0, 2]])}
        >>> round(float(smoother(output, torch.tensor([[1, 2, 3, 0]]), shift_labels=True)), 4)
        1.3863
    """

    task_type: str = TaskType.CAUSAL_LM

    def __call__(self, model_output, labels, shift_labels=False, num_items_in_batch=None):
        selected = model_output.get("selected_positions") if isinstance(model_output, dict) else None
        if selected is not None:
            labels, shift_labels = selected_targets(self.task_type, labels, selected), False
        return super().__call__(model_output, labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch)


class TokenTuneTrainerMixin:
    """Makes a ``transformers.Trainer`` subclass back-propagate through k sampled token positions per sequence.

    Mix it in first: ``class MyTrainer(TokenTuneTrainerMixin, Trainer)`` (``TokenTuneTrainer`` is exactly
    that; ``tokentune_peft.sft_trainer.TokenTuneSFTTrainer`` mixes it into TRL's ``SFTTrainer``). For each
    batch it samples the positions by the config's ``selection`` strategy (always including the token the
    task head reads; a batch that brings ``selected_positions`` keeps them) with its own generator, seeded
    from ``TokenTuneConfig.seed`` plus the process index and saved in checkpoints, so runs and resumed runs are
    reproducible. ``num_items_in_batch`` counts the selected supervised tokens (every supervised token with
    ``dense_top_layers``, whose loss covers them all), which keeps gradient accumulation and several
    processes exact; label smoothing applies to the selected targets. Logs add
    the selection ratio in force and the activation memory of one step against full fine-tuning.

    The model may be wrapped before the trainer is built, or by the trainer itself (TRL's
    ``peft_config=TokenTuneConfig(...)``). A model without TokenTune (a plain model, or ``peft_config=LoraConfig(...)``)
    trains exactly as the base trainer trains it, so one script turns TokenTune on and off with its config alone.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.activation_memory: dict[str, int] | None = None
        self._selected_tokens = 0
        self._real_tokens = 0
        self.tokentune_engine = tokentune_engine_of(self.model)
        if self.tokentune_engine is None:
            mro = type(self).__mro__
            base = mro[mro.index(TokenTuneTrainerMixin) + 1]  # the trainer this mixin was mixed into
            logger.info(
                "TokenTune is off: the model (%s) is not wrapped with a TokenTuneConfig, so %s trains it as %s does.",
                type(self.model).__name__,
                type(self).__name__,
                base.__name__,
            )
            return
        # With dense top layers the outputs and the loss cover every position, as the stock model's.
        covers_selected_slots = not self.tokentune_engine.grad_call.covers_every_position
        if self.compute_loss_func is not None and covers_selected_slots:
            raise ValueError(
                "`compute_loss_func` receives the whole sequence's labels, while a TokenTune step's outputs cover "
                "its selected slots only. Put a custom loss in the model's `loss_function` instead (it receives "
                "the selected targets as `shift_labels`)."
            )
        if self.label_smoother is not None and covers_selected_slots:
            self.label_smoother = SelectedTargetsLabelSmoother(
                epsilon=self.label_smoother.epsilon, task_type=self.tokentune_engine.task_type
            )
        # Positions come from TokenTuneConfig.seed, one stream per process; TrainingArguments.seed sets the rest.
        self.selection_generator = torch.Generator().manual_seed(self.tokentune_engine.seed + self.args.process_index)

    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, device: torch.device):
        """Fetch the batches of one optimizer step, choose their positions, count the selected supervised tokens.

        Positions that a strategy draws inside the forward ("importance") are unknown here, so for
        token-level tasks the loss is then each batch's mean over its selected supervised tokens
        (exact with one batch per step and one process). With dense top layers the loss covers every
        supervised token, and the count is the Trainer's own.
        """
        if self.tokentune_engine is None:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        counted = []
        for batch in batches:
            if batch.get("input_ids") is None and batch.get("inputs_embeds") is None:
                continue  # a sequence the model builds itself (`pixel_values`): its positions are drawn in the forward
            prepared = self.tokentune_engine.prepare(
                self.model,
                batch.get("input_ids"),
                batch.get("attention_mask"),
                batch.get("labels"),
                batch.get("selected_positions"),
                generator=self.selection_generator,
                inputs_embeds=batch.get("inputs_embeds"),
            )
            if prepared.selected_positions is not None:
                batch["selected_positions"] = prepared.selected_positions
                batch["positions_drawn"] = prepared.drawn
            # Device tensors: read when logged, as the Trainer reads its loss.
            self._selected_tokens += prepared.num_selected
            self._real_tokens += prepared.num_real
            if prepared.targets is not None:
                counted.append({"labels": batch["labels"], "shift_labels": prepared.targets})
        if self.tokentune_engine.grad_call.covers_every_position:
            return batches, self._get_num_items_in_batch(batches, device)
        num_items = self._get_num_items_in_batch(counted, device) if len(counted) == len(batches) else None
        return batches, num_items

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        # a data set may bring its own positions
        if self.tokentune_engine is not None and "selected_positions" not in self._signature_columns:
            self._signature_columns.append("selected_positions")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The TokenTune step's loss; the first step's activations are measured."""
        if not model.training or self.tokentune_engine is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # The generator for positions drawn in the forward, and the count of the loss: the selection's.
        inputs = {**inputs, "selection_generator": self.selection_generator, "loss_counted_over_selection": True}
        if self.activation_memory is not None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with SavedTensorMeter(model) as meter:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.activation_memory = {
            "tokentune_bytes": meter.saved_bytes,
            "full_fine_tuning_bytes": self._full_fine_tuning_bytes(model, inputs),
        }
        return result

    def _full_fine_tuning_bytes(self, model: nn.Module, inputs: dict) -> int:
        """Activation bytes a full-sequence step would keep for this batch, estimated from its first row.

        Measuring one row and scaling by the batch size avoids holding a whole full-sequence graph;
        rows are padded to one length and activations are per row, except a few per-batch tensors
        (masks, rotary tables), so the estimate is within about 2% of a whole-batch measurement.
        """
        stock = self.accelerator.unwrap_model(model).base_model.model
        row = {k: v[:1] for k, v in inputs.items() if k != "selected_positions" and torch.is_tensor(v)}
        sequence = next(inputs[name] for name in ("input_ids", "inputs_embeds", "pixel_values") if name in inputs)
        device = sequence.device
        # A fork of the random state: this extra forward must not shift dropout's random stream, or a
        # resumed run (which measures at its first step) would train differently.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            with torch.enable_grad(), SavedTensorMeter(stock, measure_only=True) as meter:
                stock(**row)
        return meter.saved_bytes * sequence.shape[0]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the selection ratio in force and the activation memory to the training logs."""
        if "loss" in logs and self._real_tokens:
            logs["selection_ratio"] = round(float(self._selected_tokens) / float(self._real_tokens), 4)
            self._selected_tokens = self._real_tokens = 0
            if self.activation_memory is not None:
                logs["activation_mib"] = round(self.activation_memory["tokentune_bytes"] / MIB, 2)
                logs["full_fine_tuning_activation_mib"] = round(
                    self.activation_memory["full_fine_tuning_bytes"] / MIB, 2
                )
        super().log(logs, start_time)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        # Restored here, before the first resumed batch is sampled (the Trainer restores its own
        # generators only after fetching that batch).
        if self.tokentune_engine is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_selection_state(resume_from_checkpoint)
        if self._all_weights_model() is None or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_all_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self._all_weights_model() is None or self.is_fsdp_enabled:
            return super()._load_best_model()
        self._load_all_weights(self.state.best_model_checkpoint)

    def _all_weights_model(self) -> nn.Module | None:
        """The transformers model when TokenTune trains all its weights (no adapter), else None.

        Its checkpoints are transformers checkpoints, whose weight names lack the PeftModel prefix.
        """
        tuner = self.model.base_model
        return tuner.model if isinstance(tuner, TokenTuneModel) else None

    def _load_all_weights(self, folder: str) -> None:
        state_dict = safetensors.torch.load_file(os.path.join(folder, SAFE_WEIGHTS_NAME), device="cpu")
        self._all_weights_model().load_state_dict(state_dict, strict=True)

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        if self.tokentune_engine is None:
            return
        path = os.path.join(output_dir, SELECTION_STATE_FILE.format(self.args.process_index))
        torch.save(self.selection_generator.get_state(), path)

    def _load_selection_state(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, SELECTION_STATE_FILE.format(self.args.process_index))
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} is missing: the checkpoint was not written by TokenTuneTrainer, so the token selection "
                "cannot continue where it stopped."
            )
        self.selection_generator.set_state(torch.load(path))


class TokenTuneTrainer(TokenTuneTrainerMixin, Trainer):
    """The Hugging Face ``Trainer`` with TokenTune steps (see :class:`TokenTuneTrainerMixin`).

    Example:
        >>> import tokentune_peft
        >>> from peft import get_peft_model
        >>> from transformers import TrainingArguments
        >>> model = get_peft_model(base_model, tokentune_peft.TokenTuneConfig(task_type="CAUSAL_LM"))  # doctest: +SKIP
        >>> trainer = TokenTuneTrainer(model=model, args=TrainingArguments("out"), train_dataset=data)  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
    """
