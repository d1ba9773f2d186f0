"""A real node process keeps its files private to its user (``service.datadir``).

* Started with the usual umask 022, a node creates its data dir 0700 and its
  database, WAL, shared-memory file and the cluster secret 0600.
* A data dir open to group or others is refused with one log line that says
  what to run; the node neither exits (no crash loop) nor listens, starts as
  soon as the owner fixes the mode, and SIGTERM ends the wait at once.
* Files of an older deployment that are open to others are tightened at start,
  and each change is logged.
* Rollback files beyond ``rollback_max_files`` are pruned, oldest first, when
  the node starts (and after each rewind: ``tests/cluster/test_catchup.py``).
* Snapshot files a crash left in transit (received, being sent, an earlier
  version's staging copy) are removed when the node starts, and only those.
* A second node process started on a data dir in use waits, naming the pid that
  holds it, without touching anything there, and starts once that one exits.
* A looked-up name outside the charset of names (a Kelvin sign for a ``k``) is
  refused by the node as ``invalid``, not matched to an account.
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.cluster.nodes import PACKAGE_HOME
from ops.cluster.probe import probe_status
from ops.cluster.waiting import wait_for
from service.client import Client
from service.errors import InvalidInput
from tests.conftest import ClusterFactory
from tests.helpers.cluster import Cluster, NodeProcess

pytestmark = pytest.mark.cluster

PASSWORD = "private-files-password"
TIMEOUT = 5.0
REFUSED = "refusing to start: the data dir"


@pytest.fixture(autouse=True)
def permissive_umask() -> Iterator[None]:
    """Nodes inherit the usual umask of a shell, under which files are 0644."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def register(cluster: Cluster, name: str) -> None:
    async def scenario() -> None:
        async with Client(cluster.servers, timeout=TIMEOUT) as client:
            await client.register(name, PASSWORD)

    asyncio.run(scenario())


def wait_refused(node: NodeProcess) -> str:
    """Wait for the refusal line in the node's log; return it."""

    def refusal() -> str | None:
        node.check_alive()
        lines = [line for line in node.log_text().splitlines() if REFUSED in line]
        return lines[0] if lines else None

    return wait_for(refusal, 20.0, f"node {node.node_id} to log that it refuses its data dir")


def test_a_node_creates_its_data_dir_and_files_private(cluster_factory: ClusterFactory) -> None:
    cluster = cluster_factory(n=1)
    cluster.start()
    cluster.wait_for_primary()
    register(cluster, "ann")
    data = cluster[1].data_dir
    files = [data / "chat.db", data / "chat.db-wal", data / "chat.db-shm", cluster.secret_file]
    assert mode(data) == 0o700
    assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}


