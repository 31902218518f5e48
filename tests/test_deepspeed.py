"""TokenTune through the Trainer under DeepSpeed ZeRO-2 and ZeRO-3 (DeepSpeed's CPU accelerator, 2 processes)."""

from __future__ import annotations

import pytest

pytest.importorskip("deepspeed")

from helpers import torchrun  # noqa: E402


def test_three_trainer_steps_under_zero2_and_zero3_match_ddp(tmp_path):
    """TokenTuneTrainer, 3 steps on 2 processes: ZeRO-2 and ZeRO-3 (every parameter partitioned) log DDP's losses,
    alone, with LoRA, and with LoRA and a dense top layer. The single pass runs under both: ZeRO-3 gathers and
    frees each module's own weights around each of its calls, so the two interleaved calls of a layer each find
    them. A vision-language model's merge (the language model skipped) runs under ZeRO-3's hooks too."""
    result = torchrun("deepspeed_trainer_check.py", tmp_path / "result.json")
    for method in ("alone", "lora", "dense"):
        ddp = result[f"{method}-ddp"]
        assert ddp["wrapped_as"] == "DistributedDataParallel" and len(ddp["losses"]) == 3
        for stage in ("zero2", "zero3"):
            run = result[f"{method}-{stage}"]
            assert run["wrapped_as"] == "DeepSpeedEngine"
            assert run["engine_used"] == "single-pass"
            assert run["partitioned"] == (stage == "zero3")
            assert run["losses"] == pytest.approx(ddp["losses"], rel=1e-5)
    vision_language = result["vision-language-zero3"]
    assert vision_language["wrapped_as"] == "DeepSpeedEngine" and vision_language["partitioned"]
    assert vision_language["engine_used"] == "single-pass"
    assert vision_language["losses"] == pytest.approx(result["vision-language-ddp"]["losses"], rel=1e-5)
    two_pass = result["alone-zero3-two-pass"]
    assert two_pass["engine_used"] == "two-pass"
    assert two_pass["losses"] == pytest.approx(result["alone-ddp"]["losses"], rel=1e-5)
