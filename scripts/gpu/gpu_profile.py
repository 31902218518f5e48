"""Where a training step's time and memory go, setting by setting (the GPU benchmark's settings and models).

For each setting: the memory held before its model is built, after its steps and after it is freed, the
peak of the steps and each step's time; for the settings named in ``--profile``, torch.profiler's operator
tables (self CPU and self CUDA time) and cProfile's top Python functions of one step. It found why the
single pass is slow on a GPU (docs/benchmarks.md, *GPU benchmark*).

    PYTHONPATH=src python -m scripts.gpu.gpu_profile --settings lora tokentune-0.3+lora+single-pass \\
        tokentune-0.3+lora+two-pass --profile tokentune-0.3+lora+single-pass

``--device cpu --model llama-tiny --dtype float32`` runs it on a CPU (no memory figures).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

from tokentune_peft import saved_activation_bytes

from scripts.benchmarks.common import random_batch, training_step
from scripts.gpu.gpu_benchmark import GIB, GpuBenchmarkArguments, build_model, free_memory, time_steps


def memory(device: torch.device, counter=torch.cuda.memory_allocated) -> str:
    """``counter`` (memory held, or its peak) on ``device`` in GiB, or "-" off CUDA.

    Example:
        >>> memory(torch.device("cpu"))
        '-'
    """
    return f"{counter(device) / GIB:.2f} GiB" if device.type == "cuda" else "-"


def profile_step(step, device: torch.device) -> str:
    """torch.profiler's operator tables and cProfile's top functions of one call of ``step``."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    tables = [profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)]
    if device.type == "cuda":
        averages = profiler.key_averages()
        tables.append(averages.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))
    python = cProfile.Profile()
    python.enable()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    python.disable()
    text = io.StringIO()
    pstats.Stats(python, stream=text).sort_stats("cumulative").print_stats(30)
    return "\n".join(tables + [text.getvalue()])


def run_setting(
    bench: GpuBenchmarkArguments, name: str, seq_len: int, meter: bool, profiled: bool, staging_dir: str
) -> None:
    """Build setting ``name``'s model (a 4-bit one's weights staged in ``staging_dir``), time its steps, print
    what it holds and, if ``profiled``, its profile; the model goes when this returns."""
    device = torch.device(bench.device)
    print(f"== {name}: held before build {memory(device)}", flush=True)
    model = build_model(bench, name, device, staging_dir)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batch = random_batch(model.config.vocab_size, 1, seq_len, "CAUSAL_LM", device)
    if meter:  # as gpu_benchmark measures: a saved-activations forward before the steps
        saved = saved_activation_bytes(model, lambda: model(**batch))
        print(f"saved {saved / GIB:.2f} GiB; held after the metered forward {memory(device)}", flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        training_step(model, batch, optimizer)

    times = time_steps(step, device, warmup=3, steps=5)
    peak = memory(device, torch.cuda.max_memory_allocated)
    print(f"step ms {[round(t * 1000, 1) for t in times]}; held after steps {memory(device)}, peak {peak}")
    if profiled:
        print(profile_step(step, device))


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m scripts.gpu.gpu_profile``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.2-1b")
    parser.add_argument("--settings", nargs="+", default=["lora", "tokentune-0.3+lora"], help="As gpu_benchmark's.")
    parser.add_argument("--profile", nargs="*", default=[], help="The settings to profile.")
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--switch_interval", type=float, default=None, help="sys.setswitchinterval, in seconds.")
    parser.add_argument("--meter", action="store_true", help="A saved-activations forward before the steps.")
    args = parser.parse_args(argv)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    bench = GpuBenchmarkArguments(model=args.model, device=args.device, dtype=args.dtype, settings=args.settings)
    with tempfile.TemporaryDirectory(prefix="gpu_profile_") as staging:
        for name in args.settings:
            run_setting(bench, name, args.seq_len, args.meter, name in args.profile, staging)
            free_memory(torch.device(args.device))
            print(f"held after free {memory(torch.device(args.device))}", flush=True)


if __name__ == "__main__":
    main()
