"""A load generator for the cluster tests, and the checks of what it leaves behind.

Theory of operation
-------------------
``Workload`` registers one user per writer, logs each in with its own
``Client``, and runs one writer task per user in a background thread (its own
event loop), so the test's main thread stays free to kill, freeze and restart
nodes with the synchronous harness. Writer ``i`` sends ``w{i}-1``, ``w{i}-2``,
... to the next writer's user, one at a time, and records every send in a
``History`` (``ops/cluster/history.py``, the type the chaos checker reads too)
with what the client learnt of it:

* ``ok``: a reply with a message id. The write is durable on the sync set
  and must be on every node exactly once, under that id (G1).
* ``failed``: a refusal (``errors.Refused``). The service said no; nothing of
  it may be stored.
* ``unknown``: no answer (``errors.Unavailable``: the client's deadline passed
  across a failover, or the send was cancelled when the workload stopped). It
  may or may not have been applied, but never twice (G3).

Any other error (``internal``, ``protocol``, an exception that is not a
``ChatError``) is a bug; it is recorded as ``unknown`` and ``unexpected``, and
``check_messages`` reports it.

``check_messages`` runs after ``Cluster.check_invariants`` (which converges and
stops the nodes): it opens every node's database and checks the history against
the ``messages`` table of each. Bodies are unique across a test by
construction (the writers number theirs, tests choose their own), so a body
stored twice is a duplicate whatever wrote it.

A few small steps every scenario shares live here too: start a cluster;
settle it before a fault (``Cluster.wait_settled``); ``finish`` a scenario
(settle, ``check_invariants``, ``check_messages``); wait for a node's status or
log to say something; and watch that a state does *not* arrive during a
window (the one wait that has to be bounded by time: proving a stale node
stays out of office).
"""

from __future__ import annotations

import asyncio
import itertools
import re
import threading
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from ops.cluster.history import FAILED, OK, History, Op, record
from ops.cluster.waiting import StopWaiting, wait_for
from service.client import Client
from service.diskfaults import ENV_VAR, Plan, write_control
from service.status import NodeStatus
from service.storage import Storage

from .cluster import Cluster, NodeProcess

T = TypeVar("T")

PASSWORD = "correct-horse-battery"
# The client's overall deadline per send: long enough to ride out an election.
SEND_TIMEOUT = 15.0
# How long ``stop`` lets in-flight sends finish before it cancels them.
STOP_GRACE = 20.0
_WORKLOAD_BODY = re.compile(r"^w(\d+)-(\d+)$")


async def send_recorded(
    client: Client, sender: str, recipient: str, body: str, history: History
) -> Op:
    """``client.send`` recorded in ``history``; returns its op."""
    op, _ = await record(
        history, sender, "send", {"to": recipient, "body": body}, client.send(recipient, body)
    )
    return op


class Sender:
    """One user sending numbered notes to themselves, every outcome in a history."""

    def __init__(self, cluster: Cluster, timeout: float = 3.0) -> None:
        self.cluster = cluster
        self.timeout = timeout
        self.history = History()
        self.token = run(new_user(cluster.servers, "alice"))
        self.numbers = itertools.count()

    def send(self, servers: list[str] | None = None) -> str | None:
        async def one() -> str | None:
            address = servers or self.cluster.servers
            async with Client(address, timeout=self.timeout, token=self.token) as client:
                body = f"note {next(self.numbers)}"
                return (await send_recorded(client, "alice", "alice", body, self.history)).outcome

        return run(one())

    def acked(self, count: int) -> None:
        for _ in range(count):
            assert self.send() == OK, self.history.ops[-1]


class Workload:
    """``writers`` users sending numbered messages to each other until stopped.

    with Workload(cluster.servers) as load:
        load.wait_progress(20, "writes before the fault")
        ...                                   # kill, freeze, restart
        load.wait_progress(20, "writes after the fault")
    # stopped here; load.history holds every send
    """

    def __init__(
        self,
        servers: list[str],
        writers: int = 3,
        *,
        history: History | None = None,
        send_timeout: float = SEND_TIMEOUT,
    ) -> None:
        if writers < 1:
            raise ValueError("at least one writer")
        self.servers = list(servers)
        self.writers = writers
        self.history = history if history is not None else History()
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

    def stop(self, raise_errors: bool = True) -> History:
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
        return self.history

    def wait_progress(self, count: int, what: str, timeout: float = 30.0) -> int:
        """Wait until ``count`` more sends are acknowledged than now; return the total."""
        target = self.history.count("send", OK) + count
        return wait_for(
            lambda: self._acked_at_least(target),
            timeout,
            f"{count} more acknowledged sends ({what}); so far {self.history.summary()}",
        )

    # ---- internals ---------------------------------------------------------------------

    def _started(self) -> bool:
        self._check_thread()
        return self._ready.is_set()

    def _acked_at_least(self, target: int) -> int:
        self._check_thread()
        acked = self.history.count("send", OK)
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
            await send_recorded(client, sender, recipient, f"w{index}-{n}", self.history)


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
    with node.open_storage() as storage:
        yield storage


def stored_messages(node: NodeProcess) -> list[StoredMessage]:
    """Every row of a stopped node's ``messages`` table, tombstones included, by id."""
    with stopped_storage(node) as storage:
        rows = storage.db.execute(
            "SELECT m.id, s.name, r.name, m.body, m.deleted_at IS NOT NULL "
            "FROM messages m JOIN users s ON s.id = m.sender_id "
            "JOIN users r ON r.id = m.recipient_id ORDER BY m.id"
        )
    return [StoredMessage(int(i), str(s), str(r), str(b), bool(d)) for i, s, r, b, d in rows]


