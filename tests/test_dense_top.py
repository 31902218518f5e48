"""Dense top layers (`TokenTuneConfig(dense_top_layers=L)`): against the naive definition below ratio 1.0,
the stock model at ratio 1.0, full fine-tuning's gradient above the embeddings when every layer is dense,
the plain and TokenTune-aware trainers, memory, and the errors."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorWithFlattening, LlamaForCausalLM, Trainer

from tokentune_peft import SavedTensorMeter, TokenTuneConfig, saved_activation_bytes
from tokentune_peft.cli.model_configs import llama_config
from tokentune_peft.layers import transformer_layers
from tokentune_peft.trainer import TokenTuneTrainer
from tokentune_peft.whole_batch import WholeBatchRows

from helpers import (
    CONFIGS,
    MOE_DECODERS,
    STEP_BY_STEP,
    arguments,
    assert_same_grads,
    build_model,
    causal_lm_examples,
    check_against_naive,
    fixed_selection,
    make_batch,
    tasks_of,
    wrap,
)

CASES = [(arch, task) for arch in CONFIGS for task in tasks_of(arch)]
CASE_IDS = [f"{arch}-{task.lower()}" for arch, task in CASES]
ENGINES = ["single-pass", "two-pass"]


def build(arch: str, task: str, **overrides):
    """A tiny model of ``arch`` (2 layers); MoE models without their router loss, which this mode refuses."""
    if arch in MOE_DECODERS:
        overrides.setdefault("output_router_logits", False)
    return build_model(arch, task, **overrides)


def logged_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dense", [1, 2])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize(("arch", "task"), CASES, ids=CASE_IDS)
def test_gradient_matches_naive_definition(arch, task, lora, dense, engine, attention_path):
    model = wrap(build(arch, task), task, lora, dense_top_layers=dense, engine=engine)
    batch = make_batch(model, task)
    check_against_naive(model, batch, fixed_selection(batch, arch, task, model), task)
    tokentune_engine = model.base_model.tokentune_engine
    assert tokentune_engine.engine_used == engine, tokentune_engine.engine_reason


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dense", [1, 2])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize(("arch", "task"), [("llama", "CAUSAL_LM"), ("gpt2", "TOKEN_CLS"), ("bert", "SEQ_CLS")])
def test_ratio_one_equals_the_stock_model(arch, task, lora, dense, engine):
    model = wrap(build(arch, task), task, lora, selection_ratio=1.0, dense_top_layers=dense, engine=engine)
    stock = copy.deepcopy(model).get_base_model()
    # Right padding: with left padding the stock causal-LM loss also asks the last padding token to predict
    # the first real one, through lower layers where TokenTune never selects padding.
    batch = make_batch(model, task, padding_side="right")

    output = model(**batch)
    output.loss.backward()
    expected = stock(**batch)
    expected.loss.backward()

    torch.testing.assert_close(output.loss, expected.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(output.logits, expected.logits, rtol=1e-5, atol=1e-6)
    assert_same_grads(model, stock, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("arch", "task"), [("llama", "CAUSAL_LM"), ("qwen2", "CAUSAL_LM"), ("roberta", "TOKEN_CLS")])
def test_every_layer_dense_gives_full_fine_tuning_gradient_above_the_embeddings(arch, task, engine):
    model = wrap(build(arch, task), task, lora=False, selection_ratio=0.3, dense_top_layers=2, engine=engine)
    stock = copy.deepcopy(model).get_base_model()
    batch = make_batch(model, task, padding_side="right")

    model(**batch).loss.backward()
    stock(**batch).loss.backward()

    grads = {name: p.grad for name, p in model.base_model.model.named_parameters()}
    compared = 0
    for name, parameter in stock.named_parameters():
        if "embed" in name:  # what runs before the first layer learns from the selected rows alone
            assert not torch.equal(grads[name], parameter.grad), name
            continue
        torch.testing.assert_close(grads[name], parameter.grad, rtol=1e-5, atol=1e-7, msg=name)
        compared += 1
    assert compared > 10


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_gradient(lora, engine, use_reentrant):
    plain = wrap(build("llama", "CAUSAL_LM"), "CAUSAL_LM", lora, dense_top_layers=1, engine=engine)
    base = build("llama", "CAUSAL_LM")
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    checkpointed = wrap(base, "CAUSAL_LM", lora, dense_top_layers=1, engine=engine)
    checkpointed.load_state_dict(plain.state_dict())
    batch = make_batch(plain, "CAUSAL_LM")
    selected = fixed_selection(batch, "llama", "CAUSAL_LM", plain)

    plain(**batch, selected_positions=selected).loss.backward()
    checkpointed(**batch, selected_positions=selected).loss.backward()

    assert checkpointed.base_model.tokentune_engine.engine_used == engine
    assert_same_grads(checkpointed, plain)


@pytest.mark.parametrize("engine", ENGINES)
def test_bf16_weights_match_naive_definition(engine):
    model = wrap(build("qwen3", "CAUSAL_LM").to(torch.bfloat16), "CAUSAL_LM", True, dense_top_layers=1, engine=engine)
    batch = make_batch(model, "CAUSAL_LM")
    selected = fixed_selection(batch, "qwen3", "CAUSAL_LM", model)
    output = check_against_naive(model, batch, selected, "CAUSAL_LM", (2e-2, 2e-2), (5e-2, 5e-3))
    assert output.logits.dtype == torch.bfloat16


def packed_batch() -> dict:
    """Three documents in one row, position ids restarting at 0, no attention mask."""
    generator = torch.Generator().manual_seed(0)
    documents = [torch.randint(2, 128, (length,), generator=generator).tolist() for length in (5, 7, 4)]
    batch = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": ids} for ids in documents])
    assert "attention_mask" not in batch
    return batch


@pytest.mark.parametrize("engine", ENGINES)
def test_packed_batch_matches_the_naive_definition(engine, attention_path):
    batch = packed_batch()
    model = wrap(build("mistral", "CAUSAL_LM"), "CAUSAL_LM", lora=True, dense_top_layers=1, engine=engine)
    check_against_naive(model, batch, torch.tensor([[0, 3, 5, 6, 11, 14]]), "CAUSAL_LM")


@pytest.mark.parametrize("engine", ENGINES)
def test_packed_batch_at_ratio_one_equals_the_stock_model(engine):
    """Every token selected: the single pass's grad group runs alone, and must still keep documents apart."""
    batch = packed_batch()
    config = dict(selection_ratio=1.0, dense_top_layers=1, engine=engine)
    model = wrap(build("llama", "CAUSAL_LM"), "CAUSAL_LM", False, **config)
    stock = copy.deepcopy(model).get_base_model()
    output = model(**batch)
    output.loss.backward()
    expected = stock(**batch, use_cache=False)
    expected.loss.backward()
    torch.testing.assert_close(output.loss, expected.loss, rtol=1e-5, atol=0)
    assert_same_grads(model, stock, rtol=1e-5, atol=1e-7)


