"""Step time of full fine-tuning and of TokenTune's two engines, side by side in one process.

One model (random weights, seed 0) serves all three settings: the stock model for full fine-tuning
(TokenTune's attention is the stock one when no step runs), and the TokenTune wrapper with its engine
set to "two-pass" or "single-pass". The settings run round-robin, so a busy machine slows them alike;
the medians, the spread and the ratios to full fine-tuning go to a Markdown table and a JSON file.

    python -m scripts.benchmarks.engine_benchmark --model llama-1024 --batch_size 4 --seq_len 512 --rounds 3
    python -m scripts.benchmarks.engine_benchmark --model llama-256 --vocab_size 1000 --optimizer sgd --rounds 7
    python -m scripts.benchmarks.engine_benchmark --model minilm --batch_size 32 --seq_len 64 --rounds 15 --profile

``--model minilm`` is the main job's model (all-MiniLM-L6-v2, offline, with a new two-label classification
head; dropout 0.1 as it trains), ``bert-minilm`` a BERT of its shape with random weights. ``--profile`` adds,
per setting, the operators that took the most time in one more step (``torch.profiler``, self CPU time).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from peft import get_peft_model
from torch.profiler import ProfilerActivity, profile
from transformers import BertConfig, BertForSequenceClassification, HfArgumentParser, LlamaForCausalLM

from tokentune_peft import TokenTuneConfig
from tokentune_peft.engine_choice import Engine

from scripts.benchmarks.common import random_batch
from scripts.benchmarks.shapes import LLAMA_SHAPES, MINILM_SIZES, llama_config
from scripts.common import machine_description, write_report

SETTINGS = ("full", "two-pass", "single-pass")
BERT_MODELS = ("minilm", "bert-minilm")
OPTIMIZERS = ("none", "sgd", "adamw")


@dataclass
class EngineBenchmarkArguments:
    model: str = field(default="llama-1024", metadata={"help": f"One of {(*LLAMA_SHAPES, *BERT_MODELS)}."})
    vocab_size: int | None = field(default=None, metadata={"help": "Override a Llama config's vocabulary size."})
    kv_heads: int | None = field(
        default=None, metadata={"help": "Override a Llama config's key/value heads (its attention heads: MHA)."}
    )
    dropout: float | None = field(
        default=None, metadata={"help": "Override the model's dropout probabilities (hidden and attention)."}
    )
    batch_size: int = field(default=4, metadata={"help": "Sequences per batch."})
    seq_len: int = field(default=512, metadata={"help": "Tokens per sequence."})
    ratio: float = field(default=0.3, metadata={"help": "TokenTune selection ratio."})
    rounds: int = field(default=3, metadata={"help": "Timed rounds; each round times every setting once."})
    warmup: int = field(default=1, metadata={"help": "Untimed rounds first."})
    optimizer: str = field(default="none", metadata={"help": f"One of {OPTIMIZERS} ('none': forward + backward)."})
    threads: int = field(default=2, metadata={"help": "torch intra-op threads."})
    profile: bool = field(default=False, metadata={"help": "Profile one more step per setting."})
    output_dir: str = field(default="outputs/engine_benchmark", metadata={"help": "Where results go."})

    def __post_init__(self):
        if self.model not in (*LLAMA_SHAPES, *BERT_MODELS):
            raise ValueError(f"`model` must be one of {(*LLAMA_SHAPES, *BERT_MODELS)}; got {self.model!r}.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"`optimizer` must be one of {OPTIMIZERS}; got {self.optimizer!r}.")


def build_model(args: EngineBenchmarkArguments) -> tuple[torch.nn.Module, str]:
    """The stock model (seed 0) in the attention TokenTune runs on, and its task type."""
    torch.manual_seed(0)
    if args.model in LLAMA_SHAPES:
        overrides = {} if args.vocab_size is None else {"vocab_size": args.vocab_size}
        if args.kv_heads is not None:
            overrides["num_key_value_heads"] = args.kv_heads
        if args.dropout is not None:
            overrides["attention_dropout"] = args.dropout
        return LlamaForCausalLM(llama_config(args.model, **overrides, attn_implementation="sdpa")), "CAUSAL_LM"
    dropout = {} if args.dropout is None else {"hidden_dropout_prob": args.dropout}
    if args.dropout is not None:
        dropout["attention_probs_dropout_prob"] = args.dropout
    if args.model == "minilm":
        from tokentune_peft.cli.offline import minilm_path

        model = BertForSequenceClassification.from_pretrained(
            minilm_path(), num_labels=2, attn_implementation="sdpa", **dropout
        )
    else:
        config = BertConfig(**MINILM_SIZES, num_labels=2, attn_implementation="sdpa", **dropout)
        model = BertForSequenceClassification(config)
    return model, "SEQ_CLS"


def profile_table(step, setting: str, rows: int = 20) -> str:
    """The operators of one more step of ``setting`` that took the most self CPU time."""
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        step(setting)
    table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return f"### {setting}\n\n```\n{table}\n```\n"


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(EngineBenchmarkArguments).parse_args_into_dataclasses(args=argv)
    torch.set_num_threads(args.threads)
    stock, task_type = build_model(args)
    config = stock.config
    model = get_peft_model(stock, TokenTuneConfig(selection_ratio=args.ratio, task_type=task_type)).train()
    engine = model.base_model.tokentune_engine
    batch = random_batch(config.vocab_size, args.batch_size, args.seq_len, task_type, torch.device("cpu"))
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = None
    if args.optimizer != "none":
        optimizer = (torch.optim.SGD if args.optimizer == "sgd" else torch.optim.AdamW)(parameters, lr=1e-6)

    def step(setting: str) -> float:
        start = time.perf_counter()
        if setting == "full":
            loss = stock(**batch).loss
        else:
            engine.choice.asked = Engine(setting)
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
    kv_heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
    dropout = getattr(config, "hidden_dropout_prob", getattr(config, "attention_dropout", 0.0))
    lines = [
        f"{args.model} (hidden {config.hidden_size}, {config.num_hidden_layers} layers, {config.num_attention_heads} "
        f"heads, {kv_heads} key/value heads, vocabulary {vocabulary}, dropout {dropout:g}), "
        f"batch {args.batch_size} x {args.seq_len}, fp32, "
        f"forward + backward{f' + {args.optimizer} step' if optimizer is not None else ''}, {args.rounds} round-robin "
        f"rounds; {machine}.",
        "",
        "| setting | median step (s) | min - max (s) | vs full | vs full, per round: min - max |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {row['setting']} | {row['median_s']:.3f} | {row['min_s']:.3f} - {row['max_s']:.3f} | {row['vs_full']:.3f} "
        f"| {min(row['vs_full_per_round']):.3f} - {max(row['vs_full_per_round']):.3f} |"
        for row in rows
    ]
    report = "\n".join(lines) + "\n"
    name = f"{args.model}-v{vocabulary}" + ("" if args.kv_heads is None else f"-kv{args.kv_heads}")
    name += ("" if args.dropout is None else f"-dropout{args.dropout:g}") + (
        "" if optimizer is None else f"-{args.optimizer}"
    )
    results = {"arguments": asdict(args), "machine": machine, "results": rows}
    write_report(args.output_dir, f"{name}.md", report, f"{name}.json", results)
    if args.profile:
        with open(os.path.join(args.output_dir, f"{name}-profile.md"), "w") as handle:
            handle.write("\n".join(profile_table(step, setting) for setting in SETTINGS))
    return results


if __name__ == "__main__":
    main()
