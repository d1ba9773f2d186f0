"""A load generator for the cluster tests, and the checks of what it leaves behind.

Theory of operation
-------------------
``Workload`` registers one user per writer, logs each in with its own
``Client``, and runs one writer task per user in a background thread (its own
event loop), so the test's main thread stays free to kill, freeze and restart
nodes with the synchronous harness. Writer ``i`` sends ``w{i}-1``, ``w{i}-2``,
... to the next writer's user, one at a time, and records every send in the
``Ledger`` with what the client learnt of it:

* ``ACKED``: a reply with a message id. The write is durable on the sync set
  and must be on every node exactly once, under that id (G1).
* ``FAILED``: a refusal (``errors.Refused``). The service said no; nothing of
  it may be stored.
* ``UNKNOWN``: no answer (``errors.Unavailable``: the client's deadline passed
  across a failover, or the send was cancelled when the workload stopped). It
  may or may not have been applied, but never twice (G3).

Any other error (``internal``, ``protocol``, an exception that is not a
``ChatError``) is a bug; it is recorded as ``UNKNOWN`` with its text and
``check_messages`` reports it.

``check_messages`` runs after ``Cluster.check_invariants`` (which converges and
stops the nodes): it opens every node's database and checks the ledger against
the ``messages`` table of each. Bodies are unique across a test by
construction (the writers number theirs, tests choose their own), so a body
stored twice is a duplicate whatever wrote it.

A few small steps every scenario shares live here too: start a cluster;
settle it before a fault (``wait_settled``: the sync set whole and confirmed
and every two nodes linked, reachable under load); ``finish`` a scenario
(settle, ``check_invariants``, ``check_messages``); wait for a node's status or
log to say something; and watch that a state does *not* arrive during a
window (the one wait that has to be bounded by time: proving a stale node
stays out of office).
"""

from __future__ import annotations

import asyncio
import enum
import re
import threading
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from service import errors
from service.client import Client
from service.storage import Storage

from .cluster import Cluster, NodeProcess, NodeView, NotYet
from .waiting import StopWaiting, wait_for

T = TypeVar("T")

PASSWORD = "correct-horse-battery"
# The client's overall deadline per send: long enough to ride out an election.
SEND_TIMEOUT = 15.0
# How long ``stop`` lets in-flight sends finish before it cancels them.
STOP_GRACE = 20.0
_WORKLOAD_BODY = re.compile(r"^w(\d+)-(\d+)$")


class Outcome(enum.Enum):
    ACKED = "acked"
    FAILED = "failed"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class SendRecord:
    """One send and what the client learnt of it."""

    body: str
    sender: str
    recipient: str
    outcome: Outcome
    message_id: int | None = None
    error: str | None = None
    # An error that no correct service or client produces (see the module docstring).
    unexpected: bool = False