def test_a_data_dir_open_to_others_is_refused_until_its_owner_fixes_it(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory(n=1)
    node = cluster[1]
    node.data_dir.mkdir(mode=0o750)
    node.data_dir.chmod(0o750)
    node.start(wait=False)
    line = wait_refused(node)
    assert "mode 0750" in line
    assert line.endswith(f"run: chmod 700 {node.data_dir} (checking again until it is)")
    assert node.status() is None, "a node that refused its data dir answers clients"
    assert not (node.data_dir / "chat.db").exists()
    node.data_dir.chmod(0o700)
    node.wait_serving()
    cluster.wait_for_primary()
    log = node.log_text()
    assert log.count(REFUSED) == 1, "the refusal was repeated although nothing changed"
    assert "data dir is private now" in log


def test_sigterm_ends_the_wait_for_a_private_data_dir(cluster_factory: ClusterFactory) -> None:
    cluster = cluster_factory(n=1)
    node = cluster[1]
    node.data_dir.mkdir()
    node.data_dir.chmod(0o755)
    node.start(wait=False)
    wait_refused(node)
    assert node.stop(timeout=5.0) == 0


def test_files_open_to_others_are_tightened_at_start_and_logged(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory(n=1)
    cluster.start()
    cluster.wait_for_primary()
    register(cluster, "ann")
    node = cluster[1]
    node.stop()
    # As a node from before the rules left them, once the owner made the folder private.
    for path in (node.db_path, cluster.secret_file):
        path.chmod(0o644)
    node.start()
    cluster.wait_for_primary()
    assert mode(node.db_path) == 0o600
    assert mode(cluster.secret_file) == 0o600
    log = node.log_text()
    assert f"tightened file mode path={node.db_path} from=0644 to=0600" in log
    assert f"tightened file mode path={cluster.secret_file} from=0644 to=0600" in log


def test_rollback_files_beyond_the_bound_are_pruned_at_start(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory(n=1, rollback_max_files=2)
    node = cluster[1]
    folder = node.data_dir / "rollback"
    folder.mkdir(mode=0o700, parents=True)
    node.data_dir.chmod(0o700)
    names = [f"rewind-{1763730000000 + i}.jsonl" for i in range(4)]
    for name in names:
        (folder / name).write_text('{"epoch": 1, "seq": 1, "changeset": ""}\n')
    cluster.start()
    assert sorted(p.name for p in folder.iterdir()) == names[2:]
    assert f"rollback files pruned files={names[0]},{names[1]}" in node.log_text()


def test_snapshot_copies_a_crash_left_are_removed_at_start(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory(n=3)
    node = cluster[1]
    node.data_dir.mkdir(mode=0o700, parents=True)
    left = [
        "snapshot-in.db",
        "snapshot-in.db-wal",
        "snapshot-out-3.db",
        "snapshot-out-2.db.partial",
        "chat.db.installing",
        "backup-out-1a2b3c4d.db",
        "backup-out-5e6f7a8b.db.partial",
    ]
    kept = ["snapshot-out-9.db", "notes.txt"]  # no copy of this node's: not its to remove
    for name in left + kept:
        (node.data_dir / name).write_bytes(b"x" * 4096)
    node.start()
    wait_for(lambda: node.status() is not None, 20.0, "node 1 to answer status")
    remaining = sorted(p.name for p in node.data_dir.iterdir() if p.name in left + kept)
    assert remaining == sorted(kept)
    log = node.log_text()
    for name in ("snapshot-in.db", "snapshot-out-3.db", "backup-out-1a2b3c4d.db"):
        assert f"snapshot copy left by a crash removed node=1 file={name}" in log


def test_a_second_process_on_a_data_dir_in_use_waits_until_the_first_exits(
    cluster_factory: ClusterFactory, tmp_path: Path
) -> None:
    cluster = cluster_factory(n=1)
    cluster.start()
    cluster.wait_for_primary()
    register(cluster, "ann")
    first = cluster[1]
    assert first.pid is not None
    # What it must not touch: a snapshot the first node would be receiving.
    receiving = first.data_dir / "snapshot-in.db"
    receiving.write_bytes(b"x" * 4096)
    identity_before = (first.data_dir / "identity.json").read_bytes()
    second_log = tmp_path / "second.log"
    with second_log.open("ab") as out:
        second = subprocess.Popen(
            [sys.executable, "-m", "service", "--config", str(first.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=PACKAGE_HOME,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **first.env},
        )
    try:
        said = f"another node process (pid {first.pid}) uses the data dir"
        wait_for(lambda: said in second_log.read_text(), TIMEOUT, f"the second to log {said!r}")
        assert second.poll() is None, "the second process exited instead of waiting"
        assert receiving.exists(), "the second process removed the first's snapshot in transit"
        assert (first.data_dir / "identity.json").read_bytes() == identity_before
        assert first.status() is not None
        first.stop()
        # The second now holds the data dir: it serves the same database.
        wait_for(
            lambda: probe_status(first.address, 1.0),
            20.0,
            "the second process to serve node 1's address",
        )
        assert not receiving.exists(), "the second did not clean up once it was alone"
        assert "data dir is free now" in second_log.read_text()
        assert second_log.read_text().count(said) == 1, "the refusal was repeated"
    finally:
        second.terminate()
        returncode = second.wait(10.0)
    assert returncode == 0, f"the second process exited with {returncode}"


def test_the_node_refuses_a_lookalike_name_as_invalid(cluster_factory: ClusterFactory) -> None:
    cluster = cluster_factory(n=1)
    cluster.start()
    cluster.wait_for_primary()
    register(cluster, "kate")

    async def scenario() -> None:
        async with Client(cluster.servers, timeout=TIMEOUT) as client:
            with pytest.raises(InvalidInput, match="not a user name"):
                await client.login("\u212aate", PASSWORD)
            assert (await client.login("KATE", PASSWORD))["user"] == "kate"
            with pytest.raises(InvalidInput, match="'to' is not a user name"):
                await client.send("\u212aate", "hello")

    asyncio.run(scenario())


def test_a_database_that_cannot_be_opened_is_retried_with_backoff_not_a_crash_loop(
    cluster_factory: ClusterFactory,
) -> None:
    """``chat.db`` is a folder (as unopenable as a file on a read-only mount or
    with a wrong owner, which root would open anyway): one log line, the process
    waits instead of exiting, and it starts by itself once the path is fixed."""
    cluster = cluster_factory(n=1)
    node = cluster[1]
    node.data_dir.mkdir(mode=0o700)
    blocker = node.data_dir / "chat.db"
    blocker.mkdir()
    node.start(wait=False)
    what = "cannot open the database"
    wait_for(lambda: what in node.log_text(), TIMEOUT, f"node 1 to log {what!r}")
    assert node.is_running, "the node exited on an unopenable database"
    assert node.status() is None
    blocker.rmdir()
    node.wait_serving()
    cluster.wait_for_primary()
    log = node.log_text()
    assert log.count(what) == 1, "the same reason was logged again"
    assert "opened the database" in log


def test_a_taken_address_is_retried_with_backoff_not_a_crash_loop(
    cluster_factory: ClusterFactory,
) -> None:
    """An old process still holds the node's port: one log line, no traceback, no
    exit; the node listens as soon as the port is free."""
    import socket

    cluster = cluster_factory(n=1)
    node = cluster[1]
    host, port = node.address.rsplit(":", 1)
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind((host, int(port)))
    holder.listen()
    try:
        node.start(wait=False)
        what = "cannot listen address="
        wait_for(lambda: what in node.log_text(), TIMEOUT, f"node 1 to log {what!r}")
        assert node.is_running, "the node exited on a taken address"
    finally:
        holder.close()
    node.wait_serving()
    cluster.wait_for_primary()
    log = node.log_text()
    assert log.count(what) == 1, "the same reason was logged again"
    assert "Traceback" not in log
