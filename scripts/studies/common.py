"""What the studies share: the learning rate of all-weight classification runs, a learning curve, and the mean
and spread of seeds."""

from __future__ import annotations

import statistics
import time

from transformers import TrainerCallback

#: The classification learning rate for all weights (the recipe's).
FULL_LR = "1e-4"


def mean_std(values: list[float]) -> tuple[float, float]:
    """The mean of ``values`` and their sample standard deviation (0 for a single value).

    Example:
        >>> mean_std([1.0, 3.0]), mean_std([2.0])
        ((2.0, 1.4142135623730951), (2.0, 0.0))
    """
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


class LearningCurve(TrainerCallback):
    """Records every evaluation during training against the optimizer step and the training seconds so far
    (time inside optimizer steps only: evaluation, logging and saving are left out), and evaluates after
    the last step too. Evaluations with another ``metric_key_prefix`` (a test split after training) are
    not recorded.

    Example:
        >>> curve = LearningCurve()
        >>> curve.points
        []
    """

    def __init__(self) -> None:
        self.points: list[dict] = []
        self.train_seconds = 0.0
        self._step_start: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.train_seconds += time.perf_counter() - self._step_start
        if state.global_step == state.max_steps:
            control.should_evaluate = True
        return control

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if "eval_runtime" in metrics:  # TRL adds `eval_`-named keys to every evaluation: test by the runtime's
            self.points.append({"step": state.global_step, "train_seconds": self.train_seconds, **metrics})