class Ledger:
    """Every send of a test, appended from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[SendRecord] = []

    def add(self, record: SendRecord) -> None:
        with self._lock:
            self._records.append(record)

    @property
    def records(self) -> list[SendRecord]:
        with self._lock:
            return list(self._records)

    def with_outcome(self, outcome: Outcome) -> list[SendRecord]:
        return [r for r in self.records if r.outcome is outcome]

    @property
    def acked(self) -> int:
        with self._lock:
            return sum(1 for r in self._records if r.outcome is Outcome.ACKED)

    def summary(self) -> str:
        counts = Counter(r.outcome.value for r in self.records)
        return ", ".join(f"{counts[o.value]} {o.value}" for o in Outcome)


async def send_recorded(
    client: Client, sender: str, recipient: str, body: str, ledger: Ledger
) -> SendRecord:
    """``client.send`` with its outcome classified and added to ``ledger``."""
    record: SendRecord
    try:
        result = await client.send(recipient, body)
    except asyncio.CancelledError:
        ledger.add(SendRecord(body, sender, recipient, Outcome.UNKNOWN, error="cancelled"))
        raise
    except errors.Refused as exc:
        record = SendRecord(body, sender, recipient, Outcome.FAILED, error=exc.code)
    except errors.Unavailable as exc:
        record = SendRecord(body, sender, recipient, Outcome.UNKNOWN, error=exc.message)
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"
        record = SendRecord(body, sender, recipient, Outcome.UNKNOWN, error=text, unexpected=True)
    else:
        message_id = int(result["message"]["id"])
        record = SendRecord(body, sender, recipient, Outcome.ACKED, message_id=message_id)
    ledger.add(record)
    return record


class Workload:
    """``writers`` users sending numbered messages to each other until stopped.

    with Workload(cluster.servers) as load:
        load.wait_progress(20, "writes before the fault")
        ...                                   # kill, freeze, restart
        load.wait_progress(20, "writes after the fault")
    # stopped here; load.ledger holds every send
    """

    def __init__(
        self,
        servers: list[str],
        writers: int = 3,
        *,
        ledger: Ledger | None = None,
        send_timeout: float = SEND_TIMEOUT,
    ) -> None:
        if writers < 1:
            raise ValueError("at least one writer")
        self.servers = list(servers)
        self.writers = writers
        self.ledger = ledger if ledger is not None else Ledger()
        self.send_timeout = send_timeout
        self.users = [f"writer{i}" for i in range(writers)]
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._thread = threading.Thread(target=self._run, name="workload", daemon=True)

    def __enter__(self) -> Workload:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop(raise_errors=exc is None)

    # ---- control -----------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Register and log in the writers, then start sending; returns once they send."""
        self._thread.start()
        wait_for(self._started, timeout, "the workload's users to register and log in")

    def stop(self, raise_errors: bool = True) -> Ledger:
        """Stop sending: in-flight sends may finish for ``STOP_GRACE``, then are cancelled."""
        self._stop.set()
        self._thread.join(STOP_GRACE)
        if self._thread.is_alive() and self._loop is not None:
            for task in self._tasks:
                self._loop.call_soon_threadsafe(task.cancel)
            self._thread.join(10.0)
        if self._thread.is_alive():
            raise RuntimeError("the workload thread did not stop")
        if raise_errors and self._error is not None:
            raise RuntimeError("the workload failed") from self._error
        return self.ledger

    def wait_progress(self, count: int, what: str, timeout: float = 30.0) -> int:
        """Wait until ``count`` more sends are acknowledged than now; return the total."""
        target = self.ledger.acked + count
        return wait_for(
            lambda: self._acked_at_least(target),
            timeout,
            f"{count} more acknowledged sends ({what}); so far {self.ledger.summary()}",
        )

    # ---- internals ---------------------------------------------------------------------

    def _started(self) -> bool:
        self._check_thread()
        return self._ready.is_set()

    def _acked_at_least(self, target: int) -> int:
        self._check_thread()
        acked = self.ledger.acked
        return acked if acked >= target else 0

    def _check_thread(self) -> None:
        if self._error is not None:
            raise StopWaiting(f"the workload failed: {self._error!r}")
        if self._thread.ident is not None and not self._thread.is_alive():
            raise StopWaiting("the workload thread ended")

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self._error = exc

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        clients = [Client(self.servers, timeout=self.send_timeout) for _ in self.users]
        try:
            for client, user in zip(clients, self.users, strict=True):
                await client.register(user, PASSWORD)
                await client.login(user, PASSWORD)
            self._tasks = [
                asyncio.create_task(self._writer(i, client)) for i, client in enumerate(clients)
            ]
            self._ready.set()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            for client in clients:
                with suppress(Exception):
                    await client.close()

    async def _writer(self, index: int, client: Client) -> None:
        sender = self.users[index]
        recipient = self.users[(index + 1) % len(self.users)]
        n = 0
        while not self._stop.is_set():
            n += 1
            await send_recorded(client, sender, recipient, f"w{index}-{n}", self.ledger)


# ---- checks on the stopped nodes ------------------------------------------------------


@dataclass(frozen=True)
class StoredMessage:
    id: int
    sender: str
    recipient: str
    body: str
    deleted: bool


@contextmanager
def stopped_storage(node: NodeProcess) -> Iterator[Storage]:
    """The database of a node the harness has stopped."""
    if node.is_running:
        raise RuntimeError(f"stop node {node.node_id} before reading its database")
    storage = Storage(node.db_path)
    try:
        yield storage
    finally:
        storage.close()


def stored_messages(node: NodeProcess) -> list[StoredMessage]:
    """Every row of a stopped node's ``messages`` table, tombstones included, by id."""
    with stopped_storage(node) as storage:
        rows = storage.db.execute(
            "SELECT m.id, s.name, r.name, m.body, m.deleted_at IS NOT NULL "
            "FROM messages m JOIN users s ON s.id = m.sender_id "
            "JOIN users r ON r.id = m.recipient_id ORDER BY m.id"
        )
    return [StoredMessage(int(i), str(s), str(r), str(b), bool(d)) for i, s, r, b, d in rows]


