"""The cluster under supervisord, as an operator runs it (SPEC sections 1 and 7).

Three tests:

* The repository's own ``supervisord.conf`` is realized by supervisor's own
  option parser (``supervisor.options.ServerOptions``, what ``supervisord``
  runs at start), and every program it defines restarts on a crash and runs
  ``python -m service --config ops/nodes/nodeN.conf``, a file that
  ``service.config.load`` accepts, for node N of one three-node cluster on the
  addresses ``chatctl`` uses by default.
* A three-node cluster under a real ``supervisord``. Its configuration is
  generated from the repository's: the same sections and program options,
  with only what must change for a test replaced (the venv's interpreter,
  free loopback ports in the node configs, everything under a temp folder;
  ``%(here)s`` does the rest). Messages are sent and acknowledged; a backup is
  SIGKILLed, then the primary: each time supervisord must start the node again
  (a new pid, answering ``status``), the cluster must agree on one primary and
  converge, and every acknowledged message must still be there, once.
* A fresh clone (the repository's tracked files) after ``make install``:
  ``supervisord -c supervisord.conf`` starts the three nodes as they are, and
  each node makes its own data dir, private.

The node processes are supervisord's children, not the harness's, so the
cluster is observed from outside: pids from ``supervisorctl pid``, roles and
positions from the ``status`` probe, data through the client. Waiting is on
that state, with deadlines. supervisord is always shut down at teardown, and
any node process it leaves behind is killed.
"""

from __future__ import annotations

import asyncio
import configparser
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from supervisor.datatypes import RestartUnconditionally
from supervisor.options import ServerOptions

from ops.cluster import agreement
from ops.cluster.ports import LOOPBACK, free_ports
from ops.cluster.probe import probe_status
from ops.cluster.waiting import NotYet, StopWaiting, wait_for
from service.client import DEFAULT_SERVERS, Client
from service.config import NodeConfig, load, parse_peers
from service.status import NodeStatus
from service.storage import Storage
from tests.helpers.cluster import REPO_ROOT

pytestmark = pytest.mark.cluster

REPO_CONF = REPO_ROOT / "supervisord.conf"
BIN = Path(sys.executable).parent
SUPERVISORD = BIN / "supervisord"
SUPERVISORCTL = BIN / "supervisorctl"
GROUP = "nodes"
NODE_IDS = (1, 2, 3)
PASSWORD = "supervised-password"
START_TIMEOUT = 30.0
FAILOVER_TIMEOUT = 30.0
CTL_TIMEOUT = 20.0
# A unix socket path longer than this does not fit in sockaddr_un on every system.
MAX_SOCKET_PATH = 100


def _read_ini(path: Path) -> configparser.RawConfigParser:
    """An INI file as written, without interpolation (supervisord does its own)."""
    parser = configparser.RawConfigParser()
    if not parser.read(path):
        raise FileNotFoundError(path)
    return parser


# ---- the repository's supervisord.conf ---------------------------------------------------


def _realize(conf: Path) -> Any:
    options = ServerOptions()
    options.realize(args=["-c", str(conf)])
    return options


