"""What the studies in scripts/ share: where the recipes are, the machine they ran on, one recipe run,
a learning curve, and writing a report with its data."""

from __future__ import annotations

import json
import os
import platform
import time

import torch
import transformers
from transformers import TrainerCallback

#: The recipes of this checkout.
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
#: Classification learning rates: the recipe's for all weights, a higher one for LoRA.
FULL_LR, LORA_LR = "1e-4", "1e-3"


def machine_description(device: str = "cpu") -> str:
    """The accelerator (or the CPU and its cores) and the torch and transformers versions, for report headers.

    Example:
        >>> "CPU" in machine_description() and "transformers" in machine_description()
        True
    """
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, {versions}"
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, {versions}"


class LearningCurve(TrainerCallback):
    """Records every evaluation during training against the optimizer step and the training seconds so far
    (time inside optimizer steps only: evaluation, logging and saving are left out), and evaluates after
    the last step too. Evaluations with another ``metric_key_prefix`` (a test split after training) are
    not recorded.

    Example:
        >>> curve = LearningCurve()
        >>> curve.points
        []
    """

    def __init__(self) -> None:
        self.points: list[dict] = []
        self.train_seconds = 0.0
        self._step_start: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.train_seconds += time.perf_counter() - self._step_start
        if state.global_step == state.max_steps:
            control.should_evaluate = True
        return control

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if "eval_runtime" in metrics:  # TRL adds `eval_`-named keys to every evaluation: test by the runtime's
            self.points.append({"step": state.global_step, "train_seconds": self.train_seconds, **metrics})


def run_setting(name: str, seed: int, config: str, overrides: list[str], curve: TrainerCallback | None = None) -> dict:
    """Train one recipe with overrides through ``tokentune-train``'s code; its results and wall time. ``curve``
    (a :class:`LearningCurve`, or any callback) watches the training."""
    # Imported here: the recipes need `datasets`, which the benchmarks importing this module do not (the GPU
    # machine has none).
    from tokentune_peft.cli.recipes import parse_recipe
    from tokentune_peft.cli.train import run as run_recipe

    recipe, training = parse_recipe(config, overrides)
    start = time.perf_counter()
    results = run_recipe(recipe, training, callbacks=[curve] if curve else None)
    return {
        "setting": name,
        "seed": seed,
        "overrides": overrides,
        "wall_seconds": time.perf_counter() - start,
        "results": results,
    }


def write_report(output_dir: str, report_name: str, report: str, data_name: str, data: dict) -> None:
    """Write the Markdown report and its data (JSON) into ``output_dir``, and print the report."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, report_name), "w") as handle:
        handle.write(report)
    with open(os.path.join(output_dir, data_name), "w") as handle:
        json.dump(data, handle, indent=2, default=str)
    print(report)
