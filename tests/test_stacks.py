"""TokenTune inside the stacks people train with: the model's own loss (MoE auxiliary loss, a custom
`loss_function`), packed batches, any Trainer, label smoothing and heads that pool over many tokens.

The oracle: at ratio 1.0 TokenTune is the stock model (loss and gradients) or the stock trainer (logged
losses); below 1.0 it is the naive definition in `naive_reference.py`.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

from tokentune_peft import TokenTuneConfig
from tokentune_peft.trainer import TokenTuneTrainer

from helpers import MOE_DECODERS, STEP_BY_STEP, build_model, fixed_selection, make_batch
from naive_reference import naive_tokentune_loss


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(actual: dict, expected: dict, rel: float = 1e-5) -> None:
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        scale = grad.abs().max().clamp(min=1e-8)
        assert ((actual[name] - grad).abs().max() / scale).item() < rel, name


def tokentune(model, ratio: float = 1.0, task: str = "CAUSAL_LM", lora: bool = False):
    adapter = LoraConfig(r=4, target_modules="all-linear") if lora else None
    return get_peft_model(model, TokenTuneConfig(task_type=task, selection_ratio=ratio, peft_config=adapter)).train()


# --- The model computes its own loss on the selected slots ---------------------------------------------------


def left_padded_causal_lm_batch(arch: str, seed: int = 0) -> dict:
    """A batch whose second row is left-padded. The stock loss would also score the padding token just
    before the first real token (predicting it); TokenTune never selects padding, so that label is masked."""
    batch = make_batch(build_model(arch, "CAUSAL_LM"), "CAUSAL_LM", seed=seed)
    first_real = batch["attention_mask"].argmax(dim=1)
    batch["labels"][torch.arange(2), first_real] = -100
    return batch


@pytest.mark.parametrize("arch", MOE_DECODERS)
def test_moe_router_loss_at_ratio_one_equals_the_stock_model(arch):
    batch = left_padded_causal_lm_batch(arch)
    stock = build_model(arch, "CAUSAL_LM")
    stock_output = stock(**batch)
    stock_output.loss.backward()
    assert stock_output.aux_loss > 0
    model = tokentune(build_model(arch, "CAUSAL_LM"))
    output = model(**batch)
    output.loss.backward()
    assert output.loss.item() == pytest.approx(stock_output.loss.item(), rel=1e-5)
    assert output.aux_loss.item() == pytest.approx(stock_output.aux_loss.item(), rel=1e-5)
    assert_same_gradients(gradients(model.base_model.model), gradients(stock))


@pytest.mark.parametrize("arch", MOE_DECODERS)
def test_moe_router_loss_below_ratio_one_is_over_the_selected_tokens(arch):
    reference = build_model(arch, "CAUSAL_LM")
    batch = make_batch(reference, "CAUSAL_LM")
    selected = fixed_selection(batch, arch, "CAUSAL_LM", reference)
    naive_tokentune_loss(reference, batch, selected, "CAUSAL_LM").backward()
    model = tokentune(build_model(arch, "CAUSAL_LM"), ratio=0.3)
    loss = model(**batch, selected_positions=selected).loss
    loss.backward()
    expected = naive_tokentune_loss(build_model(arch, "CAUSAL_LM"), batch, selected, "CAUSAL_LM")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert_same_gradients(gradients(model.base_model.model), gradients(reference))


def test_a_custom_loss_function_receives_the_selected_targets():
    """A patched loss (Liger's fused cross-entropy, a weighted loss...) runs on the selected slots."""
    seen = {}

    def weighted_loss(logits, labels, vocab_size, shift_labels=None, num_items_in_batch=None, **kwargs):
        targets = labels[:, 1:].flatten() if shift_labels is None else shift_labels.flatten()
        logits = logits[:, :-1] if shift_labels is None else logits
        seen["targets"] = targets
        losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets, reduction="none")
        return (losses * (targets % 2 + 1)).sum() / (targets != -100).sum()

    stock = build_model("llama", "CAUSAL_LM")
    batch = left_padded_causal_lm_batch("llama")
    stock.loss_function = weighted_loss
    expected = stock(**batch).loss
    model = build_model("llama", "CAUSAL_LM")
    model.loss_function = weighted_loss
    selected = fixed_selection(batch, "llama", "CAUSAL_LM", model)
    assert tokentune(model)(**batch).loss.item() == pytest.approx(expected.item(), rel=1e-5)
    tokentune(model, ratio=0.3)(**batch, selected_positions=selected)
    next_labels = torch.cat([batch["labels"][:, 1:], torch.full((2, 1), -100)], dim=1)
    assert seen["targets"].tolist() == [
        next_labels[row, p].item() if p >= 0 else -100 for row in range(2) for p in selected[row].tolist()
    ]


