"""Waiting on observable state, never on time.

A wait that sleeps a fixed time is both slow (the sleep is sized for the
worst machine) and flaky (sometimes the worst machine is slower). ``wait_for``
polls a predicate instead and returns as soon as the state is there; when it
never comes, the error says what was awaited and what was last seen, which is
most of the diagnosis. This module's poll interval is the only sleep a test
may use. (The benchmark, whose event loop has writers to run meanwhile,
waits in a thread: ``asyncio.to_thread(wait_for, ...)``.)

The rules: a truthy value ends the wait and is returned; an
exception from the predicate counts as "not yet" (a node may be restarting)
but the last one is reported, and chained, on timeout; ``StopWaiting`` ends
the wait at once; the predicate always runs at least once, even with a zero
timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class StopWaiting(Exception):
    """Raised by a predicate when the awaited state can no longer arrive.

    For example a node process exited: polling on to the deadline would only
    delay the report, so the wait re-raises this at once.
    """


class NotYet(Exception):
    """The awaited state is not there yet; the message says what is."""


class _Poll:
    """One wait's deadline and the last thing its predicate said."""

    def __init__(self, timeout: float, what: str) -> None:
        self.timeout = timeout
        self.what = what
        self.deadline = time.monotonic() + timeout
        self.last_value: object = None
        self.last_error: Exception | None = None

    def seen(self, value: object) -> None:
        self.last_value, self.last_error = value, None

    def failed(self, error: Exception) -> None:
        if isinstance(error, StopWaiting):
            raise error
        self.last_error = error

    def pause(self, interval: float) -> float | None:
        """How long to sleep before the next poll; None once the deadline has passed."""
        remaining = self.deadline - time.monotonic()
        return None if remaining <= 0 else min(interval, remaining)

    def timed_out(self) -> TimeoutError:
        message = f"timed out after {self.timeout}s waiting for {self.what}"
        if self.last_error is not None:
            error = self.last_error
            timeout = TimeoutError(f"{message}; last error: {type(error).__name__}: {error}")
            timeout.__cause__ = error
            return timeout
        return TimeoutError(f"{message}; last value: {self.last_value!r}")


def wait_for(
    predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.02
) -> T:
    """Poll ``predicate`` until it returns a truthy value, and return that value."""
    __tracebackhide__ = True  # pytest shows the caller and the predicate, not this loop
    poll = _Poll(timeout, what)
    while True:
        try:
            value = predicate()
        except Exception as error:
            poll.failed(error)
        else:
            if value:
                return value
            poll.seen(value)
        pause = poll.pause(interval)
        if pause is None:
            raise poll.timed_out()
        time.sleep(pause)
