"""Which tokens a TokenTune step selects: the budget, the always-selected tokens and the strategy.

Strategies (``TokenTuneConfig(selection=...)``):

* ``"uniform"``: every real token equally likely (the paper's);
* ``"supervised"``: the budget goes first to positions that carry a label (CAUSAL_LM: whose next
  token is supervised; TOKEN_CLS: labelled tokens), keeping ``uniform_share`` of it uniform over the
  others, so the gradient still reaches context tokens. SEQ_CLS labels sit on the head token, which
  is always selected, so there it equals "uniform";
* ``"importance"``: drawn without replacement with probability proportional to an attention-based
  score from pass 1 (:mod:`tokentune_peft.selection.importance`), mixed with ``uniform_share`` of uniform
  probability so every token keeps a chance. It is chosen inside the training forward;
* ``"gradient"``: as "importance", with a score from the loss gradient each position carries: the norm
  of its cross-entropy gradient at the logits where it has a label, and the attention of the labelled
  positions weighted by theirs (:mod:`tokentune_peft.selection.gradient`). CAUSAL_LM and TOKEN_CLS; for
  SEQ_CLS, whose only label sits on the always-selected head token, it equals "importance";
* a callable ``selector(batch, k, generator) -> selected_positions`` (see :class:`TokenSelector`).

Example: a custom selector that favours later tokens, and a model that trains with it.

    >>> import tokentune_peft
    >>> from peft import get_peft_model
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> def later_tokens_more_often(batch, k, generator):
    ...     mask = batch["attention_mask"]
    ...     weights = torch.arange(1.0, mask.shape[1] + 1).expand(mask.shape)
    ...     return sample_positions(mask, batch["always_selected"], generator, num_selected=k, weights=weights)
    >>> base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                                     num_attention_heads=2, vocab_size=64, attn_implementation="sdpa"))
    >>> config = tokentune_peft.TokenTuneConfig(task_type="CAUSAL_LM", num_selected=4,
    ...                                         selection=later_tokens_more_often)
    >>> model = get_peft_model(base, config).train()
    >>> input_ids = torch.randint(0, 64, (2, 16))
    >>> output = model(input_ids=input_ids, labels=input_ids)
    >>> output.selected_positions.shape
    torch.Size([2, 4])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft.utils import TaskType
from torch import nn

from .gradient import gradient_scores, output_gradient_norms, output_head
from .importance import MAX_READERS, AttentionImportance
from .labels import IGNORE_INDEX, labels_per_position
from .sampling import (
    evenly_spaced,
    last_real_positions,
    positions_from_mask,
    sample_positions,
    sample_with_quota,
    selection_budget,
    selection_width,
    validate_selected_positions,
)

SELECTION_STRATEGIES = ("uniform", "supervised", "importance", "gradient")
#: The strategies that draw positions inside the training forward, from pass 1's scores.
DRAWN_IN_FORWARD = ("importance", "gradient")
#: The strategies that keep a ``uniform_share``.
WITH_UNIFORM_SHARE = ("supervised", *DRAWN_IN_FORWARD)
#: A user's strategy: ``selector(batch, k, generator) -> selected_positions``.
SelectorFunction = Callable[[dict, torch.Tensor, torch.Generator], torch.Tensor]
Selection = str | SelectorFunction


@dataclass
class TokenSelector:
    """Chooses the positions of a batch.

    Args:
        task_type: CAUSAL_LM, SEQ_CLS or TOKEN_CLS.
        always_select: resolved always-selected positions ("first", "last", "head", "none" or a list
            of indices).
        is_decoder: whether the model's self-attention is causal (decides which token a
            classification head reads).
        selection_ratio / num_selected: the budget, exactly one set.
        strategy: "uniform", "supervised", "importance", "gradient" or a callable. The callable receives
            ``batch`` (a dict with ``input_ids`` (None for a batch given as ``inputs_embeds``),
            ``attention_mask``, ``always_selected`` (bool [batch, seq]) and ``labels`` when the batch
            has them), ``k`` (LongTensor [batch], the number of positions each row must get,
            always-selected ones included) and the
            generator; it returns positions as :func:`~tokentune_peft.selection.sample_positions`
            does: a LongTensor [batch, max k], ascending per row, padded at the end with -1.
        uniform_share: "supervised": share of the budget drawn among unlabelled tokens;
            "importance" and "gradient": share of the sampling probability spread evenly over the tokens.

    Example:
        >>> selector = TokenSelector("CAUSAL_LM", "none", True, None, 2, strategy="supervised", uniform_share=0.0)
        >>> labels = torch.tensor([[-100, -100, -100, 7, 8]])
        >>> selector.sample(None, torch.ones(1, 5, dtype=torch.long), None, labels, torch.Generator()).tolist()
        [[2, 3]]
    """

    task_type: str
    always_select: str | list[int]
    is_decoder: bool
    selection_ratio: float | None
    num_selected: int | None
    strategy: Selection = "uniform"
    uniform_share: float = 0.0

    @property
    def selects_in_forward(self) -> bool:
        """Whether positions can only be drawn inside the training forward (they need pass 1)."""
        return self.strategy in DRAWN_IN_FORWARD

    def sample(
        self,
        model: nn.Module | None,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        generator: torch.Generator,
        scores: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Positions for a batch: [batch, k], ascending per row, -1 padded.

        ``input_ids`` may be None (a batch given as ``inputs_embeds``) when ``attention_mask`` is given.
        ``scores`` ([batch, seq], from :meth:`pass_one_scores`: attention importance or gradient norms) are
        required by the strategies drawn in the forward ("importance", "gradient").
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        always = self.always_selected(model, input_ids, attention_mask)
        width = self.width(attention_mask.shape[1])
        budget = {"selection_ratio": self.selection_ratio, "num_selected": self.num_selected, "width": width}
        if callable(self.strategy):
            return self._custom(input_ids, attention_mask, labels, always, generator, width)
        if self.strategy == "supervised" and self.task_type != TaskType.SEQ_CLS:
            supervised = self._supervised(labels, attention_mask)
            return sample_with_quota(attention_mask, always, supervised, generator, self.uniform_share, **budget)
        if self.selects_in_forward:
            if scores is None:
                raise ValueError(
                    f"selection={self.strategy!r} draws positions inside the training forward, from the no-grad "
                    "pass; call the model in training mode instead of sampling ahead."
                )
            return sample_positions(
                attention_mask, always, generator, weights=self._mixed(scores, attention_mask), **budget
            )
        return sample_positions(attention_mask, always, generator, **budget)

    def width(self, seq_len: int) -> int:
        """The width of every selection of a batch of ``seq_len`` tokens: the most positions a row can get, known on
        the host (:func:`~tokentune_peft.selection.sampling.selection_width`, or more always-selected tokens).

        Example:
            >>> TokenSelector("CAUSAL_LM", [0, 1, 2, 3], True, None, 2).width(seq_len=16)
            4
        """
        width = selection_width(seq_len, self.selection_ratio, self.num_selected)
        if isinstance(self.always_select, list):
            return max(width, sum(index < seq_len for index in self.always_select))
        return width

    def budget(
        self, model: nn.Module | None, input_ids: torch.Tensor | None, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """k per row (LongTensor [batch]): the number of positions every strategy selects in this batch."""
        always = self.always_selected(model, input_ids, attention_mask)
        return selection_budget(attention_mask, always, self.selection_ratio, self.num_selected)

    def importance_meter(
        self,
        model: nn.Module,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None,
    ) -> AttentionImportance:
        """The pass-1 observer of "importance" and "gradient"; its readers are where the loss is read.

        SEQ_CLS: the head's token. CAUSAL_LM / TOKEN_CLS: up to ``MAX_READERS`` labelled positions,
        evenly spread; a row without any (or a batch without labels) reads at its last real token.
        """
        if self.task_type == TaskType.SEQ_CLS:
            return AttentionImportance(self.head_positions(model, input_ids, attention_mask)[:, None])
        readers = torch.zeros(attention_mask.shape, dtype=torch.bool, device=attention_mask.device)
        if labels is not None:
            readers = self._supervised(labels, attention_mask) & attention_mask.bool()
        unread = ~readers.any(dim=1, keepdim=True)
        index = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        readers |= unread & (index == last_real_positions(attention_mask)[:, None])
        return AttentionImportance(evenly_spaced(readers, MAX_READERS))

    def pass_one_scores(
        self, model: nn.Module, meter: AttentionImportance, hidden: torch.Tensor, labels: torch.Tensor | None
    ) -> torch.Tensor:
        """[batch, seq]: what a strategy drawn in the forward samples by, once pass 1 has run.

        "importance": the meter's scores. "gradient": :func:`~tokentune_peft.selection.gradient.gradient_scores`
        from the gradient norms of the labelled positions, computed from ``hidden`` (pass 1's last hidden
        states) by the model's output head.
        """
        if self.strategy == "importance" or self.task_type == TaskType.SEQ_CLS:
            return meter.scores
        if labels is None:
            raise ValueError(f"selection={self.strategy!r} needs the batch's `labels`.")
        targets = labels_per_position(self.task_type, labels.to(hidden.device))
        norms = output_gradient_norms(output_head(model, self.task_type), hidden, targets)
        return gradient_scores(norms, meter)

    def always_selected(
        self, model: nn.Module | None, input_ids: torch.Tensor | None, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """[batch, seq] bool: the positions every selection of this batch includes."""
        always = torch.zeros(attention_mask.shape, dtype=torch.bool, device=attention_mask.device)
        rows = torch.arange(attention_mask.shape[0], device=attention_mask.device)
        seq_len = attention_mask.shape[1]
        choice = self.always_select
        if choice == "head":
            always[rows, self.head_positions(model, input_ids, attention_mask)] = True
        elif choice == "first":
            always[rows, (attention_mask.cumsum(1) == 0).sum(1).clamp(max=seq_len - 1)] = True
        elif choice == "last":
            always[rows, last_real_positions(attention_mask)] = True
        elif isinstance(choice, list):
            for index in choice:  # host integers: no index tensor to copy to the device
                if index < seq_len:
                    always[:, index] = True
        return always & attention_mask.bool()

    def head_positions(
        self, model: nn.Module | None, input_ids: torch.Tensor | None, attention_mask: torch.Tensor
    ) -> torch.Tensor | None:
        """Where the sequence-classification head reads, as transformers' heads compute it (None otherwise).

        A decoder's head reads the last token that is not ``config.pad_token_id``; given ``inputs_embeds``
        (``input_ids`` None), transformers' heads read the last position.
        """
        if self.task_type != TaskType.SEQ_CLS:
            return None
        batch, seq_len = attention_mask.shape
        if not self.is_decoder:  # poolers read the first token ([CLS])
            return torch.zeros(batch, dtype=torch.long, device=attention_mask.device)
        pad_id = getattr(model.config, "pad_token_id", None)
        if pad_id is None and batch > 1:
            raise ValueError("Decoder sequence classification of batches needs `config.pad_token_id`.")
        if pad_id is None or input_ids is None:
            return torch.full((batch,), seq_len - 1, device=attention_mask.device)
        return last_real_positions((input_ids != pad_id).long())

    def _supervised(self, labels: torch.Tensor | None, attention_mask: torch.Tensor) -> torch.Tensor:
        if labels is None:
            raise ValueError(f"selection={self.strategy!r} needs the batch's `labels`.")
        return labels_per_position(self.task_type, labels.to(attention_mask.device)) != IGNORE_INDEX

    def _mixed(self, importance: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sampling weights: (1 - share) x normalised importance + share x uniform, over real tokens."""
        real = attention_mask.bool()
        importance = importance.masked_fill(~real, 0.0)
        total = importance.sum(dim=1, keepdim=True).clamp(min=torch.finfo(importance.dtype).tiny)
        uniform = real / real.sum(dim=1, keepdim=True).clamp(min=1)
        return (1 - self.uniform_share) * importance / total + self.uniform_share * uniform

    def _custom(self, input_ids, attention_mask, labels, always, generator, width: int) -> torch.Tensor:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "always_selected": always}
        if labels is not None:
            batch["labels"] = labels
        k = selection_budget(attention_mask, always, self.selection_ratio, self.num_selected)
        name = getattr(self.strategy, "__name__", repr(self.strategy))
        positions = self.strategy(batch, k, generator)
        if not isinstance(positions, torch.Tensor):
            raise ValueError(f"The selector {name} must return a LongTensor; got {type(positions).__name__}.")
        positions = positions.to(attention_mask.device)
        validate_selected_positions(positions, attention_mask)
        counts = (positions >= 0).sum(dim=1)
        if not torch.equal(counts, k):
            raise ValueError(f"The selector {name} returned {counts.tolist()} positions per row; k is {k.tolist()}.")
        picked = torch.zeros(always.shape[0], always.shape[1] + 1, dtype=torch.bool, device=always.device)
        picked = picked.scatter_(1, positions + 1, True)[:, 1:]  # column 0 catches the -1 padding
        if (always & ~picked).any():
            raise ValueError(f"The selector {name} left out positions of `batch['always_selected']`.")
        return positions_from_mask(picked, width)  # the selection's width, whatever the selector's


def build_selector(config, is_decoder: bool) -> TokenSelector:
    """The selector a :class:`~tokentune_peft.TokenTuneConfig` asks for, for a decoder or an encoder.

    "auto" always-selection becomes the head token for sequence classification, none otherwise.

    Example:
        >>> from tokentune_peft import TokenTuneConfig
        >>> build_selector(TokenTuneConfig(task_type="SEQ_CLS"), is_decoder=False).always_select
        'head'
    """
    always = config.always_select
    if always == "auto":
        always = "head" if config.task_type == TaskType.SEQ_CLS else "none"
    return TokenSelector(
        task_type=config.task_type,
        always_select=always,
        is_decoder=is_decoder,
        selection_ratio=None if config.num_selected is not None else config.selection_ratio,
        num_selected=config.num_selected,
        strategy=config.selection,
        uniform_share=config.uniform_share or 0.0,
    )
