"""Control of the three node processes: crash, freeze, restart, observe.

Two kinds of cluster, one interface (``Nodes``):

* ``LocalCluster``: three ``python -m service`` processes this tool starts
  itself, on free loopback ports, in a folder of their own (a temp folder by
  default)::

      <root>/cluster.secret          shared; the first node to start creates it
      <root>/nodeN/node.conf         the INI file node N is started with
      <root>/nodeN/data/chat.db      its database (and rollback/ after a rewind)
      <root>/nodeN/node.log          its stdout and stderr, across restarts

  Restarts happen exactly when the nemesis says, in the order it says. Every
  fault is also written into the node's log as a ``=== chaos: ... ===`` line,
  so a log excerpt reads as the scenario. With ``disk_faults``, each node
  runs on the disk fault VFS of ``service/diskfaults.py``, driven by its
  ``<root>/nodeN/disk-faults.json`` (``set_disk``).

* ``SupervisedCluster``: the three programs of a running ``supervisord`` (the
  repository's ``supervisord.conf``, or a copy). Pids come from
  ``supervisorctl pid``; SIGKILL, SIGSTOP and SIGCONT go to those pids. A
  killed node is restarted by supervisord, not by this tool, as soon as
  supervisord sees it die: the schedule's down times and restart orders are
  not applied there, and "start" only waits for supervisord's new process.
  Only the part of each node log written during the run is checked. Disk
  faults and graceful stops are not available there (``set_disk`` and
  ``stop`` raise ``OSError``): supervisord owns the nodes' environment and
  lifecycle.

Observation is the ``status`` operation of every node (``status_all`` of the
client library) and, after the run, the database files and logs.

Invariants
----------
* A node is never left frozen: ``heal`` thaws every frozen node and starts
  every stopped one (and gives every disk back), and ``close`` of a
  ``LocalCluster`` kills what it started.
* The tool signals only pids it started itself or that supervisord names for
  the cluster's own programs.
"""

from __future__ import annotations

import asyncio
import configparser
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from service import client as client_module
from service import config as config_module
from service import diskfaults

LOOPBACK = "127.0.0.1"
NODE_IDS = (1, 2, 3)
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
STATUS_TIMEOUT = 1.0
# The folder that holds the ``service`` package: node processes run from there.
_PACKAGE_HOME = Path(client_module.__file__).resolve().parents[1]


class Nodes(Protocol):
    """What the nemesis, the workload and the checker need from a cluster."""

    node_ids: tuple[int, ...]
    # False when something else (supervisord) restarts crashed nodes.
    controls_restarts: bool

    @property
    def servers(self) -> list[str]: ...

    def address(self, node_id: int) -> str: ...
    def db_path(self, node_id: int) -> Path: ...
    def rollback_dir(self, node_id: int) -> Path: ...
    def log_text(self, node_id: int, since: int = 0) -> str: ...
    def log_size(self, node_id: int) -> int: ...
    def kill(self, node_id: int) -> None: ...
    def stop(self, node_id: int) -> None: ...
    def start(self, node_id: int) -> None: ...
    def set_disk(self, node_id: int, plan: diskfaults.Plan) -> None: ...
    def freeze(self, node_id: int) -> None: ...
    def thaw(self, node_id: int) -> None: ...
    def is_down(self, node_id: int) -> bool: ...
    def is_frozen(self, node_id: int) -> bool: ...
    def note(self, node_id: int, text: str) -> None: ...
    def heal(self) -> None: ...
    def close(self) -> dict[int, int]: ...
    def kill_all(self) -> None: ...
    def unexpected_exits(self) -> list[str]: ...


