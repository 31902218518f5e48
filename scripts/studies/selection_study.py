"""Selection study: uniform, supervised, importance- and gradient-guided token selection at equal k.

On the quality study's two tasks (:mod:`scripts.studies.quality`), through ``tokentune-train``'s own
code:

* classification, MiniLM-L6 on Rotten Tomatoes, every weight trained: full fine-tuning, then each
  strategy at each ratio, several seeds; test accuracy. "supervised" is "uniform" here by
  construction (the only label sits on [CLS], which is always selected), so it is not rerun;
* supervised fine-tuning, SmolLM2-135M-Instruct + LoRA on chatterbot pairs: LoRA on every token,
  then each strategy at each ratio; held-out answer loss;
* step time: the strategies' training steps (forward and backward) timed on one batch of each task,
  interleaved round by round so that the machine's drift hits them alike.

It writes ``selection.md``, ``results.json`` and ``selection.png`` into ``output_dir``.

    python -m scripts.studies.selection_study --output_dir docs/selection
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from transformers import HfArgumentParser

from tokentune_peft.cli.plots import new_figure, save_figure
from tokentune_peft.cli.recipes import parse_recipe
from tokentune_peft.cli.train import load_datasets, load_model_and_tokenizer, make_collator, wrap_model
from tokentune_peft.config import DEFAULT_UNIFORM_SHARE
from tokentune_peft.selection.labels import IGNORE_INDEX, selected_targets

from scripts.common import CONFIG_DIR, command_line, machine_description, run_setting, write_report
from scripts.studies.common import FULL_LR, mean_std

STRATEGIES = ("uniform", "supervised", "importance", "gradient")
#: Strategies that differ on each task (SEQ_CLS: "supervised" is "uniform", "gradient" is "importance").
TASK_STRATEGIES = {"classification": ("uniform", "importance"), "sft": STRATEGIES}
CONFIGS = {
    "classification": "minilm_rotten_tomatoes_tokentune.yaml",
    "sft": "smollm2_chatterbot_lora_tokentune.yaml",
}
#: The SFT rate the study compares strategies at (pinned: the recipe's own rate follows the README).
SFT_LR = "5e-4"
QUICK_CONFIGS = {"classification": "tiny_bert_rotten_tomatoes.yaml", "sft": "smollm2_chatterbot_lora_tokentune.yaml"}


@dataclass
class SelectionStudyArguments:
    output_dir: str = field(default="docs/selection", metadata={"help": "Where selection.md, results.json go."})
    runs_dir: str = field(default="outputs/selection", metadata={"help": "Where each run's own outputs go."})
    ratios: list[float] = field(default_factory=lambda: [0.1, 0.3], metadata={"help": "Selection ratios."})
    tasks: list[str] = field(
        default_factory=lambda: ["classification", "sft"], metadata={"help": "Tasks to run: classification, sft."}
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Classification seeds."})
    sft_seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "SFT seeds."})
    classification_train_samples: int = field(default=2000, metadata={"help": "Training reviews per run."})
    sft_train_samples: int = field(default=512, metadata={"help": "Training prompt/answer pairs per run."})
    uniform_share: float | None = field(
        default=None, metadata={"help": "uniform_share of 'supervised' and 'importance' (None: the default, 0.2)."}
    )
    timing_rounds: int = field(default=10, metadata={"help": "Timed steps per strategy (interleaved rounds)."})
    timing_only: bool = field(
        default=False, metadata={"help": "Only time the strategies' steps (writes timing.md and timing.json)."}
    )
    quick: bool = field(default=False, metadata={"help": "Tiny random models and slices, for CI."})


def _common(task: str, args: SelectionStudyArguments) -> str:
    if args.quick:
        model = "--model_name tiny-llama " if task == "sft" else ""
        return f"{model}--max_steps 2 --train_samples 8 --eval_samples 8"
    if task == "classification":
        return f"--train_samples {args.classification_train_samples} --learning_rate {FULL_LR} --logging_steps 20"
    return f"--train_samples {args.sft_train_samples} --learning_rate {SFT_LR} --logging_steps 8"


def _config(task: str, quick: bool) -> str:
    return os.path.join(CONFIG_DIR, (QUICK_CONFIGS if quick else CONFIGS)[task])


def training_runs(task: str, args: SelectionStudyArguments) -> list[dict]:
    """The baseline without TokenTune, then every strategy at every ratio; one run per seed."""
    seeds = args.seeds if task == "classification" else args.sft_seeds
    settings = {"baseline": "--no_tokentune"}
    for ratio in args.ratios:
        for strategy in TASK_STRATEGIES[task]:
            options = f"--selection {strategy} --selection_ratio {ratio}"
            if strategy != "uniform" and args.uniform_share is not None:
                options += f" --uniform_share {args.uniform_share}"
            settings[f"{strategy} {ratio}"] = options
    runs = []
    for name, options in settings.items():
        for seed in seeds:
            output_dir = os.path.join(args.runs_dir, task, name.replace(" ", "_"), f"seed{seed}")
            overrides = f"{_common(task, args)} {options} --save_strategy no --seed {seed} --output_dir {output_dir}"
            runs.append(run_setting(name, seed, _config(task, args.quick), overrides.split()))
    return runs


def interleaved_step_times(task: str, args: SelectionStudyArguments, ratio: float) -> dict[str, dict[str, float]]:
    """Per strategy, on one batch of the task: the median seconds of a training forward + backward
    (``seconds``), and the share of selected positions whose loss term has a label
    (``labelled_share``, over every timed step's draw)."""
    recipe, training = parse_recipe(
        _config(task, args.quick),
        f"{_common(task, args)} --selection uniform --selection_ratio {ratio} --output_dir unused".split(),
    )
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(recipe)
    train = load_datasets(recipe, tokenizer)["train"]
    model = wrap_model(model, recipe, training.seed)
    model.train()
    collator = make_collator(recipe, tokenizer)
    rows = min(training.per_device_train_batch_size, len(train))
    batch = dict(collator([train[i] for i in range(rows)]))
    engine = model.base_model.tokentune_engine
    uniform = engine.selector
    share = DEFAULT_UNIFORM_SHARE if args.uniform_share is None else args.uniform_share
    selectors = {
        strategy: replace(uniform, strategy=strategy, uniform_share=0.0 if strategy == "uniform" else share)
        for strategy in TASK_STRATEGIES[task]
    }
    times: dict[str, list[float]] = {strategy: [] for strategy in selectors}
    labelled = dict.fromkeys(selectors, 0)
    selected = dict.fromkeys(selectors, 0)
    for _ in range(args.timing_rounds + 1):  # the first round warms up and is dropped
        for strategy, selector in selectors.items():
            engine.selector = selector
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            output = model(**batch)
            output.loss.backward()
            times[strategy].append(time.perf_counter() - start)
            targets = selected_targets(recipe.task_type, batch["labels"], output.selected_positions)
            labelled[strategy] += int((targets != IGNORE_INDEX).sum())
            selected[strategy] += int((output.selected_positions >= 0).sum())
    engine.selector = uniform
    return {
        strategy: {
            "seconds": statistics.median(times[strategy][1:]),
            "labelled_share": labelled[strategy] / selected[strategy],
        }
        for strategy in selectors
    }


def summarise(task: str, runs: list[dict], args: SelectionStudyArguments, timings: dict) -> list[dict]:
    """One row per setting: metric mean and spread, share of the uniform-to-baseline gap closed, timing."""
    metric = "test_accuracy" if task == "classification" else "test_loss"
    by_setting: dict[str, list[dict]] = {}
    for run in runs:
        by_setting.setdefault(run["setting"], []).append(run)
    baseline = mean_std([r["results"]["after"][metric] for r in by_setting["baseline"]])[0]
    rows = []
    for name, mine in by_setting.items():
        values = [r["results"]["after"][metric] for r in mine]
        mean, std = mean_std(values)
        row = {
            "setting": name,
            "mean": mean,
            "std": std,
            "values": values,
            "seconds_per_step": statistics.mean(r["results"]["seconds_per_step"] for r in mine),
            "activation_mib": mine[0]["results"]["activation_memory"]["step_mib"],
        }
        if name != "baseline":
            strategy, ratio = name.split()
            uniform = statistics.mean(r["results"]["after"][metric] for r in by_setting[f"uniform {ratio}"])
            gap = baseline - uniform
            row["gap_closed"] = (mean - uniform) / gap if gap else None
            step = timings[ratio]
            row["timed_step_seconds"] = step[strategy]["seconds"]
            row["timed_overhead"] = step[strategy]["seconds"] / step["uniform"]["seconds"] - 1
            row["labelled_share"] = step[strategy]["labelled_share"]
        rows.append(row)
    return rows


def markdown_table(task: str, rows: list[dict]) -> str:
    name = "test accuracy (%)" if task == "classification" else "held-out answer loss"
    scale = 100 if task == "classification" else 1
    digits = 2 if task == "classification" else 4
    lines = [
        f"| setting | {name} | per seed | gap to baseline closed | step time, timed (s) | vs uniform "
        "| selected positions with a loss term | s/step in the run | activation MiB |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        values = ", ".join(f"{scale * v:.{digits}f}" for v in row["values"])
        closed = "" if row.get("gap_closed") is None else f"{100 * row['gap_closed']:.0f}%"
        timed = "" if "timed_step_seconds" not in row else f"{row['timed_step_seconds']:.3f}"
        overhead = "" if "timed_overhead" not in row else f"{100 * row['timed_overhead']:+.1f}%"
        labelled = "" if "labelled_share" not in row else f"{100 * row['labelled_share']:.0f}%"
        lines.append(
            f"| {row['setting']} | {scale * row['mean']:.{digits}f} ± {scale * row['std']:.{digits}f} | {values} "
            f"| {closed} | {timed} | {overhead} | {labelled} | {row['seconds_per_step']:.3f} "
            f"| {row['activation_mib']:.1f} |"
        )
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], ratios: list[float], path: str, caption: str) -> None:
    figure, axes = new_figure(columns=len(results), width=5.5, height=4.2)
    titles = {"classification": "MiniLM-L6, Rotten Tomatoes", "sft": "SmolLM2-135M + LoRA, chatterbot SFT"}
    labels = {"classification": "test accuracy (%)", "sft": "held-out answer loss"}
    for axis, (task, rows) in zip(axes, results.items(), strict=True):
        scale = 100 if task == "classification" else 1
        by_name = {row["setting"]: row for row in rows}
        for strategy in TASK_STRATEGIES[task]:
            points = [by_name[f"{strategy} {ratio}"] for ratio in ratios]
            axis.errorbar(
                ratios,
                [scale * p["mean"] for p in points],
                yerr=[scale * p["std"] for p in points],
                marker="o",
                capsize=4,
                label=strategy,
                color=f"C{STRATEGIES.index(strategy)}",
            )
        baseline_name = "full fine-tuning" if task == "classification" else "LoRA, every token"
        axis.axhline(scale * by_name["baseline"]["mean"], color="black", linestyle="--", label=baseline_name)
        axis.set_xlabel("selection ratio")
        axis.set_ylabel(labels[task])
        axis.set_title(titles[task], fontsize=9)
        axis.set_xticks(ratios)
        axis.legend(fontsize=8)
    save_figure(figure, path, caption)


