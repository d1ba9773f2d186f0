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
import threading
from collections.abc import Callable


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
        self._wake = threading.Condition()
        self._requested = 0
        self._synced = 0
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="group-sync", daemon=True)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    @property
    def busy(self) -> bool:
        """An fsync is requested or running."""
        return self._requested != self._synced

    def request(self) -> int:
        with self._wake:
            self._requested += 1
            self._wake.notify()
            return self._requested

    def close(self) -> None:
        """Stop after one last sync of everything requested so far."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        loop = self._loop
        assert loop is not None
        while True:
            with self._wake:
                while self._requested == self._synced and not self._closing:
                    self._wake.wait()
                if self._requested == self._synced:
                    return
                target = self._requested
            try:
                self._sync()
            except BaseException as exc:
                loop.call_soon_threadsafe(self._on_error, exc)
                return
            with self._wake:
                self._synced = target
            if loop.is_closed():
                return
            try:
                loop.call_soon_threadsafe(self._on_durable, target)
            except RuntimeError:
                return  # the loop closed meanwhile (shutdown)
