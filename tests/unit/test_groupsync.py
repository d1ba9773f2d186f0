"""GroupSync on a real event loop and a real thread.

The sync callable is a gate the test opens one fsync at a time, so which
requests were made before an fsync started is decided by the test, not by the
scheduler. Nothing sleeps: the test awaits what the group sync reports (on the
event loop), each wait bounded by ``TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from service.chat_schema import MIGRATIONS
from service.replication.groupsync import GroupSync
from service.replication.types import Position
from service.storage import Storage

TIMEOUT = 5.0
T = TypeVar("T")


class GatedSync:
    """A sync callable that reports each call on the loop and waits to be released."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fail: BaseException | None = None) -> None:
        self.loop = loop
        self.fail = fail
        self.calls = 0
        self.thread_ids: set[int] = set()
        self.entered: asyncio.Queue[int] = asyncio.Queue()
        self._release = threading.Semaphore(0)

    def __call__(self) -> None:
        self.calls += 1
        self.thread_ids.add(threading.get_ident())
        self.loop.call_soon_threadsafe(self.entered.put_nowait, self.calls)
        if not self._release.acquire(timeout=TIMEOUT):
            raise TimeoutError("the test never released this fsync")
        if self.fail is not None:
            raise self.fail

    def release(self, count: int = 1) -> None:
        self._release.release(count)


class Reports:
    """What the group sync reported, in order, and on which thread."""

    def __init__(self) -> None:
        self.durable: asyncio.Queue[int] = asyncio.Queue()
        self.errors: asyncio.Queue[BaseException] = asyncio.Queue()
        self.thread_ids: set[int] = set()

    def on_durable(self, ticket: int) -> None:
        self.thread_ids.add(threading.get_ident())
        self.durable.put_nowait(ticket)

    def on_error(self, exc: BaseException) -> None:
        self.thread_ids.add(threading.get_ident())
        self.errors.put_nowait(exc)


async def soon(awaitable: Awaitable[T]) -> T:
    return await asyncio.wait_for(awaitable, TIMEOUT)


def gated_group() -> tuple[GatedSync, Reports, GroupSync]:
    """A started GroupSync whose fsyncs wait for the test (inside a running loop)."""
    sync, reports = GatedSync(asyncio.get_running_loop()), Reports()
    group = GroupSync(sync, reports.on_durable, reports.on_error)
    group.start()
    return sync, reports, group


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


def test_a_report_covers_every_ticket_requested_before_its_fsync_started() -> None:
    async def scenario() -> None:
        sync, reports, group = gated_group()
        try:
            assert not group.busy
            assert group.request() == 1
            assert group.busy
            assert await soon(sync.entered.get()) == 1  # fsync 1 runs, for ticket 1 only
            assert [group.request(), group.request()] == [2, 3]
            sync.release()
            assert await soon(reports.durable.get()) == 1, "ticket 1's fsync covers only it"
            assert group.busy, "tickets 2 and 3 still wait for an fsync"
            assert await soon(sync.entered.get()) == 2  # one fsync for both
            sync.release()
            assert await soon(reports.durable.get()) == 3
            assert not group.busy
            assert group.request() == 4
            assert await soon(sync.entered.get()) == 3
            sync.release()
            assert await soon(reports.durable.get()) == 4
        finally:
            sync.release(10)
            await soon(asyncio.to_thread(group.close))
        assert sync.calls == 3
        assert reports.durable.empty()
        assert reports.errors.empty()
        assert reports.thread_ids == {threading.get_ident()}, "reports come on the loop"
        assert threading.get_ident() not in sync.thread_ids, "fsyncs run off the loop"

    run(scenario)


def test_reports_grow_and_the_last_one_covers_the_last_ticket() -> None:
    """Requests as fast as the loop makes them: fewer fsyncs than tickets, reports in
    increasing order, and the last ticket is reported."""

    async def scenario() -> None:
        calls: list[int] = []
        reports = Reports()
        group = GroupSync(lambda: calls.append(1), reports.on_durable, reports.on_error)
        group.start()
        seen: list[int] = []
        try:
            tickets = []
            for _ in range(200):
                tickets.append(group.request())
                if len(tickets) % 20 == 0:
                    await asyncio.sleep(0)  # let reports in now and then
            assert tickets == list(range(1, 201))
            while not seen or seen[-1] < tickets[-1]:
                seen.append(await soon(reports.durable.get()))
        finally:
            await soon(asyncio.to_thread(group.close))
        assert seen == sorted(set(seen)), f"reports out of order: {seen}"
        assert seen[-1] == 200
        assert 1 <= len(calls) <= 200
        assert len(seen) == len(calls)
        assert not group.busy

    run(scenario)


