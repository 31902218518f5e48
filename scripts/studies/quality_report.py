"""The quality study's report (:mod:`scripts.studies.quality`): tables, targets and learning-curve plots drawn from
its runs, whatever subset of them exists.

Each run is a dict with ``part``, ``method``, ``learning_rate``, ``seed``, ``curve`` (validation points
with ``step``, ``train_seconds`` and the metric), ``test``, ``activation_mib`` and ``train_seconds``; an equal-time
run also has ``equal_time``, the plan its steps came from.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass, replace

from tokentune_peft.cli.plots import new_figure, save_figure

from scripts.common import machine_description
from scripts.studies.common import mean_std


@dataclass(frozen=True)
class PartView:
    """How a part's metric reads: its validation key, its test key, how it prints and what it compares to."""

    title: str
    validation_key: str
    test_key: str
    label: str
    higher_is_better: bool
    references: dict[str, str]  # method -> the method it is compared with
    data: str  # "classification" or "sft": what the part trains on
    rates_from: str | None = None  # the part whose chosen learning rates this part's methods take
    time_of: str | None = None  # equal time: the method whose wall-clock every method gets

    def show(self, value: float | None) -> str:
        if value is None:
            return "-"
        return f"{100 * value:.2f}" if self.higher_is_better else f"{value:.4f}"

    def gap(self, value: float, reference: float) -> str:
        """Points below the reference (accuracy), or the relative excess over it (loss)."""
        if self.higher_is_better:
            return f"{100 * (value - reference):+.2f} points"
        return f"{100 * (value / reference - 1):+.1f}%"


VIEWS = {
    "classification": PartView(
        "Classification: MiniLM-L6 on Rotten Tomatoes",
        "eval_accuracy",
        "accuracy",
        "accuracy (%)",
        True,
        {
            "TokenTune 0.1": "full fine-tuning",
            "TokenTune 0.3": "full fine-tuning",
            "TokenTune 0.5": "full fine-tuning",
            "full fine-tuning, gradient checkpointing": "full fine-tuning",
            "LoRA + TokenTune 0.3": "LoRA",
            "TokenTune 0.3, dense 1": "full fine-tuning",
            "TokenTune 0.3, dense 2": "full fine-tuning",
            "LoRA + TokenTune 0.3, dense 1": "LoRA",
            "TokenTune 0.1, dense 1": "full fine-tuning",
            "TokenTune 0.1, dense 2": "full fine-tuning",
            "TokenTune 0.3, gradient checkpointing": "full fine-tuning",
            "TokenTune 0.3, gradient": "full fine-tuning",
            "TokenTune 0.1, gradient": "full fine-tuning",
        },
        "classification",
    ),
    "sft": PartView(
        "Supervised fine-tuning through TRL: SmolLM2-135M-Instruct on chatterbot pairs",
        "eval_loss",
        "loss",
        "answer loss",
        False,
        {
            "LoRA + TokenTune 0.3": "LoRA",
            "LoRA + TokenTune 0.3, supervised": "LoRA",
            "QLoRA + TokenTune 0.3": "LoRA",
            "LoRA + TokenTune 0.3, supervised, dense 2": "LoRA",
            "LoRA + TokenTune 0.3, supervised, dense 4": "LoRA",
            "LoRA + TokenTune 0.3, gradient": "LoRA",
            "LoRA, gradient checkpointing": "LoRA",
            "QLoRA": "LoRA",
            "LoRA + TokenTune 0.3, dense 2": "LoRA",
            "QLoRA + TokenTune 0.3, gradient": "LoRA",
        },
        "sft",
    ),
}
VIEWS["convergence"] = replace(
    VIEWS["classification"],
    title="Classification, trained longer: MiniLM-L6 on Rotten Tomatoes",
    rates_from="classification",
)
VIEWS["classification_equal_time"] = replace(
    VIEWS["classification"],
    title="Classification at full fine-tuning's wall-clock: MiniLM-L6 on Rotten Tomatoes",
    references={
        method: "full fine-tuning"
        for method in (
            "TokenTune 0.3, gradient",
            "TokenTune 0.3",
            "TokenTune 0.1, gradient",
            "full fine-tuning, gradient checkpointing",
        )
    },
    time_of="full fine-tuning",
)
VIEWS["sft_equal_time"] = replace(
    VIEWS["sft"],
    title="Supervised fine-tuning at LoRA's wall-clock: SmolLM2-135M-Instruct on chatterbot pairs",
    references={
        method: "LoRA"
        for method in (
            "LoRA + TokenTune 0.3, gradient",
            "LoRA + TokenTune 0.3, supervised",
            "LoRA + TokenTune 0.1, gradient",
            "LoRA, gradient checkpointing",
        )
    },
    time_of="LoRA",
)


