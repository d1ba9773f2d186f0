"""Coming back behind or beside the primary: rewind, snapshot, tombstones (SPEC R4, G3).

* An old primary that committed a write locally that never reached anyone
  else is rewound when it rejoins (its removed records kept in a rollback
  file), and the write, retried by its client with the same request id, is
  stored once.
* The same with the write already on its way to the frozen backups: they
  apply it when thawed, so nothing needs rewinding, and it is still stored once.
* A backup down past the log retention catches up from a snapshot.
* Messages deleted while a node is down stay deleted once it catches up.
"""

from __future__ import annotations

import asyncio
import stat
import subprocess
import sys
import threading
from typing import Any

import pytest

from ops.cluster.history import OK, History, Op
from ops.cluster.waiting import wait_for
from service.client import Client
from service.status import NodeStatus
from tests.conftest import ClusterFactory
from tests.helpers.cluster import REPO_ROOT, Cluster, NodeProcess
from tests.helpers.workload import (
    Sender,
    Workload,
    check_messages,
    finish,
    first_log_seq,
    new_user,
    read_inbox,
    run,
    send_large,
    send_recorded,
    start_cluster,
    stopped_storage,
    stored_messages,
    view_of,
    wait_committed,
    wait_logged,
    wait_settled,
    wait_view,
    waiting_for,
)

pytestmark = pytest.mark.cluster

# Room for the test to act while the backups are frozen: the primary drops them
# (and would acknowledge alone) only after sync_timeout, and a backup frozen for
# less than clock_gap does not count as frozen, so it stays confirmed (R5).
SLOW_TO_SHRINK = {"sync_timeout": 5.0, "clock_gap": 2.0}


class BackgroundSend:
    """One ``send`` run to completion in a thread, retried by the client as it sees fit."""

    def __init__(self, cluster: Cluster, token: str, body: str, history: History) -> None:
        self.record: Op | None = None

        async def send() -> None:
            async with Client(cluster.servers, timeout=45.0, token=token) as client:
                self.record = await send_recorded(client, "alice", "alice", body, history)

        self._thread = threading.Thread(target=asyncio.run, args=(send(),), daemon=True)
        self._thread.start()

    def running(self) -> bool:
        return self._thread.is_alive()

    def result(self, timeout: float = 60.0) -> Op:
        self._thread.join(timeout)
        assert self.record is not None, "the send never returned"
        return self.record


def test_old_primary_with_an_unreplicated_write_is_rewound(
    cluster_factory: ClusterFactory,
) -> None:
    """The primary commits a write no backup ever receives, then crashes (R4, G3).

    The backups are frozen while the primary commits (so nothing is
    acknowledged), then crash too, which discards the records waiting in
    their sockets: the write exists on the old primary only. Restarted, the
    backups cannot prove they are current (R6) and wait for it (G5), until an
    operator forces a promotion. The client's retry, with the same request
    id, is then applied by the new primary; the old primary, back, must
    rewind its own copy rather than keep it beside the new one (and count it in
    its metrics).
    """
    cluster = cluster_factory(metrics=True, **SLOW_TO_SHRINK)
    start_cluster(cluster)
    old = wait_settled(cluster)
    promoted, other = (n for n in cluster.nodes.values() if n is not old)
    token = run(new_user(cluster.servers, "alice"))
    history = History()
    seq = view_of(old).seq
    for node in (promoted, other):
        node.freeze()
    send = BackgroundSend(cluster, token, "orphan", history)
    wait_committed(old, seq, "the write committed on the primary alone")
    assert send.running(), "a write was acknowledged while every backup was frozen"
    old.kill()
    for node in (promoted, other):
        node.kill()
    cluster.start([promoted.node_id, other.node_id])

    def waits_for_old(view: NodeStatus) -> bool:
        return view.role != "primary" and old.node_id in waiting_for(view)

    for node in (promoted, other):
        wait_view(node, waits_for_old, f"waiting for node {old.node_id} (G5)")
    force_promotion(promoted)
    assert cluster.wait_for_primary() is promoted
    record = send.result()
    assert record.outcome == OK, record
    old.start()
    wait_settled(cluster)
    wait_logged(old, f"rewind node={old.node_id}")
    rollback = list((old.data_dir / "rollback").iterdir())
    assert rollback, "no rollback file for the rewound records"
    assert all(path.stat().st_size > 0 for path in rollback), rollback
    assert all(stat.S_IMODE(path.stat().st_mode) == 0o600 for path in rollback), rollback
    seen = old.metrics()
    assert seen is not None
    assert seen.value("chat_rewinds_total") == 1
    assert seen.value("chat_rewound_records_total") >= 1
    finish(cluster, history)


