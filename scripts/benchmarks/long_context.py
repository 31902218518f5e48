"""Long sequences: one training step's peak memory, saved activations and time against the sequence length.

Each (setting, length) runs in a fresh process: a small Llama (``llama-tiny``: hidden 64, 2 layers, 4 heads, sdpa,
random weights), batch 1, no padding, one warm-up step, then one timed step. Peak memory is the growth of the
process's peak resident set over the built model (``ru_maxrss``) across both steps, so it counts every allocation
of a step, masks and temporaries included, not only what autograd keeps.

Run from the repository root (a sweep of a few minutes on 2 cores; ``--lengths`` and ``--settings`` narrow it):

    python -m scripts.benchmarks.long_context --output_dir docs/benchmarks/long-context

It writes ``results.json`` and plots of peak memory and step time against the length. Settings: ``stock``,
``lora``, ``tokentune-R-ENGINE`` (R the ratio, ENGINE ``single`` or ``two``), each optionally ``+lora`` and
``+checkpointing``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
SETTINGS = (
    "stock",
    "lora",
    "tokentune-0.3-single",
    "tokentune-0.3-two",
    "tokentune-0.1-single",
    "tokentune-0.1-two",
    "stock+checkpointing",
    "tokentune-0.3-single+checkpointing",
    "tokentune-0.3-two+checkpointing",
)
MIB = 2**20


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def measure(setting: str, seq_len: int) -> dict:
    """One setting at one length, in this process: peak memory growth, saved activations, step seconds."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from tokentune_peft import SavedTensorMeter, TokenTuneConfig
    from tokentune_peft.cli.model_configs import LLAMA_SIZES

    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA_SIZES["llama-tiny"], max_position_embeddings=seq_len, attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    name, *options = setting.split("+")
    lora = LoraConfig(r=8, target_modules="all-linear") if "lora" in options or name == "lora" else None
    if name.startswith("tokentune"):
        _, ratio, engine = name.split("-")
        tokentune = TokenTuneConfig(
            task_type="CAUSAL_LM", selection_ratio=float(ratio), engine=f"{engine}-pass", peft_config=lora
        )
        model = get_peft_model(model, tokentune)
    elif lora is not None:
        model = get_peft_model(model, lora)
    if "checkpointing" in options:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    input_ids = torch.randint(0, config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(1))

    def step() -> None:
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        model.zero_grad(set_to_none=True)

    built = _peak_rss_bytes()
    step()  # warm-up: the first step of a single pass counts the attention calls
    start = time.perf_counter()
    with SavedTensorMeter(model) as meter:
        step()
    seconds = time.perf_counter() - start
    return {
        "setting": setting,
        "seq_len": seq_len,
        "peak_growth_mib": (_peak_rss_bytes() - built) / MIB,
        "saved_activation_mib": meter.saved_bytes / MIB,
        "step_seconds": seconds,
        "engine": getattr(getattr(getattr(model, "base_model", None), "tokentune_engine", None), "engine_used", None),
    }


def run_in_fresh_process(setting: str, seq_len: int) -> dict:
    command = [sys.executable, "-m", "scripts.benchmarks.long_context", "--one", setting, str(seq_len)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], output_dir: str) -> None:
    from tokentune_peft.cli.plots import new_figure, save_figure

    for key, label in (("peak_growth_mib", "peak memory growth of one step (MiB)"), ("step_seconds", "step (s)")):
        figure, (axes,) = new_figure()
        for setting in dict.fromkeys(row["setting"] for row in rows):
            points = sorted((row["seq_len"], row[key]) for row in rows if row["setting"] == setting)
            axes.plot(*zip(*points, strict=True), marker="o", label=setting)
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xlabel("tokens (batch 1)")
        axes.set_ylabel(label)
        axes.legend(fontsize=7)
        save_figure(figure, os.path.join(output_dir, f"{key}.png"), f"llama-tiny, one training step: {label}")


def markdown_table(rows: list[dict]) -> str:
    """The results as a markdown table, one row per length and setting."""
    lines = [
        "| tokens | setting | peak growth (MiB) | vs stock | saved activations (MiB) | step (s) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['seq_len']:,} | {row['setting']} | {row['peak_growth_mib']:.1f} "
            f"| {row.get('peak_vs_stock', 1):.3f} | {row['saved_activation_mib']:.1f} | {row['step_seconds']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--output_dir", default=None, help="Where results.json and the plots go (none: print only).")
    parser.add_argument("--one", nargs=2, metavar=("SETTING", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]))))
        return
    rows = []
    for seq_len in args.lengths:
        for setting in args.settings:
            row = run_in_fresh_process(setting, seq_len)
            stock = next((r for r in rows if r["setting"] == "stock" and r["seq_len"] == seq_len), None)
            if stock is not None:
                row["peak_vs_stock"] = row["peak_growth_mib"] / stock["peak_growth_mib"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "results.json"), "w") as handle:
            json.dump(rows, handle, indent=1)
        plot(rows, args.output_dir)
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
