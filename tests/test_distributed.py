"""Several processes through accelerate (CPU, gloo): exact DDP gradients, and a recipe trained on 2 ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import CONFIG_DIR, free_port, offline_installed

HERE = os.path.dirname(__file__)


# accelerate 1.15's `--cpu` with several processes falls back to its single-process launcher; the
# multi-process (torchrun) launcher on a machine without GPUs runs the ranks on CPU with gloo.
def launch_on_two_processes(*command: str) -> subprocess.CompletedProcess:
    """`accelerate launch` a script or module on 2 CPU processes; fails the test with its output if it fails."""
    completed = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
        + ["--num_machines", "1", "--main_process_port", str(free_port())]
        + ["--mixed_precision", "no", "--dynamo_backend", "no", *command],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed


def test_ddp_gradient_equals_single_process_gradient(tmp_path):
    result_path = tmp_path / "result.json"
    launch_on_two_processes(os.path.join(HERE, "ddp_gradient_check.py"), str(result_path))
    result = json.loads(result_path.read_text())
    assert result["world"] == 2
    assert result["max_difference"] < 1e-6 * max(result["largest_gradient"], 1.0)
    assert result["ranks_draw_differently"]


@pytest.mark.skipif(not offline_installed, reason="needs requirements-offline.txt (scripts/setup.sh installs it)")
def test_a_recipe_trains_on_two_processes(tmp_path):
    config = os.path.join(CONFIG_DIR, "tiny_bert_rotten_tomatoes.yaml")
    launch_on_two_processes(
        os.path.join(HERE, "train_on_two_processes.py"), "--config", config, "--output_dir", str(tmp_path)
    )
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["train"]["train_loss"] > 0
    # 4 steps of 16 reviews on each of 2 ranks cover the 64-review slice twice (once on one process)
    assert results["train"]["epoch"] == 2.0
