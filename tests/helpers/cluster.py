"""Real node processes for the cluster tests: start, crash, freeze, and check.

Theory of operation
-------------------
``Cluster`` lays out one folder per test cluster::

    <tmp>/cluster-1/cluster.secret      shared; the first node to start creates it
    <tmp>/cluster-1/node1/node.conf     the INI file the node is started with
    <tmp>/cluster-1/node1/data/chat.db  its database
    <tmp>/cluster-1/node1/node.log      its stdout and stderr, across restarts

and runs each node as ``python -m service --config node.conf`` on a free
loopback port, exactly as supervisord does. Faults are the ones of the fault
model (SPEC section 6): ``kill`` (SIGKILL), ``freeze``/``thaw`` (SIGSTOP and
SIGCONT) and restarts. The harness writes a ``=== harness: ... ===`` line into
a node's log at every such action, so a log tail reads as the scenario.

The harness only observes what an operator can: the ``status`` op (through
``probe.probe_status``, not the client library under test), the logs, and
the database files. Waits, from weakest to strongest:

* ``wait_for_primary``: one primary, named by every live node in one epoch;
* ``wait_converged``: and every live node at the primary's position;
* ``wait_in_sync``: and every live node in the sync set, backups confirmed
  (the precondition of a failover that R5 allows);
* ``wait_identical``: and identical per-table checksums (G4).

Every wait has a deadline and raises ``TimeoutError`` with the last cluster
state it saw; a node process that exits without the harness asking is
reported at once (``NodeExited``). Nothing here returns a success flag: a
broken expectation raises.
"""

from __future__ import annotations

import os
import re
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from service.storage import Storage

from .ports import LOOPBACK, free_ports
from .probe import Status, probe_status
from .scrape import Scrape, scrape
from .waiting import StopWaiting, wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
TEST_SCRYPT_N = 2**10
# Settings the harness owns; a test passes any other NodeConfig field.
_RESERVED = frozenset({"node_id", "data_dir", "nodes", "secret_file"})
_BECAME_PRIMARY = re.compile(r"\bbecame primary\b.*?\bepoch=(\d+)")

Position = tuple[int, int]


class NodeExited(StopWaiting):
    """A node process exited although the harness did not stop it."""


class NotYet(Exception):
    """The awaited cluster state is not there yet; the message says what is."""


@dataclass(frozen=True)
class NodeView:
    """The fields of a node's ``status`` the harness reasons about.

    ``epoch`` is the epoch the node is in; ``position`` is the (epoch, seq) of
    its last committed transaction. Convergence compares positions, not just
    seqs: a node that kept an unreplicated transaction may have the primary's
    seq with a different epoch, and that is a diverged history, not a match.
    """

    node_id: int
    role: str
    epoch: int
    position: Position
    primary: object
    sync_set: tuple[int, ...]
    # The members the primary currently waits for (None on a backup).
    in_sync: tuple[int, ...] | None = None
    # A backup recently named a member by the primary: it may take over (R5).
    confirmed: bool = False
    # Why a node without a primary cannot go on, and for which nodes (G5).
    reason: object = None
    waiting_for: object = None

    @classmethod
    def from_status(cls, status: Status) -> NodeView:
        node: dict[str, Any] = status["node"]
        epoch, seq = node.get("position") or (node["epoch"], node["seq"])
        members = (node.get("sync_set") or {}).get("members", [])
        in_sync = node.get("in_sync")
        return cls(
            node_id=int(node["id"]),
            role=str(node["role"]),
            epoch=int(node["epoch"]),
            position=(int(epoch), int(seq)),
            primary=node.get("primary"),
            sync_set=tuple(int(m) for m in members),
            in_sync=None if in_sync is None else tuple(int(m) for m in in_sync),
            confirmed=bool(node.get("confirmed")),
            reason=node.get("reason"),
            waiting_for=node.get("waiting_for"),
        )

    @property
    def seq(self) -> int:
        return self.position[1]

    def __str__(self) -> str:
        text = (
            f"node {self.node_id}: {self.role} epoch={self.epoch} position={self.position} "
            f"primary={self.primary} sync_set={list(self.sync_set)}"
        )
        if self.reason or self.waiting_for:
            text += f" waiting_for={self.waiting_for} reason={self.reason!r}"
        return text


