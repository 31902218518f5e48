"""End to end: the Trainer's seconds per optimizer step, and tokens per second, of a recipe with TokenTune
against the same recipe without it, in one process.

Each round trains every setting for ``--steps`` optimizer steps through ``tokentune-train``'s code (the
Trainer TokenTune uses, data collation, the optimizer and the scheduler included), the settings one after
the other, so a machine that slows down slows them alike. A callback times every optimizer step (from the
Trainer's ``on_step_begin`` to its ``on_step_end``) and counts the input tokens it saw (padding included: the
parser of recipes reads this Trainer field as a boolean, so ``non_padding`` cannot be asked for); the first
``--warmup_steps`` of each run are left out. Evaluation, saving and the activation probe after training are
outside the timed steps.

    python -m scripts.benchmarks.trainer_benchmark --config configs/minilm_rotten_tomatoes_tokentune.yaml \
        --steps 40 --rounds 3 --output_dir docs/benchmarks/trainer
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field

from transformers import HfArgumentParser, TrainerCallback

from scripts.common import CONFIG_DIR, machine_description, run_setting, write_report


@dataclass
class TrainerBenchmarkArguments:
    config: str = field(
        default=os.path.join(CONFIG_DIR, "minilm_rotten_tomatoes_tokentune.yaml"),
        metadata={"help": "The recipe; its TokenTune settings are the TokenTune setting's."},
    )
    ratios: list[float] = field(default_factory=lambda: [0.3], metadata={"help": "TokenTune selection ratios."})
    steps: int = field(default=40, metadata={"help": "Optimizer steps per run."})
    warmup_steps: int = field(default=5, metadata={"help": "Steps of each run left out of the timing."})
    rounds: int = field(default=3, metadata={"help": "Rounds; each trains every setting once."})
    overrides: list[str] = field(
        default_factory=list, metadata={"help": "Extra recipe fields for every setting, as '--name value' pairs."}
    )
    output_dir: str = field(default="outputs/trainer_benchmark", metadata={"help": "Where results go."})

    def __post_init__(self):
        if self.warmup_steps >= self.steps:
            raise ValueError(f"`warmup_steps` ({self.warmup_steps}) must be below `steps` ({self.steps}).")
        if self.rounds < 1:
            raise ValueError(f"`rounds` must be at least 1; got {self.rounds}.")


class StepTimes(TrainerCallback):
    """Seconds and input tokens of every optimizer step.

    Example:
        >>> StepTimes().seconds
        []
    """

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.tokens: list[int] = []
        self._start = 0.0
        self._tokens_before = 0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()
        self._tokens_before = state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)
        self.tokens.append(state.num_input_tokens_seen - self._tokens_before)


def settings(ratios: list[float]) -> dict[str, list[str]]:
    """Each setting's recipe overrides: full fine-tuning, then TokenTune at each ratio.

    Example:
        >>> settings([0.3])["TokenTune 0.3"]
        ['--tokentune', 'true', '--selection_ratio', '0.3']
    """
    named = {"full fine-tuning": ["--tokentune", "false"]}
    for ratio in ratios:
        named[f"TokenTune {ratio:g}"] = ["--tokentune", "true", "--selection_ratio", str(ratio)]
    return named


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(TrainerBenchmarkArguments).parse_args_into_dataclasses(args=argv)
    named = settings(args.ratios)
    times = {name: StepTimes() for name in named}
    common = [
        "--max_steps", str(args.steps), "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "1000",
        "--include_num_input_tokens_seen", "true", "--report_to", "none", *args.overrides,
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            for name, overrides in named.items():
                run = StepTimes()
                output_dir = os.path.join(scratch, f"{round_index}-{len(times[name].seconds)}")
                run_setting(name, 0, args.config, [*common, *overrides, "--output_dir", output_dir], curve=run)
                times[name].seconds += run.seconds[args.warmup_steps :]
                times[name].tokens += run.tokens[args.warmup_steps :]
                print(f"round {round_index}: {name} {statistics.median(run.seconds[args.warmup_steps :]):.3f} s/step")
    full = statistics.median(times["full fine-tuning"].seconds)
    rows = []
    for name, measured in times.items():
        median = statistics.median(measured.seconds)
        rows.append(
            {
                "setting": name,
                "seconds_per_step": median,
                "vs_full": median / full,
                "tokens_per_second": sum(measured.tokens) / sum(measured.seconds),
                "steps_timed": len(measured.seconds),
                "all_seconds": measured.seconds,
            }
        )
    machine = machine_description("cpu")
    lines = [
        f"Recipe `{os.path.relpath(args.config)}`{' with ' + ' '.join(args.overrides) if args.overrides else ''}: "
        f"{args.rounds} rounds of {args.steps} optimizer steps per setting, the first {args.warmup_steps} of each run "
        f"left out; the Trainer's seconds per step (median) and input tokens per second (padding included); {machine}.",
        "",
        "| setting | seconds per step | vs full | tokens per second | steps timed |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {row['setting']} | {row['seconds_per_step']:.3f} | {row['vs_full']:.3f} | {row['tokens_per_second']:.0f} "
        f"| {row['steps_timed']} |"
        for row in rows
    ]
    results = {"arguments": asdict(args), "machine": machine, "results": rows}
    write_report(args.output_dir, "results.md", "\n".join(lines) + "\n", "results.json", results)
    return results


if __name__ == "__main__":
    main()
