"""The quality study's quick mode: learning curves, a learning rate chosen on validation, seeds at that rate,
runs kept and skipped when the study is run again, a report of what exists and what is missing, and the equal-time
parts: steps from a calibration sitting, activation memory from a memory sitting."""

from __future__ import annotations

import json
import statistics

import pytest

from helpers import offline_installed
from scripts.studies import quality
from scripts.studies.common import LearningCurve
from scripts.studies.quality_report import (
    TARGETS,
    VIEWS,
    frontier,
    grid_table,
    on_calibrated_clock,
    summary_rows,
    summary_table,
    target_line,
    value_at,
)


def quick(tmp_path, *extra: str) -> None:
    quality.main(
        ["--quick", "--output_dir", str(tmp_path / "quality"), "--report_path", str(tmp_path / "quality.md")]
        + ["--scratch_dir", str(tmp_path / "scratch"), *extra]
    )


def runs_of(tmp_path, part: str) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((tmp_path / "quality" / "runs" / part).rglob("*.json"))]


def test_learning_curve_records_validation_points_against_steps_and_training_seconds():
    curve = LearningCurve()
    state = type("State", (), {"global_step": 3, "max_steps": 3})()
    control = type("Control", (), {"should_evaluate": False})()
    scheduler = type("Scheduler", (), {"get_last_lr": lambda self: [0.0]})()
    curve.on_train_begin(None, state, control)
    curve.on_step_begin(None, state, control)
    assert curve.on_step_end(None, state, control).should_evaluate  # the last step is always evaluated
    curve.on_evaluate(None, state, control, metrics={"eval_accuracy": 0.5, "eval_runtime": 1.0}, lr_scheduler=scheduler)
    curve.on_evaluate(None, state, control, metrics={"test_accuracy": 0.6, "test_runtime": 1.0})  # not training's
    assert [(point["step"], point["eval_accuracy"]) for point in curve.points] == [(3, 0.5)]
    assert 0 < curve.points[0]["train_seconds"] == curve.train_seconds
    assert curve.points[0]["learning_rate"] == 0.0
    # The step's wall-clock runs from the start of training (later: from the step before), so it holds the train time.
    assert len(curve.step_seconds) == 1 and curve.step_seconds[0] >= curve.train_seconds


def test_grid_table_marks_a_rate_chosen_at_the_grid_edge():
    def run(method: str, rate: float, accuracy: float) -> dict:
        return {"part": "classification", "method": method, "learning_rate": rate, "seed": 0,
                "curve": [{"eval_accuracy": accuracy}]}  # fmt: skip

    runs = [run("inside", 1e-4, 0.80), run("inside", 2e-4, 0.82), run("inside", 4e-4, 0.81)]
    runs += [run("top", 1e-4, 0.80), run("top", 2e-4, 0.81), run("top", 4e-4, 0.82)]
    table = grid_table(runs, "classification", VIEWS["classification"], {"inside": 2e-4, "top": 4e-4}, 0)
    assert "| inside | 0.0001: 80.00, 0.0002: 82.00, 0.0004: 81.00 | 0.0002 |" in table
    assert "| top | 0.0001: 80.00, 0.0002: 81.00, 0.0004: 82.00 | 0.0004 (grid edge) |" in table
    assert "the rate beyond it was not tried" in table
    assert "grid edge" not in grid_table(runs[:3], "classification", VIEWS["classification"], {"inside": 2e-4}, 0)


def row(method: str, test_mean: float, activation_mib: float, train_seconds: float = 100.0, seeds: int = 3) -> dict:
    return {"method": method, "test_mean": test_mean, "test_std": 0.005, "seeds": list(range(seeds)),
            "activation_mib": activation_mib, "activation_by_seed": dict.fromkeys(range(seeds), activation_mib),
            "train_seconds": train_seconds}  # fmt: skip


@pytest.mark.parametrize("part", ["classification", "sft", "classification_equal_time", "sft_equal_time"])
def test_every_method_but_the_references_is_compared_with_one(part):
    """A method left out of its view's references would show no gap and could never meet a target."""
    methods = {method.name for method in quality.PARTS[part].methods}
    references = set(VIEWS[part].references.values())
    assert references <= methods
    assert methods - references == set(VIEWS[part].references)


def test_a_run_has_no_value_at_a_step_it_never_took_but_keeps_its_last_value_at_a_later_time():
    run = {"curve": [{"step": 64, "train_seconds": 30.0, "m": 0.7}, {"step": 100, "train_seconds": 50.0, "m": 0.8}]}
    assert value_at(run, "m", 63, "step") is None
    assert value_at(run, "m", 99, "step") == 0.7
    assert value_at(run, "m", 100, "step") == 0.8
    assert value_at(run, "m", 101, "step") is None  # stopped at 100: an equal-time method with fewer steps
    assert value_at(run, "m", 50 * 1.01, "train_seconds") == 0.8
    assert value_at(run, "m", 500, "train_seconds") == 0.8  # finished: its result stands at any later time


