"""Control of the three node processes: crash, freeze, restart, observe.

Two kinds of cluster, one interface (``Nodes``):

* ``LocalCluster``: three ``python -m service`` processes this tool starts
  itself through the local-cluster harness (``ops/cluster``), on free
  loopback ports, in a folder of their own (a temp folder by default)::

      <root>/cluster.secret          shared; the first node to start creates it
      <root>/nodeN/node.conf         the INI file node N is started with
      <root>/nodeN/data/chat.db      its database (and rollback/ after a rewind)
      <root>/nodeN/node.log          its stdout and stderr, across restarts

  Restarts happen exactly when the nemesis says, in the order it says. Every
  fault is also written into the node's log as a ``=== chaos: ... ===`` line,
  so a log excerpt reads as the scenario. With ``disk_faults``, each node
  runs on the disk fault VFS of ``service/diskfaults.py``, driven by its
  ``<root>/nodeN/disk-faults.json`` (``set_disk``).

* ``ArbiterCluster``: a ``LocalCluster`` in the etcd arbiter mode (SPEC
  section 10) laid out as the rehearsal of several hosts: each node on its own
  loopback address (127.0.0.11, .12, .13 by default), dialling its peers from
  it, and one etcd member (``ops/etcd.py``) on one more (127.0.0.10), its data
  in ``<root>/etcd``. Traffic between any two of these addresses can be cut
  (``cut``, nft through ``ops/netcut.py``, in a table of the run's own so that
  healing never removes another tool's cuts), and the member frozen, killed,
  stopped and started. The workload and the probes dial from 127.0.0.1, which
  no cut names: clients always reach every node.

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

Observation is the ``status`` operation of every node (the harness's probe,
typed as ``service.status.NodeStatus``) and, after the run, the database
files and logs. "Converged" is the harness's agreed primary
(``ops/cluster/agreement.py``) with every node at its position and the sync
set, latest and in effect, all of them; the primary a fault targets is the
node that says so in the highest epoch (``service.status.leading``), since
faults also strike while the nodes disagree.

Invariants
----------
* A node is never left frozen: ``heal`` thaws every frozen node and starts
  every stopped one (and gives every disk back; in the arbiter mode it also
  removes every cut and thaws or starts the etcd member first), and ``close``
  of a ``LocalCluster`` kills what it started.
* The tool signals only pids it started itself or that supervisord names for
  the cluster's own programs.
"""

from __future__ import annotations

import configparser
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import etcd3gw
from etcd3gw.exceptions import Etcd3Exception

from ops import netcut
from ops.cluster import agreement
from ops.cluster.nodes import Cluster, NodeExited, NodeProcess
from ops.cluster.ports import free_ports
from ops.cluster.probe import probe_all
from ops.cluster.waiting import NotYet, wait_for
from ops.etcd import Etcd, EtcdError
from service import config as config_module
from service import diskfaults
from service.__main__ import parse_args as parse_node_args
from service.status import NodeStatus, leading

NODE_IDS = (1, 2, 3)
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
STATUS_TIMEOUT = 1.0
Views = dict[int, NodeStatus | None]


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


def views(nodes: Nodes) -> Views:
    """Every node's status now (None for a node that is down, frozen, silent or garbled)."""
    addresses = {i: nodes.address(i) for i in nodes.node_ids}
    return probe_all(addresses, STATUS_TIMEOUT, errors_as_none=True)


def primary_of(seen: Views) -> int | None:
    """The node that says it is primary in the highest epoch, if any."""
    head = leading(view for view in seen.values() if view is not None)
    return head.node_id if head is not None else None


def converged(seen: Views, expected: Sequence[int]) -> tuple[int, tuple[int, int]]:
    """(primary, position) when every node answers, agrees on one primary, holds its
    position and is in its sync set (latest and in effect); else NotYet saying why."""
    missing = [i for i in expected if seen.get(i) is None]
    if missing:
        raise NotYet(f"nodes {missing} do not answer")
    live = {i: view for i, view in seen.items() if view is not None}
    primary = agreement.agreed_primary(live)
    agreement.whole_sync_set(live, primary, expected)
    return primary, agreement.common_position(live, primary)


