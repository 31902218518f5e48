"""TokenTune for peft: memory-efficient fine-tuning of transformers by token selection.

Importing the package registers TokenTune with peft, so peft's own ``get_peft_model`` accepts a
:class:`TokenTuneConfig`.

Example:
    >>> import tokentune_peft
    >>> from peft import LoraConfig
    >>> config = tokentune_peft.TokenTuneConfig(selection_ratio=0.3, task_type="CAUSAL_LM",
    ...                                         peft_config=LoraConfig(r=8, target_modules="all-linear"))
"""

__version__ = "0.1.0"

from .config import TokenTuneConfig  # noqa: E402
from .memory import SavedTensorMeter, saved_activation_bytes  # noqa: E402
from .quantization import keep_4bit_layers_trainable  # noqa: E402
from .registration import register_with_peft  # noqa: E402
from .selection import sample_positions  # noqa: E402
from .tuner import TokenTuneLoraModel, TokenTuneModel  # noqa: E402

register_with_peft()

__all__ = [
    "SavedTensorMeter",
    "TokenTuneConfig",
    "TokenTuneLoraModel",
    "TokenTuneModel",
    "__version__",
    "keep_4bit_layers_trainable",
    "register_with_peft",
    "sample_positions",
    "saved_activation_bytes",
]
