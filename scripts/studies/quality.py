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
  and gradient selection; supervised with 2 and 4 dense top layers, uniform with 2), QLoRA + TokenTune 0.3, and as
  competitors LoRA with gradient checkpointing and QLoRA alone; validation answer loss against steps and
  seconds, and the held-out (test) answer loss after training.

The report draws each part's frontier (test metric against activation memory and training time) and
checks the targets of issue 22.

For each method the learning rates of its grid are tried at ``grid_seed``; the one with the best final
validation metric is then run with the other seeds. Every finished run is written to
``<output_dir>/runs/`` and skipped when the study is run again, so a study cut short (``max_minutes``)
resumes where it stopped; the report is written from the runs that exist and lists those still missing.

    python -m scripts.studies.quality --max_minutes 60       # resumable; writes docs/quality.md and docs/quality/
    python -m scripts.studies.quality --quick --output_dir /tmp/quality --report_path /tmp/quality.md
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field

from transformers import HfArgumentParser
from trl import SFTConfig

from tokentune_peft.cli.offline import load_chatterbot_pairs

from scripts.common import CONFIG_DIR, command_line, run_setting
from scripts.studies.common import LearningCurve
from scripts.studies.quality_report import write_study_report
from scripts.studies.sft_trl import SFTStudyArguments, activation_mib, build_trainer, conversations


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
)
#: The main classification comparisons, trained longer at the rates the classification part chose.
CONVERGENCE_METHODS = tuple(
    Method(method.name, method.settings, learning_rate_of=method.name)
    for method in CLASSIFICATION_METHODS
    if method.name in ("full fine-tuning", "TokenTune 0.3", "LoRA", "LoRA + TokenTune 0.3")
)


@dataclass(frozen=True)
class Part:
    """A part of the study: its methods, the validation metric that chooses learning rates, and the part
    whose chosen rates its methods' ``learning_rate_of`` names (its own when None)."""

    methods: tuple[Method, ...]
    metric: str
    sign: int  # 1 when a higher metric is better, -1 when lower is
    rates_from: str | None = None


#: In the order they run: a part that takes another's learning rates comes after it.
PARTS = {
    "classification": Part(CLASSIFICATION_METHODS, "eval_accuracy", 1),
    "convergence": Part(CONVERGENCE_METHODS, "eval_accuracy", 1, rates_from="classification"),
    "sft": Part(SFT_METHODS, "eval_loss", -1),
}


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
            "help": "Train only the runs of these methods, each named as `name` or `part: name` (the others are "
            "read from their files where they exist, and listed as missing where not). Default: every method."
        },
    )
    max_minutes: float | None = field(
        default=None, metadata={"help": "Start no new run after this many minutes; run again to resume."}
    )
    quick: bool = field(
        default=False, metadata={"help": "Tiny models and slices, a few steps, two rates per grid: for CI."}
    )

    def __post_init__(self):
        unknown = set(self.parts) - set(PARTS)
        if unknown:
            raise ValueError(f"`parts` must be among {tuple(PARTS)}; got {sorted(unknown)}.")
        for part in self.parts:
            source = PARTS[part].rates_from
            if source is not None and source not in self.parts:
                raise ValueError(f"`parts` with {part!r} must include {source!r}, whose learning rates it takes.")
        if self.grid_seed not in self.seeds:
            raise ValueError(f"`grid_seed` ({self.grid_seed}) must be one of `seeds` ({self.seeds}).")


def run_file(args: QualityArguments, part: str, method: Method, learning_rate: float, seed: int) -> str:
    slug = method.name.replace(" + ", "_plus_").replace(", ", "_").replace(" ", "_")
    return os.path.join(args.output_dir, "runs", part, slug, f"lr{learning_rate:g}_seed{seed}.json")


def classification_run(
    args: QualityArguments, method: Method, learning_rate: float, seed: int, scratch: str, epochs: float | None = None
) -> dict:
    """One MiniLM (tiny BERT when quick) run through the recipe code, with its validation curve; over
    ``args.epochs`` unless ``epochs`` is given."""
    config = "tiny_bert_rotten_tomatoes.yaml" if args.quick else "minilm_rotten_tomatoes_tokentune.yaml"
    overrides = {
        **method.settings,
        "learning_rate": learning_rate,
        "seed": seed,
        "num_train_epochs": args.epochs if epochs is None else epochs,
        "eval_strategy": "steps",
        "eval_steps": args.eval_steps,
        "logging_steps": args.eval_steps,
        "save_strategy": "no",
        "output_dir": scratch,
    }
    if args.train_samples is not None:
        overrides["train_samples"] = args.train_samples
    if args.quick:
        overrides.update(max_steps=4, eval_steps=2, train_samples=32, eval_samples=16)
    curve = LearningCurve()
    flags = [item for key, value in overrides.items() for item in (f"--{key}", str(value))]
    outcome = run_setting(method.name, seed, os.path.join(CONFIG_DIR, config), flags, curve)
    results = outcome["results"]
    return {
        "curve": curve.points,
        "test": {"accuracy": results["after"]["test_accuracy"], "accuracy_before": results["before"]["test_accuracy"]},
        "activation_mib": results["activation_memory"]["step_mib"],
        "train_seconds": curve.train_seconds,
        "wall_seconds": outcome["wall_seconds"],
    }


