"""`tokentune-train`: run a recipe end to end and write what it measured.

    tokentune-train --config configs/minilm_rotten_tomatoes_tokentune.yaml [--any_field value ...]

It loads the model and data offline, evaluates on the held-out split, trains (with the Trainer's
progress bar), evaluates again, and writes into ``output_dir``: the adapter or model, the TokenTune
config, ``results.json`` (metrics before and after, activation memory of one step against full
fine-tuning, step time) and ``training_loss.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Any

import numpy as np
import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.utils import TaskType
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    ViTForImageClassification,
    default_data_collator,
    set_seed,
)

from ..memory import MIB, saved_activation_bytes
from ..quantization import keep_4bit_layers_trainable
from ..selection.labels import IGNORE_INDEX
from ..trainer import TokenTuneTrainer
from . import offline
from .model_configs import TINY_MODELS, VISION_MODELS, tiny_model_config, vision_model_config
from .plots import new_figure, save_figure
from .recipes import RecipeArguments, RecipeError, lora_config, parse_recipe, recipe_parser, tokentune_config

AUTO_CLASSES = {
    TaskType.SEQ_CLS: AutoModelForSequenceClassification,
    TaskType.TOKEN_CLS: AutoModelForTokenClassification,
    TaskType.CAUSAL_LM: AutoModelForCausalLM,
}
NUM_LABELS = {"rotten_tomatoes": 2, "digits": 10}


def model_folder(name: str) -> str:
    """Folder of a named offline model (or tokenizer source of a tiny one), or ``name`` itself."""
    if name in ("minilm", "tiny-bert"):
        return offline.minilm_path()
    if name in ("smollm2", "tiny-llama"):
        return offline.smollm2_path()
    return name


def load_model_and_tokenizer(recipe: RecipeArguments):
    """The recipe's model and its tokenizer (None for a vision model)."""
    if recipe.model_name in VISION_MODELS:
        config = vision_model_config(recipe.model_name, NUM_LABELS[recipe.dataset])
        return ViTForImageClassification._from_config(config, attn_implementation="sdpa"), None
    folder = model_folder(recipe.model_name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    auto = AUTO_CLASSES[recipe.task_type]
    options: dict[str, Any] = {"attn_implementation": "sdpa"}
    if recipe.dataset in NUM_LABELS:
        options["num_labels"] = NUM_LABELS[recipe.dataset]
    if recipe.model_name in TINY_MODELS:
        config = tiny_model_config(recipe.model_name, len(tokenizer))
        config.num_labels = options.pop("num_labels", config.num_labels)
        model = auto.from_config(config, **options)
    else:
        if recipe.load_in_4bit:
            options["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
            )
        model = auto.from_pretrained(folder, **options)
    model.config.pad_token_id = tokenizer.pad_token_id
    # The model card and the adapter config name the base model, not the folder it was read from.
    model.name_or_path = model.config._name_or_path = offline.HUB_NAMES.get(recipe.model_name, recipe.model_name)
    if recipe.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_4bit_layers_trainable(model)  # plain QLoRA too: the evaluation before training must not repack
    return model, tokenizer


def load_datasets(recipe: RecipeArguments, tokenizer):
    """Tokenized (train, held-out) datasets, or images as tensors; classification also gets a validation split."""
    if recipe.dataset == "digits":
        splits = offline.load_digits(seed=recipe.split_seed, image_size=VISION_MODELS[recipe.model_name]["image_size"])
        tokenize = _as_tensors
    elif recipe.dataset == "rotten_tomatoes":
        splits = offline.load_rotten_tomatoes(seed=recipe.split_seed)
        tokenize = offline.tokenize_classification
    else:
        splits = offline.load_chatterbot_pairs(seed=recipe.split_seed)
        tokenize = offline.tokenize_chat_sft
    splits = {
        name: _first(split, recipe.train_samples if name == "train" else recipe.eval_samples)
        for name, split in splits.items()
    }
    return {name: tokenize(split, tokenizer, recipe.max_length) for name, split in splits.items()}


def _as_tensors(dataset, tokenizer, max_length: int):
    return dataset.with_format("torch")


def _first(dataset, count: int | None):
    return dataset if count is None else dataset.select(range(min(count, len(dataset))))


def wrap_model(model, recipe: RecipeArguments, seed: int):
    """The model wrapped as the recipe asks (TokenTune, LoRA, both, or neither); positions drawn from ``seed``."""
    config = tokentune_config(recipe, seed) or lora_config(recipe)
    return model if config is None else get_peft_model(model, config)


def accuracy(prediction) -> dict[str, float]:
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((np.argmax(logits, axis=-1) == prediction.label_ids).mean())}


