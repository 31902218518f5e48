"""Operators and host syncs of one training step: the stock model against TokenTune with each engine.

Every operator a steady-state step dispatches (steps 2 and 3, forward and backward, both row groups of the single
pass) is counted on the CPU by a dispatch mode, and so are the operators that make the host wait for the device:
``_local_scalar_dense`` (``.item()``, ``int(tensor)``, ``bool(tensor)``), ``nonzero`` and boolean-mask indexing.
A tiny Qwen2 (the tests' "qwen2": sliding window on one layer), one left-padded batch.

Run from the repository root:

    python -m scripts.benchmarks.step_ops
"""

from __future__ import annotations

import collections
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tokentune_peft.single_pass import SinglePassStep

SYNC_OPERATORS = ("aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default")


class OperatorCount(TorchDispatchMode):
    """Counts the operators dispatched while active, and those that wait for the device."""

    def __init__(self) -> None:
        super().__init__()
        self.operators = 0
        self.syncs: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.operators += 1
        name = str(func)
        if name in SYNC_OPERATORS:
            self.syncs[name.removeprefix("aten.").removesuffix(".default")] += 1
        elif name == "aten.index.Tensor":
            indices = [index for index in tree_leaves(args[1:]) if isinstance(index, torch.Tensor)]
            if any(index.dtype == torch.bool for index in indices):
                self.syncs["boolean-mask indexing"] += 1
        return func(*args, **(kwargs or {}))


def count_steps(model, batch: dict, steps: int = 3, counted_from: int = 1) -> OperatorCount:
    """Counts of steps ``counted_from`` to ``steps - 1`` (the first is a warm-up), both single-pass row groups."""
    count = OperatorCount()
    run_no_grad = SinglePassStep._run_no_grad

    def counted(self, *args, **kwargs):
        with count:
            return run_no_grad(self, *args, **kwargs)

    SinglePassStep._run_no_grad = counted
    try:
        for step in range(steps):
            if step < counted_from:
                model(**batch).loss.backward()
                continue
            with count:
                model(**batch).loss.backward()
    finally:
        SinglePassStep._run_no_grad = run_no_grad
    return count


def main() -> None:
    sys.path.insert(0, "tests")
    from helpers import build_model, make_batch, wrap

    print("| step | operators per step | host syncs per step |")
    print("|---|---:|---|")
    settings = (
        ("stock", None),
        ("TokenTune 0.3, single pass", "single-pass"),
        ("TokenTune 0.3, two passes", "two-pass"),
    )
    for name, engine in settings:
        model = build_model("qwen2", "CAUSAL_LM")
        if engine is not None:
            model = wrap(model, "CAUSAL_LM", lora=False, engine=engine)
        batch = make_batch(model.train(), "CAUSAL_LM", padding_side="left")
        count = count_steps(model, batch)
        syncs = ", ".join(f"{operator} {number / 2:g}" for operator, number in sorted(count.syncs.items()))
        print(f"| {name} | {count.operators / 2:g} | {sum(count.syncs.values()) / 2:g} ({syncs}) |")


if __name__ == "__main__":
    main()
