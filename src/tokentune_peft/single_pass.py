"""The single-pass TokenTune step: every token's forward runs once.

The two-pass step (:mod:`tokentune_peft.engine`) runs the backbone on all N tokens without autograd,
then again on the k selected tokens with it, so the selected tokens' forward is computed twice. Here
the batch is split into two row groups that run as two cooperating calls of the same model:

* the **grad group** (the caller's thread, autograd on) runs the whole model on the selected tokens' slots
  (:mod:`tokentune_peft.slots`), exactly the call the two-pass engine makes in its pass 2, and returns the
  output and the loss;
* the **no-grad group** (under ``torch.no_grad``, on a worker thread the engine starts once and keeps)
  runs only the backbone on the other ``N - width`` tokens of each row; its output is discarded.

They meet in every self-attention, through the attention function TokenTune registers with
transformers: the no-grad group arrives first and leaves its keys and values; the grad group writes
its own, differentiable keys and values beside them, its queries attend to all N tokens, and it
hands the detached keys and values back; the no-grad group's queries attend to them in turn. The
two calls run in strict alternation (:mod:`tokentune_peft.alternation`: one thread runs at a time, in a
fixed order), so the random number stream, and with it dropout, is the same from run to run.

Each group's queries need the rows of the model's own full-sequence masks (causal, padding, sliding
window, packed documents), which the model builds from its inputs before its layers run. A short
**probe** builds them: the backbone runs on the whole batch without autograd with every transformer
layer skipped (:func:`~tokentune_peft.layers.skipping`: embeddings and masks only). The groups' own
calls then receive those masks in place of the ones they would build from their partial rows
(:func:`tokentune_peft.attention.mask_hook`).

Nothing reads the no-grad group's output: once it has handed over the keys and values of the last
self-attention, the rest of its forward (that attention for its queries, the last layers' feed-forward,
a pooler) would be wasted. From its second step on, the engine knows how many self-attention calls a
forward makes (``attention_calls``, counted in the grad group's call), and the no-grad group stops there.
Should the grad group reach one more, the step falls back to two passes rather than read stale keys.
The first step runs the no-grad group to its end, then puts the random state back where a later step
leaves it (dropout's draws past its last hand-over undone): every step leaves the random stream alike,
and a run resumed from a checkpoint trains as the whole run.

Both groups' queries attend over every key through one function (:func:`~tokentune_peft.attention.over_all_keys`):
on sdpa, a blockwise kernel that skips the key blocks a query block's mask hides (so a causal mask costs
about half of its scores, as the stock causal kernel does) and never builds a [queries x keys] tensor.

Where the single pass cannot run, :mod:`tokentune_peft.engine_choice` names the reason and the engine
runs the two-pass step instead.

The gradient is the TokenTune gradient, as with two passes: only the selected rows and all tokens'
keys and values are kept for backward.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import partial
from typing import Any

import torch
from torch import nn

from .alternation import Alternation, Worker
from .attention import QueryRows, TokenTuneStep, call_is_causal, mask_hook, no_attention_error
from .layers import hidden_of, skipping, transformer_layers
from .selection.sampling import gather_positions
from .slots import Slots, other_positions
from .step_inputs import StepBatch
from .whole_batch import WholeBatchRows


class SinglePassUnsupported(RuntimeError):
    """The model did something the single pass cannot follow; the engine reruns the step in two passes."""


class StopForward(Exception):
    """Raised in the no-grad group once it has computed all that is read of it."""


def _random_state(device: torch.device) -> torch.Tensor:
    """The state of the generator dropout draws from on ``device``."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_random_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class _Rows:
    """The no-grad group's rows: every row's positions outside the grad group's slots ([batch, N - width])."""

    def __init__(self, positions: torch.Tensor, seq_len: int) -> None:
        self.positions = positions
        self.rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
        self.queries = QueryRows(positions, seq_len)

    def spread_rows(self, part: torch.Tensor, seq_len: int) -> torch.Tensor:
        """``part`` ([B, width, ...]) written at its positions of a [B, N, ...] tensor of zeros."""
        full = part.new_zeros(part.shape[0], seq_len, *part.shape[2:])
        return full.index_put_((self.rows, self.positions), part)

    def spread(self, part: torch.Tensor, seq_len: int) -> torch.Tensor:
        """``part`` ([B, H, width, D]) written at its positions of a [B, H, N, D] tensor of zeros."""
        batch, heads, _, dim = part.shape
        full = part.new_zeros(batch, heads, seq_len, dim)
        full.transpose(1, 2).index_put_((self.rows, self.positions), part.transpose(1, 2))
        return full


