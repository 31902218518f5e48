"""How a TokenTune training step runs.

For a batch and its selected positions S (given with the batch, or chosen by the configured
strategy, :mod:`tokentune_peft.selection.strategies`):

1. **Pass 1, no autograd, all tokens.** The model's backbone runs on the whole batch; every
   self-attention records its keys, values and mask (:mod:`tokentune_peft.attention`). The
   "importance" and "gradient" strategies draw S only now, from scores measured during this pass.
2. **Pass 2, autograd, selected tokens only.** The whole model runs on the tokens in S, with their
   own ids, original position ids and token types. In each self-attention the selected tokens' keys
   and values are written into the recorded ones, so the selected queries attend to every token under
   the model's own mask. Every other module (embeddings, norms, MLPs, heads) sees only the selected
   rows, so autograd keeps only their activations, plus the keys and values of all tokens.
3. **Loss on S**, computed by the model's own forward in pass 2 from the selected slots' targets
   (``labels``, and ``shift_labels`` for causal LM), so whatever computes the model's loss (its
   ``loss_function``, an MoE router loss, TRL's fused LM head) applies to S.

The gradient equals that of a full-sequence forward whose layer inputs and attention keys/values are
detached outside S, with the loss on S: the TokenTune definition.

Where it can, the engine runs the same step in a single pass instead (:mod:`tokentune_peft.single_pass`):
the selected tokens' call of step 2 and a no-grad call over the other tokens hand over at every
self-attention, so no token's forward runs twice. ``TokenTuneConfig.engine`` picks or forces either.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from peft.utils import TaskType
from torch import nn
from transformers.utils import ModelOutput

from .attention import TokenTuneStep
from .dense_top import RUN, DenseTop, hidden_of, record_lower_layer_inputs, skipping
from .multimodal import IMAGE_INPUTS as VLM_IMAGE_INPUTS
from .multimodal import VISION_LANGUAGE_MODELS, merged_inputs_embeds
from .outputs import with_selected_positions
from .selection.labels import IGNORE_INDEX, selected_targets
from .selection.sampling import PAD_POSITION, gather_positions, validate_selected_positions
from .selection.strategies import TokenSelector
from .single_pass import (
    AUTO,
    SINGLE_PASS,
    TWO_PASS,
    SinglePassStep,
    SinglePassUnsupported,
    auto_prefers_two_pass,
    single_pass_blocker,
)
from .vision import IMAGE_INPUTS, first_layer_input
from .vision import TWO_PASS_REASON as IMAGE_TWO_PASS_REASON

logger = logging.getLogger(__name__)

#: Flash-attention "varlen" inputs (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``).
FLASH_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
UNSUPPORTED_INPUTS = {
    "past_key_values": "It trains on whole sequences, without a cache.",
    "encoder_hidden_states": "Cross-attention is not supported.",
    "shift_labels": "Pass `labels`: TokenTune aligns the targets with the selected positions itself.",
}


def drop_varlen_boundaries(kwargs: dict, position_ids: torch.Tensor | None) -> None:
    """Remove flash-attention "varlen" document boundaries from ``kwargs`` when ``position_ids`` say the same.

    TokenTune runs on sdpa or eager attention, which ignore these keywords: the stock model keeps packed
    documents apart by ``position_ids`` that restart at 0 per document (with no ``attention_mask``), and so
    does TokenTune. Boundaries that disagree with the position ids are refused: no sdpa model honours them.

    Example:
        >>> kwargs = {"cu_seq_lens_q": torch.tensor([0, 2, 5]), "max_length_q": 3}
        >>> drop_varlen_boundaries(kwargs, torch.tensor([[0, 1, 0, 1, 2]]))
        >>> kwargs
        {}
    """
    given = {name: kwargs.pop(name) for name in FLASH_VARLEN_KWARGS if kwargs.get(name) is not None}
    if not given:
        return
    documents = None
    if position_ids is not None:
        flat = position_ids.flatten()
        starts = (flat == 0).nonzero().flatten()
        documents = torch.cat([starts, starts.new_tensor([flat.numel()])])
    for name in ("cu_seq_lens_q", "cu_seq_lens_k"):
        boundaries = given.get(name)
        if boundaries is not None and (documents is None or not torch.equal(boundaries.to(documents), documents)):
            raise ValueError(
                f"`{name}` gives document boundaries that `position_ids` do not repeat. TokenTune runs on sdpa or "
                "eager attention, which separate packed documents by `position_ids` restarting at 0 per document "
                "(with no `attention_mask`); pass those."
            )


def _check_head_selected(head: torch.Tensor | None, selected_positions: torch.Tensor) -> None:
    if head is not None and not (selected_positions == head[:, None]).any(dim=1).all():
        raise ValueError(
            f"`selected_positions` must include the token the classification head reads, at positions {head.tolist()}."
        )


@dataclass
class PreparedBatch:
    """What a TokenTune step decides about a batch before its forward (:meth:`TokenTuneEngine.prepare`).

    Args:
        selected_positions: [batch, k] positions, -1 padded; None when the strategy draws them in the
            forward ("importance").
        head_positions: [batch] where a sequence-classification head reads; None for other tasks.
        targets: the labels of the selected slots (:func:`~tokentune_peft.selection.labels.selected_targets`),
            None without labels or while the positions are unknown.
        real_tokens: [batch, seq] 1 for real tokens, 0 for padding.
        budget: when the positions are drawn in the forward, computes k per row (called only if counted).

    The counts (:attr:`num_selected`, :attr:`num_real`) are computed when read, so a training forward,
    which never reads them, pays nothing for them.
    """

    selected_positions: torch.Tensor | None
    head_positions: torch.Tensor | None
    targets: torch.Tensor | None
    real_tokens: torch.Tensor
    budget: Callable[[], torch.Tensor] | None = field(default=None, repr=False)

    @property
    def num_selected(self) -> int:
        """Tokens selected in the batch (the budget, when they are drawn in the forward)."""
        if self.selected_positions is None:
            return int(self.budget().sum())
        return int((self.selected_positions != PAD_POSITION).sum())

    @property
    def num_real(self) -> int:
        """Real (non-padding) tokens in the batch."""
        return int(self.real_tokens.sum())


@dataclass
class TokenTuneEngine:
    """Runs TokenTune steps for one model.

    Args:
        selector: chooses the positions when a batch brings none.
        seed: seeds :attr:`generator`, which draws positions when the caller hands in none (a
            :class:`~tokentune_peft.trainer.TokenTuneTrainerMixin` hands in its own, seeded from
            ``seed`` + its process index and saved in checkpoints).
        engine: "auto" (the single pass where it can run on a CPU, else two passes), "single-pass" or "two-pass".
        dense_top_layers: how many of the last ``layers`` run every token with autograd
            (:mod:`tokentune_peft.dense_top`); 0 for plain TokenTune.
        layers: the model's transformer layers (:func:`~tokentune_peft.dense_top.transformer_layers`); a
            vision-language model's are its language model's.
        vision_language: whether the model is a vision-language model (:mod:`tokentune_peft.multimodal`).

    After a step, ``engine_used`` says which step ran ("single-pass" or "two-pass") and
    ``engine_reason`` why not the single pass (None when it ran).
    """

    selector: TokenSelector
    seed: int = 0
    engine: str = "auto"
    dense_top_layers: int = 0
    layers: list[nn.Module] = field(default_factory=list, repr=False)
    vision_language: bool = False
    engine_used: str | None = field(default=None, init=False)
    engine_reason: str | None = field(default=None, init=False)
    _single_pass_failure: str | None = field(default=None, init=False, repr=False)
    _attention_calls: int | None = field(default=None, init=False, repr=False)  # per forward, from a single pass

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    @property
    def task_type(self) -> str:
        return self.selector.task_type

    def prepare(
        self,
        model: nn.Module,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        selected_positions: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> PreparedBatch:
        """Check a batch and choose its positions (unless the strategy draws them in the forward).

        The one place where a batch's positions, head tokens, selected targets and counts are decided:
        the training forward calls it, and so does the Trainer before the forward, to count the
        selected supervised tokens. The batch comes as ``input_ids`` or as ``inputs_embeds``.
        ``generator`` defaults to :attr:`generator`.

        Example:
            >>> from tokentune_peft.selection import TokenSelector
            >>> engine = TokenTuneEngine(TokenSelector("CAUSAL_LM", "none", True, None, 2))
            >>> prepared = engine.prepare(None, torch.ones(1, 4, dtype=torch.long), labels=torch.ones(1, 4).long())
            >>> prepared.selected_positions.shape, prepared.num_selected, prepared.num_real
            (torch.Size([1, 2]), 2, 4)
        """
        sequence = input_ids if input_ids is not None else inputs_embeds
        if attention_mask is None:
            attention_mask = torch.ones(sequence.shape[:2], dtype=torch.long, device=sequence.device)
        real_tokens = attention_mask
        head = self.selector.head_positions(model, input_ids, real_tokens)
        if head is not None and input_ids is None and self.selector.is_decoder and not real_tokens.all():
            raise ValueError(
                "A decoder's classification head given `inputs_embeds` reads the last position of every row, as "
                "transformers' heads do, so a padded batch (attention_mask with zeros) would be read at padding; "
                "pass `input_ids`, or batches without padding."
            )
        if head is not None and not real_tokens.gather(1, head[:, None]).all():
            raise ValueError(
                f"The classification head reads positions {head.tolist()}, and some are padding "
                "(attention_mask == 0); pad encoder inputs on the right."
            )
        if selected_positions is not None:
            selected_positions = selected_positions.to(sequence.device)
            validate_selected_positions(selected_positions, real_tokens)
        elif not self.selector.selects_in_forward:
            generator = self.generator if generator is None else generator
            selected_positions = self.selector.sample(model, input_ids, real_tokens, labels, generator)
        if selected_positions is not None:
            _check_head_selected(head, selected_positions)
        return PreparedBatch(
            selected_positions=selected_positions,
            head_positions=head,
            targets=self._targets(labels, selected_positions),
            real_tokens=real_tokens,
            budget=partial(self.selector.budget, model, input_ids, real_tokens) if selected_positions is None else None,
        )

    def __call__(
        self,
        model: nn.Module,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        selected_positions: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        trainer_generator: torch.Generator | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> ModelOutput:
        """One TokenTune step of ``model`` (a transformers model) on a batch.

        The batch comes as ``input_ids`` or as ``inputs_embeds`` (embeddings computed outside the model,
        soft prompts): the selected rows of ``inputs_embeds`` enter the selected tokens' call, so a tensor
        that requires grad gets the gradient of the selected rows. An image classifier's batch comes as
        ``pixel_values`` (:mod:`tokentune_peft.vision`); a vision-language model's as ``input_ids`` with
        ``pixel_values``, merged into ``inputs_embeds`` first (:mod:`tokentune_peft.multimodal`).

        ``attention_mask`` may be None, as in packed batches whose ``position_ids`` restart at 0 per
        document: pass 1 then builds the model's own per-document mask. ``trainer_generator`` is handed
        in by :class:`~tokentune_peft.trainer.TokenTuneTrainerMixin`: its generator, for positions drawn
        in the forward, and the sign that the caller counts the loss over the selected tokens. Other
        keywords (``num_items_in_batch``, ``output_router_logits``, TRL's ``fused_lm_head``...) reach the
        model's forward in pass 2, which computes its own loss on the selected slots.
        """
        if input_ids is None and inputs_embeds is None and kwargs.get("pixel_values") is not None:
            return self._image_step(model, labels, selected_positions, trainer_generator, kwargs)
        image_inputs = {name: kwargs.pop(name) for name in VLM_IMAGE_INPUTS if kwargs.get(name) is not None}
        if image_inputs:  # a vision-language model: the step runs on its language model's merged sequence
            if not self.vision_language or input_ids is None or inputs_embeds is not None:
                raise ValueError(
                    "Images (`pixel_values`) go with `input_ids` to a vision-language model "
                    f"({', '.join(VISION_LANGUAGE_MODELS)}), whose image tokens mark where the images go."
                )
            input_ids, inputs_embeds = None, merged_inputs_embeds(model, input_ids, attention_mask, image_inputs)
        tokens = self._check_inputs(input_ids, inputs_embeds, attention_mask, labels, kwargs)
        kwargs.pop("use_cache", None)
        drop_varlen_boundaries(kwargs, position_ids)
        if selected_positions is None and not self.dense_top_layers:  # drawn here: the count cannot be over them
            self._check_loss_count(trainer_generator is not None, kwargs)
        generator = self.generator if trainer_generator is None else trainer_generator
        prepared = self.prepare(model, input_ids, attention_mask, labels, selected_positions, generator, inputs_embeds)
        positions = self._full_position_ids(model, tokens, position_ids)
        backbone_inputs = {**tokens, "attention_mask": attention_mask, "position_ids": positions}
        if token_type_ids is not None:
            backbone_inputs["token_type_ids"] = token_type_ids
        single_pass = self._use_single_pass(model, drawn_in_forward=prepared.selected_positions is None)
        step, selected_positions = None, prepared.selected_positions
        dense = self._dense_top(positions.shape[1])
        if not single_pass:
            step, selected_positions = self._pass_one(model, backbone_inputs, labels, prepared, generator, dense)
        selected_inputs = self._selected_inputs(model, backbone_inputs, selected_positions)
        supervised = True
        if self.dense_top_layers:  # the stock call on the whole batch; the layers below the top take the selected rows
            grad_inputs = {**backbone_inputs, "use_cache": False}
            if labels is not None:
                grad_inputs["labels"] = labels
        else:
            drawn_in_forward = prepared.selected_positions is None
            targets = self._targets(labels, selected_positions) if drawn_in_forward else prepared.targets
            grad_inputs, supervised = self._with_targets(selected_inputs, targets, kwargs)
        output = None
        if single_pass:  # None if the single pass gave up on this model
            output = self._single_pass(
                model, backbone_inputs, selected_positions, {**grad_inputs, **kwargs}, selected_inputs
            )
        if output is None:
            if step is None:
                step, _ = self._pass_one(model, backbone_inputs, labels, prepared, generator, dense)
            step.select(selected_positions)
            if step.dense is not None:
                record_lower_layer_inputs(model.base_model, step.dense, selected_inputs, step)
                step.dense.phase = RUN
            output = model(**grad_inputs, **kwargs, tokentune_step=step)
        if not supervised and not torch.isfinite(output["loss"]):  # a head that averages over no terms
            output["loss"] = output["logits"].sum() * 0.0
        return with_selected_positions(output, selected_positions)

    def _image_step(self, model, labels, selected_positions, trainer_generator, kwargs: dict) -> ModelOutput:
        """A step of an image classifier fed ``pixel_values`` (:mod:`tokentune_peft.vision`): two passes, the
        grad call being the stock call on the whole batch, whose first layer takes the selected rows."""
        if self.engine == SINGLE_PASS:
            raise ValueError(f"TokenTuneConfig(engine={SINGLE_PASS!r}) cannot run this step: {IMAGE_TWO_PASS_REASON}.")
        self._announce(TWO_PASS, IMAGE_TWO_PASS_REASON)
        generator = self.generator if trainer_generator is None else trainer_generator
        backbone_inputs = {name: kwargs[name] for name in IMAGE_INPUTS if name in kwargs}
        sequence = first_layer_input(model.base_model, backbone_inputs)
        prepared = self.prepare(model, None, None, labels, selected_positions, generator, inputs_embeds=sequence)
        dense = DenseTop(self.layers, self.dense_top_layers, sequence.shape[1])
        step, selected_positions = self._pass_one(model, backbone_inputs, labels, prepared, generator, dense)
        step.select(selected_positions)
        dense.phase = RUN
        output = model(**kwargs, labels=labels, tokentune_step=step)
        return with_selected_positions(output, selected_positions)

    def _targets(self, labels: torch.Tensor | None, selected_positions: torch.Tensor | None) -> torch.Tensor | None:
        if labels is None or (selected_positions is None and self.task_type != TaskType.SEQ_CLS):
            return None
        return selected_targets(self.task_type, labels, selected_positions)

    @staticmethod
    def _selected_inputs(model, backbone_inputs: dict, selected_positions) -> dict:
        """The inputs of a call of ``model`` on the selected tokens: their ids (or embeddings), original
        positions and types."""
        valid = selected_positions != PAD_POSITION
        inputs = gather_positions(backbone_inputs, selected_positions)
        pad_id = getattr(model.config, "pad_token_id", None)
        if "input_ids" in inputs and pad_id is not None:  # a decoder classification head reads the last non-pad slot
            inputs["input_ids"] = inputs["input_ids"].masked_fill(~valid, pad_id)
        # Which slots hold a token. The selected queries' attention uses the recorded masks; this one is
        # for what the model computes per token, such as an MoE router's load-balancing loss.
        inputs["attention_mask"] = valid.long()
        inputs["use_cache"] = False
        return inputs

    def _with_targets(self, selected_inputs: dict, targets: torch.Tensor | None, kwargs: dict) -> tuple[dict, bool]:
        """The selected tokens' inputs with their targets, and whether any target is supervised."""
        inputs, supervised = dict(selected_inputs), True
        if targets is not None:
            inputs["labels"] = targets
            if self.task_type == TaskType.CAUSAL_LM:
                inputs["shift_labels"] = targets  # aligned with the slots: nothing shifts across non-neighbours
            if self.task_type != TaskType.SEQ_CLS:
                supervised = bool((targets != IGNORE_INDEX).any())
                if not supervised and kwargs.get("num_items_in_batch") is None:
                    kwargs["num_items_in_batch"] = 1  # a sum over no terms: zero loss, not 0 / 0
        return inputs, supervised

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, labels, kwargs: dict) -> dict:
        """Check a step's inputs; returns the batch's tokens: ``{"input_ids": ...}`` or ``{"inputs_embeds": ...}``."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("A TokenTune training step needs exactly one of `input_ids` and `inputs_embeds`.")
        if inputs_embeds is not None and inputs_embeds.dim() != 3:
            raise ValueError(
                f"`inputs_embeds` must be [batch, sequence, hidden]; got shape {tuple(inputs_embeds.shape)}."
            )
        name, sequence = ("input_ids", input_ids) if input_ids is not None else ("inputs_embeds", inputs_embeds)
        shape = tuple(sequence.shape[:2])
        for unsupported, why in UNSUPPORTED_INPUTS.items():
            if kwargs.get(unsupported) is not None:
                raise ValueError(f"A TokenTune training step does not take `{unsupported}`. {why}")
        if self.dense_top_layers and kwargs.get("output_router_logits"):
            raise ValueError(
                "`output_router_logits=True` cannot be combined with `dense_top_layers`: the router's load-balancing "
                "loss would mix the selected tokens of the layers below with every token of the top layers."
            )
        if attention_mask is not None and tuple(attention_mask.shape) != shape:
            raise ValueError(
                f"`attention_mask` must have the [batch, sequence] shape of `{name}` {shape}; "
                f"got {tuple(attention_mask.shape)}."
            )
        if labels is not None and labels.dim() == 2 and tuple(labels.shape) != shape:
            raise ValueError(f"`labels` of shape {tuple(labels.shape)} do not match `{name}` {shape}.")
        return {name: sequence}

    def _check_loss_count(self, counted_by_trainer: bool, kwargs: dict) -> None:
        """Refuse a caller whose loss count cannot be over the selected tokens.

        Positions drawn in this forward are unknown to the caller, so a ``num_items_in_batch`` it
        passes counts every supervised token, and TRL's trainers divide the fused head's losses by such
        a count outside the model: the loss would shrink by about the ratio, silently.
        """
        if counted_by_trainer or self.task_type == TaskType.SEQ_CLS:  # a sequence loss does not count tokens
            return
        if kwargs.get("fused_lm_head"):
            raise ValueError(
                "TRL's trainers normalise the loss by a count of every supervised token, while TokenTune trains "
                "on the selected ones. Use tokentune_peft.sft_trainer.TokenTuneSFTTrainer instead of SFTTrainer "
                "(or mix tokentune_peft.trainer.TokenTuneTrainerMixin into your TRL trainer)."
            )
        if kwargs.get("num_items_in_batch") is not None:
            raise ValueError(
                "`num_items_in_batch` was given for a step whose positions are drawn in this forward, so it counts "
                "every supervised token, not the selected ones; the loss would shrink by about the selection ratio. "
                "Train with tokentune_peft.trainer.TokenTuneTrainer (or mix TokenTuneTrainerMixin into your "
                "Trainer subclass), or pass `selected_positions` and count their supervised tokens."
            )

    def _use_single_pass(self, model: nn.Module, drawn_in_forward: bool) -> bool:
        """Whether this step runs in a single pass; logs the engine when the choice changes."""
        strategy = self.selector.strategy if drawn_in_forward else None
        reason = single_pass_blocker(model, strategy) if self.engine != TWO_PASS else "the config asks for it"
        if reason is None:
            reason = self._single_pass_failure
        if reason is None and self.engine == AUTO:
            reason = auto_prefers_two_pass(next(model.parameters()).device)
        if reason is not None and self.engine == SINGLE_PASS:
            raise ValueError(f"TokenTuneConfig(engine={SINGLE_PASS!r}) cannot run this step: {reason}.")
        self._announce(SINGLE_PASS if reason is None else TWO_PASS, reason)
        return reason is None

    def _announce(self, engine: str, reason: str | None) -> None:
        if (engine, reason) != (self.engine_used, self.engine_reason):
            why = "" if reason is None else f" ({reason})"
            logger.info("TokenTune runs the %s step%s.", engine, why)
        self.engine_used, self.engine_reason = engine, reason

    def _dense_top(self, seq_len: int) -> DenseTop | None:
        return DenseTop(self.layers, self.dense_top_layers, seq_len) if self.dense_top_layers else None

    def _single_pass(self, model, backbone_inputs: dict, selected_positions, grad_inputs: dict, selected_inputs):
        """The grad group's output of a single-pass step, or None if the model cannot run one."""
        seq_len = backbone_inputs["position_ids"].shape[1]
        dense = self._dense_top(seq_len)
        # With dense top layers the no-grad group already stops below them.
        calls = self._attention_calls if dense is None else None
        step = SinglePassStep(seq_len, selected_positions, dense=dense, attention_calls=calls)
        try:
            output = step.run(model, backbone_inputs, grad_inputs, selected_inputs)
            if dense is None:
                self._attention_calls = step.attended
            return output
        except SinglePassUnsupported as error:
            if self.engine == SINGLE_PASS:
                raise
            logger.warning("TokenTune falls back to the two-pass step for this model: %s", error)
            self._single_pass_failure = str(error)
            self._announce(TWO_PASS, str(error))
            return None

    def _pass_one(self, model, backbone_inputs: dict, labels, prepared, generator, dense: DenseTop | None):
        """Pass 1 of the two-pass step (no autograd, all tokens), and the positions pass 2 runs: those
        prepared, or drawn from the scores pass 1 measured ("importance", "gradient").

        Pass 1 gets the caller's ``attention_mask``, None included, so the model builds its own masks
        (per document in a packed batch)."""
        real_tokens = prepared.real_tokens
        input_ids = backbone_inputs.get("input_ids")
        seq_len = real_tokens.shape[1]
        observer = None
        if prepared.selected_positions is None:
            observer = self.selector.importance_meter(model, input_ids, real_tokens, labels)
        step = TokenTuneStep(seq_len, observer=observer, dense=dense)
        dense_inputs: dict = {}  # with dense top layers, pass 1 skips them, keeping the first one's input
        skip_top = skipping(step.dense.top, dense_inputs) if step.dense is not None else contextlib.nullcontext()
        with torch.no_grad(), skip_top:
            last_hidden = model.base_model(**backbone_inputs, use_cache=False, tokentune_step=step)[0]
        if step.dense is not None and step.dense.top:
            step.dense.base = hidden_of(*dense_inputs[step.dense.first_dense])
        if step.num_recorded == 0 and (step.dense is None or step.dense.lower):
            raise RuntimeError(
                "No attention call reached TokenTune's attention function: the model's attention does not go "
                "through transformers' attention registry, or its attention implementation was changed after "
                "wrapping."
            )
        if observer is None:
            return step, prepared.selected_positions
        scores = self.selector.pass_one_scores(model, observer, last_hidden, labels)
        selected = self.selector.sample(model, input_ids, real_tokens, labels, generator, scores)
        _check_head_selected(prepared.head_positions, selected)
        return step, selected

    @staticmethod
    def _full_position_ids(model: nn.Module, tokens: dict, position_ids: torch.Tensor | None):
        """Position ids of every token, as the model would compute them when none are given."""
        ((name, sequence),) = tokens.items()
        batch, seq_len = sequence.shape[:2]
        if position_ids is not None:
            if position_ids.shape[-1] != seq_len:
                raise ValueError(
                    f"`position_ids` must have {seq_len} positions per row; got shape {tuple(position_ids.shape)}."
                )
            return position_ids.expand(batch, seq_len)
        embeddings = getattr(model.base_model, "embeddings", None)
        from_tokens = getattr(type(embeddings), f"create_position_ids_from_{name}", None)
        if from_tokens is not None:  # RoBERTa family: positions skip padding and start after padding_idx
            return from_tokens(sequence, embeddings.padding_idx)
        return torch.arange(seq_len, device=sequence.device).expand(batch, seq_len)
