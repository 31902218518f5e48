"""Image classifiers fed ``pixel_values``: TokenTune on the sequence that enters the first transformer layer."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    Dinov2Config,
    Dinov2ForImageClassification,
    SwinConfig,
    SwinForImageClassification,
    Trainer,
    ViTConfig,
    ViTForImageClassification,
)

from tokentune_peft import TokenTuneConfig, saved_activation_bytes
from tokentune_peft.trainer import TokenTuneTrainer

from helpers import arguments, assert_same_grads, check_against_naive

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32)
VISION = {"vit": (ViTConfig, ViTForImageClassification), "deit": (DeiTConfig, DeiTForImageClassification)}
TOKENS = {"vit": 17, "deit": 18}  # 16 patches of 8 x 8, the class token (and DeiT's distillation token)
NUM_LABELS = 3


def build_vision(arch: str, seed: int = 0, **sizes):
    config_class, model_class = VISION[arch]
    config = config_class(**{**TINY, "patch_size": 8, **sizes}, num_labels=NUM_LABELS, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return model_class(config).train()


def images(batch: int = 2, size: int = 32, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(batch, 3, size, size, generator=generator),
        "labels": torch.randint(0, NUM_LABELS, (batch,), generator=generator),
    }


def wrap_vision(model, lora: bool, **config):
    # PEFT's convention for vision models: LoRA on the attention's query and value projections.
    adapter = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False) if lora else None
    torch.manual_seed(1)
    return get_peft_model(model, TokenTuneConfig(task_type="SEQ_CLS", peft_config=adapter, **config))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("arch", VISION)
def test_ratio_one_equals_the_stock_model(arch, lora):
    model = wrap_vision(build_vision(arch), lora, selection_ratio=1.0)
    stock = copy.deepcopy(model).get_base_model()
    batch = images()

    output = model(**batch)
    output.loss.backward()
    expected = stock(**batch)
    expected.loss.backward()

    assert output.selected_positions.shape == (2, TOKENS[arch])
    torch.testing.assert_close(output.loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert_same_grads(model, stock, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dense_top_layers", [0, 1])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("arch", VISION)
def test_gradient_matches_naive_definition(arch, lora, dense_top_layers):
    model = wrap_vision(build_vision(arch), lora, dense_top_layers=dense_top_layers)
    selected = torch.tensor([[0, 3, 4, 9, 16], [0, 1, 7, 12, -1]])  # the class token and some patches

    output = check_against_naive(model, images(), selected, "SEQ_CLS")

    assert torch.equal(output.selected_positions, selected)


@pytest.mark.parametrize("arch", VISION)
def test_the_class_token_is_always_selected_and_the_patches_drawn_from_the_seed(arch):
    first = wrap_vision(build_vision(arch), lora=False, selection_ratio=0.3, seed=7)
    second = wrap_vision(build_vision(arch), lora=False, selection_ratio=0.3, seed=7)
    batch = images(batch=4)

    positions = first(**batch).selected_positions

    assert (positions[:, 0] == 0).all()
    assert positions.shape == (4, math.ceil(0.3 * TOKENS[arch]))
    assert torch.equal(second(**batch).selected_positions, positions)
    assert first.base_model.tokentune_engine.engine_used == "two-pass"


@pytest.mark.parametrize("arch", VISION)
def test_evaluation_is_the_stock_model_bit_for_bit(arch):
    model = wrap_vision(build_vision(arch), lora=True)
    stock = copy.deepcopy(model).get_base_model()
    pixel_values = images()["pixel_values"]
    model.eval()
    stock.eval()
    with torch.no_grad():
        assert torch.equal(model(pixel_values=pixel_values).logits, stock(pixel_values=pixel_values).logits)


def test_saved_activations_at_ratio_0_3_are_within_5_percent_of_ideal():
    """Ideal: the embeddings' own saved tensors (the pixels the patch projection keeps) for every image, r of
    what the layers and head keep in full fine-tuning, and every token's keys and values."""
    sizes = dict(
        hidden_size=192,
        num_hidden_layers=4,
        num_attention_heads=3,
        intermediate_size=768,
        image_size=224,
        patch_size=16,
    )
    batch = images(batch=4, size=224)
    full = build_vision("vit", **sizes)
    full_bytes = saved_activation_bytes(full, lambda: full(**batch).loss)
    outputs = {}
    model = wrap_vision(build_vision("vit", **sizes), lora=False, selection_ratio=0.3)
    tokentune_bytes = saved_activation_bytes(model, lambda: outputs.setdefault("out", model(**batch)))

    tokens = full.config.image_size // full.config.patch_size
    seq_len = tokens * tokens + 1
    r = int((outputs["out"].selected_positions >= 0).sum(dim=1)[0]) / seq_len
    pixels = batch["pixel_values"].numel() * 4
    keys_and_values = 2 * full.config.num_hidden_layers * 4 * seq_len * full.config.hidden_size * 4
    ideal = pixels + r * (full_bytes - pixels) + (1 - r) * keys_and_values
    assert tokentune_bytes <= 1.05 * ideal, (tokentune_bytes, ideal, full_bytes)
    assert tokentune_bytes < 0.5 * full_bytes


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (
            Dinov2ForImageClassification(Dinov2Config(**TINY, patch_size=8)),
            "its head reads the class token and the mean of every patch token",
        ),
        (
            SwinForImageClassification(
                SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4)
            ),
            "its sequence gets shorter between layers",
        ),
    ],
    ids=["dinov2", "swin"],
)
def test_vision_models_that_cannot_be_exact_are_refused_by_name(model, reason):
    with pytest.raises(ValueError, match=f"cannot train {type(model).__name__} exactly: {reason}"):
        get_peft_model(model, TokenTuneConfig(task_type="SEQ_CLS"))