def check_messages(cluster: Cluster, history: History) -> list[StoredMessage]:
    """Check every node's messages against the sends of ``history``; raise listing every breach.

    Run it after ``cluster.check_invariants()``: the nodes must be stopped.
    Returns the messages (the same on every node, or this raises).
    """
    ran = [node for node in cluster.nodes.values() if node.starts]
    by_node = {node.node_id: stored_messages(node) for node in ran}
    sends = history.of_kind("send")
    problems: list[str] = []
    first, reference = next(iter(by_node.items()))
    for node_id, messages in by_node.items():
        if messages != reference:
            problems.append(f"node {node_id} holds other messages than node {first}")
        problems += _send_problems(node_id, messages, sends)
    problems += [
        f"send of {op.body!r} failed unexpectedly: {op.error}" for op in sends if op.unexpected
    ]
    if problems:
        raise AssertionError(
            f"message checks failed ({history.summary()}):\n  " + "\n  ".join(problems[:50])
        )
    return reference


def _send_problems(node_id: int, messages: list[StoredMessage], sends: list[Op]) -> list[str]:
    where = f"node {node_id}"
    live = [m for m in messages if not m.deleted]
    stored = {m.body: m for m in live}
    copies = Counter(m.body for m in live)
    problems = [f"{where}: {body!r} is stored {n} times" for body, n in copies.items() if n > 1]
    sent = {op.body for op in sends}
    for op in sends:
        found = stored.get(op.body or "")
        if op.outcome == OK:
            if found is None:
                problems.append(f"{where}: acknowledged {op.body!r} is lost")
            elif (found.id, found.sender, found.recipient) != (
                op.message_id,
                op.process,
                op.recipient,
            ):
                problems.append(f"{where}: acknowledged {op} is stored as {found!r}")
        elif op.outcome == FAILED and found is not None:
            problems.append(f"{where}: refused {op.body!r} is stored as {found!r}")
    problems += [
        f"{where}: {m.body!r} was never sent by the workload"
        for m in live
        if _WORKLOAD_BODY.match(m.body) and m.body not in sent
    ]
    return problems


# ---- small shared steps -----------------------------------------------------------------


def with_faults(cluster: Cluster, node: NodeProcess) -> Path:
    """Run ``node`` on the fault VFS (``service/diskfaults.py``), no fault yet;
    returns its control file, for ``write_control``. Before the node starts."""
    control = cluster.root / f"node{node.node_id}-disk-faults.json"
    write_control(control, Plan("off"))
    node.env[ENV_VAR] = str(control)
    return control


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


def message_bodies(node: NodeProcess) -> set[str]:
    """The bodies of a node's ``messages`` rows (a running node's database may be read)."""
    with node.open_storage() as storage:
        return {str(row[0]) for row in storage.db.execute("SELECT body FROM messages")}


async def send_each(servers: list[str], token: str, to: str, bodies: list[str]) -> None:
    """Send ``bodies`` to ``to`` in order, each acknowledged before the next."""
    async with Client(servers, token=token) as client:
        for body in bodies:
            await client.send(to, body)


async def send_large(servers: list[str], token: str, count: int) -> None:
    """``count`` messages of the largest legal body, a few hundred in flight at a time."""
    body = "x" * 4000
    async with Client(servers, token=token, timeout=30.0) as client:
        for start in range(0, count, 400):
            await asyncio.gather(
                *(client.send("alice", body) for _ in range(start, min(count, start + 400)))
            )


def first_log_seq(node: NodeProcess) -> int | None:
    """The oldest seq still in a node's log (a running node's database may be read: WAL)."""
    with node.open_storage() as storage:
        return storage.first_log_seq()


def view_of(node: NodeProcess) -> NodeStatus:
    """The node's status now; it must answer."""
    view = node.view()
    if view is None:
        raise AssertionError(f"node {node.node_id} does not answer status")
    return view


def wait_committed(node: NodeProcess, after_seq: int, what: str) -> NodeStatus:
    """Wait until the node has committed a transaction after ``after_seq``."""
    return wait_view(node, lambda view: view.seq > after_seq, what, timeout=10.0)


def wait_view(
    node: NodeProcess, predicate: Callable[[NodeStatus], bool], what: str, timeout: float = 20.0
) -> NodeStatus:
    """Poll ``node``'s status until ``predicate`` holds for it; return that view."""
    last: list[NodeStatus | None] = [None]

    def check() -> NodeStatus | None:
        view = node.view()
        last[0] = view
        return view if view is not None and predicate(view) else None

    try:
        return wait_for(check, timeout, f"node {node.node_id}: {what}")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; last status: {last[0]}") from exc


def links_of(node: NodeProcess) -> set[int]:
    """The peers a node has a live link to, by its own status (empty if it does not answer)."""
    view = node.view()
    return set(view.links) if view is not None else set()


def wait_settled(cluster: Cluster, timeout: float = 30.0) -> NodeProcess:
    """``Cluster.wait_settled``: the state to reach before the next fault."""
    return cluster.wait_settled(timeout)


def wait_whole_sync_set(cluster: Cluster, timeout: float = 30.0) -> NodeProcess:
    """``Cluster.wait_whole_sync_set``: ``wait_settled`` without the links between backups."""
    return cluster.wait_whole_sync_set(timeout)


def finish(cluster: Cluster, history: History | None = None) -> None:
    """The checks after every scenario: settle, ``check_invariants``, ``check_messages``.

    Settling first matters: ``check_invariants`` stops the nodes one by one,
    and stopping the primary is a failover the cluster must survive too.
    """
    wait_settled(cluster)
    cluster.check_invariants()
    if history is not None:
        check_messages(cluster, history)


def waiting_for(view: NodeStatus) -> set[int]:
    """The nodes a node says it waits for before it can serve or elect (G5)."""
    return set(view.waiting_for or ())


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