def test_eval_and_generate_are_the_stock_model():
    stock = build("llama", "CAUSAL_LM").eval()
    model = wrap(copy.deepcopy(stock), "CAUSAL_LM", lora=False, dense_top_layers=1).eval()
    batch = make_batch(stock, "CAUSAL_LM")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, stock(**batch).logits)
    prompt = batch["input_ids"][:1, :6]
    assert torch.equal(
        model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False),
        stock.generate(input_ids=prompt, max_new_tokens=4, do_sample=False),
    )


# --- Trainers ----------------------------------------------------------------------------------------------


def dense_model(ratio: float, lora: bool = False, dense: int = 1):
    adapter = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False) if lora else None
    config = TokenTuneConfig(task_type="CAUSAL_LM", selection_ratio=ratio, peft_config=adapter, dense_top_layers=dense)
    model = build("llama", "CAUSAL_LM")
    torch.manual_seed(0)
    return get_peft_model(model, config)


def stock_model(lora: bool = False):
    model = build("llama", "CAUSAL_LM")
    if not lora:
        return model
    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))


@pytest.mark.parametrize("trainer_class", [Trainer, TokenTuneTrainer])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_at_ratio_one_a_trainer_logs_the_stock_trainers_losses(tmp_path, trainer_class, lora):
    settings = dict(STEP_BY_STEP, per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=0.1)
    ours = trainer_class(
        model=dense_model(1.0, lora), args=arguments(tmp_path / "a", **settings), train_dataset=causal_lm_examples()
    )
    ours.train()
    stock = Trainer(
        model=stock_model(lora), args=arguments(tmp_path / "b", **settings), train_dataset=causal_lm_examples()
    )
    stock.train()
    assert len(logged_losses(ours)) == 3
    assert logged_losses(ours) == pytest.approx(logged_losses(stock), rel=1e-5)


