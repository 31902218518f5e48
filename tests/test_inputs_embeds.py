"""A text model fed ``inputs_embeds`` instead of ``input_ids``: the same step, the same gradient."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import assert_same_grads, build_model, check_against_naive, fixed_selection, make_batch, wrap

CASES = [("llama", "CAUSAL_LM"), ("qwen3", "TOKEN_CLS"), ("bert", "SEQ_CLS"), ("roberta", "TOKEN_CLS")]
CASE_IDS = [f"{arch}-{task.lower()}" for arch, task in CASES]
ENGINES = ["single-pass", "two-pass"]


def embedded(model, batch: dict) -> dict:
    """``batch`` with ``input_ids`` replaced by their embeddings, a leaf that requires grad."""
    inputs_embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
    return {**{k: v for k, v in batch.items() if k != "input_ids"}, "inputs_embeds": inputs_embeds}


def copy_of(batch: dict) -> dict:
    """The same batch with its own ``inputs_embeds`` leaf, so two models' gradients stay apart."""
    return {**batch, "inputs_embeds": batch["inputs_embeds"].detach().clone().requires_grad_()}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("arch", "task"), CASES, ids=CASE_IDS)
def test_ratio_one_equals_the_stock_model(arch, task, engine):
    model = wrap(build_model(arch, task), task, lora=False, selection_ratio=1.0, engine=engine)
    stock = copy.deepcopy(model).get_base_model()
    batch = embedded(stock, make_batch(stock, task, padding_side="right"))
    stock_batch = copy_of(batch)

    output = model(**batch)
    output.loss.backward()
    expected = stock(**stock_batch)
    expected.loss.backward()

    torch.testing.assert_close(output.loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert_same_grads(model, stock, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batch["inputs_embeds"].grad, stock_batch["inputs_embeds"].grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dense_top_layers", [0, 1])
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("arch", "task"), CASES, ids=CASE_IDS)
def test_gradient_matches_naive_definition(arch, task, engine, dense_top_layers):
    model = wrap(build_model(arch, task), task, lora=False, engine=engine, dense_top_layers=dense_top_layers)
    ids_batch = make_batch(model, task)
    selected = fixed_selection(ids_batch, arch, task, model)
    batch = embedded(model, ids_batch)
    naive_batch = copy_of(batch)

    check_against_naive(model, batch, selected, task, naive_batch=naive_batch)

    # The embeddings get the gradient of the selected rows only (with dense top layers too: the first layer's
    # input is detached outside the selection).
    torch.testing.assert_close(batch["inputs_embeds"].grad, naive_batch["inputs_embeds"].grad, rtol=1e-4, atol=1e-6)
    unselected = torch.ones(batch["attention_mask"].shape, dtype=torch.bool)
    for row, positions in enumerate(selected.tolist()):
        unselected[row, [p for p in positions if p >= 0]] = False
    grad = batch["inputs_embeds"].grad
    assert not grad[unselected].any() and grad[~unselected].any()


@pytest.mark.parametrize("engine", ENGINES)
def test_same_step_as_with_input_ids(engine):
    """Embeddings looked up outside the model give what the model's own lookup gives, sampled positions too."""
    task = "CAUSAL_LM"
    with_ids = wrap(build_model("llama", task), task, lora=False, selection_ratio=0.4, engine=engine)
    with_embeds = copy.deepcopy(with_ids)
    batch = make_batch(with_ids, task)

    expected = with_ids(**batch)
    output = with_embeds(**embedded(with_embeds, batch))

    assert torch.equal(output.selected_positions, expected.selected_positions)
    torch.testing.assert_close(output.loss, expected.loss, rtol=1e-6, atol=1e-7)


def test_decoder_classification_without_padding_reads_the_last_position():
    task = "SEQ_CLS"
    model = wrap(build_model("llama", task), task, lora=False, selection_ratio=0.3)
    stock = copy.deepcopy(model).get_base_model()
    batch = make_batch(stock, task)
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    batch = embedded(stock, batch)

    output = model(**batch)

    last = batch["attention_mask"].shape[1] - 1
    assert (output.selected_positions.max(dim=1).values == last).all()
    with torch.no_grad():
        expected = stock(**{k: v for k, v in batch.items() if k != "labels"}).logits
    torch.testing.assert_close(output.logits, expected, rtol=1e-5, atol=1e-5)


def test_decoder_classification_of_a_padded_batch_is_refused():
    task = "SEQ_CLS"
    model = wrap(build_model("llama", task), task, lora=False)
    batch = embedded(model, make_batch(model, task))
    with pytest.raises(ValueError, match="`inputs_embeds` reads the last position of every row"):
        model(**batch)


def test_both_or_neither_input_is_refused():
    task = "CAUSAL_LM"
    model = wrap(build_model("llama", task), task, lora=False)
    batch = make_batch(model, task)
    with pytest.raises(ValueError, match="exactly one of `input_ids` and `inputs_embeds`"):
        model(**embedded(model, batch), input_ids=batch["input_ids"])
    with pytest.raises(ValueError, match="exactly one of `input_ids` and `inputs_embeds`"):
        model(attention_mask=batch["attention_mask"], labels=batch["labels"])
    with pytest.raises(ValueError, match=r"`inputs_embeds` must be \[batch, sequence, hidden\]"):
        model(inputs_embeds=torch.zeros(2, 12), labels=batch["labels"])
