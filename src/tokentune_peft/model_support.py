"""Checks, at wrap time, that a model's attention is one TokenTune can run exactly."""

from __future__ import annotations

from peft.utils import TaskType
from torch import nn

from .attention import SUPPORTED_BASE_IMPLEMENTATIONS, base_implementation_name

_SINK_PARAMETER_NAMES = ("sinks", "s_aux")
#: Names under which transformers' classification models (and peft's wrappers) keep a model's head.
CLASSIFIER_NAMES = ("classifier", "score")


def check_model_supported(model: nn.Module) -> None:
    """Raise ValueError naming the first feature of ``model`` that TokenTune cannot handle.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> check_model_supported(LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=1, num_attention_heads=2, vocab_size=64, attn_implementation="sdpa")))
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "base_model"):
        raise ValueError(f"TokenTune needs a transformers PreTrainedModel; got {type(model).__name__}.")
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"{type(model).__name__} computes attention outside transformers' attention-function registry "
            "(`_supports_attention_backend` is False); TokenTune supports only models whose attention goes through it."
        )
    implementation = config._attn_implementation
    implementation = base_implementation_name(implementation) or implementation
    if implementation not in SUPPORTED_BASE_IMPLEMENTATIONS:
        raise ValueError(
            f"TokenTune runs on attn_implementation in {SUPPORTED_BASE_IMPLEMENTATIONS}; the model uses "
            f"{implementation!r}. Load it with attn_implementation='sdpa'."
        )
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ValueError("TokenTune does not support cross-attention (encoder-decoder models or add_cross_attention).")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError("TokenTune does not support attention soft-capping (config.attn_logit_softcapping).")
    for name, _ in model.named_parameters():
        if name.rsplit(".", 1)[-1] in _SINK_PARAMETER_NAMES:
            raise ValueError(f"TokenTune does not support attention sinks (parameter {name!r}).")


#: Config fields through which a sequence-classification head pools over many tokens, and the values that
#: read one token instead.
_POOLING_OPTIONS = {"classifier_pooling": ("cls",), "summary_type": ("first", "last", "cls_index")}


def check_head_supported(model: nn.Module, task_type: str | None) -> None:
    """Raise ValueError when the task head reads more tokens than TokenTune always selects.

    A sequence-classification head that pools over the sequence (mean pooling and the like) would see
    only the selected slots, padded slots included: the loss would be silently wrong.

    Example:
        >>> from transformers import ModernBertConfig, ModernBertForSequenceClassification
        >>> model = ModernBertForSequenceClassification(ModernBertConfig(hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=1, num_attention_heads=2, vocab_size=64, pad_token_id=0, classifier_pooling="mean"))
        >>> check_head_supported(model, "SEQ_CLS")
        Traceback (most recent call last):
        ...
        ValueError: The classification head pools over many tokens (config.classifier_pooling='mean'), ...
    """
    if task_type != TaskType.SEQ_CLS:
        return
    for option, single_token in _POOLING_OPTIONS.items():
        value = getattr(model.config, option, None)
        if value is not None and value not in single_token:
            raise ValueError(
                f"The classification head pools over many tokens (config.{option}={value!r}), while TokenTune "
                f"runs it on the selected ones only. Set {option} to one of {single_token}, e.g. "
                f"{type(model.config).__name__}(..., {option}={single_token[0]!r}), before get_peft_model."
            )


def is_decoder(model: nn.Module) -> bool:
    """Whether the model's self-attention is causal (a decoder) rather than bidirectional (an encoder).

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> is_decoder(BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                                 intermediate_size=64)))
        False
    """
    return any(getattr(module, "is_causal", False) is True for module in model.modules())