def test_an_equal_time_part_reads_its_seconds_on_the_calibrated_clock_and_keeps_the_measured_ones():
    plan = {"reference": "full", "reference_step_seconds": 0.9, "step_seconds": 0.6}
    curve = [{"step": 2, "train_seconds": 5.0}, {"step": 3, "train_seconds": 9.0}]
    runs = [
        {"part": "timed", "method": "full", "train_seconds": 9.0, "curve": curve},  # a slow sitting's reference
        {"part": "timed", "method": "tt", "train_seconds": 1.0, "curve": curve, "equal_time": plan},
        {"part": "steps", "method": "full", "train_seconds": 9.0, "curve": curve},
    ]
    full, tokentune, other_part = on_calibrated_clock(runs, "timed")
    assert [point["train_seconds"] for point in full["curve"]] == pytest.approx([1.8, 2.7])
    assert [point["train_seconds"] for point in tokentune["curve"]] == pytest.approx([1.2, 1.8])
    assert (full["train_seconds"], full["measured_train_seconds"]) == (pytest.approx(2.7), 9.0)
    assert (tokentune["train_seconds"], tokentune["measured_train_seconds"]) == (pytest.approx(1.8), 1.0)
    assert other_part is runs[2] and runs[0]["train_seconds"] == 9.0  # other parts, and the inputs, untouched
    assert on_calibrated_clock(runs[:1], "timed") == runs[:1]  # no plan yet: nothing to read the clock from


def test_the_frontier_holds_the_methods_no_other_beats_on_both_cost_and_metric():
    rows = [row("a", 0.80, 50), row("b", 0.79, 60), row("c", 0.83, 100), row("d", 0.82, 100), row("e", 0.84, 300)]
    assert frontier(rows, "activation_mib", VIEWS["classification"]) == ["a", "c", "e"]
    losses = [row("a", 2.0, 50), row("b", 1.9, 60), row("c", 1.95, 70)]  # a lower loss is better
    assert frontier(losses, "activation_mib", VIEWS["sft"]) == ["a", "b"]


def test_a_target_is_met_missed_or_open_within_the_memory_cap():
    view, (all_weights, _) = VIEWS["classification"], TARGETS["classification"]

    def line(*candidates: dict) -> str:
        rows = {r["method"]: r for r in (row("full fine-tuning", 0.83, 300), *candidates)}
        return target_line(all_weights, rows, view)

    assert "**met**" in line(row("TokenTune 0.3, dense 1", 0.83, 150))
    assert "**missed**" in line(row("TokenTune 0.3, dense 1", 0.81, 150))
    open_line = line(row("TokenTune 0.3, dense 1", 0.818, 150))  # 0.2 points short, std 0.5 points
    assert "**open: a configuration is within its seed spread" in open_line
    # With 5 seeds the verdict stands.
    assert "**missed**" in line(row("TokenTune 0.3, dense 1", 0.818, 150, seeds=5))
    assert "**met**" in line(row("TokenTune 0.3, dense 1", 0.822, 150, seeds=5))
    over_cap = line(row("TokenTune 0.5", 0.83, 151), row("TokenTune 0.3, dense 1", 0.81, 150))
    assert "**missed**" in over_cap and "TokenTune 0.5: 83.00 ± 0.50 (+0.00 points), 50% of the memory" in over_cap
    assert "over the memory cap" in over_cap
    assert "not measured" in line(row("TokenTune 0.3, dense 1", 0.83, 150, seeds=2))


