"""TokenTuneTrainer: reproducible sampling, exact resumption, loss normalisation, logging, errors."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback

from tokentune_peft import TokenTuneConfig
from tokentune_peft.trainer import TokenTuneTrainer

from helpers import arguments, build_model, causal_lm_examples, tokentune_model


def trained_weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_same_seed_gives_the_same_losses(tmp_path):
    histories = []
    for run in range(2):
        trainer = TokenTuneTrainer(
            model=tokentune_model(), args=arguments(tmp_path / str(run)), train_dataset=causal_lm_examples()
        )
        trainer.train()
        histories.append([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
    assert len(histories[0]) == 4
    assert histories[0] == histories[1]
    other_seed = TokenTuneTrainer(
        model=tokentune_model(), args=arguments(tmp_path / "2", seed=4), train_dataset=causal_lm_examples()
    )
    other_seed.train()
    assert [e["loss"] for e in other_seed.state.log_history if "loss" in e] != histories[0]


class StopAfter(TrainerCallback):
    """Interrupts training after a given step, as a crash right after a checkpoint would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.parametrize(
    ("lora", "selection"),
    [(False, "uniform"), (True, "uniform"), (False, "importance")],
    ids=["full", "lora", "importance"],
)
def test_resuming_from_a_checkpoint_ends_with_the_same_weights(tmp_path, lora, selection):
    settings = dict(max_steps=6, save_strategy="steps", save_steps=3)
    uninterrupted = TokenTuneTrainer(
        model=tokentune_model(lora=lora, selection=selection),
        args=arguments(tmp_path / "a", **settings),
        train_dataset=causal_lm_examples(),
    )
    uninterrupted.train()

    interrupted = TokenTuneTrainer(
        model=tokentune_model(lora=lora, selection=selection),
        args=arguments(tmp_path / "b", **settings),
        train_dataset=causal_lm_examples(),
        callbacks=[StopAfter(3)],
    )
    interrupted.train()
    assert interrupted.state.global_step == 3
    # All weights come from the checkpoint; with LoRA the frozen base must be the same one.
    resumed = TokenTuneTrainer(
        model=tokentune_model(seed=0 if lora else 1, lora=lora, selection=selection),
        args=arguments(tmp_path / "b", **settings),
        train_dataset=causal_lm_examples(),
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))

    expected = trained_weights(uninterrupted.model)
    for name, value in trained_weights(resumed.model).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_gradient_accumulation_matches_one_large_batch(tmp_path):
    examples = causal_lm_examples(count=4)
    generator = torch.Generator().manual_seed(0)
    for example in examples:  # the same selections in both runs: the data set brings them
        real = int(example["attention_mask"].sum())
        example["selected_positions"] = torch.randperm(real, generator=generator)[:3].sort().values
    one_batch = TokenTuneTrainer(
        model=tokentune_model(),
        train_dataset=examples,
        args=arguments(
            tmp_path / "a", max_steps=1, per_device_train_batch_size=4, optim="sgd", lr_scheduler_type="constant"
        ),
    )
    one_batch.train()
    accumulated = TokenTuneTrainer(
        model=tokentune_model(),
        train_dataset=examples,
        args=arguments(
            tmp_path / "b",
            max_steps=1,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            optim="sgd",
            lr_scheduler_type="constant",
        ),
    )
    accumulated.train()

    loss = [e["loss"] for e in one_batch.state.log_history if "loss" in e]
    accumulated_loss = [e["loss"] for e in accumulated.state.log_history if "loss" in e]
    assert loss == pytest.approx(accumulated_loss, rel=1e-5)
    expected = trained_weights(one_batch.model)
    changed = False
    for name, value in trained_weights(accumulated.model).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)
        changed |= not torch.equal(value, trained_weights(tokentune_model())[name])
    assert changed


def test_num_items_counts_selected_supervised_tokens(tmp_path):
    trainer = TokenTuneTrainer(model=tokentune_model(), args=arguments(tmp_path), train_dataset=causal_lm_examples())
    batch = {
        key: torch.stack([e[key] for e in causal_lm_examples(count=2)])
        for key in ("input_ids", "attention_mask", "labels")
    }
    batch["selected_positions"] = torch.tensor([[0, 4, 5], [1, 2, 6]])
    _, num_items = trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    next_labels = torch.cat([batch["labels"][:, 1:], torch.full((2, 1), -100)], dim=1)
    expected = sum(int(next_labels[row, p] != -100) for row in range(2) for p in batch["selected_positions"][row])
    assert int(num_items) == expected


