"""The engine benchmark times full fine-tuning and both engines side by side, and profiles them on request."""

from __future__ import annotations

import json

import pytest

from scripts.benchmarks.engine_benchmark import main


def test_engine_benchmark_times_three_settings_and_profiles_them(tmp_path):
    main(
        ["--model", "bert-minilm", "--batch_size", "2", "--seq_len", "16", "--rounds", "2", "--optimizer", "adamw"]
        + ["--dropout", "0.1", "--threads", "1", "--profile", "--output_dir", str(tmp_path)]
    )

    results = json.loads((tmp_path / "bert-minilm-v30522-dropout0.1-adamw.json").read_text())
    rows = {row["setting"]: row for row in results["results"]}
    assert list(rows) == ["full", "TokenTune 0.3 two-pass", "TokenTune 0.3 single-pass"]
    assert all(len(row["all_s"]) == 2 and row["median_s"] > 0 for row in rows.values())
    assert "dropout 0.1" in (tmp_path / "bert-minilm-v30522-dropout0.1-adamw.md").read_text()
    profile = (tmp_path / "bert-minilm-v30522-dropout0.1-adamw-profile.md").read_text()
    assert profile.count("### ") == 3 and "aten::" in profile


@pytest.mark.parametrize(("argument", "value"), [("--model", "gpt-9"), ("--optimizer", "lion")])
def test_unknown_model_or_optimizer_is_refused(argument, value):
    with pytest.raises(ValueError, match=argument.removeprefix("--")):
        main([argument, value])