def write_timing_report(args: SelectionStudyArguments, argv: list[str] | None) -> None:
    """Time every strategy against uniform on each task and ratio; write timing.md and timing.json."""
    start = time.perf_counter()
    timings = {
        task: {str(ratio): interleaved_step_times(task, args, ratio) for ratio in args.ratios} for task in args.tasks
    }
    lines = [
        "| task | ratio | selection | step time, timed (s) | vs uniform | selected positions with a loss term |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for task, by_ratio in timings.items():
        for ratio, steps in by_ratio.items():
            for strategy, step in steps.items():
                overhead = step["seconds"] / steps["uniform"]["seconds"] - 1
                lines.append(
                    f"| {task} | {ratio} | {strategy} | {step['seconds']:.3f} | {100 * overhead:+.1f}% "
                    f"| {100 * step['labelled_share']:.0f}% |"
                )
    command = command_line(__spec__.name, argv)
    machine = machine_description("cpu")
    minutes = (time.perf_counter() - start) / 60
    header = [
        "# Step time of the selection strategies",
        "",
        f"Command: `{command}`. Machine: {machine}. Total time: {minutes:.1f} minutes. Median of "
        f"{args.timing_rounds} interleaved rounds of one training forward + backward on one batch.",
        "",
    ]
    data = {"arguments": asdict(args), "machine": machine, "timings": timings}
    write_report(args.output_dir, "timing.md", "\n".join(header + lines) + "\n", "timing.json", data)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m scripts.studies.selection_study``."""
    (args,) = HfArgumentParser(SelectionStudyArguments).parse_args_into_dataclasses(args=argv)
    start = time.perf_counter()
    unknown = sorted(set(args.tasks) - set(CONFIGS))
    if unknown:
        raise ValueError(f"Unknown `tasks` {unknown}; choose among {sorted(CONFIGS)}.")
    if args.timing_only:
        return write_timing_report(args, argv)
    tables, results, runs = {}, {}, {}
    for task in args.tasks:
        timings = {str(ratio): interleaved_step_times(task, args, ratio) for ratio in args.ratios}
        runs[task] = training_runs(task, args)
        results[task] = summarise(task, runs[task], args, timings)
        tables[task] = markdown_table(task, results[task])
    minutes = (time.perf_counter() - start) / 60
    machine = machine_description("cpu")
    os.makedirs(args.output_dir, exist_ok=True)
    plot(results, args.ratios, os.path.join(args.output_dir, "selection.png"), machine)
    command = command_line(__spec__.name, argv)
    headings = {
        "classification": f"## Classification: MiniLM-L6 on Rotten Tomatoes, all weights "
        f"({args.classification_train_samples} reviews, one epoch; seeds {args.seeds}); baseline: full fine-tuning",
        "sft": f"## SFT: SmolLM2-135M-Instruct + LoRA on chatterbot ({args.sft_train_samples} pairs, one epoch; "
        f"seeds {args.sft_seeds}); baseline: LoRA on every token",
    }
    lines = ["# Token selection strategies at equal k", ""]
    lines.append(f"Command: `{command}`. Machine: {machine}. Total time: {minutes:.1f} minutes.")
    for task in args.tasks:
        lines += ["", headings[task], "", tables[task]]
    report = "\n".join(lines + ["", "![strategies](selection.png)", ""])
    data = {"arguments": asdict(args), "machine": machine, "minutes": minutes, "summary": results, "runs": runs}
    write_report(args.output_dir, "selection.md", report, "results.json", data)


if __name__ == "__main__":
    main()
