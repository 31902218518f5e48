"""Choosing and checking the token positions that carry gradient in a TokenTune step.

Positions are a LongTensor ``[batch, k]``: sequence indices, ascending per row, each row padded at
its end with -1 when it selects fewer than ``k`` tokens.

A step's positions are drawn without reading anything back from the device: ``k`` is known on the host from the
sequence length and the budget (:func:`selection_width`), and every row's own count stays on the device.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

PAD_POSITION = -1


def selection_sizes(
    attention_mask: torch.Tensor,
    selection_ratio: float | None = None,
    num_selected: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Number of tokens to select in each row: ``ceil(ratio * n)`` or ``min(k, n)`` for n real tokens.

    ``num_selected`` is one k for every row, or a LongTensor [batch] of one k per row.

    Example:
        >>> selection_sizes(torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]), selection_ratio=0.3).tolist()
        [2, 1]
    """
    _check_budget(selection_ratio, num_selected)
    lengths = attention_mask.sum(dim=1)
    if num_selected is not None:
        return lengths.clamp(max=num_selected)
    # ceil(ratio * n) on integers, the ratio as a fraction p / q, so that 0.3 * 10 gives 3, not 4.
    ratio = Fraction(selection_ratio).limit_denominator(_RATIO_DENOMINATOR)
    sizes = (lengths * ratio.numerator + ratio.denominator - 1).div(ratio.denominator, rounding_mode="floor")
    return sizes.clamp(max=lengths)


def selection_width(seq_len: int, selection_ratio: float | None = None, num_selected: int | None = None) -> int:
    """The most tokens any row of ``seq_len`` tokens selects under the budget (at least 1): the width of its positions.

    Known on the host, so a step never reads its rows' counts back from the device to size its tensors.

    Example:
        >>> selection_width(10, selection_ratio=0.3), selection_width(10, num_selected=16)
        (3, 10)
    """
    _check_budget(selection_ratio, num_selected)
    if num_selected is not None:
        return max(1, min(seq_len, num_selected))
    ratio = Fraction(selection_ratio).limit_denominator(_RATIO_DENOMINATOR)
    return max(1, min(seq_len, math.ceil(seq_len * ratio)))


#: Ratios are read as fractions with at most this denominator (0.3 is 3/10): exact integer sizes on any device.
_RATIO_DENOMINATOR = 10**6


def _check_budget(selection_ratio: float | None, num_selected: int | torch.Tensor | None) -> None:
    if (selection_ratio is None) == (num_selected is None):
        raise ValueError("Give exactly one of `selection_ratio` and `num_selected`.")


def sample_positions(
    attention_mask: torch.Tensor,
    always_selected: torch.Tensor,
    generator: torch.Generator,
    selection_ratio: float | None = None,
    num_selected: int | torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    width: int | None = None,
) -> torch.Tensor:
    """Sample positions among a row's real tokens, always including ``always_selected``.

    Without ``weights`` every real token is equally likely; with them, positions are drawn without
    replacement with probability proportional to their weight (Gumbel top-k), so every token with a
    positive weight keeps a chance.

    Args:
        attention_mask: [batch, seq] 1 for real tokens, 0 for padding.
        always_selected: [batch, seq] bool, positions every selection must include.
        generator: the random generator (on CPU) that makes runs reproducible.
        selection_ratio / num_selected: the budget, exactly one of them (``num_selected`` may be a
            LongTensor [batch], one k per row).
        weights: [batch, seq] non-negative sampling weights, or None for uniform.
        width: the positions' width, at least every row's k (:meth:`TokenSelector.width
            <tokentune_peft.selection.strategies.TokenSelector.width>` knows it on the host); None reads the
            widest row's k back from the device.

    Example:
        >>> mask = torch.ones(2, 6, dtype=torch.long)
        >>> always = torch.zeros(2, 6, dtype=torch.bool); always[:, 0] = True
        >>> sample_positions(mask, always, torch.Generator().manual_seed(0), num_selected=3)[:, 0].tolist()
        [0, 0]
    """
    real = attention_mask.bool()
    always = always_selected & real
    budget = selection_budget(attention_mask, always, selection_ratio, num_selected)
    scores = _uniform_scores(attention_mask, generator)
    if weights is not None:  # Gumbel top-k: the top scores are a draw without replacement, P ~ weights
        scores = weights.clamp(min=torch.finfo(torch.float32).tiny).log() - (-scores.log()).log()
    chosen = always | _top_counts(scores, real & ~always, budget - always.sum(dim=1))
    return positions_from_mask(chosen, _width(width, budget))


