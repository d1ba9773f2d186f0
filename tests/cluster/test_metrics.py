"""Metrics of real node processes, scraped over HTTP as Prometheus would.

* A settled three-node cluster: the primary says so (role, one election won,
  a sync set of three, the lag of each backup, checksums compared and agreed),
  the backups name it; a write moves the seq, the write and batch counters and
  the fsync and acknowledgement histograms, and the backups' applied records.
* A backup's disk fills (the fault VFS, ``service/diskfaults.py``):
  ``chat_storage_fault`` goes to 1 on it and the primary shows it out of the
  sync set; space returns and both go back.
* The metrics port is taken when a node starts: the node serves chat all the
  same, says so in one log line, and serves metrics once the port is free.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

from ops.cluster.scrape import Scrape
from ops.cluster.waiting import wait_for
from service.client import Client
from service.diskfaults import ENV_VAR, Plan, write_control
from tests.conftest import ClusterFactory
from tests.helpers.cluster import Cluster, NodeProcess
from tests.helpers.workload import (
    finish,
    new_user,
    read_inbox,
    run,
    start_cluster,
    wait_logged,
    wait_settled,
)

WAIT = 20.0


def wait_metrics(node: NodeProcess, check: Callable[[Scrape], object], what: str) -> Scrape:
    """Scrape ``node`` until ``check`` holds for the scrape; return that scrape."""
    last: list[Scrape | None] = [None]

    def holds() -> Scrape | None:
        seen = node.metrics()
        last[0] = seen
        return seen if seen is not None and check(seen) else None

    try:
        return wait_for(holds, WAIT, f"node {node.node_id} metrics: {what}")
    except TimeoutError as exc:
        shown = (
            None
            if last[0] is None
            else sorted(
                f"{s.name}{s.labels or ''}={s.value}" for s in last[0].samples if "chat_" in s.name
            )
        )
        raise TimeoutError(f"{exc}; last chat_ samples: {shown}") from exc


def send_notes(cluster: Cluster, token: str, count: int, then_read: bool = False) -> None:
    async def send() -> None:
        async with Client(cluster.servers, token=token) as client:
            for number in range(count):
                await client.send("alice", f"note {number}")
            if then_read:
                assert len(await read_inbox(client)) == count

    run(send())


def test_a_settled_cluster_reports_roles_sync_set_lag_and_write_path_metrics(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory(metrics=True, verify_interval=0.5)
    start_cluster(cluster)
    primary = wait_settled(cluster)
    backups = [node for node in cluster.nodes.values() if node is not primary]
    peers = {str(node.node_id) for node in backups}

    def settled(seen: Scrape) -> bool:
        return (
            seen.value("chat_role", role="primary") == 1
            and seen.value("chat_sync_set_size") == 3
            and seen.value("chat_in_sync_size") == 3
            and set(seen.by_label("chat_backup_lag_records", "backup")) == peers
        )

    before = wait_metrics(primary, settled, "primary with a sync set of three, lag per backup")
    assert before.value("chat_state_available") == 1
    assert before.value("chat_elections_won_total") == 1
    assert before.value("chat_primary_id") == primary.node_id
    assert before.by_label("chat_sync_set_member", "node") == {"1": 1, "2": 1, "3": 1}
    assert before.by_label("chat_peer_link_up", "peer") == dict.fromkeys(peers, 1)
    for backup in backups:
        seen = wait_metrics(backup, lambda s: s.value("chat_role", role="backup") == 1, "backup")
        assert seen.value("chat_primary_id") == primary.node_id
        assert seen.value("chat_sync_set_size") == 3
        assert seen.value("chat_confirmed") == 1
        assert seen.get("chat_backup_lag_records") is None, "lag is the primary's to tell"

    token = run(new_user(cluster.servers, "alice"))
    send_notes(cluster, token, 5, then_read=True)
    written = before.value("chat_client_writes_total")

    def wrote(seen: Scrape) -> bool:
        return (
            seen.value("chat_seq") > before.value("chat_seq")
            and seen.value("chat_durable_seq") == seen.value("chat_seq")
            # register, login, 5 sends, and the read marking what it showed as read
            and seen.value("chat_client_writes_total") >= written + 8
            and seen.value("chat_batch_writes_count") > before.value("chat_batch_writes_count")
            and seen.value("chat_ack_latency_seconds_count") >= seen.value("chat_batches_total")
            and seen.value("chat_fsync_seconds_count") > before.value("chat_fsync_seconds_count")
        )

    after = wait_metrics(primary, wrote, "the seq and the write path counters moved")
    assert after.value("chat_client_reads_total") >= 1
    assert after.value("chat_storage_fault") == 0
    assert after.value("chat_database_unproven") == 0
    for backup in backups:
        wait_metrics(
            backup,
            lambda s: (
                s.value("chat_applied_records_count") > 0
                and s.value("chat_seq") >= after.value("chat_seq")
            ),
            "the records applied",
        )
    agreed = wait_metrics(
        primary,
        lambda s: s.get("chat_checksums_agreed") == 1,
        "a cross-node checksum comparison that agreed",
    )
    assert agreed.value("chat_checksum_rounds_total") >= 1
    assert agreed.value("chat_checksum_mismatches_total") == 0
    assert agreed.value("chat_checksums_damaged_nodes") == 0
    finish(cluster)


def test_a_backups_full_disk_shows_as_a_storage_fault_until_space_returns(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory(metrics=True)
    backup = cluster[3]
    control = cluster.root / "node3-disk-faults.json"
    write_control(control, Plan("off"))
    backup.env[ENV_VAR] = str(control)
    start_cluster(cluster)
    primary = wait_settled(cluster)
    assert primary is not backup
    healthy = wait_metrics(backup, lambda s: s.value("chat_role", role="backup") == 1, "a backup")
    assert healthy.value("chat_storage_fault") == 0
    assert healthy.value("chat_storage_faults_total") == 0
    token = run(new_user(cluster.servers, "alice"))

    write_control(control, Plan("full"))

    def faulted(seen: Scrape) -> bool:
        if seen.value("chat_storage_fault") == 1:
            return True
        send_notes(cluster, token, 1)  # the node notices when it next writes
        return False

    seen = wait_metrics(backup, faulted, "chat_storage_fault 1 on the full disk")
    assert seen.value("chat_storage_faults_total") == 1
    wait_metrics(
        primary,
        lambda s: s.value("chat_sync_set_member", node="3") == 0,
        "node 3 out of the primary's sync set",
    )

    write_control(control, Plan("off"))
    recovered = wait_metrics(backup, lambda s: s.value("chat_storage_fault") == 0, "fault gone")
    assert recovered.value("chat_storage_faults_total") == 1
    wait_metrics(
        primary,
        lambda s: s.value("chat_sync_set_member", node="3") == 1,
        "node 3 back in the primary's sync set",
    )
    finish(cluster)


def test_a_node_whose_metrics_port_is_taken_serves_chat_and_metrics_once_it_is_free(
    cluster_factory: ClusterFactory, tmp_path: Path
) -> None:
    cluster = cluster_factory(n=1, metrics=True)
    node = cluster[1]
    assert node.metrics_address is not None
    host, port = node.metrics_address.rsplit(":", 1)
    holder = socket.socket()
    try:
        holder.bind((host, int(port)))
        holder.listen()
        cluster.start()
        cluster.wait_for_primary()
        wait_logged(node, f"metrics not served address={node.metrics_address}")
        assert node.metrics() is None
        run(new_user(cluster.servers, "alice"))  # chat goes on
    finally:
        holder.close()
    seen = wait_metrics(node, lambda s: s.value("chat_role", role="primary") == 1, "served")
    assert seen.value("chat_client_writes_total") >= 2
    assert node.log_text().count("metrics not served") == 1
    assert f"metrics served address={node.metrics_address}" in node.log_text()
    finish(cluster)
