"""A model's transformer layers, and the one way a step runs part of a forward: skipping modules.

Several parts of a step need what a module receives, not what the model computes after it: the masks a
model builds before its first layer, the sequence an image classifier builds from ``pixel_values``, a
vision-language model's merged sequence, the inputs of the layers below the dense top layers. Each runs
the forward to its end with the modules it does not need replaced by a function that records their call
and hands their input on (:func:`skipping`), so every hook around them (FSDP's, DeepSpeed's) completes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

#: A module's recorded call: its positional and keyword arguments.
Call = tuple[tuple, dict]


def transformer_layers(model: nn.Module) -> list[nn.Module]:
    """The model's transformer layers, in order: its outermost ``GradientCheckpointingLayer`` modules.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        ...                                      num_attention_heads=2, vocab_size=64))
        >>> len(transformer_layers(model))
        3
    """
    layers: list[nn.Module] = []
    inside: set[nn.Module] = set()
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and module not in inside:
            layers.append(module)
            inside.update(module.modules())
    return layers


def hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a layer call receives (first positional argument, or ``hidden_states``).

    Example:
        >>> hidden_of((), {"hidden_states": 1})
        1
    """
    return args[0] if args else kwargs["hidden_states"]


def with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor | None) -> Call:
    """A layer call's ``(args, kwargs)`` with ``hidden`` in place of its hidden states.

    Example:
        >>> with_hidden((1, 2), {}, 3)
        ((3, 2), {})
    """
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@contextmanager
def skipping(
    modules: list[nn.Module], record: dict[nn.Module, Call], result: Callable[[tuple, dict], Any] = hidden_of
) -> Iterator[None]:
    """Within the context each of ``modules`` records its call into ``record`` and returns ``result(args, kwargs)``
    (by default its input hidden states, as a skipped transformer layer does).

    Example:
        >>> layer, record = nn.Linear(2, 2), {}
        >>> with skipping([layer], record):
        ...     layer(torch.ones(1, 2)).tolist()
        [[1.0, 1.0]]
        >>> len(record[layer][0])
        1
    """
    saved = {module: module.__dict__.get("forward") for module in modules}

    def skip(module: nn.Module) -> Callable:
        def forward(*args: Any, **kwargs: Any) -> Any:
            record[module] = (args, kwargs)
            return result(args, kwargs)

        return forward

    for module in modules:
        module.forward = skip(module)
    try:
        yield
    finally:
        for module, forward in saved.items():
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def first_layer_input(model: nn.Module, inputs: dict[str, Any], layers: list[nn.Module] | None = None) -> torch.Tensor:
    """[batch, N, hidden]: the sequence ``model``'s first transformer layer receives, computed without autograd.

    Every transformer layer is skipped, so this costs the embeddings only.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...                              intermediate_size=64, vocab_size=64))
        >>> first_layer_input(model, {"input_ids": torch.ones(1, 5, dtype=torch.long)}).shape
        torch.Size([1, 5, 32])
    """
    layers = transformer_layers(model) if layers is None else layers
    record: dict[nn.Module, Call] = {}
    with torch.no_grad(), skipping(layers, record):
        model(**inputs)
    return hidden_of(*record[layers[0]])