def sample_with_quota(
    attention_mask: torch.Tensor,
    always_selected: torch.Tensor,
    preferred: torch.Tensor,
    generator: torch.Generator,
    other_share: float,
    selection_ratio: float | None = None,
    num_selected: int | None = None,
    width: int | None = None,
) -> torch.Tensor:
    """Spend the budget on ``preferred`` positions first, keeping a share for the others.

    After the always-selected positions, ``floor(other_share x budget)`` positions are drawn
    uniformly among the non-preferred real tokens and the rest uniformly among the preferred ones;
    when one group runs out, the other takes up the remaining budget, so each row still gets exactly
    its k positions. ``width`` is as in :func:`sample_positions`.

    Example:
        >>> mask = torch.ones(1, 8, dtype=torch.long)
        >>> preferred = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]], dtype=torch.bool)
        >>> none = torch.zeros(1, 8, dtype=torch.bool)
        >>> sample_with_quota(mask, none, preferred, torch.Generator().manual_seed(0), 0.0, num_selected=4).tolist()
        [[4, 5, 6, 7]]
    """
    real = attention_mask.bool()
    always = always_selected & real
    row_budget = selection_budget(attention_mask, always, selection_ratio, num_selected)
    budget = row_budget - always.sum(dim=1)
    wanted, others = real & ~always & preferred, real & ~always & ~preferred
    other_quota = torch.minimum((budget * other_share + 1e-6).floor().long(), others.sum(dim=1))
    wanted_quota = torch.minimum(budget - other_quota, wanted.sum(dim=1))
    other_quota = budget - wanted_quota
    scores = _uniform_scores(attention_mask, generator)
    chosen = always | _top_counts(scores, wanted, wanted_quota) | _top_counts(scores, others, other_quota)
    return positions_from_mask(chosen, _width(width, row_budget))


def selection_budget(
    attention_mask: torch.Tensor,
    always_selected: torch.Tensor,
    selection_ratio: float | None = None,
    num_selected: int | None = None,
) -> torch.Tensor:
    """k per row: :func:`selection_sizes`, raised where a row has more always-selected tokens.

    Example:
        >>> always = torch.tensor([[True, True, False, False]])
        >>> selection_budget(torch.ones(1, 4, dtype=torch.long), always, num_selected=1).tolist()
        [2]
    """
    sizes = selection_sizes(attention_mask, selection_ratio, num_selected)
    return torch.maximum(sizes, (always_selected & attention_mask.bool()).sum(dim=1))


def positions_from_mask(chosen: torch.Tensor, width: int) -> torch.Tensor:
    """[batch, seq] bool to ascending positions [batch, width], rows padded at the end with -1.

    ``width`` must be at least every row's count of True (a row with more would lose its last positions).

    Example:
        >>> positions_from_mask(torch.tensor([[False, True, True], [True, False, False]]), width=2).tolist()
        [[1, 2], [0, -1]]
    """
    index = torch.arange(chosen.shape[1], device=chosen.device).expand_as(chosen)
    big = torch.iinfo(torch.long).max
    ordered = index.masked_fill(~chosen, big).sort(dim=1).values[:, :width]
    if ordered.shape[1] < width:  # fewer positions than the width: padded slots only
        ordered = torch.nn.functional.pad(ordered, (0, width - ordered.shape[1]), value=big)
    return ordered.masked_fill(ordered == big, PAD_POSITION)


def _width(width: int | None, budget: torch.Tensor) -> int:
    """``width``, or when None the widest row's budget, read back from the device (at least 1)."""
    return max(int(budget.max()), 1) if width is None and budget.numel() else width or 1


