"""Two calls that run in strict alternation: the caller's, and a helper thread's that goes first.

The single-pass step (:mod:`tokentune_peft.single_pass`) runs its two row groups this way: one thread
runs at a time and the turn passes at fixed points (:meth:`Alternation.hand_over`), so what the two calls
draw from a random stream comes in the same order in every run. An error in the helper reaches the
caller at its next hand-over; an error in the caller releases the helper, which must not wait forever.

Example:
    >>> order = []
    >>> alternation = Alternation()
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
import threading
from collections.abc import Callable
from typing import TypeVar

Result = TypeVar("Result")
CALLER, HELPER = "caller", "helper"


class Released(Exception):
    """Raised in the helper when the caller failed: it must stop, not wait for a turn that never comes."""


class Alternation:
    """The turn between a caller and its helper thread; see the module docstring.

    Args:
        stops: exceptions by which the helper's call ends early on purpose (not errors).
    """

    def __init__(self, stops: tuple[type[BaseException], ...] = ()) -> None:
        self.stops = (Released, *stops)
        #: Whether the helper's call is over (finished, stopped or failed).
        self.helper_done = False
        #: The helper's error, if it failed.
        self.error: BaseException | None = None
        self._turn = HELPER
        self._released = False
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None

    @property
    def started(self) -> bool:
        return self._thread is not None

    def in_helper(self) -> bool:
        """Whether the current thread is the helper's."""
        return self._thread is not None and threading.current_thread() is self._thread

    def run(self, helper: Callable[[], object], caller: Callable[[], Result]) -> Result:
        """Start ``helper`` in a thread, let it run until its first hand-over, run ``caller``; returns its result.

        The helper runs in a fresh context (transformers keeps per-call state in context variables). When it
        fails, its error is left in :attr:`error` for the caller to raise (see :meth:`hand_over`'s ``check``).
        """
        context = contextvars.Context()
        self._thread = threading.Thread(target=context.run, args=(self._run_helper, helper), daemon=True)
        self._thread.start()
        try:
            self._wait_for(CALLER)
            return caller()
        except BaseException:
            self._release()
            raise
        finally:
            self._thread.join()

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