def force_promotion(node: NodeProcess) -> None:
    """``python -m ops.promote`` as an operator runs it."""
    done = promote(node)
    assert done.returncode == 0, f"promote failed: {done.stdout}{done.stderr}"


def test_a_forced_promotion_of_a_node_behind_another_is_refused(
    cluster_factory: ClusterFactory,
) -> None:
    """The cluster waits for its last member (G5) and the operator promotes one of
    the others. Node 2 missed writes that nodes 1 and 3 acknowledged: forced, its
    election takes every vote whatever the positions, and node 3 would be rewound
    to its history, those writes with it. ``ops.promote`` refuses and names node 3;
    promoting node 3 keeps them."""
    cluster = cluster_factory()
    assert start_cluster(cluster) is cluster[1]
    sender = Sender(cluster)
    sender.acked(2)
    cluster[2].stop()
    wait_view(cluster[1], lambda v: v.members == (1, 3), "node 2 dropped from the sync set")
    sender.acked(3)  # on nodes 1 and 3 only
    cluster[3].stop()
    wait_view(cluster[1], lambda v: v.members == (1,), "node 3 dropped from the sync set")
    cluster[1].stop()
    cluster.start([2, 3])
    for node in (cluster[2], cluster[3]):
        wait_view(node, lambda v: 1 in waiting_for(v), "waiting for node 1 (G5)")
    behind, ahead = view_of(cluster[2]).position, view_of(cluster[3]).position
    assert behind < ahead
    refused = promote(cluster[2])
    assert refused.returncode == 1, refused.stderr
    assert f"node 3 holds a newer position {list(ahead)} than node 2" in refused.stderr
    assert not view_of(cluster[2]).is_primary
    force_promotion(cluster[3])
    assert cluster.wait_for_primary() is cluster[3]
    cluster[1].start()
    finish(cluster, sender.history)  # every acknowledged send, on every node


def promote(node: NodeProcess) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "ops.promote", str(node.node_id)]
    command += ["--config", str(node.config_path), "--yes"]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)


def test_write_in_flight_to_frozen_backups_survives_the_primary_crash(
    cluster_factory: ClusterFactory,
) -> None:
    """The primary streams a record before it commits it: frozen backups still get it.

    The backups thaw in time to be confirmed (R5) and elect one of themselves;
    the client's retry is answered from the stored result: one message.
    """
    cluster = cluster_factory(**SLOW_TO_SHRINK)
    start_cluster(cluster)
    old = wait_settled(cluster)
    backups = [n for n in cluster.nodes.values() if n is not old]
    token = run(new_user(cluster.servers, "alice"))
    history = History()
    seq = view_of(old).seq
    for node in backups:
        node.freeze()
    send = BackgroundSend(cluster, token, "in flight", history)
    wait_committed(old, seq, "the write committed on the primary alone")
    assert send.running(), "a write was acknowledged while every backup was frozen"
    old.kill()
    for node in backups:
        node.thaw()
    assert cluster.wait_for_primary() in backups
    assert send.result().outcome == OK
    old.start()
    finish(cluster, history)