def evenly_spaced(chosen: torch.Tensor, count: int) -> torch.Tensor:
    """Up to ``count`` of each row's True positions, evenly spread over them, as [batch, min(count, seq)] (-1 padded).

    Example:
        >>> evenly_spaced(torch.tensor([[True] * 10, [True] + [False] * 9]), 3).tolist()
        [[0, 4, 7], [0, -1, -1]]
    """
    rank = chosen.long().cumsum(dim=1) - 1
    total = chosen.sum(dim=1, keepdim=True).clamp(min=1)
    first_of_its_share = (rank * count).div(total, rounding_mode="floor") != ((rank - 1) * count).div(
        total, rounding_mode="floor"
    )
    return positions_from_mask(chosen & first_of_its_share, min(count, chosen.shape[1]))


def _uniform_scores(attention_mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniform random scores in (0, 1), one per position, drawn on CPU from ``generator``.

    They reach an accelerator from pinned memory without blocking: the host does not wait for the device.
    """
    scores = torch.rand(attention_mask.shape, generator=generator).clamp(min=torch.finfo(torch.float32).tiny)
    if attention_mask.device.type == "cpu":
        return scores
    return scores.pin_memory().to(attention_mask.device, non_blocking=True)


def _top_counts(scores: torch.Tensor, eligible: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per row, the ``counts[row]`` eligible positions with the highest scores, as a bool mask."""
    order = scores.masked_fill(~eligible, -torch.inf).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    return eligible & (rank < counts[:, None])


def validate_selected_positions(selected_positions: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """Raise ValueError unless ``selected_positions`` is a valid selection for this batch.

    Valid: a LongTensor [batch, k], each row ascending with no repeats, indices of real tokens,
    padded at the end with -1, and at least one token per row that has real tokens.

    Example:
        >>> validate_selected_positions(torch.tensor([[0, 2, -1]]), torch.ones(1, 4, dtype=torch.long))
    """
    name = "selected_positions"
    batch, seq = attention_mask.shape
    if selected_positions.dtype != torch.long or selected_positions.dim() != 2:
        raise ValueError(
            f"`{name}` must be a LongTensor of shape [batch, k]; got dtype {selected_positions.dtype} and shape "
            f"{tuple(selected_positions.shape)}."
        )
    if selected_positions.shape[0] != batch:
        raise ValueError(f"`{name}` has {selected_positions.shape[0]} rows but the batch has {batch}.")
    valid = selected_positions != PAD_POSITION
    if ((selected_positions < PAD_POSITION) | (selected_positions >= seq)).any():
        raise ValueError(f"`{name}` holds indices outside [0, {seq}) (and -1 for padding): {selected_positions}.")
    if (valid[:, 1:] & ~valid[:, :-1]).any():
        raise ValueError(f"`{name}`: the -1 padding must come after a row's selected positions.")
    steps = selected_positions[:, 1:] - selected_positions[:, :-1]
    if ((steps <= 0) & valid[:, 1:]).any():
        raise ValueError(f"`{name}` rows must be strictly ascending (sorted, no repeats): {selected_positions}.")
    picked = attention_mask.gather(1, selected_positions.clamp(min=0))
    if ((picked == 0) & valid).any():
        raise ValueError(f"`{name}` selects padding positions (attention_mask == 0).")
    rows_with_tokens = attention_mask.sum(dim=1) > 0
    if (rows_with_tokens & ~valid.any(dim=1)).any():
        raise ValueError(f"`{name}` selects no token in a row that has real tokens.")


def last_real_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real (non-padding) token; works for left and right padding.

    Example:
        >>> last_real_positions(torch.tensor([[1, 1, 0], [0, 1, 1]])).tolist()
        [1, 2]
    """
    index = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (index * attention_mask.bool()).argmax(dim=1)


def gather_positions(inputs: dict, positions: torch.Tensor) -> dict:
    """Each tensor of ``inputs`` ([batch or 1, seq] or [batch or 1, seq, hidden]) at ``positions``.

    ``positions`` is [batch, k], -1 padded; padded slots take position 0's row. None values are left out.

    Example:
        >>> inputs = {"input_ids": torch.tensor([[5, 6, 7]]), "position_ids": torch.tensor([[0, 1, 2]])}
        >>> gather_positions(inputs, torch.tensor([[0, 2], [1, -1]]))["input_ids"].tolist()
        [[5, 7], [6, 5]]
    """
    slots = positions.clamp(min=0)
    rows = torch.arange(slots.shape[0], device=slots.device)[:, None]
    return {
        name: value.expand(slots.shape[0], *value.shape[1:])[rows, slots]
        for name, value in inputs.items()
        if value is not None
    }