def test_an_equal_time_target_needs_five_seeds_and_at_least_the_reference_metric():
    view, (target,) = VIEWS["sft_equal_time"], TARGETS["sft_equal_time"]

    def line(candidate: dict, reference_seeds: int = 5) -> str:
        rows = {r["method"]: r for r in (row("LoRA", 1.850, 800, seeds=reference_seeds), candidate)}
        return target_line(target, rows, view)

    assert "**met**" in line(row("LoRA + TokenTune 0.3, gradient", 1.849, 300, seeds=5))
    assert "**missed**" in line(row("LoRA + TokenTune 0.3, gradient", 1.851, 300, seeds=5))  # 0.05% over LoRA's
    assert "over the memory cap" in line(row("LoRA + TokenTune 0.3, gradient", 1.80, 330, seeds=5))  # 41%
    assert "not measured (no TokenTune configuration with 5 seeds)" in line(
        row("LoRA + TokenTune 0.1, gradient", 1.8, 100)
    )
    assert "not measured (5 seeds of LoRA needed)" in line(row("LoRA + TokenTune 0.1, gradient", 1.8, 100, seeds=5), 3)
    (classification,) = TARGETS["classification_equal_time"]
    rows = {
        r["method"]: r
        for r in (row("full fine-tuning", 0.830, 300, seeds=5), row("TokenTune 0.3", 0.826, 120, seeds=5))
    }
    assert "within 0.5 point of full fine-tuning" in target_line(
        classification, rows, VIEWS["classification_equal_time"]
    )
    assert "**met**" in target_line(classification, rows, VIEWS["classification_equal_time"])


def test_a_row_takes_its_longest_batch_memory_where_measured_else_its_runs_first_batches():
    runs = [
        {"method": "LoRA", "seed": seed, "learning_rate": 1e-3, "test": {"loss": 2.0}, "train_seconds": 5.0,
         "curve": [{"step": 10, "eval_loss": 2.1}], "activation_mib": first_batch}
        for seed, first_batch in ((0, 600.0), (1, 1200.0))
    ]  # fmt: skip
    (fixed,) = summary_rows({"LoRA": runs}, VIEWS["sft"], {"LoRA": {"activation_mib": 700.0, "batch": [8, 128]}})
    assert fixed["activation_by_seed"] == {0: 700.0, 1: 700.0} and fixed["activation_mib"] == 700.0
    (first,) = summary_rows({"LoRA": runs}, VIEWS["sft"], {})
    assert first["activation_by_seed"] == {0: 600.0, 1: 1200.0} and first["activation_mib"] == 900.0
    assert "| 900.0 * |" in summary_table([first], VIEWS["sft"]) and "| 700.0 |" in summary_table([fixed], VIEWS["sft"])


def test_the_memory_share_compares_the_seeds_both_methods_ran():
    view, (all_weights, _) = VIEWS["classification"], TARGETS["classification"]
    reference = row("full fine-tuning", 0.83, 300, seeds=5)
    reference["activation_by_seed"].update({3: 900.0, 4: 900.0})  # later seeds drew longer first batches
    candidate = row("TokenTune 0.3, dense 1", 0.83, 160)
    # Over seeds 0-2 it keeps 160 of 300 MiB (53%, over the cap), not 160 of the 5-seed mean 540 (30%).
    rows = {r["method"]: r for r in (reference, candidate)}
    assert "53% of the memory, over the memory cap" in target_line(all_weights, rows, view)


def test_a_sitting_trains_only_the_methods_it_names(tmp_path):
    quick(tmp_path, "--parts", "classification", "--seeds", "0", "--methods", "TokenTune 0.3")
    assert {run["method"] for run in runs_of(tmp_path, "classification")} == {"TokenTune 0.3"}
    report = (tmp_path / "quality.md").read_text()
    assert "- classification: full fine-tuning, learning rate 5e-05, seed 0" in report


@pytest.mark.skipif(not offline_installed, reason="needs requirements-offline.txt (scripts/setup.sh installs it)")
def test_quick_classification_study_chooses_rates_on_validation_and_resumes(tmp_path, monkeypatch):
    quick(tmp_path, "--parts", "classification", "convergence", "--seeds", "0", "1")

    runs = runs_of(tmp_path, "classification")
    results = json.loads((tmp_path / "quality" / "results.json").read_text())
    chosen = results["chosen_learning_rates"]["classification"]
    assert list(chosen) == [method.name for method in quality.CLASSIFICATION_METHODS]
    for method in quality.CLASSIFICATION_METHODS:
        mine = [run for run in runs if run["method"] == method.name]
        grid = {run["learning_rate"]: run["curve"][-1]["eval_accuracy"] for run in mine if run["seed"] == 0}
        if method.learning_rate_of is None:
            assert sorted(grid) == sorted(method.learning_rates[:2])
            assert grid[chosen[method.name]] == max(grid.values())
        else:
            assert chosen[method.name] == chosen[method.learning_rate_of]
        assert sorted(run["seed"] for run in mine if run["learning_rate"] == chosen[method.name]) == [0, 1]
        for run in mine:
            assert [point["step"] for point in run["curve"]] == [2, 4]  # every 2 steps, and the last
            assert 0 < run["curve"][0]["train_seconds"] < run["curve"][1]["train_seconds"]
            assert 0 <= run["test"]["accuracy"] <= 1 and run["activation_mib"] > 0
    longer = runs_of(tmp_path, "convergence")  # each main method at the classification part's rate, no grid
    assert {(run["method"], run["learning_rate"], run["seed"]) for run in longer} == {
        (method.name, chosen[method.name], seed) for method in quality.CONVERGENCE_METHODS for seed in (0, 1)
    }
    assert results["chosen_learning_rates"]["convergence"] == {
        m.name: chosen[m.name] for m in quality.CONVERGENCE_METHODS
    }
    report = (tmp_path / "quality.md").read_text()
    for method in quality.CLASSIFICATION_METHODS:
        assert f"\n| {method.name} | " in report
    assert "Taken from the classification part's choice (validation split, seed 0): full fine-tuning: " in report
    assert "None: the study is complete." in report
    for part in ("classification", "convergence"):
        for view in ("steps", "seconds", "frontier_memory", "frontier_seconds"):
            assert (tmp_path / "quality" / f"{part}_{view}.png").read_bytes()[:4] == b"\x89PNG"

    def no_training(*args):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setitem(quality.RUNNERS, "classification", no_training)
    monkeypatch.setitem(quality.RUNNERS, "convergence", no_training)
    quick(tmp_path, "--parts", "classification", "convergence", "--seeds", "0", "1")  # every run read back
    assert (tmp_path / "quality.md").read_text() == report