def plot_training_loss(log_history: list[dict], path: str, title: str) -> None:
    points = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    figure, (axis,) = new_figure(width=6, height=4)
    axis.plot([step for step, _ in points], [loss for _, loss in points], marker="o")
    axis.set_xlabel("step")
    axis.set_ylabel("training loss")
    axis.set_title(title)
    save_figure(figure, path)


def activation_memory(trainer: Trainer, model, batch: dict) -> dict[str, float]:
    """Activation memory of one training step, and of full fine-tuning on the same batch."""
    if isinstance(trainer, TokenTuneTrainer):
        measured = trainer.activation_memory
    else:
        model.train()
        batch = {key: value.to(model.device) for key, value in batch.items()}
        step_bytes = saved_activation_bytes(model, lambda: model(**batch))
        measured = {"tokentune_bytes": None, "full_fine_tuning_bytes": step_bytes}
    full = measured["full_fine_tuning_bytes"]
    tokentune = measured["tokentune_bytes"]
    return {
        "step_mib": round((tokentune if tokentune is not None else full) / MIB, 3),
        "full_fine_tuning_mib": round(full / MIB, 3),
        "ratio_to_full_fine_tuning": round(tokentune / full, 4) if tokentune is not None else 1.0,
    }


def hide_peft_deprecation_warning() -> None:
    """Silence the one warning a recipe's user can do nothing about: peft 0.21's ``PeftModel`` reads
    transformers' deprecated ``is_gradient_checkpointing`` (peft_model.py, in ``__init__``)."""
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def save_trained_model(trainer: Trainer, folder: str) -> None:
    """Save what ``trainer`` trained into ``folder``, as ``trainer.save_model`` does.

    An adapter (or a TokenTune model) is saved with ``save_embedding_layers=False``: the recipes never
    resize the vocabulary, and peft's default ("auto") would check that by fetching the base model's
    ``config.json`` from the Hub under the name the model carries (offline, two warnings).
    """
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not isinstance(model, PeftModel):
        trainer.save_model(folder)
    elif trainer.args.should_save:
        model.save_pretrained(folder, save_embedding_layers=False)


def make_collator(recipe: RecipeArguments, tokenizer):
    """The collator that pads a recipe's batches (labels padded with -100 for token-level tasks)."""
    if tokenizer is None:  # images: all of one size
        return default_data_collator
    if recipe.task_type == TaskType.SEQ_CLS:
        return DataCollatorWithPadding(tokenizer)
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)