def test_close_runs_a_last_fsync_of_pending_requests() -> None:
    async def scenario() -> None:
        sync, reports, group = gated_group()
        group.request()
        assert await soon(sync.entered.get()) == 1
        assert group.request() == 2  # pending when close() is called
        closing = asyncio.ensure_future(asyncio.to_thread(group.close))
        sync.release()
        assert await soon(sync.entered.get()) == 2, "close() did not sync ticket 2"
        assert not closing.done()
        sync.release()
        await soon(closing)
        assert sync.calls == 2
        assert [await soon(reports.durable.get()), await soon(reports.durable.get())] == [1, 2]
        assert not group.busy
        assert reports.errors.empty()

    run(scenario)


def test_close_with_nothing_pending_does_not_sync() -> None:
    async def scenario() -> None:
        sync, reports, group = gated_group()
        group.request()
        assert await soon(sync.entered.get()) == 1
        sync.release()
        assert await soon(reports.durable.get()) == 1
        await soon(asyncio.to_thread(group.close))
        assert sync.calls == 1
        assert reports.durable.empty()

    run(scenario)


def test_close_before_start_returns_at_once() -> None:
    calls: list[int] = []
    group = GroupSync(lambda: calls.append(1), lambda _t: None, lambda _e: None)
    group.request()
    group.close()
    assert calls == []


def test_a_failed_fsync_reaches_on_error_once_and_stops_the_thread() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        failure = OSError(5, "Input/output error")
        sync, reports = GatedSync(loop, fail=failure), Reports()
        group = GroupSync(sync, reports.on_durable, reports.on_error)
        group.start()
        group.request()
        assert await soon(sync.entered.get()) == 1
        group.request()  # made while the failing fsync runs
        sync.release(10)
        assert await soon(reports.errors.get()) is failure
        group.request()  # after the failure: nobody syncs any more
        await soon(asyncio.to_thread(group.close))
        assert sync.calls == 1, "an fsync was retried after a failure"
        assert reports.durable.empty(), "a failed fsync was reported durable"
        assert reports.errors.empty(), "on_error was called more than once"
        assert group.busy, "what was requested is not durable"
        assert reports.thread_ids == {threading.get_ident()}

    run(scenario)


def test_group_sync_of_a_deferred_storage(tmp_path: Path) -> None:
    """The runtime's use: the loop commits without syncing and requests a ticket per
    commit; the thread runs Storage.sync (and its checkpoints) beside the writer."""
    storage = Storage(tmp_path / "g.db", migrations=MIGRATIONS)
    storage.defer_sync()
    big = "x" * 50_000

    async def scenario() -> None:
        reports = Reports()
        group = GroupSync(storage.sync, reports.on_durable, reports.on_error)
        group.start()
        seen: list[int] = []
        try:
            for n in range(100):
                batch = storage.begin_batch()
                batch.db.execute(
                    "INSERT INTO users(name, name_key, password_hash, created_at) "
                    "VALUES (?, ?, ?, 1.0)",
                    (f"u{n}", f"u{n}", big),
                )
                assert batch.seal(1) is not None
                batch.commit()
                ticket = group.request()
                await asyncio.sleep(0)
            while not seen or seen[-1] < ticket:
                seen.append(await soon(reports.durable.get()))
        finally:
            await soon(asyncio.to_thread(group.close))
        assert seen == sorted(set(seen))
        assert seen[-1] == 100
        assert reports.errors.empty()

    try:
        run(scenario)
        assert storage.position() == Position(1, 100)
        assert storage.integrity_check() == "ok"
        # 100 commits of ~13 pages passed the threshold: the thread checkpointed, so a
        # new commit restarts the WAL far below it.
        batch = storage.begin_batch()
        batch.db.execute(
            "INSERT INTO users(name, name_key, password_hash, created_at) "
            "VALUES ('z', 'z', 'h', 1.0)"
        )
        batch.seal(1)
        batch.commit()
        assert storage.sync(checkpoint=False) is False
    finally:
        storage.close()
