"""Run under `python -m torch.distributed.run --nproc_per_node 2` (CPU, gloo), from tests/test_deepspeed.py.

Three steps of `TokenTuneTrainer` under DDP (the Trainer's own multi-process CPU path), then the same three
steps under DeepSpeed ZeRO-2 and ZeRO-3 (`TrainingArguments(deepspeed=...)`, DeepSpeed's CPU accelerator
over gloo), TokenTune alone and with LoRA, with the engine TokenTune chooses by itself (and ZeRO-3 with two
passes too). ZeRO-3 partitions every parameter (`stage3_param_persistence_threshold: 0`; by default it
would keep this tiny model's small weights whole).

On CPU, accelerate 1.16 sets up a DeepSpeed run with no process-group backend, so it counts one process on
each rank: every rank then reads the whole data set, and the Trainer neither shards it nor averages the loss
over ranks. The DeepSpeed runs therefore set up accelerate's state first, over the gloo group DeepSpeed
uses, and let the Trainer use it (`accelerator_config={"use_configured_state": True}`). Rank 0 writes the
per-step losses and the engine each run used as JSON to the path given as the first argument.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from accelerate.state import AcceleratorState, PartialState
from peft import LoraConfig, get_peft_model
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

sys.path.insert(0, os.path.dirname(__file__))
from tokentune_peft import TokenTuneConfig  # noqa: E402
from tokentune_peft.trainer import TokenTuneTrainer  # noqa: E402

from helpers import build_model, leave_without_teardown, three_steps_on_two_ranks  # noqa: E402


def deepspeed_settings(stage: int) -> dict:
    """TrainingArguments fields for a DeepSpeed ZeRO ``stage`` run on this CPU."""
    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    del os.environ["ACCELERATE_USE_DEEPSPEED"]
    zero = {"stage": stage} | ({"stage3_param_persistence_threshold": 0} if stage == 3 else {})
    config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "zero_optimization": zero,
    }
    return {"deepspeed": config, "accelerator_config": {"use_configured_state": True}}


def train(lora: bool, stage: int | None, engine: str = "auto", dense: int = 0) -> dict:
    unset_hf_deepspeed_config()  # a previous ZeRO-3 run would build this model under deepspeed.zero.Init
    base = build_model("llama", "CAUSAL_LM")
    peft_config = LoraConfig(r=8, target_modules="all-linear") if lora else None
    config = TokenTuneConfig(task_type="CAUSAL_LM", peft_config=peft_config, engine=engine, dense_top_layers=dense)
    model = get_peft_model(base, config)
    settings = {"use_cpu": True} if stage is None else deepspeed_settings(stage)
    data, args = three_steps_on_two_ranks(base, tempfile.mkdtemp(), **settings)
    trainer = TokenTuneTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    tokentune = trainer.tokentune_engine
    parameter = next(trainer.model.parameters())
    return {
        "wrapped_as": type(trainer.model_wrapped).__name__,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "engine_used": tokentune.engine_used,
        "partitioned": parameter.numel() == 0 and hasattr(parameter, "ds_id"),
    }


def train_vision_language(stage: int | None) -> dict:
    """A tiny Llava with LoRA on every linear layer (vision tower included): the step merges the image features
    into the language model's sequence with autograd, skipping the language model, under DeepSpeed's hooks."""
    from test_multimodal import build_vlm, conversation_batch, wrap_vlm

    unset_hf_deepspeed_config()
    model = wrap_vlm(build_vlm("llava"), lora=True)
    rows = []
    for seed in range(6):
        batch = conversation_batch("llava", seed=seed)
        rows += [{key: value[row] for key, value in batch.items()} for row in range(2)]
    settings = {"use_cpu": True} if stage is None else deepspeed_settings(stage)
    data, args = three_steps_on_two_ranks(None, tempfile.mkdtemp(), data=rows, remove_unused_columns=False, **settings)
    trainer = TokenTuneTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return {
        "wrapped_as": type(trainer.model_wrapped).__name__,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "engine_used": trainer.tokentune_engine.engine_used,
        "partitioned": next(trainer.model.parameters()).numel() == 0,
    }


def main() -> None:
    torch.set_num_threads(1)
    results = {}
    methods = (("alone", False, 0), ("lora", True, 0), ("dense", True, 1))  # dense: LoRA + one dense top layer
    for method, lora, dense in methods:  # DDP first: a DeepSpeed run leaves the process set up for DeepSpeed
        results[f"{method}-ddp"] = train(lora, None, dense=dense)
    results["vision-language-ddp"] = train_vision_language(None)
    for stage in (2, 3):
        for method, lora, dense in methods:
            results[f"{method}-zero{stage}"] = train(lora, stage, dense=dense)
    results["alone-zero3-two-pass"] = train(False, 3, engine="two-pass")
    results["vision-language-zero3"] = train_vision_language(3)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as handle:
            json.dump(results, handle, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    leave_without_teardown()
