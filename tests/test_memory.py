"""Activation memory: TokenTune keeps only the selected tokens' activations plus all keys/values."""

from __future__ import annotations

import gc
import weakref
from functools import partial

import torch
from peft import get_peft_model
from torch import nn
from transformers import LlamaForCausalLM

from tokentune_peft import SavedTensorMeter, TokenTuneConfig, saved_activation_bytes
from tokentune_peft.cli.model_configs import llama_config


def test_meter_counts_each_storage_once_and_skips_weights():
    layer = nn.Linear(16, 16)
    inputs = torch.randn(4, 16, requires_grad=True)
    with SavedTensorMeter(layer) as meter:
        hidden = layer(inputs)  # saves `inputs` (the weight is excluded)
        (hidden * hidden).sum()  # saves `hidden` twice: one storage
    assert meter.saved_bytes == 2 * 4 * 16 * 4


def test_measuring_a_forward_frees_its_graph_and_the_weights_it_holds():
    # SiLU in the MLP and SDPA save their own outputs: held by the graph as-is, each would hold its node.
    config = llama_config("llama-256", vocab_size=128, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).train()
    input_ids = torch.randint(0, 128, (2, 16))
    measured = saved_activation_bytes(model, partial(model, input_ids=input_ids, labels=input_ids))
    weights = [weakref.ref(parameter) for parameter in model.parameters()]
    del model
    gc.collect()
    assert measured > 0
    assert not any(weight() is not None for weight in weights)


def test_saved_activations_at_ratio_0_3_are_within_5_percent_of_ideal():
    config = llama_config("llama-256", vocab_size=1024, attn_implementation="sdpa")
    batch, seq_len, ratio = 2, 512, 0.3
    torch.manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq_len))
    full = LlamaForCausalLM(config).train()
    full_bytes = saved_activation_bytes(full, lambda: full(input_ids=input_ids, labels=input_ids).loss)

    model = get_peft_model(LlamaForCausalLM(config), TokenTuneConfig(selection_ratio=ratio, task_type="CAUSAL_LM"))
    model.train()
    outputs = {}
    tokentune_bytes = saved_activation_bytes(
        model, lambda: outputs.setdefault("out", model(input_ids=input_ids, labels=input_ids))
    )

    k = int((outputs["out"].selected_positions >= 0).sum(dim=1)[0])
    r = k / seq_len
    head_dim = config.hidden_size // config.num_attention_heads
    keys_and_values = 2 * config.num_hidden_layers * batch * seq_len * config.num_key_value_heads * head_dim * 4
    ideal = r * full_bytes + (1 - r) * keys_and_values
    assert k == 154
    assert tokentune_bytes <= 1.05 * ideal, (tokentune_bytes / 2**20, ideal / 2**20)
    assert tokentune_bytes < 0.4 * full_bytes
