"""Attention of queries at chosen sequence positions over all keys, one block of scores at a time.

A TokenTune step lets the selected queries (any ascending subset of positions) attend to all N keys.
:func:`blockwise_attention` does that the flash-attention way, in plain PyTorch ops so that it runs
(forward and backward) on every device: it walks query blocks and key blocks with an online softmax,
never builds a [queries x keys] tensor larger than one block, and keeps for backward only the
inputs, the output and one log-sum-exp per query row; the backward recomputes each block's
scores. Which keys a query may attend to comes from a ``mask_block`` callable, evaluated block by
block; :func:`mask_block_from_function` builds one from a transformers mask function
(``transformers.masking_utils``). On the CPU, key blocks that no query of a block may attend to are skipped;
on an accelerator every block is computed under its mask, so that the host never waits to read one
(:func:`reads_block_masks`).

Attention dropout is not supported.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# Block sizes: the fastest forward+backward of causal attention on a 2-core CPU (N = 512 to 8192 keys,
# Q = 0.3 N queries, head dim 16 and 64) among 64-512 queries x 256-1024 keys. One block of scores holds
# batch x query heads x QUERY_BLOCK x KEY_BLOCK floats.
#: Queries per block.
QUERY_BLOCK = 256
#: Keys per block.
KEY_BLOCK = 512

#: ``mask_block(query_positions [B, q], key_start, key_end)`` -> bool, broadcastable to
#: [B, 1 or query heads, q, key_end - key_start]; True = may attend.
MaskBlock = Callable[[torch.Tensor, int, int], torch.Tensor]

# Scores are kept in base 2 (scaled by log2(e)): on the CPU, exp2 is several times faster than exp, and exp
# falls to a slow path for inputs below about -87.
_LOG2E = math.log2(math.e)


def mask_block_from_function(mask_function: Callable) -> MaskBlock:
    """A ``mask_block`` that evaluates a transformers mask function on one block of (query, key) positions.

    ``mask_function(batch_idx, head_idx, q_idx, kv_idx)`` is called with broadcastable index tensors,
    as ``transformers.masking_utils.sdpa_mask`` calls it (``causal_mask_function``, ``and_masks(...)``...).

    Example:
        >>> causal = mask_block_from_function(lambda batch, head, q, kv: kv <= q)
        >>> causal(torch.tensor([[1, 3]]), 0, 4).int().tolist()
        [[[[1, 1, 0, 0], [1, 1, 1, 1]]]]
    """

    def mask_block(query_positions: torch.Tensor, key_start: int, key_end: int) -> torch.Tensor:
        device = query_positions.device
        batch_idx = torch.arange(query_positions.shape[0], device=device)[:, None, None, None]
        head_idx = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
        kv_idx = torch.arange(key_start, key_end, device=device)[None, None, None, :]
        return mask_function(batch_idx, head_idx, query_positions[:, None, :, None], kv_idx)

    return mask_block


def reads_block_masks(device: torch.device) -> bool:
    """Whether the kernel reads each block's mask on the host, to skip blocks it hides: on the CPU only, where the
    read waits for no device. Elsewhere it would make the host wait for the device at every block.

    Example:
        >>> reads_block_masks(torch.device("cpu")), reads_block_masks(torch.device("cuda"))
        (True, False)
    """
    return device.type == "cpu"


def _blocks(length: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, length)) for start in range(0, length, size)]


def _rows(tensor: torch.Tensor, kv_heads: int, start: int, end: int) -> torch.Tensor:
    """Query rows start:end of a [B, Hq, Q, ...] tensor as [B, Hkv, groups * (end - start), ...]."""
    return tensor.unflatten(1, (kv_heads, -1))[:, :, :, start:end].flatten(2, 3)


def _wide(dtype: torch.dtype) -> torch.dtype:
    """Dtype of scores, softmax statistics and accumulators: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _block_scores(query_rows, key, positions, mask_block, start, end, groups) -> torch.Tensor | None:
    """Scores [B, Hkv, groups * q, keys] of query rows against keys start:end (:func:`_wide`), -inf where masked.

    None when no query of the block may attend to any of these keys.
    """
    bias = None  # 0 where allowed, -inf where not; None when every key of the block is allowed
    if mask_block is not None:
        mask = mask_block(positions, start, end)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask_block must return a bool tensor, got {getattr(mask, 'dtype', type(mask))}.")
        mask = mask.reshape((1,) * (4 - mask.dim()) + mask.shape)
        heads = key.shape[1] * groups
        if mask.shape[1] not in (1, heads):
            raise ValueError(f"mask_block must return 1 or {heads} heads (dim 1), got shape {tuple(mask.shape)}.")
        partly_hidden = True
        if reads_block_masks(mask.device):
            # On the CPU, min and max of the bytes cost far less than all() and any() of the bools.
            fewest, most = (int(bound) for bound in torch.aminmax(mask.view(torch.uint8)))
            if most == 0:
                return None
            partly_hidden = fewest == 0
        if partly_hidden:  # query heads grouped under their key head: [B, Hkv or 1, groups or 1, q, keys]
            grouped = mask.unflatten(1, (key.shape[1], groups)) if mask.shape[1] > 1 else mask[:, :, None]
            bias = torch.where(grouped, 0.0, -math.inf)  # adding it costs far less than masked_fill_ on the CPU
    scores = torch.matmul(query_rows, key[:, :, start:end].mT).to(_wide(query_rows.dtype))
    if bias is not None:
        scores.unflatten(2, (groups, -1)).add_(bias)
    return scores


