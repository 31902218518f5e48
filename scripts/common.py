"""What the benchmarks and studies share: where the checkout and its recipes are, the machine a report ran on,
the command that wrote it, one recipe run, and writing a report with its data."""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import torch
import transformers
from transformers import TrainerCallback

#: The checkout these scripts run from: ``python -m scripts.<folder>.<name>`` needs it on the path.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The recipes of this checkout.
CONFIG_DIR = os.path.join(ROOT, "configs")


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


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that ran ``module`` with ``argv`` (this process's own arguments when None), for a report.

    Example:
        >>> command_line("scripts.studies.quality", ["--quick"])
        'python -m scripts.studies.quality --quick'
    """
    return " ".join(["python -m", module, *(sys.argv[1:] if argv is None else argv)])


def run_setting(name: str, seed: int, config: str, overrides: list[str], curve: TrainerCallback | None = None) -> dict:
    """Train one recipe with overrides through ``tokentune-train``'s code; its results and wall time. ``curve``
    (a :class:`scripts.studies.common.LearningCurve`, or any callback) watches the training."""
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
