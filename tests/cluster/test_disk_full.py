"""A full or failing disk (SPEC §6 fault model; the hardening of storage faults).

A disk that refuses writes is never a divergence: nothing is rewound, nothing is
lost, and the node neither exits nor spins. Each scenario injects the fault with
the fault VFS (``service/diskfaults.py``) into a running node and checks what an
operator sees (status, the log) and what a user gets:

* a backup's disk fills: it stops applying and says so, the primary drops it
  from the sync set and goes on acknowledging with the others; when space
  returns it joins again and catches up by itself;
* the disk of a primary alone in its sync set fills: writes are refused with a
  retriable ``storage_fault``, reads are served, and writes resume by themselves;
* the disk of a primary with backups fills: it steps aside, a backup takes over,
  and the old primary comes back as a backup once its disk recovers;
* a node started on a full disk starts, reports the fault, and recovers.

Nothing is acknowledged and lost (``finish`` checks every scenario's history).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ops.cluster.waiting import wait_for
from service import errors
from service.client import Client
from service.diskfaults import Plan, write_control
from service.status import NodeStatus
from tests.conftest import ClusterFactory
from tests.helpers.cluster import Cluster, NodeProcess
from tests.helpers.workload import (
    Sender,
    assert_stays,
    finish,
    run,
    start_cluster,
    wait_logged,
    wait_settled,
    wait_view,
    with_faults,
)

pytestmark = pytest.mark.cluster

FULL = Plan("full")
OFF = Plan("off")


def settled_with_faults(
    cluster_factory: ClusterFactory, faulty: int, timeout: float = 3.0
) -> tuple[Cluster, NodeProcess, Path, Sender]:
    """A settled 3-node cluster (node 1 primary) whose node ``faulty`` runs on the
    fault VFS; returns it, that node, its control file and a sender."""
    cluster = cluster_factory()
    node = cluster[faulty]
    control = with_faults(cluster, node)
    start_cluster(cluster)
    assert wait_settled(cluster) is cluster[1]
    return cluster, node, control, Sender(cluster, timeout=timeout)


def cannot_write(view: NodeStatus) -> bool:
    return "cannot write" in str(view.reason or "")


def fill_disk(control: Path, node: NodeProcess, sender: Sender) -> None:
    """Make the node's disk full, and write until it has noticed (the fault VFS
    reads its control file when SQLite next touches a file, so a write or two may
    still land)."""
    write_control(control, FULL)

    def noticed() -> bool:
        sender.send()
        view = node.view()
        return view is not None and cannot_write(view)

    wait_for(noticed, 20.0, f"node {node.node_id} to say it cannot write")


def joins_logged(node: NodeProcess) -> int:
    return node.log_text().count("became backup") + node.log_text().count(" rejoin ")


def test_a_backup_whose_disk_fills_is_dropped_and_catches_up_when_space_returns(
    cluster_factory: ClusterFactory,
) -> None:
    cluster, backup, control, sender = settled_with_faults(cluster_factory, 3)
    sender.acked(3)
    fill_disk(control, backup, sender)
    wait_view(cluster[1], lambda v: v.members == (1, 2), "the primary dropping node 3")
    sender.acked(10)
    joins = joins_logged(backup)

    def spinning() -> str | None:
        if not backup.is_running:
            return "node 3 exited"
        if joins_logged(backup) > joins + 2:
            return f"node 3 keeps rejoining: {joins_logged(backup) - joins} times"
        return None

    assert_stays(spinning, 2.0, "with node 3's disk full")
    assert backup.starts == 1
    write_control(control, OFF)
    wait_view(cluster[1], lambda v: v.members == (1, 2, 3), "node 3 back in the sync set")
    assert "storage recovered" in backup.log_text()
    assert " rewind " not in backup.log_text()
    finish(cluster, sender.history)


def test_a_primary_alone_with_a_full_disk_refuses_writes_serves_reads_and_resumes(
    cluster_factory: ClusterFactory,
) -> None:
    cluster, primary, control, sender = settled_with_faults(cluster_factory, 1, timeout=1.5)
    sender.acked(2)
    cluster[2].kill()
    cluster[3].kill()
    wait_view(primary, lambda v: v.members == (1,), "the sync set shrunk to node 1")
    sender.acked(2)
    fill_disk(control, primary, sender)
    wait_view(primary, lambda v: v.role == "primary", "node 1 still primary, read-only")

    async def refused_then_read() -> tuple[str, int]:
        async with Client([primary.address], timeout=1.0, token=sender.token) as client:
            try:
                await client.send("alice", "refused")
            except errors.StorageFault as exc:
                refusal = exc.code
            except errors.Unavailable as exc:  # the client's last word after retries
                refusal = "storage_fault" if "cannot write" in str(exc) else str(exc)
            else:
                refusal = "accepted"
            page = await client.read(limit=100)
        return refusal, len(page["messages"])

    refusal, shown = run(refused_then_read())
    assert refusal == "storage_fault"
    assert shown >= 4
    assert primary.is_running
    assert primary.starts == 1
    # A backup comes back and catches up (reads only); the sync set grow it earns is
    # a write the disk refuses: it waits for the disk, the primary does not spin.
    cluster[2].start()
    wait_logged(primary, "catch-up end node=1 backup=2")
    pid = primary.pid
    assert pid is not None
    used = cpu_seconds(pid)
    assert_stays(lambda: busy(pid, used, 2.0), 2.0, "node 1 retrying a refused write in a loop")
    write_control(control, OFF)
    wait_view(primary, lambda v: not cannot_write(v), "the primary writing again")
    wait_view(primary, lambda v: v.members == (1, 2), "node 2 back in the sync set")
    sender.acked(3)
    cluster.start()
    finish(cluster, sender.history)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def busy(pid: int, since: float, seconds: float) -> str | None:
    """A breach once the process has used more than half of ``seconds`` of CPU since
    ``since``: an idle read-only primary uses a few percent, a spinning one all."""
    used = cpu_seconds(pid) - since
    return f"it used {used:.2f} s of CPU" if used > seconds / 2 else None


def test_a_primary_whose_disk_fills_steps_aside_for_a_backup(
    cluster_factory: ClusterFactory,
) -> None:
    cluster, old, control, sender = settled_with_faults(cluster_factory, 1)
    sender.acked(3)
    fill_disk(control, old, sender)
    new = cluster.wait_for_primary()
    assert new is not old
    sender.acked(5)
    assert old.is_running
    write_control(control, OFF)
    wait_view(old, lambda v: v.role == "backup" and not cannot_write(v), "node 1 a backup again")
    finish(cluster, sender.history)


def test_a_node_started_on_a_full_disk_reports_it_and_recovers(
    cluster_factory: ClusterFactory,
) -> None:
    cluster, node, control, sender = settled_with_faults(cluster_factory, 3)
    sender.acked(3)
    node.kill()
    sender.acked(3)
    write_control(control, FULL)
    node.start()
    wait_view(node, cannot_write, "node 3 saying it cannot write")
    assert node.is_running
    write_control(control, OFF)
    wait_view(cluster[1], lambda v: v.members == (1, 2, 3), "node 3 back in the sync set")
    finish(cluster, sender.history)
