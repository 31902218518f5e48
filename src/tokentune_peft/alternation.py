"""Two calls that run in strict alternation: the caller's, and a helper's that goes first, on a worker thread.

The single-pass step (:mod:`tokentune_peft.single_pass`) runs its two row groups this way: one thread
runs at a time and the turn passes at fixed points (:meth:`Alternation.hand_over`), so what the two calls
draw from a random stream comes in the same order in every run. An error in the helper reaches the
caller at its next hand-over; an error in the caller releases the helper, which must not wait forever.

The helper runs on a :class:`Worker`: one thread, started at the first step and reused by every later one,
so what PyTorch keeps per thread (cuDNN's attention graphs, autocast and grad mode are set per call) stays
warm. The worker's thread ends when the worker is garbage collected (with the engine that keeps it), a
copied or unpickled worker starts a thread of its own, and so does one in a process forked after its start.

Example:
    >>> order = []
    >>> alternation = Alternation(Worker())
    >>> def helper():
    ...     order.append("helper 1"); alternation.hand_over(); order.append("helper 2")
    >>> def caller():
    ...     order.append("caller 1"); alternation.hand_over(); order.append("caller 2")
    >>> alternation.run(helper, caller)
    >>> order
    ['helper 1', 'caller 1', 'helper 2', 'caller 2']
"""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Callable
from typing import TypeVar

Result = TypeVar("Result")
CALLER, HELPER = "caller", "helper"
_STOP = None


class Released(Exception):
    """Raised in the helper when the caller failed: it must stop, not wait for a turn that never comes."""


def _serve(jobs: queue.SimpleQueue) -> None:
    """A worker thread's loop: run each job in a fresh context (transformers keeps per-call state in context
    variables) until the stop sign. It holds the queue only, so the worker itself can be collected."""
    while True:
        job = jobs.get()
        if job is _STOP:
            return
        contextvars.Context().run(job)
        del job  # it holds its step, and so the worker: waiting with it, the worker could never be collected


class Worker:
    """One helper thread, started at the first job and reused for every later one.

    Example:
        >>> worker, seen = Worker(), []
        >>> worker.run_soon(lambda: seen.append(threading.current_thread().name)); worker.close()
        >>> seen
        ['tokentune-no-grad-group']
    """

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()

    def run_soon(self, job: Callable[[], object]) -> None:
        """Run ``job`` on the worker thread (started now if it is not running)."""
        if self.thread is None or not self.thread.is_alive():  # in a forked child, the parent's thread is not alive
            self._jobs = queue.SimpleQueue()  # nor is the queue's state the child's to trust
            self.thread = threading.Thread(
                target=_serve, args=(self._jobs,), name="tokentune-no-grad-group", daemon=True
            )
            self.thread.start()
        self._jobs.put(job)

    def close(self) -> None:
        """End the worker thread once its job is done (a later job starts a new one)."""
        if self.thread is not None:
            self._jobs.put(_STOP)
            if self.thread is not threading.current_thread():
                self.thread.join()
            self.thread = None

    def __del__(self) -> None:
        self._jobs.put(_STOP)  # the thread holds the queue, not the worker: it ends once it reads this

    def __reduce__(self) -> tuple:
        return Worker, ()  # a copy (``copy.deepcopy`` of a model, pickling) runs on a thread of its own


class Alternation:
    """The turn between a caller and its helper; see the module docstring.

    Args:
        worker: the thread the helper runs on.
        stops: exceptions by which the helper's call ends early on purpose (not errors).
    """

    def __init__(self, worker: Worker, stops: tuple[type[BaseException], ...] = ()) -> None:
        self.worker = worker
        self.stops = (Released, *stops)
        #: Whether the helper's call is over (finished, stopped or failed).
        self.helper_done = False
        #: The helper's error, if it failed.
        self.error: BaseException | None = None
        self.started = False
        self._turn = HELPER
        self._released = False
        self._condition = threading.Condition()

    def in_helper(self) -> bool:
        """Whether the current thread runs this alternation's helper."""
        return self.started and not self.helper_done and threading.current_thread() is self.worker.thread

    def run(self, helper: Callable[[], object], caller: Callable[[], Result]) -> Result:
        """Run ``helper`` on the worker until its first hand-over, then ``caller``; returns the caller's result.

        When the helper fails, its error is left in :attr:`error` for the caller to raise.
        """
        self.started = True
        self.worker.run_soon(lambda: self._run_helper(helper))
        try:
            self._wait_for(CALLER)
            return caller()
        except BaseException:
            self._release()
            raise
        finally:
            with self._condition:
                while not self.helper_done:
                    self._condition.wait()

    def hand_over(self) -> None:
        """Give the turn to the other side and wait until it comes back (or, in the caller, the helper is done)."""
        me = HELPER if self.in_helper() else CALLER
        if me == CALLER and self.helper_done:
            return
        with self._condition:
            self._turn = CALLER if me == HELPER else HELPER
            self._condition.notify_all()
        self._wait_for(me)

    def _wait_for(self, me: str) -> None:
        with self._condition:
            while self._turn != me and not (me == HELPER and self._released):
                self._condition.wait()
            if me == HELPER and self._released:
                raise Released

    def _run_helper(self, helper: Callable[[], object]) -> None:
        try:
            helper()
        except self.stops:
            pass
        except BaseException as error:  # handed to the caller, which raises it
            self.error = error
        finally:
            with self._condition:
                self.helper_done = True
                self._turn = CALLER
                self._condition.notify_all()

    def _release(self) -> None:
        with self._condition:
            self._released = True
            self._condition.notify_all()