def test_the_repo_supervisord_conf_runs_the_three_repo_nodes(tmp_path: Path) -> None:
    # A copy, so that %(here)s is a folder with a var/ (a fresh checkout has none
    # until `make` creates it, and supervisord insists its log folder exists).
    conf = tmp_path / "supervisord.conf"
    conf.write_text(REPO_CONF.read_text())
    (tmp_path / "var" / "log").mkdir(parents=True)
    options = _realize(conf)

    here = tmp_path.resolve()
    var = here / "var"
    for path in (options.logfile, options.pidfile, options.childlogdir):
        assert Path(path).is_relative_to(var), path
    sockets = [server["file"] for server in options.server_configs]
    assert [Path(file).parent for file in sockets] == [var]

    groups = {group.name: group for group in options.process_group_configs}
    assert list(groups) == [GROUP]
    programs = {p.name: p for p in groups[GROUP].process_configs}
    assert sorted(programs) == [f"node{i}" for i in NODE_IDS]

    configs: dict[int, NodeConfig] = {}
    for node_id in NODE_IDS:
        program = programs[f"node{node_id}"]
        assert program.autostart is True
        assert program.autorestart is RestartUnconditionally, "a crashed node must restart"
        assert program.startretries >= 1000, "a crash loop must not end in FATAL"
        assert program.stopsignal == signal.SIGTERM
        assert program.redirect_stderr is True
        assert Path(program.stdout_logfile) == var / "log" / f"node{node_id}.log"
        assert Path(program.directory) == here
        assert program.environment == {"PYTHONUNBUFFERED": "1"}
        python, *arguments = shlex.split(program.command)
        assert Path(python) == here / ".venv" / "bin" / "python", "the Makefile's venv"
        assert arguments[:3] == ["-m", "service", "--config"]
        assert len(arguments) == 4, program.command
        relative = Path(arguments[3]).relative_to(here)
        assert relative == Path("ops", "nodes", f"node{node_id}.conf")
        configs[node_id] = load(REPO_ROOT / relative, {})

    # The nodes inherit supervisord's file limit: enough for their derived client
    # limit to be well above a handful, with room for the database and the peers.
    assert options.minfds >= 4096, "supervisord must raise the file limit (minfds)"
    for node_id, config in configs.items():
        assert config.client_limit(options.minfds) >= 3000, config
        assert config.node_id == node_id
        assert config.nodes == configs[1].nodes, "every node knows the same cluster"
        assert config.secret_file.resolve() == (REPO_ROOT / "var" / "cluster.secret").resolve()
        assert config.data_dir.resolve().is_relative_to((REPO_ROOT / "var").resolve())
    assert len({config.data_dir.resolve() for config in configs.values()}) == len(NODE_IDS)
    addresses = [peer.address for peer in configs[1].nodes]
    assert addresses == list(DEFAULT_SERVERS), "chatctl's default servers are these nodes"
    metrics = [configs[node_id].metrics_address for node_id in NODE_IDS]
    assert metrics == [f"127.0.0.1:910{node_id}" for node_id in NODE_IDS]
    ignored = (REPO_ROOT / ".gitignore").read_text().split()
    assert "var/" in ignored or "var" in ignored, "runtime state is git-ignored"


# ---- a generated cluster under a real supervisord ----------------------------------------