@dataclass(frozen=True)
class View:
    """The fields of one node's ``status`` that the tool reasons about."""

    node_id: int
    role: str
    epoch: int
    position: tuple[int, int]
    primary: object
    sync_set: tuple[int, ...]
    in_sync: tuple[int, ...] | None

    @classmethod
    def from_status(cls, node: dict[str, Any]) -> View:
        epoch, seq = node.get("position") or (node["epoch"], node["seq"])
        members = (node.get("sync_set") or {}).get("members") or []
        in_sync = node.get("in_sync")
        return cls(
            node_id=int(node["id"]),
            role=str(node["role"]),
            epoch=int(node["epoch"]),
            position=(int(epoch), int(seq)),
            primary=node.get("primary"),
            sync_set=tuple(sorted(int(m) for m in members)),
            in_sync=None if in_sync is None else tuple(sorted(int(m) for m in in_sync)),
        )

    def __str__(self) -> str:
        return (
            f"node {self.node_id}: {self.role} epoch={self.epoch} position={self.position} "
            f"sync_set={list(self.sync_set)} in_sync={self.in_sync}"
        )


def views(nodes: Nodes) -> dict[int, View | None]:
    """Every node's status now (None for a node that is down, frozen or silent)."""
    by_address = {nodes.address(i): i for i in nodes.node_ids}
    answers = asyncio.run(
        client_module.status_all(nodes.servers, STATUS_TIMEOUT, attempt_timeout=STATUS_TIMEOUT)
    )
    out: dict[int, View | None] = {}
    for answer in answers:
        node_id = by_address[str(answer["address"])]
        node = answer.get("node") if answer.get("up") else None
        out[node_id] = View.from_status(node) if isinstance(node, dict) else None
    return out


def primary_of(seen: dict[int, View | None]) -> int | None:
    """The node that says it is primary in the highest epoch, if any."""
    primaries = [v for v in seen.values() if v is not None and v.role == "primary"]
    if not primaries:
        return None
    return max(primaries, key=lambda v: (v.epoch, -v.node_id)).node_id


def converged(seen: dict[int, View | None], expected: Sequence[int]) -> str | None:
    """None when every node answers, one primary leads, all hold its position and are
    in its sync set (latest and in effect); else what is still missing."""
    missing = [i for i in expected if seen.get(i) is None]
    if missing:
        return f"nodes {missing} do not answer"
    live = [v for v in seen.values() if v is not None]
    primaries = [v for v in live if v.role == "primary"]
    if len(primaries) != 1:
        return f"{len(primaries)} primaries"
    head = primaries[0]
    everyone = tuple(sorted(expected))
    if head.sync_set != everyone or head.in_sync != everyone:
        return f"the sync set is not {list(everyone)}: {head}"
    behind = [str(v) for v in live if (v.epoch, v.position) != (head.epoch, head.position)]
    if behind:
        return f"not at {head.position} of node {head.node_id}: {'; '.join(behind)}"
    return None


def wait_converged(nodes: Nodes, timeout: float) -> tuple[int, tuple[int, int]]:
    """Poll until ``converged``; return (primary id, position). TimeoutError says why not."""
    deadline = time.monotonic() + timeout
    why = "not asked yet"
    while True:
        seen = views(nodes)
        why = converged(seen, nodes.node_ids) or ""
        if not why:
            primary = primary_of(seen)
            view = seen[primary] if primary is not None else None
            assert primary is not None
            assert view is not None
            return primary, view.position
        if time.monotonic() >= deadline:
            states = "; ".join(str(v) if v else f"node {i}: down" for i, v in seen.items())
            raise TimeoutError(f"not converged after {timeout:g} s: {why} [{states}]")
        time.sleep(0.1)


