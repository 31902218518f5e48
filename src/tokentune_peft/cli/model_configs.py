"""Model configs built in code, defined once: tiny ones for tests and the CI recipe, and the Llama
sizes the benchmarks use. Nothing is downloaded."""

from __future__ import annotations

from transformers import BertConfig, Idefics3Config, Idefics3VisionConfig, LlamaConfig, PretrainedConfig, ViTConfig


def _sizes(hidden: int, intermediate: int, layers: int, heads: int, **more) -> dict:
    return dict(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads, **more
    )


#: Llama-architecture sizes, vocabulary 32,000 (1,024 for "llama-tiny"; "llama-3.2-1b" has Llama 3.2 1B's
#: shape: its vocabulary of 128,256 and its input embedding tied to the output head, 1.24B parameters; "llama-2-7b"
#: has the shape of the paper's headline model, 6.7B parameters).
LLAMA_SIZES = {
    "llama-tiny": _sizes(64, 128, 2, 4, num_key_value_heads=2, vocab_size=1024),
    "llama-256": _sizes(256, 688, 4, 8, num_key_value_heads=4, vocab_size=32000),
    "llama-1024": _sizes(1024, 2816, 8, 16, num_key_value_heads=8, vocab_size=32000),
    "llama-1b": _sizes(2048, 5632, 16, 32, num_key_value_heads=8, vocab_size=32000),
    "llama-3.2-1b": _sizes(2048, 8192, 16, 32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-2-7b": _sizes(4096, 11008, 32, 32, num_key_value_heads=32, vocab_size=32000),
}
#: A tiny BERT, the encoder counterpart of "llama-tiny".
BERT_TINY = _sizes(64, 128, 2, 4)
#: Tiny random models a recipe can name (``model_name``), trained from scratch.
TINY_MODELS = {"tiny-llama": (LlamaConfig, LLAMA_SIZES["llama-tiny"]), "tiny-bert": (BertConfig, BERT_TINY)}


#: Vision transformers a recipe can name, trained from scratch (no pretrained vision model installs offline):
#: "vit-digits" reads 32 x 32 grey images in patches of 4 (64 patches and the class token).
VISION_MODELS = {
    "vit-digits": dict(_sizes(192, 768, 6, 3), image_size=32, patch_size=4, num_channels=1),
}


#: Image-model shapes the benchmarks use, random weights: "vit-b16" is ViT-B/16 at 224 px (197 tokens);
#: "smolvlm-512" has SmolVLM-256M's shape (a SigLIP-B/16 tower at 512 px, its 1,024 patches shuffled into 64
#: image tokens, and SmolLM2-135M as the language model).
IMAGE_MODELS = ("vit-b16", "smolvlm-512")
#: The image token of "smolvlm-512": the last id of its vocabulary.
SMOLVLM_IMAGE_TOKEN = 49151


def image_model_config(name: str) -> PretrainedConfig:
    """The config of one of :data:`IMAGE_MODELS`.

    Example:
        >>> config = image_model_config("smolvlm-512")
        >>> (config.vision_config.image_size // config.vision_config.patch_size // config.scale_factor) ** 2
        64
    """
    if name == "vit-b16":
        return ViTConfig(**_sizes(768, 3072, 12, 12), image_size=224, patch_size=16, num_labels=10)
    if name == "smolvlm-512":
        vision = Idefics3VisionConfig(**_sizes(768, 3072, 12, 12), image_size=512, patch_size=16)
        text = LlamaConfig(
            **_sizes(576, 1536, 30, 9, num_key_value_heads=3), vocab_size=49152, tie_word_embeddings=True
        )
        return Idefics3Config(
            text_config=text.to_dict(),
            vision_config=vision.to_dict(),
            scale_factor=4,
            image_token_id=SMOLVLM_IMAGE_TOKEN,
            tie_word_embeddings=True,
        )
    raise ValueError(f"`model` must be one of {IMAGE_MODELS}; got {name!r}.")


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