def check_messages(cluster: Cluster, ledger: Ledger) -> list[StoredMessage]:
    """Check every node's messages against ``ledger``; raise listing every breach.

    Run it after ``cluster.check_invariants()``: the nodes must be stopped.
    Returns the messages (the same on every node, or this raises).
    """
    ran = [node for node in cluster.nodes.values() if node.starts]
    by_node = {node.node_id: stored_messages(node) for node in ran}
    problems: list[str] = []
    first, reference = next(iter(by_node.items()))
    for node_id, messages in by_node.items():
        if messages != reference:
            problems.append(f"node {node_id} holds other messages than node {first}")
        problems += _ledger_problems(node_id, messages, ledger)
    problems += [
        f"send of {r.body!r} failed unexpectedly: {r.error}" for r in ledger.records if r.unexpected
    ]
    if problems:
        raise AssertionError(
            f"message checks failed ({ledger.summary()}):\n  " + "\n  ".join(problems[:50])
        )
    return reference


def _ledger_problems(node_id: int, messages: list[StoredMessage], ledger: Ledger) -> list[str]:
    where = f"node {node_id}"
    live = [m for m in messages if not m.deleted]
    stored = {m.body: m for m in live}
    copies = Counter(m.body for m in live)
    problems = [f"{where}: {body!r} is stored {n} times" for body, n in copies.items() if n > 1]
    sent = {r.body for r in ledger.records}
    for record in ledger.records:
        found = stored.get(record.body)
        if record.outcome is Outcome.ACKED:
            if found is None:
                problems.append(f"{where}: acknowledged {record.body!r} is lost")
            elif (found.id, found.sender, found.recipient) != (
                record.message_id,
                record.sender,
                record.recipient,
            ):
                problems.append(f"{where}: acknowledged {record!r} is stored as {found!r}")
        elif record.outcome is Outcome.FAILED and found is not None:
            problems.append(f"{where}: refused {record.body!r} is stored as {found!r}")
    problems += [
        f"{where}: {m.body!r} was never sent by the workload"
        for m in live
        if _WORKLOAD_BODY.match(m.body) and m.body not in sent
    ]
    return problems


# ---- small shared steps -----------------------------------------------------------------


def start_cluster(cluster: Cluster) -> NodeProcess:
    """Start every node and return the primary once all agree on it."""
    cluster.start()
    return cluster.wait_for_primary()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one client coroutine to completion from a synchronous test."""
    return asyncio.run(coro)


async def new_user(servers: list[str], user: str, password: str = PASSWORD) -> str:
    """Register ``user``, log in, and return the session token."""
    async with Client(servers) as client:
        await client.register(user, password)
        result = await client.login(user, password)
    return str(result["token"])


async def read_inbox(client: Client) -> list[dict[str, Any]]:
    """Every message in the client's user's inbox, oldest first, page by page."""
    messages: list[dict[str, Any]] = []
    after: int | None = None
    while True:
        page = await client.read(limit=1000, after=after, oldest_first=True)
        messages += page["messages"]
        if not page["more"]:
            return messages
        after = messages[-1]["id"]


def first_log_seq(node: NodeProcess) -> int | None:
    """The oldest seq still in a node's log (a running node's database may be read: WAL)."""
    storage = Storage(node.db_path)
    try:
        return storage.first_log_seq()
    finally:
        storage.close()


def view_of(node: NodeProcess) -> NodeView:
    """The node's status now; it must answer."""
    view = node.view()
    if view is None:
        raise AssertionError(f"node {node.node_id} does not answer status")
    return view


def wait_committed(node: NodeProcess, after_seq: int, what: str) -> NodeView:
    """Wait until the node has committed a transaction after ``after_seq``."""
    return wait_view(node, lambda view: view.seq > after_seq, what, timeout=10.0)


def wait_view(
    node: NodeProcess, predicate: Callable[[NodeView], bool], what: str, timeout: float = 20.0
) -> NodeView:
    """Poll ``node``'s status until ``predicate`` holds for it; return that view."""
    last: list[NodeView | None] = [None]

    def check() -> NodeView | None:
        view = node.view()
        last[0] = view
        return view if view is not None and predicate(view) else None

    try:
        return wait_for(check, timeout, f"node {node.node_id}: {what}")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; last status: {last[0]}") from exc


def links_of(node: NodeProcess) -> set[int]:
    """The peers a node has a live link to, by its own status (empty if it does not answer)."""
    status = node.status()
    return set(status["node"].get("links") or ()) if status is not None else set()