class Supervised:
    """A supervisord running a three-node cluster, laid out like the repository.

    ``root`` plays the checkout: ``root/supervisord.conf`` is the repository's
    with the interpreter, the program folder and (when the temp path is long)
    the control socket replaced; ``root/ops/nodes/nodeN.conf`` are the
    repository's node configs with free ports; data and logs land in
    ``root/var`` as they would in ``var/``.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "supervisord.conf"
        self.var = root / "var"
        self.addresses: dict[int, str] = {}
        self.seen_pids: set[int] = set()
        self.process: subprocess.Popen[bytes] | None = None
        self.out = self.var / "supervisord.out"  # what supervisord prints
        self._socket_dir: tempfile.TemporaryDirectory[str] | None = None

    # ---- layout -----------------------------------------------------------------------

    def write(self) -> None:
        (self.var / "log").mkdir(parents=True)
        ports = dict(zip(NODE_IDS, free_ports(len(NODE_IDS)), strict=True))
        for node_id in NODE_IDS:
            self._write_node_conf(node_id, ports)
        supervisor = _read_ini(REPO_CONF)
        for section in supervisor.sections():
            if section.startswith("program:"):
                program = supervisor[section]
                _, arguments = program["command"].split(maxsplit=1)
                program["command"] = f"{shlex.quote(sys.executable)} {arguments}"
                program["directory"] = str(REPO_ROOT)  # where `python -m service` runs
        self._shorten_socket(supervisor)
        with self.conf.open("w") as out:
            supervisor.write(out)

    def write_fresh_clone(self) -> None:
        """``root`` as a fresh clone after ``make install``: the repository's tracked
        files, the venv, and whatever ``make install`` makes, nothing else. Only
        the node configs' ports change (and the control socket when the temp path
        is too long for one)."""
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=False
        )
        if listed.returncode != 0:
            pytest.skip("the repository is not a git checkout: no list of its files")
        for name in filter(None, listed.stdout.decode().split("\0")):
            if (REPO_ROOT / name).is_file():  # not deleted in the working tree
                (self.root / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO_ROOT / name, self.root / name)
        assert not self.var.exists(), "a clone holds no var/"
        # The venv this test runs in plays the one `make install` creates; `-o`
        # keeps make from reinstalling into it: what is left is the rest of install.
        (self.root / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
        make = subprocess.run(
            ["make", "install", "-o", ".venv/.installed"],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=CTL_TIMEOUT,
            check=False,
        )
        assert make.returncode == 0, f"make install failed:\n{make.stdout}{make.stderr}"
        ports = dict(zip(NODE_IDS, free_ports(len(NODE_IDS)), strict=True))
        for node_id in NODE_IDS:
            self._write_node_conf(node_id, ports)
        supervisor = _read_ini(self.conf)
        if self._shorten_socket(supervisor):
            with self.conf.open("w") as out:
                supervisor.write(out)

    def _shorten_socket(self, supervisor: configparser.RawConfigParser) -> bool:
        """Move the control socket to a short temp folder if its path is too long."""
        socket = self.var / "supervisor.sock"
        if len(str(socket)) <= MAX_SOCKET_PATH:
            return False
        self._socket_dir = tempfile.TemporaryDirectory(prefix="sv")
        socket = Path(self._socket_dir.name) / "supervisor.sock"
        supervisor["unix_http_server"]["file"] = str(socket)
        supervisor["supervisorctl"]["serverurl"] = f"unix://{socket}"
        return True

    def _write_node_conf(self, node_id: int, ports: dict[int, int]) -> None:
        """The repository's node config, on free ports: relative paths now mean root/var."""
        node = _read_ini(REPO_ROOT / "ops" / "nodes" / f"node{node_id}.conf")
        peers = parse_peers(node["node"]["nodes"])
        assert [peer.node_id for peer in peers] == list(NODE_IDS)
        node["node"]["nodes"] = ",".join(
            f"{p.node_id}={LOOPBACK}:{ports[p.node_id]}" for p in peers
        )
        # Metrics on a free port too (the fixed 910N may belong to a running cluster),
        # one that is none of the nodes' (of n + 1 distinct ports, one is not).
        metrics = next(p for p in free_ports(len(ports) + 1) if p not in ports.values())
        node["node"]["metrics_address"] = f"{LOOPBACK}:{metrics}"
        path = self.root / "ops" / "nodes" / f"node{node_id}.conf"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as out:
            node.write(out)
        self.addresses[node_id] = f"{LOOPBACK}:{ports[node_id]}"

    def log_path(self, node_id: int) -> Path:
        return self.var / "log" / f"node{node_id}.log"

    def db_path(self, node_id: int) -> Path:
        return self.var / f"node{node_id}" / "chat.db"

    @property
    def servers(self) -> list[str]:
        return [self.addresses[node_id] for node_id in NODE_IDS]

    # ---- supervisord ------------------------------------------------------------------

    def start(self) -> None:
        with self.out.open("ab") as out:
            self.process = subprocess.Popen(
                [str(SUPERVISORD), "-n", "-c", str(self.conf)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.root,
            )

    def ctl(self, *args: str) -> str:
        done = subprocess.run(
            [str(SUPERVISORCTL), "-c", str(self.conf), *args],
            capture_output=True,
            text=True,
            timeout=CTL_TIMEOUT,
            check=False,
        )
        return done.stdout.strip()

    def pid(self, node_id: int) -> int | None:
        """The node's pid as supervisord reports it; None while it is not running."""
        self.check_supervisord()
        text = self.ctl("pid", f"{GROUP}:node{node_id}")
        if not text.isdigit() or int(text) == 0:
            return None
        self.seen_pids.add(int(text))
        return int(text)

    def check_supervisord(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise StopWaiting(
                f"supervisord exited with {self.process.returncode}:\n{self.tail('supervisord')}"
            )

    def kill(self, node_id: int) -> int:
        """SIGKILL the node's process (a crash); returns the pid it had."""
        pid = self.pid(node_id)
        assert pid is not None, f"node {node_id} is not running"
        os.kill(pid, signal.SIGKILL)
        return pid

    def wait_restarted(self, node_id: int, old_pid: int) -> int:
        """Wait until supervisord runs the node again under a new pid that answers status."""

        def restarted() -> int | None:
            pid = self.pid(node_id)
            if pid is None or pid == old_pid:
                return None
            return pid if probe_status(self.addresses[node_id]) is not None else None

        return wait_for(restarted, START_TIMEOUT, f"supervisord to restart node {node_id}")

    def shutdown(self) -> None:
        """Stop supervisord and its nodes, whatever state they are in. Never raises."""
        if self.process is not None and self.process.poll() is None:
            try:
                self.ctl("shutdown")
                self.process.wait(timeout=CTL_TIMEOUT + 10)
            except (OSError, subprocess.SubprocessError):
                self.process.terminate()
                try:
                    self.process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        for pid in self.seen_pids:
            self._kill_leftover(pid)
        if self._socket_dir is not None:
            self._socket_dir.cleanup()

    def _kill_leftover(self, pid: int) -> None:
        """SIGKILL ``pid`` if it is still one of this test's node processes."""
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return
        if str(self.root).encode() in command:
            os.kill(pid, signal.SIGKILL)

    def tail(self, name: str, lines: int = 40) -> str:
        path = self.out if name == "supervisord" else self.var / f"{name}"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    # ---- the cluster as the status probe shows it -------------------------------------

    def views(self) -> dict[int, NodeStatus]:
        views: dict[int, NodeStatus] = {}
        for node_id, address in self.addresses.items():
            status = probe_status(address)
            if status is None:
                raise NotYet(f"node {node_id} does not answer status")
            views[node_id] = NodeStatus.from_reply(status)
        return views

    def agreed_primary(self) -> tuple[int, dict[int, NodeStatus]]:
        """The one primary every node names, in one epoch; raises NotYet otherwise."""
        self.check_supervisord()
        views = self.views()
        return agreement.agreed_primary(views), views

    def in_sync(self) -> int:
        """The primary, once every node is at its position, in its sync set and confirmed."""
        primary, views = self.agreed_primary()
        agreement.common_position(views, primary)
        agreement.in_sync(views, primary)
        return primary

    def wait_in_sync(self, timeout: float = FAILOVER_TIMEOUT) -> int:
        return wait_for(self.in_sync, timeout, "one primary and every node in sync")

    def identical(self) -> bool:
        """Every node's replicated tables are identical (G4); the cluster must be idle."""
        self.in_sync()
        sums = []
        for node_id in NODE_IDS:
            storage = Storage(self.db_path(node_id))
            try:
                sums.append(storage.checksums())
            finally:
                storage.close()
        if any(other != sums[0] for other in sums[1:]):
            raise NotYet("the nodes' tables differ")
        return True


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[Supervised]:
    cluster = Supervised(tmp_path)
    cluster.write()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.shutdown()
        # Shown with the failure report: what supervisord and the nodes said.
        for name in ["supervisord", *(f"log/node{i}.log" for i in NODE_IDS)]:
            print(f"---- {name} ----\n{cluster.tail(name)}")


# ---- the messages --------------------------------------------------------------------------


class Chat:
    """alice writes to bob; every acknowledged message is remembered by id and body."""

    def __init__(self, servers: list[str]) -> None:
        self.servers = servers
        self.acked: dict[int, str] = {}

    async def setup(self) -> None:
        async with Client(self.servers, timeout=FAILOVER_TIMEOUT) as client:
            await client.register("alice", PASSWORD)
            await client.register("bob", PASSWORD)

    async def send(self, count: int, label: str) -> None:
        async with Client(self.servers, timeout=FAILOVER_TIMEOUT) as alice:
            await alice.login("alice", PASSWORD)
            for n in range(count):
                body = f"{label} {n}"
                result = await alice.send("bob", body)
                self.acked[int(result["message"]["id"])] = body

    async def check(self) -> None:
        """bob's inbox, read page by page, holds every acknowledged message exactly once."""
        async with Client(self.servers, timeout=FAILOVER_TIMEOUT) as bob:
            await bob.login("bob", PASSWORD)
            seen: list[tuple[int, str]] = []
            before: int | None = None
            while True:
                page = await bob.read(limit=7, before=before)
                seen += [(int(m["id"]), str(m["body"])) for m in page["messages"]]
                if not page["more"]:
                    break
                before = min(message_id for message_id, _ in seen)
        ids = [message_id for message_id, _ in seen]
        assert len(ids) == len(set(ids)), "a message was listed twice"
        assert dict(seen) == self.acked, "bob's inbox is not exactly the acknowledged messages"


def test_supervisord_restarts_killed_nodes_and_no_acknowledged_message_is_lost(
    supervised: Supervised,
) -> None:
    def running(node_id: int) -> int | None:
        pid = supervised.pid(node_id)
        return pid if pid is not None and probe_status(supervised.addresses[node_id]) else None

    for node_id in NODE_IDS:
        wait_for(partial(running, node_id), START_TIMEOUT, f"node {node_id} under supervisord")
    primary = supervised.wait_in_sync(START_TIMEOUT)

    chat = Chat(supervised.servers)
    asyncio.run(chat.setup())
    asyncio.run(chat.send(15, "before any crash"))
    supervised.wait_in_sync()

    # A backup crashes; writes go on without it, and it catches up when restarted.
    backup = next(node_id for node_id in NODE_IDS if node_id != primary)
    old_pid = supervised.kill(backup)
    asyncio.run(chat.send(10, f"while node {backup} was down"))
    supervised.wait_restarted(backup, old_pid)
    assert supervised.wait_in_sync() == primary, "a backup's crash moved the primary"
    asyncio.run(chat.check())

    # The primary crashes; a backup takes over, and the old primary rejoins as a backup.
    old_pid = supervised.kill(primary)
    asyncio.run(chat.send(10, f"after node {primary} crashed"))
    supervised.wait_restarted(primary, old_pid)
    new_primary = supervised.wait_in_sync()
    assert new_primary != primary, "the crashed primary is primary again without a failover"
    asyncio.run(chat.send(5, "after the failover"))
    asyncio.run(chat.check())
    wait_for(supervised.identical, FAILOVER_TIMEOUT, "identical tables on every node")

    for node_id in NODE_IDS:
        log = supervised.log_path(node_id).read_text(errors="replace")
        assert "Traceback" not in log, (
            f"node {node_id}:\n{supervised.tail(f'log/node{node_id}.log')}"
        )


def test_supervisord_starts_the_cluster_of_a_fresh_clone_right_after_make_install(
    tmp_path: Path,
) -> None:
    cluster = Supervised(tmp_path / "clone")
    cluster.root.mkdir()
    cluster.out = tmp_path / "supervisord.out"  # outside the clone: var/ is make's to create
    cluster.write_fresh_clone()
    try:
        cluster.start()  # `supervisord -c supervisord.conf`, in the foreground (-n)
        primary = cluster.wait_in_sync(START_TIMEOUT)
        for node_id in NODE_IDS:
            assert cluster.pid(node_id) is not None, f"node {node_id} is not running"
            mode = cluster.db_path(node_id).parent.stat().st_mode & 0o777
            assert mode == 0o700, f"node {node_id}'s data dir has mode {mode:o}, not 700"
        assert primary in NODE_IDS
    finally:
        cluster.shutdown()
        for name in ["supervisord", *(f"log/node{i}.log" for i in NODE_IDS)]:
            print(f"---- {name} ----\n{cluster.tail(name)}")
