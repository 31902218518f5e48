"""The TokenTune step against the definition: forward, gradient, loss, and what it composes with."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import (
    CONFIGS,
    ENCODERS,
    assert_same_grads,
    build_model,
    check_against_naive,
    fixed_selection,
    make_batch,
    tasks_of,
    wrap,
)

CASES = [(arch, task) for arch in CONFIGS for task in tasks_of(arch)]
CASE_IDS = [f"{arch}-{task.lower()}" for arch, task in CASES]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize(("arch", "task"), CASES, ids=CASE_IDS)
def test_gradient_matches_naive_definition(arch, task, lora, attention_path):
    model = wrap(build_model(arch, task), task, lora)
    batch = make_batch(model, task)
    selected = fixed_selection(batch, arch, task, model)
    output = check_against_naive(model, batch, selected, task)
    assert torch.equal(output.selected_positions, selected)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "bert"])
def test_a_single_row_batch_with_a_materialised_mask_matches_naive_definition(arch):
    """One padded row (and, for mistral and qwen2, a sliding window shorter than the row): the model's
    mask has batch dimension 1, which once broadcast the selected rows against the heads silently."""
    task = "TOKEN_CLS"
    model = wrap(build_model(arch, task), task, lora=False)
    batch = {key: value[1:] for key, value in make_batch(model, task).items()}
    selected = fixed_selection(batch, arch, task, model)
    check_against_naive(model, batch, selected, task)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize(("arch", "task"), CASES, ids=CASE_IDS)
def test_forward_matches_stock_model_at_selected_positions(arch, task, padding_side, attention_path):
    if arch in ENCODERS and task == "SEQ_CLS" and padding_side == "left":
        pytest.skip("encoder poolers read index 0, which left padding makes a padding token")
    stock = build_model(arch, task)
    model = wrap(copy.deepcopy(stock), task, lora=False)
    batch = make_batch(stock, task, padding_side=padding_side)
    selected = fixed_selection(batch, arch, task, stock)

    logits = model(**batch, selected_positions=selected).logits
    with torch.no_grad():
        expected = stock(**{k: v for k, v in batch.items() if k != "labels"}).logits

    if task == "SEQ_CLS":
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        return
    assert logits.shape[:2] == selected.shape  # never logits for all tokens
    for row, positions in enumerate(selected.tolist()):
        for slot, position in enumerate(positions):
            if position >= 0:
                torch.testing.assert_close(logits[row, slot], expected[row, position], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "roberta"])
def test_user_position_ids_and_token_type_ids_are_honoured(arch):
    task = "TOKEN_CLS"
    stock = build_model(arch, task, type_vocab_size=2) if arch == "roberta" else build_model(arch, task)
    model = wrap(copy.deepcopy(stock), task, lora=False)
    batch = make_batch(stock, task, padding_side="right")
    batch["position_ids"] = torch.arange(12).expand(2, 12) + 5 + (2 if arch == "roberta" else 0)
    if arch == "roberta":
        batch["token_type_ids"] = (torch.arange(12) >= 6).long().expand(2, 12)
    selected = fixed_selection(batch, arch, task, stock)
    logits = model(**batch, selected_positions=selected).logits
    with torch.no_grad():
        expected = stock(**{k: v for k, v in batch.items() if k != "labels"}).logits
    torch.testing.assert_close(logits[0], expected[0, selected[0]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_ratio_one_gives_full_fine_tuning_gradient(arch, lora):
    task = "CAUSAL_LM" if arch == "llama" else "TOKEN_CLS"
    model = wrap(build_model(arch, task), task, lora, selection_ratio=1.0)
    stock = copy.deepcopy(model).get_base_model()
    # Right padding: with left padding the stock causal-LM loss also asks the last padding token to
    # predict the first real one, a position TokenTune never selects.
    batch = make_batch(model, task, padding_side="right")

    output = model(**batch)
    output.loss.backward()
    stock(**batch).loss.backward()

    assert (output.selected_positions >= 0).sum() == batch["attention_mask"].sum()
    assert_same_grads(model, stock)


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize(("arch", "task"), [("llama", "CAUSAL_LM"), ("mistral", "CAUSAL_LM"), ("bert", "SEQ_CLS")])
def test_gradient_checkpointing_gives_the_same_gradient(arch, task, lora, use_reentrant, attention_path):
    plain = wrap(build_model(arch, task), task, lora)
    base = build_model(arch, task)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    checkpointed = wrap(base, task, lora)
    checkpointed.load_state_dict(plain.state_dict())
    batch = make_batch(plain, task, padding_side="right")
    selected = fixed_selection(batch, arch, task, plain)

    plain(**batch, selected_positions=selected).loss.backward()
    checkpointed(**batch, selected_positions=selected).loss.backward()

    assert_same_grads(checkpointed, plain)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_bf16_weights_match_naive_definition(lora, attention_path):
    model = wrap(build_model("qwen3", "CAUSAL_LM").to(torch.bfloat16), "CAUSAL_LM", lora)
    batch = make_batch(model, "CAUSAL_LM")
    selected = fixed_selection(batch, "qwen3", "CAUSAL_LM", model)
    output = check_against_naive(model, batch, selected, "CAUSAL_LM", (2e-2, 2e-2), (5e-2, 5e-3))
    assert output.logits.dtype == torch.bfloat16


def test_samples_positions_when_none_are_given():
    model = wrap(build_model("llama", "CAUSAL_LM"), "CAUSAL_LM", lora=False, selection_ratio=0.25)
    batch = make_batch(model, "CAUSAL_LM")
    selected = model(**batch).selected_positions
    assert (selected >= 0).sum(dim=1).tolist() == [3, 2]  # ceil(0.25 x 12), ceil(0.25 x 8)
    assert batch["attention_mask"].gather(1, selected.clamp(min=0))[selected >= 0].all()