class NodeProcess:
    """One real node process, its config, data and log."""

    def __init__(
        self,
        node_id: int,
        root: Path,
        port: int,
        nodes: str,
        secret_file: Path,
        settings: dict[str, str],
        metrics_port: int | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.node_id = node_id
        # How the harness reaches a node of a TLS cluster (None: plain TCP).
        self.tls = tls
        self.address = f"{LOOPBACK}:{port}"
        # Where the node serves Prometheus metrics; None: it does not.
        self.metrics_address = None if metrics_port is None else f"{LOOPBACK}:{metrics_port}"
        self.dir = root / f"node{node_id}"
        self.data_dir = self.dir / "data"
        self.config_path = self.dir / "node.conf"
        self.log_path = self.dir / "node.log"
        self.starts = 0
        self.returncode: int | None = None
        # Extra environment of the node's process from its next start on
        # (``CHAT_DISK_FAULTS``: service/diskfaults.py).
        self.env: dict[str, str] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._frozen = False
        self.dir.mkdir(parents=True)
        lines = [
            "[node]",
            f"node_id = {node_id}",
            f"data_dir = {self.data_dir}",
            f"nodes = {nodes}",
            f"secret_file = {secret_file}",
            *(f"{key} = {value}" for key, value in settings.items()),
        ]
        if self.metrics_address is not None:
            lines.append(f"metrics_address = {self.metrics_address}")
        self.config_path.write_text("\n".join(lines) + "\n")

    def __repr__(self) -> str:
        return f"<NodeProcess {self.node_id} {self.address} {self.state}>"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "chat.db"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def started(self) -> bool:
        """Started by the harness and not since killed or stopped by it."""
        return self._process is not None

    @property
    def is_running(self) -> bool:
        """The process exists (a frozen process is running)."""
        return self._process is not None and self._process.poll() is None

    @property
    def is_frozen(self) -> bool:
        return self._frozen

    @property
    def state(self) -> str:
        if self._process is None:
            return "stopped"
        if self._process.poll() is not None:
            return f"exited({self._process.returncode})"
        return "frozen" if self._frozen else "running"

    # ---- lifecycle ---------------------------------------------------------------

    def start(self, wait: bool = True) -> None:
        """Start the process; with ``wait``, return once it answers ``status``."""
        if self._process is not None:
            raise RuntimeError(f"node {self.node_id} is already started ({self.state})")
        self.starts += 1
        self._note(f"start {self.starts}")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        command = [sys.executable, "-m", "service", "--config", str(self.config_path)]
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                env=env,
            )
        self._frozen = False
        self.returncode = None
        if wait:
            self.wait_serving()

    def wait_serving(self, timeout: float = START_TIMEOUT) -> Status:
        """Wait until the node answers ``status``; raises NodeExited if it dies first."""
        return wait_for(self.status, timeout, f"node {self.node_id} to answer at {self.address}")

    def kill(self) -> int:
        """SIGKILL (a crash) and reap; returns the exit status."""
        process = self._require_started()
        if process.poll() is None:
            process.kill()
        returncode = self._reap(process, STOP_TIMEOUT)
        self._note("SIGKILL")  # after the kill: a dead process writes nothing more
        return returncode

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait, as supervisord stops a node; returns the exit status.

        A node that outlives ``timeout`` is killed and reported as a bug.
        """
        process = self._require_started()
        self._note("SIGTERM")
        if process.poll() is None:
            process.terminate()
            if self._frozen:
                process.send_signal(signal.SIGCONT)  # TERM stays pending until it runs
        try:
            return self._reap(process, timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(
                f"node {self.node_id} did not exit within {timeout}s of SIGTERM"
            ) from None

    def freeze(self) -> None:
        """SIGSTOP: the process keeps its sockets but runs no code."""
        self._signal("SIGSTOP", signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        """SIGCONT after ``freeze``; the node sees a gap in its clock."""
        self._signal("SIGCONT", signal.SIGCONT)
        self._frozen = False

    def restart(self, graceful: bool = False, wait: bool = True) -> None:
        """Crash (SIGKILL) or, with ``graceful``, stop the node; then start it again."""
        if self._process is not None and graceful:
            self.stop()
        elif self._process is not None:
            self.kill()
        self.start(wait=wait)

    # ---- observation -------------------------------------------------------------

    def check_alive(self) -> None:
        """Raise NodeExited if the process died without the harness stopping it."""
        if self._process is not None and self._process.poll() is not None:
            raise NodeExited(
                f"node {self.node_id} exited with status {self._process.returncode}; "
                f"log tail:\n{self.log_tail()}"
            )

    def status(self, timeout: float = 1.0) -> Status | None:
        """The ``status`` result, or None while the node is stopped, frozen or silent."""
        self.check_alive()
        if self._process is None or self._frozen:
            return None
        return probe_status(self.address, timeout, self.tls)

    def view(self) -> NodeView | None:
        status = self.status()
        return NodeView.from_status(status) if status is not None else None

    def metrics(self) -> Scrape | None:
        """A scrape of the node's metrics, or None while nothing answers there."""
        self.check_alive()
        if self.metrics_address is None:
            raise RuntimeError(f"node {self.node_id} serves no metrics (Cluster(metrics=True))")
        if self._process is None or self._frozen:
            return None
        return scrape(self.metrics_address)

    def log_text(self) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # ---- internals ---------------------------------------------------------------

    def _require_started(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise RuntimeError(f"node {self.node_id} is not started")
        return self._process

    def _signal(self, name: str, signum: signal.Signals) -> None:
        process = self._require_started()
        self.check_alive()
        self._note(name)
        process.send_signal(signum)

    def _reap(self, process: subprocess.Popen[bytes], timeout: float) -> int:
        self.returncode = process.wait(timeout)
        self._process = None
        self._frozen = False
        return self.returncode

    def _note(self, action: str) -> None:
        """Mark a harness action in the node's log, so the log reads as the scenario."""
        with self.log_path.open("a", encoding="utf-8") as log:
            log.write(f"=== harness: {action} node {self.node_id} ===\n")


class Cluster:
    """``n`` node processes that know each other, sharing one secret file.

    ``settings`` are extra NodeConfig fields written into every node's config
    (``heartbeat_interval=0.05``, ``log_retention=50``, ...). With ``metrics``
    each node also serves Prometheus metrics, on a free port of its own
    (``NodeProcess.metrics``); by default none does. ``node_settings`` adds or
    overrides settings of single nodes (``{3: {"tls_cert": ...}}``); ``tls`` is
    the context the harness verifies the nodes of a TLS cluster with.
    """

    def __init__(
        self,
        tmp_path: Path,
        n: int = 3,
        *,
        metrics: bool = False,
        tls: ssl.SSLContext | None = None,
        node_settings: dict[int, dict[str, object]] | None = None,
        **settings: object,
    ) -> None:
        named = set(settings).union(*(own.keys() for own in (node_settings or {}).values()))
        reserved = _RESERVED & named
        if reserved:
            raise ValueError(f"the harness sets {sorted(reserved)} itself")
        # Password hashing at the production cost (~0.5 s each) would make every
        # register and login of the suite slow; a test of the cost sets it itself.
        settings = {"scrypt_n": TEST_SCRYPT_N, **settings}
        self.root = _fresh_dir(tmp_path, "cluster")
        self.secret_file = self.root / "cluster.secret"
        # One call, so that the metrics ports differ from the nodes' and each other's.
        all_ports = free_ports(2 * n if metrics else n)
        ports, metrics_ports = all_ports[:n], all_ports[n:]
        spec = ",".join(f"{i}={LOOPBACK}:{port}" for i, port in enumerate(ports, 1))
        own = node_settings or {}
        self.nodes: dict[int, NodeProcess] = {
            i: NodeProcess(
                i,
                self.root,
                port,
                spec,
                self.secret_file,
                {key: str(value) for key, value in {**settings, **own.get(i, {})}.items()},
                metrics_ports[i - 1] if metrics else None,
                tls,
            )
            for i, port in enumerate(ports, 1)
        }

    def __getitem__(self, node_id: int) -> NodeProcess:
        return self.nodes[node_id]

    @property
    def servers(self) -> list[str]:
        """Every node's address, for a client."""
        return [node.address for node in self.nodes.values()]

    def live(self) -> list[NodeProcess]:
        """Started, unfrozen nodes: the ones expected to answer."""
        return [node for node in self.nodes.values() if node.started and not node.is_frozen]

    # ---- lifecycle ---------------------------------------------------------------

    def start(self, ids: Iterable[int] | None = None, wait: bool = True) -> None:
        """Start the given nodes (default: all not started) together, then wait for each.

        They start before any wait because a full restart (R6) may need its peers.
        """
        chosen = (
            [self.nodes[i] for i in ids]
            if ids is not None
            else [node for node in self.nodes.values() if not node.started]
        )
        for node in chosen:
            node.start(wait=False)
        if wait:
            for node in chosen:
                node.wait_serving()

    def stop_all(self, timeout: float = STOP_TIMEOUT) -> dict[int, int]:
        """SIGTERM every started node; return their exit statuses by node id.

        Raises if one would not stop in time (it is killed).
        """
        statuses: dict[int, int] = {}
        errors: list[str] = []
        for node in self.nodes.values():
            if node.started:
                try:
                    statuses[node.node_id] = node.stop(timeout)
                except RuntimeError as error:
                    errors.append(str(error))
        if errors:
            raise RuntimeError("; ".join(errors))
        return statuses

    def kill_all(self) -> None:
        """SIGKILL every started node. Never raises: it is the teardown of last resort."""
        for node in self.nodes.values():
            if node.started:
                with suppress(OSError, subprocess.SubprocessError):
                    node.kill()

    # ---- waiting -----------------------------------------------------------------

    def wait_for_primary(self, timeout: float = 20.0) -> NodeProcess:
        """Wait until exactly one node is primary and every live node agrees on it and its epoch."""
        return wait_for(self._agreed_primary, timeout, "one primary that every live node names")

    def wait_converged(self, timeout: float = 30.0) -> Position:
        """Wait until every live node has the primary's epoch and position; return it."""
        return wait_for(self._converged, timeout, "every live node at the primary's position")

    def wait_in_sync(self, timeout: float = 30.0) -> NodeProcess:
        """Wait until every live node is at the primary's position, in its sync set and,
        for a backup, confirmed in it; return the primary.

        A scenario that crashes the primary waits for this first: a backup not
        yet confirmed may not take over alone (R5), so killing the primary
        earlier tests the full-restart rule (R6) instead.
        """
        return wait_for(self._in_sync, timeout, "every live node confirmed in the sync set")

    def _views(self) -> dict[NodeProcess, NodeView]:
        """One status of every live node; raises NotYet while one does not answer."""
        live = self.live()
        if not live:
            raise StopWaiting("no node is started and unfrozen")
        views: dict[NodeProcess, NodeView] = {}
        for node in live:
            view = node.view()
            if view is None:
                raise NotYet(f"node {node.node_id} does not answer status")
            views[node] = view
        return views

    def _agreed_primary(self) -> NodeProcess:
        return _primary_of(self._views())

    def _converged(self) -> Position:
        views = self._views()
        return _common_position(views, _primary_of(views))

    def _in_sync(self) -> NodeProcess:
        views = self._views()
        primary = _primary_of(views)
        _common_position(views, primary)
        members = set(views[primary].sync_set) & set(views[primary].in_sync or ())
        lagging = [
            str(view)
            for node, view in views.items()
            if view.node_id not in members or (node is not primary and not view.confirmed)
        ]
        if lagging:
            raise NotYet(f"primary {views[primary]}; not in sync or not confirmed: {lagging}")
        return primary

    # ---- checks ------------------------------------------------------------------

    def checksums(self, node: NodeProcess) -> dict[str, str]:
        """Per-table sha256 of a node's replicated tables.

        Safe on a running node (WAL: a reader never blocks the node's writer),
        but only meaningful when the cluster is idle; ``wait_identical`` is the
        comparison that accounts for that.
        """
        with _open_storage(node) as storage:
            return storage.checksums()

    def wait_identical(self, timeout: float = 30.0) -> Position:
        """Wait until every live node is at the primary's position with identical tables (G4)."""
        return wait_for(self._identical, timeout, "identical tables on every live node")

    def check_invariants(self, timeout: float = 30.0) -> None:
        """The checks run after every scenario (SPEC section 8); raises listing every breach.

        Every node that ever ran must be back (running, not frozen): G4 is
        about all nodes once the faults stop. The per-table checksums are
        compared on the running, converged cluster, not after stopping it,
        because stopping nodes one by one is itself a fault the cluster
        reacts to (the primary shrinks the sync set when a backup leaves; a
        backup takes over when the primary leaves), so the stopped copies
        legitimately differ in the sync set. Then every node is stopped with
        SIGTERM and must exit 0, its database must pass ``PRAGMA
        integrity_check``, its log must hold no traceback, and, across the
        logs, each epoch has at most one node that became primary in it, and
        each node's epochs strictly increase.
        """
        ran = [node for node in self.nodes.values() if node.starts]
        away = [node.node_id for node in ran if node not in self.live()]
        if away:
            raise RuntimeError(
                f"nodes {away} are stopped or frozen: restart or thaw every node that "
                "ran before checking the invariants"
            )
        if ran:
            self.wait_identical(timeout)
        statuses = self.stop_all()
        problems = [
            f"node {node_id} exited with status {status} on SIGTERM"
            for node_id, status in statuses.items()
            if status != 0
        ]
        problems += _integrity_problems(ran) + _log_problems(ran)
        if problems:
            raise AssertionError("cluster invariants broken:\n  " + "\n  ".join(problems))

    def _identical(self) -> Position:
        position = self._converged()
        sums = {node.node_id: self.checksums(node) for node in self.live()}
        if self._converged() != position:
            raise NotYet(f"the position moved from {position} while reading the tables")
        (first, expected), *others = sums.items()
        for node_id, actual in others:
            tables = expected.keys() | actual.keys()
            differ = sorted(t for t in tables if expected.get(t) != actual.get(t))
            if differ:
                raise NotYet(f"at {position} node {node_id} differs from node {first} in {differ}")
        return position


def _primary_of(views: dict[NodeProcess, NodeView]) -> NodeProcess:
    """The one primary that every view names, in the same epoch; else NotYet."""
    summary = "; ".join(str(view) for view in views.values())
    primaries = [node for node, view in views.items() if view.role == "primary"]
    if len(primaries) != 1:
        raise NotYet(f"{len(primaries)} primaries: {summary}")
    primary = primaries[0]
    names = (primary.node_id, primary.address)
    for view in views.values():
        if view.primary not in names or view.epoch != views[primary].epoch:
            raise NotYet(f"no agreement on node {primary.node_id}: {summary}")
    return primary


def _common_position(views: dict[NodeProcess, NodeView], primary: NodeProcess) -> Position:
    """The primary's position if every view has it (in the same epoch); else NotYet."""
    target = views[primary]
    behind = [
        str(view)
        for view in views.values()
        if (view.epoch, view.position) != (target.epoch, target.position)
    ]
    if behind:
        raise NotYet(f"not at {target.position}: {'; '.join(behind)}")
    return target.position


@contextmanager
def _open_storage(node: NodeProcess) -> Iterator[Storage]:
    """A node's ``Storage``; refuses to create a database that is not there."""
    if not node.db_path.exists():
        raise FileNotFoundError(f"node {node.node_id} has no database at {node.db_path}")
    storage = Storage(node.db_path)
    try:
        yield storage
    finally:
        storage.close()


def _integrity_problems(nodes: list[NodeProcess]) -> list[str]:
    problems: list[str] = []
    for node in nodes:
        with _open_storage(node) as storage:
            integrity = storage.integrity_check()
        if integrity != "ok":
            problems.append(f"node {node.node_id}: integrity_check says {integrity!r}")
    return problems


def _log_problems(nodes: list[NodeProcess]) -> list[str]:
    problems: list[str] = []
    primaries: dict[int, set[int]] = {}
    for node in nodes:
        text = node.log_text()
        if "Traceback" in text:
            problems.append(f"node {node.node_id}: a traceback in {node.log_path}")
        epochs = [int(match) for match in _BECAME_PRIMARY.findall(text)]
        if any(later <= earlier for earlier, later in pairwise(epochs)):
            problems.append(f"node {node.node_id}: became primary in epochs {epochs}")
        for epoch in epochs:
            primaries.setdefault(epoch, set()).add(node.node_id)
    for epoch, holders in sorted(primaries.items()):
        if len(holders) > 1:
            problems.append(f"epoch {epoch}: nodes {sorted(holders)} all became primary")
    return problems


def _fresh_dir(parent: Path, stem: str) -> Path:
    """``parent/stem-1``, ``-2``, ...: several clusters may share one test's tmp_path."""
    for k in range(1, 1000):
        path = parent / f"{stem}-{k}"
        try:
            path.mkdir(parents=True)
        except FileExistsError:
            continue
        return path
    raise RuntimeError(f"no free {stem} folder under {parent}")
