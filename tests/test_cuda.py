"""On a CUDA device: ratio 1.0 is the stock model (fp32 and bf16, both engines), and ratio 0.3 is the naive
definition (fp32), over full-precision and 4-bit (bitsandbytes' CUDA kernels) weights. Skipped without CUDA."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from tokentune_peft.engine_choice import auto_prefers_two_pass

from helpers import assert_same_grads, build_model, check_against_naive, fixed_selection, make_batch, wrap

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ENGINES = ("single-pass", "two-pass")
TASK = "CAUSAL_LM"
#: (loss, gradient) tolerances as (rtol, atol). fp32 is the CPU tests' with a looser absolute gradient tolerance
#: (GPU kernels reduce in other orders); bf16 is test_engine.py's bf16 test's.
TOLERANCES = {
    torch.float32: ((1e-5, 1e-6), (1e-4, 1e-5)),
    torch.bfloat16: ((2e-2, 2e-2), (5e-2, 5e-3)),
}


def on_cuda(batch: dict) -> dict:
    return {key: value.cuda() for key, value in batch.items()}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("dtype", TOLERANCES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("engine", ENGINES)
def test_ratio_one_on_cuda_gives_the_stock_loss_and_gradient(engine, dtype, lora):
    model = wrap(build_model("llama", TASK).to("cuda", dtype), TASK, lora, selection_ratio=1.0, engine=engine)
    stock = copy.deepcopy(model).get_base_model()
    batch = on_cuda(make_batch(model, TASK, padding_side="right"))  # see test_engine's ratio-one test

    output = model(**batch)
    output.loss.backward()
    expected = stock(**batch).loss
    expected.backward()

    (loss_rtol, loss_atol), grad_tolerance = TOLERANCES[dtype]
    assert output.loss.device.type == "cuda"
    assert (output.selected_positions >= 0).sum() == batch["attention_mask"].sum()
    torch.testing.assert_close(output.loss, expected, rtol=loss_rtol, atol=loss_atol)
    assert_same_grads(model, stock, *grad_tolerance)
    assert model.base_model.tokentune_engine.engine_used == engine


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("engine", ENGINES)
def test_ratio_point_three_on_cuda_matches_naive_definition(engine, lora):
    model = wrap(build_model("llama", TASK).cuda(), TASK, lora, selection_ratio=0.3, engine=engine)
    batch = make_batch(model, TASK)
    selected = fixed_selection(batch, "llama", TASK, model).cuda()

    output = check_against_naive(model, on_cuda(batch), selected, TASK, *TOLERANCES[torch.float32])

    assert torch.equal(output.selected_positions, selected)
    assert output.logits.device.type == "cuda"


@pytest.mark.parametrize("engine", ENGINES)
def test_qlora_on_cuda_matches_naive_definition(engine, tmp_path):
    pytest.importorskip("bitsandbytes")
    build_model("llama", TASK).save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=quantization, device_map={"": "cuda"}, use_kernels=False
    )
    model = wrap(prepare_model_for_kbit_training(base, use_gradient_checkpointing=False), TASK, True, engine=engine)
    batch = make_batch(model, TASK)
    selected = fixed_selection(batch, "llama", TASK, model).cuda()

    output = check_against_naive(model, on_cuda(batch), selected, TASK, *TOLERANCES[torch.float32])

    assert torch.equal(output.selected_positions, selected)
    assert any(type(module).__name__ == "Linear4bit" for module in model.modules())


def test_auto_engine_runs_two_passes_on_cuda():
    model = wrap(build_model("llama", TASK).cuda(), TASK, False, selection_ratio=0.3)
    batch = on_cuda(make_batch(model, TASK))

    model(**batch).loss.backward()

    engine = model.base_model.tokentune_engine
    assert (engine.engine_used, engine.engine_reason) == ("two-pass", auto_prefers_two_pass(torch.device("cuda")))
