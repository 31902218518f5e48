"""Vision-language models (Llava, Idefics3): TokenTune on the language model's sequence, image tokens included."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    CLIPVisionConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3VisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from tokentune_peft import TokenTuneConfig

from helpers import assert_same_grads, check_against_naive

IMAGE_TOKEN = 127
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, vocab_size=128)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16)
IMAGE_TOKENS = 4  # per image: Llava's 2 x 2 patches of 8 px; Idefics3's 4 x 4 patches of 8 px, shuffled by 2


def build_vlm(arch: str, seed: int = 0):
    text = LlamaConfig(**TEXT, pad_token_id=0)
    if arch == "llava":
        vision = CLIPVisionConfig(**VISION, patch_size=8)
        config = LlavaConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN)
        model_class = LlavaForConditionalGeneration
    else:
        vision = Idefics3VisionConfig(**{**VISION, "image_size": 32}, patch_size=8)
        config = Idefics3Config(
            text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_id=IMAGE_TOKEN, scale_factor=2
        )
        model_class = Idefics3ForConditionalGeneration
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return model_class(config).train()


def conversation_batch(arch: str, seed: int = 0) -> dict:
    """Two rows of 14 tokens: text, one image's tokens, text; the second row left-padded by 3; labels on the
    last 5 tokens (the answer)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, IMAGE_TOKEN, (2, 14), generator=generator)
    input_ids[:, 5 : 5 + IMAGE_TOKENS] = IMAGE_TOKEN
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3], input_ids[1, :3] = 0, 0
    labels = torch.full_like(input_ids, -100)
    labels[:, -5:] = input_ids[:, -5:]
    size = 16 if arch == "llava" else 32
    shape = (2, 3, size, size) if arch == "llava" else (2, 1, 3, size, size)
    pixel_values = torch.randn(*shape, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "pixel_values": pixel_values}


def wrap_vlm(model, lora: bool, **config):
    adapter = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False) if lora else None
    torch.manual_seed(1)
    return get_peft_model(model, TokenTuneConfig(task_type="CAUSAL_LM", peft_config=adapter, **config))


ARCHS = ["llava", "idefics3"]
ENGINES = ["single-pass", "two-pass"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("arch", ARCHS)
def test_ratio_one_equals_the_stock_model(arch, lora, engine):
    model = wrap_vlm(build_vlm(arch), lora, selection_ratio=1.0, engine=engine)
    stock = copy.deepcopy(model).get_base_model()
    batch = conversation_batch(arch)
    batch["attention_mask"][:] = 1  # the stock loss of a left-padded row also counts the padding's prediction
    batch["input_ids"][1, :3] = 5

    output = model(**batch)
    output.loss.backward()
    expected = stock(**batch)
    expected.loss.backward()

    torch.testing.assert_close(output.loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert_same_grads(model, stock, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dense_top_layers", [0, 1])
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_matches_naive_definition(arch, engine, dense_top_layers, attention_path):
    """Every weight trains: the vision tower and projector get the gradient of the selected image tokens."""
    model = wrap_vlm(build_vlm(arch), lora=False, engine=engine, dense_top_layers=dense_top_layers)
    # Row 0 selects two image tokens (5, 7), row 1 none; both select some answer tokens.
    selected = torch.tensor([[0, 2, 5, 7, 10, 12, 13], [3, 4, 9, 11, 13, -1, -1]])
    check_against_naive(model, conversation_batch(arch), selected, "CAUSAL_LM", language_model=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_supervised_selection_takes_the_answer_first_then_text_and_image_tokens(arch):
    model = wrap_vlm(build_vlm(arch), lora=True, selection="supervised", selection_ratio=0.5, uniform_share=0.2)
    batch = conversation_batch(arch)

    positions = model(**batch).selected_positions[0].tolist()

    answer = set(range(8, 13))  # labels on tokens 9..13: their predicting positions are 8..12
    assert len(positions) == 7 and len(answer & set(positions)) == 5


@pytest.mark.parametrize("arch", ARCHS)
def test_evaluation_and_generation_are_the_stock_model_bit_for_bit(arch):
    model = wrap_vlm(build_vlm(arch), lora=True)
    stock = copy.deepcopy(model).get_base_model()
    batch = {k: v for k, v in conversation_batch(arch).items() if k != "labels"}
    model.eval()
    stock.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, stock(**batch).logits)
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
        assert torch.equal(generated, stock.generate(**batch, max_new_tokens=3, do_sample=False))


def test_a_frozen_vision_tower_keeps_no_activations():
    """LoRA on the language model only: the vision tower and projector run without anything kept for backward."""
    model = build_vlm("llava")
    lora = LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False)
    model = get_peft_model(model, TokenTuneConfig(task_type="CAUSAL_LM", peft_config=lora))
    saved = []
    tower = model.get_base_model().model.vision_tower
    tower.register_forward_hook(lambda module, args, output: saved.append(output.last_hidden_state.grad_fn))
    model(**conversation_batch("llava")).loss.backward()
    assert saved == [None]


def test_other_vision_language_models_are_refused_by_name():
    config = Qwen2VLConfig(
        text_config=dict(TEXT, num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, spatial_merge_size=2),
    )
    with pytest.raises(ValueError, match="does not support Qwen2VLForConditionalGeneration: supported"):
        get_peft_model(Qwen2VLForConditionalGeneration(config), TokenTuneConfig(task_type="CAUSAL_LM"))


def test_images_for_a_text_model_are_refused():
    from helpers import build_model, make_batch

    model = get_peft_model(build_model("llama", "CAUSAL_LM"), TokenTuneConfig(task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="go with `input_ids` to a vision-language model"):
        model(**make_batch(model, "CAUSAL_LM"), pixel_values=torch.randn(2, 3, 16, 16))


def test_the_trainer_at_ratio_one_logs_the_plain_trainers_losses(tmp_path):
    """Positions are prepared on `input_ids` before the forward; the merged sequence has their length."""
    from transformers import Trainer

    from tokentune_peft.trainer import TokenTuneTrainer

    from helpers import arguments

    model = wrap_vlm(build_vlm("llava"), lora=True, selection_ratio=1.0)
    plain_model = copy.deepcopy(model)
    batch = conversation_batch("llava")
    batch["attention_mask"][:] = 1  # as in the ratio-one test: the stock loss would count the padding's prediction
    examples = [{key: value[row] for key, value in batch.items()} for row in range(2)] * 4
    settings = dict(remove_unused_columns=False, per_device_train_batch_size=2)
    tokentune = TokenTuneTrainer(model=model, args=arguments(tmp_path / "a", **settings), train_dataset=examples)
    tokentune.train()
    plain = Trainer(
        model=plain_model.get_base_model(), args=arguments(tmp_path / "b", **settings), train_dataset=examples
    )
    plain.train()

    curve = [e["loss"] for e in tokentune.state.log_history if "loss" in e]
    assert len(curve) == 4
    assert curve == pytest.approx([e["loss"] for e in plain.state.log_history if "loss" in e], rel=1e-4)
