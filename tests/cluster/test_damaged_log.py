"""A record of the primary's log damaged on disk is never sent to a backup.

SQLite keeps no checksum of a row's payload: one flipped bit inside a record of
``txlog`` (a bad sector under a healthy file system) leaves every page well
formed, so ``quick_check`` passes, and the record still parses as a changeset.
Backups that caught up from such a log once applied it as it was read: they
held a message whose text differed from the one acknowledged, and with two of
them against the primary the checksum round would have taken the primary for
the odd one out and resynced it from them. Now each record of the log carries a
checksum of its bytes made when it was appended (as PostgreSQL's WAL records
and Kafka's batches do), checked whenever the log is read back: the primary
drops the damaged record (and the older ones, useless without it) from its log,
says so, and the backups get a snapshot, made from the tables, instead.
"""

from __future__ import annotations

import pytest

from ops.chaos.corrupt import flip_payload
from tests.conftest import ClusterFactory
from tests.helpers.workload import (
    finish,
    message_bodies,
    new_user,
    run,
    send_each,
    start_cluster,
    wait_logged,
)

pytestmark = pytest.mark.cluster

BODY = "the body of the record to damage: Quokka"


def test_a_damaged_log_record_is_replaced_by_a_snapshot(cluster_factory: ClusterFactory) -> None:
    cluster = cluster_factory(metrics=True)
    primary = start_cluster(cluster)
    assert primary is cluster[1]
    alice = run(new_user(cluster.servers, "alice"))
    run(new_user(cluster.servers, "bob"))
    cluster.wait_in_sync()
    # The backups miss what follows: they will catch up from the primary's log.
    cluster[2].stop()
    cluster[3].stop()
    sent = [f"before {i}" for i in range(5)] + [BODY] + [f"after {i}" for i in range(5)]
    run(send_each([primary.address], alice, "bob", sent))
    primary.stop()  # SIGTERM: checkpointed, so the flipped byte is what SQLite reads
    flip_payload(primary.db_path, "txlog", b"Quokka")
    damaged = BODY.replace("Quokka", "quokka")

    cluster.start()
    # Node 1 alone holds the writes: it leads, and both backups catch up from it.
    assert cluster.wait_in_sync() is primary
    wait_logged(primary, "log record damaged, dropped from the log")
    wait_logged(primary, "snapshot sent")
    seen = primary.metrics()
    assert seen is not None
    # Found once: the record and the ones before it left the log with it, so the
    # second backup's join was answered with a snapshot from the start.
    assert seen.value("chat_damaged_log_records_total") == 1
    for node in cluster.nodes.values():
        held = message_bodies(node)
        assert damaged not in held, f"node {node.node_id} holds the damaged record's text"
        assert set(sent) <= held, f"node {node.node_id} lacks {set(sent) - held}"
    finish(cluster)