def free_ports(count: int) -> list[int]:
    """Ports the kernel picked as free a moment ago (bound together, so distinct)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((LOOPBACK, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _read_from(path: Path, offset: int) -> str:
    if not path.exists():
        return ""
    with path.open("rb") as log:
        size = log.seek(0, os.SEEK_END)
        log.seek(offset if offset <= size else 0)  # a rotated log: read it all
        return log.read().decode("utf-8", errors="replace")


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


# ---- a cluster of our own ---------------------------------------------------------------


class _LocalNode:
    def __init__(self, node_id: int, root: Path, port: int) -> None:
        self.node_id = node_id
        self.address = f"{LOOPBACK}:{port}"
        self.dir = root / f"node{node_id}"
        self.data_dir = self.dir / "data"
        self.config_path = self.dir / "node.conf"
        self.log_path = self.dir / "node.log"
        self.disk_control = self.dir / "disk-faults.json"
        self.disk_plan = diskfaults.OFF
        self.process: subprocess.Popen[bytes] | None = None
        self.frozen = False

    def reap(self) -> int | None:
        """The exit status if the process ended by itself (then it is forgotten)."""
        if self.process is None or (code := self.process.poll()) is None:
            return None
        self.process = None
        self.frozen = False
        return code


class LocalCluster:
    """Three node processes of our own in ``root`` (see the module docstring)."""

    controls_restarts = True

    def __init__(
        self, root: Path, settings: dict[str, str] | None = None, disk_faults: bool = False
    ) -> None:
        self.root = root
        self.disk_faults = disk_faults
        self.node_ids: tuple[int, ...] = NODE_IDS
        self.secret_file = root / "cluster.secret"
        self._exits: list[str] = []
        ports = free_ports(len(NODE_IDS))
        self._nodes = {
            i: _LocalNode(i, root, port) for i, port in zip(NODE_IDS, ports, strict=True)
        }
        spec = ",".join(f"{i}={node.address}" for i, node in self._nodes.items())
        for node in self._nodes.values():
            node.dir.mkdir(parents=True)
            lines = [
                "[node]",
                f"node_id = {node.node_id}",
                f"data_dir = {node.data_dir}",
                f"nodes = {spec}",
                f"secret_file = {self.secret_file}",
                *(f"{key} = {value}" for key, value in (settings or {}).items()),
            ]
            node.config_path.write_text("\n".join(lines) + "\n")

    @property
    def servers(self) -> list[str]:
        return [node.address for node in self._nodes.values()]

    def address(self, node_id: int) -> str:
        return self._nodes[node_id].address

    def db_path(self, node_id: int) -> Path:
        return self._nodes[node_id].data_dir / "chat.db"

    def rollback_dir(self, node_id: int) -> Path:
        return self._nodes[node_id].data_dir / "rollback"

    def log_path(self, node_id: int) -> Path:
        return self._nodes[node_id].log_path

    def log_text(self, node_id: int, since: int = 0) -> str:
        """The node's log from byte ``since`` on (``log_size`` gives a mark)."""
        return _read_from(self._nodes[node_id].log_path, since)

    def log_size(self, node_id: int) -> int:
        return _size(self._nodes[node_id].log_path)

    def start_all(self) -> None:
        for node_id in self.node_ids:
            self.start(node_id)

    def start(self, node_id: int) -> None:
        node = self._nodes[node_id]
        self._check_exit(node)
        if node.process is not None:
            return
        self.note(node_id, "start")
        command = [sys.executable, "-m", "service", "--config", str(node.config_path)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.disk_faults:
            env[diskfaults.ENV_VAR] = str(node.disk_control)
        with node.log_path.open("ab") as log:
            node.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=_PACKAGE_HOME,
                env=env,
            )
        node.frozen = False

    def kill(self, node_id: int) -> None:
        node = self._nodes[node_id]
        self._check_exit(node)
        if node.process is None:
            return
        node.process.kill()
        node.process.wait(STOP_TIMEOUT)
        node.process = None
        node.frozen = False
        self.note(node_id, "SIGKILL")

    def stop(self, node_id: int) -> None:
        """SIGTERM and wait, as an operator stops a node; a non-zero exit is a problem
        (reported with the unexpected exits), a node that will not stop is killed."""
        node = self._nodes[node_id]
        self._check_exit(node)
        if node.process is None:
            return
        self.thaw(node_id)
        self.note(node_id, "SIGTERM")
        node.process.terminate()
        try:
            code = node.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            node.process.kill()
            code = node.process.wait()
        node.process = None
        if code != 0:
            self._exits.append(f"node {node_id} exited with status {code} on SIGTERM")

    def set_disk(self, node_id: int, plan: diskfaults.Plan) -> None:
        """Put a disk fault plan in effect on the node (it reads it within ~50 ms)."""
        node = self._nodes[node_id]
        if not self.disk_faults:
            raise OSError("this cluster was started without disk faults")
        self.note(node_id, f"disk {plan}")
        diskfaults.write_control(node.disk_control, plan)
        node.disk_plan = plan

    def freeze(self, node_id: int) -> None:
        node = self._nodes[node_id]
        if node.process is not None and node.process.poll() is None and not node.frozen:
            self.note(node_id, "SIGSTOP")
            node.process.send_signal(signal.SIGSTOP)
            node.frozen = True

    def thaw(self, node_id: int) -> None:
        node = self._nodes[node_id]
        if node.process is not None and node.frozen:
            self.note(node_id, "SIGCONT")
            node.process.send_signal(signal.SIGCONT)
            node.frozen = False

    def is_down(self, node_id: int) -> bool:
        process = self._nodes[node_id].process
        return process is None or process.poll() is not None

    def is_frozen(self, node_id: int) -> bool:
        return self._nodes[node_id].frozen

    def unexpected_exits(self) -> list[str]:
        """Every time a node process ended although nobody killed or stopped it."""
        for node in self._nodes.values():
            self._check_exit(node)
        return list(self._exits)

    def _check_exit(self, node: _LocalNode) -> None:
        code = node.reap()
        if code is not None:
            self._exits.append(f"node {node.node_id} exited by itself with status {code}")
            self.note(node.node_id, f"exited by itself with status {code}")

    def note(self, node_id: int, text: str) -> None:
        """A line in the node's log, stamped like the node's own lines."""
        stamp = datetime.now().strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
        with self._nodes[node_id].log_path.open("a", encoding="utf-8") as log:
            log.write(f"=== chaos: {stamp} {text} node {node_id} ===\n")

    def heal(self) -> None:
        for node_id in self.node_ids:
            if self._nodes[node_id].disk_plan != diskfaults.OFF:
                self.set_disk(node_id, diskfaults.OFF)
            self.thaw(node_id)
            self.start(node_id)

    def close(self) -> dict[int, int]:
        """SIGTERM every node and wait; returns the exit statuses (a node that will not
        stop in time is killed and reported with status -9)."""
        statuses: dict[int, int] = {}
        for node_id, node in self._nodes.items():
            self._check_exit(node)
            process = node.process
            if process is None:
                continue
            self.thaw(node_id)
            if process.poll() is None:
                self.note(node_id, "SIGTERM")
                process.terminate()
            try:
                statuses[node_id] = process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                statuses[node_id] = -9
            node.process = None
        return statuses

    def kill_all(self) -> None:
        """The teardown of last resort: SIGKILL whatever still runs. Never raises."""
        for node in self._nodes.values():
            if node.process is not None:
                with suppress(OSError):
                    if node.frozen:
                        node.process.send_signal(signal.SIGCONT)
                    node.process.kill()
                with suppress(subprocess.SubprocessError):
                    node.process.wait(STOP_TIMEOUT)
                node.process = None


