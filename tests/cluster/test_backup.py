"""Backups under load and restores into a new cluster (``ops.backup``, ``ops.restore``).

A backup is taken from the primary of a cluster while writers keep sending.
The source cluster must be unharmed, and the file must carry its position.
Then a new cluster is brought up from the file alone, the restored node
first and the two others with empty data dirs: the others catch up by
snapshot, every message acknowledged before the backup began is there, the
nodes' per-table checksums agree, and the replicated tables are the backup's
(but for the sync set, which now names the new cluster's nodes).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from ops.cluster.history import OK
from service.storage import Storage
from tests.conftest import ClusterFactory
from tests.helpers.cluster import REPO_ROOT
from tests.helpers.workload import (
    Workload,
    finish,
    start_cluster,
    stored_messages,
    view_of,
    wait_settled,
)

TOOL_TIMEOUT = 120.0


def _tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
        check=False,
    )


def _checksums(backup: Path, scratch: Path) -> dict[str, str]:
    """The replicated tables' checksums of a backup file (read from a copy of it)."""
    copy = scratch / "checksums.db"
    shutil.copyfile(backup, copy)
    storage = Storage(copy)
    try:
        return storage.checksums()
    finally:
        storage.close()


def test_a_backup_taken_under_load_brings_up_a_new_cluster(
    cluster_factory: ClusterFactory, tmp_path: Path
) -> None:
    source = cluster_factory()
    start_cluster(source)
    primary = wait_settled(source)
    backup = tmp_path / "backup.db"
    with Workload(source.servers) as load:
        load.wait_progress(40, "before the backup")
        acked_before = {
            r.message_id: r.body
            for r in load.history.of_kind("send", OK)
            if r.message_id is not None
        }
        taken = _tool("ops.backup", "--to", str(backup), "--config", str(primary.config_path))
        assert taken.returncode == 0, taken.stderr
        load.wait_progress(40, "after the backup")  # the writes never stopped
    tag = json.loads(taken.stdout)
    assert json.loads(backup.with_name("backup.db.json").read_text()) == tag
    assert tag["node"] == primary.node_id
    assert backup.stat().st_mode & 0o777 == 0o600, "a backup holds password hashes"
    # Bad input changes nothing: an existing file, a wrong secret.
    content = backup.read_bytes()
    again = _tool("ops.backup", "--to", str(backup), "--config", str(primary.config_path))
    assert again.returncode == 2, again.stderr
    assert backup.read_bytes() == content
    wrong = tmp_path / "wrong.secret"
    wrong.write_text("not the cluster secret\n")
    other = tmp_path / "other.db"
    refused = _tool(
        "ops.backup", "--to", str(other), "--address", primary.address,
        "--secret-file", str(wrong),
    )  # fmt: skip
    assert refused.returncode == 3, refused.stderr
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("other.db")]
    finish(source, load.history)  # the source cluster is unharmed

    restored = cluster_factory()
    first = restored.nodes[1]
    done = _tool("ops.restore", "--from", str(backup), "--config", str(first.config_path))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["position"] == tag["position"]
    assert result["verified"] is True, "checked against the manifest ops.backup wrote"
    restored.start()
    assert wait_settled(restored) is first
    epoch, seq = tag["position"]
    assert view_of(first).position >= (epoch, seq)  # it goes on from there
    restored.wait_identical()
    expected = _checksums(backup, tmp_path)
    for node in restored.nodes.values():
        sums = restored.checksums(node)
        differ = sorted(t for t in expected if t != "cluster" and sums[t] != expected[t])
        assert not differ, f"node {node.node_id} differs from the backup in {differ}"
    for node in (restored.nodes[2], restored.nodes[3]):
        assert "snapshot installed" in node.log_text(), f"node {node.node_id} had no snapshot"
    finish(restored)

    stored = {m.id: m.body for m in stored_messages(first) if not m.deleted}
    missing = sorted(set(acked_before) - set(stored))
    assert not missing, f"{len(missing)} messages acknowledged before the backup are missing"
    assert all(stored[i] == body for i, body in acked_before.items())
