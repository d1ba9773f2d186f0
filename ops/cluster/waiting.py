"""Waiting on observable state, never on time.

A test that sleeps a fixed time is both slow (the sleep is sized for the worst
machine) and flaky (sometimes the worst machine is slower). ``wait_for`` polls
a predicate instead and returns as soon as the state is there; when it never
comes, the error says what was awaited and what was last seen, which is most
of the diagnosis. This module's poll interval is the only sleep tests may use.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class StopWaiting(Exception):
    """Raised by a predicate when the awaited state can no longer arrive.

    For example a node process exited: polling on to the deadline would only
    delay the report, so ``wait_for`` re-raises this at once.
    """


def wait_for(
    predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.02
) -> T:
    """Poll ``predicate`` until it returns a truthy value, and return that value.

    An exception from the predicate counts as "not yet" (a node may be
    restarting), but the last one is reported, and chained, on timeout;
    ``StopWaiting`` is re-raised at once. The predicate always runs at least
    once, even with a zero timeout.
    """
    __tracebackhide__ = True  # pytest shows the caller and the predicate, not this loop
    deadline = time.monotonic() + timeout
    last_value: object = None
    last_error: Exception | None = None
    while True:
        try:
            value = predicate()
        except StopWaiting:
            raise
        except Exception as error:
            last_error = error
        else:
            if value:
                return value
            last_value, last_error = value, None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(interval, remaining))
    message = f"timed out after {timeout}s waiting for {what}"
    if last_error is not None:
        raise TimeoutError(f"{message}; last error: {_describe(last_error)}") from last_error
    raise TimeoutError(f"{message}; last value: {last_value!r}")


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"
