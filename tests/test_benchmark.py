"""The benchmark's quick mode runs and writes well-formed results."""

from __future__ import annotations

import json

import pytest

from scripts.benchmarks.benchmark import Setting, main


def test_quick_benchmark_writes_table_json_and_plots(tmp_path):
    main(["--quick", "--output_dir", str(tmp_path)])

    results = json.loads((tmp_path / "results.json").read_text())
    rows = {row["setting"]: row for row in results["results"]}
    assert list(rows) == [
        "full",
        "lora",
        "tokentune-0.3",
        "tokentune-0.3+dense1",
        "tokentune-0.3+lora",
        "tokentune-0.3+gc",
    ]
    assert all("error" not in row for row in rows.values())
    assert rows["full"]["saved_activation_bytes_vs_full"] == 1.0
    assert rows["tokentune-0.3"]["saved_activation_bytes"] < 0.6 * rows["full"]["saved_activation_bytes"]
    assert 0.95 < rows["tokentune-0.3"]["saved_vs_ideal"] < 1.05
    assert 0.3 <= rows["tokentune-0.3"]["selected_fraction"] < 0.35
    dense = rows["tokentune-0.3+dense1"]  # one of llama-tiny's two layers runs every token
    assert 0.95 < dense["saved_vs_ideal"] < 1.05
    assert dense["saved_activation_bytes_vs_dense0"] > 1.2
    assert "saved vs L=0" in (tmp_path / "results.md").read_text()
    assert all(len(row["step_seconds_all"]) == 2 and row["step_seconds"] > 0 for row in rows.values())
    assert {(row["setting"], row["seq_len"]) for row in results["sweep"]} == {
        (s, n) for s in ("full", "tokentune-0.3") for n in (32, 64)
    }
    table = (tmp_path / "results.md").read_text()
    assert sum(line.startswith("| tokentune-0.3 |") for line in table.splitlines()) == 3  # table + 2 sweep rows
    assert "machine:" in table and "CPU" in table
    for plot in ("memory_vs_ratio.png", "step_time_vs_ratio.png", "memory_vs_seq_len.png"):
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("name", ["half", "tokentune-0.3+dora", "full+lora+x"])
def test_unknown_settings_raise(name):
    with pytest.raises(ValueError, match="setting"):
        Setting.parse(name)
