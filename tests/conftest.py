"""pytest setup: the tests import their helpers and the scripts/ studies by name; nothing reaches the Hub."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# The studies and benchmarks in scripts/ are run from a checkout; their tests import them from there.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
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
