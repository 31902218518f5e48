"""TokenTune through TRL's SFTTrainer: text, prompt/completion (completion-only loss), packing and
padding-free batches, label smoothing, with and without LoRA.

At ratio 1.0 `TokenTuneSFTTrainer` logs the losses of the stock `SFTTrainer`; at 0.3 its first logged
loss is the naive definition's mean over the selected supervised tokens; a plain `SFTTrainer` given a
`TokenTuneConfig` stops at its first step, naming the class to use; without TokenTune, `TokenTuneSFTTrainer`
is the stock `SFTTrainer`.
"""

from __future__ import annotations

import pytest
from datasets import Dataset
from peft import LoraConfig

pytest.importorskip("trl")
from trl import SFTConfig, SFTTrainer  # noqa: E402

from tokentune_peft import TokenTuneConfig  # noqa: E402
from tokentune_peft.sft_trainer import TokenTuneSFTTrainer  # noqa: E402

from helpers import STEP_BY_STEP, build_model, char_tokenizer  # noqa: E402
from naive_reference import naive_tokentune_loss  # noqa: E402

WORDS = ["cat", "dog", "house", "tree", "blue sky", "mouse", "sun", "moon"]
TEXT = [{"text": f"the {w} is here."} for w in WORDS]
PROMPT_COMPLETION = [{"prompt": f"what is {w}?", "completion": f" it is {w[::-1]}."} for w in WORDS]
VARIANTS = {
    "text": TEXT,
    "completion_only": PROMPT_COMPLETION,
    "packing": PROMPT_COMPLETION,
    "padding_free": TEXT,
    "label_smoothing": TEXT,
}
SETTINGS = {
    "text": {},
    "completion_only": {"completion_only_loss": True},
    "packing": {"packing": True},
    "padding_free": {"padding_free": True, "max_length": None},
    "label_smoothing": {"label_smoothing_factor": 0.1},
}


def sft_config(output_dir, variant: str, **overrides) -> SFTConfig:
    # SFTConfig's default autocasts to bf16: compare in fp32
    settings = dict(STEP_BY_STEP, per_device_train_batch_size=4, learning_rate=0.01, bf16=False)
    return SFTConfig(str(output_dir), **{**settings, **SETTINGS[variant], **overrides})


def peft_config(ratio: float | None, lora: bool, dense: int = 0):
    adapter = LoraConfig(r=4, target_modules="all-linear") if lora else None
    if ratio is None:
        return adapter
    return TokenTuneConfig(task_type="CAUSAL_LM", selection_ratio=ratio, peft_config=adapter, dense_top_layers=dense)


def sft_trainer(trainer_class, output_dir, variant: str, ratio: float | None, lora: bool, dense: int = 0, **overrides):
    return trainer_class(
        model=build_model("llama", "CAUSAL_LM"),
        args=sft_config(output_dir, variant, **overrides),
        train_dataset=Dataset.from_list(VARIANTS[variant]),
        processing_class=char_tokenizer(),
        peft_config=peft_config(ratio, lora, dense),
    )


def logged(trainer, key: str = "loss") -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry and "train_loss" not in entry]


