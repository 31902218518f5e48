"""Benchmark TokenTune against full fine-tuning, LoRA, QLoRA and gradient checkpointing.

Each setting runs in a process of its own; the table reports, for one batch, the bytes saved for
backward, the process's peak memory and the median training-step time (optimizer step included),
with ratios to full fine-tuning from the same run.

    python scripts/benchmark.py --model llama-256 --batch_size 2 --seq_len 512 \
        --settings full tokentune-0.1 tokentune-0.3 tokentune-0.5 --output_dir outputs/benchmark
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser

from tokentune_peft.benchmarking import measure

MIB = 2**20


@dataclass
class BenchmarkArguments:
    model: str = field(
        default="llama-256",
        metadata={
            "help": "A named config (llama-256, llama-1024, llama-1b) "
            "with random weights, or a local pretrained folder."
        },
    )
    settings: list[str] = field(
        default_factory=lambda: ["full", "tokentune-0.1", "tokentune-0.3", "tokentune-0.5"],
        metadata={"help": "Settings: full, lora, qlora or tokentune-<ratio>, each optionally +lora, +qlora, +gc."},
    )
    batch_size: int = field(default=2, metadata={"help": "Sequences per batch."})
    seq_len: int = field(default=512, metadata={"help": "Tokens per sequence."})
    dtype: str = field(default="float32", metadata={"help": "float32 or bfloat16."})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda."})
    steps: int = field(default=5, metadata={"help": "Timed training steps (the median is reported)."})
    warmup: int = field(default=1, metadata={"help": "Untimed steps first."})
    output_dir: str = field(default="outputs/benchmark", metadata={"help": "Where results.json and results.md go."})
    worker: bool = field(default=False, metadata={"help": "Internal: measure settings[0] and print JSON."})


def machine_description(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"


def run_in_subprocess(args: BenchmarkArguments, setting: str) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--settings",
        setting,
        "--model",
        args.model,
        "--batch_size",
        str(args.batch_size),
        "--seq_len",
        str(args.seq_len),
        "--dtype",
        args.dtype,
        "--device",
        args.device,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"Setting {setting} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def markdown_table(rows: list[dict], full: dict) -> str:
    lines = [
        "| setting | saved activations (MiB) | vs full | vs ideal | peak memory (MiB) | vs full | step (s) | vs full |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        r = row["selected_fraction"]
        ideal = r * full["saved_activation_bytes"] + (1 - r) * row["keys_values_bytes"]
        vs_ideal = f"{row['saved_activation_bytes'] / ideal:.3f}" if r < 1 else "-"
        lines.append(
            f"| {row['setting']} | {row['saved_activation_bytes'] / MIB:.1f} "
            f"| {row['saved_activation_bytes'] / full['saved_activation_bytes']:.3f} | {vs_ideal} "
            f"| {row['peak_memory_bytes'] / MIB:.0f} | {row['peak_memory_bytes'] / full['peak_memory_bytes']:.3f} "
            f"| {row['step_seconds']:.3f} | {row['step_seconds'] / full['step_seconds']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    if args.worker:
        with tempfile.TemporaryDirectory() as staging:
            result = measure(
                args.model,
                args.settings[0],
                args.batch_size,
                args.seq_len,
                args.dtype,
                args.device,
                args.steps,
                args.warmup,
                checkpoint_dir=staging,
            )
        print(json.dumps(result.to_dict()))
        return
    settings = args.settings if "full" in args.settings else ["full", *args.settings]
    rows = []
    for setting in settings:
        rows.append(run_in_subprocess(args, setting))
        print(
            f"{setting}: {rows[-1]['saved_activation_bytes'] / MIB:.1f} MiB saved, "
            f"{rows[-1]['step_seconds']:.3f} s/step",
            flush=True,
        )
    full = next(row for row in rows if row["setting"] == "full")
    machine = machine_description(args.device)
    header = (
        f"Model {args.model}, batch {args.batch_size} x {args.seq_len} tokens, {args.dtype}, {args.device}; "
        f"machine: {machine}."
    )
    table = markdown_table(rows, full)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.md"), "w") as handle:
        handle.write(f"{header}\n\n{table}\n")
    with open(os.path.join(args.output_dir, "results.json"), "w") as handle:
        json.dump({"arguments": vars(args), "machine": machine, "results": rows}, handle, indent=2)
    print(f"\n{header}\n\n{table}")


if __name__ == "__main__":
    main()