def test_a_part_that_takes_another_parts_rates_needs_that_part():
    with pytest.raises(ValueError, match="`parts` with 'convergence' must include 'classification'"):
        quality.QualityArguments(parts=["convergence"])


def test_a_study_out_of_time_lists_the_runs_it_did_not_make(tmp_path):
    quick(tmp_path, "--parts", "classification", "--seeds", "0", "--max_minutes", "0")
    report = (tmp_path / "quality.md").read_text()
    assert "- classification: full fine-tuning, learning rate 5e-05, seed 0" in report
    assert (
        "- classification: full fine-tuning, gradient checkpointing (needs full fine-tuning's learning rate)" in report
    )
    assert not (tmp_path / "quality" / "runs").exists()


@pytest.mark.skipif(not offline_installed, reason="needs requirements-offline.txt (scripts/setup.sh installs it)")
def test_quick_sft_study_runs_each_method_through_trl(tmp_path):
    quick(tmp_path, "--parts", "sft", "--seeds", "0")

    runs = runs_of(tmp_path, "sft")
    assert sorted({run["method"] for run in runs}) == sorted(method.name for method in quality.SFT_METHODS)
    chosen = json.loads((tmp_path / "quality" / "results.json").read_text())["chosen_learning_rates"]["sft"]
    for method in quality.SFT_METHODS:
        rates = sorted(run["learning_rate"] for run in runs if run["method"] == method.name)
        if method.learning_rate_of is None:
            assert rates == sorted(method.learning_rates[:2])  # two rates at seed 0
        else:
            assert rates == [chosen[method.learning_rate_of]]  # the other method's choice, no grid
    for run in runs:
        assert [point["step"] for point in run["curve"]] == [1, 2]
        assert run["test"]["loss"] > 0 and run["activation_mib"] > 0
    memory = {run["method"]: run["activation_mib"] for run in runs}
    assert memory["LoRA + TokenTune 0.3"] < memory["LoRA"]
    assert memory["LoRA, gradient checkpointing"] < memory["LoRA"]
    report = (tmp_path / "quality.md").read_text()
    assert "- SFT, two epochs: not measured (3 seeds of LoRA needed)." in report


EQUAL_TIME = {"classification_equal_time": ("classification", 4), "sft_equal_time": ("sft", 2)}  # data, quick steps


