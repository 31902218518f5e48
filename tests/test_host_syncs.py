"""A steady-state TokenTune step makes the host wait for the device no more often than the stock model's step.

On the CPU nothing waits, so the operators that would wait on an accelerator are counted instead
(``scripts/benchmarks/step_ops.py``: ``.item()`` and ``int()`` / ``bool()`` of a tensor, ``nonzero``, boolean-mask
indexing), in steps 2 and 3, both row groups of the single pass included, and compared with the stock model's
count on the same batch. The stock model trains without a cache (``use_cache=False``), as TokenTune's step does:
with one, transformers would let packed documents attend to each other. The CUDA test counts the synchronisations
``torch.cuda.set_sync_debug_mode("warn")`` reports.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import Trainer

from tokentune_peft import attention
from tokentune_peft import blockwise_attention as blockwise_attention_module
from tokentune_peft.trainer import TokenTuneTrainer

from helpers import arguments, build_model, causal_lm_examples, make_batch, wrap
from scripts.benchmarks.step_ops import OperatorCount, count_steps

CASES = [
    ("llama", "CAUSAL_LM", "left"),
    ("qwen2", "CAUSAL_LM", "right"),  # sliding window on one layer
    ("llama", "CAUSAL_LM", "no mask"),  # stock waits for nothing here
    ("bert", "SEQ_CLS", "right"),
    ("gpt2", "SEQ_CLS", "left"),
    ("roberta", "TOKEN_CLS", "right"),
]


def batch_of(model, task: str, padding: str) -> dict:
    if padding == "no mask":
        batch = make_batch(model, task, padding_side="left")
        batch["input_ids"][1], batch["labels"][1] = batch["input_ids"][0], batch["labels"][0]
        del batch["attention_mask"]
        return batch
    return make_batch(model, task, padding_side=padding)


def built(arch: str, task: str, engine: str | None, **config):
    """The tiny model, stock or wrapped, without a cache."""
    model = build_model(arch, task)
    model.config.use_cache = False
    return model if engine is None else wrap(model, task, lora=True, engine=engine, **config)


def syncs_per_step(arch: str, task: str, padding: str, engine: str | None, **config) -> int:
    model = built(arch, task, engine, **config)
    count = count_steps(model, batch_of(model.train(), task, padding))
    return sum(count.syncs.values())


@pytest.mark.parametrize("engine", ["single-pass", "two-pass"])
@pytest.mark.parametrize("arch,task,padding", CASES, ids=["-".join(case) for case in CASES])
def test_a_step_waits_for_the_device_no_more_than_the_stock_step(arch, task, padding, engine):
    stock = syncs_per_step(arch, task, padding, None)
    assert syncs_per_step(arch, task, padding, engine, selection_ratio=0.3) <= stock


@pytest.mark.parametrize("engine", ["single-pass", "two-pass"])
def test_the_blockwise_kernel_on_an_accelerator_reads_no_block_mask(engine, monkeypatch):
    monkeypatch.setattr(attention, "ONE_CALL_ELEMENTS", 0)
    monkeypatch.setattr(blockwise_attention_module, "reads_block_masks", lambda device: False)
    stock = syncs_per_step("llama", "CAUSAL_LM", "left", None)
    assert syncs_per_step("llama", "CAUSAL_LM", "left", engine, selection_ratio=0.3) <= stock


def test_supervised_selection_waits_no_more_than_the_stock_step():
    stock = syncs_per_step("llama", "CAUSAL_LM", "left", None)
    assert syncs_per_step("llama", "CAUSAL_LM", "left", "single-pass", selection="supervised") <= stock


def trainer_step_syncs(trainer) -> int:
    """Host syncs of the Trainer's steps 2 and 3: choosing and counting the batch's positions, forward, backward."""
    examples = causal_lm_examples(count=8)
    batch = {key: torch.stack([example[key] for example in examples]) for key in examples[0]}
    count = OperatorCount()
    model = trainer.model.train()
    for step in range(3):
        with count if step else torch.no_grad():
            batches, num_items = trainer.get_batch_samples(iter([dict(batch)]), 1, torch.device("cpu"))
        if step:
            with count:
                trainer.training_step(model, batches[0], num_items)
        else:
            trainer.training_step(model, batches[0], num_items)
    return sum(count.syncs.values())


def test_a_trainer_step_waits_for_the_device_no_more_than_the_stock_trainer(tmp_path):
    stock = Trainer(model=built("llama", "CAUSAL_LM", None), args=arguments(tmp_path / "stock"))
    model = built("llama", "CAUSAL_LM", "auto", selection_ratio=0.3)
    ours = TokenTuneTrainer(model=model, args=arguments(tmp_path / "ours"))
    assert trainer_step_syncs(ours) <= trainer_step_syncs(stock)


def cuda_syncs(model, batch: dict) -> int:
    """Synchronisations CUDA reports in steps 2 and 3 of ``model`` on ``batch``."""
    model(**batch).loss.backward()  # the first step may synchronise (allocations, the worker's start)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                model(**batch).loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(warning.message) for warning in caught)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("engine", ["single-pass", "two-pass"])
@pytest.mark.parametrize("padding", ["left", "no mask"])
def test_a_cuda_step_synchronises_no_more_than_the_stock_step(engine, padding):
    stock = built("llama", "CAUSAL_LM", None).cuda().train()
    batch = {name: value.cuda() for name, value in batch_of(stock, "CAUSAL_LM", padding).items()}
    model = built("llama", "CAUSAL_LM", engine, selection_ratio=0.3).cuda().train()
    assert cuda_syncs(model, batch) <= cuda_syncs(stock, batch)
