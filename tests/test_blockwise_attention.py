"""blockwise_attention: same output and gradients as dense masked attention, without a [queries x keys] tensor."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers.masking_utils import (
    and_masks,
    causal_mask_function,
    packed_sequence_mask_function,
    padding_mask_function,
    sdpa_mask,
    sliding_window_overlay,
)

from tokentune_peft import blockwise_attention as blockwise_attention_module
from tokentune_peft.blockwise_attention import blockwise_attention, mask_block_from_function

BATCH, SEQ_LEN, DIM = 2, 37, 8
# Row 1 of the left-padded batch starts with 6 padding tokens; row 0 of the right-padded one ends with 9.
LEFT_PADDING = torch.ones(BATCH, SEQ_LEN, dtype=torch.bool).index_fill_(1, torch.arange(6), False) | torch.tensor(
    [[True], [False]]
)
RIGHT_PADDING = torch.ones(BATCH, SEQ_LEN, dtype=torch.bool).index_fill_(1, torch.arange(28, 37), False) | torch.tensor(
    [[False], [True]]
)
DOCUMENTS = torch.tensor([[0] * 10 + [1] * 15 + [2] * 12, [0] * 30 + [1] * 7])

# name: (mask function given to blockwise_attention, the same mask as transformers builds it for sdpa)
MASKS = {
    "no_mask": (None, None),
    "causal": (causal_mask_function, dict(mask_function=causal_mask_function)),
    "sliding_window": (
        and_masks(causal_mask_function, sliding_window_overlay(5)),
        dict(mask_function=and_masks(causal_mask_function, sliding_window_overlay(5))),
    ),
    "left_padding": (
        and_masks(causal_mask_function, padding_mask_function(LEFT_PADDING)),
        dict(mask_function=causal_mask_function, attention_mask=LEFT_PADDING),
    ),
    "right_padding": (
        and_masks(causal_mask_function, padding_mask_function(RIGHT_PADDING)),
        dict(mask_function=causal_mask_function, attention_mask=RIGHT_PADDING),
    ),
    "packed_documents": (
        and_masks(causal_mask_function, packed_sequence_mask_function(DOCUMENTS)),
        dict(mask_function=and_masks(causal_mask_function, packed_sequence_mask_function(DOCUMENTS))),
    ),
}


def query_positions(num_queries: int = 11, padded_slots: int = 3, seed: int = 0) -> torch.Tensor:
    """[BATCH, num_queries] ascending positions; row 1 ends with padded slots holding the dummy index 0."""
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(SEQ_LEN, generator=generator)[:num_queries].sort().values for _ in range(BATCH)]
    rows[1][num_queries - padded_slots :] = 0
    rows[1][0] = 0  # position 0: in the left-padded batch, a query that may attend to no key
    return torch.stack(rows)


def dense_allowed(name: str, positions: torch.Tensor) -> torch.Tensor:
    """Rows at ``positions`` of transformers' own [B, 1, N, N] sdpa mask, as [B, 1, Q, N]."""
    if MASKS[name][1] is None:
        return torch.ones(BATCH, 1, positions.shape[1], SEQ_LEN, dtype=torch.bool)
    full = sdpa_mask(
        batch_size=BATCH, q_length=SEQ_LEN, kv_length=SEQ_LEN, allow_is_causal_skip=False, **MASKS[name][1]
    )
    return full[torch.arange(BATCH)[:, None], 0, positions][:, None]


def mask_block(name: str):
    function = MASKS[name][0]
    return None if function is None else mask_block_from_function(function)


def reference_attention(query, key, value, allowed):
    """Dense softmax attention in float64, key/value heads repeated; rows with no allowed key give 0."""
    groups = query.shape[1] // key.shape[1]
    query, key, value = query.double(), key.double().repeat_interleave(groups, 1), value.double()
    scores = query @ key.mT / math.sqrt(query.shape[-1])
    probs = torch.softmax(scores.masked_fill(~allowed, torch.finfo(scores.dtype).min), -1) * allowed
    return probs @ value.repeat_interleave(groups, 1)