# --- Packed and padding-free batches ---------------------------------------------------------------------------


def packed_batch() -> dict:
    """Three documents in one row, position ids restarting at 0, no attention mask (as the Trainer packs them)."""
    generator = torch.Generator().manual_seed(0)
    documents = [torch.randint(2, 128, (length,), generator=generator).tolist() for length in (5, 7, 4)]
    return DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": ids} for ids in documents])


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2"])
def test_packed_documents_attend_only_to_themselves(arch):
    batch = packed_batch()
    assert "attention_mask" not in batch and batch["position_ids"].tolist()[0][5] == 0
    # transformers keeps packed documents apart only without a cache (a cache would merge them)
    stock = build_model(arch, "CAUSAL_LM")
    expected = stock(**batch, use_cache=False)
    expected.loss.backward()
    model = tokentune(build_model(arch, "CAUSAL_LM"))
    output = model(**batch)
    output.loss.backward()
    assert output.loss.item() == pytest.approx(expected.loss.item(), rel=1e-5)
    assert_same_gradients(gradients(model.base_model.model), gradients(stock))
    second_document = batch["input_ids"][:, 5:12]
    alone = build_model(arch, "CAUSAL_LM")(input_ids=second_document).logits
    torch.testing.assert_close(output.logits[:, 5:12], alone, rtol=1e-5, atol=1e-5)


def test_packed_batch_below_ratio_one_matches_the_naive_definition():
    batch = packed_batch()
    reference = build_model("llama", "CAUSAL_LM")
    selected = torch.tensor([[0, 3, 5, 6, 11, 14]])
    expected = naive_tokentune_loss(reference, batch, selected, "CAUSAL_LM")
    expected.backward()
    model = tokentune(build_model("llama", "CAUSAL_LM"), ratio=0.3)
    loss = model(**batch, selected_positions=selected).loss
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert_same_gradients(gradients(model.base_model.model), gradients(reference))