def _forward(query, key, value, positions, mask_block, scale, query_block, key_block):
    """Output [B, Hq, Q, Dv] (dtype of value) and base-2 log-sum-exp [B, Hq, Q] (+inf on rows with no key)."""
    batch, heads, length, _ = query.shape
    kv_heads, groups = key.shape[1], heads // key.shape[1]
    out = value.new_empty(batch, kv_heads, groups, length, value.shape[-1])
    wide = dict(dtype=_wide(query.dtype), device=query.device)
    lse = torch.empty(batch, kv_heads, groups, length, **wide)
    for q_start, q_end in _blocks(length, query_block):
        query_rows = _rows(query, kv_heads, q_start, q_end) * (scale * _LOG2E)
        row_max = torch.full(query_rows.shape[:3], -math.inf, **wide)
        row_sum = torch.zeros_like(row_max)
        acc = torch.zeros(*query_rows.shape[:3], value.shape[-1], **wide)
        for k_start, k_end in _blocks(key.shape[2], key_block):
            scores = _block_scores(query_rows, key, positions[:, q_start:q_end], mask_block, k_start, k_end, groups)
            if scores is None:
                continue
            new_max = torch.maximum(row_max, scores.amax(-1))
            shift = new_max.masked_fill(new_max == -math.inf, 0)  # rows with no allowed key so far
            probs = scores.sub_(shift[..., None]).exp2_()
            correction = (row_max - shift).exp2_()
            row_sum = row_sum * correction + probs.sum(-1)
            values = value[:, :, k_start:k_end]
            acc = acc * correction[..., None] + torch.matmul(probs.to(values.dtype), values)
            row_max = new_max
        # A row with an allowed key sums to >= 1; a row with none has acc = 0 and gets output 0.
        out[:, :, :, q_start:q_end] = (acc / row_sum.clamp(min=1)[..., None]).unflatten(2, (groups, -1))
        row_lse = torch.where(row_sum > 0, row_max + row_sum.log2(), math.inf)
        lse[:, :, :, q_start:q_end] = row_lse.unflatten(2, (groups, -1))
    return out.flatten(1, 2), lse.flatten(1, 2)


class _BlockwiseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, positions, mask_block, scale, query_block, key_block):
        out, lse = _forward(query, key, value, positions, mask_block, scale, query_block, key_block)
        ctx.save_for_backward(query, key, value, out, lse, positions)
        ctx.mask_block, ctx.scale, ctx.query_block, ctx.key_block = mask_block, scale, query_block, key_block
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        query, key, value, out, lse, positions = ctx.saved_tensors
        need_query, need_key, need_value = ctx.needs_input_grad[:3]
        kv_heads, groups = key.shape[1], query.shape[1] // key.shape[1]
        wide = dict(dtype=lse.dtype, device=query.device)
        grad_query = torch.zeros(query.shape, **wide) if need_query else None
        grad_key = torch.zeros(key.shape, **wide) if need_key else None
        grad_value = torch.zeros(value.shape, **wide) if need_value else None
        for q_start, q_end in _blocks(query.shape[2], ctx.query_block):
            query_rows = _rows(query, kv_heads, q_start, q_end) * (ctx.scale * _LOG2E)
            grad_rows = _rows(grad_out, kv_heads, q_start, q_end)
            # Transposed copies of the small operands: a matmul that reads a block transposed is much slower on the CPU.
            query_rows_t, grad_rows_t = query_rows.mT.contiguous(), grad_rows.mT.contiguous()
            delta = (grad_rows.to(lse.dtype) * _rows(out, kv_heads, q_start, q_end)).sum(-1, keepdim=True)
            row_lse = _rows(lse, kv_heads, q_start, q_end)[..., None]
            grad_query_rows = torch.zeros(query_rows.shape, **wide) if need_query else None
            positions_block = positions[:, q_start:q_end]
            for k_start, k_end in _blocks(key.shape[2], ctx.key_block):
                scores = _block_scores(query_rows, key, positions_block, ctx.mask_block, k_start, k_end, groups)
                if scores is None:
                    continue
                probs = scores.sub_(row_lse).exp2_()
                keys, values = key[:, :, k_start:k_end], value[:, :, k_start:k_end]
                if need_value:  # the matmul sums over the query heads of a group
                    grad_value[:, :, k_start:k_end] += torch.matmul(grad_rows_t, probs.to(grad_rows.dtype)).mT
                if need_query or need_key:
                    grad_scores = torch.matmul(grad_rows, values.mT).to(probs.dtype).sub_(delta).mul_(probs)
                    grad_scores = grad_scores.to(keys.dtype)
                    if need_query:
                        grad_query_rows += torch.matmul(grad_scores, keys)
                    if need_key:
                        grad_key[:, :, k_start:k_end] += torch.matmul(query_rows_t, grad_scores).mT
            if need_query:
                grad_query_rows = (grad_query_rows * ctx.scale).unflatten(2, (groups, -1))
                grad_query.unflatten(1, (kv_heads, groups))[:, :, :, q_start:q_end] = grad_query_rows
        if need_key:
            grad_key /= _LOG2E  # query_rows carry the factor log2(e) of the base-2 scores
        grads = (grad_query, grad_key, grad_value)
        grads = tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, (query, key, value), strict=True))
        return *grads, None, None, None, None, None