def test_logs_selection_ratio_and_activation_memory(tmp_path):
    trainer = TokenTuneTrainer(
        model=tokentune_model(), args=arguments(tmp_path, max_steps=2), train_dataset=causal_lm_examples()
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(0.3 <= entry["selection_ratio"] <= 0.45 for entry in logged)  # ceil(0.3 n) / n for n in 6..12
    assert 0 < logged[0]["activation_mib"] < logged[0]["full_fine_tuning_activation_mib"]


def test_a_finished_run_leaves_nothing_holding_its_weights(tmp_path):
    """Several runs in one process (a sweep, a notebook) must not pile up weights: the first step's
    activation measurement, which never backpropagates its full-sequence forward, frees its graph."""
    model = tokentune_model()
    trainer = TokenTuneTrainer(model=model, args=arguments(tmp_path, max_steps=2), train_dataset=causal_lm_examples())
    trainer.train()
    weights = [weakref.ref(parameter) for parameter in model.parameters()]
    del model, trainer
    gc.collect()
    assert not any(weight() is not None for weight in weights)


def test_full_fine_tuning_estimate_matches_a_whole_batch_measurement(tmp_path):
    from tokentune_peft import saved_activation_bytes

    model = tokentune_model()
    trainer = TokenTuneTrainer(model=model, args=arguments(tmp_path), train_dataset=causal_lm_examples())
    batch = {
        key: torch.stack([e[key] for e in causal_lm_examples(count=4)])
        for key in ("input_ids", "attention_mask", "labels")
    }
    stock = model.base_model.model
    measured = saved_activation_bytes(stock, lambda: stock(**batch))
    estimate = trainer._full_fine_tuning_bytes(model, batch)
    assert estimate == pytest.approx(measured, rel=0.02)  # the documented accuracy of the estimate


def test_a_batch_without_selected_labels_gives_zero_loss(tmp_path):
    examples = causal_lm_examples(count=4)
    for example in examples:
        example["labels"][:] = -100
    trainer = TokenTuneTrainer(model=tokentune_model(), args=arguments(tmp_path, max_steps=1), train_dataset=examples)
    trainer.train()
    assert [e["loss"] for e in trainer.state.log_history if "loss" in e] == [0.0]


def plain_model(lora: bool):
    """The tiny Llama without TokenTune: as it is, or with a plain (non-zero) LoRA adapter."""
    model = build_model("llama", "CAUSAL_LM")
    torch.manual_seed(1)
    return (
        get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)) if lora else model
    )


