"""An operator's sqlite3 shell on a running node's database costs no acknowledged write.

In WAL mode the last connection to close a database checkpoints it and deletes
its WAL. A connection knows it is the last when it can lock the database file
exclusively, which a node's connections prevent by holding a shared lock on it
for as long as they are open. A node that dropped those locks (closing any
descriptor of the file drops all of a process's locks on it, POSIX) let a shell
that only read delete its WAL on the way out: the node's next commits went to a
file nobody else could see, its fsyncs found no WAL to sync, and a crash lost
them, acknowledged or not (``storage.Storage._file``).

The scenario: writes acknowledged, a shell opened on each node's database
read-write (as the ``sqlite3`` shell opens it), a read, the shell closed; more
writes acknowledged; all three nodes killed at once and started again. Every
acknowledged write is there (``finish``).
"""

from __future__ import annotations

import sqlite3
from contextlib import closing

import pytest

from tests.conftest import ClusterFactory
from tests.helpers.workload import Sender, finish, wait_settled

pytestmark = pytest.mark.cluster


def test_a_shell_that_read_each_node_s_database_costs_no_acknowledged_write(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory()
    cluster.start()
    wait_settled(cluster)
    sender = Sender(cluster, timeout=10.0)

    sender.acked(3)
    for node in cluster.nodes.values():
        with closing(sqlite3.connect(node.db_path, timeout=5.0)) as shell:
            assert shell.execute("SELECT count(*) FROM messages").fetchone()[0] >= 0
        assert node.db_path.with_name(node.db_path.name + "-wal").exists(), (
            f"node {node.node_id}'s WAL was deleted by a shell that only read"
        )
    sender.acked(5)
    for node in cluster.nodes.values():
        node.kill()
    cluster.start()
    finish(cluster, sender.history)
