"""The end-to-end Trainer benchmark times every setting's optimizer steps and counts their tokens."""

from __future__ import annotations

import json
import os

import pytest

from helpers import offline_installed
from scripts.benchmarks.trainer_benchmark import main
from scripts.common import CONFIG_DIR


@pytest.mark.skipif(not offline_installed, reason="needs requirements-offline.txt (scripts/setup.sh installs it)")
def test_trainer_benchmark_times_steps_and_counts_tokens(tmp_path):
    config = os.path.join(CONFIG_DIR, "tiny_bert_rotten_tomatoes.yaml")
    main(["--config", config, "--steps", "3", "--warmup_steps", "1", "--rounds", "2", "--output_dir", str(tmp_path)])

    results = json.loads((tmp_path / "results.json").read_text())
    rows = {row["setting"]: row for row in results["results"]}
    assert list(rows) == ["full fine-tuning", "TokenTune 0.3"]
    assert rows["full fine-tuning"]["vs_full"] == 1.0
    for row in rows.values():
        assert row["steps_timed"] == 4  # 2 rounds x (3 steps - 1 warm-up)
        assert all(seconds > 0 for seconds in row["all_seconds"])
        # 16 reviews of up to 32 tokens per step: between 16 x 2 and 16 x 32 tokens, padding included.
        assert 32 <= row["tokens_per_second"] * row["seconds_per_step"] <= 16 * 32 * 1.5
    assert "| TokenTune 0.3 |" in (tmp_path / "results.md").read_text()


def test_warmup_must_leave_steps_to_time():
    with pytest.raises(ValueError, match="warmup_steps"):
        main(["--steps", "3", "--warmup_steps", "3"])
