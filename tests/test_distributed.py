"""Several processes through accelerate (CPU, gloo): exact DDP gradients, and a recipe trained on 2 ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import CONFIG_DIR, offline_installed

HERE = os.path.dirname(__file__)
# accelerate 1.15's `--cpu` with several processes falls back to its single-process launcher; the
# multi-process (torchrun) launcher on a machine without GPUs runs the ranks on CPU with gloo.
LAUNCH = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]


def test_ddp_gradient_equals_single_process_gradient(tmp_path):
    result_path = tmp_path / "result.json"
    subprocess.run(
        [*LAUNCH, os.path.join(HERE, "ddp_gradient_check.py"), str(result_path)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    result = json.loads(result_path.read_text())
    assert result["world"] == 2
    assert result["max_difference"] < 1e-6 * max(result["largest_gradient"], 1.0)
    assert result["ranks_draw_differently"]


@pytest.mark.skipif(not offline_installed, reason="needs requirements-offline.txt (scripts/setup.sh installs it)")
def test_a_recipe_trains_on_two_processes(tmp_path):
    config = os.path.join(CONFIG_DIR, "tiny_bert_rotten_tomatoes.yaml")
    completed = subprocess.run(
        [*LAUNCH, "--module", "tokentune_peft.cli.train", "--config", config, "--output_dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["train"]["train_loss"] > 0
    # 4 steps of 16 reviews on each of 2 ranks cover the 64-review slice twice (once on one process)
    assert results["train"]["epoch"] == 2.0