def inputs(heads=4, kv_heads=2, num_queries=11, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(BATCH, heads, num_queries, DIM, generator=generator)
    key = torch.randn(BATCH, kv_heads, SEQ_LEN, DIM, generator=generator)
    value = torch.randn(BATCH, kv_heads, SEQ_LEN, DIM, generator=generator)
    grad_out = torch.randn(BATCH, heads, num_queries, DIM, generator=generator)
    return [t.to(dtype) for t in (query, key, value, grad_out)]


def output_and_grads(attention, query, key, value, grad_out, requires_grad=(True, True, True)):
    leaves = [t.detach().clone().requires_grad_(r) for t, r in zip((query, key, value), requires_grad, strict=True)]
    out = attention(*leaves)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


def assert_close(actual, expected, tolerance):
    torch.testing.assert_close(actual.to(expected.dtype), expected, atol=tolerance, rtol=tolerance)


def assert_matches_reference(positions, block, allowed, query, key, value, grad_out) -> None:
    """The kernel (blocks of 4 queries and 8 keys) against the dense reference: output and every gradient, 1e-5."""
    expected, expected_grads = output_and_grads(
        lambda q, k, v: reference_attention(q, k, v, allowed), query, key, value, grad_out
    )
    out, grads = output_and_grads(
        lambda q, k, v: blockwise_attention(q, k, v, positions, block, None, 4, 8), query, key, value, grad_out
    )
    assert_close(out, expected, 1e-5)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert_close(grad, expected_grad, 1e-5)


@pytest.mark.parametrize("name", [name for name in MASKS if name != "no_mask"])
def test_mask_block_from_function_gives_the_rows_of_transformers_sdpa_mask(name):
    positions = query_positions()
    allowed = dense_allowed(name, positions)
    for start, end in [(0, SEQ_LEN), (8, 19), (30, 37)]:
        block = mask_block(name)(positions, start, end)
        assert block.dtype == torch.bool
        assert torch.equal(block.expand(BATCH, 1, -1, -1), allowed[..., start:end])


@pytest.fixture(params=["reads-masks", "computes-every-block"])
def block_masks(request, monkeypatch):
    """The kernel as on the CPU (it reads each block's mask on the host and skips hidden blocks), and as on an
    accelerator (every block computed under its mask, nothing read)."""
    if request.param == "computes-every-block":
        monkeypatch.setattr(blockwise_attention_module, "reads_block_masks", lambda device: False)
    return request.param


@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("name", list(MASKS))
def test_output_and_gradients_match_dense_masked_attention(name, heads, kv_heads, block_masks):
    positions = query_positions()
    query, key, value, grad_out = inputs(heads, kv_heads)
    allowed = dense_allowed(name, positions)
    expected, expected_grads = output_and_grads(
        lambda q, k, v: reference_attention(q, k, v, allowed), query, key, value, grad_out
    )
    # Blocks of 4 queries and 8 keys: several blocks of each, and key blocks that no query of a block may see.
    out, grads = output_and_grads(
        lambda q, k, v: blockwise_attention(q, k, v, positions, mask_block(name), query_block=4, key_block=8),
        query,
        key,
        value,
        grad_out,
    )
    assert out.dtype == torch.float32 and out.shape == (BATCH, heads, 11, DIM)
    assert_close(out, expected, 1e-5)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert grad.dtype == torch.float32
        assert_close(grad, expected_grad, 1e-5)


def test_float64_gradients_pass_gradcheck():
    positions = torch.tensor([[1, 5, 0]])  # the last slot is padded
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 2, 3, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    key, value = torch.randn(2, 1, 1, 7, 4, dtype=torch.float64, generator=generator).requires_grad_().unbind()
    attention = mask_block_from_function(and_masks(causal_mask_function, sliding_window_overlay(3)))
    assert torch.autograd.gradcheck(
        lambda q, k, v: blockwise_attention(q, k, v, positions, attention, None, 2, 3), (query, key, value)
    )


def test_transposed_inputs_as_a_model_passes_them():
    # Attention modules hand over [B, H, N, D] views of [B, N, H, D] projections.
    positions = query_positions()
    query, key, value, grad_out = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in inputs())
    assert not query.is_contiguous() and not key.is_contiguous()
    assert not query.clone().is_contiguous()  # output_and_grads' leaves keep the layout
    allowed = dense_allowed("causal", positions)
    assert_matches_reference(positions, mask_block("causal"), allowed, query, key, value, grad_out)