def test_backup_down_past_the_log_retention_catches_up_from_a_snapshot(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory(log_retention=20, metrics=True)
    start_cluster(cluster)
    primary = wait_settled(cluster)
    backup = next(n for n in cluster.nodes.values() if n is not primary)
    with Workload(cluster.servers) as load:
        load.wait_progress(20, "with every node up")
        backup.kill()
        with stopped_storage(backup) as storage:
            behind = storage.position().seq
        load.wait_progress(120, "with the backup down")

        def pruned_past_it() -> bool:
            first = first_log_seq(primary)
            return first is not None and first > behind + 1

        # The primary prunes its log every few seconds.
        wait_for(pruned_past_it, 20.0, f"the primary's log to start after seq {behind + 1}")
        backup.start()
        wait_logged(backup, "snapshot installed")
        assert wait_settled(cluster) is primary
        installed = backup.metrics()
        assert installed is not None
        assert installed.value("chat_snapshots_installed_total") == 1

        def sent() -> bool:
            seen = primary.metrics()
            return seen is not None and seen.value("chat_snapshots_sent_total") >= 1

        wait_for(sent, 10.0, "the primary to count the snapshot it sent")
        load.wait_progress(20, "with the backup back")
    finish(cluster, load.history)


def test_a_large_catch_up_does_not_stall_the_primary(cluster_factory: ClusterFactory) -> None:
    """A backup that missed tens of MiB of the largest messages catches up from the
    log, then, down past the log's bound in bytes, from a snapshot, and the primary
    goes on sending heartbeats throughout. The catch-up once read and sent the
    whole log in one step of the primary's event loop (1.5 to 1.8 s here), and the
    snapshot's copy was made and checked on the loop: the backup in the sync set
    took the primary for dead, an election for a backup's catch-up."""
    cluster = cluster_factory(heartbeat_interval=0.05, suspect_timeout=0.3)
    primary = start_cluster(cluster)
    token = run(new_user(cluster.servers, "alice"))
    epoch = view_of(primary).epoch
    behind = cluster[3] if primary is not cluster[3] else cluster[2]

    behind.stop()
    run(send_large(cluster.servers, token, 6_000))  # about 24 MiB: the log keeps it
    behind.start()
    cluster.wait_in_sync()
    assert "snapshot=false" in primary.log_text().split("catch-up start")[-1].split("\n")[0]

    behind.stop()
    with stopped_storage(behind) as storage:
        position = storage.position().seq
    run(send_large(cluster.servers, token, 10_000))  # about 40 MiB: past the 32 MiB bound

    def pruned_past_it() -> bool:
        first = first_log_seq(primary)
        return first is not None and first > position + 1

    wait_for(pruned_past_it, 20.0, f"the primary's log to start after seq {position + 1}")
    behind.start()
    wait_logged(behind, "snapshot installed", timeout=60.0)
    for node in cluster.nodes.values():
        view = view_of(node)
        assert view.epoch == epoch, f"an election during the catch-ups: {view}"
    assert view_of(primary).is_primary
    finish(cluster)


def test_messages_deleted_while_a_node_is_down_stay_deleted(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory()
    start_cluster(cluster)
    primary = wait_settled(cluster)
    absent = next(n for n in cluster.nodes.values() if n is not primary)
    history = History()
    alice, bob = run(conversation(cluster, history))
    ids = [r.message_id for r in history.ops]
    absent.kill()
    run(delete(cluster, alice, ids[:2]))  # the sender deletes two
    run(delete(cluster, bob, ids[2:3]))  # the recipient deletes one
    absent.start()
    wait_settled(cluster)
    # Leave the caught-up node alone as the primary: it must serve the deletions too.
    for node in cluster.nodes.values():
        if node is not absent:
            node.kill()
    assert cluster.wait_for_primary() is absent
    inbox = run(inbox_with(cluster, bob))
    assert [m["id"] for m in inbox] == ids[3:]
    cluster.start()
    finish(cluster)
    deleted = set(ids[:3])
    for message in stored_messages(absent):
        assert message.deleted == (message.id in deleted), message
        if message.deleted:
            assert message.body == "", f"a tombstone keeps its body: {message}"
    kept = [r for r in history.ops if r.message_id not in deleted]
    check_messages(cluster, _history_of(kept))


async def conversation(cluster: Cluster, history: History) -> tuple[str, str]:
    """alice and bob registered and logged in; alice sent bob five messages."""
    tokens = [await new_user(cluster.servers, user) for user in ("alice", "bob")]
    async with Client(cluster.servers, token=tokens[0]) as client:
        for n in range(5):
            record = await send_recorded(client, "alice", "bob", f"note {n}", history)
            assert record.outcome == OK, record
    return tokens[0], tokens[1]


async def delete(cluster: Cluster, token: str, ids: list[int | None]) -> None:
    async with Client(cluster.servers, token=token) as client:
        result = await client.delete_messages([i for i in ids if i is not None])
    assert result["deleted"] == ids


async def inbox_with(cluster: Cluster, token: str) -> list[dict[str, Any]]:
    async with Client(cluster.servers, token=token) as client:
        return await read_inbox(client)


def _history_of(records: list[Op]) -> History:
    history = History()
    for record in records:
        history.ops.append(record)
    return history
