"""Run under `accelerate launch --cpu --num_processes 2`: the DDP-averaged TokenTune gradient of a
global batch split over the processes must equal the single-process gradient of the whole batch with
the same selections. Rank 0 writes the comparison as JSON to the path given as the first argument."""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
from accelerate import Accelerator
from peft import get_peft_model

sys.path.insert(0, os.path.dirname(__file__))
from tokentune_peft import TokenTuneConfig  # noqa: E402
from tokentune_peft.selection.labels import selected_targets  # noqa: E402
from tokentune_peft.trainer import TokenTuneTrainer  # noqa: E402

from helpers import build_model, leave_without_teardown  # noqa: E402

accelerator = Accelerator(cpu=True)
rank, world = accelerator.process_index, accelerator.num_processes
model = get_peft_model(build_model("llama", "CAUSAL_LM", seed=0), TokenTuneConfig(task_type="CAUSAL_LM"))
reference = copy.deepcopy(model)

generator = torch.Generator().manual_seed(0)
rows, seq_len = 2 * world, 12
input_ids = torch.randint(2, 128, (rows, seq_len), generator=generator)
attention_mask = torch.ones_like(input_ids)
attention_mask[1, 8:] = 0
labels = input_ids.masked_fill(attention_mask == 0, -100)
selected = torch.stack([torch.randperm(8, generator=generator)[:4].sort().values for _ in range(rows)])
batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "selected_positions": selected}
num_items = int((selected_targets("CAUSAL_LM", labels, selected) != -100).sum())

shard = {key: value[2 * rank : 2 * rank + 2] for key, value in batch.items()}
ddp_model = accelerator.prepare(model)
loss = ddp_model(**shard, num_items_in_batch=num_items).loss
accelerator.backward(loss * world)  # DDP averages over processes; the loss is already over the global count

from transformers import TrainingArguments  # noqa: E402

trainer = TokenTuneTrainer(
    model=reference, args=TrainingArguments("/tmp/ddp_check", seed=3, report_to=[], use_cpu=True)
)
first_draw = trainer.tokentune_engine.prepare(
    reference, input_ids, attention_mask, generator=trainer.selection_generator
).selected_positions
draws = [None] * world
torch.distributed.all_gather_object(draws, first_draw)

if rank == 0:
    reference(**batch, num_items_in_batch=num_items).loss.backward()
    differences = {
        name: (param.grad - dict(reference.named_parameters())[name].grad).abs().max().item()
        for name, param in model.named_parameters()
    }
    scale = max(p.grad.abs().max().item() for p in reference.parameters())
    with open(sys.argv[1], "w") as handle:
        json.dump(
            {
                "max_difference": max(differences.values()),
                "largest_gradient": scale,
                "world": world,
                "ranks_draw_differently": not torch.equal(draws[0], draws[1]),
            },
            handle,
        )
accelerator.end_training()
leave_without_teardown()
