"""QLoRA + TokenTune: a bitsandbytes NF4 model (which runs on CPU) with LoRA, against the definition."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from test_engine import assert_same_grads
from tokentune_peft import TokenTuneConfig

from naive_reference import naive_tokentune_loss
from tiny_models import build_model, fixed_selection, make_batch

bitsandbytes = pytest.importorskip("bitsandbytes")


def test_qlora_gradient_matches_naive_definition(tmp_path):
    build_model("llama", "CAUSAL_LM").save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization)
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    config = TokenTuneConfig(
        task_type="CAUSAL_LM", peft_config=LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    model = get_peft_model(base, config).train()
    assert any(isinstance(m, bitsandbytes.nn.Linear4bit) for m in model.modules())
    naive = copy.deepcopy(model).get_base_model()
    batch = make_batch(model, "CAUSAL_LM")
    selected = fixed_selection(batch, "llama", "CAUSAL_LM", model)

    output = model(**batch, selected_positions=selected)
    output.loss.backward()
    expected = naive_tokentune_loss(naive, batch, selected, "CAUSAL_LM")
    expected.backward()

    torch.testing.assert_close(output.loss, expected, rtol=1e-5, atol=1e-6)
    assert_same_grads(model, naive)
