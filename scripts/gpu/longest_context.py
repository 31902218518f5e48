"""The longest sequence each setting trains within a fixed memory cap (the Llama-3.2-1B shape, batch 1).

Each setting runs in a process of its own (its peak is its own), capped with
``torch.cuda.set_per_process_memory_fraction`` at ``--cap_gib``. From ``--start`` tokens the length doubles while
a training step (forward, backward, AdamW) fits, then the gap between the last length that fits and the first
that does not is halved down to ``--granularity`` tokens. Settings are named as in
:mod:`scripts.gpu.gpu_benchmark` (``+gc`` gradient checkpointing, ``+liger`` Liger-Kernel's fused linear
cross-entropy, skipped where it is not installed).

    PYTHONPATH=src python -m scripts.gpu.longest_context --output_dir docs/benchmarks/gpu-longest-context

``--device cpu --smoke`` runs the search on a tiny config with no cap, up to ``--max_seq_len`` (the tests run it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser

from scripts.benchmarks.common import random_batch, training_step
from scripts.common import machine_description, write_report
from scripts.gpu.gpu_benchmark import LIGER, GpuBenchmarkArguments, build_model, free_memory, liger_unavailable

GIB = 2**30
LONGEST_CONTEXT_SETTINGS = ["lora+gc" + LIGER, "tokentune-0.3+lora+gc", "tokentune-0.1+lora+gc"]


@dataclass
class LongestContextArguments(GpuBenchmarkArguments):
    settings: list[str] = field(
        default_factory=lambda: list(LONGEST_CONTEXT_SETTINGS), metadata={"help": "Settings, as in gpu_benchmark."}
    )
    cap_gib: float = field(default=24.0, metadata={"help": "The memory cap of each setting's process, in GiB."})
    start: int = field(default=4096, metadata={"help": "The first length tried."})
    granularity: int = field(default=1024, metadata={"help": "The search stops when the gap is this small."})
    max_seq_len: int = field(default=262144, metadata={"help": "The longest length tried."})
    one: str | None = field(default=None, metadata={"help": "Internal: search one setting in this process."})

    def __post_init__(self):
        super().__post_init__()
        if self.smoke:
            self.settings = [name.removesuffix(LIGER) for name in LONGEST_CONTEXT_SETTINGS]
            self.start, self.granularity, self.max_seq_len = 32, 32, 256


def fits(model, optimizer, seq_len: int, device: torch.device) -> bool:
    """Whether one training step at ``seq_len`` tokens runs within the device's memory (its cap)."""
    try:
        training_step(model, random_batch(model.config.vocab_size, 1, seq_len, "CAUSAL_LM", device), optimizer)
        return True
    except torch.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        return False
    finally:
        free_memory(device)


def longest(args: LongestContextArguments, trains) -> tuple[int, int | None]:
    """The longest length that ``trains(seq_len)`` accepts, to ``args.granularity``, and the first refused one.

    Example:
        >>> args = LongestContextArguments(device="cpu", smoke=True)
        >>> longest(args, lambda seq_len: seq_len <= 100)
        (96, 128)
    """
    good, bad = 0, None
    seq_len = args.start
    while seq_len <= args.max_seq_len and trains(seq_len):
        good, seq_len = seq_len, seq_len * 2
    if seq_len <= args.max_seq_len:
        bad = seq_len
    while bad is not None and bad - good > args.granularity:
        middle = (good + bad) // 2 // args.granularity * args.granularity
        if trains(middle):
            good = middle
        else:
            bad = middle
    return good, bad


def search_one(args: LongestContextArguments) -> dict:
    """The search for setting ``args.one``, in this process."""
    device = torch.device(args.device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * GIB / total), device)
    model = build_model(args, args.one, device, staging_dir="")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    good, bad = longest(args, lambda seq_len: fits(model, optimizer, seq_len, device))
    return {"setting": args.one, "longest_seq_len": good, "first_refused_seq_len": bad}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    (args,) = HfArgumentParser(LongestContextArguments).parse_args_into_dataclasses(argv)
    if args.one is not None:
        print(json.dumps(search_one(args)))
        return
    rows = []
    for name in args.settings:
        if name.endswith(LIGER) and liger_unavailable(torch.device(args.device)):
            name = name.removesuffix(LIGER)  # the same search, with the stock loss
        command = [sys.executable, "-m", "scripts.gpu.longest_context", *argv, "--one", name]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            rows.append({"setting": name, "error": done.stderr.strip().splitlines()[-1:]})
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    cap = "no cap (CPU smoke run)" if args.device == "cpu" else f"{args.cap_gib:g} GiB"
    lines = [
        f"Longest sequence that trains: {args.model}, batch 1, {args.dtype}, memory cap {cap}; "
        f"{machine_description(args.device)}.",
        "",
        "| setting | longest (tokens) | first refused |",
        "|---|---:|---:|",
    ]
    for row in rows:
        longest_cell = row.get("longest_seq_len", row.get("error"))
        lines.append(f"| {row['setting']} | {longest_cell} | {row.get('first_refused_seq_len')} |")
    write_report(args.output_dir, "results.md", "\n".join(lines) + "\n", "results.json", {"results": rows})


if __name__ == "__main__":
    main()
