"""Selection strategies: invariants, reproducibility, intended bias, importance and gradient signals, custom
selectors."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import get_peft_model

from tokentune_peft import TokenTuneConfig
from tokentune_peft.attention import TokenTuneStep
from tokentune_peft.selection import TokenSelector
from tokentune_peft.selection.labels import labels_per_position
from tokentune_peft.selection.sampling import evenly_spaced, selection_budget, validate_selected_positions

from helpers import assert_same_grads, build_model, head_position, make_batch, padded_mask
from naive_reference import naive_tokentune_loss

STRATEGIES = ("uniform", "supervised", "importance", "gradient")
CASES = [("llama", "CAUSAL_LM"), ("llama", "TOKEN_CLS"), ("bert", "SEQ_CLS"), ("llama", "SEQ_CLS")]


def wrapped(arch: str, task: str, selection, seed: int = 0, **config):
    torch.manual_seed(1)
    return get_peft_model(
        build_model(arch, task), TokenTuneConfig(task_type=task, selection=selection, seed=seed, **config)
    )


def selector(task: str = "CAUSAL_LM", strategy="uniform", share: float = 0.0, **budget) -> TokenSelector:
    budget = budget or {"num_selected": 4}
    return TokenSelector(task, "none", True, budget.get("selection_ratio"), budget.get("num_selected"), strategy, share)


def selected_set(positions: torch.Tensor, row: int) -> set[int]:
    return {p for p in positions[row].tolist() if p >= 0}


@settings(max_examples=60, deadline=None)
@given(
    seq_len=st.integers(2, 30),
    data=st.data(),
    ratio=st.floats(0.05, 1.0),
    strategy=st.sampled_from(STRATEGIES),
    share=st.floats(0.0, 1.0),
    left=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_every_strategy_gives_exactly_k_valid_positions_with_the_always_selected(
    seq_len, data, ratio, strategy, share, left, seed
):
    lengths = data.draw(st.lists(st.integers(1, seq_len), min_size=1, max_size=4))
    mask = padded_mask(lengths, seq_len, left)
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, mask.shape, generator=generator).masked_fill(
        torch.rand(mask.shape, generator=generator) < 0.6, -100
    )
    importance = torch.rand(mask.shape, generator=generator) ** 4
    chooser = TokenSelector("CAUSAL_LM", "last", True, ratio, None, strategy, share)

    selected = chooser.sample(None, torch.ones_like(mask), mask, labels, generator, importance)

    validate_selected_positions(selected, mask)  # sorted, unique, within the real tokens, -1 padded at the end
    always = chooser.always_selected(None, torch.ones_like(mask), mask)
    assert torch.equal((selected >= 0).sum(dim=1), selection_budget(mask, always, selection_ratio=ratio))
    for row in range(len(lengths)):
        assert set(always[row].nonzero().flatten().tolist()) <= selected_set(selected, row)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(("arch", "task"), CASES, ids=[f"{a}-{t.lower()}" for a, t in CASES])
def test_positions_chosen_in_the_forward_train_as_the_naive_definition(arch, task, strategy):
    model = wrapped(arch, task, strategy, selection_ratio=0.4)
    batch = make_batch(model, task)
    naive = copy.deepcopy(model).get_base_model()

    output = model(**batch)
    output.loss.backward()

    selected = output.selected_positions
    validate_selected_positions(selected, batch["attention_mask"])
    if task == "SEQ_CLS":
        assert (selected == head_position(model, batch, arch)[:, None]).any(dim=1).all()
    expected = naive_tokentune_loss(naive, batch, selected, task)
    expected.backward()
    torch.testing.assert_close(output.loss, expected, rtol=1e-5, atol=1e-6)
    assert_same_grads(model, naive)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_same_seed_gives_the_same_positions(strategy):
    batch = make_batch(build_model("llama", "CAUSAL_LM"), "CAUSAL_LM", seq_len=30)
    first, again, other = (
        wrapped("llama", "CAUSAL_LM", strategy, seed=seed, selection_ratio=0.3)(**batch).selected_positions
        for seed in (0, 0, 1)
    )
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_supervised_spends_the_budget_on_labelled_positions_and_keeps_its_uniform_share():
    mask = torch.ones(3, 20, dtype=torch.long)
    labels = torch.full((3, 20), -100)
    labels[:, 14:] = 7  # CAUSAL_LM: positions 13..18 predict a supervised token
    supervised = set(range(13, 19))
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        only = selector(strategy="supervised", share=0.0, num_selected=5).sample(None, mask, mask, labels, generator)
        assert all(selected_set(only, row) <= supervised for row in range(3))
        shared = selector(strategy="supervised", share=0.4, num_selected=5).sample(None, mask, mask, labels, generator)
        assert all(len(selected_set(shared, row) - supervised) == 2 for row in range(3))  # floor(0.4 x 5)
        spill = selector(strategy="supervised", share=0.0, num_selected=10).sample(None, mask, mask, labels, generator)
        assert all(selected_set(spill, row) >= supervised for row in range(3))  # 6 labelled, 4 others


def test_supervised_is_uniform_for_sequence_classification():
    batch = make_batch(build_model("bert", "SEQ_CLS"), "SEQ_CLS", seq_len=30)
    uniform, supervised = (wrapped("bert", "SEQ_CLS", s)(**batch).selected_positions for s in ("uniform", "supervised"))
    assert torch.equal(uniform, supervised)


def test_importance_favours_high_scores_yet_every_token_keeps_a_chance():
    mask = torch.ones(1, 20, dtype=torch.long)
    importance = torch.full((1, 20), 0.01)
    importance[0, 5] = 10.0
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(20)
    for _ in range(2000):
        positions = selector(strategy="importance", share=0.2, num_selected=2).sample(
            None, mask, mask, None, generator, importance
        )
        counts[positions[0]] += 1
    frequency = counts / 2000
    assert frequency[5] > 0.75  # uniform would give 2 / 20 = 0.1
    others = torch.cat([frequency[:5], frequency[6:]])
    assert (others > 0).all() and (others < 0.15).all()


def test_importance_without_scores_says_it_is_drawn_in_the_forward():
    mask = torch.ones(1, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="inside the training forward"):
        selector(strategy="importance").sample(None, mask, mask, None, torch.Generator())


def test_supervised_without_labels_raises_naming_them():
    mask = torch.ones(1, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="`labels`"):
        selector(strategy="supervised").sample(None, mask, mask, None, torch.Generator())


def reference_importance(model, batch: dict, readers: torch.Tensor, reader_weights=None) -> torch.Tensor:
    """Attention times value norm, from the stock model's eager attention weights and its own v_proj;
    with ``reader_weights`` [batch, r], each reader's part of a layer's scores multiplied by its weight."""
    if reader_weights is None:
        reader_weights = torch.ones(readers.shape)
    stock = copy.deepcopy(model).get_base_model()
    with torch.no_grad():
        output = stock(**batch, output_attentions=True, output_hidden_states=True)
    layers = stock.model.layers
    total = torch.zeros(batch["input_ids"].shape)
    for layer, attentions, hidden in zip(layers, output.attentions, output.hidden_states, strict=False):
        attention = layer.self_attn
        with torch.no_grad():
            values = attention.v_proj(layer.input_layernorm(hidden))
        batch_size, seq_len, _ = values.shape
        values = values.view(batch_size, seq_len, -1, attention.head_dim).transpose(1, 2)
        norms = values.norm(dim=-1).repeat_interleave(attention.num_key_value_groups, dim=1)  # [B, H, N]
        scores, weighted = torch.zeros(batch_size, seq_len), torch.zeros(batch_size, seq_len)
        for row in range(batch_size):
            for reader, weight in zip(readers[row].tolist(), reader_weights[row].tolist(), strict=True):
                if reader >= 0:
                    contribution = (attentions[row, :, reader, :] * norms[row]).sum(dim=0)
                    scores[row] += contribution
                    weighted[row] += weight * contribution
        total += weighted / scores.sum(dim=1, keepdim=True)
    return total


@pytest.mark.parametrize("task", ["CAUSAL_LM", "SEQ_CLS"])
def test_importance_signal_equals_attention_times_value_norm_from_the_stock_model(task):
    model = wrapped("llama", task, "importance")
    model.base_model.model.config._attn_implementation = "tokentune_eager"
    batch = make_batch(model, task)
    batch["labels"] = batch["labels"] if task == "CAUSAL_LM" else None
    engine = model.base_model.tokentune_engine
    transformers_model = model.base_model.model
    meter = engine.selector.importance_meter(
        transformers_model, batch["input_ids"], batch["attention_mask"], batch["labels"]
    )
    step = TokenTuneStep(batch["input_ids"].shape[1], observer=meter)
    with torch.no_grad():
        transformers_model.base_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], tokentune_step=step
        )

    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    expected = reference_importance(model, inputs, meter.readers)
    torch.testing.assert_close(meter.scores, expected, rtol=1e-4, atol=1e-6)
    if task == "SEQ_CLS":  # the head's token is the only reader
        assert torch.equal(meter.readers[:, 0], head_position(model, batch, "llama"))


def reference_gradient_norms(model, batch: dict, task: str) -> torch.Tensor:
    """||d loss / d logits|| per position, by autograd through a summed cross-entropy on the stock model's logits."""
    stock = copy.deepcopy(model).get_base_model()
    with torch.no_grad():
        logits = stock(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits.requires_grad_(True)
    targets = labels_per_position(task, batch["labels"])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    (gradient,) = torch.autograd.grad(loss, logits)
    return gradient.norm(dim=-1)


@pytest.mark.parametrize("task", ["CAUSAL_LM", "TOKEN_CLS"])
def test_gradient_signal_weights_each_reader_by_its_loss_gradient_from_the_stock_model(task):
    model = wrapped("llama", task, "gradient")
    model.base_model.model.config._attn_implementation = "tokentune_eager"
    batch = make_batch(model, task)
    selector = model.base_model.tokentune_engine.selector
    transformers_model = model.base_model.model
    meter = selector.importance_meter(transformers_model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    step = TokenTuneStep(batch["input_ids"].shape[1], observer=meter)
    with torch.no_grad():
        hidden = transformers_model.base_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], tokentune_step=step
        )[0]

    scores = selector.pass_one_scores(transformers_model, meter, hidden, batch["labels"])

    norms = reference_gradient_norms(model, batch, task)
    assert (norms > 0).sum() == (labels_per_position(task, batch["labels"]) != -100).sum()  # labelled ones only
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    attention = reference_importance(model, inputs, meter.readers, norms.gather(1, meter.readers.clamp(min=0)))
    expected = norms / norms.sum(dim=1, keepdim=True) + attention / attention.sum(dim=1, keepdim=True)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-6)


