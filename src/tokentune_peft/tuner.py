"""The peft tuners that `get_peft_model(model, TokenTuneConfig(...))` builds.

peft builds the tuner registered for the config's ``peft_type`` and routes every forward through it.
TokenTune's tuner runs a TokenTune step (:mod:`tokentune_peft.engine`) when the model trains with
autograd on, and is the stock model otherwise. There are two, picked by ``peft_config``:

* :class:`TokenTuneLoraModel`: peft's ``LoraModel`` plus the step (LoRA or QLoRA + TokenTune);
* :class:`TokenTuneModel`: no adapter, every base weight trains (TokenTune alone).
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraModel
from peft.utils import TaskType
from torch import nn

from .attention import base_implementation_name, tokentune_implementation_name
from .config import TokenTuneConfig
from .engine import TokenTuneEngine
from .grad_call import grad_call_for
from .model_support import CLASSIFIER_NAMES, check_head_supported, check_model_supported, is_decoder
from .multimodal import check_vision_language_model_supported, is_vision_language_model, language_model
from .quantization import check_4bit_layers_trainable, keep_4bit_layers_trainable
from .save_formats import FullModelTokenTuneConfig, LoraConfigWithTokenTune
from .selection import build_selector
from .step_inputs import feed_for
from .vision import check_image_model_supported, fed_pixel_values
from .whole_batch import check_dense_top_layers, install_layer_hooks

CLASSIFICATION_TASKS = (TaskType.SEQ_CLS, TaskType.TOKEN_CLS)
#: Keywords of a forward that steer the TokenTune step, never the model (:meth:`TokenTuneEngine.__call__`).
STEP_OPTIONS = ("selected_positions", "positions_drawn", "selection_generator", "loss_counted_over_selection")


class _TokenTuneStepMixin:
    """Switches the model's attention to TokenTune's and runs a TokenTune step in training forwards."""

    def _setup_tokentune(self, model: nn.Module, config: TokenTuneConfig) -> None:
        check_model_supported(model)
        check_head_supported(model, config.task_type)
        pixels = fed_pixel_values(model)
        if pixels:
            check_image_model_supported(model, config.task_type)
        vision_language = is_vision_language_model(model)
        if vision_language:
            check_vision_language_model_supported(model, config.task_type)
        self.tokentune_four_bit_layers = keep_4bit_layers_trainable(model)  # checked at each step, not searched
        implementation = model.config._attn_implementation
        if base_implementation_name(implementation) is None:
            model.config._attn_implementation = tokentune_implementation_name(implementation)
        layers = check_dense_top_layers(language_model(model) if vision_language else model, config.dense_top_layers)
        grad_call = grad_call_for(config.task_type, layers, config.dense_top_layers, pixels)
        if grad_call.covers_every_position:
            install_layer_hooks(layers)
        self.tokentune_config = config
        self.tokentune_engine = TokenTuneEngine(
            build_selector(config, is_decoder(model)),
            seed=config.seed,
            engine=config.engine,
            feed=feed_for(model, layers),
            grad_call=grad_call,
        )

    def forward(self, *args: Any, **kwargs: Any):
        """A TokenTune step when training with autograd on; the wrapped model's forward otherwise."""
        step_options = {name: kwargs.pop(name) for name in STEP_OPTIONS if name in kwargs}
        if not (self.training and torch.is_grad_enabled()):
            return self.model(*args, **kwargs)
        if args:
            raise ValueError("Pass the inputs of a TokenTune training step as keyword arguments.")
        implementation = self.model.config._attn_implementation
        if base_implementation_name(implementation) is None:
            raise ValueError(
                f"The model's attn_implementation was changed to {implementation!r} after wrapping; TokenTune "
                "needs its own ('tokentune_sdpa' or 'tokentune_eager'). Call set_attn_implementation before "
                "get_peft_model."
            )
        check_4bit_layers_trainable(self.tokentune_four_bit_layers)
        return self.tokentune_engine(self.model, **step_options, **kwargs)


class TokenTuneLoraModel(_TokenTuneStepMixin, LoraModel):
    """peft's LoraModel with TokenTune steps. Saves as a plain LoRA adapter plus ``tokentune_config.json``."""

    def __init__(self, model: nn.Module, peft_config: dict[str, TokenTuneConfig], adapter_name: str, **kwargs):
        config = peft_config[adapter_name]
        self._setup_tokentune(model, config)  # first, so an unsupported model fails before LoRA touches it
        # The TokenTune config and the tuner share one adapter config: peft's token-classification wrapper
        # adds its head to `modules_to_save` of the TokenTune config after the tuner is built.
        config.peft_config = LoraConfigWithTokenTune.wrap(config)
        if config.task_type in CLASSIFICATION_TASKS:
            # As peft's sequence-classification wrapper does before injecting; its token-classification one
            # does it after, when "all-linear" has already put LoRA on the head.
            heads = [name for name in CLASSIFIER_NAMES if name not in (config.modules_to_save or [])]
            config.modules_to_save = (config.modules_to_save or []) + heads
        super().__init__(model, {adapter_name: config.peft_config}, adapter_name, **kwargs)


class TokenTuneModel(_TokenTuneStepMixin, nn.Module):
    """The tuner peft builds for a :class:`TokenTuneConfig`.

    With a LoRA ``peft_config`` it builds a :class:`TokenTuneLoraModel`; without one, this class
    itself: every base weight stays trainable, and saving writes a transformers checkpoint.

    Example:
        >>> import tokentune_peft
        >>> from peft import get_peft_model
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                                     num_attention_heads=2, vocab_size=64, attn_implementation="sdpa"))
        >>> model = get_peft_model(base, tokentune_peft.TokenTuneConfig(task_type="CAUSAL_LM"))
        >>> type(model.base_model).__name__
        'TokenTuneModel'
    """

    prefix = ""

    def __new__(cls, model=None, peft_config=None, adapter_name=None, **kwargs):
        # Called without arguments when copied or unpickled: no dispatch then.
        if peft_config is not None and peft_config[adapter_name].peft_config is not None:
            return TokenTuneLoraModel(model, peft_config, adapter_name, **kwargs)
        return super().__new__(cls)

    def __init__(self, model: nn.Module, peft_config: dict[str, TokenTuneConfig], adapter_name: str, **kwargs):
        super().__init__()
        config = peft_config[adapter_name]
        self._setup_tokentune(model, config)
        self.model = model
        self.peft_config = {adapter_name: FullModelTokenTuneConfig.wrap(config, model.config)}
        self.active_adapter = adapter_name

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """All the wrapped model's weights, under the names transformers gives them."""
        prefix = "base_model.model."
        return {key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)}

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key