def wait_converged(nodes: Nodes, timeout: float) -> tuple[int, tuple[int, int]]:
    """Poll until ``converged`` (and, in the arbiter mode, until etcd agrees: see
    ``ArbiterCluster.agrees``); return (primary id, position). TimeoutError says why not."""

    def check() -> tuple[int, tuple[int, int]]:
        seen = views(nodes)
        primary, position = converged(seen, nodes.node_ids)
        if isinstance(nodes, ArbiterCluster):
            view = seen[primary]
            assert view is not None
            nodes.agrees(primary, view.epoch)
        return primary, position

    return wait_for(check, timeout, "the cluster to converge")


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


class LocalCluster:
    """Three node processes of our own in ``root`` (see the module docstring).

    The harness's ``Cluster`` with the forgiving verbs a nemesis needs: starting a
    running node, killing a dead one or thawing a thawed one does nothing, and a
    node that exits by itself is recorded (``unexpected_exits``), not raised.
    """

    controls_restarts = True

    def __init__(
        self,
        root: Path,
        settings: dict[str, str] | None = None,
        disk_faults: bool = False,
        hosts: Sequence[str] | None = None,
    ) -> None:
        self.root = root
        self.disk_faults = disk_faults
        self.node_ids: tuple[int, ...] = NODE_IDS
        self.cluster = Cluster(root, len(NODE_IDS), hosts=hosts, settings=settings, tag="chaos")
        self.secret_file = self.cluster.secret_file
        self._exits: list[str] = []
        self._disk_plans = dict.fromkeys(NODE_IDS, diskfaults.OFF)
        if disk_faults:
            for node in self.cluster.nodes.values():
                node.env[diskfaults.ENV_VAR] = str(self._disk_control(node))

    @property
    def servers(self) -> list[str]:
        return self.cluster.servers

    def address(self, node_id: int) -> str:
        return self.cluster[node_id].address

    def db_path(self, node_id: int) -> Path:
        return self.cluster[node_id].db_path

    def rollback_dir(self, node_id: int) -> Path:
        return self.cluster[node_id].data_dir / "rollback"

    def log_path(self, node_id: int) -> Path:
        return self.cluster[node_id].log_path

    def log_text(self, node_id: int, since: int = 0) -> str:
        """The node's log from byte ``since`` on (``log_size`` gives a mark)."""
        return self.cluster[node_id].log_text(since)

    def log_size(self, node_id: int) -> int:
        return self.cluster[node_id].log_size()

    def start_all(self) -> None:
        for node_id in self.node_ids:
            self.start(node_id)

    def start(self, node_id: int) -> None:
        node = self._checked(node_id)
        if not node.started:
            node.start(wait=False)

    def kill(self, node_id: int) -> None:
        node = self._checked(node_id)
        if node.started:
            node.kill()

    def stop(self, node_id: int) -> None:
        """SIGTERM and wait, as an operator stops a node; a non-zero exit is a problem
        (reported with the unexpected exits), a node that will not stop is killed."""
        node = self._checked(node_id)
        if not node.started:
            return
        try:
            code = node.stop(STOP_TIMEOUT)
        except RuntimeError as exc:
            self._exits.append(str(exc))
            return
        if code != 0:
            self._exits.append(f"node {node_id} exited with status {code} on SIGTERM")

    def set_disk(self, node_id: int, plan: diskfaults.Plan) -> None:
        """Put a disk fault plan in effect on the node (it reads it within ~50 ms)."""
        if not self.disk_faults:
            raise OSError("this cluster was started without disk faults")
        node = self.cluster[node_id]
        self.note(node_id, f"disk {plan}")
        diskfaults.write_control(self._disk_control(node), plan)
        self._disk_plans[node_id] = plan

    def freeze(self, node_id: int) -> None:
        node = self._checked(node_id)
        if node.started and not node.is_frozen:
            with suppress(NodeExited):  # it died just now: recorded at the next look
                node.freeze()

    def thaw(self, node_id: int) -> None:
        node = self._checked(node_id)
        if node.is_frozen:
            with suppress(NodeExited):
                node.thaw()

    def is_down(self, node_id: int) -> bool:
        return not self.cluster[node_id].is_running

    def is_frozen(self, node_id: int) -> bool:
        return self.cluster[node_id].is_frozen

    def unexpected_exits(self) -> list[str]:
        """Every time a node process ended although nobody killed or stopped it."""
        for node_id in self.node_ids:
            self._checked(node_id)
        return list(self._exits)

    def note(self, node_id: int, text: str) -> None:
        """A line in the node's log, stamped like the node's own lines."""
        self.cluster[node_id].note(text)

    def heal(self) -> None:
        for node_id in self.node_ids:
            if self._disk_plans[node_id] != diskfaults.OFF:
                self.set_disk(node_id, diskfaults.OFF)
            self.thaw(node_id)
            self.start(node_id)

    def close(self) -> dict[int, int]:
        """SIGTERM every node and wait; returns the exit statuses (a node that will not
        stop in time is killed and reported with status -9)."""
        statuses: dict[int, int] = {}
        for node_id in self.node_ids:
            node = self._checked(node_id)
            if not node.started:
                continue
            try:
                statuses[node_id] = node.stop(STOP_TIMEOUT)
            except RuntimeError:
                statuses[node_id] = -9
        return statuses

    def kill_all(self) -> None:
        """The teardown of last resort: SIGKILL whatever still runs. Never raises."""
        self.cluster.kill_all()

    def _checked(self, node_id: int) -> NodeProcess:
        """The node, once an exit it made by itself is recorded (and the process forgotten)."""
        node = self.cluster[node_id]
        code = node.exited()
        if code is not None:
            self._exits.append(f"node {node_id} exited by itself with status {code}")
            node.note(f"exited by itself with status {code}")
        return node

    @staticmethod
    def _disk_control(node: NodeProcess) -> Path:
        return node.dir / "disk-faults.json"


