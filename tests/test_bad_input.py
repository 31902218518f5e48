"""Bad configs, unsupported models and invalid selections raise clear errors."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, get_peft_model
from transformers import (
    BertConfig,
    BertLMHeadModel,
    Gemma2Config,
    Gemma2ForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    XLNetConfig,
    XLNetLMHeadModel,
)

from tokentune_peft import TokenTuneConfig

from helpers import build_model, make_batch


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"selection_ratio": 0.0}, "selection_ratio"),
        ({"selection_ratio": 1.5}, "selection_ratio"),
        ({"selection_ratio": -0.2}, "selection_ratio"),
        ({"selection_ratio": "0.3"}, "selection_ratio"),
        ({"selection_ratio": True}, "selection_ratio"),
        ({"num_selected": 0}, "num_selected"),
        ({"num_selected": 2.5}, "num_selected"),
        ({"selection_ratio": 0.3, "num_selected": 8}, "not both"),
        ({"task_type": "SEQ_2_SEQ_LM"}, "task_type"),
        ({"task_type": None}, "task_type"),
        ({"always_select": "middle"}, "always_select"),
        ({"always_select": [-1]}, "always_select"),
        ({"always_select": ["a"]}, "always_select"),
        ({"peft_config": PrefixTuningConfig(num_virtual_tokens=4)}, "LoraConfig"),
    ],
)
def test_bad_config_raises(kwargs, message):
    kwargs = {"task_type": "CAUSAL_LM", **kwargs}
    with pytest.raises(ValueError, match=message):
        TokenTuneConfig(**kwargs)


def test_unknown_config_field_from_a_file_raises():
    data = TokenTuneConfig(task_type="CAUSAL_LM").to_dict() | {"selection_temperature": 2.0}
    with pytest.raises(ValueError, match="selection_temperature"):
        TokenTuneConfig.from_dict(data)


def test_missing_config_fields_take_defaults():
    assert TokenTuneConfig.from_dict({"task_type": "SEQ_CLS"}).selection_ratio == 0.3


def tiny(config_class, **extra):
    return dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, vocab_size=128, **extra
    )


@pytest.mark.parametrize(
    ("make_model", "message"),
    [
        (
            lambda: Gemma2ForCausalLM(
                Gemma2Config(**tiny(Gemma2Config), head_dim=16, num_key_value_heads=2, attn_implementation="eager")
            ),
            "soft-capping",
        ),
        (
            lambda: GptOssForCausalLM(
                GptOssConfig(
                    **tiny(GptOssConfig),
                    head_dim=16,
                    num_key_value_heads=2,
                    num_local_experts=2,
                    num_experts_per_tok=1,
                    attn_implementation="eager",
                )
            ),
            "sinks",
        ),
        (
            lambda: BertLMHeadModel(BertConfig(**tiny(BertConfig), is_decoder=True, add_cross_attention=True)),
            "cross-attention",
        ),
        (
            lambda: XLNetLMHeadModel(XLNetConfig(d_model=64, n_layer=1, n_head=4, d_inner=128, vocab_size=128)),
            "registry",
        ),
        (
            lambda: LlamaForCausalLM(LlamaConfig(**tiny(LlamaConfig), attn_implementation="flex_attention")),
            "attn_implementation",
        ),
    ],
    ids=["softcap", "sinks", "cross-attention", "outside-registry", "flex-attention"],
)
def test_unsupported_model_raises_at_get_peft_model(make_model, message):
    with pytest.raises(ValueError, match=message):
        get_peft_model(make_model(), TokenTuneConfig(task_type="CAUSAL_LM"))


def test_changing_attention_implementation_after_wrapping_raises():
    model = get_peft_model(build_model("llama", "CAUSAL_LM"), TokenTuneConfig(task_type="CAUSAL_LM"))
    model.base_model.model.config._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match="attn_implementation was changed"):
        model(**make_batch(model, "CAUSAL_LM"))


@pytest.mark.parametrize(
    ("selected", "message"),
    [
        ([[3, 1], [5, 6]], "ascending"),
        ([[1, 1], [5, 6]], "ascending"),
        ([[1, 12], [5, 6]], "outside"),
        ([[1, 2], [0, 6]], "padding positions"),
        ([[1, -1, 2], [5, 6, 7]], "padding must come after"),
        ([[-1, -1], [5, 6]], "no token"),
        ([[1.0, 2.0], [5.0, 6.0]], "LongTensor"),
        ([[1, 2]], "rows"),
    ],
)
def test_invalid_selected_positions_raise_before_any_weight_changes(selected, message):
    model = get_peft_model(build_model("llama", "CAUSAL_LM"), TokenTuneConfig(task_type="CAUSAL_LM"))
    batch = make_batch(model, "CAUSAL_LM")  # row 1 is left-padded on positions 0-3
    with pytest.raises(ValueError, match=message):
        model(**batch, selected_positions=torch.tensor(selected))


def test_selection_missing_the_head_token_raises():
    model = get_peft_model(build_model("llama", "SEQ_CLS"), TokenTuneConfig(task_type="SEQ_CLS"))
    batch = make_batch(model, "SEQ_CLS")
    with pytest.raises(ValueError, match="classification head reads"):
        model(**batch, selected_positions=torch.tensor([[0, 5], [5, 6]]))


def test_labels_of_the_wrong_shape_raise():
    model = get_peft_model(build_model("llama", "CAUSAL_LM"), TokenTuneConfig(task_type="CAUSAL_LM"))
    batch = make_batch(model, "CAUSAL_LM")
    with pytest.raises(ValueError, match="labels"):
        model(**batch | {"labels": batch["labels"][:, :-1]})


def test_no_supervised_token_selected_gives_zero_loss_and_gradient():
    model = get_peft_model(
        build_model("llama", "CAUSAL_LM"), TokenTuneConfig(task_type="CAUSAL_LM", peft_config=LoraConfig(r=4))
    )
    batch = make_batch(model, "CAUSAL_LM")
    batch["labels"][:] = -100
    loss = model(**batch).loss
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_k_larger_than_a_sequence_is_clamped_per_row():
    model = get_peft_model(build_model("llama", "CAUSAL_LM"), TokenTuneConfig(task_type="CAUSAL_LM", num_selected=100))
    batch = make_batch(model, "CAUSAL_LM")  # rows of 12 and 8 real tokens
    selected = model(**batch).selected_positions
    assert (selected >= 0).sum(dim=1).tolist() == [12, 8]


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_row_of_padding_only_trains_the_other_rows(side):
    model = get_peft_model(build_model("llama", "CAUSAL_LM"), TokenTuneConfig(task_type="CAUSAL_LM"))
    batch = make_batch(model, "CAUSAL_LM", padding_side=side)
    batch["attention_mask"][1] = 0
    batch["input_ids"][1] = 0
    batch["labels"][1] = -100
    output = model(**batch)
    output.loss.backward()
    assert (output.selected_positions[1] == -1).all()
    assert torch.isfinite(output.loss) and output.loss > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_a_config_from_a_newer_version_with_new_fields_raises_naming_them():
    data = TokenTuneConfig(task_type="CAUSAL_LM").to_dict() | {"tokentune_version": "9.0.0", "selector": "x"}
    with pytest.raises(ValueError, match=r"selector.*newer version"):
        TokenTuneConfig.from_dict(data)


def test_a_config_from_a_newer_version_without_new_fields_loads_with_a_warning():
    data = TokenTuneConfig(task_type="CAUSAL_LM", seed=5).to_dict() | {"tokentune_version": "9.0.0"}
    with pytest.warns(UserWarning, match="9.0.0"):
        assert TokenTuneConfig.from_dict(data).seed == 5