def test_query_with_no_allowed_key_gets_zero_output_and_zero_gradient(block_masks):
    # Batch row 1 is left-padded over positions 0-5: its queries at 0 and 4 and its padded slot (dummy 0) see no key.
    positions = torch.tensor([[2, 9, 20, 36, 0], [0, 4, 6, 30, 0]])
    query, key, value, grad_out = inputs(num_queries=5)
    allowed = dense_allowed("left_padding", positions)
    empty = ~allowed.any(-1)[:, 0]
    assert empty.tolist() == [[False] * 5, [True, True, False, False, True]]
    out, (grad_query, grad_key, grad_value) = output_and_grads(
        lambda q, k, v: blockwise_attention(q, k, v, positions, mask_block("left_padding"), None, 4, 8),
        query,
        key,
        value,
        grad_out,
    )
    assert not any(t.isnan().any() for t in (out, grad_query, grad_key, grad_value))
    rows = empty[:, None, :, None].expand_as(out)
    assert (out[rows] == 0).all() and (grad_query[rows] == 0).all()
    assert (out[~rows] != 0).all()
    # torch's own sdpa gives these rows 0 as well.
    assert_close(out, F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, enable_gqa=True), 1e-5)


def test_key_blocks_no_query_may_attend_to_are_never_read():
    positions = torch.tensor([[1, 3, 4, 7], [0, 2, 5, 6]])  # causal: only the first block of 8 keys is visible
    query, key, value, grad_out = inputs(num_queries=4)
    allowed = dense_allowed("causal", positions)
    expected, expected_grads = output_and_grads(
        lambda q, k, v: reference_attention(q, k, v, allowed), query, key, value, grad_out
    )
    key[:, :, 8:], value[:, :, 8:] = math.nan, math.nan
    out, grads = output_and_grads(
        lambda q, k, v: blockwise_attention(q, k, v, positions, mask_block("causal"), None, 4, 8),
        query,
        key,
        value,
        grad_out,
    )
    assert_close(out, expected, 1e-5)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert_close(grad, expected_grad, 1e-5)


def test_mask_with_one_row_per_query_head():
    positions = query_positions()
    query, key, value, grad_out = inputs(heads=4, kv_heads=2)
    # Head h may see keys whose index is not a multiple of h + 2, up to its query's position.
    per_head = causal_mask_function(None, None, positions[:, None, :, None], torch.arange(SEQ_LEN)) & (
        torch.arange(SEQ_LEN) % torch.arange(2, 6)[:, None, None] != 0
    )

    def heads_mask(positions_block, start, end):
        block = causal_mask_function(None, None, positions_block[:, None, :, None], torch.arange(start, end))
        return block & (torch.arange(start, end) % torch.arange(2, 6)[:, None, None] != 0)

    assert_matches_reference(positions, heads_mask, per_head, query, key, value, grad_out)


@pytest.mark.parametrize("requires_grad", [(True, False, False), (False, True, False), (False, False, True)])
def test_gradients_only_for_the_inputs_that_require_them(requires_grad):
    positions = query_positions()
    query, key, value, grad_out = inputs()
    allowed = dense_allowed("causal", positions)
    _, expected_grads = output_and_grads(
        lambda q, k, v: reference_attention(q, k, v, allowed), query, key, value, grad_out
    )
    _, grads = output_and_grads(
        lambda q, k, v: blockwise_attention(q, k, v, positions, mask_block("causal"), None, 4, 8),
        query,
        key,
        value,
        grad_out,
        requires_grad,
    )
    for grad, expected_grad, required in zip(grads, expected_grads, requires_grad, strict=True):
        if required:
            assert_close(grad, expected_grad, 1e-5)
        else:
            assert grad is None


def test_no_grad_call_gives_the_same_output_and_no_graph():
    positions = query_positions()
    query, key, value, _ = inputs()
    query.requires_grad_()
    with_graph = blockwise_attention(query, key, value, positions, mask_block("causal"), None, 4, 8)
    with torch.no_grad():
        without_graph = blockwise_attention(query, key, value, positions, mask_block("causal"), None, 4, 8)
    assert with_graph.grad_fn is not None and without_graph.grad_fn is None
    assert torch.equal(with_graph.detach(), without_graph)


def test_scale_argument_replaces_the_default():
    positions = query_positions()
    query, key, value, _ = inputs()
    default = blockwise_attention(query * 0.5, key, value, positions, mask_block("causal"))
    scaled = blockwise_attention(query, key, value, positions, mask_block("causal"), scale=0.5 / math.sqrt(DIM))
    assert_close(scaled, default, 1e-6)


def test_bfloat16_matches_the_float32_reference_within_bfloat16_precision():
    positions = query_positions()
    query, key, value, grad_out = inputs(dtype=torch.bfloat16)
    allowed = dense_allowed("sliding_window", positions)
    expected, expected_grads = output_and_grads(
        lambda q, k, v: reference_attention(q.float(), k.float(), v.float(), allowed), query, key, value, grad_out
    )
    out, grads = output_and_grads(
        lambda q, k, v: blockwise_attention(q, k, v, positions, mask_block("sliding_window"), None, 4, 8),
        query,
        key,
        value,
        grad_out,
    )
    assert out.dtype == torch.bfloat16 and all(grad.dtype == torch.bfloat16 for grad in grads)
    assert_close(out, expected, 2e-2)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert_close(grad, expected_grad, 3e-2)


