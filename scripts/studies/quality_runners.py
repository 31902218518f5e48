"""How the quality study (:mod:`scripts.studies.quality`) trains one run, and measures one method's activation memory
on a fixed batch, for each kind of data it trains on:

* ``classification``: MiniLM-L6 on Rotten Tomatoes (a tiny BERT when quick) through ``tokentune-train``'s recipe code;
* ``sft``: SmolLM2-135M-Instruct on chatterbot pairs (a tiny Llama when quick) through TRL's ``SFTTrainer``.

A runner takes the study's arguments, a method, a learning rate, a seed, a scratch folder and a number of optimizer
steps (None: the part's epochs, over which the learning-rate schedule runs either way), and returns what the run
measured: its validation curve, the test metric, the activation memory of its first step, its training seconds and
each step's wall-clock seconds.
"""

from __future__ import annotations

import os
import time
from functools import cache
from typing import TYPE_CHECKING

from transformers import Trainer, set_seed
from trl import SFTConfig

from tokentune_peft.cli.offline import load_chatterbot_pairs
from tokentune_peft.cli.recipes import parse_recipe
from tokentune_peft.cli.train import (
    activation_memory,
    load_datasets,
    load_model_and_tokenizer,
    make_collator,
    wrap_model,
)
from tokentune_peft.trainer import TokenTuneTrainer

from scripts.common import CONFIG_DIR, run_setting
from scripts.studies.common import LearningCurve
from scripts.studies.sft_trl import SFTStudyArguments, activation_mib, build_trainer, conversations

if TYPE_CHECKING:
    from scripts.studies.quality import Method, QualityArguments


def classification_flags(
    args: QualityArguments,
    method: Method,
    learning_rate: float,
    seed: int,
    scratch: str,
    max_steps: int | None,
    epochs: float | None = None,
) -> tuple[str, list[str]]:
    """The recipe file and the command-line overrides of a classification run (``args.epochs`` unless ``epochs``)."""
    config = "tiny_bert_rotten_tomatoes.yaml" if args.quick else "minilm_rotten_tomatoes_tokentune.yaml"
    overrides = {
        "selection": "uniform",  # a method that names no selection is uniform, whatever the recipe sets
        **method.settings,
        "learning_rate": learning_rate,
        "seed": seed,
        "num_train_epochs": args.epochs if epochs is None else epochs,
        "eval_strategy": "steps",
        "eval_steps": args.eval_steps,
        "logging_steps": args.eval_steps,
        "save_strategy": "no",
        "output_dir": scratch,
    }
    if args.train_samples is not None:
        overrides["train_samples"] = args.train_samples
    if args.quick:
        overrides.update(max_steps=4, eval_steps=2, train_samples=32, eval_samples=16)
    if max_steps is not None:
        overrides["max_steps"] = max_steps
    flags = [item for key, value in overrides.items() for item in (f"--{key}", str(value))]
    return os.path.join(CONFIG_DIR, config), flags


def classification_run(
    args: QualityArguments,
    method: Method,
    learning_rate: float,
    seed: int,
    scratch: str,
    max_steps: int | None = None,
    epochs: float | None = None,
) -> dict:
    """One MiniLM (tiny BERT when quick) run through the recipe code, with its validation curve; over
    ``args.epochs`` unless ``epochs`` or ``max_steps`` is given."""
    config, flags = classification_flags(args, method, learning_rate, seed, scratch, max_steps, epochs)
    curve = LearningCurve()
    outcome = run_setting(method.name, seed, config, flags, curve)
    results = outcome["results"]
    return {
        "curve": curve.points,
        "test": {"accuracy": results["after"]["test_accuracy"], "accuracy_before": results["before"]["test_accuracy"]},
        "activation_mib": results["activation_memory"]["step_mib"],
        "train_seconds": curve.train_seconds,
        "step_seconds": curve.step_seconds,
        "wall_seconds": outcome["wall_seconds"],
    }


def convergence_run(
    args: QualityArguments, method: Method, learning_rate: float, seed: int, scratch: str, max_steps: int | None = None
) -> dict:
    """A classification run over ``args.convergence_epochs``."""
    return classification_run(args, method, learning_rate, seed, scratch, max_steps, epochs=args.convergence_epochs)


#: The chatterbot pairs, read once per process (parsing the corpus takes about a second).
chatterbot_pairs = cache(load_chatterbot_pairs)


def sft_splits(args: QualityArguments) -> tuple:
    """The SFT chats: training pairs, the validation pairs carved from them, and the held-out (test) pairs."""
    pairs = chatterbot_pairs(seed=0)
    train, test = pairs["train"], pairs["test"]
    if args.quick:
        train, test = train.select(range(24)), test.select(range(8))
    carved = train.train_test_split(test_size=8 if args.quick else args.sft_validation_pairs, shuffle=False)
    return conversations(carved["train"], 0), conversations(carved["test"], 0), conversations(test, 0)