def test_a_task_other_than_classification_is_refused():
    with pytest.raises(ValueError, match="classifies images: use task_type='SEQ_CLS'"):
        get_peft_model(build_vision("vit"), TokenTuneConfig(task_type="TOKEN_CLS"))


def test_the_single_pass_engine_is_refused_at_the_first_step():
    model = wrap_vision(build_vision("vit"), lora=False, engine="single-pass")
    with pytest.raises(ValueError, match="cannot run this step: the model builds its sequence from `pixel_values`"):
        model(**images())


def test_no_task_type_is_refused_naming_the_one_to_use():
    with pytest.raises(ValueError, match="An image classifier trains with 'SEQ_CLS'"):
        TokenTuneConfig(task_type=None)


def image_examples(count: int = 8) -> list[dict]:
    batch = images(batch=count)
    return [
        {"pixel_values": pixels, "labels": label}
        for pixels, label in zip(batch["pixel_values"], batch["labels"], strict=True)
    ]


def test_the_trainer_at_ratio_one_logs_the_plain_trainers_losses(tmp_path):
    model = wrap_vision(build_vision("vit"), lora=True, selection_ratio=1.0)
    plain_model = copy.deepcopy(model)  # the same LoRA weights, trained by the plain Trainer without TokenTune
    examples = image_examples()
    tokentune = TokenTuneTrainer(
        model=model, args=arguments(tmp_path / "a", remove_unused_columns=False), train_dataset=examples
    )
    tokentune.train()
    plain = Trainer(
        model=plain_model.get_base_model(),
        args=arguments(tmp_path / "b", remove_unused_columns=False),
        train_dataset=examples,
    )
    plain.train()

    curve = [e["loss"] for e in tokentune.state.log_history if "loss" in e]
    assert len(curve) == 4
    assert curve == pytest.approx([e["loss"] for e in plain.state.log_history if "loss" in e], rel=1e-4)
    assert tokentune.activation_memory["tokentune_bytes"] > 0
