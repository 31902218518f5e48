"""Robustness: property tests against the definition, bf16 training, a killed run resumed."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import get_peft_model

from tokentune_peft import TokenTuneConfig
from tokentune_peft.trainer import TokenTuneTrainer

from helpers import CONFIG_DIR, arguments, build_model, causal_lm_examples, offline_installed, tokentune_model
from naive_reference import naive_tokentune_loss

MODEL = get_peft_model(build_model("qwen2", "CAUSAL_LM"), TokenTuneConfig(task_type="CAUSAL_LM"))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(1, 16), min_size=1, max_size=3),
    left=st.booleans(),
    ratio=st.floats(0.05, 1.0),
    seed=st.integers(0, 10_000),
)
def test_engine_loss_equals_naive_loss_on_random_batches(lengths, left, ratio, seed):
    seq_len = max(lengths)
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, 128, (len(lengths), seq_len), generator=generator)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        span = slice(seq_len - length, seq_len) if left else slice(0, length)
        attention_mask[row, span] = 1
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    selector = dataclasses.replace(MODEL.base_model.tokentune_engine.selector, selection_ratio=ratio)
    selected = selector.sample(MODEL, input_ids, attention_mask, None, generator)

    output = MODEL(**batch, selected_positions=selected)
    expected = naive_tokentune_loss(copy.deepcopy(MODEL).get_base_model(), batch, selected, "CAUSAL_LM")
    if torch.isnan(expected):  # no supervised token selected: the naive mean is empty
        assert output.loss.item() == 0.0
    else:
        torch.testing.assert_close(output.loss, expected, rtol=1e-5, atol=1e-6)


def test_bf16_training_tracks_fp32_within_two_percent(tmp_path):
    curves = {}
    for precision in ("fp32", "bf16"):
        trainer = TokenTuneTrainer(
            model=tokentune_model(),
            train_dataset=causal_lm_examples(count=40),
            args=arguments(tmp_path / precision, max_steps=20, learning_rate=1e-3, bf16=precision == "bf16"),
        )
        trainer.train()
        curves[precision] = torch.tensor([e["loss"] for e in trainer.state.log_history if "loss" in e])
    assert len(curves["bf16"]) == 20
    relative = ((curves["bf16"] - curves["fp32"]).abs() / curves["fp32"]).max()
    assert relative < 0.02, curves
    assert curves["fp32"][-5:].mean() < curves["fp32"][:5].mean()  # it trains


def final_weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.mark.skipif(not offline_installed, reason="needs requirements-offline.txt (scripts/setup.sh installs it)")
def test_a_killed_run_resumed_from_its_last_checkpoint_ends_with_the_same_weights(tmp_path):
    config = os.path.join(CONFIG_DIR, "tiny_bert_rotten_tomatoes.yaml")
    command = [
        sys.executable,
        "-m",
        "tokentune_peft.cli.train",
        "--config",
        config,
        "--max_steps",
        "60",
        "--train_samples",
        "256",
        "--per_device_train_batch_size",
        "8",
        "--save_steps",
        "10",
        "--save_strategy",
        "steps",
        "--logging_steps",
        "5",
    ]
    subprocess.run([*command, "--output_dir", str(tmp_path / "whole")], check=True, capture_output=True)

    killed = subprocess.Popen(
        [*command, "--output_dir", str(tmp_path / "killed")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "checkpoint-20" / "trainer_state.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    checkpoints = sorted((tmp_path / "killed").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    complete = [p for p in checkpoints if (p / "trainer_state.json").exists()]
    assert complete and int(complete[-1].name.split("-")[1]) < 60, "the run must die before it finishes"
    subprocess.run(
        [*command, "--output_dir", str(tmp_path / "killed"), "--resume_from_checkpoint", str(complete[-1])],
        check=True,
        capture_output=True,
    )

    whole, resumed = final_weights(tmp_path / "whole"), final_weights(tmp_path / "killed")
    assert whole.keys() == resumed.keys()
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=1e-5, atol=1e-6, msg=name)
    results = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert results["train"]["epoch"] > 0