# ---- a cluster under supervisord --------------------------------------------------------


@dataclass
class _Program:
    node_id: int
    name: str  # what supervisorctl calls it ("nodes:node1")
    config: config_module.NodeConfig
    log_path: Path
    log_offset: int = 0
    killed_pid: int | None = None
    frozen_pid: int | None = None


class SupervisedCluster:
    """The nodes of a running supervisord (see the module docstring)."""

    controls_restarts = False

    def __init__(self, conf: Path) -> None:
        self.conf = conf.resolve()
        here = str(self.conf.parent)
        parser = configparser.RawConfigParser()
        if not parser.read(self.conf):
            raise FileNotFoundError(f"cannot read {conf}")
        groups = {
            program.strip(): section.split(":", 1)[1]
            for section in parser.sections()
            if section.startswith("group:")
            for program in parser.get(section, "programs", fallback="").split(",")
        }
        programs: dict[int, _Program] = {}
        for section in parser.sections():
            if not section.startswith("program:"):
                continue
            name = section.split(":", 1)[1]
            command = shlex.split(parser.get(section, "command").replace("%(here)s", here))
            if "service" not in command or "--config" not in command:
                continue
            node_conf = Path(command[command.index("--config") + 1])
            config = config_module.load(node_conf, {})
            log = parser.get(section, "stdout_logfile").replace("%(here)s", here)
            ctl_name = f"{groups[name]}:{name}" if name in groups else name
            programs[config.node_id] = _Program(config.node_id, ctl_name, config, Path(log))
        if len(programs) < 2:
            raise ValueError(f"{conf} defines no chat node programs")
        self._programs = dict(sorted(programs.items()))
        self.node_ids = tuple(self._programs)
        ctl = Path(sys.executable).with_name("supervisorctl")
        self._ctl = str(ctl) if ctl.exists() else "supervisorctl"
        for program in self._programs.values():
            if program.log_path.exists():
                program.log_offset = program.log_path.stat().st_size
            if not self._pid(program):
                raise RuntimeError(f"supervisord does not run {program.name} (is it up?)")

    @property
    def servers(self) -> list[str]:
        return [p.config.me.address for p in self._programs.values()]

    def address(self, node_id: int) -> str:
        return self._programs[node_id].config.me.address

    def db_path(self, node_id: int) -> Path:
        return self._programs[node_id].config.db_path

    def rollback_dir(self, node_id: int) -> Path:
        return self._programs[node_id].config.data_dir / "rollback"

    def log_text(self, node_id: int, since: int = 0) -> str:
        """What the node logged during the run, from byte ``since`` of that part on."""
        program = self._programs[node_id]
        return _read_from(program.log_path, program.log_offset + since)

    def log_size(self, node_id: int) -> int:
        program = self._programs[node_id]
        return max(0, _size(program.log_path) - program.log_offset)

    def _pid(self, program: _Program) -> int:
        done = subprocess.run(
            [self._ctl, "-c", str(self.conf), "pid", program.name],
            capture_output=True,
            text=True,
            timeout=STOP_TIMEOUT,
            check=False,
        )
        text = done.stdout.strip()
        return int(text) if text.isdigit() else 0

    def kill(self, node_id: int) -> None:
        program = self._programs[node_id]
        pid = self._pid(program)
        if pid:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            program.killed_pid = pid
            program.frozen_pid = None

    def start(self, node_id: int) -> None:
        """supervisord restarts a killed node by itself: wait for its new process."""
        program = self._programs[node_id]
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            pid = self._pid(program)
            if pid and pid != program.killed_pid:
                program.killed_pid = None
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"supervisord did not restart {program.name}")
            time.sleep(0.1)

    def freeze(self, node_id: int) -> None:
        program = self._programs[node_id]
        pid = self._pid(program)
        if pid and program.frozen_pid is None:
            os.kill(pid, signal.SIGSTOP)
            program.frozen_pid = pid

    def thaw(self, node_id: int) -> None:
        program = self._programs[node_id]
        if program.frozen_pid is not None:
            with suppress(ProcessLookupError):
                os.kill(program.frozen_pid, signal.SIGCONT)
            program.frozen_pid = None

    def is_down(self, node_id: int) -> bool:
        program = self._programs[node_id]
        pid = self._pid(program)
        return not pid or pid == program.killed_pid

    def stop(self, node_id: int) -> None:
        raise OSError("a supervised node is not stopped by this tool")

    def set_disk(self, node_id: int, plan: diskfaults.Plan) -> None:
        raise OSError("disk faults need a local cluster (they set the node's environment)")

    def is_frozen(self, node_id: int) -> bool:
        return self._programs[node_id].frozen_pid is not None

    def note(self, node_id: int, text: str) -> None:
        """supervisord owns these logs: the fault log of the nemesis is the record."""

    def heal(self) -> None:
        for node_id in self.node_ids:
            self.thaw(node_id)
            if self.is_down(node_id):
                self.start(node_id)

    def close(self) -> dict[int, int]:
        """The nodes belong to supervisord: leave them running, thawed."""
        for node_id in self.node_ids:
            self.thaw(node_id)
        return {}

    def unexpected_exits(self) -> list[str]:
        """supervisord restarts whatever exits; its own log tells why."""
        return []

    def kill_all(self) -> None:
        for node_id in self.node_ids:
            self.thaw(node_id)
