"""Choosing and checking the token positions that carry gradient in a TokenTune step.

Positions are a LongTensor ``[batch, k]``: sequence indices, ascending per row, each row padded at
its end with -1 when it selects fewer than ``k`` tokens.
"""

from __future__ import annotations

import math

import torch

PAD_POSITION = -1


def selection_sizes(
    attention_mask: torch.Tensor, selection_ratio: float | None = None, num_selected: int | None = None
) -> torch.Tensor:
    """Number of tokens to select in each row: ``ceil(ratio * n)`` or ``min(k, n)`` for n real tokens.

    Example:
        >>> selection_sizes(torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]), selection_ratio=0.3).tolist()
        [2, 1]
    """
    if (selection_ratio is None) == (num_selected is None):
        raise ValueError("Give exactly one of `selection_ratio` and `num_selected`.")
    lengths = attention_mask.sum(dim=1)
    if num_selected is not None:
        return lengths.clamp(max=num_selected)
    # ceil(ratio * n), computed on integers where possible so 0.3 * 10 gives 3, not 4.
    sizes = [min(n, math.ceil(round(selection_ratio * n, 9))) for n in lengths.tolist()]
    return torch.tensor(sizes, dtype=torch.long, device=attention_mask.device)


def sample_positions(
    attention_mask: torch.Tensor,
    always_selected: torch.Tensor,
    generator: torch.Generator,
    selection_ratio: float | None = None,
    num_selected: int | None = None,
) -> torch.Tensor:
    """Sample positions uniformly among a row's real tokens, always including ``always_selected``.

    Args:
        attention_mask: [batch, seq] 1 for real tokens, 0 for padding.
        always_selected: [batch, seq] bool, positions every selection must include.
        generator: the random generator (on CPU) that makes runs reproducible.
        selection_ratio / num_selected: the budget, exactly one of them.

    Example:
        >>> mask = torch.ones(2, 6, dtype=torch.long)
        >>> always = torch.zeros(2, 6, dtype=torch.bool); always[:, 0] = True
        >>> sample_positions(mask, always, torch.Generator().manual_seed(0), num_selected=3)[:, 0].tolist()
        [0, 0]
    """
    sizes = selection_sizes(attention_mask, selection_ratio, num_selected)
    real = attention_mask.bool()
    sizes = torch.maximum(sizes, (always_selected & real).sum(dim=1))
    scores = torch.rand(attention_mask.shape, generator=generator).to(attention_mask.device)
    scores = scores.masked_fill(always_selected, 2.0).masked_fill(~real, -1.0)
    k = max(int(sizes.max()), 1)
    chosen = scores.topk(k, dim=1).indices
    keep = torch.arange(k, device=chosen.device)[None, :] < sizes[:, None]
    return _sorted_with_padding(chosen, keep)


def _sorted_with_padding(positions: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    big = torch.iinfo(positions.dtype).max
    ordered = positions.masked_fill(~keep, big).sort(dim=1).values
    return ordered.masked_fill(ordered == big, PAD_POSITION)


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