@pytest.mark.parametrize("trainer_class", [Trainer, TokenTuneTrainer])
def test_below_ratio_one_the_first_logged_loss_is_the_stock_trainers(tmp_path, trainer_class):
    settings = dict(STEP_BY_STEP, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    ours = trainer_class(
        model=dense_model(0.3), args=arguments(tmp_path / "a", **settings), train_dataset=causal_lm_examples()
    )
    ours.train()
    stock = Trainer(model=stock_model(), args=arguments(tmp_path / "b", **settings), train_dataset=causal_lm_examples())
    stock.train()
    assert logged_losses(ours)[0] == pytest.approx(logged_losses(stock)[0], rel=1e-5)
    assert logged_losses(ours)[1] != pytest.approx(logged_losses(stock)[1], rel=1e-5)  # the gradients differ


# --- Memory ------------------------------------------------------------------------------------------------


def bytes_saved_from(model, layer, run) -> int:
    """Activation bytes a forward saves from ``layer``'s input on (its layer, those above, the head, the loss)."""
    meter = SavedTensorMeter(model, measure_only=True)

    def start(*args) -> None:
        meter.__enter__()

    handle = layer.register_forward_pre_hook(start)
    try:
        run()
    finally:
        meter.__exit__(None, None, None)
        handle.remove()
    return meter.saved_bytes


@pytest.mark.parametrize("dense", [1, 2])
def test_saved_activations_are_within_5_percent_of_the_ideal(dense):
    """Ideal: r x full fine-tuning's bytes below the first dense layer, plus every token's keys and values in
    the layers below, plus full fine-tuning's bytes from the first dense layer on."""
    config = llama_config("llama-256", vocab_size=1024, attn_implementation="sdpa")
    batch, seq_len, ratio = 2, 512, 0.3
    torch.manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq_len))
    full = LlamaForCausalLM(config).train()
    full_bytes = saved_activation_bytes(full, lambda: full(input_ids=input_ids, labels=input_ids).loss)
    first_dense = transformer_layers(full)[-dense]
    top_bytes = bytes_saved_from(full, first_dense, lambda: full(input_ids=input_ids, labels=input_ids))

    tokentune = TokenTuneConfig(selection_ratio=ratio, task_type="CAUSAL_LM", dense_top_layers=dense)
    model = get_peft_model(LlamaForCausalLM(config), tokentune).train()
    outputs = {}
    tokentune_bytes = saved_activation_bytes(
        model, lambda: outputs.setdefault("out", model(input_ids=input_ids, labels=input_ids))
    )

    r = int((outputs["out"].selected_positions >= 0).sum(dim=1)[0]) / seq_len
    head_dim = config.hidden_size // config.num_attention_heads
    lower = config.num_hidden_layers - dense
    keys_and_values = 2 * lower * batch * seq_len * config.num_key_value_heads * head_dim * 4
    ideal = r * (full_bytes - top_bytes) + (1 - r) * keys_and_values + top_bytes
    assert tokentune_bytes <= 1.05 * ideal, (tokentune_bytes / 2**20, ideal / 2**20)
    assert tokentune_bytes >= 0.95 * ideal, (tokentune_bytes / 2**20, ideal / 2**20)


# --- Configuration and errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-1, 1.5, "2", True])
def test_a_bad_value_is_refused_by_the_config(value):
    with pytest.raises(ValueError, match="`dense_top_layers` must be an integer >= 0"):
        TokenTuneConfig(task_type="CAUSAL_LM", dense_top_layers=value)


def test_more_layers_than_the_model_has_is_refused_at_wrapping_naming_its_layer_count():
    with pytest.raises(ValueError, match=r"`dense_top_layers` .* number of transformer layers \(2\); got 3"):
        get_peft_model(build("llama", "CAUSAL_LM"), TokenTuneConfig(task_type="CAUSAL_LM", dense_top_layers=3))


def test_a_router_load_balancing_loss_is_refused():
    with pytest.raises(ValueError, match="output_router_logits"):
        get_peft_model(build_model("mixtral", "CAUSAL_LM"), TokenTuneConfig(task_type="CAUSAL_LM", dense_top_layers=1))
    model = get_peft_model(build("mixtral", "CAUSAL_LM"), TokenTuneConfig(task_type="CAUSAL_LM", dense_top_layers=1))
    batch = make_batch(model, "CAUSAL_LM")
    with pytest.raises(ValueError, match="`output_router_logits=True` cannot be combined with `dense_top_layers`"):
        model(**batch, output_router_logits=True)


def test_the_field_round_trips_through_the_saved_config(tmp_path):
    TokenTuneConfig(task_type="SEQ_CLS", dense_top_layers=2).save_pretrained(str(tmp_path))
    assert TokenTuneConfig.from_pretrained(str(tmp_path)).dense_top_layers == 2


@pytest.mark.parametrize("engine", ENGINES)
def test_a_step_frees_its_state_without_the_garbage_collector(engine, monkeypatch):
    """A reference cycle through the step would keep its recorded tensors alive until a collection."""
    states = []
    original = WholeBatchRows.__init__

    def recording_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        states.append(weakref.ref(self))

    monkeypatch.setattr(WholeBatchRows, "__init__", recording_init)
    model = wrap(build("llama", "CAUSAL_LM"), "CAUSAL_LM", lora=True, dense_top_layers=1, engine=engine)
    batch = make_batch(model, "CAUSAL_LM")
    gc.collect()
    gc.disable()
    try:
        model(**batch).loss.backward()
        assert states and all(state() is None for state in states)
    finally:
        gc.enable()