def on_calibrated_clock(runs: list[dict], part: str) -> list[dict]:
    """``runs`` with those of the equal-time ``part`` on the calibrated clock: each validation point's seconds are
    its step times its method's median step seconds (the figures its steps were derived from), so the part compares
    methods at the budget they were given, whatever load or machine speed their sittings had. Each run keeps its
    own seconds as ``measured_train_seconds``. Unchanged while no run of the part has a plan.

    Example:
        >>> plan = {"reference": "a", "reference_step_seconds": 2.0, "step_seconds": 1.0}
        >>> runs = [{"part": "p", "method": "a", "train_seconds": 9.0, "curve": [{"step": 4, "train_seconds": 9.0}]},
        ...         {"part": "p", "method": "b", "train_seconds": 7.0, "curve": [{"step": 8, "train_seconds": 7.0}],
        ...          "equal_time": plan}]
        >>> [(run["train_seconds"], run["measured_train_seconds"]) for run in on_calibrated_clock(runs, "p")]
        [(8.0, 9.0), (8.0, 7.0)]
    """
    plans = {run["method"]: run["equal_time"] for run in runs if run["part"] == part and "equal_time" in run}
    if not plans:
        return runs
    any_plan = next(iter(plans.values()))
    step_seconds = {any_plan["reference"]: any_plan["reference_step_seconds"]}
    step_seconds.update({method: plan["step_seconds"] for method, plan in plans.items()})

    def recast(run: dict) -> dict:
        if run["part"] != part:
            return run
        curve = [{**point, "train_seconds": point["step"] * step_seconds[run["method"]]} for point in run["curve"]]
        return {
            **run,
            "curve": curve,
            "train_seconds": curve[-1]["train_seconds"],
            "measured_train_seconds": run["train_seconds"],
        }

    return [recast(run) for run in runs]


def chosen_runs(runs: list[dict], part: str, chosen: dict[str, float]) -> dict[str, list[dict]]:
    """Each method's runs at its chosen learning rate, in the study's order."""
    return {
        method: [r for r in runs if r["part"] == part and r["method"] == method and r["learning_rate"] == rate]
        for method, rate in chosen.items()
    }


#: Timing noise allowed when a run is read at a time budget: a seed 2% slower than the mean still counts.
TIME_SLACK = 1.02


def value_at(run: dict, key: str, limit: float, axis: str) -> float | None:
    """The metric at the last validation point with ``axis`` (step, or train_seconds within the slack) at
    most ``limit``. None before the first point, and, on the step axis, past the run's last step: a run that
    stopped earlier (an equal-time part's slower method) never took those steps, while at a time limit a finished
    run's last value stands."""
    if axis == "step" and limit > run["curve"][-1]["step"]:
        return None
    slack = TIME_SLACK if axis == "train_seconds" else 1.0
    reached = [point for point in run["curve"] if point[axis] <= limit * slack]
    return reached[-1][key] if reached else None


def mean_at(runs: list[dict], key: str, limit: float, axis: str) -> float | None:
    values = [value_at(run, key, limit, axis) for run in runs]
    return None if not values or None in values else statistics.mean(values)


