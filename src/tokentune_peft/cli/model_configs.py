"""Model configs built in code, defined once: the tiny ones of the tests and the CI recipe, the Llama size the
memory tests measure, and the vision transformer a recipe trains from scratch. Nothing is downloaded. The larger
shapes the benchmarks name ("llama-2-7b", "vit-b16", ...) are in the checkout's ``scripts/benchmarks/shapes.py``."""

from __future__ import annotations

from transformers import BertConfig, LlamaConfig, PretrainedConfig, ViTConfig


def transformer_sizes(hidden: int, intermediate: int, layers: int, heads: int, **more) -> dict:
    """A transformer config's sizes under transformers' field names, with any other fields in ``more``.

    Example:
        >>> transformer_sizes(64, 128, 2, 4)["num_hidden_layers"]
        2
    """
    return dict(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads, **more
    )


#: Llama-architecture sizes: "llama-tiny" (vocabulary 1,024) for the tests and the "tiny-llama" recipe model,
#: "llama-256" (vocabulary 32,000) for the tests that measure memory.
LLAMA_SIZES = {
    "llama-tiny": transformer_sizes(64, 128, 2, 4, num_key_value_heads=2, vocab_size=1024),
    "llama-256": transformer_sizes(256, 688, 4, 8, num_key_value_heads=4, vocab_size=32000),
}
#: A tiny BERT, the encoder counterpart of "llama-tiny".
BERT_TINY = transformer_sizes(64, 128, 2, 4)
#: Tiny random models a recipe can name (``model_name``), trained from scratch.
TINY_MODELS = {"tiny-llama": (LlamaConfig, LLAMA_SIZES["llama-tiny"]), "tiny-bert": (BertConfig, BERT_TINY)}


#: Vision transformers a recipe can name, trained from scratch (no pretrained vision model installs offline):
#: "vit-digits" reads 32 x 32 grey images in patches of 4 (64 patches and the class token).
VISION_MODELS = {
    "vit-digits": dict(transformer_sizes(192, 768, 6, 3), image_size=32, patch_size=4, num_channels=1),
}


def vision_model_config(name: str, num_labels: int) -> ViTConfig:
    """The config of a recipe's vision transformer (one of :data:`VISION_MODELS`), with its number of classes.

    Example:
        >>> vision_model_config("vit-digits", num_labels=10).patch_size
        4
    """
    return ViTConfig(**VISION_MODELS[name], num_labels=num_labels)


def llama_config(name: str, **overrides) -> LlamaConfig:
    """A Llama config of one of the :data:`LLAMA_SIZES`, with any field overridden.

    Example:
        >>> llama_config("llama-256", vocab_size=1024).hidden_size
        256
    """
    if name not in LLAMA_SIZES:
        raise ValueError(f"`model` must be one of {tuple(LLAMA_SIZES)}; got {name!r}.")
    return LlamaConfig(**{**LLAMA_SIZES[name], **overrides})


def tiny_model_config(name: str, vocab_size: int) -> PretrainedConfig:
    """The config of a tiny recipe model ("tiny-llama" or "tiny-bert") for a tokenizer of ``vocab_size``.

    Example:
        >>> type(tiny_model_config("tiny-bert", 100)).__name__
        'BertConfig'
    """
    config_class, sizes = TINY_MODELS[name]
    return config_class(**{**sizes, "vocab_size": vocab_size})
