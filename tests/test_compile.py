"""torch.compile: a compiled TokenTune model, and the Trainer's ``torch_compile=True``, train as the stock ones.

A TokenTune step runs its own Python around the model (two passes or two row groups, layers skipped in probes), so
the step runs eagerly inside a compiled model (``torch.compiler.disable``); evaluation and generation compile as the
stock model does. The backend is "eager": dynamo traces, which is where a step could break, and nothing is built.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from transformers import Trainer

from tokentune_peft import TokenTuneConfig
from tokentune_peft.trainer import TokenTuneTrainer

from helpers import arguments, assert_same_grads, build_model, causal_lm_examples, make_batch


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("engine", ["single-pass", "two-pass"])
def test_a_compiled_model_at_ratio_one_equals_the_compiled_stock_model(engine):
    stock = build_model("llama", "CAUSAL_LM")
    config = TokenTuneConfig(task_type="CAUSAL_LM", selection_ratio=1.0, engine=engine)
    model = get_peft_model(copy.deepcopy(stock), config).train()
    batch = make_batch(stock, "CAUSAL_LM", padding_side="right")
    compiled, compiled_stock = torch.compile(model, backend="eager"), torch.compile(stock.train(), backend="eager")
    for _ in range(2):  # the second step is the single pass's steady state
        model.zero_grad(set_to_none=True)
        stock.zero_grad(set_to_none=True)
        loss = compiled(**batch).loss
        loss.backward()
        expected = compiled_stock(**batch, use_cache=False).loss
        expected.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        assert_same_grads(model, stock, rtol=1e-4, atol=1e-6)
    assert model.base_model.tokentune_engine.engine_used == engine


def test_the_trainer_with_torch_compile_logs_the_plain_trainers_losses(tmp_path):
    """``TrainingArguments(torch_compile=True)``: TokenTune at ratio 1.0 logs the plain Trainer's losses."""
    examples = [e for e in causal_lm_examples() if int(e["attention_mask"].sum()) == 12]  # no padding
    settings = dict(per_device_train_batch_size=2, torch_compile=True, torch_compile_backend="eager")
    config = TokenTuneConfig(task_type="CAUSAL_LM", selection_ratio=1.0)
    model = get_peft_model(build_model("llama", "CAUSAL_LM"), config)
    tokentune = TokenTuneTrainer(model=model, args=arguments(tmp_path / "a", **settings), train_dataset=examples)
    tokentune.train()
    plain = Trainer(
        model=build_model("llama", "CAUSAL_LM"), args=arguments(tmp_path / "b", **settings), train_dataset=examples
    )
    plain.train()
    curve = [e["loss"] for e in tokentune.state.log_history if "loss" in e]
    assert len(curve) == 4
    assert curve == pytest.approx([e["loss"] for e in plain.state.log_history if "loss" in e], rel=1e-4)
