"""Training recipes: a YAML file of `RecipeArguments` and `TrainingArguments` fields, with overrides.

A recipe names the model, the data, the task, the TokenTune and LoRA settings and the Trainer's
arguments, all as flat keys. Any key can be overridden on the command line:

    tokentune-train --config configs/minilm_rotten_tomatoes_tokentune.yaml --selection_ratio 0.5
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import yaml
from peft import LoraConfig
from transformers import HfArgumentParser, TrainingArguments

from ..config import TokenTuneConfig
from ..selection.strategies import SELECTION_STRATEGIES
from .model_configs import TINY_MODELS, VISION_MODELS

#: Models a recipe can name; anything else is a local pretrained folder.
OFFLINE_MODELS = ("minilm", "smollm2")
DATASETS = ("rotten_tomatoes", "chatterbot", "digits")


@dataclass
class RecipeArguments:
    """What to train and how TokenTune and LoRA are set; the Trainer's own arguments sit beside it."""

    model_name: str = field(
        default="minilm",
        metadata={
            "help": f"One of {OFFLINE_MODELS} (offline pretrained), {tuple(TINY_MODELS)} (random, for tests), "
            f"{tuple(VISION_MODELS)} (vision transformers trained from scratch, for 'digits') or a local "
            "pretrained folder."
        },
    )
    dataset: str = field(default="rotten_tomatoes", metadata={"help": f"One of {DATASETS}."})
    task_type: str = field(default="SEQ_CLS", metadata={"help": "SEQ_CLS, TOKEN_CLS or CAUSAL_LM."})
    max_length: int = field(default=64, metadata={"help": "Tokens per example after truncation."})
    train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training examples."})
    eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation examples."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the fixed train/validation/test split."})
    tokentune: bool = field(default=True, metadata={"help": "Train with TokenTune (False: the same recipe without)."})
    selection_ratio: float | None = field(default=0.3, metadata={"help": "TokenTune: share of tokens selected."})
    num_selected: int | None = field(default=None, metadata={"help": "TokenTune: fixed k instead of a ratio."})
    always_select: str = field(default="auto", metadata={"help": "TokenTune: 'auto', 'first', 'last' or 'none'."})
    selection: str = field(
        default="uniform", metadata={"help": f"TokenTune: how positions are chosen, one of {SELECTION_STRATEGIES}."}
    )
    uniform_share: float | None = field(
        default=None, metadata={"help": "TokenTune: uniform share of 'supervised' / 'importance' (default 0.2)."}
    )
    dense_top_layers: int = field(
        default=0, metadata={"help": "TokenTune: last layers that run every token with autograd (0: none)."}
    )
    lora: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(default="all-linear", metadata={"help": "LoRA target modules."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the base model in 4 bits (QLoRA)."})
    sample_answers: int = field(
        default=0, metadata={"help": "Chat data: answer the first N held-out prompts before and after training."}
    )

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"`dataset` must be one of {DATASETS}; got {self.dataset!r}.")
        if (self.dataset == "digits") != (self.model_name in VISION_MODELS):
            raise ValueError(
                f"`dataset` 'digits' (images) goes with a `model_name` in {tuple(VISION_MODELS)}, and those with "
                f"'digits' only; got dataset={self.dataset!r}, model_name={self.model_name!r}."
            )
        if self.load_in_4bit and not self.lora:
            raise ValueError("`load_in_4bit` needs `lora: true` (a 4-bit base cannot be trained directly).")
        if self.num_selected is not None:
            self.selection_ratio = None


class RecipeError(ValueError):
    """A recipe or command line that asks for something invalid; the message names the field."""


class RecipeParser(HfArgumentParser):
    """The recipe's fields and the Trainer's, plus ``--config``; errors raise :class:`RecipeError`."""

    def __init__(self) -> None:
        super().__init__(
            (RecipeArguments, TrainingArguments),
            prog="tokentune-train",
            usage="tokentune-train --config RECIPE.yaml [--FIELD VALUE ...]   (--help lists the fields)",
        )
        self.add_argument(
            "--config",
            help="A recipe: a YAML file of the fields below, e.g. configs/minilm_rotten_tomatoes_tokentune.yaml.",
        )

    def error(self, message: str):
        raise RecipeError(message)


def recipe_parser() -> RecipeParser:
    """The command line of ``tokentune-train``.

    Example:
        >>> "--config" in recipe_parser().format_help()
        True
    """
    return RecipeParser()


def parse_recipe(config_path: str | None, overrides: list[str] | None = None):
    """Read a recipe file, apply command-line style overrides, return (RecipeArguments, TrainingArguments).

    Every field is checked here, TokenTune's and LoRA's included, so a bad value fails before any model
    is loaded; errors are :class:`RecipeError` naming the field.

    Example:
        >>> recipe, training = parse_recipe(None, ["--model_name", "tiny-bert", "--output_dir", "/tmp/x",
        ...                                        "--max_steps", "2"])
        >>> recipe.model_name, training.max_steps
        ('tiny-bert', 2)
    """
    parser = recipe_parser()
    if config_path is not None:
        if not os.path.isfile(config_path):
            raise RecipeError(f"--config {config_path}: no such file; the recipes are in configs/.")
        with open(config_path) as handle:
            values = yaml.safe_load(handle) or {}
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise RecipeError(f"unknown keys {unknown} in {config_path}; `tokentune-train --help` lists the fields.")
        parser.set_defaults(**values)
    try:
        recipe, training, _, extra = parser.parse_args_into_dataclasses(
            args=overrides or [], return_remaining_strings=True
        )
    except RecipeError:
        raise
    except ValueError as error:  # a field's own check (__post_init__)
        raise RecipeError(str(error)) from None
    if extra:
        raise RecipeError(f"unrecognized arguments: {' '.join(extra)}; `tokentune-train --help` lists them.")
    check_method(recipe)
    return recipe, training


def check_method(recipe: RecipeArguments) -> None:
    """Build the recipe's LoRA and TokenTune configs without a model, so their checks run now."""
    try:
        lora_config(recipe)
        tokentune_config(recipe, seed=0)
    except ValueError as error:
        raise RecipeError(str(error)) from None


#: LoraConfig's fields, and the recipe fields that set them.
LORA_FIELDS = {
    "r": "lora_r",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "target_modules": "lora_target_modules",
    "task_type": "task_type",
}
#: TokenTuneConfig's fields a recipe sets, under the same names.
TOKENTUNE_FIELDS = (
    "selection_ratio",
    "num_selected",
    "always_select",
    "selection",
    "uniform_share",
    "dense_top_layers",
    "task_type",
)


def lora_config(recipe: RecipeArguments) -> LoraConfig | None:
    """The recipe's LoRA adapter, or None when it trains all weights."""
    if not recipe.lora:
        return None
    return LoraConfig(**{name: getattr(recipe, field) for name, field in LORA_FIELDS.items()})


def tokentune_config(recipe: RecipeArguments, seed: int) -> TokenTuneConfig | None:
    """The recipe's TokenTune config (None without TokenTune); positions drawn from ``seed``."""
    if not recipe.tokentune:
        return None
    settings = {name: getattr(recipe, name) for name in TOKENTUNE_FIELDS}
    return TokenTuneConfig(**settings, peft_config=lora_config(recipe), seed=seed)
