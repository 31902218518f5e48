"""Quality study: where does TokenTune train as well as full fine-tuning and LoRA, at equal steps, time and
memory? Learning curves, a learning rate chosen per method on validation data, then several seeds.

* **classification**, MiniLM-L6 on Rotten Tomatoes (the whole training split by default), through
  ``tokentune-train``'s own code: full fine-tuning, TokenTune 0.1 / 0.3 / 0.5, LoRA, LoRA + TokenTune
  0.3, full fine-tuning with gradient checkpointing as the competitor at low activation memory, and
  TokenTune with dense top layers (``dense_top_layers`` 1 and 2), with gradient checkpointing and with
  ``selection="gradient"``.
  Validation accuracy is recorded every ``eval_steps`` steps against steps and training seconds; the
  test split is evaluated once, after training.
* **convergence**: the classification part's main methods (full fine-tuning, TokenTune 0.3, LoRA, LoRA +
  TokenTune 0.3) trained for ``convergence_epochs``, each at the learning rate the classification part
  chose for it: do the curves flatten, and does the gap close with more passes over the data?
* **supervised fine-tuning** through TRL's ``SFTTrainer``, SmolLM2-135M-Instruct on the chatterbot
  training pairs (a validation split carved from them): LoRA, LoRA + TokenTune 0.3 (uniform, supervised
  and gradient selection; supervised with 2 and 4 dense top layers, uniform with 2), QLoRA + TokenTune 0.3
  (uniform and gradient selection), and as competitors LoRA with gradient checkpointing and QLoRA alone;
  validation answer loss against steps and seconds, and the held-out (test) answer loss after training.
* **equal time** (``classification_equal_time``, ``sft_equal_time``): each method trains for the wall-clock of
  the reference's run (full fine-tuning's one classification epoch, LoRA's two SFT epochs), turned into a number
  of steps from median step seconds measured once, in a calibration sitting on a quiet machine, and kept in
  ``<output_dir>/step_seconds.json``: the steps, and the learning-rate schedule over them, do not depend on
  the noise of the sitting that trains. The reference's runs are its runs in the equal-steps part.

The report draws each part's frontier (test metric against activation memory and training time) and
checks the targets of issues 22 and 37. Activation memory is one training step on the training split's
longest batch, the same for every method of a part, measured once per method (a memory sitting, kept in
``<output_dir>/activation_memory.json``); a method without that measurement shows its runs' first batches.

For each method the learning rates of its grid are tried at ``grid_seed``; the one with the best final
validation metric is then run with the other seeds. Every finished run is written to
``<output_dir>/runs/`` and skipped when the study is run again, so a study cut short (``max_minutes``)
resumes where it stopped; the report is written from the runs that exist and lists those still missing.

    python -m scripts.studies.quality --max_minutes 60       # resumable; writes docs/quality.md and docs/quality/
    python -m scripts.studies.quality --sitting calibrate --parts sft_equal_time classification_equal_time
    python -m scripts.studies.quality --sitting memory        # the longest batch's activation memory, every method
    python -m scripts.studies.quality --quick --output_dir /tmp/quality --report_path /tmp/quality.md
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
from transformers import HfArgumentParser

from scripts.common import command_line, machine_description
from scripts.studies.quality_report import write_study_report
from scripts.studies.quality_runners import MEMORY_MEASURES, classification_run, convergence_run, sft_run


@dataclass(frozen=True)
class Method:
    """One way to train: its settings and the learning rates tried for it."""

    name: str
    settings: dict
    learning_rates: tuple[float, ...] = ()
    learning_rate_of: str | None = None  # use another method's chosen learning rate instead of a grid
    seeds: tuple[int, ...] | None = None  # the seeds run at the chosen rate; None: the study's ``seeds``


FULL_GRID, LORA_GRID, SFT_GRID = (5e-5, 1e-4, 2e-4), (5e-4, 1e-3, 2e-3), (2.5e-4, 5e-4, 1e-3)
# The grids whose edge rate was chosen, widened by one rate beyond it.
FULL_WIDE_GRID, LORA_WIDE_GRID, SFT_WIDE_GRID = FULL_GRID + (4e-4,), LORA_GRID + (4e-3,), SFT_GRID + (2e-3,)
#: SFT methods added later: three rates around the one every SFT method chose (1e-3), one run less each.
SFT_UPPER_GRID = SFT_WIDE_GRID[1:]
#: Where a method lands within its seed spread of a target, it and its reference run 5 seeds.
FIVE_SEEDS = (0, 1, 2, 3, 4)
#: In the order they run: a study cut short has the main comparisons first.
CLASSIFICATION_METHODS = (
    Method("full fine-tuning", {"tokentune": False}, FULL_WIDE_GRID),
    Method("TokenTune 0.3", {"selection_ratio": 0.3}, FULL_GRID),
    # LoRA + TokenTune 0.3 (and with a dense layer) landed within its seed spread of the LoRA target: 5 seeds.
    Method("LoRA", {"tokentune": False, "lora": True}, LORA_WIDE_GRID, seeds=FIVE_SEEDS),
    Method("LoRA + TokenTune 0.3", {"lora": True, "selection_ratio": 0.3}, LORA_GRID, seeds=FIVE_SEEDS),
    Method(
        "full fine-tuning, gradient checkpointing",
        {"tokentune": False, "gradient_checkpointing": True},
        learning_rate_of="full fine-tuning",
    ),
    Method("TokenTune 0.1", {"selection_ratio": 0.1}, FULL_GRID),
    Method("TokenTune 0.5", {"selection_ratio": 0.5}, FULL_GRID),
    # Dense top layers (MiniLM has 6): every token trains in the last L layers, the loss covers every token.
    Method("TokenTune 0.3, dense 1", {"selection_ratio": 0.3, "dense_top_layers": 1}, FULL_GRID),
    Method("TokenTune 0.3, dense 2", {"selection_ratio": 0.3, "dense_top_layers": 2}, FULL_GRID),
    Method(
        "LoRA + TokenTune 0.3, dense 1",
        {"lora": True, "selection_ratio": 0.3, "dense_top_layers": 1},
        LORA_GRID,
        seeds=FIVE_SEEDS,
    ),
    # It chose its grid's lower edge (5e-5): widened by one rate below it.
    Method("TokenTune 0.1, dense 1", {"selection_ratio": 0.1, "dense_top_layers": 1}, (2.5e-5,) + FULL_GRID),
    Method("TokenTune 0.1, dense 2", {"selection_ratio": 0.1, "dense_top_layers": 2}, FULL_GRID),
    Method(
        "TokenTune 0.3, gradient checkpointing",
        {"selection_ratio": 0.3, "gradient_checkpointing": True},
        learning_rate_of="TokenTune 0.3",
    ),
    # The data-aware strategy. A review's only label sits on the always-selected head token, so here "gradient"
    # draws as "importance" does (the attention the head gives each token).
    Method("TokenTune 0.3, gradient", {"selection_ratio": 0.3, "selection": "gradient"}, FULL_GRID),
    Method("TokenTune 0.1, gradient", {"selection_ratio": 0.1, "selection": "gradient"}, FULL_GRID),
)
SFT_METHODS = (
    Method("LoRA", {"tokentune": False}, SFT_WIDE_GRID, seeds=FIVE_SEEDS),
    # These two chose their grid's edge (1e-3) too: widened by one rate beyond it.
    Method("LoRA + TokenTune 0.3", {"selection_ratio": 0.3}, SFT_WIDE_GRID),
    Method("LoRA + TokenTune 0.3, supervised", {"selection_ratio": 0.3, "selection": "supervised"}, SFT_WIDE_GRID),
    # The same adapter and ratio over 4-bit weights: it takes LoRA + TokenTune 0.3's rate, sparing a grid.
    Method(
        "QLoRA + TokenTune 0.3",
        {"selection_ratio": 0.3, "load_in_4bit": True},
        learning_rate_of="LoRA + TokenTune 0.3",
    ),
    # Dense top layers (SmolLM2 has 30): every token trains in the last L layers, the loss covers every answer token.
    Method(
        "LoRA + TokenTune 0.3, supervised, dense 2",
        {"selection_ratio": 0.3, "selection": "supervised", "dense_top_layers": 2},
        SFT_UPPER_GRID,
    ),
    # It chose its grid's edge (2e-3): widened by one rate beyond it.
    Method(
        "LoRA + TokenTune 0.3, gradient",
        {"selection_ratio": 0.3, "selection": "gradient"},
        SFT_UPPER_GRID + (4e-3,),
        seeds=FIVE_SEEDS,
    ),
    # Its gradients are LoRA's, so its loss is too: one run measures its memory and time.
    Method(
        "LoRA, gradient checkpointing",
        {"tokentune": False, "gradient_checkpointing": True},
        learning_rate_of="LoRA",
        seeds=(0,),
    ),
    # QLoRA without TokenTune, at LoRA's rate: what quantisation alone costs.
    Method("QLoRA", {"tokentune": False, "load_in_4bit": True}, learning_rate_of="LoRA", seeds=(0,)),
    Method(
        "LoRA + TokenTune 0.3, supervised, dense 4",
        {"selection_ratio": 0.3, "selection": "supervised", "dense_top_layers": 4},
        SFT_UPPER_GRID,
    ),
    # The better of dense 2 and dense 4 under supervised selection (dense 2: lower loss, less memory), uniform.
    Method("LoRA + TokenTune 0.3, dense 2", {"selection_ratio": 0.3, "dense_top_layers": 2}, SFT_UPPER_GRID),
    # The best selection over 4-bit weights (issue 37), at LoRA + TokenTune 0.3, gradient's rate.
    Method(
        "QLoRA + TokenTune 0.3, gradient",
        {"selection_ratio": 0.3, "selection": "gradient", "load_in_4bit": True},
        learning_rate_of="LoRA + TokenTune 0.3, gradient",
        seeds=(0, 1, 2),
    ),
)
#: The main classification comparisons, trained longer at the rates the classification part chose.
CONVERGENCE_METHODS = tuple(
    Method(method.name, method.settings, learning_rate_of=method.name)
    for method in CLASSIFICATION_METHODS
    if method.name in ("full fine-tuning", "TokenTune 0.3", "LoRA", "LoRA + TokenTune 0.3")
)


def method_named(methods: tuple[Method, ...], name: str, **changes) -> Method:
    """The method called ``name`` among ``methods``, with ``changes`` to its fields (its grid, its seeds).

    Example:
        >>> method_named(SFT_METHODS, "LoRA", seeds=(0,)).settings, method_named(SFT_METHODS, "LoRA", seeds=(0,)).seeds
        ({'tokentune': False}, (0,))
    """
    return replace(next(method for method in methods if method.name == name), **changes)


#: Equal time (issue 37), the same configurations as at equal steps: the reference and the TokenTune methods that
#: may meet a target run 5 seeds; the learning rates are chosen again, as more steps may want another rate.
CLASSIFICATION_EQUAL_TIME_METHODS = (
    method_named(CLASSIFICATION_METHODS, "full fine-tuning", seeds=FIVE_SEEDS),
    method_named(CLASSIFICATION_METHODS, "TokenTune 0.3, gradient", seeds=FIVE_SEEDS),
    method_named(CLASSIFICATION_METHODS, "TokenTune 0.3", seeds=FIVE_SEEDS),
    method_named(CLASSIFICATION_METHODS, "TokenTune 0.1, gradient", seeds=FIVE_SEEDS),
    method_named(CLASSIFICATION_METHODS, "full fine-tuning, gradient checkpointing"),
)
SFT_EQUAL_TIME_METHODS = (
    method_named(SFT_METHODS, "LoRA"),
    # Every SFT method chose 1e-3 or 2e-3 at equal steps: the grid around them.
    method_named(SFT_METHODS, "LoRA + TokenTune 0.3, gradient", learning_rates=SFT_UPPER_GRID),
    method_named(SFT_METHODS, "LoRA + TokenTune 0.3, supervised", learning_rates=SFT_UPPER_GRID, seeds=FIVE_SEEDS),
    Method(
        "LoRA + TokenTune 0.1, gradient",
        {"selection_ratio": 0.1, "selection": "gradient"},
        SFT_UPPER_GRID,
        seeds=FIVE_SEEDS,
    ),
    # Checkpointing costs time: fewer steps than LoRA's.
    method_named(SFT_METHODS, "LoRA, gradient checkpointing", seeds=None),
)


@dataclass(frozen=True)
class Part:
    """A part of the study: its methods, the validation metric that chooses learning rates, the kind of data its
    runs train on (:data:`scripts.studies.quality_runners.MEMORY_MEASURES`), the part whose chosen rates its methods'
    ``learning_rate_of`` names (its own when None), and for an equal-time part the method whose wall-clock every
    method gets."""

    methods: tuple[Method, ...]
    metric: str
    sign: int  # 1 when a higher metric is better, -1 when lower is
    data: str  # "classification" or "sft"; also the equal-steps part an equal-time part's reference comes from
    rates_from: str | None = None
    time_of: str | None = None

    def __post_init__(self):
        if self.time_of is not None and self.methods[0].name != self.time_of:
            raise ValueError(f"`time_of` ({self.time_of!r}) must be the first method: the others' steps need its runs.")


#: In the order they run: a part that takes another's learning rates comes after it.
PARTS = {
    "classification": Part(CLASSIFICATION_METHODS, "eval_accuracy", 1, "classification"),
    "convergence": Part(CONVERGENCE_METHODS, "eval_accuracy", 1, "classification", rates_from="classification"),
    "sft": Part(SFT_METHODS, "eval_loss", -1, "sft"),
    "classification_equal_time": Part(
        CLASSIFICATION_EQUAL_TIME_METHODS, "eval_accuracy", 1, "classification", time_of="full fine-tuning"
    ),
    "sft_equal_time": Part(SFT_EQUAL_TIME_METHODS, "eval_loss", -1, "sft", time_of="LoRA"),
}
#: One run of a part: ``(arguments, method, learning rate, seed, scratch folder, steps or None) -> measurements``.
RUNNERS: dict[str, Callable[..., dict]] = {
    "classification": classification_run,
    "convergence": convergence_run,
    "sft": sft_run,
    "classification_equal_time": classification_run,
    "sft_equal_time": sft_run,
}
#: Files in ``output_dir``: the median step seconds of the equal-time parts' methods, and the activation memory of
#: every method on its data's longest batch.
STEP_SECONDS_FILE, MEMORY_FILE = "step_seconds.json", "activation_memory.json"
SITTINGS = ("train", "calibrate", "memory")


@dataclass
class QualityArguments:
    output_dir: str = field(
        default="docs/quality", metadata={"help": "Where the plots, results.json and every run's metrics go."}
    )
    report_path: str = field(default="docs/quality.md", metadata={"help": "Where the Markdown report goes."})
    scratch_dir: str = field(
        default="outputs/quality", metadata={"help": "Where runs write their checkpoints (deleted after each run)."}
    )
    parts: list[str] = field(
        default_factory=lambda: list(PARTS), metadata={"help": f"Which parts to run, of {tuple(PARTS)}."}
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds at the chosen rate."})
    grid_seed: int = field(default=0, metadata={"help": "The seed the learning rate grid is run with."})
    epochs: float = field(default=1.0, metadata={"help": "Classification: epochs over the training split."})
    convergence_epochs: float = field(
        default=3.0, metadata={"help": "Convergence: epochs over the classification training split."}
    )
    eval_steps: int = field(default=64, metadata={"help": "Classification: steps between validation points."})
    train_samples: int | None = field(default=None, metadata={"help": "Classification: first N training reviews."})
    sft_epochs: float = field(default=2.0, metadata={"help": "SFT: epochs over the training pairs."})
    sft_eval_steps: int = field(default=24, metadata={"help": "SFT: steps between validation points."})
    sft_batch_size: int = field(default=8, metadata={"help": "SFT: training pairs per step."})
    sft_max_length: int = field(default=128, metadata={"help": "SFT: tokens per chat, longer ones truncated."})
    sft_warmup_steps: int = field(default=10, metadata={"help": "SFT: learning rate warm-up steps."})
    sft_validation_pairs: int = field(default=106, metadata={"help": "SFT: training pairs held out for validation."})
    methods: list[str] | None = field(
        default=None,
        metadata={
            "help": "Train (or calibrate, or measure) only these methods, each named as `name` or `part: name` (the "
            "others' runs are read from their files where they exist, and listed as missing where not). Default: "
            "every method."
        },
    )
    max_minutes: float | None = field(
        default=None, metadata={"help": "Start no new run after this many minutes; run again to resume."}
    )
    sitting: str = field(
        default="train",
        metadata={
            "help": "What this sitting does before writing the report: 'train' the runs still missing; 'calibrate': "
            "measure the median step seconds of the equal-time parts' methods not yet measured (on a quiet machine), "
            "and train nothing; 'memory': measure each method's activation memory on the longest batch where not "
            "yet measured, and train nothing."
        },
    )
    calibration_warmup_steps: int = field(
        default=3, metadata={"help": "Calibration: steps run before the timed ones (not timed)."}
    )
    calibration_steps: int = field(default=20, metadata={"help": "Calibration: timed steps, whose median is kept."})
    quick: bool = field(
        default=False, metadata={"help": "Tiny models and slices, a few steps, two rates per grid: for CI."}
    )

    def __post_init__(self):
        unknown = set(self.parts) - set(PARTS)
        if unknown:
            raise ValueError(f"`parts` must be among {tuple(PARTS)}; got {sorted(unknown)}.")
        if self.sitting not in SITTINGS:
            raise ValueError(f"`sitting` must be one of {SITTINGS}; got {self.sitting!r}.")
        for part in self.parts:
            source = PARTS[part].rates_from
            if source is not None and source not in self.parts:
                raise ValueError(f"`parts` with {part!r} must include {source!r}, whose learning rates it takes.")
        if self.grid_seed not in self.seeds:
            raise ValueError(f"`grid_seed` ({self.grid_seed}) must be one of `seeds` ({self.seeds}).")


def run_file(args: QualityArguments, part: str, method: Method, learning_rate: float, seed: int) -> str:
    slug = method.name.replace(" + ", "_plus_").replace(", ", "_").replace(" ", "_")
    return os.path.join(args.output_dir, "runs", part, slug, f"lr{learning_rate:g}_seed{seed}.json")


def read_json(path: str) -> dict:
    """The JSON object in ``path``; empty when there is no such file."""
    if not os.path.exists(path):
        return {}
    with open(path) as handle:
        return json.load(handle)


def write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(data, handle, indent=1)


def any_learning_rate(part: str, method: Method) -> float:
    """A rate of ``method``'s grid, or of the grid of the method whose rate it takes: a calibration or a memory
    measurement does not depend on it.

    Example:
        >>> any_learning_rate("sft", method_named(SFT_METHODS, "QLoRA"))  # LoRA's grid
        0.00025
    """
    if method.learning_rates:
        return method.learning_rates[0]
    source = PARTS[part].rates_from or part
    return any_learning_rate(source, method_named(PARTS[source].methods, method.learning_rate_of))


class Study:
    """The runs of a study: each loaded from its file if it exists, else trained and written (budget allowing);
    and the measurements of the calibration and memory sittings, kept in their files."""

    def __init__(self, args: QualityArguments, command: str) -> None:
        self.args = args
        self.command = command
        self.deadline = None if args.max_minutes is None else time.time() + 60 * args.max_minutes
        self.runs: dict[str, dict] = {}  # by file: the grid seed's run at the chosen rate is read twice
        self.missing: list[str] = []
        self.step_seconds = read_json(self.path(STEP_SECONDS_FILE))
        self.memory = read_json(self.path(MEMORY_FILE))

    def path(self, name: str) -> str:
        return os.path.join(self.args.output_dir, name)

    def run(self, part: str, method: Method, learning_rate: float, seed: int, plan: dict | None = None) -> dict | None:
        """The run's record: read, copied from the equal-steps part (an equal-time reference), or trained.
        ``plan``: an equal-time run's steps and how they were derived (:meth:`equal_time_plan`); None: the
        part's epochs."""
        path = run_file(self.args, part, method, learning_rate, seed)
        if os.path.exists(path):
            record = read_json(path)
            if record.get("equal_time") != plan:
                raise ValueError(
                    f"{path} was trained to the plan {record.get('equal_time')}, and the calibration now gives "
                    f"{plan}: {STEP_SECONDS_FILE} or the reference's runs changed since. Restore them, or delete "
                    f"the part's runs to train them again."
                )
        elif (record := self.equal_steps_run(part, method, learning_rate, seed)) is not None:
            write_json(path, record)
        elif not self.trains(part, method) or (self.deadline is not None and time.time() > self.deadline):
            self.missing.append(f"{part}: {method.name}, learning rate {learning_rate:g}, seed {seed}")
            return None
        else:
            print(f"[quality] {part}: {method.name}, learning rate {learning_rate:g}, seed {seed}", flush=True)
            steps = None if plan is None else plan["steps"]
            name = os.path.relpath(path, self.args.output_dir)
            measured = self.in_scratch(name, RUNNERS[part], method, learning_rate, seed, steps)
            record = {"part": part, "method": method.name, "learning_rate": learning_rate, "seed": seed, **measured}
            if plan is not None:
                record["equal_time"] = plan
            write_json(path, record)
        self.runs[path] = record
        return record

    def in_scratch(self, name: str, measure: Callable, method: Method, learning_rate: float, seed: int, *more) -> dict:
        """``measure(args, method, learning_rate, seed, scratch, *more)``, a run or a measurement, with its
        checkpoints in a scratch folder deleted afterwards."""
        scratch = os.path.join(self.args.scratch_dir, name)
        try:
            return measure(self.args, method, learning_rate, seed, scratch, *more)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            gc.collect()  # the trainer and model sit in reference cycles: free them before the next one

    def selected(self, part: str, method: Method) -> bool:
        """Whether this sitting may train or measure ``method`` in ``part`` (``QualityArguments.methods``)."""
        names = self.args.methods
        return names is None or method.name in names or f"{part}: {method.name}" in names

    def trains(self, part: str, method: Method) -> bool:
        """Whether this sitting may train runs of ``method`` in ``part``."""
        return self.args.sitting == "train" and self.selected(part, method)

    def equal_steps_run(self, part: str, method: Method, learning_rate: float, seed: int) -> dict | None:
        """The run of an equal-time part's reference in its equal-steps part, where made, as a run of ``part`` that
        names its source: the reference trains there as here (same trainer, data and epochs). None otherwise."""
        settings = PARTS[part]
        source = run_file(self.args, settings.data, method, learning_rate, seed)
        if method.name != settings.time_of or not os.path.exists(source):
            return None
        return {**read_json(source), "part": part, "copied_from": os.path.relpath(source, self.args.output_dir)}

    def equal_time_plan(self, part: str, method: Method) -> dict | None:
        """The steps ``method`` trains in the equal-time ``part``: as many as fit the reference's wall-clock (the
        steps of its runs times its median step seconds) at its own median step seconds, both calibrated. None,
        and the reason listed as missing, while a figure is not there yet.

        Every run of the plan records it, so its steps can be traced to the calibration.
        """
        reference = PARTS[part].time_of
        calibrated = self.step_seconds.get(part, {})
        lacking = [name for name in (reference, method.name) if name not in calibrated]
        needs = [f"the calibrated step seconds of {name}" for name in lacking]
        finished = [r for r in self.runs.values() if r["part"] == part and r["method"] == reference]
        if not finished:
            needs.append(f"a finished run of {reference}")
        if needs:
            self.missing.append(f"{part}: {method.name} (needs {' and '.join(needs)})")
            return None
        reference_steps = finished[0]["curve"][-1]["step"]
        reference_seconds = calibrated[reference]["median_step_seconds"]
        seconds = calibrated[method.name]["median_step_seconds"]
        budget = reference_steps * reference_seconds
        return {
            "reference": reference,
            "reference_steps": reference_steps,
            "reference_step_seconds": reference_seconds,
            "budget_seconds": budget,
            "step_seconds": seconds,
            "steps": max(1, round(budget / seconds)),
        }

    def run_part(self, part: str, rates_from: dict[str, float]) -> dict[str, float]:
        """Each method's grid at the grid seed, then its other seeds at the chosen rate; the chosen rates.
        ``rates_from`` holds the rates chosen in the part named by ``PARTS[part].rates_from``."""
        settings = PARTS[part]
        chosen: dict[str, float] = {}
        for method in settings.methods:
            plan = None
            if settings.time_of not in (None, method.name):  # the reference trains its part's epochs
                plan = self.equal_time_plan(part, method)
                if plan is None:
                    continue
            if method.learning_rate_of is not None:
                known = rates_from if settings.rates_from is not None else chosen
                if method.learning_rate_of not in known:
                    self.missing.append(f"{part}: {method.name} (needs {method.learning_rate_of}'s learning rate)")
                    continue
                rate = known[method.learning_rate_of]
            else:
                finals = {}
                grid = method.learning_rates[:2] if self.args.quick else method.learning_rates
                for rate in grid:
                    record = self.run(part, method, rate, self.args.grid_seed, plan)
                    if record is not None:
                        finals[rate] = settings.sign * record["curve"][-1][settings.metric]
                if len(finals) < len(grid):
                    continue  # a rate chosen from part of the grid would not be the grid's choice
                rate = max(finals, key=finals.get)
            chosen[method.name] = rate
            seeds = method.seeds or self.args.seeds
            if self.args.quick:  # CI runs the seeds it asks for only
                seeds = [seed for seed in seeds if seed in self.args.seeds]
            for seed in seeds:
                self.run(part, method, rate, seed, plan)
        return chosen

    def provenance(self) -> dict:
        """Where and when a calibration or memory measurement was taken."""
        return {
            "machine": machine_description("cpu"),
            "torch_threads": torch.get_num_threads(),
            "command": self.command,
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    def calibrate(self, part: str) -> None:
        """Measure the median seconds of a step (batch fetch to step end) of each method of the equal-time ``part``
        that ``step_seconds.json`` lacks: a short run at the grid seed, the first steps dropped as warm-up. Each
        is written as soon as it is measured."""
        warmup, timed = (1, 2) if self.args.quick else (self.args.calibration_warmup_steps, self.args.calibration_steps)
        measured = self.step_seconds.setdefault(part, {})
        for method in PARTS[part].methods:
            if method.name in measured or not self.selected(part, method):
                continue
            print(f"[quality] {part}: step seconds of {method.name}", flush=True)
            rate, seed, load = any_learning_rate(part, method), self.args.grid_seed, os.getloadavg()
            name = os.path.join("calibration", part, method.name)
            run = self.in_scratch(name, RUNNERS[part], method, rate, seed, warmup + timed)
            seconds = run["step_seconds"][warmup:]
            measured[method.name] = {
                "median_step_seconds": statistics.median(seconds),
                "step_seconds": seconds,
                "warmup_steps": warmup,
                "learning_rate": rate,
                "seed": seed,
                "load_average_before": load,
                **self.provenance(),
            }
            write_json(self.path(STEP_SECONDS_FILE), self.step_seconds)

    def fixed_memory(self, part: str, method: Method) -> dict | None:
        """``method``'s activation memory on the longest batch of its part's data, if measured with its settings."""
        entry = self.memory.get(PARTS[part].data, {}).get(method.name)
        return entry if entry is not None and entry["settings"] == method.settings else None

    def measure_memory(self, part: str) -> None:
        """Measure the activation memory of one step on the longest training batch of each method of ``part``
        whose data (classification or SFT) has none with its settings; each written as soon as it is measured."""
        data = PARTS[part].data
        for method in PARTS[part].methods:
            if self.fixed_memory(part, method) is not None or not self.selected(part, method):
                continue
            print(f"[quality] {data}: activation memory of {method.name} on the longest batch", flush=True)
            rate, seed = any_learning_rate(part, method), self.args.grid_seed
            name = os.path.join("memory", data, method.name)
            measured = self.in_scratch(name, MEMORY_MEASURES[data], method, rate, seed)
            self.memory.setdefault(data, {})[method.name] = {
                **measured,
                "settings": method.settings,
                "learning_rate": rate,
                "seed": seed,
                **self.provenance(),
            }
            write_json(self.path(MEMORY_FILE), self.memory)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m scripts.studies.quality``."""
    (args,) = HfArgumentParser(QualityArguments).parse_args_into_dataclasses(args=argv)
    command = command_line(__spec__.name, argv)
    study = Study(args, command)
    for part in args.parts:
        if args.sitting == "calibrate" and PARTS[part].time_of is not None:
            study.calibrate(part)
        if args.sitting == "memory":
            study.measure_memory(part)
    chosen: dict[str, dict[str, float]] = {}
    for part, settings in PARTS.items():
        if part in args.parts:
            chosen[part] = study.run_part(part, chosen.get(settings.rates_from, {}))
    fixed_memory = {
        part: {method.name: memory for method in PARTS[part].methods if (memory := study.fixed_memory(part, method))}
        for part in chosen
    }
    write_study_report(
        args.report_path,
        args.output_dir,
        list(study.runs.values()),
        chosen,
        study.missing,
        {"command": command, "arguments": asdict(args)},
        fixed_memory,
    )


if __name__ == "__main__":
    main()
