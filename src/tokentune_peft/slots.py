"""The rows a step runs, as position tensors whose widths the host knows: nothing is read back from the device.

The call that carries gradient runs ``width`` *slots* per row (the width of the selected positions, known on the
host: :meth:`~tokentune_peft.selection.strategies.TokenSelector.width`). A row that selects fewer tokens than the
width fills its padded slots with *stand-ins*: positions it did not select, padding tokens first. A stand-in is
computed exactly, as any token, but its output carries no loss and its keys, values and hidden states enter the
step without gradient, so the gradient is the selection's. What it buys is fixed widths: the slots' positions
have no -1 to skip with a data-dependent ``nonzero``, and the single pass's other row group is exactly
``seq_len - width`` wide (:func:`other_positions`).

Positions drawn by TokenTune put stand-ins on padding only: a row's k falls short of the width by at most its
padding tokens (``ceil(r * N) - ceil(r * n) <= N - n``). No real token's query may read a padding key, so there a
stand-in's keys and values need no detaching: their gradient is exactly zero (``stand_ins_on_padding``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .selection.sampling import PAD_POSITION


def with_stand_ins(
    selected_positions: torch.Tensor, seq_len: int, real_tokens: torch.Tensor | None = None
) -> torch.Tensor:
    """``selected_positions`` ([batch, width], -1 padded, width at most ``seq_len``) with each padded slot holding a
    distinct position its row did not select: padding tokens (``real_tokens == 0``) first, then real ones, in order.

    Example:
        >>> with_stand_ins(torch.tensor([[1, 3], [2, -1]]), 4, torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])).tolist()
        [[1, 3], [2, 0]]
    """
    batch, width = selected_positions.shape
    device = selected_positions.device
    index = torch.arange(seq_len, device=device)
    selected = torch.zeros(batch, seq_len + 1, dtype=torch.bool, device=device)
    selected = selected.scatter_(1, selected_positions.masked_fill(selected_positions < 0, seq_len), True)[:, :seq_len]
    real = torch.ones_like(selected) if real_tokens is None else real_tokens.bool()
    # Unselected padding first, then unselected real tokens, the selected last; each group in order.
    candidates = torch.where(selected, 2 * seq_len + index, torch.where(real, seq_len + index, index)).argsort(dim=1)
    count = (selected_positions != PAD_POSITION).sum(dim=1, keepdim=True)
    stand_ins = candidates.gather(1, (torch.arange(width, device=device) - count).clamp(min=0))
    return torch.where(selected_positions != PAD_POSITION, selected_positions, stand_ins)


def other_positions(slot_positions: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The ``seq_len - width`` positions of each row that ``slot_positions`` ([batch, width], distinct per row) leave
    out, in order.

    Example:
        >>> other_positions(torch.tensor([[0, 2], [1, 3]]), 4).tolist()
        [[1, 3], [0, 2]]
    """
    batch, width = slot_positions.shape
    index = torch.arange(seq_len, device=slot_positions.device)
    in_slots = torch.zeros(batch, seq_len, dtype=torch.bool, device=slot_positions.device).scatter_(
        1, slot_positions, True
    )
    return torch.where(in_slots, seq_len + index, index).sort(dim=1).values[:, : seq_len - width]


class Slots:
    """The slots of the call that carries gradient.

    Args:
        selected_positions: [batch, width], -1 padded.
        seq_len: the length N of the batch's sequences.
        real_tokens: [batch, seq] 1 for real tokens, 0 for padding; None when every token is real.
        stand_ins_on_padding: whether every stand-in is sure to sit on padding (positions TokenTune drew).

    Example:
        >>> slots = Slots(torch.tensor([[1, -1]]), 3, torch.tensor([[1, 1, 0]]))
        >>> slots.positions.tolist(), slots.selected.tolist()
        ([[1, 2]], [[True, False]])
    """

    def __init__(
        self,
        selected_positions: torch.Tensor,
        seq_len: int,
        real_tokens: torch.Tensor | None,
        stand_ins_on_padding: bool = False,
    ) -> None:
        self.stand_ins_on_padding = stand_ins_on_padding
        #: [batch, width]: every slot's position, stand-ins included.
        self.positions = with_stand_ins(selected_positions, seq_len, real_tokens)
        #: [batch, width] bool: the slots that hold a selected token.
        self.selected = selected_positions != PAD_POSITION
        #: [batch, 1]: the row of each slot, to index [batch, seq, ...] tensors by (row, position).
        self.rows = torch.arange(selected_positions.shape[0], device=selected_positions.device)[:, None]

    def write(self, full: torch.Tensor, own: torch.Tensor, stand_in: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Write the slots' rows into ``full`` ([batch, seq, ...]) at their positions, in place; returns it.

        ``own`` ([batch, width, ...]) on the selected slots; on the stand-ins, ``stand_in()`` (rows without gradient),
        unless they sit on padding (then ``own`` everywhere). Indexing by (row, position) makes autograd keep only the
        indices, not the tensors.
        """
        values = own
        if not self.stand_ins_on_padding:
            values = torch.where(self.selected.view(*self.selected.shape, *(1,) * (own.dim() - 2)), own, stand_in())
        return full.index_put_((self.rows, self.positions), values)
