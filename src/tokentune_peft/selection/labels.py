"""Which label each token position carries, for the tasks TokenTune trains."""

from __future__ import annotations

import torch
from peft.utils import TaskType
from torch import nn

from .sampling import PAD_POSITION

IGNORE_INDEX = -100


def labels_per_position(task_type: str, labels: torch.Tensor) -> torch.Tensor:
    """The label the loss reads at each position [batch, seq]; -100 where none.

    CAUSAL_LM: the next token's label, ``labels[p + 1]`` (the last position has none); TOKEN_CLS: the
    labels themselves. SEQ_CLS has no per-position labels.

    Example:
        >>> labels_per_position("CAUSAL_LM", torch.tensor([[5, 6, -100, 7]])).tolist()
        [[6, -100, 7, -100]]
    """
    if task_type == TaskType.CAUSAL_LM:
        return nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    if task_type == TaskType.TOKEN_CLS:
        return labels
    raise ValueError(f"`task_type` {task_type!r} has no per-position labels; CAUSAL_LM and TOKEN_CLS have.")


def selected_targets(task_type: str, labels: torch.Tensor, selected_positions: torch.Tensor) -> torch.Tensor:
    """The labels the loss uses at each selected slot; -100 where none (and on padded slots).

    CAUSAL_LM: the next token's label, ``labels[p + 1]``; TOKEN_CLS: ``labels[p]``; SEQ_CLS: the
    sequence labels, unchanged.

    Example:
        >>> labels = torch.tensor([[5, 6, 7, -100]])
        >>> selected_targets("CAUSAL_LM", labels, torch.tensor([[0, 2, -1]])).tolist()
        [[6, -100, -100]]
    """
    if task_type == TaskType.SEQ_CLS:
        return labels
    targets = labels_per_position(task_type, labels).gather(1, selected_positions.clamp(min=0))
    return targets.masked_fill(selected_positions == PAD_POSITION, IGNORE_INDEX)
