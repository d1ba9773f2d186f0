"""Snapshots on disks without room for them (the fault model's full disk, SPEC §6).

A snapshot copies the whole database twice: the primary makes a copy to send
(SQLite's online backup), and the backup stages and installs what it received.
On a disk with room for the database and its WAL but not for another copy,
that copy failed part-way, and each side gave up and started over: the primary,
short of room, dropped the link, the backup joined again at once, and the
primary copied again, about twenty times a second, each copy filling its disk
for a moment (its own commits then failing) and its log filling with the
retries; a backup short of room made the primary copy and send the whole
database again every few hundred milliseconds. Now each side checks the room
before it copies, says what it needs (the primary's status ``snapshot_waits``
and ``chat_snapshots_waiting``; the backup's storage fault), and waits, polling
the free space, until an operator makes room; then the snapshot goes through
by itself.

Each node's data dir is a real tmpfs of its own (``tests/helpers/disks.py``),
resized in place the way an operator frees or adds space. Mounting needs root:
CI has it; elsewhere these tests skip, saying why.
"""

from __future__ import annotations

import pytest

from ops.cluster.waiting import wait_for
from service.client import Client
from service.storage import COPY_SPARE_BYTES
from tests.conftest import ClusterFactory
from tests.helpers.cluster import Cluster, NodeProcess
from tests.helpers.disks import MIB, SmallDisk
from tests.helpers.workload import (
    assert_stays,
    finish,
    first_log_seq,
    new_user,
    run,
    send_large,
    start_cluster,
    view_of,
    wait_logged,
    wait_view,
    wait_whole_sync_set,
)

pytestmark = pytest.mark.cluster

# Messages of the largest body (about 4 KiB each): ~8 MiB, far past the log's bound.
LOADED = 2_000
DISK = 256 * MIB


def loaded_with_a_wiped_backup(
    cluster_factory: ClusterFactory, small_disks: list[SmallDisk]
) -> tuple[Cluster, NodeProcess, NodeProcess, dict[int, SmallDisk]]:
    """A settled cluster on small disks, one backup stopped and its data dir wiped
    while the others took ``LOADED`` messages and pruned their log past where it
    began: started again, it needs a snapshot. Returns the cluster, the primary,
    that backup (stopped) and each node's disk."""
    cluster = cluster_factory(metrics=True, log_retention_bytes=MIB)
    disks = {}
    for node in cluster.nodes.values():
        disks[node.node_id] = SmallDisk(node.data_dir, DISK)
        small_disks.append(disks[node.node_id])
    primary = start_cluster(cluster)
    wait_whole_sync_set(cluster)
    token = run(new_user(cluster.servers, "alice"))
    behind = next(n for n in cluster.nodes.values() if n is not primary)
    behind.stop()
    disks[behind.node_id].wipe()
    run(send_large(cluster.servers, token, LOADED))
    wait_for(
        lambda: (first_log_seq(primary) or 0) > 1,
        20.0,
        "the primary to prune its log past its first record",
    )
    return cluster, primary, behind, disks


def database_bytes(node: NodeProcess) -> int:
    """The size of a copy of the node's database (every page)."""
    return int(node.query("PRAGMA page_count")) * int(node.query("PRAGMA page_size"))


def send_one(cluster: Cluster) -> None:
    async def send() -> None:
        token = await new_user(cluster.servers, "bob")
        async with Client(cluster.servers, token=token) as client:
            await client.send("alice", "the primary still takes writes")

    run(send())


def test_a_snapshot_the_primary_has_no_room_for_waits_and_goes_through_once_there_is(
    cluster_factory: ClusterFactory, small_disks: list[SmallDisk]
) -> None:
    cluster, primary, behind, disks = loaded_with_a_wiped_backup(cluster_factory, small_disks)
    size = database_bytes(primary)
    disks[primary.node_id].leave_free(size)  # room for the copy, not for its spare too
    epoch = view_of(primary).epoch
    behind.start()

    view = wait_view(
        primary,
        lambda v: behind.node_id in v.snapshot_waits,
        f"the primary to say that node {behind.node_id}'s snapshot waits",
    )
    assert "no room for a copy of the database" in view.snapshot_waits[behind.node_id]
    scrape = primary.metrics()
    assert scrape is not None
    assert scrape.value("chat_snapshots_waiting") == 1
    assert scrape.value("chat_data_dir_free_bytes") < size + MIB
    assert scrape.value("chat_database_bytes") >= size

    # It waits: no copy left on the disk, no retries in the log, the primary leads on.
    mark = primary.log_size()
    send_one(cluster)

    def spinning() -> str | None:
        seen = view_of(primary)
        if not seen.is_primary or seen.epoch != epoch:
            return f"the primary stepped aside: {seen}"
        copies = sorted(p.name for p in primary.data_dir.glob("snapshot-out-*"))
        if copies:
            return f"a copy of the database left on the full disk: {copies}"
        retries = [
            line
            for line in primary.log_text(mark).splitlines()
            if "snapshot waits" in line or "stream to backup failed" in line
        ]
        return f"the primary tried again and again: {retries[:3]}" if retries else None

    assert_stays(spinning, 3.0, "the primary waiting for room")
    assert primary.log_text().count("snapshot waits") == 1

    disks[primary.node_id].leave_free(3 * size + 64 * MIB)
    wait_logged(behind, "snapshot installed")
    wait_whole_sync_set(cluster)
    assert view_of(primary).snapshot_waits == {}
    finish(cluster)


def test_a_backup_without_room_for_a_snapshot_says_so_and_waits_for_room(
    cluster_factory: ClusterFactory, small_disks: list[SmallDisk]
) -> None:
    cluster, primary, behind, disks = loaded_with_a_wiped_backup(cluster_factory, small_disks)
    size = database_bytes(primary)
    # It needs twice the snapshot at the peak (the file and the WAL), and a spare.
    disks[behind.node_id].leave_free(2 * size)
    behind.start()

    wait_view(
        behind,
        lambda v: "cannot install the snapshot: no room" in (v.reason or ""),
        "the backup to say it has no room for the snapshot",
    )
    scrape = behind.metrics()
    assert scrape is not None
    assert scrape.value("chat_storage_fault") == 1
    mark = primary.log_size()

    def sent_again() -> str | None:
        starts = primary.log_text(mark).count("snapshot start")
        return f"the primary sent the snapshot {starts} more times" if starts else None

    assert_stays(sent_again, 3.0, "the backup waiting for room without asking again")

    # Room for twice the snapshot and the spare, and half a snapshot more: not for
    # the staging copy an install used to make as well (three times the snapshot).
    disks[behind.node_id].leave_free(2 * size + COPY_SPARE_BYTES + size // 2)
    wait_logged(behind, "snapshot installed")
    wait_whole_sync_set(cluster)
    # The install's WAL was given back: the node holds about one database, not two.
    assert disks[behind.node_id].used < 1.5 * size + 16 * MIB
    finish(cluster)
