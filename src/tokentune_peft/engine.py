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
self-attention, so no token's forward runs twice. ``TokenTuneConfig.engine`` picks or forces either
(:mod:`tokentune_peft.engine_choice`).

What varies between models is resolved once, when the model is wrapped: how the batch is read (token ids,
embeddings, an image classifier's pixels, a vision-language merge: :mod:`tokentune_peft.step_inputs`) and
which call carries gradient (the selected tokens, or the whole batch with its layers hooked:
:mod:`tokentune_peft.grad_call`). A step reads top to bottom in :meth:`TokenTuneEngine.__call__`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from peft.utils import TaskType
from torch import nn
from transformers.utils import ModelOutput

from .alternation import Worker
from .attention import TokenTuneStep, no_attention_error
from .engine_choice import Engine, EngineChoice
from .grad_call import SelectedTokensCall, WholeBatchCall, selected_inputs, without_masks
from .layers import hidden_of, skipping
from .selection.labels import selected_targets
from .selection.sampling import PAD_POSITION, validate_selected_positions
from .selection.strategies import TokenSelector
from .single_pass import SinglePassStep, SinglePassUnsupported
from .slots import Slots
from .step_inputs import ImageFeed, StepBatch, TextFeed


def _check_head_selected(head: torch.Tensor | None, selected_positions: torch.Tensor) -> None:
    if head is not None and not (selected_positions == head[:, None]).any(dim=1).all():
        raise ValueError(
            f"`selected_positions` must include the token the classification head reads, at positions {head.tolist()}."
        )


def require_on_device(condition: torch.Tensor, message: str) -> None:
    """Raise ValueError(``message``) unless ``condition`` (a bool tensor) holds, without the host waiting for the
    device: on an accelerator it is a device-side assertion, which stops the run at its next synchronisation.

    Example:
        >>> require_on_device(torch.tensor(True), "never raised")
    """
    try:
        torch._assert_async(condition, message)
    except RuntimeError:  # on the CPU the assertion raises at once
        raise ValueError(message) from None


@dataclass
class PreparedBatch:
    """What a TokenTune step decides about a batch before its forward (:meth:`TokenTuneEngine.prepare`).

    Args:
        selected_positions: [batch, k] positions, -1 padded; None when the strategy draws them in the
            forward ("importance", "gradient").
        drawn: whether :meth:`TokenTuneEngine.prepare` drew the positions (the batch brought none).
        head_positions: [batch] where a sequence-classification head reads; None for other tasks.
        targets: the labels of the selected slots (:func:`~tokentune_peft.selection.labels.selected_targets`),
            None without labels or while the positions are unknown.
        real_tokens: [batch, seq] 1 for real tokens, 0 for padding.
        budget: when the positions are drawn in the forward, computes k per row (called only if counted).

    The counts (:attr:`num_selected`, :attr:`num_real`) are computed when read, so a training forward,
    which never reads them, pays nothing for them; they stay on the device until someone prints them.
    """

    selected_positions: torch.Tensor | None
    head_positions: torch.Tensor | None
    targets: torch.Tensor | None
    real_tokens: torch.Tensor
    drawn: bool = False
    budget: Callable[[], torch.Tensor] | None = field(default=None, repr=False)

    @property
    def num_selected(self) -> torch.Tensor:
        """Tokens selected in the batch (the budget, when they are drawn in the forward), a 0-d tensor."""
        if self.selected_positions is None:
            return self.budget().sum()
        return (self.selected_positions != PAD_POSITION).sum()

    @property
    def num_real(self) -> torch.Tensor:
        """Real (non-padding) tokens in the batch, a 0-d tensor."""
        return self.real_tokens.sum()


class TokenTuneEngine:
    """Runs TokenTune steps for one model.

    Args:
        selector: chooses the positions when a batch brings none.
        seed: seeds :attr:`generator`, which draws positions when the caller hands in none (a
            :class:`~tokentune_peft.trainer.TokenTuneTrainerMixin` hands in its own, seeded from
            ``seed`` + its process index and saved in checkpoints).
        engine: the configured :class:`~tokentune_peft.engine_choice.Engine` ("auto", "single-pass", "two-pass").
        feed: how the model's batches are read (:mod:`tokentune_peft.step_inputs`); token ids or embeddings
            by default.
        grad_call: the call that carries gradient (:mod:`tokentune_peft.grad_call`); the selected tokens' by
            default.

    After a step, :attr:`engine_used` says which step ran and :attr:`engine_reason` why not the single pass
    (None when it ran).

    Example:
        >>> from tokentune_peft.selection import TokenSelector
        >>> engine = TokenTuneEngine(TokenSelector("CAUSAL_LM", "none", True, None, 2))
        >>> engine.choice.asked, type(engine.grad_call).__name__
        (<Engine.AUTO: 'auto'>, 'SelectedTokensCall')
    """

    def __init__(
        self,
        selector: TokenSelector,
        seed: int = 0,
        engine: Engine | str = Engine.AUTO,
        feed: TextFeed | ImageFeed | None = None,
        grad_call: SelectedTokensCall | WholeBatchCall | None = None,
    ) -> None:
        self.selector = selector
        self.seed = seed
        self.choice = EngineChoice(engine)
        self.feed = TextFeed() if feed is None else feed
        self.grad_call = SelectedTokensCall(selector.task_type) if grad_call is None else grad_call
        self.generator = torch.Generator().manual_seed(seed)
        #: The single pass's no-grad group runs on this thread, started at its first step; it ends with the engine.
        self.worker = Worker()

    @property
    def task_type(self) -> str:
        return self.selector.task_type

    @property
    def engine_used(self) -> Engine | None:
        """The engine that ran the last step."""
        return self.choice.used

    @property
    def engine_reason(self) -> str | None:
        """Why the last step did not run the single pass (None when it did)."""
        return self.choice.reason

    def prepare(
        self,
        model: nn.Module,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        selected_positions: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        inputs_embeds: torch.Tensor | None = None,
        positions_drawn: bool = False,
    ) -> PreparedBatch:
        """Check a batch and choose its positions (unless the strategy draws them in the forward).

        The one place where a batch's positions, head tokens, selected targets and counts are decided:
        the training forward calls it, and so does the Trainer before the forward, to count the
        selected supervised tokens. The batch comes as ``input_ids`` or as ``inputs_embeds``.
        ``generator`` defaults to :attr:`generator`. ``positions_drawn`` says that ``selected_positions`` are
        what an earlier call drew for this batch (the Trainer's): they are not checked again.

        Nothing here makes the host wait for the device: the positions' width is known on the host, counts stay
        tensors, and the checks of the batch itself run on the device (:func:`require_on_device`). Positions the
        caller brings are checked on the host (:func:`~tokentune_peft.selection.sampling.validate_selected_positions`).

        Example:
            >>> from tokentune_peft.selection import TokenSelector
            >>> engine = TokenTuneEngine(TokenSelector("CAUSAL_LM", "none", True, None, 2))
            >>> prepared = engine.prepare(None, torch.ones(1, 4, dtype=torch.long), labels=torch.ones(1, 4).long())
            >>> prepared.selected_positions.shape, int(prepared.num_selected), int(prepared.num_real)
            (torch.Size([1, 2]), 2, 4)
        """
        sequence = input_ids if input_ids is not None else inputs_embeds
        if attention_mask is None:
            attention_mask = torch.ones(sequence.shape[:2], dtype=torch.long, device=sequence.device)
        real_tokens = attention_mask
        head = self.selector.head_positions(model, input_ids, real_tokens)
        if head is not None and input_ids is None and self.selector.is_decoder:
            require_on_device(
                real_tokens.all(),
                "A decoder's classification head given `inputs_embeds` reads the last position of every row, as "
                "transformers' heads do, so a padded batch (attention_mask with zeros) would be read at padding; "
                "pass `input_ids`, or batches without padding.",
            )
        if head is not None:
            require_on_device(
                real_tokens.gather(1, head[:, None]).all(),
                "The classification head reads a padding token (attention_mask == 0) in some row; pad encoder "
                "inputs on the right.",
            )
        if selected_positions is not None and not positions_drawn:
            selected_positions = selected_positions.to(sequence.device)
            validate_selected_positions(selected_positions, real_tokens)
            selected_positions = selected_positions[:, : sequence.shape[1]]  # the rest is padding (-1)
            _check_head_selected(head, selected_positions)
        elif selected_positions is None and not self.selector.selects_in_forward:
            generator = self.generator if generator is None else generator
            selected_positions = self.selector.sample(model, input_ids, real_tokens, labels, generator)
            self._check_drawn_head(head, selected_positions)
            positions_drawn = True
        return PreparedBatch(
            selected_positions=selected_positions,
            head_positions=head,
            targets=self._targets(labels, selected_positions),
            real_tokens=real_tokens,
            drawn=positions_drawn,
            budget=partial(self.selector.budget, model, input_ids, real_tokens) if selected_positions is None else None,
        )

    @torch.compiler.disable  # the step's own Python (passes, row groups, probes) runs eagerly in a compiled model
    def __call__(
        self,
        model: nn.Module,
        selected_positions: torch.Tensor | None = None,
        selection_generator: torch.Generator | None = None,
        loss_counted_over_selection: bool = False,
        positions_drawn: bool = False,
        **inputs: Any,
    ) -> ModelOutput:
        """One TokenTune step of ``model`` (a transformers model) on a batch given as the model's keywords.

        The batch is read by the model's feed (:mod:`tokentune_peft.step_inputs`): ``input_ids`` or
        ``inputs_embeds``, an image classifier's ``pixel_values``, or a vision-language model's ``input_ids``
        with ``pixel_values``. ``attention_mask`` may be None, as in packed batches whose ``position_ids``
        restart at 0 per document: pass 1 then builds the model's own per-document mask.

        ``selection_generator`` draws positions drawn in the forward (the Trainer hands in its own);
        ``loss_counted_over_selection`` says that the caller's loss count (``num_items_in_batch``) is over
        the selected tokens, which a Trainer that prepared the batch knows; ``positions_drawn`` that
        ``selected_positions`` are what :meth:`prepare` drew for this batch (the Trainer's). Other keywords
        (``num_items_in_batch``, ``output_router_logits``, TRL's ``fused_lm_head``...) reach the model's
        forward in the call that carries gradient, which computes its own loss.
        """
        batch = self.feed.read(model, inputs)
        self.grad_call.check(batch)
        if selected_positions is None and not self.grad_call.covers_every_position:
            self._check_loss_count(loss_counted_over_selection, batch.extra)
        generator = self.generator if selection_generator is None else selection_generator
        prepared = self.prepare(
            model,
            batch.input_ids,
            batch.attention_mask,
            batch.labels,
            selected_positions,
            generator,
            batch.inputs_embeds,
            positions_drawn,
        )
        drawn_in_forward = self.selector.strategy if prepared.selected_positions is None else None
        engine = self.choice.choose(model, drawn_in_forward, self.feed.single_pass_blocker or self._blocker(prepared))
        output = self._single_pass(model, batch, prepared) if engine == Engine.SINGLE_PASS else None
        return self._two_pass(model, batch, prepared, generator) if output is None else output

    def _blocker(self, prepared: PreparedBatch) -> str | None:
        """Why the single pass cannot run these positions: a classification head's stand-ins on real tokens.

        A classification head's stand-in slots take the pad id (:func:`~tokentune_peft.grad_call.selected_inputs`),
        so their keys are exact only on padding, where no query reads them; drawn positions put them there. Given
        positions were checked on the host already, and are checked for this too.
        """
        positions = prepared.selected_positions
        if prepared.drawn or positions is None or self.task_type != TaskType.SEQ_CLS:
            return None
        if self.grad_call.covers_every_position:
            return None
        stand_ins = (positions == PAD_POSITION).sum(dim=1)
        if bool((stand_ins <= (prepared.real_tokens == 0).sum(dim=1)).all()):
            return None
        return "a row of the given positions has fewer than their width and too little padding for the rest"

    def _check_drawn_head(self, head: torch.Tensor | None, selected_positions: torch.Tensor) -> None:
        """Drawn positions hold the head's token by construction when it is always selected; else it is checked."""
        if self.selector.always_select != "head":
            _check_head_selected(head, selected_positions)

    def _targets(self, labels: torch.Tensor | None, selected_positions: torch.Tensor | None) -> torch.Tensor | None:
        if labels is None or (selected_positions is None and self.task_type != TaskType.SEQ_CLS):
            return None
        return selected_targets(self.task_type, labels, selected_positions)

    def _check_loss_count(self, counted_over_selection: bool, extra: dict) -> None:
        """Refuse a caller whose loss count cannot be over the selected tokens.

        Positions drawn in this forward are unknown to the caller, so a ``num_items_in_batch`` it
        passes counts every supervised token, and TRL's trainers divide the fused head's losses by such
        a count outside the model: the loss would shrink by about the ratio, silently.
        """
        if counted_over_selection or self.task_type == TaskType.SEQ_CLS:  # a sequence loss does not count tokens
            return
        if extra.get("fused_lm_head"):
            raise ValueError(
                "TRL's trainers normalise the loss by a count of every supervised token, while TokenTune trains "
                "on the selected ones. Use tokentune_peft.sft_trainer.TokenTuneSFTTrainer instead of SFTTrainer "
                "(or mix tokentune_peft.trainer.TokenTuneTrainerMixin into your TRL trainer)."
            )
        if extra.get("num_items_in_batch") is not None:
            raise ValueError(
                "`num_items_in_batch` was given for a step whose positions are drawn in this forward, so it counts "
                "every supervised token, not the selected ones; the loss would shrink by about the selection ratio. "
                "Train with tokentune_peft.trainer.TokenTuneTrainer (or mix TokenTuneTrainerMixin into your "
                "Trainer subclass), or pass `selected_positions` and count their supervised tokens."
            )

    def _single_pass(self, model: nn.Module, batch: StepBatch, prepared: PreparedBatch) -> ModelOutput | None:
        """A single-pass step's output, or None if the single pass gave up on this model."""
        selected = prepared.selected_positions
        slots = Slots(selected, batch.seq_len, batch.attention_mask, stand_ins_on_padding=prepared.drawn)
        selected_call = selected_inputs(model, batch, slots, self.task_type)
        grad_inputs, supervised = self.grad_call.inputs(batch, selected_call, prepared.targets)
        rows = self.grad_call.new_rows(batch.seq_len)
        # With dense top layers the no-grad group already stops below them.
        calls = self.choice.attention_calls if rows is None else None
        step = SinglePassStep(batch.seq_len, slots, rows=rows, attention_calls=calls, worker=self.worker)
        try:
            start_grad_call = partial(self.grad_call.start, model, step, selected_call)
            output = step.run(model, batch, grad_inputs, start_grad_call)
        except SinglePassUnsupported as error:
            self.choice.single_pass_failed(error)
            return None
        if rows is None:
            self.choice.attention_calls = step.attended
        return self.grad_call.finish(output, supervised, selected)

    def _two_pass(self, model: nn.Module, batch: StepBatch, prepared: PreparedBatch, generator) -> ModelOutput:
        """Pass 1 (no autograd, all tokens), then the grad call on the positions prepared or drawn from pass 1."""
        step = TokenTuneStep(batch.seq_len, rows=self.grad_call.new_rows(batch.seq_len))
        selected = self._pass_one(model, batch, prepared, generator, step)
        # Positions drawn here, or before (prepared.drawn), put their stand-ins on padding.
        drawn = prepared.drawn or prepared.selected_positions is None
        step.select(Slots(selected, batch.seq_len, batch.attention_mask, stand_ins_on_padding=drawn))
        targets = prepared.targets if prepared.selected_positions is not None else self._targets(batch.labels, selected)
        selected_call = selected_inputs(model, batch, step.slots, self.task_type)
        grad_inputs, supervised = self.grad_call.inputs(batch, selected_call, targets)
        with without_masks():  # the selected probe's masks: the recorded ones serve
            self.grad_call.start(model, step, selected_call)
        with self.grad_call.masks():
            output = model(**grad_inputs, tokentune_step=step)
        return self.grad_call.finish(output, supervised, selected)

    def _pass_one(self, model, batch: StepBatch, prepared: PreparedBatch, generator, step: TokenTuneStep):
        """Run pass 1 into ``step``; returns the positions of pass 2: those prepared, or drawn from the scores pass 1
        measured ("importance", "gradient").

        Pass 1 gets the caller's ``attention_mask``, None included, so the model builds its own masks (per document
        in a packed batch). With dense top layers it skips them, keeping the first one's input.
        """
        if prepared.selected_positions is None:
            step.observer = self.selector.importance_meter(model, batch.input_ids, prepared.real_tokens, batch.labels)
        top = [] if step.rows is None else step.rows.top
        top_inputs: dict = {}
        with torch.no_grad(), skipping(top, top_inputs):
            last_hidden = model.base_model(**batch.backbone_inputs, tokentune_step=step)[0]
        if top:
            step.rows.base = hidden_of(*top_inputs[step.rows.first_dense])
        if step.num_recorded == 0 and (step.rows is None or step.rows.lower):
            raise no_attention_error()
        if step.observer is None:
            return prepared.selected_positions
        scores = self.selector.pass_one_scores(model, step.observer, last_hidden, batch.labels)
        selected = self.selector.sample(
            model, batch.input_ids, prepared.real_tokens, batch.labels, generator, scores=scores
        )
        self._check_drawn_head(prepared.head_positions, selected)
        return selected