def test_bfloat16_sums_over_many_key_blocks_in_float32():
    # Uniform attention over 2048 keys in blocks of 3: a bfloat16 running sum of 3s would round off from 256 on.
    query = torch.randn(1, 2, 3, DIM, dtype=torch.bfloat16)
    key = torch.zeros(1, 2, 2048, DIM, dtype=torch.bfloat16)
    value = torch.randn(1, 2, 2048, DIM, dtype=torch.bfloat16)
    out = blockwise_attention(query, key, value, torch.tensor([[5, 700, 2047]]), None, key_block=3)
    assert_close(out, value.float().mean(2, keepdim=True).expand(-1, -1, 3, -1), 1e-2)


class LargestTensorMeter(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        numels = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest, *numels])
        return out


def measure_step(attention, query, key, value):
    """Largest tensor allocated in forward + backward, and the elements saved for backward."""
    leaves = [t.detach().clone().requires_grad_() for t in (query, key, value)]
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with LargestTensorMeter() as meter:
        with saved_tensors_hooks(pack, lambda tensor: tensor):
            out = attention(*leaves)
        out.sum().backward()
    return meter.largest, sum(saved)


# A long sequence: Q x N = 4.9M elements, far above one block of 4 heads x 256 x 1024 = 1M (blocks set below).
LONG_LEN, LONG_QUERIES, HEADS, KV_HEADS, HEAD_DIM = 4096, 1200, 4, 2, 16


def long_inputs():
    generator = torch.Generator().manual_seed(0)
    positions = torch.randperm(LONG_LEN, generator=generator)[:LONG_QUERIES].sort().values[None]
    query = torch.randn(1, HEADS, LONG_QUERIES, HEAD_DIM, generator=generator)
    key, value = torch.randn(2, 1, KV_HEADS, LONG_LEN, HEAD_DIM, generator=generator)
    return positions, query, key, value


def test_forward_and_backward_allocate_no_tensor_of_queries_times_keys():
    positions, query, key, value = long_inputs()
    causal = mask_block_from_function(causal_mask_function)
    largest, saved = measure_step(
        lambda q, k, v: blockwise_attention(q, k, v, positions, causal, query_block=256, key_block=1024),
        query,
        key,
        value,
    )
    assert largest <= HEADS * 256 * 1024 < LONG_QUERIES * LONG_LEN
    # query, key, value, output, one log-sum-exp per query row and head, and the positions.
    assert saved == 2 * query.numel() + key.numel() + value.numel() + HEADS * LONG_QUERIES + LONG_QUERIES


def test_the_meters_flag_sdpa_with_a_dense_row_mask():
    positions, query, key, value = long_inputs()

    def dense_sdpa(q, k, v):
        allowed = torch.arange(LONG_LEN) <= positions[:, None, :, None]
        bias = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)

    largest, saved = measure_step(dense_sdpa, query, key, value)
    assert largest >= LONG_QUERIES * LONG_LEN
    assert saved > 2 * query.numel() + key.numel() + value.numel() + HEADS * LONG_QUERIES + LONG_QUERIES


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(query=torch.randn(2, 4, 11)), "query, key and value must be 4-D"),
        (dict(key=torch.randn(2, 2, 30, DIM)), "key .* must match value"),
        (dict(query=torch.randn(2, 3, 11, DIM)), r"query heads \(3\) must be a multiple of key heads \(2\)"),
        (dict(query_positions=torch.zeros(2, 10, dtype=torch.long)), "query_positions must be an integer tensor"),
        (dict(query_positions=torch.zeros(2, 11)), "query_positions must be an integer tensor"),
        (dict(key_block=0), "key_block must be a positive int, got 0"),
        (dict(mask_block=lambda positions, start, end: torch.ones(1, 1, 11, end - start)), "must return a bool"),
        (dict(mask_block=lambda p, start, end: torch.ones(1, 3, 11, end - start, dtype=bool)), "1 or 4 heads"),
    ],
)
def test_bad_arguments_are_named_in_the_error(change, message):
    query, key, value, _ = inputs()
    arguments = dict(query=query, key=key, value=value, query_positions=query_positions(), mask_block=None)
    with pytest.raises((ValueError, TypeError), match=message):
        blockwise_attention(**{**arguments, **change})