def convergence_run(args: QualityArguments, method: Method, learning_rate: float, seed: int, scratch: str) -> dict:
    """A classification run over ``args.convergence_epochs``."""
    return classification_run(args, method, learning_rate, seed, scratch, epochs=args.convergence_epochs)


def sft_run(args: QualityArguments, method: Method, learning_rate: float, seed: int, scratch: str) -> dict:
    """One SmolLM2 run through TRL's trainer: validation answer loss along training, test loss at the end."""
    pairs = load_chatterbot_pairs(seed=0)
    train, test = pairs["train"], pairs["test"]
    if args.quick:
        train, test = train.select(range(24)), test.select(range(8))
    carved = train.train_test_split(test_size=8 if args.quick else args.sft_validation_pairs, shuffle=False)
    settings = dict(method.settings)
    checkpointing = settings.pop("gradient_checkpointing", False)
    study = SFTStudyArguments(train_samples=0, **settings)
    sft_config = SFTConfig(
        output_dir=scratch,
        learning_rate=learning_rate,
        seed=seed,
        num_train_epochs=args.sft_epochs,
        max_steps=2 if args.quick else -1,
        per_device_train_batch_size=args.sft_batch_size,
        per_device_eval_batch_size=16,
        max_length=args.sft_max_length,
        eval_strategy="steps",
        eval_steps=1 if args.quick else args.sft_eval_steps,
        logging_steps=1 if args.quick else args.sft_eval_steps,
        warmup_steps=0 if args.quick else args.sft_warmup_steps,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,  # SFTConfig's default; the CPU runs here are fp32
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
    )
    curve = LearningCurve()
    start = time.perf_counter()
    trainer = build_trainer(
        study, sft_config, conversations(carved["train"], 0), conversations(carved["test"], 0), [curve]
    )
    if checkpointing:  # the Trainer turns it on in train(); on now, so that the measured step checkpoints too
        trainer.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=sft_config.gradient_checkpointing_kwargs
        )
        trainer.model.train()  # transformers checkpoints in training mode only
    memory = activation_mib(trainer)
    trainer.train()
    test_loss = trainer.evaluate(conversations(test, 0), metric_key_prefix="test")["test_loss"]
    return {
        "curve": curve.points,
        "test": {"loss": test_loss},
        "activation_mib": memory["tokentune_lora_mib"] or memory["lora_mib"],
        "train_seconds": curve.train_seconds,
        "wall_seconds": time.perf_counter() - start,
    }


RUNNERS = {"classification": classification_run, "convergence": convergence_run, "sft": sft_run}


class Study:
    """The runs of a study: each loaded from its file if it exists, else trained and written (budget allowing)."""

    def __init__(self, args: QualityArguments) -> None:
        self.args = args
        self.deadline = None if args.max_minutes is None else time.time() + 60 * args.max_minutes
        self.runs: dict[str, dict] = {}  # by file: the grid seed's run at the chosen rate is read twice
        self.missing: list[str] = []

    def run(self, part: str, method: Method, learning_rate: float, seed: int) -> dict | None:
        path = run_file(self.args, part, method, learning_rate, seed)
        if os.path.exists(path):
            with open(path) as handle:
                record = json.load(handle)
        elif not self.trains(part, method) or (self.deadline is not None and time.time() > self.deadline):
            self.missing.append(f"{part}: {method.name}, learning rate {learning_rate:g}, seed {seed}")
            return None
        else:
            print(f"[quality] {part}: {method.name}, learning rate {learning_rate:g}, seed {seed}", flush=True)
            scratch = os.path.join(self.args.scratch_dir, os.path.relpath(path, self.args.output_dir))
            measured = RUNNERS[part](self.args, method, learning_rate, seed, scratch)
            shutil.rmtree(scratch, ignore_errors=True)
            gc.collect()  # the run's trainer and model sit in reference cycles: free them before the next run
            record = {"part": part, "method": method.name, "learning_rate": learning_rate, "seed": seed, **measured}
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as handle:
                json.dump(record, handle, indent=1)
        self.runs[path] = record
        return record

    def trains(self, part: str, method: Method) -> bool:
        """Whether this sitting may train runs of ``method`` in ``part`` (``QualityArguments.methods``)."""
        names = self.args.methods
        return names is None or method.name in names or f"{part}: {method.name}" in names

    def run_part(self, part: str, rates_from: dict[str, float]) -> dict[str, float]:
        """Each method's grid at the grid seed, then its other seeds at the chosen rate; the chosen rates.
        ``rates_from`` holds the rates chosen in the part named by ``PARTS[part].rates_from``."""
        settings = PARTS[part]
        chosen: dict[str, float] = {}
        for method in settings.methods:
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
                    record = self.run(part, method, rate, self.args.grid_seed)
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
                self.run(part, method, rate, seed)
        return chosen


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m scripts.studies.quality``."""
    (args,) = HfArgumentParser(QualityArguments).parse_args_into_dataclasses(args=argv)
    study = Study(args)
    chosen: dict[str, dict[str, float]] = {}
    for part, settings in PARTS.items():
        if part in args.parts:
            chosen[part] = study.run_part(part, chosen.get(settings.rates_from, {}))
    command = command_line(__spec__.name, argv)
    write_study_report(
        args.report_path,
        args.output_dir,
        list(study.runs.values()),
        chosen,
        study.missing,
        {"command": command, "arguments": asdict(args)},
    )


if __name__ == "__main__":
    main()
