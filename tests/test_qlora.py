"""QLoRA + TokenTune: a bitsandbytes NF4 model (which runs on CPU) with LoRA, against the definition, and
kept trainable after an evaluation (bitsandbytes' CPU inference repacking, which has no backward)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from tokentune_peft import TokenTuneConfig, keep_4bit_layers_trainable
from tokentune_peft.quantization import four_bit_layers

from helpers import build_model, check_against_naive, fixed_selection, make_batch

bitsandbytes = pytest.importorskip("bitsandbytes")


@pytest.fixture
def four_bit_llama(tmp_path):
    """Builds a fresh NF4 tiny Llama, prepared for k-bit training, each time it is called; its 4-bit layers
    repack for CPU inference on their first evaluation, as bitsandbytes makes them on a CPU with AVX512-BF16."""
    build_model("llama", "CAUSAL_LM").save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )

    def load():
        base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization)
        for layer in four_bit_layers(base):
            layer.support_avx512bf16_for_cpu = True  # as on a CPU with AVX512-BF16, so tests mean the same anywhere
        return prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)

    return load


def lora(**options) -> LoraConfig:
    return LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, **options)


@pytest.mark.parametrize("dense", [0, 1], ids=["selective", "dense_top_1"])
def test_qlora_gradient_matches_naive_definition(four_bit_llama, dense):
    config = TokenTuneConfig(task_type="CAUSAL_LM", peft_config=lora(), dense_top_layers=dense)
    model = get_peft_model(four_bit_llama(), config).train()
    assert four_bit_layers(model)
    batch = make_batch(model, "CAUSAL_LM")
    check_against_naive(model, batch, fixed_selection(batch, "llama", "CAUSAL_LM", model), "CAUSAL_LM")


def lora_gradients(model, batch: dict, evaluate_first: bool) -> dict[str, torch.Tensor]:
    """LoRA gradients of one training step, after an evaluation forward (eval mode, no grad) if asked."""
    if evaluate_first:
        model.eval()
        with torch.no_grad():
            model(**batch)
    model.train()
    model(**batch).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def wrapped(four_bit_llama, tokentune: bool):
    torch.manual_seed(0)  # the same LoRA initialisation every time
    if tokentune:
        return get_peft_model(four_bit_llama(), TokenTuneConfig(task_type="CAUSAL_LM", selection_ratio=1.0,
                                                                peft_config=lora()))  # fmt: skip
    base = four_bit_llama()
    keep_4bit_layers_trainable(base)
    return get_peft_model(base, lora())


@pytest.mark.parametrize("tokentune", [True, False], ids=["tokentune", "plain-qlora-kept-trainable"])
def test_an_evaluation_leaves_qlora_gradients_unchanged(four_bit_llama, tokentune):
    reference = wrapped(four_bit_llama, tokentune)
    batch = make_batch(reference, "CAUSAL_LM")
    expected = lora_gradients(reference, batch, evaluate_first=False)
    model = wrapped(four_bit_llama, tokentune)
    assert not any(layer.support_avx512bf16_for_cpu for layer in four_bit_layers(model))
    got = lora_gradients(model, batch, evaluate_first=True)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


def test_without_it_bitsandbytes_repacking_changes_the_gradients(four_bit_llama):
    """The failure the two tests above guard against, shown on plain peft QLoRA."""
    torch.manual_seed(0)
    reference = get_peft_model(four_bit_llama(), lora())
    batch = make_batch(reference, "CAUSAL_LM")
    expected = lora_gradients(reference, batch, evaluate_first=False)
    torch.manual_seed(0)
    model = get_peft_model(four_bit_llama(), lora())
    with pytest.warns(UserWarning, match="autograd kernel was not registered"):
        got = lora_gradients(model, batch, evaluate_first=True)
    assert max((got[name] - expected[name]).abs().max() for name in expected) > 1e-3


def test_a_model_repacked_before_wrapping_is_refused(four_bit_llama):
    base = four_bit_llama()
    base.eval()
    with torch.no_grad():
        base(input_ids=torch.tensor([[3, 4, 5]]))
    with pytest.raises(ValueError, match="repacked by bitsandbytes for CPU inference"):
        get_peft_model(base, TokenTuneConfig(task_type="CAUSAL_LM", peft_config=lora()))


def test_a_layer_repacked_after_wrapping_stops_the_training_step(four_bit_llama):
    model = get_peft_model(four_bit_llama(), TokenTuneConfig(task_type="CAUSAL_LM", peft_config=lora()))
    batch = make_batch(model, "CAUSAL_LM")
    for layer in four_bit_layers(model):
        layer.support_avx512bf16_for_cpu = True
    model.eval()
    with torch.no_grad():
        model(**batch)
    with pytest.raises(RuntimeError, match="repacked by bitsandbytes for CPU inference after get_peft_model"):
        model.train()(**batch)
