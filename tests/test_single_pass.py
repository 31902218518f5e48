"""The single-pass step: where it runs, where it falls back to two passes, and that it gives the same step."""

from __future__ import annotations

import copy
import gc
import logging
import os
import signal
import threading
import time

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from tokentune_peft import TokenTuneConfig
from tokentune_peft.engine_choice import Engine
from tokentune_peft.single_pass import SinglePassStep, SinglePassUnsupported

from helpers import (
    assert_same_grads,
    build_model,
    check_against_naive,
    fixed_selection,
    make_batch,
    trainable_grads,
    wrap,
)

ARCHS = [
    ("llama", "CAUSAL_LM"),
    ("mistral", "CAUSAL_LM"),  # sliding window shorter than the rows
    ("qwen2", "TOKEN_CLS"),  # sliding window on one layer, full attention on the other
    ("gpt2", "SEQ_CLS"),
    ("bert", "SEQ_CLS"),
    ("roberta", "TOKEN_CLS"),
    ("modernbert", "TOKEN_CLS"),  # local (sliding) and global attention layers
    ("qwen3_moe", "CAUSAL_LM"),  # router load-balancing loss over the selected tokens
]
ARCH_IDS = [f"{arch}-{task.lower()}" for arch, task in ARCHS]


def engine_of(model):
    return model.base_model.tokentune_engine


def other_threads() -> list[threading.Thread]:
    """The process's threads but the engines' no-grad workers, which live as long as their models."""
    return [thread for thread in threading.enumerate() if thread.name != "tokentune-no-grad-group"]


def step_with(model, batch, selected, engine: str):
    engine_of(model).choice.asked = Engine(engine)
    model.zero_grad(set_to_none=True)
    output = model(**batch, selected_positions=selected)
    output.loss.backward()
    assert engine_of(model).engine_used == engine
    return output.loss.detach(), {name: grad.clone() for name, grad in trainable_grads(model).items()}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize(("arch", "task"), ARCHS, ids=ARCH_IDS)
