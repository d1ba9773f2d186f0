"""The cluster under test: node processes the benchmark starts, kills and restarts.

Failover and catch-up are measured around a SIGKILL, so the benchmark must own
the node processes: it runs each one as ``python -m service`` (the same
command supervisord runs) with flags instead of a config file, on a loopback
port the kernel just handed out, with its data and log in a folder of its own:

    <root>/cluster.secret          shared; the first node to start creates it
    <root>/node1/data/chat.db      node 1's database
    <root>/node1/node.log          its stdout and stderr, across restarts

This module is deliberately independent of ``tests/``: an operator runs the
benchmark from an installed tree, and the test harness is free to change.

Observation is what an operator has: the ``status`` op, the node logs (one
``event key=value`` line per state change, with a millisecond timestamp), the
database files (read-only) and ``/proc``. Every wait polls observable state until a
deadline and raises ``TimeoutError`` with the last state it saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from service.client import status_all

from . import machine

LOOPBACK = "127.0.0.1"
STOP_TIMEOUT = 30.0
POLL = 0.05
T = TypeVar("T")
Statuses = dict[int, dict[str, Any] | None]

_FIELD = re.compile(r'(\w[\w-]*)=("[^"]*"|\S+)')


def free_ports(count: int) -> list[int]:
    """Ports that were free a moment ago; all held open together, so distinct."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass(frozen=True)
class Event:
    """One ``event key=value ...`` line of a node log."""

    at: float  # wall-clock time (time.time() scale) of the line
    name: str
    fields: dict[str, str]


def parse_event(line: str) -> Event | None:
    """``2025-01-02T03:04:05.678 INFO catch-up end node=2 backup=1 seq=9`` -> Event."""
    parts = line.split(" ", 2)
    if len(parts) < 3 or len(parts[0]) != 23:
        return None
    try:
        at = datetime.strptime(parts[0], "%Y-%m-%dT%H:%M:%S.%f").timestamp()
    except ValueError:
        return None
    message = parts[2]
    first = _FIELD.search(message)
    name = message[: first.start()].strip() if first else message.strip()
    fields = {key: value.strip('"') for key, value in _FIELD.findall(message)}
    return Event(at, name, fields)


