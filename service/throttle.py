"""Log lines about things strangers can repeat, at most one per interval.

A refused connection is worth a line: an operator wants to know that clients
are turned away, or that something without the cluster secret keeps dialing,
and from where. But whoever causes the refusal can repeat it thousands of
times a second, and one line each would flood the disk. ``ThrottledLog``
writes the first event of a kind at once, then at most one line per
``interval``: further events in the window are counted, and the count
(``suppressed=N``) comes with the next line. A window that ends with events
left out is closed by a line of its own (the last event's fields and the
count), so no count is lost when the events stop, nor when the node stops
inside a window (``close_windows``, on the way out).

Invariant: over any stretch of time, the lines of one ``ThrottledLog`` account
for every event: the sum over its lines of ``1 + suppressed`` is the number of
``note`` calls, once the last window has closed.
"""

from __future__ import annotations

import asyncio
import logging
import time

# The logs whose window has events left out: closed early when the node stops.
_open: set[ThrottledLog] = set()


def close_windows() -> None:
    """Write now the closing line of every window with events left out: the node is
    stopping, and its timers will not fire."""
    for throttled in list(_open):
        throttled._close_window()


class ThrottledLog:
    """One kind of event (``event``), logged at ``level`` at most once per ``interval``."""

    def __init__(self, logger: logging.Logger, level: int, event: str, interval: float) -> None:
        self.logger = logger
        self.level = level
        self.event = event
        self.interval = interval
        self._window_end = 0.0
        self._suppressed = 0
        self._last: dict[str, object] = {}
        self._flush: asyncio.TimerHandle | None = None

    def note(self, exc_info: BaseException | None = None, **fields: object) -> None:
        """One event; ``exc_info``: its error, whose traceback comes with the line if
        the event is written at once (never kept for a window's closing line)."""
        now = time.monotonic()
        if now >= self._window_end:
            self._write(fields, now, exc_info)
            return
        self._suppressed += 1
        self._last = fields
        if self._flush is None:
            # Close the window with its count even if nothing else happens.
            loop = asyncio.get_running_loop()
            self._flush = loop.call_later(self._window_end - now, self._close_window)
            _open.add(self)

    def _close_window(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        _open.discard(self)
        if self._suppressed:
            # The count is of events before this line: this line is one of them.
            self._suppressed -= 1
            self._write(self._last, time.monotonic())

    def _write(
        self, fields: dict[str, object], now: float, exc_info: BaseException | None = None
    ) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
            _open.discard(self)
        parts = [self.event, *(f"{key}={_value(value)}" for key, value in fields.items())]
        parts.append(f"suppressed={self._suppressed}")
        self.logger.log(self.level, " ".join(parts), exc_info=exc_info)
        self._suppressed = 0
        self._window_end = now + self.interval


def _value(value: object) -> str:
    text = str(value).replace("\n", " ")
    if " " in text or not text:
        return '"' + text.replace('"', "'") + '"'
    return text
