"""bitsandbytes 4-bit layers on CPU: keep their weights in the layout whose matmul has a backward.

On a CPU with AVX512-BF16, bitsandbytes (seen with 0.50.2) repacks a ``Linear4bit`` weight for its CPU
inference kernel the first time the layer runs in eval mode on an input without grad (an evaluation),
and keeps it repacked. That kernel has no backward: every later training forward goes through it, and
the gradient through the frozen 4-bit weights to the layers below is silently dropped (torch only warns
that ``bitsandbytes::gemv_4bit`` has no autograd kernel). QLoRA that evaluates during training, or
before it, then trains on wrong gradients. TokenTune turns the repack off when it wraps a 4-bit model,
refuses a model already repacked, and checks at each training step that none has been since.
"""

from __future__ import annotations

import importlib.util

from torch import nn


def four_bit_layers(model: nn.Module) -> list[nn.Module]:
    """The bitsandbytes ``Linear4bit`` layers of ``model`` (none when bitsandbytes is not installed).

    Example:
        >>> four_bit_layers(nn.Linear(2, 2))
        []
    """
    if importlib.util.find_spec("bitsandbytes") is None:
        return []
    from bitsandbytes.nn import Linear4bit

    return [module for module in model.modules() if isinstance(module, Linear4bit)]


def _repacked_for_cpu_inference(layers: list[nn.Module]) -> list[nn.Module]:
    return [layer for layer in layers if getattr(layer.weight.quant_state, "packing_format_for_cpu", False)]


def keep_4bit_layers_trainable(model: nn.Module) -> list[nn.Module]:
    """Turn off bitsandbytes' CPU inference repacking on every 4-bit layer of ``model`` and return those
    layers; raise ValueError if one is already repacked (its weights cannot be restored exactly: load the
    model again).

    Example:
        >>> keep_4bit_layers_trainable(nn.Linear(2, 2))  # no 4-bit layer: nothing to do
        []
    """
    layers = four_bit_layers(model)
    if _repacked_for_cpu_inference(layers):
        raise ValueError(
            "The model's 4-bit layers were repacked by bitsandbytes for CPU inference (it ran in eval mode without "
            "grad before get_peft_model). Their matmul has no backward, so training them would drop gradients. "
            "Load the model again and call get_peft_model before evaluating it."
        )
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False  # the flag bitsandbytes reads before repacking
    return layers


def check_4bit_layers_trainable(layers: list[nn.Module]) -> None:
    """Raise RuntimeError if one of ``layers`` (as :func:`keep_4bit_layers_trainable` returned them) was
    repacked for CPU inference since.

    Example:
        >>> check_4bit_layers_trainable([])
    """
    repacked = _repacked_for_cpu_inference(layers)
    if repacked:
        raise RuntimeError(
            f"{len(repacked)} 4-bit layers were repacked by bitsandbytes for CPU inference after get_peft_model "
            "(their `support_avx512bf16_for_cpu` was turned back on?). Their matmul has no backward: a training "
            "step now would drop gradients. Load the model again."
        )