class Node:
    """One node process: start, SIGKILL, SIGTERM, and what /proc and its log say."""

    def __init__(
        self, node_id: int, root: Path, port: int, spec: str, settings: dict[str, str]
    ) -> None:
        self.node_id = node_id
        self.address = f"{LOOPBACK}:{port}"
        self.dir = root / f"node{node_id}"
        self.data_dir = self.dir / "data"
        self.log_path = self.dir / "node.log"
        self.secret_file = root / "cluster.secret"
        self.spec = spec
        self.settings = dict(settings)
        self.process: subprocess.Popen[bytes] | None = None
        self.frozen = False  # SIGSTOP'ed: alive, but answers nothing
        self.dir.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"<node {self.node_id} {self.address} pid={self.pid}>"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def db_path(self) -> Path:
        return self.data_dir / "chat.db"

    def start(self, extra: dict[str, str] | None = None) -> None:
        """Start the process (it answers ``status`` a few hundred ms later)."""
        if self.running:
            raise RuntimeError(f"node {self.node_id} is already running")
        self.note("start")
        command = [
            sys.executable,
            "-m",
            "service",
            "--node-id",
            str(self.node_id),
            "--data-dir",
            str(self.data_dir),
            "--nodes",
            self.spec,
            "--secret-file",
            str(self.secret_file),
        ]
        for key, value in {**self.settings, **(extra or {})}.items():
            command += ["--set", f"{key}={value}"]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def kill(self) -> None:
        """SIGKILL (a crash) without waiting; ``reap`` collects the exit status."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)

    def freeze(self) -> None:
        """SIGSTOP (a long pause): the kernel still accepts connections for it."""
        self._process().send_signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        self._process().send_signal(signal.SIGCONT)
        self.frozen = False

    def reap(self, timeout: float = STOP_TIMEOUT) -> int:
        process = self._process()
        code = process.wait(timeout)
        self.process = None
        self.note(f"exited {code}")
        return code

    def terminate(self) -> None:
        """SIGTERM (a clean stop, as supervisord does it) without waiting."""
        self.note("SIGTERM")
        self._process().terminate()

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait; SIGKILL after ``timeout``."""
        self.terminate()
        try:
            return self.reap(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.reap()
            raise RuntimeError(f"node {self.node_id} ignored SIGTERM for {timeout} s") from None

    def rss_kb(self) -> int | None:
        return machine.rss_kb(self.pid) if self.pid is not None else None

    def peak_rss_kb(self) -> int | None:
        return machine.rss_kb(self.pid, "VmHWM") if self.pid is not None else None

    def disk_bytes(self) -> int:
        """The database with its WAL: what this node keeps on disk."""
        paths = [self.db_path, self.db_path.with_name("chat.db-wal")]
        return sum(p.stat().st_size for p in paths if p.exists())

    def query(self, sql: str) -> Any:
        """One value from the node's database, read-only (WAL: the node's writer is not
        blocked); None when there is no row."""
        import apsw

        conn = apsw.Connection(str(self.db_path), flags=apsw.SQLITE_OPEN_READONLY)
        try:
            conn.set_busy_timeout(1000)
            row = conn.execute(sql).fetchone()
        finally:
            conn.close()
        return None if row is None else row[0]

    def log_offset(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def events(self, name: str, since: int = 0) -> list[Event]:
        """The log's ``name`` events written after byte offset ``since``."""
        if not self.log_path.exists():
            return []
        with self.log_path.open("rb") as log:
            log.seek(since)
            text = log.read().decode("utf-8", "replace")
        found = (parse_event(line) for line in text.splitlines())
        return [e for e in found if e is not None and e.name == name]

    def note(self, action: str) -> None:
        """Mark a benchmark action in the node's log, so the log reads as the scenario."""
        with self.log_path.open("a", encoding="utf-8") as log:
            log.write(f"=== bench: {action} node {self.node_id} ===\n")

    def _process(self) -> subprocess.Popen[bytes]:
        if self.process is None:
            raise RuntimeError(f"node {self.node_id} is not started")
        return self.process


class Cluster:
    """``n`` nodes that know each other; ``settings`` go to every node as ``--set``."""

    def __init__(self, root: Path, settings: dict[str, str] | None = None, n: int = 3) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        ports = free_ports(n)
        spec = ",".join(f"{i}={LOOPBACK}:{port}" for i, port in enumerate(ports, 1))
        self.nodes = {
            i: Node(i, root, port, spec, settings or {}) for i, port in enumerate(ports, 1)
        }

    @property
    def servers(self) -> list[str]:
        return [node.address for node in self.nodes.values()]

    def pids(self) -> dict[str, int]:
        return {f"node{i}": n.pid for i, n in self.nodes.items() if n.pid is not None}

    def start(self, extra: dict[str, str] | None = None) -> None:
        """Start every stopped node at once (a full restart needs its peers, R6)."""
        for node in self.nodes.values():
            if not node.running:
                node.start(extra)

    def stop(self) -> None:
        """SIGTERM every node together, then wait for each."""
        running = [node for node in self.nodes.values() if node.running]
        for node in running:
            node.terminate()
        for node in running:
            try:
                node.reap()
            except subprocess.TimeoutExpired:
                node.kill()
                node.reap()

    def kill_all(self) -> None:
        """SIGKILL every node we started; the teardown of last resort, never raises."""
        for node in self.nodes.values():
            if node.process is not None:
                node.kill()
                with contextlib.suppress(OSError, subprocess.SubprocessError, RuntimeError):
                    node.reap(5)

    # ---- observation -------------------------------------------------------------------

    async def statuses(self) -> Statuses:
        """Each node's own status view, or None when it is down or silent."""
        reports = await status_all(self.servers, 1.0)
        by_address = {node.address: i for i, node in self.nodes.items()}
        return {by_address[r["address"]]: (r["node"] if r.get("up") else None) for r in reports}

    async def wait_primary(self, timeout: float = 30.0) -> Node:
        """One primary that every running node names, in one epoch."""

        async def check() -> Node:
            views = await self._running_views()
            return self.nodes[_agreed_primary(views)]

        return await wait_until(check, timeout, "one agreed primary")

    async def wait_in_sync(self, timeout: float = 60.0) -> Node:
        """Every running node at the primary's position, in its sync set and, for a
        backup, confirmed (so that a failover is allowed by R5); returns the primary."""

        async def check() -> Node:
            views = await self._running_views()
            primary = _agreed_primary(views)
            view = views[primary]
            members = set(view["sync_set"]["members"]) & set(view.get("in_sync") or ())
            for node_id, other in views.items():
                if node_id not in members:
                    raise NotYet(f"node {node_id} is not in the sync set {sorted(members)}")
                if other["position"] != view["position"]:
                    raise NotYet(f"node {node_id} at {other['position']} not {view['position']}")
                if node_id != primary and not other.get("confirmed"):
                    raise NotYet(f"node {node_id} is not confirmed")
            return self.nodes[primary]

        return await wait_until(check, timeout, "every running node in the sync set")

    async def _running_views(self) -> dict[int, dict[str, Any]]:
        views = await self.statuses()
        running = {i for i, node in self.nodes.items() if node.running and not node.frozen}
        missing = sorted(i for i in running if views.get(i) is None)
        if missing:
            raise NotYet(f"nodes {missing} do not answer status")
        return {i: v for i, v in views.items() if i in running and v is not None}


class NotYet(Exception):
    """The awaited state is not there yet; the message says what is."""


def _agreed_primary(views: dict[int, dict[str, Any]]) -> int:
    primaries = [i for i, v in views.items() if v["role"] == "primary"]
    if len(primaries) != 1:
        raise NotYet(f"{len(primaries)} primaries")
    primary = primaries[0]
    for i, view in views.items():
        if view.get("primary_id") != primary or view["epoch"] != views[primary]["epoch"]:
            raise NotYet(f"node {i} does not name node {primary} in its epoch")
    return primary


async def wait_until(
    check: Callable[[], Awaitable[T]], timeout: float, what: str, interval: float = POLL
) -> T:
    """Poll ``check`` until it returns without raising; TimeoutError with the last reason."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await check()
        except (NotYet, OSError) as exc:
            reason = str(exc)
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:g} s for {what}; last: {reason}")
        await asyncio.sleep(interval)
