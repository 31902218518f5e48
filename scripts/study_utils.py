"""What the studies in scripts/ share: where the recipes are, the machine they ran on, one recipe run,
and writing a report with its data."""

from __future__ import annotations

import json
import os
import platform
import time

import torch

from tokentune_peft.cli.recipes import parse_recipe
from tokentune_peft.cli.train import run as run_recipe

#: The recipes of this checkout.
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
#: Classification learning rates: the recipe's for all weights, a higher one for LoRA.
FULL_LR, LORA_LR = "1e-4", "1e-3"


def machine_description(device: str = "cpu") -> str:
    """The accelerator (or the CPU and its cores) and the torch version, for report headers."""
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"


def run_setting(name: str, seed: int, config: str, overrides: list[str]) -> dict:
    """Train one recipe with overrides through ``tokentune-train``'s code; its results and wall time."""
    recipe, training = parse_recipe(config, overrides)
    start = time.perf_counter()
    results = run_recipe(recipe, training)
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
