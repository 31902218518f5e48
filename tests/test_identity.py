"""Outside training steps the wrapped model is the stock model, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tokentune_peft import TokenTuneConfig

from helpers import CONFIGS, DECODERS, build_model, make_batch, tasks_of

CASES = [(arch, task) for arch in CONFIGS for task in tasks_of(arch)]


def lora_config(task: str):
    modules_to_save = None if task == "CAUSAL_LM" else ["classifier", "score"]
    return LoraConfig(
        r=4, target_modules="all-linear", init_lora_weights=False, task_type=task, modules_to_save=modules_to_save
    )


def stock_and_tokentune(arch: str, task: str, lora: bool):
    """A reference model (stock, or stock + plain peft LoRA) and the same weights under TokenTune."""
    stock = build_model(arch, task)
    torch.manual_seed(1)
    if lora:
        stock = get_peft_model(stock, lora_config(task))
    tokentune = get_peft_model(
        build_model(arch, task), TokenTuneConfig(task_type=task, peft_config=lora_config(task) if lora else None)
    )
    tokentune.load_state_dict(
        stock.state_dict() if lora else {f"base_model.model.{k}": v for k, v in stock.state_dict().items()}
    )
    return stock, tokentune


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize(("arch", "task"), CASES, ids=[f"{a}-{t.lower()}" for a, t in CASES])
def test_eval_forward_is_bit_identical(arch, task, lora):
    stock, tokentune = stock_and_tokentune(arch, task, lora)
    batch = make_batch(stock, task)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    for _ in range(2):  # train -> eval -> train -> eval keeps it so
        tokentune.train()
        tokentune(**batch).loss.backward()
        stock.eval(), tokentune.eval()
        with torch.no_grad():
            assert torch.equal(tokentune(**inputs).logits, stock(**inputs).logits)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("arch", DECODERS)
def test_generate_is_bit_identical(arch, lora):
    stock, tokentune = stock_and_tokentune(arch, "CAUSAL_LM", lora)
    stock.eval(), tokentune.eval()
    batch = make_batch(stock, "CAUSAL_LM", padding_side="left")
    settings = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    expected = stock.generate(**inputs, **settings)
    generated = tokentune.generate(**inputs, **settings)
    assert torch.equal(generated.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(generated.scores, expected.scores, strict=True))


def test_training_mode_without_autograd_is_the_stock_forward():
    stock, tokentune = stock_and_tokentune("llama", "CAUSAL_LM", lora=False)
    batch = make_batch(stock, "CAUSAL_LM")
    with torch.no_grad():
        output = tokentune(**batch)
        expected = stock(**batch)
    assert output.logits.shape == batch["input_ids"].shape + (128,)
    assert torch.equal(output.logits, expected.logits)


def test_copy_keeps_the_model_working():
    _, tokentune = stock_and_tokentune("llama", "CAUSAL_LM", lora=False)
    copied = copy.deepcopy(tokentune)
    batch = make_batch(copied, "CAUSAL_LM")
    assert copied(**batch, selected_positions=torch.tensor([[0, 5], [6, 9]])).logits.shape[:2] == (2, 2)
