"""What `PeftModel.save_pretrained` writes for a TokenTune model.

peft writes the weights the tuner hands it, then calls ``save_pretrained`` on the config the tuner
keeps. TokenTune keeps one of the two configs below, so that what lands on disk loads without this
package:

* LoRA + TokenTune: a plain LoRA adapter (``adapter_config.json`` with no extra keys, and
  ``adapter_model.safetensors``), which plain peft loads; ``tokentune_config.json`` beside it.
* TokenTune alone (all weights trained): ``config.json`` and ``model.safetensors``, which
  ``AutoModelFor....from_pretrained`` loads; ``tokentune_config.json`` beside them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

from peft import LoraConfig
from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from transformers import PretrainedConfig
from transformers.utils import SAFE_WEIGHTS_NAME
from transformers.utils import WEIGHTS_NAME as TRANSFORMERS_WEIGHTS_NAME

from .config import TokenTuneConfig
from .model_support import CLASSIFIER_NAMES


@dataclass
class LoraConfigWithTokenTune(LoraConfig):
    """The adapter's LoraConfig; saving it also writes the TokenTune settings beside it."""

    @classmethod
    def wrap(cls, tokentune_config: TokenTuneConfig) -> LoraConfigWithTokenTune:
        lora = tokentune_config.peft_config
        wrapped = cls(**{f.name: getattr(lora, f.name) for f in fields(lora) if f.init})
        wrapped.tokentune_config = tokentune_config
        return wrapped

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        super().save_pretrained(save_directory, **kwargs)
        self.tokentune_config.save_pretrained(save_directory)


@dataclass
class FullModelTokenTuneConfig(TokenTuneConfig):
    """TokenTune without an adapter; saving turns peft's weight file into a transformers checkpoint."""

    @classmethod
    def wrap(cls, tokentune_config: TokenTuneConfig, model_config: PretrainedConfig) -> FullModelTokenTuneConfig:
        wrapped = cls(**{f.name: getattr(tokentune_config, f.name) for f in fields(tokentune_config) if f.init})
        wrapped.model_config = model_config
        return wrapped

    @property
    def modules_to_save(self) -> list[str]:
        # Every weight is saved anyway; peft's classification wrappers find their head by these names.
        return list(CLASSIFIER_NAMES)

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        renames = {SAFETENSORS_WEIGHTS_NAME: SAFE_WEIGHTS_NAME, WEIGHTS_NAME: TRANSFORMERS_WEIGHTS_NAME}
        for peft_name, transformers_name in renames.items():
            path = os.path.join(save_directory, peft_name)
            if os.path.isfile(path):
                os.replace(path, os.path.join(save_directory, transformers_name))
        self.model_config.save_pretrained(save_directory)
        super().save_pretrained(save_directory)