def wait_settled(cluster: Cluster, timeout: float = 30.0) -> NodeProcess:
    """Wait until the state to reach before the next fault; return the primary.

    One primary that every live node follows, whose sync set (the latest and
    the one in effect) is every live node, each backup confirmed in it (R5),
    and a link between every two live nodes. Positions may differ: this is
    meant to be reached under load, where ``Cluster.wait_in_sync`` (which
    wants every node at the very same position) rarely catches the nodes
    between two writes.
    """
    wait_whole_sync_set(cluster, timeout)
    wait_linked(cluster, timeout)
    return wait_whole_sync_set(cluster, timeout)


def wait_whole_sync_set(cluster: Cluster, timeout: float = 30.0) -> NodeProcess:
    """``wait_settled`` without the links between backups."""
    return wait_for(lambda: _sync_set_whole(cluster), timeout, "every live node in the sync set")


def _sync_set_whole(cluster: Cluster) -> NodeProcess:
    views: dict[NodeProcess, NodeView] = {}
    for node in cluster.live():
        view = node.view()
        if view is None:
            raise NotYet(f"node {node.node_id} does not answer status")
        views[node] = view
    primaries = [node for node, view in views.items() if view.role == "primary"]
    if len(primaries) != 1:
        raise NotYet(f"{len(primaries)} primaries: {'; '.join(map(str, views.values()))}")
    primary = primaries[0]
    head = views[primary]
    live = {node.node_id for node in views}
    if set(head.sync_set) != live or set(head.in_sync or ()) != live:
        raise NotYet(f"the sync set is not {sorted(live)}: {head} in_sync={head.in_sync}")
    for node, view in views.items():
        follows = view.primary in (primary.node_id, primary.address) and view.epoch == head.epoch
        if node is not primary and not (follows and view.confirmed):
            raise NotYet(f"not a confirmed backup of node {primary.node_id}: {view}")
    return primary


def finish(cluster: Cluster, ledger: Ledger | None = None) -> None:
    """The checks after every scenario: settle, ``check_invariants``, ``check_messages``.

    Settling first matters: ``check_invariants`` stops the nodes one by one,
    and stopping the primary is a failover the cluster must survive too.
    """
    wait_settled(cluster)
    cluster.check_invariants()
    if ledger is not None:
        check_messages(cluster, ledger)


def wait_linked(cluster: Cluster, timeout: float = 20.0) -> None:
    """Wait until every live node has a link to every other live node.

    After a restart the peers redial with a backoff of up to a second, so the
    primary may count a node in sync while the backups are not linked yet.
    A scenario that is about something else waits for this before its next
    fault (see ``test_failover_before_the_backups_link_up`` for why).
    """

    def unlinked() -> bool:
        live = {node.node_id for node in cluster.live()}
        missing = {
            node.node_id: sorted(live - {node.node_id} - links_of(node)) for node in cluster.live()
        }
        if any(missing.values()):
            raise NotLinked(f"missing links: {missing}")
        return True

    wait_for(unlinked, timeout, "a link between every two live nodes")


class NotLinked(Exception):
    """Some live nodes have no link to each other yet."""


def waiting_for(view: NodeView) -> set[int]:
    """The nodes a node says it waits for before it can serve or elect (G5)."""
    listed = view.waiting_for if isinstance(view.waiting_for, list) else []
    return {int(node) for node in listed}


def wait_logged(node: NodeProcess, text: str, timeout: float = 20.0) -> None:
    """Wait until ``text`` appears in the node's log."""
    wait_for(lambda: text in node.log_text(), timeout, f"node {node.node_id} to log {text!r}")


def assert_stays(check: Callable[[], str | None], duration: float, what: str) -> None:
    """Watch ``check`` for ``duration``: it returns None while all is well, else a breach.

    The one wait bounded by time: a state that must *not* arrive (a stale node
    becoming primary) can only be watched for a while. Size ``duration`` as a
    few election rounds, so that a breach would have shown. Polls through
    ``wait_for``, so it keeps that module's interval; an error from ``check``
    is a failure too, not a "not yet".
    """

    def breached() -> bool:
        try:
            breach = check()
        except Exception as exc:
            raise StopWaiting(f"{what}: {type(exc).__name__}: {exc}") from exc
        if breach is not None:
            raise _Breach(breach)
        return False

    try:
        wait_for(breached, duration, what)
    except TimeoutError:
        return  # the window passed without a breach
    except _Breach as breach:
        raise AssertionError(f"{what}: {breach}") from None


class _Breach(StopWaiting):
    """What ``assert_stays`` watched for happened."""
