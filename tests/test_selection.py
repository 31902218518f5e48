"""Sampling positions: invariants, budget, reproducibility."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokentune_peft.selection.sampling import sample_positions, selection_sizes, validate_selected_positions

from helpers import padded_mask


@settings(max_examples=60, deadline=None)
@given(
    seq_len=st.integers(1, 40),
    data=st.data(),
    ratio=st.floats(0.01, 1.0),
    left=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_sampled_positions_are_valid_and_meet_the_budget(seq_len, data, ratio, left, seed):
    lengths = data.draw(st.lists(st.integers(0, seq_len), min_size=1, max_size=4))
    mask = padded_mask(lengths, seq_len, left)
    always = torch.zeros_like(mask, dtype=torch.bool)
    last = (torch.arange(seq_len) * mask).argmax(dim=1)
    always[torch.arange(len(lengths)), last] = True
    always &= mask.bool()

    selected = sample_positions(mask, always, torch.Generator().manual_seed(seed), selection_ratio=ratio)

    if any(lengths):
        validate_selected_positions(selected, mask)
    counts = (selected >= 0).sum(dim=1)
    assert torch.equal(counts, selection_sizes(mask, selection_ratio=ratio))
    for row, n in enumerate(lengths):
        if n:
            assert int(last[row]) in selected[row].tolist()


def test_selection_sizes_round_up_and_clamp():
    mask = padded_mask([10, 3, 0], 10, left=False)
    assert selection_sizes(mask, selection_ratio=0.3).tolist() == [3, 1, 0]
    assert selection_sizes(mask, num_selected=4).tolist() == [4, 3, 0]


def test_same_seed_same_positions_and_uniform_coverage():
    mask = torch.ones(1, 10, dtype=torch.long)
    none = torch.zeros(1, 10, dtype=torch.bool)
    first = sample_positions(mask, none, torch.Generator().manual_seed(5), num_selected=3)
    again = sample_positions(mask, none, torch.Generator().manual_seed(5), num_selected=3)
    assert torch.equal(first, again)
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(10)
    for _ in range(2000):
        counts[sample_positions(mask, none, generator, num_selected=3)[0]] += 1
    assert (counts / 2000 - 0.3).abs().max() < 0.05  # each position chosen with probability k/n