def run(recipe: RecipeArguments, training, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Run one recipe, with the Trainer's ``callbacks`` if given; returns what it writes to ``results.json``."""
    set_seed(training.seed)  # the new head's initialisation too
    model, tokenizer = load_model_and_tokenizer(recipe)
    datasets = load_datasets(recipe, tokenizer)
    held_out = datasets["test"]
    classification = recipe.task_type == TaskType.SEQ_CLS
    collator = make_collator(recipe, tokenizer)
    model = wrap_model(model, recipe, training.seed)
    trainer_class = TokenTuneTrainer if recipe.tokentune else Trainer
    trainer = trainer_class(
        model=model,
        args=training,
        train_dataset=datasets["train"],
        eval_dataset=datasets.get("validation", held_out),
        data_collator=collator,
        compute_metrics=accuracy if classification else None,
        callbacks=callbacks,
    )
    prompts = held_out_prompts(recipe)
    answers_before = generate_answers(model, tokenizer, prompts)
    before = trainer.evaluate(held_out, metric_key_prefix="test")
    train_output = trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    after = trainer.evaluate(held_out, metric_key_prefix="test")
    answers_after = generate_answers(model, tokenizer, prompts)
    memory = activation_memory(trainer, model, next(iter(trainer.get_train_dataloader())))

    save_trained_model(trainer, training.output_dir)
    results = {
        "recipe": vars(recipe),
        "before": before,
        "after": after,
        "train": train_output.metrics,
        "seconds_per_step": train_output.metrics["train_runtime"] / max(trainer.state.global_step, 1),
        "activation_memory": memory,
        "sample_answers": [
            {"prompt": prompt, "before": before_answer, "after": after_answer}
            for prompt, before_answer, after_answer in zip(prompts, answers_before, answers_after, strict=True)
        ],
    }
    if trainer.is_world_process_zero():
        with open(os.path.join(training.output_dir, "results.json"), "w") as handle:
            json.dump(results, handle, indent=2, default=str)
        plot_training_loss(
            trainer.state.log_history,
            os.path.join(training.output_dir, "training_loss.png"),
            f"{recipe.model_name} on {recipe.dataset}",
        )
    trainer.accelerator.end_training()  # on several processes, closes the process group before they exit
    return results


def held_out_prompts(recipe: RecipeArguments) -> list[str]:
    """The first ``recipe.sample_answers`` held-out prompts of a chat data set."""
    if not recipe.sample_answers or recipe.dataset != "chatterbot":
        return []
    return offline.load_chatterbot_pairs(seed=recipe.split_seed)["test"]["prompt"][: recipe.sample_answers]


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 40) -> list[str]:
    """Greedy answers of a chat model to each prompt, through its chat template."""
    answers = []
    was_training = model.training
    model.eval()
    for prompt in prompts:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(model.device)
        with torch.no_grad():
            output = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        answers.append(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    model.train(was_training)
    return answers


def summary(results: dict[str, Any]) -> str:
    """The lines the command prints at the end."""
    metric = "test_accuracy" if "test_accuracy" in results["after"] else "test_loss"
    memory = results["activation_memory"]
    lines = [
        f"held-out {metric.removeprefix('test_')}: {results['before'][metric]:.4f} -> {results['after'][metric]:.4f}",
        f"activation memory of one step: {memory['step_mib']:.2f} MiB vs {memory['full_fine_tuning_mib']:.2f} MiB "
        f"for full fine-tuning ({memory['ratio_to_full_fine_tuning']:.1%}; "
        f"{1 - memory['ratio_to_full_fine_tuning']:.1%} saved)",
        f"training: {results['train']['train_runtime']:.1f} s, {results['seconds_per_step']:.2f} s/step",
    ]
    for sample in results["sample_answers"]:
        lines.append(f"Q: {sample['prompt']}\n  before: {sample['before']}\n  after:  {sample['after']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``tokentune-train``: check the recipe, run it, print the summary.

    A bad recipe or argument prints one line naming it and exits with status 2, before any model is
    loaded; with no recipe the command prints its usage.
    """
    arguments = sys.argv[1:] if argv is None else argv
    parser = recipe_parser()
    if "-h" in arguments or "--help" in arguments:
        parser.print_help()
        return
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("--config")
    known, overrides = config_parser.parse_known_args(arguments)
    if known.config is None and not overrides:
        parser.print_usage()
        print("tokentune-train: give a recipe, e.g. --config configs/minilm_rotten_tomatoes_tokentune.yaml")
        raise SystemExit(2)
    hide_peft_deprecation_warning()
    try:
        recipe, training = parse_recipe(known.config, overrides)
    except RecipeError as error:
        print(f"tokentune-train: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(summary(run(recipe, training)))


if __name__ == "__main__":
    main()
