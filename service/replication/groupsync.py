"""Group fsync: commits return at once, one thread puts them on disk together.

Why. With ``synchronous=FULL`` a COMMIT holds SQLite's single writer for the
whole fsync, so the primary's cycle was *execute a batch, then wait for the
disk*, and a backup's loop stopped reading its stream while it synced. With
``Storage.defer_sync()`` the writer commits without syncing and asks this
module for durability; a thread runs ``Storage.sync()`` (an fdatasync of the
WAL) and reports back on the event loop. One fsync covers every commit that
returned before it started, so the next batch executes, and the next records
apply, while the previous ones reach the disk. This is the overlap PostgreSQL
gets from its WAL writer; nothing is acknowledged earlier than before (R2 still
counts a node only once its copy is on disk).

Invariants
----------
* ``request()`` returns a ticket; tickets grow by one per request.
* ``on_durable(t)`` is called on the event loop, in increasing ``t``, only after
  an fsync that started after the ``request()`` of ticket ``t`` returned; it
  covers every ticket up to ``t``.
* A failed fsync is fatal (``on_error``): after a failed fsync the kernel may
  have dropped the dirty pages, so a retry can succeed with the data lost. The
  node must restart from what is on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable

# Put on the request queue by ``close``: sync what was asked, then stop.
_CLOSE = 0


class GroupSync:
    def __init__(
        self,
        sync: Callable[[], object],
        on_durable: Callable[[int], None],
        on_error: Callable[[BaseException], None],
    ) -> None:
        self._sync = sync
        self._on_durable = on_durable
        self._on_error = on_error
        self._loop: asyncio.AbstractEventLoop | None = None
        # Tickets requested, in order; the thread takes them all before each fsync.
        # A SimpleQueue: a request is one call in C on the writer's path (a
        # threading.Condition is several in Python, and this runs once per batch).
        self._requests: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._requested = 0  # written by the event loop thread only
        self._synced = 0  # written by the sync thread only
        self._thread = threading.Thread(target=self._run, name="group-sync", daemon=True)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    @property
    def busy(self) -> bool:
        """An fsync is requested or running."""
        return self._requested != self._synced

    def request(self) -> int:
        self._requested += 1
        self._requests.put(self._requested)
        return self._requested

    def close(self) -> None:
        """Stop after one last sync of everything requested so far."""
        self._requests.put(_CLOSE)
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        loop = self._loop
        assert loop is not None
        closing = False
        while not closing:
            # Every request made before this fsync starts is covered by it.
            tickets = [self._requests.get()]
            with contextlib.suppress(queue.Empty):
                while True:
                    tickets.append(self._requests.get_nowait())
            closing = _CLOSE in tickets
            target = max(tickets)
            if target == _CLOSE:
                continue  # closed with nothing more to sync
            try:
                self._sync()
            except BaseException as exc:
                loop.call_soon_threadsafe(self._on_error, exc)
                return
            self._synced = target
            if loop.is_closed():
                return
            try:
                loop.call_soon_threadsafe(self._on_durable, target)
            except RuntimeError:
                return  # the loop closed meanwhile (shutdown)
