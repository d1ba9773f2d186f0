"""A cluster upgraded one node at a time, when the new version changes the schema.

The upgraded node's records carry its later schema (here: a column more in
``messages``). SQLite's changeset apply would skip such a table's changes on a
node still on the older schema without a word: the backup would commit and
acknowledge records whose rows it does not hold, and a later failover to it would
lose acknowledged messages. What the scenario holds instead:

* the backups on the older schema refuse the primary's records (storage.py
  ``SchemaMismatch``), say why (status, log) once, and neither rejoin in a loop
  nor apply anything;
* the primary drops them from the sync set (R3) and goes on acknowledging;
* upgraded in turn, each rejoins and catches up by itself, and every node ends
  with the same rows (``finish``).

A backup's upgrade is the migration's own statement run on its database while it
is stopped, as the new version's start would run it; the primary's is the same
statement run beside it while it serves.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import closing

import pytest

from service.status import NodeStatus
from tests.conftest import ClusterFactory
from tests.helpers.cluster import NodeProcess
from tests.helpers.workload import (
    Sender,
    assert_stays,
    finish,
    stopped_storage,
    wait_settled,
    wait_view,
)

pytestmark = pytest.mark.cluster

LATER_SCHEMA = "ALTER TABLE messages ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0"


def upgrade(node: NodeProcess) -> None:
    """Stop ``node``, give its database the later schema, and start it again."""
    node.stop()
    with stopped_storage(node) as storage:
        storage.db.execute(LATER_SCHEMA)
    node.start()


def holds(member: int) -> Callable[[NodeStatus], bool]:
    """A primary's sync set holds ``member``."""
    return lambda view: member in view.members


def messages_of(node: NodeProcess) -> int:
    return int(node.query("SELECT count(*) FROM messages"))


def test_backups_on_an_older_schema_refuse_the_records_and_catch_up_once_upgraded(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory()
    cluster.start()
    sender = Sender(cluster, timeout=10.0)

    primary = wait_settled(cluster)
    backups = [node for node in cluster.nodes.values() if node is not primary]
    sender.acked(2)
    # The primary upgraded first. Its schema changes under it (its next batch's session
    # records the new column, as an upgraded primary's would), so that no election
    # decides which node leads on the later schema.
    with closing(sqlite3.connect(primary.db_path, timeout=5.0)) as conn:
        conn.execute(LATER_SCHEMA)

    # Its next record has the later shape: both backups refuse it and are dropped.
    sender.acked(1)
    alone = (primary.node_id,)
    wait_view(primary, lambda v: v.members == alone, "the primary dropping both backups")
    for backup in backups:
        wait_view(
            backup,
            lambda v: "upgrade this node" in str(v.reason or ""),
            f"node {backup.node_id} saying it must be upgraded",
        )
    sender.acked(1)

    def settled_out() -> str | None:
        for backup in backups:
            if not backup.is_running:
                return f"node {backup.node_id} exited"
            if backup.log_text().count("storage fault") != 1:
                return f"node {backup.node_id} logged the fault again: it retries"
            if messages_of(backup) != 2:
                return f"node {backup.node_id} applied records it cannot hold"
        return None

    assert_stays(settled_out, 2.0, "with the backups on the older schema")

    for backup in backups:
        upgrade(backup)
        wait_view(
            primary,
            holds(backup.node_id),
            f"node {backup.node_id} back in the sync set once upgraded",
        )
    sender.acked(1)
    assert [messages_of(node) for node in cluster.nodes.values()] == [5, 5, 5]
    finish(cluster, sender.history)
