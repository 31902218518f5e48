"""Long sequences: a TokenTune step allocates no [queries x keys] tensor where the stock step allocates none.

Every tensor an operator returns during a step is seen by a dispatch mode (in both row groups of the single pass),
which keeps the element count of the largest storage allocated. The memory figures themselves come from
``python -m scripts.benchmarks.long_context`` (docs/benchmarks.md), not from a test.
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import LlamaConfig, LlamaForCausalLM

from tokentune_peft import TokenTuneConfig
from tokentune_peft.cli.model_configs import LLAMA_SIZES
from tokentune_peft.single_pass import SinglePassStep

SEQ_LEN = 4096
RATIO = 0.3


class LargestAllocation(TorchDispatchMode):
    """The largest storage (in elements) any operator output owns while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(output):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                self.largest = max(self.largest, tensor.untyped_storage().nbytes() // tensor.element_size())
        return output


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    # A vocabulary of 128: the logits ([N, vocab]) stay far below [k, N].
    sizes = dict(LLAMA_SIZES["llama-tiny"], vocab_size=128)
    config = LlamaConfig(**sizes, max_position_embeddings=SEQ_LEN, attn_implementation="sdpa")
    return LlamaForCausalLM(config).train()


def largest_allocation(model, batch: dict, monkeypatch, steps: int = 1) -> int:
    """The largest allocation of ``steps`` training steps (forward and backward), the single pass's helper included."""
    meter = LargestAllocation()
    run_no_grad = SinglePassStep._run_no_grad

    def metered(self, *args, **kwargs):
        with meter:
            return run_no_grad(self, *args, **kwargs)

    monkeypatch.setattr(SinglePassStep, "_run_no_grad", metered)
    for _ in range(steps):
        with meter:
            model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
    return meter.largest


def batch_of(padding: int) -> dict:
    input_ids = torch.randint(0, 128, (1, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[:, :padding] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": input_ids}


@pytest.mark.parametrize("engine", ["single-pass", "two-pass"])
def test_no_step_allocates_a_queries_by_keys_tensor_where_the_stock_step_allocates_none(engine, monkeypatch):
    batch = batch_of(padding=0)
    queries_by_keys = math.ceil(RATIO * SEQ_LEN) * SEQ_LEN
    stock = largest_allocation(tiny_llama(), batch, monkeypatch)
    assert stock < queries_by_keys / 2  # the stock step: causal sdpa, no mask
    model = get_peft_model(tiny_llama(), TokenTuneConfig(task_type="CAUSAL_LM", selection_ratio=RATIO, engine=engine))
    largest = largest_allocation(model, batch, monkeypatch, steps=2)  # the single pass's second step stops early
    assert model.base_model.tokentune_engine.engine_used == engine
    assert largest < queries_by_keys, f"{largest} elements in one tensor, k x N = {queries_by_keys} (stock: {stock})"


@pytest.mark.parametrize("engine", ["single-pass", "two-pass"])
def test_with_padding_no_step_allocates_more_in_one_tensor_than_the_stock_step(engine, monkeypatch):
    """With padding the stock model builds a [N x N] mask; TokenTune reads it and allocates nothing larger."""
    batch = batch_of(padding=100)
    stock = largest_allocation(tiny_llama(), batch, monkeypatch)
    assert stock >= SEQ_LEN * SEQ_LEN  # the stock step's own boolean [N x N] mask
    model = get_peft_model(tiny_llama(), TokenTuneConfig(task_type="CAUSAL_LM", selection_ratio=RATIO, engine=engine))
    assert largest_allocation(model, batch, monkeypatch, steps=2) <= stock