@pytest.mark.skipif(not offline_installed, reason="needs requirements-offline.txt (scripts/setup.sh installs it)")
def test_quick_equal_time_parts_train_each_method_for_its_calibrated_share_of_the_reference_time(tmp_path, monkeypatch):
    equal_time = ("--parts", *EQUAL_TIME, "--seeds", "0", "1")
    # Full fine-tuning's classification runs, made before: the equal-time part takes them as its reference's.
    quick(tmp_path, "--parts", "classification", "--methods", "classification: full fine-tuning", "--seeds", "0", "1")
    quick(tmp_path, *equal_time)  # no calibration yet: only the references train (or are copied)
    copied = runs_of(tmp_path, "classification_equal_time")
    assert len(copied) == 3 and all(
        run["copied_from"].startswith("runs/classification/full_fine-tuning/") for run in copied
    )
    assert {run["method"] for run in runs_of(tmp_path, "sft_equal_time")} == {"LoRA"}
    needs = (
        "(needs the calibrated step seconds of LoRA and the calibrated step seconds of LoRA + TokenTune 0.1, gradient)"
    )
    assert f"- sft_equal_time: LoRA + TokenTune 0.1, gradient {needs}" in (tmp_path / "quality.md").read_text()

    quick(tmp_path, *equal_time, "--sitting", "calibrate")
    calibration = json.loads((tmp_path / "quality" / "step_seconds.json").read_text())
    for part in EQUAL_TIME:
        assert list(calibration[part]) == [method.name for method in quality.PARTS[part].methods]
        for entry in calibration[part].values():  # 1 warm-up step dropped, 2 timed
            assert len(entry["step_seconds"]) == 2 and entry["median_step_seconds"] == statistics.median(
                entry["step_seconds"]
            )
    assert len(runs_of(tmp_path, "sft_equal_time")) == 3  # a calibration sitting trains nothing

    quick(tmp_path, *equal_time)
    for part, (_, reference_steps) in EQUAL_TIME.items():
        seconds = {name: entry["median_step_seconds"] for name, entry in calibration[part].items()}
        reference = quality.PARTS[part].time_of
        for run in runs_of(tmp_path, part):
            if run["method"] == reference:  # its part's epochs (the quick runs' steps)
                assert "equal_time" not in run and run["curve"][-1]["step"] == reference_steps
                continue
            steps = max(1, round(reference_steps * seconds[reference] / seconds[run["method"]]))
            assert run["equal_time"]["steps"] == steps == run["curve"][-1]["step"]
            assert run["equal_time"]["budget_seconds"] == reference_steps * seconds[reference]
            # The learning-rate schedule spans those steps: it reaches 0 at the last one, not before.
            assert run["curve"][-1]["learning_rate"] == 0.0 and all(p["learning_rate"] > 0 for p in run["curve"][:-1])
    results = json.loads((tmp_path / "quality" / "results.json").read_text())
    for part in EQUAL_TIME:
        rows = results["summary"][part]
        assert [row["method"] for row in rows] == [method.name for method in quality.PARTS[part].methods]
        assert all(row["seeds"] == [0, 1] and row["activation_batch"] == "first" for row in rows)
        for view in ("frontier_memory", "frontier_seconds"):
            assert (tmp_path / "quality" / f"{part}_{view}.png").read_bytes()[:4] == b"\x89PNG"
    report = (tmp_path / "quality.md").read_text()
    assert "### Steps at LoRA's wall-clock" in report and "### Steps at full fine-tuning's wall-clock" in report

    quick(tmp_path, *equal_time, "--sitting", "memory")
    memory = json.loads((tmp_path / "quality" / "activation_memory.json").read_text())
    results = json.loads((tmp_path / "quality" / "results.json").read_text())
    for part, (data, _) in EQUAL_TIME.items():
        for row in results["summary"][part]:  # one measurement per method: the same for every seed
            fixed = memory[data][row["method"]]
            assert row["activation_batch"] == "longest" and set(row["activation_by_seed"].values()) == {
                fixed["activation_mib"]
            }
    assert memory["classification"]["full fine-tuning"]["batch"][0] == 16 and memory["sft"]["LoRA"]["batch"][0] == 4

    def measured_again(*args):
        raise AssertionError("a finished run or measurement was made again")

    for part in EQUAL_TIME:
        monkeypatch.setitem(quality.RUNNERS, part, measured_again)
    for data in ("classification", "sft"):
        monkeypatch.setitem(quality.MEMORY_MEASURES, data, measured_again)
    for sitting in ("train", "calibrate", "memory"):
        quick(tmp_path, *equal_time, "--sitting", sitting)
    assert json.loads((tmp_path / "quality" / "results.json").read_text())["summary"] == results["summary"]

    calibration["sft_equal_time"]["LoRA + TokenTune 0.1, gradient"]["median_step_seconds"] *= 3
    (tmp_path / "quality" / "step_seconds.json").write_text(json.dumps(calibration))
    with pytest.raises(ValueError, match="step_seconds.json or the reference's runs changed since"):
        quick(tmp_path, *equal_time)


def test_a_classification_method_runs_the_selection_it_names_whatever_the_recipe_sets():
    from tokentune_peft.cli.recipes import parse_recipe

    from scripts.studies.quality_runners import classification_flags

    args = quality.QualityArguments()
    for part in ("classification", "classification_equal_time"):
        for method in quality.PARTS[part].methods:
            config, flags = classification_flags(args, method, 1e-4, 0, "unused", max_steps=None)
            recipe, _ = parse_recipe(config, flags)
            assert recipe.selection == method.settings.get("selection", "uniform"), method.name
