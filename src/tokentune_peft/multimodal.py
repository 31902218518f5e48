"""Vision-language models: TokenTune on the language model's sequence, image tokens included.

A vision-language model turns each image into features (its vision tower and projector) and writes them
into the text embeddings in place of the image tokens; that merged sequence enters the language model.
A TokenTune step computes it once for the whole batch, with autograd (:func:`merged_inputs_embeds`),
then runs as a text step fed ``inputs_embeds`` (:mod:`tokentune_peft.engine`): positions are selected
over the merged sequence, text and image tokens alike, and only the selected rows carry gradient
through the language model, back into the projector and vision tower where those train.

The vision tower itself runs every patch with stock autograd: when it is frozen (no trainable weight in
it or the projector, the usual LoRA-on-the-language-model setup), autograd keeps nothing there; when it
trains, it keeps its full activations.

Supported: :data:`VISION_LANGUAGE_MODELS`. Other models with a vision tower are refused at
``get_peft_model``.

Example:
    >>> import tokentune_peft
    >>> from peft import get_peft_model
    >>> from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    >>> base = LlavaForConditionalGeneration(LlavaConfig(
    ...     text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                             num_attention_heads=2, vocab_size=128),
    ...     vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                                    num_attention_heads=2, image_size=16, patch_size=8),
    ...     image_token_id=127, attn_implementation="sdpa"))
    >>> model = get_peft_model(base, tokentune_peft.TokenTuneConfig(task_type="CAUSAL_LM", selection_ratio=0.5))
    >>> input_ids = torch.tensor([[1, 127, 127, 127, 127, 5, 6, 7]])  # 4 image tokens: 2 x 2 patches
    >>> output = model(input_ids=input_ids, pixel_values=torch.randn(1, 3, 16, 16), labels=input_ids)
    >>> output.selected_positions.shape
    torch.Size([1, 4])
"""

from __future__ import annotations

from typing import Any

import torch
from peft.utils import TaskType
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast

from .layers import Call, skipping

#: Supported vision-language models: their language model's sequence is the text embeddings with the image
#: features written over the image tokens, and its positions count up (no multimodal rotary positions).
VISION_LANGUAGE_MODELS = ("LlavaForConditionalGeneration", "Idefics3ForConditionalGeneration")
#: The image inputs a step computes the merged sequence from.
VISION_LANGUAGE_IMAGE_INPUTS = ("pixel_values", "pixel_attention_mask", "image_sizes")


def is_vision_language_model(model: nn.Module) -> bool:
    """Whether ``model`` has a vision tower feeding a language model (its config holds both).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> is_vision_language_model(LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=1, num_attention_heads=2, vocab_size=64)))
        False
    """
    config = getattr(model, "config", None)
    return hasattr(config, "vision_config") and hasattr(config, "text_config")


def check_vision_language_model_supported(model: nn.Module, task_type: str) -> None:
    """Raise ValueError when ``model`` (a vision-language model) is not one TokenTune trains exactly."""
    name = type(model).__name__
    if name not in VISION_LANGUAGE_MODELS:
        raise ValueError(
            f"TokenTune does not support {name}: supported vision-language models are "
            f"{', '.join(VISION_LANGUAGE_MODELS)} (others may give their language model multimodal positions, "
            "prefix attention over the image, or sequences that the merge changes in length)."
        )
    if task_type != TaskType.CAUSAL_LM:
        raise ValueError(f"{name} generates text: use task_type='CAUSAL_LM'; got {task_type!r}.")


def language_model(model: nn.Module) -> nn.Module:
    """The language model inside a vision-language model: what receives the merged ``inputs_embeds``."""
    return model.get_decoder()


def merged_inputs_embeds(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_inputs: dict[str, Any]
) -> torch.Tensor:
    """[batch, N, hidden]: the sequence ``model``'s language model receives, image features in place of image
    tokens, computed with autograd (the vision tower and projector run; the language model is skipped)."""
    language = language_model(model)
    record: dict[nn.Module, Call] = {}

    def skipped(args: tuple, kwargs: dict) -> BaseModelOutputWithPast:
        return BaseModelOutputWithPast(last_hidden_state=kwargs["inputs_embeds"])

    with skipping([language], record, result=skipped):
        model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **image_inputs)
    return record[language][1]["inputs_embeds"]
