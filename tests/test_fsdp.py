"""TokenTune under FSDP2 (torch's `fully_shard`), and the step state surviving whatever moves forward arguments."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate.utils import send_to_device
from peft import get_peft_model
from torch.distributed.utils import _apply_to_tensors
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from tokentune_peft import TokenTuneConfig
from tokentune_peft.attention import TokenTuneStep

from helpers import build_model, fixed_selection, make_batch, torchrun

# What wrappers do to a forward's keyword arguments before the module runs.
ARGUMENT_MOVERS = {
    # FSDP2's input cast under a MixedPrecisionPolicy, and FSDP/DDP's device move (`_to_kwargs`).
    "torch_apply_to_tensors": lambda kwargs: _apply_to_tensors(lambda t: t.clone(), kwargs),
    # FSDP2's post-backward hook registration, which rebuilds dataclasses holding grad tensors.
    "fsdp_replace_grad_tensors": lambda kwargs: _fsdp_replace_grad_tensors(kwargs),
    "accelerate_send_to_device": lambda kwargs: send_to_device(kwargs, "cpu"),
    "pytree_map": lambda kwargs: tree_map(lambda x: x, kwargs),
}


def _fsdp_replace_grad_tensors(kwargs: dict) -> dict:
    from torch.distributed.fsdp._common_utils import collect_grad_tensors, replace_grad_tensors

    tensors = collect_grad_tensors(kwargs)
    return replace_grad_tensors(kwargs, iter([t.view_as(t) for t in tensors]))


def _step_and_gradients(model, batch, selected, monkeypatch) -> tuple[set[int], int, dict[str, torch.Tensor]]:
    """One training step; the ids of the step objects the attention calls received, and the gradients."""
    seen: list[int] = []
    for method in ("record", "attend"):
        original = getattr(TokenTuneStep, method)

        def spy(self, *args, _original=original, **kwargs):
            seen.append(id(self))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(TokenTuneStep, method, spy)
    model(**batch, selected_positions=selected).loss.backward()
    monkeypatch.undo()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return set(seen), len(seen), grads


@pytest.mark.parametrize("mover", sorted(ARGUMENT_MOVERS))
def test_step_state_reaches_every_attention_call_when_arguments_are_rebuilt(mover, monkeypatch):
    """Every decoder layer's keyword arguments go through `mover` (as under FSDP / DDP / accelerate):
    both passes' attention calls still get the one step instance, and the gradient is unchanged."""
    base = build_model("llama", "CAUSAL_LM")
    model = get_peft_model(base, TokenTuneConfig(task_type="CAUSAL_LM"))
    moved = copy.deepcopy(model)
    layers = moved.base_model.model.model.layers
    move = ARGUMENT_MOVERS[mover]
    for layer in layers:
        layer.register_forward_pre_hook(lambda _module, args, kwargs: (args, move(kwargs)), with_kwargs=True)
    batch = make_batch(base, "CAUSAL_LM")
    selected = fixed_selection(batch, "llama", "CAUSAL_LM", base)

    instances, calls, moved_grads = _step_and_gradients(moved, batch, selected, monkeypatch)
    _, _, grads = _step_and_gradients(model, batch, selected, monkeypatch)

    assert calls == 2 * len(layers)  # pass 1 records and pass 2 attends in every layer
    assert len(instances) == 1
    assert moved_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(moved_grads[name], grad, rtol=0, atol=0, msg=name)


def test_step_output_survives_a_pytree_round_trip():
    """DDP with find_unused_parameters=True (the Trainer's default for a PeftModel) rebuilds the output
    through torch's pytree; the step's `selected_positions` must survive it."""
    base = build_model("llama", "CAUSAL_LM")
    model = get_peft_model(base, TokenTuneConfig(task_type="CAUSAL_LM"))
    batch = make_batch(base, "CAUSAL_LM")
    output = model(**batch)
    leaves, spec = tree_flatten(output)
    rebuilt = tree_unflatten(leaves, spec)
    assert isinstance(rebuilt, type(output))
    assert list(rebuilt.keys()) == list(output.keys()) == ["loss", "logits", "selected_positions"]
    assert torch.equal(rebuilt.selected_positions, output.selected_positions)


def test_fsdp2_gradient_equals_single_process_gradient(tmp_path):
    """fully_shard per decoder layer and at the root, each rank on the same batch and positions:
    FSDP2's averaged gradient is the single-process one (TokenTune alone and with LoRA, resharding after
    forward or not); under bf16 parameters with fp32 reduce it is a single-process bf16 model's, to
    bf16 rounding; a sharded save reloads (transformers checkpoint, or plain peft adapter) with the
    logits of the single-process save."""
    result = torchrun("fsdp_check.py", tmp_path / "result.json")
    assert result["world"] == 2
    gradient = result["gradient"]
    for method in ("alone", "lora"):
        for reshard in (True, False):
            for variant in ("", "-prefetch"):  # FSDP2's own backward prefetch, and set_backward_prefetch
                assert gradient[f"{method}-reshard_{reshard}{variant}"]["max_relative_difference"] < 1e-5
        assert gradient[f"{method}-bf16"]["max_relative_difference"] < 2e-2  # bf16 keeps 8 bits of mantissa
        saving = result["saving"][method]
        assert saving["max_logit_difference"] < 1e-5
        assert saving["training_moved_logits_by"] > 1e-2  # the saved weights are the trained ones


def test_three_trainer_steps_under_fsdp2_match_ddp(tmp_path):
    """TokenTuneTrainer, 3 steps on 2 processes: the FSDP2 run (accelerate's FSDP plugin, version 2)
    logs DDP's losses, alone, with LoRA, and with LoRA and a dense top layer."""
    result = torchrun("fsdp_trainer_check.py", tmp_path / "result.json")
    for method in ("alone", "lora", "dense"):
        ddp, fsdp = result[f"{method}-ddp"], result[f"{method}-fsdp2"]
        assert ddp["wrapped_as"] == "DistributedDataParallel"
        assert fsdp["wrapped_as"].startswith("FSDP")
        assert len(fsdp["losses"]) == 3
        assert fsdp["losses"] == pytest.approx(ddp["losses"], rel=1e-5)
