"""The model shapes the benchmarks name, built in code with random weights (nothing is downloaded): Llama sizes up
to the paper's headline model, a MiniLM-shaped BERT, and two image models. The package keeps only the tiny
configs its own tests and recipes use (:mod:`tokentune_peft.cli.model_configs`), which these extend."""

from __future__ import annotations

from transformers import Idefics3Config, Idefics3VisionConfig, LlamaConfig, PretrainedConfig, ViTConfig

from tokentune_peft.cli.model_configs import LLAMA_SIZES
from tokentune_peft.cli.model_configs import transformer_sizes as sizes

#: Llama-architecture sizes, vocabulary 32,000 (1,024 for "llama-tiny"; "llama-3.2-1b" has Llama 3.2 1B's
#: shape: its vocabulary of 128,256 and its input embedding tied to the output head, 1.24B parameters; "llama-2-7b"
#: has the shape of the paper's headline model, 6.7B parameters).
LLAMA_SHAPES = {
    **LLAMA_SIZES,
    "llama-1024": sizes(1024, 2816, 8, 16, num_key_value_heads=8, vocab_size=32000),
    "llama-1b": sizes(2048, 5632, 16, 32, num_key_value_heads=8, vocab_size=32000),
    "llama-3.2-1b": sizes(2048, 8192, 16, 32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-2-7b": sizes(4096, 11008, 32, 32, num_key_value_heads=32, vocab_size=32000),
}
#: all-MiniLM-L6-v2's shape (BERT), for a random-weight "bert-minilm".
MINILM_SIZES = sizes(384, 1536, 6, 12)
#: Image-model shapes, random weights: "vit-b16" is ViT-B/16 at 224 px (197 tokens); "smolvlm-512" has
#: SmolVLM-256M's shape (a SigLIP-B/16 tower at 512 px, its 1,024 patches shuffled into 64 image tokens, and
#: SmolLM2-135M as the language model).
IMAGE_MODELS = ("vit-b16", "smolvlm-512")
#: The image token of "smolvlm-512": the last id of its vocabulary.
SMOLVLM_IMAGE_TOKEN = 49151


def llama_config(name: str, **overrides) -> LlamaConfig:
    """A Llama config of one of the :data:`LLAMA_SHAPES`, with any field overridden.

    Example:
        >>> llama_config("llama-2-7b").num_hidden_layers, llama_config("llama-tiny", vocab_size=100).vocab_size
        (32, 100)
    """
    if name not in LLAMA_SHAPES:
        raise ValueError(f"`model` must be one of {tuple(LLAMA_SHAPES)}; got {name!r}.")
    return LlamaConfig(**{**LLAMA_SHAPES[name], **overrides})


def image_model_config(name: str) -> PretrainedConfig:
    """The config of one of :data:`IMAGE_MODELS`.

    Example:
        >>> config = image_model_config("smolvlm-512")
        >>> (config.vision_config.image_size // config.vision_config.patch_size // config.scale_factor) ** 2
        64
    """
    if name == "vit-b16":
        return ViTConfig(**sizes(768, 3072, 12, 12), image_size=224, patch_size=16, num_labels=10)
    if name == "smolvlm-512":
        vision = Idefics3VisionConfig(**sizes(768, 3072, 12, 12), image_size=512, patch_size=16)
        text = LlamaConfig(**sizes(576, 1536, 30, 9, num_key_value_heads=3), vocab_size=49152, tie_word_embeddings=True)
        return Idefics3Config(
            text_config=text.to_dict(),
            vision_config=vision.to_dict(),
            scale_factor=4,
            image_token_id=SMOLVLM_IMAGE_TOKEN,
            tie_word_embeddings=True,
        )
    raise ValueError(f"`model` must be one of {IMAGE_MODELS}; got {name!r}.")
