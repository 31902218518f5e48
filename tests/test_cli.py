"""`tokentune-train` as a new user meets it: bad arguments, a missing recipe, help, no recipe at all."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from helpers import CONFIG_DIR

RECIPE = os.path.join(CONFIG_DIR, "minilm_rotten_tomatoes_tokentune.yaml")
COMMAND = [sys.executable, "-m", "tokentune_peft.cli.train"]


def run_command(arguments: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run([*COMMAND, *arguments], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (["--config", RECIPE, "--selection_ratio", "1.5"], "selection_ratio"),
        (["--config", RECIPE, "--selection", "bogus"], "selection"),
        (["--config", "no_such_recipe.yaml"], "no_such_recipe.yaml"),
        (["--config", RECIPE, "--selction_ratio", "0.5"], "--selction_ratio"),
        (["--config", RECIPE, "--max_steps", "many"], "--max_steps"),
    ],
    ids=["ratio_out_of_range", "unknown_strategy", "missing_recipe", "misspelled_option", "wrong_type"],
)
def test_a_bad_argument_gets_one_line_and_status_2_before_any_model_loads(tmp_path, arguments, named):
    start = time.perf_counter()
    completed = run_command(arguments, tmp_path)
    seconds = time.perf_counter() - start
    lines = [line for line in completed.stderr.splitlines() if line.startswith("tokentune-train")]
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    assert len(lines) == 1 and named in lines[0] and lines[0].startswith("tokentune-train: error:")
    assert "Loading weights" not in completed.stderr + completed.stdout
    assert seconds < 60
    assert not os.listdir(tmp_path)


def test_without_a_recipe_it_prints_its_usage_and_trains_nothing(tmp_path):
    completed = run_command([], tmp_path)
    assert completed.returncode == 2
    assert completed.stdout.startswith("usage: tokentune-train --config")
    assert not os.listdir(tmp_path)  # no trainer_output/ left behind


def test_help_lists_the_config_option(tmp_path):
    completed = run_command(["--help"], tmp_path)
    assert completed.returncode == 0
    assert "--config CONFIG" in completed.stdout and "--selection_ratio" in completed.stdout