def blockwise_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_positions: torch.Tensor,
    mask_block: MaskBlock | None,
    scale: float | None = None,
    query_block: int = QUERY_BLOCK,
    key_block: int = KEY_BLOCK,
) -> torch.Tensor:
    """Attention of queries at ``query_positions`` over all keys, without a [queries x keys] mask or score matrix.

    Same result as ``scaled_dot_product_attention(query, key, value, attn_mask=allowed, enable_gqa=True)``
    where ``allowed`` holds the rows of the full [N, N] mask picked at ``query_positions``; a query
    with no allowed key gets output 0 and no gradient. Scores, softmax statistics and gradients
    accumulate in float32 (float64 for float64 inputs).

    Args:
        query: [B, Hq, Q, D].
        key: [B, Hkv, N, D], with Hq a multiple of Hkv (grouped-query attention; heads are not repeated).
        value: [B, Hkv, N, Dv].
        query_positions: integer [B, Q], the sequence index (0..N-1) of each query.
        mask_block: ``mask_block(query_positions[:, a:b], key_start, key_end)`` -> bool, broadcastable
            to [B, 1 or Hq, b - a, key_end - key_start], True where a query may attend to a key (see
            :func:`mask_block_from_function`); None lets every query attend to every key.
        scale: factor of the scores, default ``1 / sqrt(D)``.
        query_block: queries per block.
        key_block: keys per block.

    Returns: [B, Hq, Q, Dv], in the dtype of ``value``.

    Example:
        >>> from transformers.masking_utils import causal_mask_function
        >>> query, key, value = torch.randn(1, 4, 2, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
        >>> causal = mask_block_from_function(causal_mask_function)
        >>> out = blockwise_attention(query, key, value, torch.tensor([[0, 3]]), causal)
        >>> out.shape, torch.allclose(out[0, 3, 0], value[0, 1, 0])  # position 0 sees only key 0
        (torch.Size([1, 4, 2, 8]), True)
    """
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(f"query, key and value must be 4-D, got {query.dim()}, {key.dim()} and {value.dim()} dims.")
    if key.shape[:3] != value.shape[:3] or key.shape[-1] != query.shape[-1] or key.shape[0] != query.shape[0]:
        raise ValueError(
            f"key {tuple(key.shape)} must match value {tuple(value.shape)} in [B, Hkv, N] and query "
            f"{tuple(query.shape)} in B and D."
        )
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"query heads ({query.shape[1]}) must be a multiple of key heads ({key.shape[1]}).")
    integer = query_positions.dtype in (torch.int32, torch.int64)
    if query_positions.shape != (query.shape[0], query.shape[2]) or not integer:
        raise ValueError(
            f"query_positions must be an integer tensor of shape {(query.shape[0], query.shape[2])}, got "
            f"{query_positions.dtype} {tuple(query_positions.shape)}."
        )
    for name, size in (("query_block", query_block), ("key_block", key_block)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be a positive int, got {size!r}.")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    args = (query, key, value, query_positions, mask_block, scale, query_block, key_block)
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return _BlockwiseAttention.apply(*args)
    return _forward(*args)[0]
