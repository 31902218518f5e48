"""Which engine runs a TokenTune step: the single pass or two passes (``TokenTuneConfig.engine``).

Both compute the same gradient (:mod:`tokentune_peft.engine`, :mod:`tokentune_peft.single_pass`). The
single pass cannot run every step; :class:`EngineChoice` names the reason when it does not, remembers a
model the single pass failed to follow, and logs the engine whenever the choice changes.
"""

from __future__ import annotations

import enum
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


class Engine(str, enum.Enum):  # noqa: UP042 (enum.StrEnum needs Python 3.11; the package supports 3.10)
    """The values of ``TokenTuneConfig.engine``; equal to their strings.

    Example:
        >>> Engine("two-pass") is Engine.TWO_PASS, Engine.SINGLE_PASS == "single-pass"
        (True, True)
    """

    AUTO = "auto"
    SINGLE_PASS = "single-pass"
    TWO_PASS = "two-pass"

    def __str__(self) -> str:
        return self.value


ENGINE_CHOICES = tuple(engine.value for engine in Engine)


def _has_dropout(model: nn.Module) -> bool:
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return True
        for name in ("attention_dropout", "dropout", "dropout_prob", "attn_dropout"):
            value = getattr(module, name, None)
            if isinstance(value, float) and value > 0:
                return True
    return False


def single_pass_blocker(model: nn.Module, drawn_in_forward: str | None) -> str | None:
    """Why the single pass cannot run a step of ``model`` (a transformers model), or None if it can;
    ``drawn_in_forward`` names the selection strategy that draws the step's positions in the forward, if any.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                                      num_attention_heads=2, vocab_size=64))
        >>> single_pass_blocker(model, drawn_in_forward=None) is None
        True
        >>> single_pass_blocker(model, drawn_in_forward="importance")
        "selection 'importance' draws the positions from a full no-grad pass"
    """
    if drawn_in_forward is not None:
        return f"selection {drawn_in_forward!r} draws the positions from a full no-grad pass"
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if any(isinstance(module, (FSDPModule, FullyShardedDataParallel)) for module in model.modules()):
        return "FSDP's hooks gather and free each layer's weights around one call at a time"
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing and _has_dropout(model):
        return (
            "gradient checkpointing replays each layer's random numbers, which the two groups draw interleaved, "
            "so dropout would differ in the recomputation"
        )
    return None


def auto_prefers_two_pass(device: torch.device) -> str | None:
    """Why ``engine="auto"`` runs two passes on ``device`` although the single pass could run, or None.

    The single pass hands the turn between its two row groups at every layer; on a GPU it measured slower
    than two passes (docs/benchmarks.md).

    Example:
        >>> auto_prefers_two_pass(torch.device("cpu")) is None
        True
        >>> auto_prefers_two_pass(torch.device("cuda"))
        'on a cuda device two passes are faster than the single pass'
    """
    if device.type == "cpu":
        return None
    return f"on a {device.type} device two passes are faster than the single pass"


class EngineChoice:
    """Chooses the engine of each step of one model.

    Args:
        asked: the configured :class:`Engine`.

    After a step, :attr:`used` says which engine ran and :attr:`reason` why not the single pass (None when it
    ran). :attr:`attention_calls` is how many self-attention calls a forward of the model makes, once a single
    pass has counted them.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                                      num_attention_heads=2, vocab_size=64))
        >>> choice = EngineChoice(Engine.AUTO)
        >>> choice.choose(model, drawn_in_forward="gradient"), choice.reason
        (<Engine.TWO_PASS: 'two-pass'>, "selection 'gradient' draws the positions from a full no-grad pass")
    """

    def __init__(self, asked: Engine | str) -> None:
        self.asked = Engine(asked)
        self.used: Engine | None = None
        self.reason: str | None = None
        self.attention_calls: int | None = None
        self._single_pass_failure: str | None = None

    def choose(self, model: nn.Module, drawn_in_forward: str | None, blocker: str | None = None) -> Engine:
        """The engine of this step. ``blocker`` is a reason of the step's input kind against the single pass.

        Raises ValueError when the config asks for the single pass and it cannot run.
        """
        reason = blocker
        if self.asked == Engine.TWO_PASS:
            reason = "the config asks for it"
        reason = reason or single_pass_blocker(model, drawn_in_forward) or self._single_pass_failure
        if reason is None and self.asked == Engine.AUTO:
            reason = auto_prefers_two_pass(next(model.parameters()).device)
        if reason is not None and self.asked == Engine.SINGLE_PASS:
            raise ValueError(f"TokenTuneConfig(engine={Engine.SINGLE_PASS.value!r}) cannot run this step: {reason}.")
        self._announce(Engine.SINGLE_PASS if reason is None else Engine.TWO_PASS, reason)
        return self.used

    def single_pass_failed(self, error: Exception) -> None:
        """The single pass could not follow the model: this step and every later one run two passes."""
        if self.asked == Engine.SINGLE_PASS:
            raise error
        logger.warning("TokenTune falls back to the two-pass step for this model: %s", error)
        self._single_pass_failure = str(error)
        self._announce(Engine.TWO_PASS, str(error))

    def _announce(self, engine: Engine, reason: str | None) -> None:
        if (engine, reason) != (self.used, self.reason):
            why = "" if reason is None else f" ({reason})"
            logger.info("TokenTune runs the %s step%s.", engine.value, why)
        self.used, self.reason = engine, reason