def test_single_pass_gradient_matches_naive_definition_and_two_passes(arch, task, lora, attention_path):
    model = wrap(build_model(arch, task), task, lora)
    batch = make_batch(model, task)
    selected = fixed_selection(batch, arch, task, model)
    two_pass_loss, two_pass_grads = step_with(model, batch, selected, "two-pass")
    # The first single-pass step counts the model's attention calls; from the second on, the no-grad group
    # stops after the last keys and values.
    first_loss, first_grads = step_with(model, batch, selected, "single-pass")
    assert engine_of(model).choice.attention_calls is not None
    model.zero_grad(set_to_none=True)
    output = check_against_naive(model, batch, selected, task)
    assert engine_of(model).engine_used == "single-pass"
    for loss, grads in ((first_loss, first_grads), (output.loss, trainable_grads(model))):
        torch.testing.assert_close(loss, two_pass_loss, rtol=1e-6, atol=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, two_pass_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_no_grad_group_stops_after_the_last_keys_and_values():
    model = wrap(build_model("llama", "CAUSAL_LM"), "CAUSAL_LM", lora=False)
    batch = make_batch(model, "CAUSAL_LM")
    backbone = model.get_base_model().model
    seq_len = batch["input_ids"].shape[1]
    rows_seen = {"last mlp": [], "final norm": []}
    for name, module in (("last mlp", backbone.layers[-1].mlp), ("final norm", backbone.norm)):
        module.register_forward_hook(lambda module, args, output, name=name: rows_seen[name].append(output.shape[1]))
    steps = []
    for _ in range(2):
        for seen in rows_seen.values():
            seen.clear()
        model(**batch).loss.backward()
        assert engine_of(model).engine_used == "single-pass"
        # The mask probe runs the final norm on the whole batch (every layer skipped); leave it out.
        steps.append({name: sorted(rows) for name, rows in rows_seen.items()})
        steps[-1]["final norm"].remove(seq_len)
    assert engine_of(model).choice.attention_calls == len(backbone.layers)
    # The first step ran both groups through the whole backbone; the second only the grad group's rows.
    first, second = steps
    assert first["last mlp"] == first["final norm"] and len(first["last mlp"]) == 2
    assert second["last mlp"] == second["final norm"] == [min(first["last mlp"])] < [seq_len], second


def test_a_model_making_more_attention_calls_than_counted_falls_back_to_two_passes(caplog):
    model = wrap(build_model("llama", "CAUSAL_LM"), "CAUSAL_LM", lora=False)
    reference = copy.deepcopy(model)
    batch = make_batch(model, "CAUSAL_LM")
    selected = fixed_selection(batch, "llama", "CAUSAL_LM", model)
    engine_of(model).choice.attention_calls = 1  # as if an earlier step had made one attention call
    threads = len(other_threads())
    with caplog.at_level(logging.WARNING, logger="tokentune_peft.engine_choice"):
        loss = model(**batch, selected_positions=selected).loss
    loss.backward()
    assert len(other_threads()) == threads
    assert engine_of(model).engine_used == "two-pass"
    assert "more self-attention calls (2) than an earlier step of the model (1)" in caplog.text
    expected, expected_grads = step_with(reference, batch, selected, "two-pass")
    torch.testing.assert_close(loss.detach(), expected)
    for name, grad in trainable_grads(model).items():
        torch.testing.assert_close(grad, expected_grads[name], msg=name)


def test_the_default_engine_is_the_single_pass_and_says_so(caplog):
    model = wrap(build_model("llama", "CAUSAL_LM"), "CAUSAL_LM", lora=False)
    batch = make_batch(model, "CAUSAL_LM")
    assert model.peft_config["default"].engine == "auto"
    with caplog.at_level(logging.INFO, logger="tokentune_peft.engine_choice"):
        model(**batch).loss.backward()
        model(**batch).loss.backward()
    assert engine_of(model).engine_used == "single-pass"
    assert engine_of(model).engine_reason is None
    lines = [record.getMessage() for record in caplog.records if record.name == "tokentune_peft.engine_choice"]
    assert lines == ["TokenTune runs the single-pass step."]  # once, not per step


def test_the_config_can_force_two_passes(caplog):
    model = wrap(build_model("llama", "CAUSAL_LM"), "CAUSAL_LM", lora=False, engine="two-pass")
    with caplog.at_level(logging.INFO, logger="tokentune_peft.engine_choice"):
        model(**make_batch(model, "CAUSAL_LM")).loss.backward()
    assert engine_of(model).engine_used == "two-pass"
    assert "TokenTune runs the two-pass step (the config asks for it)." in caplog.text


def test_the_engine_field_is_checked_and_saved():
    with pytest.raises(ValueError, match="`engine` must be one of"):
        TokenTuneConfig(task_type="CAUSAL_LM", engine="one-pass")
    config = TokenTuneConfig(task_type="CAUSAL_LM", engine="two-pass")
    assert TokenTuneConfig.from_dict(config.to_dict()).engine == "two-pass"


def test_importance_selection_falls_back_to_two_passes(caplog):
    model = wrap(build_model("llama", "CAUSAL_LM"), "CAUSAL_LM", lora=False, selection="importance")
    with caplog.at_level(logging.INFO, logger="tokentune_peft.engine_choice"):
        model(**make_batch(model, "CAUSAL_LM")).loss.backward()
    assert engine_of(model).engine_used == "two-pass"
    assert "importance" in engine_of(model).engine_reason
    assert "TokenTune runs the two-pass step (selection 'importance'" in caplog.text


def test_forcing_the_single_pass_where_it_cannot_run_is_an_error():
    model = wrap(build_model("llama", "CAUSAL_LM"), "CAUSAL_LM", False, selection="importance", engine="single-pass")
    with pytest.raises(ValueError, match=r"engine='single-pass'\) cannot run this step: selection 'importance'"):
        model(**make_batch(model, "CAUSAL_LM"))


def test_fsdp_sharded_models_fall_back_to_two_passes():
    model = wrap(build_model("llama", "CAUSAL_LM"), "CAUSAL_LM", lora=False)
    layer = model.get_base_model().model.layers[0]
    # What fully_shard does to each module it shards: swap in a subclass of FSDPModule.
    layer.__class__ = type(f"FSDP{type(layer).__name__}", (FSDPModule, type(layer)), {})
    engine = engine_of(model)
    assert engine.choice.choose(model.get_base_model(), drawn_in_forward=None) == Engine.TWO_PASS
    assert engine.engine_used == "two-pass" and "FSDP" in engine.engine_reason


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_gradient_checkpointing_runs_the_single_pass_without_dropout(use_reentrant):
    plain = wrap(build_model("mistral", "CAUSAL_LM"), "CAUSAL_LM", lora=True, engine="two-pass")
    base = build_model("mistral", "CAUSAL_LM")
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    checkpointed = wrap(base, "CAUSAL_LM", lora=True)
    checkpointed.load_state_dict(plain.state_dict())
    batch = make_batch(plain, "CAUSAL_LM", padding_side="right")
    selected = fixed_selection(batch, "mistral", "CAUSAL_LM", plain)
    plain(**batch, selected_positions=selected).loss.backward()
    checkpointed(**batch, selected_positions=selected).loss.backward()
    assert engine_of(checkpointed).engine_used == "single-pass"
    assert_same_grads(checkpointed, plain)


def test_gradient_checkpointing_with_dropout_falls_back_to_two_passes():
    base = build_model("bert", "SEQ_CLS", hidden_dropout_prob=0.1)
    base.gradient_checkpointing_enable()
    model = wrap(base, "SEQ_CLS", lora=False)
    model(**make_batch(model, "SEQ_CLS")).loss.backward()
    assert engine_of(model).engine_used == "two-pass"
    assert "dropout" in engine_of(model).engine_reason


DROPOUT = {
    "bert": {"hidden_dropout_prob": 0.2, "attention_probs_dropout_prob": 0.2},
    "gpt2": {"resid_pdrop": 0.2, "embd_pdrop": 0.2, "attn_pdrop": 0.2},
}


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_dropout_runs_are_reproducible_from_the_seed(arch):
    task = "TOKEN_CLS"
    runs = []
    for _ in range(2):
        model = wrap(build_model(arch, task, **DROPOUT[arch]), task, lora=False)
        batch = make_batch(model, task)
        torch.manual_seed(123)
        loss = model(**batch).loss
        loss.backward()
        assert engine_of(model).engine_used == "single-pass"
        runs.append((loss.detach(), trainable_grads(model)))
    (loss_a, grads_a), (loss_b, grads_b) = runs
    assert torch.equal(loss_a, loss_b)
    for name, grad in grads_a.items():
        assert torch.equal(grad, grads_b[name]), name


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_a_first_step_leaves_the_random_stream_where_a_later_step_does(arch):
    """A later step's no-grad group stops after the last keys and values; a first step cannot know where
    that is and undoes the dropout draws it made past it. A run resumed from a checkpoint, whose first step
    is a first step, then draws what the whole run drew."""
    task = "TOKEN_CLS"
    model = wrap(build_model(arch, task, **DROPOUT[arch]), task, lora=False)
    batch = make_batch(model, task)
    selected = fixed_selection(batch, arch, task, model)
    steps = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(123)
        loss = model(**batch, selected_positions=selected).loss
        random_state = torch.get_rng_state()
        loss.backward()
        assert engine_of(model).engine_used == "single-pass"
        steps.append((loss.detach(), random_state, trainable_grads(model)))
    assert engine_of(model).choice.attention_calls is not None  # the second step stopped early
    (first_loss, first_state, first_grads), (later_loss, later_state, later_grads) = steps
    assert torch.equal(first_state, later_state)
    assert torch.equal(first_loss, later_loss)
    for name, grad in first_grads.items():
        assert torch.equal(grad, later_grads[name]), name


def test_packed_documents_stay_apart_in_the_single_pass():
    model = wrap(build_model("llama", "CAUSAL_LM"), "CAUSAL_LM", lora=False)
    input_ids = make_batch(model, "CAUSAL_LM")["input_ids"][:1]
    position_ids = torch.cat([torch.arange(5), torch.arange(7)])[None]
    batch = {"input_ids": input_ids, "position_ids": position_ids, "labels": input_ids.clone()}
    selected = torch.tensor([[1, 3, 4, 6, 9, 11]])
    losses = [step_with(model, batch, selected, engine)[0] for engine in ("two-pass", "single-pass")]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    model.zero_grad(set_to_none=True)
    check_against_naive(model, batch, selected, "CAUSAL_LM")


def test_a_model_the_single_pass_cannot_follow_falls_back_with_a_warning(monkeypatch, caplog):
    model = wrap(build_model("llama", "CAUSAL_LM"), "CAUSAL_LM", lora=False)
    reference = copy.deepcopy(model)
    batch = make_batch(model, "CAUSAL_LM")
    selected = fixed_selection(batch, "llama", "CAUSAL_LM", model)

    def diverge(self, *args):
        raise SinglePassUnsupported("the groups reached different attention calls")

    monkeypatch.setattr(SinglePassStep, "attend", diverge)
    threads = len(other_threads())
    with caplog.at_level(logging.INFO, logger="tokentune_peft.engine_choice"):
        loss = model(**batch, selected_positions=selected).loss
    loss.backward()
    assert len(other_threads()) == threads  # the no-grad group was released, not left waiting
    assert engine_of(model).engine_used == "two-pass"
    assert "falls back to the two-pass step for this model: the groups reached different" in caplog.text
    expected, _ = step_with(reference, batch, selected, "two-pass")
    torch.testing.assert_close(loss.detach(), expected)
    model(**batch, selected_positions=selected)  # later steps go straight to two passes
    assert engine_of(model).engine_used == "two-pass"


def test_an_error_in_the_no_grad_group_reaches_the_caller_and_releases_both_groups(monkeypatch):
    model = wrap(build_model("llama", "CAUSAL_LM"), "CAUSAL_LM", lora=False)
    batch = make_batch(model, "CAUSAL_LM")

    def fail(self, *args):
        raise ValueError("boom")

    monkeypatch.setattr(SinglePassStep, "_attend_no_grad", fail)
    threads = len(other_threads())
    with pytest.raises(RuntimeError, match="no-grad row group of a single-pass TokenTune step failed: ValueError"):
        model(**batch)
    assert len(other_threads()) == threads


def test_an_error_in_the_grad_group_releases_the_no_grad_group():
    class Failing(nn.Module):
        def forward(self, hidden):
            raise KeyError("head")

    model = wrap(build_model("llama", "CAUSAL_LM"), "CAUSAL_LM", lora=False)
    model.get_base_model().lm_head = Failing()
    threads = len(other_threads())
    with pytest.raises(KeyError, match="head"):
        model(**make_batch(model, "CAUSAL_LM"))
    assert len(other_threads()) == threads


def test_autocast_reaches_the_no_grad_group():
    model = wrap(build_model("llama", "CAUSAL_LM"), "CAUSAL_LM", lora=False)
    batch = make_batch(model, "CAUSAL_LM")
    selected = fixed_selection(batch, "llama", "CAUSAL_LM", model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = [step_with(model, batch, selected, engine)[0] for engine in ("two-pass", "single-pass")]
    torch.testing.assert_close(losses[0], losses[1], rtol=2e-2, atol=2e-2)


def test_with_every_token_selected_the_grad_group_runs_alone():
    model = wrap(build_model("llama", "CAUSAL_LM"), "CAUSAL_LM", lora=False, selection_ratio=1.0)
    batch = make_batch(model, "CAUSAL_LM", padding_side="right")
    selected = model(**batch).selected_positions
    threads = len(other_threads())
    losses = [step_with(model, batch, selected, engine)[0] for engine in ("two-pass", "single-pass")]
    assert len(other_threads()) == threads
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)


def test_the_no_grad_group_runs_on_one_thread_over_many_steps_which_ends_with_the_model(monkeypatch):
    model = wrap(build_model("llama", "CAUSAL_LM"), "CAUSAL_LM", lora=False)
    batch = make_batch(model, "CAUSAL_LM")
    started = []
    start = threading.Thread.start

    def counted_start(thread):
        started.append(thread.name)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", counted_start)
    for _ in range(4):
        model(**batch).loss.backward()
        assert engine_of(model).engine_used == "single-pass"
    assert started == ["tokentune-no-grad-group"]
    worker = engine_of(model).worker.thread
    del model
    gc.collect()
    worker.join(timeout=60)
    assert not worker.is_alive()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_process_runs_single_pass_steps_on_a_worker_of_its_own():
    """As a DataLoader worker would be: forked after the parent's worker thread started."""
    model = wrap(build_model("llama", "CAUSAL_LM"), "CAUSAL_LM", lora=False)
    batch = make_batch(model, "CAUSAL_LM")
    model(**batch).loss.backward()  # the parent's worker thread runs
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next step, on a worker of its own, reported through the pipe
        try:
            torch.set_num_threads(1)  # as a DataLoader worker does: OpenMP's pool does not survive a fork
            loss = model(**batch).loss
            os.write(write, f"{engine_of(model).engine_used.value} {loss.item()!r}".encode())
        finally:
            os._exit(0)
    os.close(write)
    deadline = time.monotonic() + 120
    while os.waitpid(pid, os.WNOHANG)[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked process's step did not finish")
        time.sleep(0.2)
    engine, loss = os.read(read, 256).decode().split()
    os.close(read)
    assert engine == "single-pass"
    expected = model(**batch).loss.item()  # the parent's own next step: the same positions
    assert float(loss) == pytest.approx(expected, rel=1e-5)  # one thread sums in another order
