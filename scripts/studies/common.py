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

    Each point also holds the learning rate the scheduler has reached. ``step_seconds`` holds each step's
    wall-clock from the end of the step before, so that fetching the batch and choosing its positions count too
    (the first step's from the start of training; an evaluation's time is left out).

    Example:
        >>> curve = LearningCurve()
        >>> curve.points, curve.step_seconds
        ([], [])
    """

    def __init__(self) -> None:
        self.points: list[dict] = []
        self.train_seconds = 0.0
        self.step_seconds: list[float] = []
        self._step_start: float | None = None
        self._last_end: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_end = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.train_seconds += now - self._step_start
        self.step_seconds.append(now - self._last_end)
        self._last_end = now
        if state.global_step == state.max_steps:
            control.should_evaluate = True
        return control

    def on_evaluate(self, args, state, control, metrics=None, lr_scheduler=None, **kwargs):
        if "eval_runtime" in metrics:  # TRL adds `eval_`-named keys to every evaluation: test by the runtime's
            rate = lr_scheduler.get_last_lr()[0] if lr_scheduler is not None else None
            point = {"step": state.global_step, "train_seconds": self.train_seconds, "learning_rate": rate}
            self.points.append({**point, **metrics})
        self._last_end = time.perf_counter()  # the next step's clock starts after the evaluation
