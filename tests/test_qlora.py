"""QLoRA + TokenTune: a bitsandbytes NF4 model (which runs on CPU) with LoRA, against the definition."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from tokentune_peft import TokenTuneConfig

from helpers import build_model, check_against_naive, fixed_selection, make_batch

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
    batch = make_batch(model, "CAUSAL_LM")
    check_against_naive(model, batch, fixed_selection(batch, "llama", "CAUSAL_LM", model), "CAUSAL_LM")
