"""`TokenTuneTrainer`: the Hugging Face Trainer, with TokenTune's positions chosen per batch."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import safetensors.torch
import torch
from peft import PeftModel
from peft.utils import TaskType
from torch import nn
from transformers import Trainer
from transformers.utils import SAFE_WEIGHTS_NAME

from .engine import TokenTuneEngine
from .labels import selected_targets
from .memory import SavedTensorMeter
from .tuner import TokenTuneLoraModel, TokenTuneModel

SELECTION_STATE_FILE = "tokentune_selection_rng_{}.pth"
MIB = 2**20


def tokentune_engine_of(model: nn.Module) -> TokenTuneEngine:
    """The TokenTune engine of a model wrapped by ``get_peft_model(model, TokenTuneConfig(...))``.

    Raises TypeError, saying how to wrap it, for any other model.
    """
    tuner = getattr(model, "base_model", None) if isinstance(model, PeftModel) else None
    if not isinstance(tuner, (TokenTuneModel, TokenTuneLoraModel)):
        raise TypeError(
            f"TokenTuneTrainer needs a model wrapped with TokenTune; got {type(model).__name__}. Wrap it first:\n"
            "    import tokentune_peft\n"
            "    from peft import get_peft_model\n"
            "    model = get_peft_model(model, tokentune_peft.TokenTuneConfig(selection_ratio=0.3, task_type=...))"
        )
    return tuner.tokentune_engine


class TokenTuneTrainer(Trainer):
    """A `Trainer` that back-propagates through k sampled token positions per sequence.

    It takes the same arguments as `Trainer`. For each batch it samples the positions by the
    config's ``selection`` strategy (always including the token the task head reads; a batch that
    brings ``selected_positions`` keeps them) with its own generator, seeded from
    ``args.seed`` and the process index and saved in checkpoints, so runs and resumed runs are
    reproducible. The loss is normalised by the number of selected supervised tokens, which keeps
    gradient accumulation and several processes exact. Logs add the selection ratio in force and the
    activation memory of one step against full fine-tuning.

    Example:
        >>> import tokentune_peft
        >>> from peft import get_peft_model
        >>> from transformers import TrainingArguments
        >>> model = get_peft_model(base_model, tokentune_peft.TokenTuneConfig(task_type="CAUSAL_LM"))  # doctest: +SKIP
        >>> trainer = TokenTuneTrainer(model=model, args=TrainingArguments("out"), train_dataset=data)  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module | None = None, *args: Any, **kwargs: Any) -> None:
        self.tokentune_engine = tokentune_engine_of(model)
        super().__init__(model, *args, **kwargs)
        self.selection_generator = torch.Generator().manual_seed(self.args.seed + self.args.process_index)
        # Positions drawn inside the forward ("importance") come from this generator too.
        self.tokentune_engine.generator = self.selection_generator
        self.activation_memory: dict[str, int] | None = None
        self._selected_tokens = 0
        self._real_tokens = 0

    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, device: torch.device):
        """Fetch the batches of one optimizer step, sample their positions, count the supervised ones.

        Positions that a strategy draws inside the forward ("importance") are unknown here, so for
        token-level tasks the loss is then each batch's mean over its selected supervised tokens
        (exact with one batch per step and one process).
        """
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        engine = self.tokentune_engine
        counted = []
        for batch in batches:
            if "selected_positions" not in batch and not engine.selector.selects_in_forward:
                batch["selected_positions"] = engine.sample(
                    self.model, batch["input_ids"], batch.get("attention_mask"), labels=batch.get("labels")
                )
            selected = batch.get("selected_positions")
            if "labels" in batch and (selected is not None or engine.task_type == TaskType.SEQ_CLS):
                targets = selected_targets(engine.task_type, batch["labels"], selected)
                counted.append({"labels": batch["labels"], "shift_labels": targets})
        num_items = self._get_num_items_in_batch(counted, device) if len(counted) == len(batches) else None
        return batches, num_items

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if "selected_positions" not in self._signature_columns:  # a data set may bring its own positions
            self._signature_columns.append("selected_positions")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The TokenTune step's loss; counts the selected tokens, and measures the first step's activations."""
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.activation_memory is None:
            with SavedTensorMeter(model) as meter:
                loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            self.activation_memory = {
                "tokentune_bytes": meter.saved_bytes,
                "full_fine_tuning_bytes": self._full_fine_tuning_bytes(model, inputs),
            }
        else:
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        selected, mask = outputs.get("selected_positions"), inputs.get("attention_mask")
        if selected is not None:  # absent when the forward ran without autograd (a plain forward)
            self._selected_tokens += int((selected >= 0).sum())
            self._real_tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        return (loss, outputs) if return_outputs else loss

    def _full_fine_tuning_bytes(self, model: nn.Module, inputs: dict) -> int:
        """Activation bytes a full-sequence step would keep for this batch, estimated from its first row.

        Measuring one row and scaling by the batch size avoids holding a whole full-sequence graph;
        rows are padded to one length and activations are per row, except a few per-batch tensors
        (masks, rotary tables), so the estimate is within about 2% of a whole-batch measurement.
        """
        stock = self.accelerator.unwrap_model(model).base_model.model
        row = {k: v[:1] for k, v in inputs.items() if k != "selected_positions" and torch.is_tensor(v)}
        device = inputs["input_ids"].device
        # A fork of the random state: this extra forward must not shift dropout's random stream, or a
        # resumed run (which measures at its first step) would train differently.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            with torch.enable_grad(), SavedTensorMeter(stock) as meter:
                stock(**row)
        return meter.saved_bytes * inputs["input_ids"].shape[0]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the selection ratio in force and the activation memory to the training logs."""
        if "loss" in logs and self._real_tokens:
            logs["selection_ratio"] = round(self._selected_tokens / self._real_tokens, 4)
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