class SinglePassStep(TokenTuneStep):
    """State of one single-pass step, passed to every attention call as ``tokentune_step``.

    The no-grad group records each attention's keys and values (its own rows of [B, H, N, D] tensors)
    with :meth:`~tokentune_peft.attention.TokenTuneStep.record`; the grad group then writes its own rows
    into them and attends with :meth:`~tokentune_peft.attention.TokenTuneStep.attend`, exactly as pass 2
    of the two-pass step does; the no-grad group's queries attend to the completed, detached tensors.

    With a whole-batch grad call (``rows``), the grad group's call is the model's call on the whole batch, its
    layers below the top running the selected rows (:mod:`tokentune_peft.whole_batch`), and the no-grad group
    stops at the first dense layer, handing over its rows of that layer's input.

    Args:
        seq_len: length N of the full sequences.
        slots: the grad group's slots (:class:`~tokentune_peft.slots.Slots`); the no-grad group runs the rest.
        rows: the rows each layer runs in a whole-batch grad call, if the step's grad call is one.
        attention_calls: self-attention calls of the model's forward, if known (an earlier step's
            :attr:`attended`); the no-grad group stops once it has recorded the last one.
        worker: the thread the no-grad group runs on (:class:`~tokentune_peft.alternation.Worker`), kept by the
            engine across steps; a new one if None.
    """

    def __init__(
        self,
        seq_len: int,
        slots: Slots,
        rows: WholeBatchRows | None = None,
        attention_calls: int | None = None,
        worker: Worker | None = None,
    ) -> None:
        super().__init__(seq_len, rows=rows)
        self.attention_calls = attention_calls
        self.recorded = 0  # the no-grad group's attention calls so far
        self.attended = 0  # the grad group's, in its forward
        self.select(slots)
        self.rest = _Rows(other_positions(self.slots.positions, seq_len), seq_len)
        self.built_masks: list[torch.Tensor | None] = []  # the probe's full-sequence masks, in the order built
        self.probing = True
        self.finished = False  # the forward is over: attention calls now are gradient checkpointing's replays
        self.alternation = Alternation(Worker() if worker is None else worker, stops=(StopForward,))
        self._next_module: nn.Module | None = None
        self._device: torch.device | None = None
        self._random_state_after_last_hand_over: torch.Tensor | None = None

    def __repr__(self) -> str:
        return f"SinglePassStep(seq_len={self.seq_len}, probing={self.probing}, finished={self.finished})"

    # Masks -------------------------------------------------------------------------------------------

    def record_masks(self) -> AbstractContextManager:
        """Context for the probe: keep every mask the model builds, in order."""

        def hook(build: Callable, *args: Any, **kwargs: Any):
            mask = build(*args, **kwargs)
            self.built_masks.append(mask)
            return mask

        return mask_hook(hook)

    def replay_masks(self) -> AbstractContextManager:
        """Context for a group's call: hand out the probe's masks, in the order the model asks for them."""
        masks = iter(self.built_masks)

        def hook(build: Callable, *args: Any, **kwargs: Any):
            try:
                return next(masks)
            except StopIteration:
                raise SinglePassUnsupported(
                    "The model built more attention masks in a row group's call than on the whole batch."
                ) from None

        return mask_hook(hook)

    # Layers and attention ----------------------------------------------------------------------------

    def layer_inputs(self, layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """The no-grad group hands its rows of the first dense layer's input over and stops there."""
        if not self.alternation.in_helper():
            return super().layer_inputs(layer, args, kwargs)
        if self.rows is not None and layer is self.rows.first_dense:
            self.rows.base = self.rest.spread_rows(hidden_of(args, kwargs), self.seq_len)
            raise StopForward
        return None

    def attention(self, module, query, key, value, mask, stock: Callable, over_all_keys: Callable, kwargs: dict):
        """One self-attention call of either group: the no-grad group is the helper thread's."""
        if self.probing:
            raise SinglePassUnsupported("The model ran self-attention outside its transformer layers.")
        if self.alternation.in_helper():
            return self._attend_no_grad(module, query, key, value, mask, over_all_keys, kwargs)
        alone = not self.alternation.started  # every token is selected: no no-grad group
        if alone and not self.finished:
            self._record_rows(module, query, key, value, mask, kwargs, self._zeros)
        if not self.finished:  # (in backward, gradient checkpointing replays the grad group's layers)
            self._raise_no_grad_error()
            self.attended += 1
            if self.attended > self.recorded:
                counted_by = "the no-grad row group" if self.attention_calls is None else "an earlier step of the model"
                raise SinglePassUnsupported(
                    f"The grad row group made more self-attention calls ({self.attended}) than {counted_by} "
                    f"({self.recorded}): the model's control flow depends on its inputs."
                )
            if self._next_module is not module:
                raise SinglePassUnsupported(
                    f"The two row groups reached different attention calls ({type(module).__name__}): the "
                    "model's control flow depends on its inputs."
                )
        output = self.attend(module, query, key, value, over_all_keys, kwargs)
        if not (self.finished or alone):
            self.alternation.hand_over()
            self._raise_no_grad_error()
        return output

    def stand_in(self, recorded: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """A stand-in slot's rows: its own, detached (no other group computes its position)."""
        return own.detach()

    def _zeros(self, part: torch.Tensor) -> torch.Tensor:
        return part.new_zeros(part.shape[0], part.shape[1], self.seq_len, part.shape[3])

    def _record_rows(self, module, query, key, value, mask, kwargs, spread: Callable) -> bool:
        """Record [B, H, N, D] keys and values holding ``spread``'s rows; returns the call's ``is_causal``."""
        is_causal = call_is_causal(module, kwargs)
        self.record(module, query, spread(key), spread(value), mask, is_causal, kwargs.get("scaling"))
        self._next_module = module
        self.recorded += 1
        return is_causal

    def _attend_no_grad(self, module, query, key, value, mask, over_all_keys, kwargs):
        spread = partial(self.rest.spread, seq_len=self.seq_len)
        is_causal = self._record_rows(module, query, key, value, mask, kwargs, spread)
        if self.recorded == self.attention_calls:  # the last keys and values: nothing reads the rest
            raise StopForward
        self.alternation.hand_over()  # the grad group writes its rows into the recorded keys and values
        if self.attention_calls is None:  # where a later step will stop: see _run_no_grad
            self._random_state_after_last_hand_over = _random_state(self._device)
        keys, values = self.keys[module].detach(), self.values[module].detach()
        return over_all_keys(module, query, keys, values, self.rest.queries, mask, is_causal, kwargs)

    # The two groups ----------------------------------------------------------------------------------

    def _raise_no_grad_error(self) -> None:
        error = self.alternation.error
        if error is None:
            return
        if isinstance(error, SinglePassUnsupported):
            raise SinglePassUnsupported(str(error)) from error
        raise RuntimeError(f"The no-grad row group of a single-pass TokenTune step failed: {error!r}") from error

    def _run_no_grad(self, backbone: nn.Module, inputs: dict, autocast: dict) -> None:
        with torch.no_grad(), torch.autocast(**autocast), self.replay_masks():
            backbone(**inputs, use_cache=False, tokentune_step=self)
        # A first step runs the no-grad group to its end; later ones stop after the last keys and values.
        # Undo the random numbers (dropout) drawn after its last hand-over, so that every step leaves the
        # random stream where a later step would, and a run resumed from a checkpoint trains as the whole.
        if self._random_state_after_last_hand_over is not None:
            _set_random_state(self._device, self._random_state_after_last_hand_over)

    def _run_grad(self, model: nn.Module, grad_inputs: dict) -> Any:
        self._raise_no_grad_error()
        with self.replay_masks():
            output = model(**grad_inputs, tokentune_step=self)
        if not self.alternation.helper_done:
            raise SinglePassUnsupported("The no-grad row group ran more attention calls than the grad group.")
        self._raise_no_grad_error()
        return output

    def run(self, model: nn.Module, batch: StepBatch, grad_inputs: dict, start_grad_call: Callable) -> Any:
        """Probe the masks, then run both groups; returns the grad group's output (``model(**grad_inputs)``).

        The probe runs on ``batch.backbone_inputs``, the no-grad group on its rows of ``batch.per_token``.
        ``start_grad_call`` prepares the grad call (:meth:`~tokentune_peft.grad_call.SelectedTokensCall.start`),
        under the probe's masks.
        """
        backbone_inputs = batch.backbone_inputs
        backbone = model.base_model
        # The probe runs with every transformer layer skipped: by their first, the model has built its masks.
        with torch.no_grad(), self.record_masks(), skipping(transformer_layers(backbone), {}):
            backbone(**backbone_inputs, tokentune_step=self)
        self.probing = False
        with self.replay_masks():  # the masks the grad group's attention receives
            start_grad_call()
        if self.rest.positions.shape[1] == 0:  # every token is selected: the grad group runs alone
            with self.replay_masks():
                output = model(**grad_inputs, tokentune_step=self)
        else:
            output = self._run_both(model, batch.per_token, grad_inputs)
        if not self.keys and (self.rows is None or self.rows.lower):
            raise no_attention_error()
        self.finished = True
        return output

    def _run_both(self, model: nn.Module, per_token: dict, grad_inputs: dict) -> Any:
        no_grad_inputs = gather_positions(per_token, self.rest.positions)
        no_grad_inputs["attention_mask"] = torch.ones_like(self.rest.positions)
        # Autocast is set per thread: the no-grad group computes in the caller's precision.
        self._device = per_token["position_ids"].device
        device = self._device.type
        autocast = {
            "device_type": device,
            "dtype": torch.get_autocast_dtype(device),
            "enabled": torch.is_autocast_enabled(device),
        }
        return self.alternation.run(
            partial(self._run_no_grad, model.base_model, no_grad_inputs, autocast),
            partial(self._run_grad, model, grad_inputs),
        )
