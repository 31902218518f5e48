"""A per-token importance signal measured during TokenTune's no-grad pass, at no extra forward.

For ``selection="importance"``: in every self-attention of pass 1, the *reader* positions (the ones
the loss is read at) attend to all tokens; each token scores the attention it receives times the
norm of its value vector, summed over heads and readers (the attention-norm measure of Kobayashi
et al., EMNLP 2020, without the output projection, which discounts "sink" tokens that draw attention
but contribute little). Each layer's scores are normalised to sum to 1 per row and added up. Each
reader's part is kept apart, so that ``selection="gradient"`` can weight it by the reader's loss gradient.

The extra work per layer is one [readers x tokens] attention-score product on keys pass 1 has
already computed; at most :data:`MAX_READERS` readers per row keep it small.
"""

from __future__ import annotations

import torch

from ..attention import allowed_keys
from .sampling import PAD_POSITION

#: Most reader positions per row whose attention is measured.
MAX_READERS = 32


class AttentionImportance:
    """Collects, over pass 1's attention calls, how much each token contributes to the readers.

    Args:
        readers: [batch, r] positions whose attention is measured, ascending, -1 padded.

    Example:
        >>> meter = AttentionImportance(torch.tensor([[2]]))
        >>> query = torch.zeros(1, 1, 3, 4); key = torch.zeros(1, 1, 3, 4)
        >>> value = torch.tensor([[[[0.0] * 4, [1.0] * 4, [3.0] * 4]]])  # value norms 0, 2, 6
        >>> meter.observe(query, key, value, None, True, None)
        >>> meter.scores.tolist()  # equal attention, so the scores follow the value norms
        [[0.0, 0.25, 0.75]]
    """

    def __init__(self, readers: torch.Tensor) -> None:
        self.readers = readers
        #: [batch, r, seq]: each reader's share of the scores, summed over the layers seen so far.
        self.reader_scores: torch.Tensor | None = None

    @property
    def scores(self) -> torch.Tensor | None:
        """[batch, seq]: every reader's contributions, normalised per layer, summed over the layers."""
        return None if self.reader_scores is None else self.reader_scores.sum(dim=1)

    def weighted_scores(self, reader_weights: torch.Tensor) -> torch.Tensor:
        """[batch, seq]: as :attr:`scores`, with reader i's contributions multiplied by ``reader_weights[:, i]``."""
        return (self.reader_scores * reader_weights[:, :, None]).sum(dim=1)

    def observe(self, query, key, value, mask, is_causal: bool, scaling) -> None:
        """Add one attention call's scores: query [B, H, N, D], key/value [B, H_kv, N, D]."""
        batch, heads, seq_len, head_dim = query.shape
        valid = self.readers != PAD_POSITION
        positions = self.readers.clamp(min=0)
        rows = torch.arange(batch, device=query.device)[:, None]
        reader_queries = query[rows, :, positions].transpose(1, 2).float()  # [B, H, r, D]
        groups = heads // key.shape[1]
        keys = key.float().repeat_interleave(groups, dim=1)
        scale = head_dim**-0.5 if scaling is None else scaling
        logits = reader_queries @ keys.transpose(-1, -2) * scale  # [B, H, r, N]
        allowed = allowed_keys(mask, is_causal, self.readers, 0, seq_len)
        if allowed is not None:
            logits = logits.masked_fill(~allowed, -torch.inf)
        value_norms = value.float().norm(dim=-1).repeat_interleave(groups, dim=1)  # [B, H, N]
        contributions = logits.softmax(dim=-1) * value_norms[:, :, None, :]
        layer = (contributions * valid[:, None, :, None]).sum(dim=1)  # [B, r, N]
        layer = layer / layer.sum(dim=(1, 2), keepdim=True).clamp(min=torch.finfo(layer.dtype).tiny)
        self.reader_scores = layer if self.reader_scores is None else self.reader_scores + layer