def test_gradient_without_labels_raises_naming_them():
    model = wrapped("llama", "CAUSAL_LM", "gradient")
    batch = make_batch(model, "CAUSAL_LM")
    with pytest.raises(ValueError, match=r"selection='gradient' needs the batch's `labels`"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def test_readers_are_capped_and_evenly_spread():
    chosen = torch.zeros(2, 100, dtype=torch.bool)
    chosen[0, 10:90] = True
    chosen[1, 3:8] = True
    readers = evenly_spaced(chosen, 32)
    assert (readers[0] >= 0).sum() == 32 and (readers[1] >= 0).sum() == 5
    assert readers[0, 0] == 10 and readers[0, 31] >= 85
    validate_selected_positions(readers, chosen.long())


def first_tokens(batch: dict, k: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A custom selector: each row's first k real tokens (plus nothing random)."""
    real = batch["attention_mask"].bool()
    rank = real.long().cumsum(dim=1)
    chosen = real & (rank <= k[:, None])
    width = int(k.max())
    index = torch.arange(chosen.shape[1]).expand_as(chosen)
    ordered = index.masked_fill(~chosen, 10**9).sort(dim=1).values[:, :width]
    return ordered.masked_fill(ordered == 10**9, -1)


def test_a_custom_selector_chooses_the_positions():
    model = wrapped("llama", "CAUSAL_LM", first_tokens, num_selected=3)
    batch = make_batch(model, "CAUSAL_LM")  # row 1 is left-padded by 4
    assert model(**batch).selected_positions.tolist() == [[0, 1, 2], [4, 5, 6]]


@pytest.mark.parametrize(
    ("selector_function", "message"),
    [
        (lambda batch, k, generator: [[0, 1]], "must return a LongTensor"),
        (lambda batch, k, generator: first_tokens(batch, k - 1, generator), r"positions per row; k is"),
        (lambda batch, k, generator: first_tokens(batch, k, generator).flip(1), "ascending"),
        (lambda batch, k, generator: first_tokens(batch, k, generator) + 1, r"left out .*always_selected"),
    ],
    ids=["not-a-tensor", "wrong-k", "unsorted", "misses-always-selected"],
)
def test_a_custom_selector_that_breaks_the_contract_raises(selector_function, message):
    model = wrapped("llama", "CAUSAL_LM", selector_function, num_selected=3, always_select="first")
    batch = make_batch(model, "CAUSAL_LM", padding_side="right")
    with pytest.raises(ValueError, match=message):
        model(**batch)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"selection": "random"}, "`selection` must be one of"),
        ({"selection": 3}, "`selection` must be one of"),
        ({"uniform_share": 0.5}, "`uniform_share` applies to"),
        ({"selection": "supervised", "uniform_share": 1.5}, r"`uniform_share` must be a number in \[0, 1\]"),
        ({"selection": "importance", "uniform_share": "0.1"}, r"`uniform_share` must be a number in \[0, 1\]"),
        ({"selection": "gradient", "dense_top_layers": 2}, r"selection='gradient' .* `dense_top_layers` \(2\)"),
    ],
)
def test_bad_selection_settings_raise_naming_the_argument(config, message):
    with pytest.raises(ValueError, match=message):
        TokenTuneConfig(task_type="CAUSAL_LM", **config)


def test_a_config_with_a_custom_selector_saves_its_name_and_loads_with_the_function(tmp_path):
    TokenTuneConfig(task_type="CAUSAL_LM", selection=first_tokens).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"custom selector \(test_strategies.first_tokens\).*selection=my_selector"):
        TokenTuneConfig.from_pretrained(str(tmp_path))
    assert TokenTuneConfig.from_pretrained(str(tmp_path), selection=first_tokens).selection is first_tokens
    assert TokenTuneConfig(task_type="CAUSAL_LM", selection="supervised").uniform_share == 0.2
    assert TokenTuneConfig(task_type="CAUSAL_LM", selection="gradient").uniform_share == 0.2