def grid_table(runs: list[dict], part: str, view: PartView, chosen: dict[str, float], grid_seed: int) -> str:
    methods = list(dict.fromkeys(r["method"] for r in runs if r["part"] == part))
    lines = [
        f"| method | final validation {view.label} by learning rate (seed {grid_seed}) | chosen |",
        "|---|---|---:|",
    ]
    at_an_edge = False
    for method in methods:
        grid = sorted(
            (r for r in runs if r["part"] == part and r["method"] == method and r["seed"] == grid_seed),
            key=lambda r: r["learning_rate"],
        )
        cells = ", ".join(f"{r['learning_rate']:g}: {view.show(r['curve'][-1][view.validation_key])}" for r in grid)
        rate = chosen.get(method)
        rates = [r["learning_rate"] for r in grid]
        edge = len(rates) > 1 and rate in (rates[0], rates[-1])
        at_an_edge |= edge
        lines.append(f"| {method} | {cells} | {'-' if rate is None else f'{rate:g}'}{' (grid edge)' * edge} |")
    if at_an_edge:
        lines.append(
            "\n(grid edge): the best rate was the grid's smallest or largest; the rate beyond it was not tried "
            "and may be better still."
        )
    return "\n".join(lines)


def rates_text(chosen: dict[str, float], view: PartView, grid_seed: int) -> str:
    """The learning rates a part took from the part that chose them."""
    rates = ", ".join(f"{method}: {rate:g}" for method, rate in chosen.items())
    return f"Taken from the {view.rates_from} part's choice (validation split, seed {grid_seed}): {rates}."


def summary_rows(by_method: dict[str, list[dict]], view: PartView, fixed_memory: dict[str, dict]) -> list[dict]:
    """One row per method with runs: its test metric over seeds, its activation memory (on the longest batch where
    ``fixed_memory`` holds it, else its runs' first batches), training seconds and steps."""
    rows = []
    for method, runs in by_method.items():
        if not runs:
            continue
        test_mean, test_std = mean_std([r["test"][view.test_key] for r in runs])
        fixed = fixed_memory.get(method)
        activation = {r["seed"]: fixed["activation_mib"] if fixed else r["activation_mib"] for r in runs}
        rows.append(
            {
                "method": method,
                "learning_rate": runs[0]["learning_rate"],
                "seeds": sorted(r["seed"] for r in runs),
                "test_mean": test_mean,
                "test_std": test_std,
                "tests": [r["test"][view.test_key] for r in sorted(runs, key=lambda r: r["seed"])],
                "validation_mean": statistics.mean(r["curve"][-1][view.validation_key] for r in runs),
                "activation_mib": statistics.mean(activation.values()),
                "activation_by_seed": activation,
                "activation_batch": "longest" if fixed else "first",
                "train_seconds": statistics.mean(r["train_seconds"] for r in runs),
                **(
                    {"measured_train_seconds": statistics.mean(r["measured_train_seconds"] for r in runs)}
                    if "measured_train_seconds" in runs[0]
                    else {}
                ),
                "steps": runs[0]["curve"][-1]["step"],
                **({"equal_time": runs[0]["equal_time"]} if "equal_time" in runs[0] else {}),
            }
        )
    return rows


def summary_table(rows: list[dict], view: PartView) -> str:
    by_name = {row["method"]: row for row in rows}
    lines = [
        f"| method | learning rate | test {view.label}, mean ± std | per seed | seeds | against | "
        "activation memory, one step (MiB) | training seconds | steps |",
        "|---|---:|---:|---|---|---|---:|---:|---:|",
    ]
    for row in rows:
        reference = by_name.get(view.references.get(row["method"], ""))
        against = f"{view.gap(row['test_mean'], reference['test_mean'])} vs {reference['method']}" if reference else "-"
        per_seed = ", ".join(view.show(value) for value in row["tests"])
        first_batch = " *" if row["activation_batch"] == "first" else ""
        lines.append(
            f"| {row['method']} | {row['learning_rate']:g} | {view.show(row['test_mean'])} ± "
            f"{view.show(row['test_std'])} | {per_seed} | {len(row['seeds'])} | {against} | "
            f"{row['activation_mib']:.1f}{first_batch} | {row['train_seconds']:.0f} | {row['steps']} |"
        )
    return "\n".join(lines)


