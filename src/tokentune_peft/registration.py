"""Making peft's ``get_peft_model`` and ``PeftConfig.from_pretrained`` know TokenTune."""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from .attention import register_attention_functions
from .config import PEFT_TYPE, TokenTuneConfig
from .tuner import TokenTuneModel


def register_with_peft() -> None:
    """Register the TokenTune config and tuner under peft type ``"TOKENTUNE"``. Idempotent.

    peft's ``register_peft_method`` accepts only members of its ``PeftType`` enum, which a plugin
    cannot extend cleanly; peft's mappings are plain dicts, and a string key works the same.

    Example:
        >>> register_with_peft()
        >>> PEFT_TYPE_TO_TUNER_MAPPING["TOKENTUNE"].__name__
        'TokenTuneModel'
    """
    register_attention_functions()
    PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = TokenTuneConfig
    PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = TokenTuneModel
    PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = TokenTuneModel.prefix
