"""`TokenTuneConfig`: what a user sets to fine-tune with TokenTune."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from peft import LoraConfig, PeftConfig
from peft.utils import TaskType

from . import __version__
from .engine_choice import ENGINE_CHOICES
from .selection.strategies import SELECTION_STRATEGIES, WITH_UNIFORM_SHARE

PEFT_TYPE = "TOKENTUNE"
CONFIG_NAME = "tokentune_config.json"
SUPPORTED_TASK_TYPES = (TaskType.CAUSAL_LM, TaskType.SEQ_CLS, TaskType.TOKEN_CLS)
ALWAYS_SELECT_CHOICES = ("auto", "first", "last", "none")
DEFAULT_SELECTION_RATIO = 0.3
DEFAULT_UNIFORM_SHARE = 0.2
#: How a custom selector function is written to JSON (by name; the function itself cannot be stored).
CUSTOM_SELECTION_PREFIX = "custom:"


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def _json_value(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"Cannot write {type(value).__name__} to JSON.")


@dataclass
class TokenTuneConfig(PeftConfig):
    """Configuration of TokenTune: back-propagate through k selected tokens of each sequence.

    The forward pass stays exact for every token; only the selected tokens' activations are kept for
    backward and the loss is taken on them. Compose it with LoRA (or QLoRA, on a 4-bit model) through
    ``peft_config``; leave ``peft_config`` unset to train all weights.

    Args:
        task_type (`str`): "CAUSAL_LM", "SEQ_CLS" or "TOKEN_CLS". An image classifier fed ``pixel_values``
            trains with "SEQ_CLS", which also adds its head to LoRA's ``modules_to_save``.
        selection_ratio (`float`): share of each sequence's real tokens to select, in (0, 1];
            k = ceil(ratio x tokens). Defaults to 0.3 when `num_selected` is unset.
        num_selected (`int`): a fixed number k of tokens per sequence instead of a ratio.
        peft_config (`LoraConfig`): the adapter to train with TokenTune; None trains all weights.
        always_select (`str` or `list[int]`): positions every selection includes. "auto" picks the
            token the task head reads: the first ([CLS]) for encoder classification, the last real
            token for decoder classification, none otherwise. Also "first", "last", "none", or a
            list of sequence indices.
        seed (`int`): seed of the generator that samples positions when none are given. Under a
            TokenTune trainer each process draws from ``seed`` + its process index;
            ``TrainingArguments.seed`` (initialisation, data order, dropout) does not change positions.
        selection (`str` or callable): how positions are chosen: "uniform" (the paper's), "supervised"
            (labelled positions first), "importance" (sampled by the attention they receive in the
            no-grad pass), "gradient" (sampled by the loss gradient they carry, measured in the no-grad
            pass), or a function ``selector(batch, k, generator) -> selected_positions``; see
            :mod:`tokentune_peft.selection.strategies`.
        uniform_share (`float`): for "supervised", the share of the budget kept uniform over
            unlabelled tokens; for "importance" and "gradient", the share of the sampling probability
            spread evenly. Defaults to 0.2 for those three; not used by the others.
        engine (`str`): how a step runs: "auto" (one pass where it can run on a CPU, two passes otherwise),
            "single-pass" (an error where it cannot run) or "two-pass"; see :mod:`tokentune_peft.engine_choice`.
        dense_top_layers (`int`): how many of the last transformer layers run every token with autograd
            (0, the default, is plain TokenTune). The layers below stay token-selective; the loss covers
            every supervised token, as the stock model's; see :mod:`tokentune_peft.dense_top`.

    Example:
        >>> from peft import LoraConfig
        >>> config = TokenTuneConfig(selection_ratio=0.3, task_type="CAUSAL_LM",
        ...                          peft_config=LoraConfig(r=8, target_modules="all-linear"))
        >>> config.selection_ratio, config.peft_config.r
        (0.3, 8)
    """

    selection_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Share of each sequence's real tokens to back-propagate through, in (0, 1]. "
            f"Defaults to {DEFAULT_SELECTION_RATIO} unless `num_selected` is set."
        },
    )
    num_selected: int | None = field(
        default=None, metadata={"help": "Fixed number k of tokens per sequence (instead of `selection_ratio`)."}
    )
    peft_config: LoraConfig | None = field(
        default=None,
        metadata={
            "help": "LoraConfig of the adapter trained with TokenTune (QLoRA on a 4-bit model). "
            "None trains all weights (full fine-tuning)."
        },
    )
    always_select: str | list[int] = field(
        default="auto",
        metadata={
            "help": "Positions always selected: 'auto' (the token the task head reads), 'first', 'last', "
            "'none', or a list of sequence indices."
        },
    )
    seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the generator that samples the selected positions (under a TokenTune trainer: seed + "
            "process index). TrainingArguments.seed does not change the positions."
        },
    )
    selection: str | Callable = field(
        default="uniform",
        metadata={
            "help": f"How positions are chosen: one of {SELECTION_STRATEGIES} or a function "
            "`selector(batch, k, generator) -> selected_positions`."
        },
    )
    uniform_share: float | None = field(
        default=None,
        metadata={
            "help": "'supervised': share of the budget drawn uniformly among unlabelled tokens; 'importance' and "
            "'gradient': "
            f"share of the sampling probability spread evenly. In [0, 1]; {DEFAULT_UNIFORM_SHARE} if unset."
        },
    )

    engine: str = field(
        default="auto",
        metadata={
            "help": f"How a training step runs: one of {ENGINE_CHOICES}. 'auto' runs every token's forward once "
            "(single pass) on a CPU where it can, and two passes (a no-grad pass over all tokens, then the selected "
            "ones) on a GPU, where they are faster, and where the single pass cannot run: with "
            "selection='importance' or 'gradient', under FSDP, or gradient checkpointing with dropout."
        },
    )

    dense_top_layers: int = field(
        default=0,
        metadata={
            "help": "Number of last transformer layers that run every token with autograd, between 0 and the "
            "model's layer count. The layers below stay token-selective at `selection_ratio`; the loss covers every "
            "supervised token. More layers keep more activations (full fine-tuning's, in those layers)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if self.task_type not in SUPPORTED_TASK_TYPES:
            allowed = ", ".join(repr(str(t)) for t in SUPPORTED_TASK_TYPES)
            raise ValueError(
                f"`task_type` must be one of {allowed}; got {self.task_type!r}. An image classifier trains with "
                "'SEQ_CLS' (without a task type, peft's PeftModel would call the model around TokenTune's step)."
            )
        self._check_budget()
        self._check_always_select()
        self._check_selection()
        if self.engine not in ENGINE_CHOICES:
            raise ValueError(f"`engine` must be one of {ENGINE_CHOICES}; got {self.engine!r}.")
        count = self.dense_top_layers
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"`dense_top_layers` must be an integer >= 0; got {count!r}.")
        if count and self.selection == "gradient":
            raise ValueError(
                "selection='gradient' scores positions from the no-grad pass's last hidden states, which "
                f"`dense_top_layers` ({count}) leaves out (its top layers run in the grad pass only); "
                "set dense_top_layers=0 or choose another selection."
            )
        if isinstance(self.peft_config, dict):
            self.peft_config = LoraConfig(**self.peft_config)
        if self.peft_config is not None:
            if not isinstance(self.peft_config, LoraConfig):
                raise ValueError(
                    f"`peft_config` must be a peft LoraConfig or None; got {type(self.peft_config).__name__}."
                )
            if self.peft_config.task_type is None:
                self.peft_config.task_type = self.task_type

    def _check_budget(self) -> None:
        if self.selection_ratio is not None and self.num_selected is not None:
            raise ValueError(
                f"Set `selection_ratio` or `num_selected`, not both; got selection_ratio={self.selection_ratio} "
                f"and num_selected={self.num_selected}."
            )
        if self.num_selected is not None:
            if isinstance(self.num_selected, bool) or not isinstance(self.num_selected, int) or self.num_selected < 1:
                raise ValueError(f"`num_selected` must be an integer >= 1; got {self.num_selected!r}.")
            return
        if self.selection_ratio is None:
            self.selection_ratio = DEFAULT_SELECTION_RATIO
        ratio = self.selection_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f"`selection_ratio` must be a number in (0, 1]; got {ratio!r}.")
        self.selection_ratio = float(ratio)

    def _check_always_select(self) -> None:
        value = self.always_select
        if isinstance(value, str):
            if value not in ALWAYS_SELECT_CHOICES:
                raise ValueError(
                    f"`always_select` must be one of {ALWAYS_SELECT_CHOICES} or a list of non-negative ints; "
                    f"got {value!r}."
                )
            return
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value
        ):
            raise ValueError(
                f"`always_select` must be one of {ALWAYS_SELECT_CHOICES} or a list of non-negative ints; got {value!r}."
            )
        self.always_select = list(value)

    def _check_selection(self) -> None:
        if isinstance(self.selection, str) and self.selection.startswith(CUSTOM_SELECTION_PREFIX):
            raise ValueError(
                f"This config was trained with a custom selector ({self.selection[len(CUSTOM_SELECTION_PREFIX) :]}), "
                "which JSON cannot hold; pass the function again: "
                "TokenTuneConfig.from_pretrained(folder, selection=my_selector)."
            )
        if not callable(self.selection) and self.selection not in SELECTION_STRATEGIES:
            raise ValueError(
                f"`selection` must be one of {SELECTION_STRATEGIES} or a function "
                f"selector(batch, k, generator); got {self.selection!r}."
            )
        share = self.uniform_share
        if self.selection not in WITH_UNIFORM_SHARE:
            if share is not None:
                raise ValueError(
                    f"`uniform_share` applies to selection in {WITH_UNIFORM_SHARE}; got selection={self.selection!r}."
                )
            return
        if share is None:
            share = self.uniform_share = DEFAULT_UNIFORM_SHARE
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
            raise ValueError(f"`uniform_share` must be a number in [0, 1]; got {share!r}.")
        self.uniform_share = float(share)

    # peft's classification wrappers add their heads to `modules_to_save` of the config they are given,
    # when it has one. With LoRA the heads belong to the adapter; without it every weight trains anyway,
    # so the attribute is absent (the property raises AttributeError) and peft leaves the heads alone.
    @property
    def modules_to_save(self) -> list[str] | None:
        if self.peft_config is None:
            raise AttributeError("TokenTune without an adapter trains every module: no `modules_to_save`.")
        return self.peft_config.modules_to_save

    @modules_to_save.setter
    def modules_to_save(self, value: list[str] | None) -> None:
        self.peft_config.modules_to_save = value

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON types, the adapter's config nested as a dict."""
        data = super().to_dict()
        data["peft_config"] = None if self.peft_config is None else self.peft_config.to_dict()
        data["tokentune_version"] = __version__
        if callable(self.selection):
            data["selection"] = CUSTOM_SELECTION_PREFIX + f"{self.selection.__module__}.{self.selection.__qualname__}"
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenTuneConfig:
        """Build a config from :meth:`to_dict` output; unknown keys are an error, missing ones take defaults.

        Example:
            >>> TokenTuneConfig.from_dict(TokenTuneConfig(task_type="SEQ_CLS").to_dict()).selection_ratio
            0.3
        """
        data = dict(data)
        version = data.pop("tokentune_version", None)
        if version is not None and _version_tuple(version) > _version_tuple(__version__):
            warnings.warn(
                f"This TokenTune config was written by tokentune_peft {version}, newer than this {__version__}.",
                UserWarning,
                stacklevel=2,
            )
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"Unknown TokenTuneConfig fields {unknown}; this version of tokentune_peft ({__version__}) knows "
                f"{sorted(known)}. The file may come from a newer version."
            )
        lora = data.get("peft_config")
        if isinstance(lora, dict):
            lora = {k: v for k, v in lora.items() if k != "peft_type"}
            data["peft_config"] = LoraConfig(**lora)
        return cls(**data)

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write ``tokentune_config.json`` into ``save_directory`` (a folder you can push to the Hub)."""
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as handle:
            json.dump(self.to_dict(), handle, indent=2, sort_keys=True, default=_json_value)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str,
        subfolder: str | None = None,
        selection: Callable | None = None,
        **kwargs: Any,
    ):
        """Load ``tokentune_config.json`` from a local folder or a Hub repository.

        A config saved with a custom selector function records only its name; pass the function
        again as ``selection``.

        Example:
            >>> import tempfile
            >>> folder = tempfile.mkdtemp()
            >>> TokenTuneConfig(num_selected=64, task_type="CAUSAL_LM").save_pretrained(folder)
            >>> TokenTuneConfig.from_pretrained(folder).num_selected
            64
        """
        folder = os.path.join(pretrained_model_name_or_path, subfolder or "")
        path = os.path.join(folder, CONFIG_NAME)
        if not os.path.isfile(path):
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(pretrained_model_name_or_path, CONFIG_NAME, subfolder=subfolder, **kwargs)
        with open(path) as handle:
            data = json.load(handle)
        if selection is not None:
            data["selection"] = selection
        return cls.from_dict(data)