def memory_note(rows: list[dict], fixed_memory: dict[str, dict]) -> str:
    """What the activation memory column measured: the longest batch, or (marked *) each run's first batch."""
    shapes = {" x ".join(str(size) for size in entry["batch"]) for entry in fixed_memory.values()}
    notes = []
    if shapes:
        notes.append(
            f"Activation memory: one training step on the training split's longest batch ({', '.join(sorted(shapes))} "
            "tokens), the same batch for every method, measured once per method (`activation_memory.json`)."
        )
    if any(row["activation_batch"] == "first" for row in rows):
        notes.append(
            "*: not yet measured on the longest batch (a memory sitting measures it): the mean over seeds of each "
            "run's first batch, whose length depends on the seed."
        )
    return " ".join(notes)


def equal_time_table(rows: list[dict], view: PartView) -> str:
    """How each method's steps follow from the calibration: the reference's steps times its median step seconds
    make the budget, which each method spends at its own median step seconds."""
    plans = [row["equal_time"] for row in rows if "equal_time" in row]
    if not plans:
        return f"No run with calibrated steps yet: each needs the step seconds of {view.time_of} and its own."
    plan = plans[0]
    lines = [
        f"Budget: {view.time_of}'s {plan['reference_steps']} steps x {plan['reference_step_seconds']:.3f} s = "
        f"{plan['budget_seconds']:.0f} s; each method trains round(budget / its median step seconds) steps, and its "
        "learning-rate schedule spans them. Median step seconds: one calibration sitting at the grid seed, each "
        "step timed from the end of the one before (batch fetch and selection included), warm-up steps dropped "
        "(`step_seconds.json`). In this part every training-seconds figure (tables, plots, frontier) is on this "
        "calibrated clock: steps x median step seconds. Measured: the runs' own training seconds (optimizer steps "
        "only), under whatever load and machine speed their sittings had.",
        "",
        "| method | median step seconds | steps | calibrated training seconds | measured training seconds (mean) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        own = row.get("equal_time")
        seconds = own["step_seconds"] if own else plan["reference_step_seconds"]
        lines.append(
            f"| {row['method']} | {seconds:.3f} | {row['steps']} | {row['steps'] * seconds:.0f} | "
            f"{row.get('measured_train_seconds', row['train_seconds']):.0f} |"
        )
    return "\n".join(lines)


def budget_table(by_method: dict[str, list[dict]], view: PartView, axis: str, columns: list[tuple[str, float]]) -> str:
    """Mean validation metric of each method when ``axis`` reaches each column's limit (last point at or before it)."""
    header = " | ".join(name for name, _ in columns)
    lines = [f"| method | {header} |", "|---|" + "---:|" * len(columns)]
    for method, runs in by_method.items():
        if runs:
            cells = " | ".join(view.show(mean_at(runs, view.validation_key, limit, axis)) for _, limit in columns)
            lines.append(f"| {method} | {cells} |")
    return "\n".join(lines)


def plot_curves(by_method: dict[str, list[dict]], view: PartView, axis: str, path: str, caption: str) -> None:
    """Validation metric against steps or seconds: the seeds' mean, shaded between their min and max."""
    figure, (plot,) = new_figure()
    for method, runs in by_method.items():
        if not runs:
            continue
        length = min(len(r["curve"]) for r in runs)
        x = [statistics.mean(r["curve"][i][axis] for r in runs) for i in range(length)]
        scale = 100 if view.higher_is_better else 1
        values = [[scale * r["curve"][i][view.validation_key] for r in runs] for i in range(length)]
        (line,) = plot.plot(x, [statistics.mean(v) for v in values], marker="o", markersize=3, label=method)
        plot.fill_between(x, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.2)
    plot.set_xlabel("optimizer steps" if axis == "step" else "training seconds (evaluation excluded)")
    plot.set_ylabel(f"validation {view.label}")
    plot.legend(fontsize=7)
    save_figure(figure, path, caption)


#: Seeds a configuration needs before a target is called met or missed (unless the target asks for more).
TARGET_SEEDS = 3
#: Seeds after which a verdict within a configuration's seed spread of the threshold stands (the issue's rule).
SPREAD_SEEDS = 5


@dataclass(frozen=True)
class Target:
    """A target of the study: a TokenTune configuration compared with ``reference``, at most ``memory_cap``
    of its activation memory, within ``tolerance`` of its test metric (points, or relative for a loss; 0: at
    least as good), each with ``seeds`` seeds or more."""

    name: str
    reference: str
    memory_cap: float
    tolerance: float
    seeds: int = TARGET_SEEDS


TARGETS = {
    "classification": (
        Target("All weights, one epoch", "full fine-tuning", 0.5, 0.01),
        Target("LoRA, one epoch", "LoRA", 0.5, 0.01),
    ),
    "sft": (Target("SFT, two epochs", "LoRA", 0.4, 0.02),),
    # Issue 37: at the reference's wall-clock, 5 seeds each.
    "classification_equal_time": (
        Target("At full fine-tuning's wall-clock", "full fine-tuning", 0.5, 0.005, seeds=SPREAD_SEEDS),
    ),
    "sft_equal_time": (Target("At LoRA's wall-clock", "LoRA", 0.4, 0.0, seeds=SPREAD_SEEDS),),
}


def candidates(rows: dict[str, dict], view: PartView, target: Target) -> list[dict]:
    """The TokenTune configurations compared with the target's reference, with the seeds it asks for."""
    return [
        row
        for method, row in rows.items()
        if view.references.get(method) == target.reference
        and "TokenTune" in method
        and len(row["seeds"]) >= target.seeds
    ]


def memory_share(row: dict, reference: dict) -> float:
    """``row``'s activation memory over ``reference``'s, on the seeds both ran: without a longest-batch
    measurement, a step's activations are its first batch's, whose padded length depends on the seed's data order.

    Example:
        >>> memory_share({"activation_by_seed": {0: 30.0, 1: 50.0}}, {"activation_by_seed": {0: 100.0, 3: 200.0}})
        0.3
    """
    common = row["activation_by_seed"].keys() & reference["activation_by_seed"].keys()

    def mean_over_common(by_seed: dict) -> float:
        return statistics.mean(mib for seed, mib in by_seed.items() if not common or seed in common)

    return mean_over_common(row["activation_by_seed"]) / mean_over_common(reference["activation_by_seed"])


def target_line(target: Target, rows: dict[str, dict], view: PartView) -> str:
    """Whether a configuration meets ``target``: met, missed, or within its seed spread of the threshold
    (more seeds needed, up to ``SPREAD_SEEDS``); with every candidate's figures."""
    theirs = rows.get(target.reference)
    if theirs is None or len(theirs["seeds"]) < target.seeds:
        return f"- {target.name}: not measured ({target.seeds} seeds of {target.reference} needed)."
    if not target.tolerance:
        threshold = theirs["test_mean"]
        want = f"at least as good as {target.reference}'s"
    elif view.higher_is_better:
        threshold = theirs["test_mean"] - target.tolerance
        want = f"within {100 * target.tolerance:.1f} point of {target.reference}"
    else:
        threshold = theirs["test_mean"] * (1 + target.tolerance)
        want = f"within {100 * target.tolerance:.0f}% of {target.reference}'s"
    sign = 1 if view.higher_is_better else -1
    described, verdicts = [], []
    for row in candidates(rows, view, target):
        share = memory_share(row, theirs)
        margin = sign * (row["test_mean"] - threshold)
        verdict = "met" if margin >= 0 else "missed"
        if abs(margin) <= row["test_std"]:
            seeds = len(row["seeds"])
            verdict += ", within its seed spread" if seeds < SPREAD_SEEDS else f" ({seeds} seeds)"
        if share > target.memory_cap:
            verdict = "over the memory cap"
        else:
            verdicts.append(verdict)
        described.append(
            f"{row['method']}: {view.show(row['test_mean'])} ± {view.show(row['test_std'])} "
            f"({view.gap(row['test_mean'], theirs['test_mean'])}), {100 * share:.0f}% of the memory, {verdict}"
        )
    if not described:
        return f"- {target.name}: not measured (no TokenTune configuration with {target.seeds} seeds)."
    settled = [v for v in verdicts if not v.endswith("seed spread")]
    if any(v.startswith("met") for v in settled):
        verdict = "met"
    elif len(settled) < len(verdicts):
        verdict = "open: a configuration is within its seed spread of the threshold (more seeds needed)"
    else:
        verdict = "missed"
    return (
        f"- {target.name}, a configuration with at most {100 * target.memory_cap:.0f}% of {target.reference}'s "
        f"activation memory {want} test {view.label} ({view.show(theirs['test_mean'])} ± "
        f"{view.show(theirs['test_std'])}): **{verdict}**. " + "; ".join(described) + "."
    )


def equal_time_line(rows: dict[str, dict], by_method: dict[str, list[dict]], view: PartView) -> str:
    """Whether a TokenTune configuration reaches full fine-tuning's validation metric at its own training time."""
    full = by_method.get("full fine-tuning")
    described, met = [], False
    for method, row in rows.items():
        if view.references.get(method) != "full fine-tuning" or "TokenTune" not in method:
            continue
        budget = row["train_seconds"]
        own = mean_at(by_method[method], view.validation_key, budget, "train_seconds")
        other = mean_at(full, view.validation_key, budget, "train_seconds") if full else None
        if other is None:
            continue
        met |= own >= other
        described.append(f"{method} {view.show(own)} against {view.show(other)} at {budget:.0f} s")
    if not described:
        return "- Equal time: not measured."
    return (
        "- Equal time, a TokenTune configuration at or above full fine-tuning's validation "
        f"{view.label} at equal training seconds (its whole run; mean of seeds): **{'met' if met else 'missed'}**. "
        + "; ".join(described)
        + "."
    )


def target_lines(rows: dict[str, dict], by_method: dict[str, list[dict]], part: str, view: PartView) -> list[str]:
    """The study's targets for this part, each met, missed or not measured, with the figures."""
    lines = [target_line(target, rows, view) for target in TARGETS.get(part, ())]
    if view.data == "classification" and view.time_of is None:  # equal time read off the validation curves
        lines.append(equal_time_line(rows, by_method, view))
    return lines


def frontier(rows: list[dict], cost: str, view: PartView) -> list[str]:
    """The methods no other method beats on both ``cost`` (lower is better) and the test metric, cheapest first."""
    sign = 1 if view.higher_is_better else -1
    on_it, best = [], None
    for row in sorted(rows, key=lambda row: (row[cost], -sign * row["test_mean"])):
        if best is None or sign * row["test_mean"] > best:
            on_it.append(row["method"])
            best = sign * row["test_mean"]
    return on_it


FRONTIER_AXES = {"activation_mib": "activation memory, one step (MiB)", "train_seconds": "training seconds"}


def plot_frontier(rows: list[dict], view: PartView, cost: str, path: str, caption: str) -> None:
    """Test metric against ``cost``: one point per method (seeds' mean, bars: their std), the frontier joined."""
    figure, (plot,) = new_figure(height=5.0)
    scale = 100 if view.higher_is_better else 1
    on_it = frontier(rows, cost, view)
    for row in rows:
        marker = "o" if row["method"] in on_it else "x"
        plot.errorbar(row[cost], scale * row["test_mean"], yerr=scale * row["test_std"], fmt=marker, capsize=3)
        plot.annotate(
            row["method"], (row[cost], scale * row["test_mean"]), fontsize=6, xytext=(4, 2), textcoords="offset points"
        )
    by_name = {row["method"]: row for row in rows}
    plot.plot([by_name[m][cost] for m in on_it], [scale * by_name[m]["test_mean"] for m in on_it], "k--", lw=0.8)
    plot.set_xlabel(FRONTIER_AXES[cost])
    plot.set_ylabel(f"test {view.label}")
    save_figure(figure, path, caption)


def frontier_lines(
    rows: list[dict], view: PartView, part: str, folder: str, report_dir: str, caption: str
) -> list[str]:
    """The frontier plots of a part, and the methods on each frontier."""
    lines = []
    for cost, name in (("activation_mib", "memory"), ("train_seconds", "seconds")):
        path = os.path.join(folder, f"{part}_frontier_{name}.png")
        plot_frontier(rows, view, cost, path, caption)
        lines.append(f"![test {view.label} against {FRONTIER_AXES[cost]}]({os.path.relpath(path, report_dir)})")
    for cost in FRONTIER_AXES:
        names = "; ".join(frontier(rows, cost, view))  # method names hold commas
        lines.append(f"\nOn the frontier of test {view.label} against {FRONTIER_AXES[cost]}, cheapest first: {names}.")
    return lines


def setup_text(part: str, arguments: dict) -> str:
    """What a part trains, on what, and how long, from the study's arguments."""
    seeds = ", ".join(str(seed) for seed in arguments["seeds"])
    view = VIEWS[part]
    rates_from = view.rates_from
    choice = (
        f"Each method at the learning rate the {rates_from} part chose for it (no grid of its own), seeds {seeds}"
        if rates_from
        else f"Learning rate chosen on the validation split at seed {arguments['grid_seed']}, then seeds {seeds} at "
        "that rate"
    )
    common = (
        f"{choice}; the test split is used for no choice (evaluated after training; classification also before "
        "it). Training seconds count optimizer steps only (evaluation excluded)."
    )
    if view.time_of:
        common += (
            f" Equal time: the reference, {view.time_of}, trains the epochs given here (its runs are those of the "
            f"{view.data} part); every other method trains for the same wall-clock, in the steps its calibrated "
            "median step seconds allow (the steps table below), its learning-rate schedule spanning them."
        )
    if view.data == "classification":
        samples = arguments["train_samples"] or "10,202 (all)"
        epochs = arguments["convergence_epochs" if part == "convergence" else "epochs"]
        return (
            f"MiniLM-L6 (all-MiniLM-L6-v2, new 2-class head), recipe `configs/minilm_rotten_tomatoes_tokentune.yaml`: "
            f"{samples} training reviews, {epochs:g} epoch(s), batch 32, 64 tokens, AdamW, 20 warm-up "
            f"steps then linear decay, weight decay 0.01; LoRA r=8 on every linear layer, classifier trained in full. "
            f"Validation accuracy (1,275 reviews) every {arguments['eval_steps']} steps and after the last; test "
            f"split 1,275 reviews. {common}"
        )
    return (
        f"SmolLM2-135M-Instruct through TRL's `SFTTrainer` (prompt/completion chats, loss on the answers): the "
        f"1,058 chatterbot training pairs less {arguments['sft_validation_pairs']} held out for validation, "
        f"{arguments['sft_epochs']:g} epochs, batch {arguments['sft_batch_size']}, "
        f"{arguments['sft_max_length']} tokens, {arguments['sft_warmup_steps']} warm-up steps, LoRA r=8 on every "
        f"linear layer; validation answer loss every {arguments['sft_eval_steps']} steps and after the last; test: the "
        f"118 held-out pairs. {common}"
    )


def part_section(
    part: str,
    runs: list[dict],
    chosen: dict[str, float],
    arguments: dict,
    folder: str,
    report_dir: str,
    fixed_memory: dict[str, dict],
) -> tuple[str, list[dict]]:
    """The Markdown of one part, its plots written into ``folder``; also the rows it summarised.
    ``fixed_memory``: the activation memory of its methods on the longest batch, where measured."""
    view = VIEWS[part]
    grid_seed = arguments["grid_seed"]
    if not any(run["part"] == part for run in runs):
        missing = "No run of this part has been made yet; they are listed at the end."
        return f"## {view.title}\n\n{setup_text(part, arguments)}\n\n{missing}\n", []
    if view.time_of:
        runs = on_calibrated_clock(runs, part)
    by_method = chosen_runs(runs, part, chosen)
    rows = summary_rows(by_method, view, fixed_memory)
    caption = f"{view.title}; {machine_description('cpu')}"
    figures = []
    for axis, name in (("step", "steps"), ("train_seconds", "seconds")):
        path = os.path.join(folder, f"{part}_{name}.png")
        plot_curves(by_method, view, axis, path, caption)
        figures.append(f"![validation {view.label} against {name}]({os.path.relpath(path, report_dir)})")
    steps = sorted({point["step"] for group in by_method.values() for r in group for point in r["curve"]})
    step_columns = [(f"{step} steps", step) for step in steps]
    end_times = sorted((row["train_seconds"], row["method"]) for row in rows)
    time_columns = [(f"{seconds:.0f} s: {method}'s end", seconds) for seconds, method in end_times]
    sections = [
        f"## {view.title}",
        "",
        setup_text(part, arguments),
        "",
        "### Learning rate, chosen on the validation split",
        "",
        rates_text(chosen, view, grid_seed) if view.rates_from else grid_table(runs, part, view, chosen, grid_seed),
        "",
        "### At the chosen learning rate: test split, once, after training",
        "",
        summary_table(rows, view),
        "",
        memory_note(rows, fixed_memory),
        "",
        *([f"### Steps at {view.time_of}'s wall-clock", "", equal_time_table(rows, view), ""] if view.time_of else []),
        *figures,
        "",
        f"### Equal steps: validation {view.label} (mean of seeds)",
        "",
        budget_table(by_method, view, "step", step_columns),
        "",
        f"### Equal training time: validation {view.label} (mean of seeds) at each method's mean training "
        f"time (the last point reached, {100 * (TIME_SLACK - 1):.0f}% slack for timing noise)",
        "",
        budget_table(by_method, view, "train_seconds", time_columns),
        "",
        f"### Frontier: test {view.label} against activation memory and training time",
        "",
        "One point per method at its chosen learning rate (mean of its seeds; bars: their standard deviation); "
        "dots and the dashed line: the frontier, where no other method has both less cost and a better metric.",
        "",
        *frontier_lines(rows, view, part, folder, report_dir, caption),
        "",
        "### Targets",
        "",
        *target_lines({row["method"]: row for row in rows}, by_method, part, view),
        "",
    ]
    return "\n".join(sections), rows


def write_study_report(
    report_path: str,
    folder: str,
    runs: list[dict],
    chosen: dict,
    missing: list[str],
    meta: dict,
    fixed_memory: dict[str, dict[str, dict]] | None = None,
) -> None:
    """Write the report to ``report_path``, and its plots and ``results.json`` into ``folder``. ``fixed_memory``:
    by part and method, the activation memory measured on the longest batch (a memory sitting's)."""
    os.makedirs(folder, exist_ok=True)
    report_dir = os.path.dirname(os.path.abspath(report_path))
    sections, summaries = [], {}
    for part in chosen:
        text, summaries[part] = part_section(
            part,
            runs,
            chosen[part],
            meta["arguments"],
            os.path.abspath(folder),
            report_dir,
            (fixed_memory or {}).get(part, {}),
        )
        sections.append(text)
    missing_text = "\n".join(f"- {item}" for item in missing) if missing else "None: the study is complete."
    report = "\n".join(
        [
            "# Quality: TokenTune against full fine-tuning and LoRA",
            "",
            f"Written by `{meta['command']}` on {machine_description('cpu')}, from {len(runs)} runs "
            f"(each in `{os.path.relpath(os.path.join(folder, 'runs'), report_dir)}/`; a study run again skips "
            "them, so the runs may come from several sittings). What to set, drawn from these tables: the "
            "README's section *What it costs in accuracy, and what to set*.",
            "",
            *sections,
            "## Runs not yet made",
            "",
            missing_text,
            "",
        ]
    )
    with open(report_path, "w") as handle:
        handle.write(report)
    with open(os.path.join(folder, "results.json"), "w") as handle:
        json.dump({**meta, "chosen_learning_rates": chosen, "summary": summaries, "missing": missing}, handle, indent=1)
    print(report)
