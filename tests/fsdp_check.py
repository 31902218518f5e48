"""Run under `python -m torch.distributed.run --nproc_per_node 2` (CPU, gloo), from tests/test_fsdp.py.

Each rank runs the same batch and positions through a TokenTune model sharded with torch's
`fully_shard` (per decoder layer, then the root), so FSDP2's averaged gradient must equal the
single-process gradient. Checked for TokenTune alone and with LoRA, with `reshard_after_forward`
True and False, and under a bf16 `MixedPrecisionPolicy` (against a single-process bf16 model). Then
the sharded model is saved through a full state dict and reloaded like a single-process save.
Rank 0 writes the figures as JSON to the path given as the first argument.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from peft import LoraConfig, PeftModel, get_peft_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

sys.path.insert(0, os.path.dirname(__file__))
from tokentune_peft import TokenTuneConfig  # noqa: E402
from tokentune_peft.distributed import set_backward_prefetch  # noqa: E402

from helpers import build_model, fixed_selection, leave_without_teardown, make_batch  # noqa: E402


def tokentune_model(lora: bool) -> PeftModel:
    peft_config = LoraConfig(r=8, target_modules="all-linear") if lora else None
    return get_peft_model(
        build_model("llama", "CAUSAL_LM"), TokenTuneConfig(task_type="CAUSAL_LM", peft_config=peft_config)
    )


def shard(
    model: PeftModel, reshard_after_forward: bool, mp_policy: MixedPrecisionPolicy | None = None, prefetch: bool = False
) -> PeftModel:
    """`fully_shard` on every decoder layer, then on the whole PeftModel (the root)."""
    options = {"reshard_after_forward": reshard_after_forward, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, **options)
    model = fully_shard(model, **options)
    if prefetch:
        set_backward_prefetch(model)
    return model


def step_gradients(
    model: torch.nn.Module, batch: dict, selected: torch.Tensor
) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and full (unsharded) fp32 gradients of one TokenTune step."""
    loss = model(**batch, selected_positions=selected).loss
    loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is not None:
            grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
            grads[name] = grad.float()
    return loss.item(), grads


def relative_difference(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """Largest, over parameters, of max |g - g_ref| / max |g_ref|."""
    if grads.keys() != reference.keys():
        raise AssertionError(f"different gradients: {sorted(grads.keys() ^ reference.keys())}")
    return max(((grads[k] - ref).abs().max() / ref.abs().max().clamp(min=1e-12)).item() for k, ref in reference.items())


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    base = build_model("llama", "CAUSAL_LM")
    batch = make_batch(base, "CAUSAL_LM")
    selected = fixed_selection(batch, "llama", "CAUSAL_LM", base)
    results: dict = {"world": world, "gradient": {}}

    for lora in (False, True):
        single = tokentune_model(lora)
        _, reference = step_gradients(copy.deepcopy(single), batch, selected)
        for reshard in (True, False):
            for prefetch in (False, True):
                sharded = shard(copy.deepcopy(single), reshard, prefetch=prefetch)
                _, grads = step_gradients(sharded, batch, selected)
                name = f"{'lora' if lora else 'alone'}-reshard_{reshard}" + ("-prefetch" if prefetch else "")
                results["gradient"][name] = {"max_relative_difference": relative_difference(grads, reference)}
        # bf16 parameters, fp32 reduce: against a single-process bf16 copy of the same model.
        bf16_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        sharded = shard(copy.deepcopy(single), True, bf16_policy)
        _, grads = step_gradients(sharded, batch, selected)
        _, bf16_reference = step_gradients(copy.deepcopy(single).to(torch.bfloat16), batch, selected)
        results["gradient"][f"{'lora' if lora else 'alone'}-bf16"] = {
            "max_relative_difference": relative_difference(grads, bf16_reference),
            "against_fp32": relative_difference(grads, reference),
        }

        # Saving: one step of SGD on the sharded and the single-process model, both saved, both reloaded.
        saved = {}
        for label, model in (("single", copy.deepcopy(single)), ("sharded", shard(copy.deepcopy(single), True))):
            optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
            model(**batch, selected_positions=selected).loss.backward()
            optimizer.step()
            # The full (unsharded) state dict is a collective: every rank calls it; rank 0 saves.
            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                saved[label] = tempfile.mkdtemp()
                model.save_pretrained(saved[label], state_dict=state)
        if rank == 0:
            results.setdefault("saving", {})["lora" if lora else "alone"] = loaded_logits_difference(saved, lora, batch)

    if rank == 0:
        with open(sys.argv[1], "w") as handle:
            json.dump(results, handle, indent=1)
    dist.destroy_process_group()


def loaded_logits_difference(saved: dict[str, str], lora: bool, batch: dict) -> dict:
    """Reload both saves as a user would, and compare their eval logits (and against the untrained model)."""
    from transformers import AutoModelForCausalLM

    logits = {}
    for label, folder in saved.items():
        if lora:
            model = PeftModel.from_pretrained(build_model("llama", "CAUSAL_LM"), folder)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder)
        with torch.no_grad():
            logits[label] = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        untrained = (
            build_model("llama", "CAUSAL_LM")
            .eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            .logits
        )
    return {
        "max_logit_difference": (logits["sharded"] - logits["single"]).abs().max().item(),
        "training_moved_logits_by": (logits["single"] - untrained).abs().max().item(),
    }


if __name__ == "__main__":
    main()
    leave_without_teardown()