def sft_trainer(
    args: QualityArguments,
    method: Method,
    learning_rate: float,
    seed: int,
    scratch: str,
    max_steps: int | None = None,
    callbacks: list | None = None,
):
    """SmolLM2 (a tiny Llama, 4 pairs a step, when quick) in TRL's trainer, as ``method`` trains it, over
    ``args.sft_epochs`` unless ``max_steps`` is given; with gradient checkpointing already on when the method asks
    for it."""
    train, validation, _ = sft_splits(args)
    settings = dict(method.settings)
    checkpointing = settings.pop("gradient_checkpointing", False)
    study = SFTStudyArguments(train_samples=0, model_name="tiny-llama" if args.quick else "smollm2", **settings)
    epoch_steps = 2 if args.quick else -1  # -1: the epochs decide
    sft_config = SFTConfig(
        output_dir=scratch,
        learning_rate=learning_rate,
        seed=seed,
        num_train_epochs=args.sft_epochs,
        max_steps=epoch_steps if max_steps is None else max_steps,
        per_device_train_batch_size=4 if args.quick else args.sft_batch_size,
        per_device_eval_batch_size=16,
        max_length=args.sft_max_length,
        eval_strategy="steps",
        eval_steps=1 if args.quick else args.sft_eval_steps,
        logging_steps=1 if args.quick else args.sft_eval_steps,
        warmup_steps=0 if args.quick else args.sft_warmup_steps,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,  # SFTConfig's default; the CPU runs here are fp32
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
    )
    trainer = build_trainer(study, sft_config, train, validation, callbacks)
    if checkpointing:  # the Trainer turns it on in train(); on now, so that a step measured before checkpoints too
        trainer.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=sft_config.gradient_checkpointing_kwargs
        )
        trainer.model.train()  # transformers checkpoints in training mode only
    return trainer


def sft_run(
    args: QualityArguments, method: Method, learning_rate: float, seed: int, scratch: str, max_steps: int | None = None
) -> dict:
    """One SmolLM2 run through TRL's trainer: validation answer loss along training, test loss at the end."""
    curve = LearningCurve()
    start = time.perf_counter()
    trainer = sft_trainer(args, method, learning_rate, seed, scratch, max_steps, [curve])
    memory = activation_mib(trainer)
    trainer.train()
    test_loss = trainer.evaluate(sft_splits(args)[2], metric_key_prefix="test")["test_loss"]
    return {
        "curve": curve.points,
        "test": {"loss": test_loss},
        "activation_mib": memory["tokentune_lora_mib"] or memory["lora_mib"],
        "train_seconds": curve.train_seconds,
        "step_seconds": curve.step_seconds,
        "wall_seconds": time.perf_counter() - start,
    }


def longest_rows(dataset, rows: int):
    """The ``rows`` longest examples of a tokenized split (the earlier first among equal lengths): a batch that is
    the same whatever the method and the seed, and the largest the split holds.

    Example:
        >>> from datasets import Dataset
        >>> list(longest_rows(Dataset.from_dict({"input_ids": [[1], [1, 2, 3], [1, 2], [4, 5, 6]]}), 2)["input_ids"])
        [[1, 2, 3], [4, 5, 6]]
    """
    lengths = [len(ids) for ids in dataset["input_ids"]]
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])  # a stable sort keeps ties in order
    return dataset.select(order[:rows])


def classification_memory(
    args: QualityArguments, method: Method, learning_rate: float, seed: int, scratch: str
) -> dict:
    """Activation memory of one training step of ``method`` on the training split's longest batch, measured as a
    classification run measures its first step (``tokentune-train``'s ``activation_memory``, after one step)."""
    config, flags = classification_flags(args, method, learning_rate, seed, scratch, max_steps=1)
    recipe, training = parse_recipe(config, [*flags, "--eval_strategy", "no"])
    set_seed(training.seed)  # as `tokentune-train` builds its run
    model, tokenizer = load_model_and_tokenizer(recipe)
    model = wrap_model(model, recipe, training.seed)
    train = longest_rows(load_datasets(recipe, tokenizer)["train"], training.per_device_train_batch_size)
    trainer_class = TokenTuneTrainer if recipe.tokentune else Trainer
    trainer = trainer_class(
        model=model, args=training, train_dataset=train, data_collator=make_collator(recipe, tokenizer)
    )
    trainer.train()  # one step, on that batch: a TokenTune trainer measures it; the others are measured below
    batch = next(iter(trainer.get_train_dataloader()))
    return {
        "activation_mib": activation_memory(trainer, trainer.model, batch)["step_mib"],
        "batch": list(batch["input_ids"].shape),
    }


def sft_memory(args: QualityArguments, method: Method, learning_rate: float, seed: int, scratch: str) -> dict:
    """Activation memory of one training step of ``method`` on the training split's longest batch, measured as an
    SFT run measures its first step (:func:`scripts.studies.sft_trl.activation_mib`)."""
    trainer = sft_trainer(args, method, learning_rate, seed, scratch)
    trainer.train_dataset = longest_rows(trainer.train_dataset, trainer.args.per_device_train_batch_size)
    batch = next(iter(trainer.get_train_dataloader()))
    memory = activation_mib(trainer, batch)
    return {
        "activation_mib": memory["tokentune_lora_mib"] or memory["lora_mib"],
        "batch": list(batch["input_ids"].shape),
    }


#: The fixed-batch activation memory of a method, by the kind of data its part trains on.
MEMORY_MEASURES = {"classification": classification_memory, "sft": sft_memory}