# ---- the etcd arbiter mode, on addresses of their own -------------------------------------

ETCD_PREFIX = "/chat/chaos"


class ArbiterCluster(LocalCluster):
    """A ``LocalCluster`` with ``arbiter = etcd``, one address per node and one for the
    etcd member (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        settings: dict[str, str],
        disk_faults: bool,
        hosts: Sequence[str],
        etcd_host: str,
    ) -> None:
        if len(hosts) != len(NODE_IDS) or etcd_host in hosts or len(set(hosts)) != len(hosts):
            raise ValueError(f"three node addresses and another one for etcd, not {hosts}")
        client, peer = free_ports(2, etcd_host)
        self.etcd = Etcd(root / "etcd", f"{etcd_host}:{client}", f"{etcd_host}:{peer}")
        self.etcd_host = etcd_host
        self.hosts = dict(zip(NODE_IDS, hosts, strict=True))
        # The run's own nft table, named after the etcd address: a new run on the same
        # addresses clears what a crashed one left behind.
        self.cut_table = "chaos_" + etcd_host.replace(".", "_").replace(":", "_")
        self.etcd_frozen = False
        arbiter = {
            "arbiter": "etcd",
            "etcd_endpoints": self.etcd.client,
            "etcd_prefix": ETCD_PREFIX,
        }
        super().__init__(root, {**settings, **arbiter}, disk_faults, hosts)

    def host(self, node_id: int) -> str:
        return self.hosts[node_id]

    def start_all(self) -> None:
        """Clear what a crashed run on these addresses left, start etcd, then the nodes.

        Conntrack follows every connection from its first packet from here on
        (``netcut.track``): a one-way cut made later knows who opened each one."""
        self.heal_cuts()
        try:
            netcut.track(self.cut_table)
        except netcut.NetcutError as exc:
            raise OSError(str(exc)) from None
        self.start_etcd()
        super().start_all()

    # ---- cuts ----------------------------------------------------------------------------

    def cut(self, source: str, dest: str, both: bool) -> None:
        """Drop traffic from ``source`` to ``dest`` (``both``: either way); addresses."""
        try:
            netcut.cut(source, dest, both=both, table=self.cut_table)
        except netcut.NetcutError as exc:
            raise OSError(str(exc)) from None

    def heal_cuts(self) -> None:
        try:
            netcut.heal(self.cut_table)
        except netcut.NetcutError as exc:
            raise OSError(str(exc)) from None

    # ---- the etcd member -----------------------------------------------------------------

    def freeze_etcd(self) -> None:
        if not self.etcd_frozen and self.etcd.state == "running":
            self.etcd.freeze()
            self.etcd_frozen = True

    def thaw_etcd(self) -> None:
        if self.etcd_frozen:
            self.etcd_frozen = False
            with suppress(EtcdError):  # it exited: start_etcd says so
                self.etcd.thaw()

    def kill_etcd(self) -> None:
        self.etcd_frozen = False
        if self.etcd.pid is not None:
            self.etcd.kill()

    def stop_etcd(self) -> None:
        self.etcd_frozen = False
        if self.etcd.pid is not None:
            try:
                self.etcd.stop()
            except EtcdError as exc:  # it would not stop and was killed
                self._exits.append(str(exc))

    def start_etcd(self) -> None:
        """Start the member unless it runs; returns once it is healthy (OSError if not)."""
        if self.etcd.state == "running":
            return
        if self.etcd.pid is not None:  # it exited by itself
            self._exits.append(f"etcd exited by itself ({self.etcd.state})")
            with suppress(EtcdError):
                self.etcd.kill()
        try:
            self.etcd.start()
        except EtcdError as exc:
            raise OSError(str(exc)) from None

    # ---- healing and the end -------------------------------------------------------------

    def heal(self) -> None:
        self.heal_cuts()
        self.thaw_etcd()
        self.start_etcd()
        super().heal()

    def close(self) -> dict[int, int]:
        """Stop the nodes first (each revokes its lease on the way out), then etcd."""
        statuses = super().close()
        self.stop_etcd()
        with suppress(netcut.NetcutError):
            netcut.clear(self.cut_table)
        return statuses

    def kill_all(self) -> None:
        super().kill_all()
        with suppress(OSError):
            self.heal_cuts()
        with suppress(EtcdError, OSError):
            self.thaw_etcd()
            self.kill_etcd()

    def agrees(self, primary: int, epoch: int) -> None:
        """NotYet unless etcd's leader key names ``primary`` in ``epoch`` and its sync set
        is every node: after healing, the store and the nodes tell one story."""
        host, port = self.etcd.host, self.etcd.port
        client = etcd3gw.Etcd3Client(host=host, port=port, timeout=STATUS_TIMEOUT)
        try:
            items = client.get_prefix(ETCD_PREFIX + "/")
        except (Etcd3Exception, OSError, ValueError) as exc:
            raise NotYet(f"etcd does not answer: {exc}") from None
        keys = {
            str(meta["key"], "utf-8") if isinstance(meta["key"], bytes) else str(meta["key"]): value
            for value, meta in items
        }
        leader = json.loads(keys.get(ETCD_PREFIX + "/leader", b"null"))
        stored = json.loads(keys.get(ETCD_PREFIX + "/sync", b"null"))
        members = sorted(stored.get("members", [])) if isinstance(stored, dict) else None
        if leader != {"node": primary, "epoch": epoch} or members != sorted(self.node_ids):
            raise NotYet(
                f"etcd holds leader {leader} and sync set members {members}; the nodes "
                f"agree on node {primary} in epoch {epoch}"
            )


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
            # The node's settings as it reads them: its file and its --set flags.
            node_conf, overrides = parse_node_args(command[command.index("service") + 1 :])
            config = config_module.load(node_conf, overrides)
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

    def rate_limits(self) -> list[str]:
        """The node settings that would slow the workload (``name=value``): the
        clusters chaos starts lift them, a supervisord's keeps what it was given."""
        limits = []
        for name in ("send_rate", "write_rate", "register_rate"):
            values = {getattr(p.config, name) for p in self._programs.values()}
            limits += [f"{name}={value:g}" for value in sorted(values) if value > 0]
        return limits

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
