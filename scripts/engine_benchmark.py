"""Step time of full fine-tuning and of TokenTune's two engines, side by side in one process.

One model (random weights, seed 0) serves all three settings: the stock model for full fine-tuning
(TokenTune's attention is the stock one when no step runs), and the TokenTune wrapper with its engine
set to "two-pass" or "single-pass". The settings run round-robin, so a busy machine slows them alike;
the medians, the spread and the ratios to full fine-tuning go to a Markdown table and a JSON file.

    python scripts/engine_benchmark.py --model llama-1024 --batch_size 4 --seq_len 512 --rounds 3
    python scripts/engine_benchmark.py --model llama-256 --vocab_size 1000 --optimizer sgd --rounds 7
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from peft import get_peft_model
from transformers import HfArgumentParser, LlamaForCausalLM

from tokentune_peft import TokenTuneConfig
from tokentune_peft.cli.model_configs import LLAMA_SIZES, llama_config

from study_utils import machine_description

SETTINGS = ("full", "two-pass", "single-pass")


@dataclass
class EngineBenchmarkArguments:
    model: str = field(default="llama-1024", metadata={"help": f"A named config: {tuple(LLAMA_SIZES)}."})
    vocab_size: int | None = field(default=None, metadata={"help": "Override the config's vocabulary size."})
    batch_size: int = field(default=4, metadata={"help": "Sequences per batch."})
    seq_len: int = field(default=512, metadata={"help": "Tokens per sequence."})
    ratio: float = field(default=0.3, metadata={"help": "TokenTune selection ratio."})
    rounds: int = field(default=3, metadata={"help": "Timed rounds; each round times every setting once."})
    warmup: int = field(default=1, metadata={"help": "Untimed rounds first."})
    optimizer: str = field(default="none", metadata={"help": "'none' (forward + backward only) or 'sgd'."})
    threads: int = field(default=2, metadata={"help": "torch intra-op threads."})
    output_dir: str = field(default="outputs/engine_benchmark", metadata={"help": "Where results go."})


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(EngineBenchmarkArguments).parse_args_into_dataclasses(args=argv)
    torch.set_num_threads(args.threads)
    overrides = {} if args.vocab_size is None else {"vocab_size": args.vocab_size}
    config = llama_config(args.model, **overrides, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = get_peft_model(
        LlamaForCausalLM(config), TokenTuneConfig(selection_ratio=args.ratio, task_type="CAUSAL_LM")
    ).train()
    stock = model.get_base_model()
    engine = model.base_model.tokentune_engine
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=1e-6) if args.optimizer == "sgd" else None

    def step(setting: str) -> float:
        start = time.perf_counter()
        if setting == "full":
            loss = stock(**batch).loss
        else:
            engine.engine = setting
            loss = model(**batch).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        for parameter in parameters:
            parameter.grad = None
        seconds = time.perf_counter() - start
        if setting != "full":
            assert engine.engine_used == setting, (setting, engine.engine_used)
        return seconds

    times = {setting: [] for setting in SETTINGS}
    for round_index in range(args.warmup + args.rounds):
        for setting in SETTINGS:
            seconds = step(setting)
            if round_index >= args.warmup:
                times[setting].append(seconds)
        print(f"round {round_index}: " + ", ".join(f"{s} {times[s][-1] if times[s] else 0:.2f}s" for s in SETTINGS))
    full = statistics.median(times["full"])
    rows = []
    for setting in SETTINGS:
        median = statistics.median(times[setting])
        paired = [seconds / base for seconds, base in zip(times[setting], times["full"], strict=True)]
        rows.append(
            {
                "setting": setting if setting == "full" else f"TokenTune {args.ratio} {setting}",
                "median_s": median,
                "min_s": min(times[setting]),
                "max_s": max(times[setting]),
                "vs_full": median / full,
                "vs_full_per_round": paired,
                "all_s": times[setting],
            }
        )
    machine = machine_description("cpu") + f", {args.threads} threads"
    vocabulary = config.vocab_size
    lines = [
        f"{args.model} (hidden {config.hidden_size}, {config.num_hidden_layers} layers, {config.num_attention_heads} "
        f"heads, vocabulary {vocabulary}), batch {args.batch_size} x {args.seq_len}, fp32, forward + backward"
        f"{' + SGD step' if optimizer is not None else ''}, {args.rounds} round-robin rounds; {machine}.",
        "",
        "| setting | median step (s) | min - max (s) | vs full | vs full, per round: min - max |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {row['setting']} | {row['median_s']:.3f} | {row['min_s']:.3f} - {row['max_s']:.3f} | {row['vs_full']:.3f} "
        f"| {min(row['vs_full_per_round']):.3f} - {max(row['vs_full_per_round']):.3f} |"
        for row in rows
    ]
    report = "\n".join(lines)
    print(report)
    os.makedirs(args.output_dir, exist_ok=True)
    name = f"{args.model}-v{vocabulary}"
    with open(os.path.join(args.output_dir, f"{name}.md"), "w") as handle:
        handle.write(report + "\n")
    results = {"arguments": asdict(args), "machine": machine, "results": rows}
    with open(os.path.join(args.output_dir, f"{name}.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
