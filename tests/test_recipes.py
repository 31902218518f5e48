"""Recipes in configs/: parsing, overrides, and a short end-to-end run of each."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import pytest

from tokentune_peft.cli.offline import HUB_NAMES
from tokentune_peft.cli.recipes import parse_recipe

from helpers import CONFIG_DIR, offline_installed

RECIPES = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_every_recipe_parses(path):
    recipe, training = parse_recipe(path)
    assert recipe.model_name and training.output_dir.startswith("outputs/")


def test_command_line_overrides_the_recipe(tmp_path):
    path = os.path.join(CONFIG_DIR, "minilm_rotten_tomatoes_tokentune.yaml")
    recipe, training = parse_recipe(
        path, ["--selection_ratio", "0.5", "--learning_rate", "3e-5", "--no_tokentune", "--output_dir", str(tmp_path)]
    )
    assert (recipe.selection_ratio, recipe.tokentune, recipe.model_name) == (0.5, False, "minilm")
    assert (training.learning_rate, training.output_dir) == (3e-5, str(tmp_path))
    assert training.per_device_train_batch_size == 32  # from the file


def test_unknown_recipe_keys_and_arguments_raise(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name: minilm\nselection_raito: 0.3\n")
    with pytest.raises(ValueError, match="selection_raito"):
        parse_recipe(str(bad))
    with pytest.raises(ValueError, match="--selection_raito"):
        parse_recipe(None, ["--selection_raito", "0.3"])
    with pytest.raises(ValueError, match="load_in_4bit"):
        parse_recipe(None, ["--load_in_4bit", "--output_dir", str(tmp_path)])


@pytest.mark.skipif(not offline_installed, reason="needs requirements-offline.txt (scripts/setup.sh installs it)")
@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_two_steps_of_every_recipe_on_a_tiny_slice(path, tmp_path):
    from tokentune_peft.cli.train import main

    short_run = "--max_steps 2 --train_samples 8 --eval_samples 8 --per_device_train_batch_size 4 --max_length 96"
    if "chatterbot" in open(path).read():
        short_run += " --sample_answers 1"
    main(["--config", path, "--output_dir", str(tmp_path), *short_run.split()])

    results = json.loads((tmp_path / "results.json").read_text())
    assert os.path.getsize(tmp_path / "training_loss.png") > 1000
    assert os.path.isfile(tmp_path / "tokentune_config.json")
    weights = "adapter_model.safetensors" if results["recipe"]["lora"] else "model.safetensors"
    assert os.path.isfile(tmp_path / weights)
    memory = results["activation_memory"]
    assert 0 < memory["step_mib"] < memory["full_fine_tuning_mib"]
    assert results["train"]["train_loss"] > 0
    assert all(math.isfinite(value) for value in results["after"].values())
    assert ("test_accuracy" in results["after"]) == (results["recipe"]["task_type"] == "SEQ_CLS")
    if results["recipe"]["dataset"] == "chatterbot":
        (sample,) = results["sample_answers"]
        assert sample["prompt"] and sample["before"] and sample["after"]
    if results["recipe"]["lora"]:  # the adapter names its base model by name, not by a folder of this machine
        base = json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert base == HUB_NAMES[results["recipe"]["model_name"]]
        assert f"base_model: {base}" in (tmp_path / "README.md").read_text()


@pytest.mark.skipif(not offline_installed, reason="needs requirements-offline.txt (scripts/setup.sh installs it)")
def test_a_recipe_trains_with_dense_top_layers(tmp_path):
    from tokentune_peft.cli.train import main

    path = os.path.join(CONFIG_DIR, "tiny_bert_rotten_tomatoes.yaml")
    main(["--config", path, "--output_dir", str(tmp_path), "--dense_top_layers", "1", "--max_steps", "2"])

    saved = json.loads((tmp_path / "tokentune_config.json").read_text())
    assert saved["dense_top_layers"] == 1
    memory = json.loads((tmp_path / "results.json").read_text())["activation_memory"]
    assert 0 < memory["step_mib"] < memory["full_fine_tuning_mib"]


@pytest.mark.skipif(not offline_installed, reason="needs requirements-offline.txt (scripts/setup.sh installs it)")
def test_the_ci_recipe_prints_no_warnings(tmp_path):
    """The tiny recipe end to end, as a user runs it: stderr holds progress bars only. In particular the
    save does not look the base model up on the Hub (peft's embedding check warned twice, offline) and
    peft's use of transformers' deprecated `is_gradient_checkpointing` stays out of the user's way."""
    recipe = os.path.join(CONFIG_DIR, "tiny_bert_rotten_tomatoes.yaml")
    completed = subprocess.run(
        [sys.executable, "-m", "tokentune_peft.cli.train", "--config", recipe, "--output_dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "held-out accuracy" in completed.stdout
    assert os.path.isfile(tmp_path / "model.safetensors")
    for noise in ("Warning", "warnings.warn", "Unable to fetch remote file", "Could not find a config file"):
        assert noise not in completed.stderr, completed.stderr