def test_a_plain_sft_trainer_with_tokentune_stops_at_its_first_step_naming_the_tokentune_trainer(tmp_path):
    trainer = sft_trainer(SFTTrainer, tmp_path, "text", ratio=0.3, lora=True)
    with pytest.raises(ValueError, match="TokenTuneSFTTrainer"):
        trainer.train()


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "all_weights"])
def test_without_tokentune_it_logs_the_losses_of_the_stock_sft_trainer(tmp_path, caplog, lora):
    """`peft_config=LoraConfig(...)` (or none) instead of a TokenTuneConfig: TokenTune is off, and the
    same trainer class trains as the stock `SFTTrainer`, saying so once."""
    with caplog.at_level("INFO", logger="tokentune_peft.trainer"):
        ours = sft_trainer(TokenTuneSFTTrainer, tmp_path / "a", "text", ratio=None, lora=lora)
    ours.train()
    stock = sft_trainer(SFTTrainer, tmp_path / "b", "text", ratio=None, lora=lora)
    stock.train()
    assert len(logged(ours)) == 3
    assert logged(ours) == logged(stock)
    assert logged(ours, "mean_token_accuracy") == logged(stock, "mean_token_accuracy")
    assert [record.getMessage() for record in caplog.records if "TokenTune is off" in record.getMessage()] == [
        f"TokenTune is off: the model ({type(ours.model).__name__}) is not wrapped with a TokenTuneConfig, "
        "so TokenTuneSFTTrainer trains it as SFTTrainer does."
    ]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "all_weights"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_at_ratio_one_it_logs_the_losses_of_the_stock_sft_trainer(tmp_path, variant, lora):
    ours = sft_trainer(TokenTuneSFTTrainer, tmp_path / "a", variant, ratio=1.0, lora=lora)
    ours.train()
    stock = sft_trainer(SFTTrainer, tmp_path / "b", variant, ratio=None, lora=lora)
    stock.train()
    assert len(logged(ours)) == 3
    assert logged(ours) == pytest.approx(logged(stock), rel=1e-5)
    assert logged(ours, "mean_token_accuracy") == pytest.approx(logged(stock, "mean_token_accuracy"), abs=1e-6)


@pytest.mark.parametrize("variant", ["text", "completion_only", "packing", "padding_free"])
def test_below_ratio_one_the_first_loss_is_the_mean_over_the_selected_supervised_tokens(tmp_path, variant):
    trainer = sft_trainer(TokenTuneSFTTrainer, tmp_path, variant, ratio=0.3, lora=True, max_steps=1)
    fetched = {}
    fetch = trainer.get_batch_samples

    def recording_fetch(*args, **kwargs):
        batches, count = fetch(*args, **kwargs)
        fetched["batch"], fetched["count"] = dict(batches[0]), count
        return batches, count

    trainer.get_batch_samples = recording_fetch
    trainer.train()
    batch = fetched["batch"]
    selected = batch.pop("selected_positions")
    real = batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
    assert int((selected >= 0).sum()) < int(real)  # TokenTune is active: pass 2 runs k < N tokens
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids", "labels") if key in batch}
    # LoRA starts as the identity (B = 0), so the first loss is the base model's
    expected = naive_tokentune_loss(build_model("llama", "CAUSAL_LM"), inputs, selected, "CAUSAL_LM")
    assert logged(trainer) == pytest.approx([expected.item()], rel=1e-5)
    assert 0.3 <= logged(trainer, "selection_ratio")[0] < 0.5


@pytest.mark.parametrize("trainer_class", [SFTTrainer, TokenTuneSFTTrainer])
@pytest.mark.parametrize("variant", ["text", "completion_only", "packing", "padding_free"])
def test_with_dense_top_layers_at_ratio_one_it_logs_the_stock_losses(tmp_path, variant, trainer_class):
    """The loss covers every supervised token, so a plain SFTTrainer counts it right."""
    ours = sft_trainer(trainer_class, tmp_path / "a", variant, ratio=1.0, lora=True, dense=1)
    ours.train()
    stock = sft_trainer(SFTTrainer, tmp_path / "b", variant, ratio=None, lora=True)
    stock.train()
    assert len(logged(ours)) == 3
    assert logged(ours) == pytest.approx(logged(stock), rel=1e-5)
    assert logged(ours, "mean_token_accuracy") == pytest.approx(logged(stock, "mean_token_accuracy"), abs=1e-6)


@pytest.mark.parametrize("trainer_class", [SFTTrainer, TokenTuneSFTTrainer])
def test_with_dense_top_layers_below_ratio_one_the_first_loss_is_the_stock_one(tmp_path, trainer_class):
    ours = sft_trainer(trainer_class, tmp_path / "a", "completion_only", ratio=0.3, lora=True, dense=1)
    ours.train()
    stock = sft_trainer(SFTTrainer, tmp_path / "b", "completion_only", ratio=None, lora=True)
    stock.train()
    assert logged(ours)[0] == pytest.approx(logged(stock)[0], rel=1e-5)
    assert logged(ours)[1:] != pytest.approx(logged(stock)[1:], rel=1e-5)  # only the gradient differs
