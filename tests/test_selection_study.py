"""The selection study's quick mode trains every strategy and writes a well-formed report."""

from __future__ import annotations

import json

import pytest

from helpers import offline_installed
from scripts.studies.selection_study import TASK_STRATEGIES, main


@pytest.mark.skipif(not offline_installed, reason="needs requirements-offline.txt (scripts/setup.sh installs it)")
def test_quick_selection_study_writes_tables_timings_and_plot(tmp_path):
    report_dir = tmp_path / "report"
    main(
        [
            "--quick",
            "--seeds",
            "0",
            "1",
            "--timing_rounds",
            "1",
            "--output_dir",
            str(report_dir),
            "--runs_dir",
            str(tmp_path),
        ]
    )

    results = json.loads((report_dir / "results.json").read_text())
    for task, strategies in TASK_STRATEGIES.items():
        expected = ["baseline"] + [f"{s} {ratio}" for ratio in (0.1, 0.3) for s in strategies]
        rows = results["summary"][task]
        assert [row["setting"] for row in rows] == expected
        for row in rows[1:]:
            assert row["timed_step_seconds"] > 0 and 0 < row["labelled_share"] <= 1
            if row["setting"].startswith("uniform"):  # the reference of both columns
                assert row["timed_overhead"] == 0 and row["gap_closed"] in (0, None)
    seeds = [run["seed"] for run in results["runs"]["classification"] if run["setting"] == "importance 0.1"]
    assert seeds == [0, 1]
    report = (report_dir / "selection.md").read_text()
    assert "| importance 0.1 |" in report and "| supervised 0.3 |" in report
    assert (report_dir / "selection.png").read_bytes()[:4] == b"\x89PNG"


def test_timing_only_writes_a_table_of_every_strategy(tmp_path):
    main(["--quick", "--timing_only", "--timing_rounds", "1", "--ratios", "0.3", "--output_dir", str(tmp_path)])

    timings = json.loads((tmp_path / "timing.json").read_text())["timings"]
    assert {task: list(by_ratio["0.3"]) for task, by_ratio in timings.items()} == {
        task: list(strategies) for task, strategies in TASK_STRATEGIES.items()
    }
    assert "| sft | 0.3 | importance |" in (tmp_path / "timing.md").read_text()
