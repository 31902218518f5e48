"""The quality script's quick mode runs the recipes and writes a well-formed report."""

from __future__ import annotations

import json

import pytest

from helpers import offline_installed
from quality import CLASSIFICATION_SETTINGS, SFT_SETTINGS, main


@pytest.mark.skipif(not offline_installed, reason="needs requirements-offline.txt (scripts/setup.sh installs it)")
def test_quick_quality_run_writes_tables_and_plot(tmp_path):
    main(["--quick", "--seeds", "0", "1", "--output_dir", str(tmp_path / "report"), "--runs_dir", str(tmp_path)])

    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert [(r["setting"], r["seed"]) for r in results["classification"]] == [
        (name, seed) for name in CLASSIFICATION_SETTINGS for seed in (0, 1)
    ]
    assert [r["setting"] for r in results["sft"]] == list(SFT_SETTINGS)
    assert all(0 <= r["results"]["after"]["test_accuracy"] <= 1 for r in results["classification"])
    assert all(len(r["results"]["sample_answers"]) == 1 for r in results["sft"])
    report = (tmp_path / "report" / "quality.md").read_text()
    for name in CLASSIFICATION_SETTINGS:
        assert f"\n| {name} | " in report
    assert "Total time" in report and "CPU" in report
    assert (tmp_path / "report" / "accuracy_vs_memory.png").read_bytes()[:4] == b"\x89PNG"