def logged_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "all_weights"])
def test_without_tokentune_it_logs_the_losses_of_the_plain_trainer(tmp_path, caplog, lora):
    """TokenTune is toggled by the model's config alone: the same trainer class trains a model without
    TokenTune exactly as `Trainer` does, checkpoints and resumption included, and says once that it is off."""
    settings = dict(max_steps=3, save_strategy="steps", save_steps=2)
    plain = Trainer(
        model=plain_model(lora), args=arguments(tmp_path / "a", **settings), train_dataset=causal_lm_examples()
    )
    plain.train()
    with caplog.at_level("INFO", logger="tokentune_peft.trainer"):
        ours = TokenTuneTrainer(
            model=plain_model(lora), args=arguments(tmp_path / "b", **settings), train_dataset=causal_lm_examples()
        )
    ours.train()
    assert len(logged_losses(plain)) == 3
    assert logged_losses(ours) == logged_losses(plain)
    assert "selection_ratio" not in ours.state.log_history[0]
    off = [record.getMessage() for record in caplog.records if "TokenTune is off" in record.getMessage()]
    assert off == [
        f"TokenTune is off: the model ({type(ours.model).__name__}) is not wrapped with a TokenTuneConfig, "
        "so TokenTuneTrainer trains it as Trainer does."
    ]
    # a checkpoint of a run without TokenTune resumes like the Trainer's own
    resumed = TokenTuneTrainer(
        model=plain_model(lora), args=arguments(tmp_path / "b", **settings), train_dataset=causal_lm_examples()
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    assert logged_losses(resumed)[-1] == logged_losses(plain)[-1]


def test_tokentune_at_ratio_one_trains_like_the_plain_trainer(tmp_path):
    """Convergence: at ratio 1.0 the loss curve is the plain Trainer's on the stock model."""
    examples = [e for e in causal_lm_examples() if int(e["attention_mask"].sum()) == 12]  # no padding
    model = get_peft_model(
        build_model("llama", "CAUSAL_LM"), TokenTuneConfig(task_type="CAUSAL_LM", selection_ratio=1.0)
    )
    tokentune = TokenTuneTrainer(
        model=model, args=arguments(tmp_path / "a", per_device_train_batch_size=2), train_dataset=examples
    )
    tokentune.train()
    plain = Trainer(
        model=build_model("llama", "CAUSAL_LM"),
        args=arguments(tmp_path / "b", per_device_train_batch_size=2),
        train_dataset=examples,
    )
    plain.train()
    curve = [e["loss"] for e in tokentune.state.log_history if "loss" in e]
    assert curve == pytest.approx([e["loss"] for e in plain.state.log_history if "loss" in e], rel=1e-4)


def one_batch() -> dict:
    examples = causal_lm_examples(count=2)
    return {key: torch.stack([e[key] for e in examples]) for key in ("input_ids", "attention_mask", "labels")}


def test_supervised_positions_are_sampled_before_the_forward_and_counted(tmp_path):
    model = tokentune_model(selection="supervised")
    trainer = TokenTuneTrainer(model=model, args=arguments(tmp_path), train_dataset=causal_lm_examples())
    batch = one_batch()
    (sampled,), num_items = trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    labelled = torch.cat([batch["labels"][:, 1:], torch.full((2, 1), -100)], dim=1) != -100
    chosen = sampled["selected_positions"]
    # rows of 6 and 7 tokens, 3 and 4 of them labelled: k = ceil(0.3 n) = 2 and 3, all spent on labelled
    # positions (the uniform share, floor(0.2 k), is 0 here)
    assert [[bool(labelled[row, p]) for p in chosen[row] if p >= 0] for row in range(2)] == [[True] * 2, [True] * 3]
    assert int(num_items) == 5


@pytest.mark.parametrize("selection", ["importance", "gradient"])
def test_positions_drawn_in_the_forward_come_from_the_trainers_generator(tmp_path, selection):
    model = tokentune_model(selection=selection)
    trainer = TokenTuneTrainer(model=model, args=arguments(tmp_path, max_steps=2), train_dataset=causal_lm_examples())
    (fetched,), num_items = trainer.get_batch_samples(iter([one_batch()]), 1, torch.device("cpu"))
    assert "selected_positions" not in fetched and num_items is None  # unknown before the forward: batch mean
    engine_generator = model.base_model.tokentune_engine.generator
    engine_state, trainer_state = engine_generator.get_state(), trainer.selection_generator.get_state()
    trainer.train()
    # the forward drew from the trainer's (checkpointed) generator, not the engine's own
    assert torch.equal(engine_generator.get_state(), engine_state)
    assert not torch.equal(trainer.selection_generator.get_state(), trainer_state)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and all(0.3 <= entry["selection_ratio"] <= 0.45 for entry in logged)


def test_positions_follow_the_tokentune_seed_not_the_training_seed(tmp_path):
    def first_positions(config_seed: int, training_seed: int) -> torch.Tensor:
        model = get_peft_model(
            build_model("llama", "CAUSAL_LM"), TokenTuneConfig(task_type="CAUSAL_LM", seed=config_seed)
        )
        trainer = TokenTuneTrainer(model=model, args=arguments(tmp_path, seed=training_seed))
        (batch,), _ = trainer.get_batch_samples(iter([one_batch()]), 1, torch.device("cpu"))
        return batch["selected_positions"]

    assert torch.equal(first_positions(5, training_seed=1), first_positions(5, training_seed=2))
    assert not torch.equal(first_positions(5, training_seed=1), first_positions(6, training_seed=1))
