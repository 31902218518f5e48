"""pytest setup: nothing reaches the Hub. The tests import their helpers by name and the benchmarks and studies
as the ``scripts`` package, both found through pyproject.toml's ``pythonpath`` (the repository root and tests/)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Scripts that the multi-process tests launch; importing them would start them.
collect_ignore = [
    "ddp_gradient_check.py",
    "fsdp_check.py",
    "fsdp_trainer_check.py",
    "deepspeed_trainer_check.py",
    "train_on_two_processes.py",
]


@pytest.fixture(params=["one-call", "blockwise"])
def attention_path(request, monkeypatch):
    """Both ways the selected queries attend over all keys: one SDPA call (short rows) and the blockwise kernel
    (long rows), here forced on the tests' short sequences."""
    if request.param == "blockwise":
        import tokentune_peft.attention

        monkeypatch.setattr(tokentune_peft.attention, "ONE_CALL_ELEMENTS", 0)
    return request.param
