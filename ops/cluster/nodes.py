"""Real node processes on this machine: start, crash, freeze, observe, check.

Theory of operation
-------------------
``Cluster`` lays out one folder per cluster::

    <root>/cluster.secret      shared; the first node to start creates it
    <root>/node1/node.conf     the INI file the node is started with
    <root>/node1/data/chat.db  its database (and rollback/ after a rewind)
    <root>/node1/node.log      its stdout and stderr, across restarts

and runs each node as ``python -m service --config node.conf``, exactly as
supervisord does, on a free port of its own address. By default every node
listens on 127.0.0.1; ``hosts`` gives each node its own address (127.0.0.11,
.12, .13: one loopback address per node, so that traffic between two nodes
can be told apart, and cut, by address). Faults are the ones of the fault
model (SPEC section 6): ``kill`` (SIGKILL), ``freeze``/``thaw`` (SIGSTOP and
SIGCONT), a clean ``stop`` (SIGTERM) and restarts. The harness writes a
``=== <tag>: <time> <action> node N ===`` line into a node's log at every
such action, so a log tail reads as the scenario.

The harness only observes what an operator can: the ``status`` op (through
``probe``, not the client library), the logs, and the database files. The
waits, from weakest to strongest (their rules: ``agreement.py``):

* ``wait_for_primary``: one primary, named by every live node in its epoch;
* ``wait_converged``: and every live node at the primary's position;
* ``wait_in_sync``: and every live node in the sync set, backups confirmed
  (the precondition of a failover that R5 allows);
* ``wait_identical``: and identical per-table checksums (G4);
* ``wait_settled``: the sync set is every live node, backups confirmed, and
  every two live nodes linked; positions may differ (reachable under load).

Every wait has a deadline and raises ``TimeoutError`` with the last cluster
state it saw; a node process that exits without the harness asking is
reported at once (``NodeExited``). Nothing here returns a success flag: a
broken expectation raises. The tests, the benchmark (``ops/bench``) and the
chaos tool (``ops/chaos``) all run their nodes through this module.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import ssl
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Any

from service.status import NodeStatus
from service.storage import Storage

from . import agreement, logs
from .ports import LOOPBACK, free_ports
from .probe import Status, probe_all, probe_status
from .scrape import Scrape, scrape
from .waiting import NotYet, StopWaiting, wait_for

# The folder that holds the ``service`` package: node processes run from there.
PACKAGE_HOME = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
# From a node's start to its SIGTERM handler: the interpreter's start and a few
# imports, tens of ms; seconds on a machine busy with other work.
HANDLER_TIMEOUT = 10.0
# Settings the harness owns; a caller passes any other NodeConfig field.
_RESERVED = frozenset({"node_id", "data_dir", "nodes", "secret_file", "metrics_address"})

Position = tuple[int, int]


class NodeExited(StopWaiting):
    """A node process exited although the harness did not stop it."""


class NodeProcess:
    """One real node process, its config, data and log."""

    def __init__(
        self,
        node_id: int,
        folder: Path,
        address: str,
        tag: str = "harness",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.node_id = node_id
        self.address = address
        # How the harness reaches a node of a TLS cluster (None: plain TCP).
        self.tls = tls
        # Where the node serves Prometheus metrics; None: it does not.
        self.metrics_address: str | None = None
        self.tag = tag
        self.dir = folder
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

    def configure(
        self, nodes: str, secret_file: Path, settings: Mapping[str, str], metrics: str | None
    ) -> None:
        """Write the node's INI file: the cluster (``nodes``), the secret, other settings."""
        self.metrics_address = metrics
        lines = [
            "[node]",
            f"node_id = {self.node_id}",
            f"data_dir = {self.data_dir}",
            f"nodes = {nodes}",
            f"secret_file = {secret_file}",
            *(f"{key} = {value}" for key, value in settings.items()),
        ]
        if metrics is not None:
            lines.append(f"metrics_address = {metrics}")
        self.config_path.write_text("\n".join(lines) + "\n")

    def __repr__(self) -> str:
        return f"<NodeProcess {self.node_id} {self.address} {self.state}>"

    @property
    def host(self) -> str:
        return self.address.rpartition(":")[0]

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
        self.note(f"start {self.starts}")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        command = [sys.executable, "-m", "service", "--config", str(self.config_path)]
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=PACKAGE_HOME,
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
        returncode = self.reap(STOP_TIMEOUT)
        self.note("SIGKILL")  # after the kill: a dead process writes nothing more
        return returncode

    def terminate(self) -> None:
        """SIGTERM, as supervisord stops a node, without waiting (``reap`` waits).

        Not before the process handles SIGTERM: in its first few tens of ms the
        interpreter starts and runs none of the node's code, so nothing can catch
        the signal, whose default action ends it with -15 as a crash would (which a
        node survives: it is one). A stop of a node that has run any code must exit
        0, and the checks hold it to that; so a stop that follows a start at once
        (a fault schedule's) waits for the handler, up to ``HANDLER_TIMEOUT``."""
        process = self._require_started()
        if self._frozen and process.poll() is None and not catches(process.pid, signal.SIGTERM):
            self.thaw()  # frozen before its handler: let it get there first

        def handled() -> bool:
            return process.poll() is not None or catches(process.pid, signal.SIGTERM)

        if not self._frozen:
            try:
                wait_for(handled, HANDLER_TIMEOUT, "the handler", interval=0.002)
            except TimeoutError:
                # Stopped all the same: a node that never handles SIGTERM exits -15,
                # and the caller's checks say so.
                self.note(f"no SIGTERM handler after {HANDLER_TIMEOUT}s")
        self.note("SIGTERM")
        if process.poll() is None:
            process.terminate()
            if self._frozen:
                process.send_signal(signal.SIGCONT)  # TERM stays pending until it runs

    def reap(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for the process to end and forget it; returns its exit status."""
        self.returncode = self._require_started().wait(timeout)
        self._process = None
        self._frozen = False
        return self.returncode

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait; returns the exit status.

        A node that outlives ``timeout`` is killed and reported as a bug.
        """
        self.terminate()
        try:
            return self.reap(timeout)
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

    def exited(self) -> int | None:
        """The exit status if the process ended without the harness asking (it is then
        forgotten, as if stopped); None while it runs or when it was not started."""
        if self._process is None or self._process.poll() is None:
            return None
        return self.reap()

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

    def view(self) -> NodeStatus | None:
        """The typed ``status``, or None while the node is stopped, frozen or silent."""
        status = self.status()
        return NodeStatus.from_reply(status) if status is not None else None

    def metrics(self) -> Scrape | None:
        """A scrape of the node's metrics, or None while nothing answers there."""
        self.check_alive()
        if self.metrics_address is None:
            raise RuntimeError(f"node {self.node_id} serves no metrics (Cluster(metrics=True))")
        if self._process is None or self._frozen:
            return None
        return scrape(self.metrics_address)

    def log_size(self) -> int:
        """The log's size in bytes: a mark for ``log_text`` and ``events``."""
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_text(self, since: int = 0) -> str:
        """The log from byte ``since`` on (all of it when the log is shorter: rotated)."""
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as log:
            size = log.seek(0, os.SEEK_END)
            log.seek(since if since <= size else 0)
            return log.read().decode("utf-8", errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def events(self, name: str, since: int = 0) -> list[logs.Event]:
        """The log's ``name`` events written after byte ``since``."""
        return logs.events(self.log_text(since), name)

    def query(self, sql: str) -> Any:
        """One value from the node's database, read-only (WAL: the node's writer is not
        blocked); None when there is no row."""
        uri = self.db_path.resolve().as_uri() + "?mode=ro"
        with closing(sqlite3.connect(uri, uri=True, timeout=1.0)) as conn:
            row = conn.execute(sql).fetchone()
        return None if row is None else row[0]

    @contextmanager
    def open_storage(self) -> Iterator[Storage]:
        """The node's ``Storage`` (safe beside a running node: WAL); refuses to create a
        database that is not there."""
        if not self.db_path.exists():
            raise FileNotFoundError(f"node {self.node_id} has no database at {self.db_path}")
        storage = Storage(self.db_path)
        try:
            yield storage
        finally:
            storage.close()

    def disk_bytes(self) -> int:
        """The database with its WAL: what this node keeps on disk."""
        paths = [self.db_path, self.db_path.with_name("chat.db-wal")]
        return sum(p.stat().st_size for p in paths if p.exists())

    def note(self, action: str) -> None:
        """Mark a harness action in the node's log, stamped like the node's own lines."""
        stamp = datetime.now().strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
        with self.log_path.open("a", encoding="utf-8") as log:
            log.write(f"=== {self.tag}: {stamp} {action} node {self.node_id} ===\n")

    # ---- internals ---------------------------------------------------------------

    def _require_started(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise RuntimeError(f"node {self.node_id} is not started")
        return self._process

    def _signal(self, name: str, signum: signal.Signals) -> None:
        process = self._require_started()
        self.check_alive()
        self.note(name)
        process.send_signal(signum)


class Cluster:
    """``n`` node processes that know each other, sharing one secret file, in ``root``.

    ``settings`` are extra NodeConfig fields written into every node's config
    (``heartbeat_interval=0.05``, ``log_retention=50``, ...). ``hosts`` are the
    nodes' own addresses, one per node (default: all 127.0.0.1). With
    ``metrics`` each node also serves Prometheus metrics, on a free port of its
    own address (``NodeProcess.metrics``). ``tag`` marks the harness's lines in
    the node logs. ``node_settings`` adds or overrides settings of single nodes
    (``{3: {"tls_cert": ...}}``); ``tls`` is the context the harness verifies the
    nodes of a TLS cluster with.
    """

    def __init__(
        self,
        root: Path,
        n: int = 3,
        *,
        hosts: Sequence[str] | None = None,
        metrics: bool = False,
        settings: Mapping[str, object] | None = None,
        tag: str = "harness",
        tls: ssl.SSLContext | None = None,
        node_settings: Mapping[int, Mapping[str, object]] | None = None,
    ) -> None:
        settings = dict(settings or {})
        own = dict(node_settings or {})
        reserved = _RESERVED & set(settings).union(*(single.keys() for single in own.values()))
        if reserved:
            raise ValueError(f"the harness sets {sorted(reserved)} itself")
        hosts = list(hosts) if hosts is not None else [LOOPBACK] * n
        if len(hosts) != n:
            raise ValueError(f"{len(hosts)} hosts for {n} nodes: give one address per node")
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.secret_file = root / "cluster.secret"
        addresses, metrics_addresses = _addresses(hosts, metrics)
        spec = ",".join(f"{i}={address}" for i, address in enumerate(addresses, 1))
        self.tls = tls
        self.nodes: dict[int, NodeProcess] = {}
        for i, address in enumerate(addresses, 1):
            node = NodeProcess(i, root / f"node{i}", address, tag, tls)
            text = {key: str(value) for key, value in {**settings, **own.get(i, {})}.items()}
            node.configure(spec, self.secret_file, text, metrics_addresses.get(i))
            self.nodes[i] = node

    def __getitem__(self, node_id: int) -> NodeProcess:
        return self.nodes[node_id]

    @property
    def servers(self) -> list[str]:
        """Every node's address, for a client."""
        return [node.address for node in self.nodes.values()]

    def pids(self) -> dict[str, int]:
        """``nodeN`` -> pid of every node process that runs."""
        return {f"node{i}": n.pid for i, n in self.nodes.items() if n.pid is not None}

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

    def stop_all(self, timeout: float = STOP_TIMEOUT, together: bool = False) -> dict[int, int]:
        """SIGTERM every started node; return their exit statuses by node id.

        One by one, each waited for, unless ``together`` (every SIGTERM first, as
        supervisord stops a group). Raises if one would not stop in time (it is killed).
        """
        started = [node for node in self.nodes.values() if node.started]
        if together:
            for node in started:
                node.terminate()
        statuses: dict[int, int] = {}
        errors: list[str] = []
        for node in started:
            try:
                if together:
                    statuses[node.node_id] = node.reap(timeout)
                else:
                    statuses[node.node_id] = node.stop(timeout)
            except subprocess.TimeoutExpired:
                node.kill()
                errors.append(f"node {node.node_id} did not exit within {timeout}s of SIGTERM")
            except RuntimeError as error:
                errors.append(str(error))
        if errors:
            raise RuntimeError("; ".join(errors))
        return statuses

    def kill_all(self) -> None:
        """SIGKILL every started node. Never raises: it is the teardown of last resort."""
        for node in self.nodes.values():
            if node.started:
                with suppress(OSError, subprocess.SubprocessError, RuntimeError):
                    node.kill()

    # ---- waiting -----------------------------------------------------------------

    def views(self) -> dict[int, NodeStatus]:
        """One status of every live node, asked together; NotYet while one does not answer."""
        live = self.live()
        if not live:
            raise StopWaiting("no node is started and unfrozen")
        for node in live:
            node.check_alive()
        answers = probe_all({node.node_id: node.address for node in live}, tls=self.tls)
        silent = sorted(node_id for node_id, view in answers.items() if view is None)
        if silent:
            raise NotYet(f"nodes {silent} do not answer status")
        return {node_id: view for node_id, view in answers.items() if view is not None}

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

    def wait_whole_sync_set(self, timeout: float = 30.0) -> NodeProcess:
        """Wait until the agreed primary's sync set (the latest and the one in effect) is
        every live node, each backup confirmed in it (R5); return the primary."""
        return wait_for(self._whole_sync_set, timeout, "every live node in the sync set")

    def wait_linked(self, timeout: float = 20.0) -> None:
        """Wait until every live node has a link to every other live node.

        After a restart the peers redial with a backoff of up to a second, so the
        primary may count a node in sync while the backups are not linked yet.
        """
        wait_for(self._linked, timeout, "a link between every two live nodes")

    def wait_settled(self, timeout: float = 30.0) -> NodeProcess:
        """Wait until the state to reach before the next fault; return the primary.

        One primary that every live node follows, whose sync set (the latest and
        the one in effect) is every live node, each backup confirmed in it (R5),
        and a link between every two live nodes. Positions may differ: this is
        meant to be reached under load, where ``wait_in_sync`` (which wants
        every node at the very same position) rarely catches the nodes between
        two writes.
        """
        self.wait_whole_sync_set(timeout)
        self.wait_linked(timeout)
        return self.wait_whole_sync_set(timeout)

    def _agreed_primary(self) -> NodeProcess:
        return self.nodes[agreement.agreed_primary(self.views())]

    def _converged(self) -> Position:
        views = self.views()
        return agreement.common_position(views, agreement.agreed_primary(views))

    def _in_sync(self) -> NodeProcess:
        views = self.views()
        primary = agreement.agreed_primary(views)
        agreement.common_position(views, primary)
        agreement.in_sync(views, primary)
        return self.nodes[primary]

    def _whole_sync_set(self) -> NodeProcess:
        views = self.views()
        primary = agreement.agreed_primary(views)
        agreement.whole_sync_set(views, primary, views.keys())
        agreement.confirmed_backups(views, primary)
        return self.nodes[primary]

    def _linked(self) -> bool:
        views = self.views()
        missing = {i: sorted(views.keys() - {i} - set(v.links)) for i, v in views.items()}
        if any(missing.values()):
            raise NotYet(f"missing links: {missing}")
        return True

    # ---- checks ------------------------------------------------------------------

    def checksums(self, node: NodeProcess) -> dict[str, str]:
        """Per-table sha256 of a node's replicated tables.

        Safe on a running node (WAL: a reader never blocks the node's writer),
        but only meaningful when the cluster is idle; ``wait_identical`` is the
        comparison that accounts for that.
        """
        with node.open_storage() as storage:
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
        differ = agreement.differing_tables(sums)
        if differ:
            first = next(iter(sums))
            raise NotYet(f"at {position} tables differ from node {first}'s: {differ}")
        return position


def _addresses(hosts: Sequence[str], metrics: bool) -> tuple[list[str], dict[int, str]]:
    """A free port for each node on its host (and one more for its metrics): the ports of
    one host are picked in one call, so that they differ from each other."""
    per_host = 2 if metrics else 1
    picked: dict[str, list[int]] = {
        host: free_ports(per_host * hosts.count(host), host) for host in set(hosts)
    }
    addresses = [f"{host}:{picked[host].pop()}" for host in hosts]
    metrics_addresses = {
        i: f"{host}:{picked[host].pop()}" for i, host in enumerate(hosts, 1) if metrics
    }
    return addresses, metrics_addresses


def _integrity_problems(nodes: list[NodeProcess]) -> list[str]:
    problems: list[str] = []
    for node in nodes:
        with node.open_storage() as storage:
            integrity = storage.integrity_check()
        if integrity != "ok":
            problems.append(f"node {node.node_id}: integrity_check says {integrity!r}")
    return problems


def _log_problems(nodes: list[NodeProcess]) -> list[str]:
    texts = {node.node_id: node.log_text() for node in nodes}
    problems = [
        f"node {node.node_id}: a traceback in {node.log_path}"
        for node in nodes
        if "Traceback" in texts[node.node_id]
    ]
    _, breaches = logs.primary_epochs(texts)
    return problems + breaches


def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler of its own for ``signum`` (its
    ``SigCgt`` mask in ``/proc``); True once it is gone, as nothing is left to catch."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return True
