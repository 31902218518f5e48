"""A TokenTune step's output: the model's own output type, plus a ``selected_positions`` field.

Wrappers rebuild a forward's output from its fields: DDP with ``find_unused_parameters=True`` (the
Trainer's default for a PeftModel) flattens and unflattens it with torch's pytree, which calls
``output_type(**fields)``. A key added to a ModelOutput that its type does not declare makes that call
fail, so the step returns an instance of a subclass that declares it.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from transformers.utils import ModelOutput


@functools.cache
def _with_positions_type(output_type: type[ModelOutput]) -> type[ModelOutput]:
    # A ModelOutput subclass registers itself with torch's pytree when it is created.
    return dataclasses.make_dataclass(
        f"{output_type.__name__}WithSelectedPositions",
        [("selected_positions", torch.LongTensor | None, dataclasses.field(default=None))],
        bases=(output_type,),
        namespace={"__module__": output_type.__module__},
    )


def with_selected_positions(output: ModelOutput, selected_positions: torch.Tensor) -> ModelOutput:
    """``output`` as an instance of a subclass of its type that declares ``selected_positions``.

    Example:
        >>> from transformers.modeling_outputs import CausalLMOutput
        >>> out = with_selected_positions(CausalLMOutput(logits=torch.zeros(1)), torch.tensor([[0, 2]]))
        >>> isinstance(out, CausalLMOutput), out.selected_positions.tolist(), list(out.keys())
        (True, [[0, 2]], ['logits', 'selected_positions'])
    """
    return _with_positions_type(type(output))(**output, selected_positions=selected_positions)