def test_flash_attention_boundaries_are_accepted_only_when_position_ids_agree():
    collator = DataCollatorWithFlattening(return_tensors="pt", return_flash_attn_kwargs=True)
    generator = torch.Generator().manual_seed(0)
    batch = collator([{"input_ids": torch.randint(2, 128, (n,), generator=generator).tolist()} for n in (5, 7)])
    assert "cu_seq_lens_q" in batch
    model = tokentune(build_model("llama", "CAUSAL_LM"))
    plain = {key: batch[key] for key in ("input_ids", "labels", "position_ids")}
    assert model(**batch).loss.item() == model(**plain).loss.item()
    batch["cu_seq_lens_q"] = torch.tensor([0, 3, 12], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seq_lens_q.*position_ids"):
        model(**batch)


# --- Any Trainer -----------------------------------------------------------------------------------------------


def examples(task: str, count: int = 8) -> list[dict]:
    rows = []
    for seed in range(count // 2):
        if task == "CAUSAL_LM":
            batch = left_padded_causal_lm_batch("llama", seed=seed)
        else:
            batch = make_batch(build_model("llama", task), task, seed=seed)
        rows += [{key: value[row] for key, value in batch.items()} for row in range(2)]
    return rows


def arguments(output_dir, **overrides) -> TrainingArguments:
    settings = dict(STEP_BY_STEP, per_device_train_batch_size=2, learning_rate=0.1)
    return TrainingArguments(str(output_dir), **{**settings, **overrides})


def logged_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_a_plain_trainer_on_a_token_task_stops_at_its_first_step_naming_the_mixin(tmp_path):
    trainer = Trainer(
        model=tokentune(build_model("llama", "CAUSAL_LM"), ratio=0.3),
        args=arguments(tmp_path),
        train_dataset=examples("CAUSAL_LM"),
    )
    with pytest.raises(ValueError, match="num_items_in_batch.*TokenTuneTrainerMixin"):
        trainer.train()


def test_a_plain_trainer_on_sequence_classification_trains_like_the_stock_trainer(tmp_path):
    """The sequence loss does not count tokens, so the plain Trainer is exact there."""
    data = examples("SEQ_CLS")
    plain = Trainer(
        model=tokentune(build_model("llama", "SEQ_CLS"), task="SEQ_CLS"),
        args=arguments(tmp_path / "a"),
        train_dataset=data,
    )
    plain.train()
    stock = Trainer(model=build_model("llama", "SEQ_CLS"), args=arguments(tmp_path / "b"), train_dataset=data)
    stock.train()
    assert logged_losses(plain) == pytest.approx(logged_losses(stock), rel=1e-5)


def test_label_smoothing_at_ratio_one_equals_the_stock_trainer(tmp_path):
    data = examples("CAUSAL_LM")
    args = dict(label_smoothing_factor=0.1)
    ours = TokenTuneTrainer(
        model=tokentune(build_model("llama", "CAUSAL_LM")), args=arguments(tmp_path / "a", **args), train_dataset=data
    )
    ours.train()
    stock = Trainer(model=build_model("llama", "CAUSAL_LM"), args=arguments(tmp_path / "b", **args), train_dataset=data)
    stock.train()
    assert logged_losses(ours) == pytest.approx(logged_losses(stock), rel=1e-5)


def test_label_smoothing_below_ratio_one_smooths_the_selected_targets(tmp_path):
    data = examples("CAUSAL_LM", count=2)
    trainer = TokenTuneTrainer(
        model=tokentune(build_model("llama", "CAUSAL_LM"), ratio=0.3),
        args=arguments(tmp_path, label_smoothing_factor=0.1, max_steps=1, per_device_train_batch_size=2),
        train_dataset=data,
    )
    seen = {}
    fetch = trainer.get_batch_samples

    def recording_fetch(*args, **kwargs):
        batches, count = fetch(*args, **kwargs)
        seen["batch"] = dict(batches[0])
        return batches, count

    trainer.get_batch_samples = recording_fetch
    trainer.train()
    batch = seen["batch"]
    selected = batch.pop("selected_positions")
    stock = build_model("llama", "CAUSAL_LM")
    logits = stock(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    next_labels = torch.cat([batch["labels"][:, 1:], torch.full((2, 1), -100)], dim=1)
    rows = torch.arange(2)[:, None]
    targets = next_labels[rows, selected.clamp(min=0)].masked_fill(selected < 0, -100)
    expected = torch.nn.functional.cross_entropy(
        logits[rows, selected.clamp(min=0)].flatten(0, 1), targets.flatten(), label_smoothing=0.1
    )
    assert logged_losses(trainer) == pytest.approx([expected.item()], rel=1e-5)


def test_a_custom_compute_loss_func_is_refused_naming_the_models_loss_function(tmp_path):
    with pytest.raises(ValueError, match="compute_loss_func.*loss_function"):
        TokenTuneTrainer(
            model=tokentune(build_model("llama", "CAUSAL_LM")),
            args=arguments(tmp_path),
            compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.logits.sum(),
        )


# --- Heads that pool over many tokens --------------------------------------------------------------------------


def test_a_head_that_pools_over_many_tokens_is_refused_at_wrapping():
    with pytest.raises(ValueError, match="classifier_pooling='mean'.*'cls'"):
        tokentune(build_model("modernbert", "SEQ_CLS", classifier_pooling="mean"), task="SEQ_CLS")
    tokentune(build_model("modernbert", "SEQ_CLS", classifier_pooling="cls"), task="SEQ_CLS")  # one token: accepted
