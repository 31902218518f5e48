"""How a TokenTune training step runs.

For a batch and its selected positions S (given with the batch, or chosen by the configured
strategy, :mod:`tokentune_peft.selectors`):

1. **Pass 1, no autograd, all tokens.** The model's backbone runs on the whole batch; every
   self-attention records its keys, values and mask (:mod:`tokentune_peft.attention`). The
   "importance" strategy draws S only now, from attention scores measured during this pass.
2. **Pass 2, autograd, selected tokens only.** The whole model runs on the tokens in S, with their
   own ids, original position ids and token types. In each self-attention the selected tokens' keys
   and values are written into the recorded ones, so the selected queries attend to every token under
   the model's own mask. Every other module (embeddings, norms, MLPs, heads) sees only the selected
   rows, so autograd keeps only their activations, plus the keys and values of all tokens.
3. **Loss on S**, as the model defines it for its task.

The gradient equals that of a full-sequence forward whose layer inputs and attention keys/values are
detached outside S, with the loss on S: the TokenTune definition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from peft.utils import TaskType
from torch import nn
from transformers.utils import ModelOutput

from .attention import TokenTuneStep
from .labels import IGNORE_INDEX, selected_targets
from .outputs import with_selected_positions
from .selection import PAD_POSITION, validate_selected_positions
from .selectors import TokenSelector


@dataclass
class TokenTuneEngine:
    """Runs TokenTune steps for one model.

    Args:
        selector: chooses the positions when a batch brings none.
        generator: CPU generator used for sampling (the trainer swaps in its own, which it checkpoints).
    """

    selector: TokenSelector
    generator: torch.Generator

    @property
    def task_type(self) -> str:
        return self.selector.task_type

    def __call__(
        self,
        model: nn.Module,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        selected_positions: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> ModelOutput:
        if input_ids is None:
            raise ValueError("A TokenTune training step needs `input_ids`; `inputs_embeds` is not supported.")
        for name in ("past_key_values", "encoder_hidden_states"):
            if kwargs.get(name) is not None:
                raise ValueError(f"A TokenTune training step does not take `{name}`.")
        kwargs.pop("use_cache", None)
        batch, seq_len = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"`attention_mask` must have the shape of `input_ids` {tuple(input_ids.shape)}; "
                f"got {tuple(attention_mask.shape)}."
            )
        self._check_labels(labels, input_ids)
        head = self.selector.head_positions(model, input_ids, attention_mask)
        if head is not None and not attention_mask.gather(1, head[:, None]).all():
            raise ValueError(
                f"The classification head reads positions {head.tolist()}, and some are padding "
                "(attention_mask == 0); pad encoder inputs on the right."
            )
        positions = self._full_position_ids(model, input_ids, position_ids)
        step, selected_positions = self._pass_one(
            model, input_ids, attention_mask, positions, token_type_ids, labels, selected_positions
        )
        if head is not None and not (selected_positions == head[:, None]).any(dim=1).all():
            raise ValueError(
                f"`selected_positions` must include the token the classification head reads, at positions "
                f"{head.tolist()}."
            )
        step.select(selected_positions)
        valid = selected_positions != PAD_POSITION
        slots = selected_positions.clamp(min=0)

        selected_ids = input_ids.gather(1, slots)
        pad_id = getattr(model.config, "pad_token_id", None)
        if pad_id is not None:  # a decoder classification head reads the last non-pad token of the slots
            selected_ids = selected_ids.masked_fill(~valid, pad_id)
        inputs = {
            "input_ids": selected_ids,
            "position_ids": positions.gather(1, slots),
            "use_cache": False,
            "tokentune_step": step,
        }
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids.expand(batch, seq_len).gather(1, slots)
        if self.task_type == TaskType.CAUSAL_LM:
            num_items = kwargs.pop("num_items_in_batch", None)
            output = model(**inputs, **kwargs)
            if labels is not None:
                targets = selected_targets(self.task_type, labels, selected_positions)
                output["loss"] = self._causal_lm_loss(model, output.logits, targets, num_items)
        elif self.task_type == TaskType.TOKEN_CLS and labels is not None:
            targets = selected_targets(self.task_type, labels, selected_positions)
            output = model(**inputs, labels=targets, **kwargs)
            if not (targets != IGNORE_INDEX).any():
                output["loss"] = output.logits.sum() * 0.0
        else:
            output = model(**inputs, labels=labels, **kwargs)
        return with_selected_positions(output, selected_positions)

    def _pass_one(self, model, input_ids, attention_mask, positions, token_type_ids, labels, selected_positions):
        """Pass 1 (no autograd, all tokens), and the positions pass 2 runs: given, sampled before
        pass 1, or drawn from the importance pass 1 measured ("importance")."""
        observer = None
        if selected_positions is not None:
            selected_positions = selected_positions.to(input_ids.device)
            validate_selected_positions(selected_positions, attention_mask)
        elif self.selector.selects_in_forward:
            observer = self.selector.importance_meter(model, input_ids, attention_mask, labels)
        else:
            selected_positions = self.sample(model, input_ids, attention_mask, labels=labels)
        step = TokenTuneStep(input_ids.shape[1], observer=observer)
        with torch.no_grad():
            base_inputs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
            model.base_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=positions,
                use_cache=False,
                tokentune_step=step,
                **base_inputs,
            )
        if step.num_recorded == 0:
            raise RuntimeError(
                "No attention call reached TokenTune's attention function: the model's attention does not go "
                "through transformers' attention registry, or its attention implementation was changed after "
                "wrapping."
            )
        if observer is not None:
            selected_positions = self.sample(
                model, input_ids, attention_mask, labels=labels, importance=observer.scores
            )
        return step, selected_positions

    def sample(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        labels: torch.Tensor | None = None,
        importance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Positions for a batch, by the configured strategy, including the always-selected ones.

        ``generator`` defaults to the engine's own. Example: see :class:`tokentune_peft.selectors.TokenSelector`.
        """
        generator = self.generator if generator is None else generator
        return self.selector.sample(model, input_ids, attention_mask, labels, generator, importance)

    @staticmethod
    def _check_labels(labels: torch.Tensor | None, input_ids: torch.Tensor) -> None:
        if labels is None:
            return
        if labels.dim() == 2 and labels.shape != input_ids.shape:
            raise ValueError(
                f"`labels` of shape {tuple(labels.shape)} do not match `input_ids` {tuple(input_ids.shape)}."
            )

    @staticmethod
    def _full_position_ids(model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor | None):
        """Position ids of every token, as the model would compute them when none are given."""
        batch, seq_len = input_ids.shape
        if position_ids is not None:
            if position_ids.shape[-1] != seq_len:
                raise ValueError(
                    f"`position_ids` must have {seq_len} positions per row; got shape {tuple(position_ids.shape)}."
                )
            return position_ids.expand(batch, seq_len)
        embeddings = getattr(model.base_model, "embeddings", None)
        from_ids = getattr(type(embeddings), "create_position_ids_from_input_ids", None)
        if from_ids is not None:  # RoBERTa family: positions skip padding and start after padding_idx
            return from_ids(input_ids, embeddings.padding_idx)
        return torch.arange(seq_len, device=input_ids.device).expand(batch, seq_len)

    @staticmethod
    def _causal_lm_loss(model, logits, targets, num_items_in_batch) -> torch.Tensor:
        if not (targets != IGNORE_INDEX).any():
            return logits.sum() * 0.0  # no supervised token selected: zero loss, not NaN
        return model.loss_function(
            logits=logits,
            labels=None,
            vocab_size=logits.shape[-1],
            shift_labels=targets,
            num_items_in_batch=num_items_in_batch,
        )
