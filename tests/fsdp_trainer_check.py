"""Run under `python -m torch.distributed.run --nproc_per_node 2` (CPU, gloo), from tests/test_fsdp.py.

Three steps of `TokenTuneTrainer` (alone, with LoRA, and with LoRA and one dense top layer) under DDP (the
Trainer's own multi-process CPU path), then the same three steps under FSDP2 through accelerate's FSDP plugin
(``fsdp_version=2``, one ``fully_shard`` per decoder layer). accelerate 1.15 keeps a CPU run's distributed
type at MULTI_CPU even with an FSDP plugin (``AcceleratorState`` sets FSDP only for accelerator devices), so
the FSDP2 run switches the Trainer's accelerator state to FSDP after building it; accelerate's own
``fsdp2_prepare_model`` then shards the model. Rank 0 writes the per-step losses as JSON to the path given as
the first argument.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from peft import LoraConfig, get_peft_model

sys.path.insert(0, os.path.dirname(__file__))
from tokentune_peft import TokenTuneConfig  # noqa: E402
from tokentune_peft.trainer import TokenTuneTrainer  # noqa: E402

from helpers import build_model, leave_without_teardown, three_steps_on_two_ranks  # noqa: E402


def train(lora: bool, fsdp: bool, dense: int = 0) -> dict:
    base = build_model("llama", "CAUSAL_LM")
    peft_config = LoraConfig(r=8, target_modules="all-linear") if lora else None
    config = TokenTuneConfig(task_type="CAUSAL_LM", peft_config=peft_config, dense_top_layers=dense)
    model = get_peft_model(base, config)
    data, args = three_steps_on_two_ranks(base, tempfile.mkdtemp(), use_cpu=True)
    trainer = TokenTuneTrainer(model=model, args=args, train_dataset=data)
    if fsdp:
        state = trainer.accelerator.state
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
            reshard_after_forward=True,
        )
        trainer.is_fsdp_enabled = True
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {
        "wrapped_as": type(trainer.model_wrapped).__name__,
        "losses": [entry["loss"] for entry in logs],
        "activation_mib": logs[0]["activation_mib"],
    }


def main() -> None:
    torch.set_num_threads(1)
    results = {}
    for method, lora, dense in (("alone", False, 0), ("lora", True, 0), ("dense", True, 1)):
        for fsdp in (False, True):
            results[f"{method}-{'fsdp2' if fsdp else 'ddp'}"] = train(lora, fsdp, dense)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as handle:
            json.dump(results, handle, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    leave_without_teardown()
