"""The GPU benchmark's smoke mode runs on the CPU and writes well-formed results, and the script imports on a
machine with only torch, transformers, peft and accelerate (the GPU machine's stack)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from scripts.common import ROOT
from scripts.gpu import longest_context
from scripts.gpu.gpu_benchmark import (
    SMOKE_SETTINGS,
    GpuBenchmarkArguments,
    main,
    run_setting,
    run_setting_in_own_process,
)

#: Installed here, absent on the GPU machine.
ABSENT_ON_GPU_MACHINE = ("bitsandbytes", "datasets", "trl", "liger_kernel")


def run_smoke(output_dir, *flags: str) -> tuple[dict, str]:
    main(["--device", "cpu", "--smoke", "--own_process", "false", "--output_dir", str(output_dir), *flags])
    return json.loads((output_dir / "results.json").read_text()), (output_dir / "results.md").read_text()


def test_smoke_run_writes_table_and_json_and_tokentune_saves_activations(tmp_path):
    results, table = run_smoke(tmp_path)

    rows = {row["setting"]: row for row in results["results"]}
    assert list(rows) == SMOKE_SETTINGS and all(row["seq_len"] == 64 for row in rows.values())
    measured = {name: row for name, row in rows.items() if "skipped" not in row}
    assert all("error" not in row for row in measured.values())
    for row in measured.values():
        assert row["peak_memory_bytes"] > 0 and len(row["step_seconds_all"]) == 1 and row["step_seconds"] > 0
        assert row["saved_activation_bytes"] > 0 and row["keys_values_bytes"] > 0
    saved = {name: row["saved_activation_bytes_vs_full"] for name, row in measured.items()}
    assert saved["full"] == 1.0
    assert saved["tokentune-0.3+single-pass"] < 0.6 and saved["tokentune-0.3+two-pass"] < 0.6
    assert saved["tokentune-0.3+compile"] == pytest.approx(saved["tokentune-0.3+single-pass"], rel=0.05)  # auto: single
    assert measured["tokentune-0.3+lora+gc"]["saved_activation_bytes_vs_lora"] < 0.5
    assert saved["tokentune-0.3+two-pass"] < saved["tokentune-0.3+dense1"] < 1.0  # 1 of 2 layers dense
    assert measured["lora"]["step_seconds_vs_lora"] == 1.0
    assert measured["qlora"]["step_seconds_vs_qlora"] == 1.0
    # A 4-bit base's weights are a fraction of LoRA's; TokenTune saves the same share of activations on either.
    assert measured["tokentune-0.3+qlora"]["saved_activation_bytes_vs_qlora"] < 0.6

    assert rows["lora+liger"]["skipped"] == "Liger-Kernel needs a CUDA device"
    assert results["notes"] == ["lora+liger skipped: Liger-Kernel needs a CUDA device."]
    assert "CPU" in results["machine"] and "transformers" in results["machine"]
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| setting |"))
    table_rows = [line for line in lines if line.startswith("| ") and line != header]
    assert [line.split(" | ")[0].removeprefix("| ") for line in table_rows] == SMOKE_SETTINGS
    assert all(line.count("|") == header.count("|") for line in table_rows)
    assert "| tokentune-0.3+single-pass | 64 |" in table and "skipped: Liger-Kernel needs a CUDA device" in table
    assert "All settings in one process." in table


def test_a_setting_in_its_own_process_gives_the_rows_it_gives_in_this_one(tmp_path):
    args = GpuBenchmarkArguments(device="cpu", smoke=True, output_dir=str(tmp_path))
    rows = run_setting_in_own_process(args, "tokentune-0.3+two-pass", torch.device("cpu"), str(tmp_path))
    here = run_setting(args, "tokentune-0.3+two-pass", torch.device("cpu"), str(tmp_path))
    assert [row["seq_len"] for row in rows] == [64] and "error" not in rows[0]
    assert rows[0]["saved_activation_bytes"] == here[0]["saved_activation_bytes"]
    assert rows[0]["peak_memory_bytes"] > 0


def test_settings_left_when_the_time_budget_is_spent_are_skipped_with_a_note(tmp_path):
    results, table = run_smoke(tmp_path, "--time_budget_s", "0")

    assert all("skipped" in row for row in results["results"])
    assert "full skipped: the time budget of 0 s was spent." in results["notes"]
    assert "| full | 64 | skipped: the time budget of 0 s was spent |" in table


def test_package_and_script_import_without_the_libraries_the_gpu_machine_lacks():
    """The GPU machine has torch, transformers, peft and accelerate, and no bitsandbytes, datasets, TRL or
    Liger-Kernel: importing them must not be needed (a None in sys.modules makes an import fail, and
    ``find_spec`` report the package missing)."""
    code = (
        f"import sys; sys.modules.update(dict.fromkeys({ABSENT_ON_GPU_MACHINE!r})); "
        "import tokentune_peft, torch; from scripts.gpu import gpu_benchmark; "
        "print(gpu_benchmark.liger_unavailable(torch.device('cuda')))"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip().splitlines()[-1] == "liger_kernel is not installed"


@pytest.mark.parametrize("name", ["tokentune-0.3+dora", "lora+lora2"])
def test_settings_it_cannot_build_are_refused_before_anything_runs(name, tmp_path):
    with pytest.raises(ValueError, match="setting"):
        main(["--device", "cpu", "--settings", name, "--output_dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_four_bit_settings_are_refused_by_name_without_bitsandbytes(tmp_path):
    code = (
        "import sys; sys.modules['bitsandbytes'] = None; from scripts.gpu import gpu_benchmark; "
        f"gpu_benchmark.main(['--device', 'cpu', '--settings', 'lora', 'tokentune-0.3+qlora', '--output_dir', "
        f"{str(tmp_path)!r}])"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert completed.returncode != 0 and not any(tmp_path.iterdir())
    assert "`settings` ['tokentune-0.3+qlora'] need a 4-bit base, and bitsandbytes is not installed" in completed.stderr


def test_profile_script_times_and_profiles_each_setting_on_the_cpu(capsys):
    from scripts.gpu import gpu_profile

    gpu_profile.main(
        [
            "--device",
            "cpu",
            "--model",
            "llama-tiny",
            "--dtype",
            "float32",
            "--seq_len",
            "32",
            "--settings",
            "lora",
            "tokentune-0.3+two-pass",
            "--profile",
            "tokentune-0.3+two-pass",
        ]
    )

    printed = capsys.readouterr().out
    assert printed.count("step ms [") == 2 and printed.count("held after free") == 2
    assert "Self CPU time total" in printed and "single_pass.py" not in printed  # two passes, as asked
    assert "engine.py" in printed  # cProfile's table reaches the engine


def test_the_longest_context_search_runs_each_setting_in_its_own_process_up_to_its_limit(tmp_path):
    """On the CPU there is no cap: every setting trains up to the smoke run's longest length."""
    longest_context.main(["--device", "cpu", "--smoke", "--output_dir", str(tmp_path)])
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [row["setting"] for row in rows] == ["lora+gc", "tokentune-0.3+lora+gc", "tokentune-0.1+lora+gc"]
    assert all(row["longest_seq_len"] == 256 and row["first_refused_seq_len"] is None for row in rows), rows
    assert "| tokentune-0.3+lora+gc | 256 | None |" in (tmp_path / "results.md").read_text()
