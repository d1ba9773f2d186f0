"""A backup that installed the primary's snapshot is no second witness for the primary.

The checksum round (``verify.py``) resyncs a node whose rows differ from a
majority's. That rests on each node's damage being its own; a snapshot breaks
it: the copy holds whatever the primary read, damage SQLite cannot see
included (one flipped bit inside a row leaves every page well formed). Here
node 1's disk returns a flipped bit of a message's row on every read, node 3
catches up by a snapshot of it, and the round sees 1 and 3 agree against
node 2, the one node with the text that was acknowledged. It once took that as
a majority and resynced node 2 from the others: the change reached every node.
Now the copy counts with its source, no majority is left, and the round raises
its alarm without acting. Once node 1's disk reads true again, 1 and 2 agree
against the copy, and node 3 resyncs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ops.chaos.corrupt import find_all
from ops.cluster.waiting import wait_for
from service.diskfaults import Plan, write_control
from tests.conftest import ClusterFactory
from tests.helpers.workload import (
    finish,
    first_log_seq,
    message_bodies,
    new_user,
    run,
    send_each,
    start_cluster,
    stopped_storage,
    wait_logged,
    with_faults,
)

pytestmark = pytest.mark.cluster

BODY = "the message whose row a bad sector will change: Q\u00e9"
# The fault VFS inverts every bit of a byte it flips. Both bytes of the "\u00e9"
# (C3 A9) inverted are "<V" (3C 56): still valid text, so nothing but a comparison
# with another node can tell (a byte that no longer decodes is damage the node
# finds by itself: test_storage).
NEEDLE = "Q\u00e9".encode()
DAMAGED = BODY.replace("Q\u00e9", "Q<V")


def offsets_of_the_accent(path: Path) -> tuple[int, ...]:
    """Where the two bytes of the body's accented letter are, in every copy of it."""
    return tuple(at + k for at in find_all(path.read_bytes(), NEEDLE) for k in (1, 2))


def test_a_snapshot_copy_does_not_outvote_the_node_it_was_not_copied_from(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory(verify_interval=0.3, log_retention=20)
    primary, witness, copy = cluster[1], cluster[2], cluster[3]
    control = with_faults(cluster, primary)
    assert start_cluster(cluster) is primary
    alice = run(new_user(cluster.servers, "alice"))
    run(new_user(cluster.servers, "bob"))
    cluster.wait_in_sync()
    wait_logged(primary, "checksums agree")
    copy.stop()
    with stopped_storage(copy) as storage:
        behind = storage.position().seq
    sent = [BODY] + [f"later {i}" for i in range(40)]
    run(send_each([primary.address], alice, "bob", sent))

    def pruned_past_it() -> bool:
        first = first_log_seq(primary)
        return first is not None and first > behind + 1

    # The primary prunes its log every few seconds; node 3 then needs a snapshot.
    wait_for(pruned_past_it, 20.0, "node 1's log to no longer reach back to node 3")
    # No write touches the message's page from here on: every copy of it that node 1
    # reads is in its WAL now, and each of them reads with one bit flipped.
    wal = primary.db_path.with_name("chat.db-wal")
    offsets = offsets_of_the_accent(wal)
    assert offsets, "the message is not in node 1's WAL"
    write_control(control, Plan("flip_read", files=("chat.db-wal",), offsets=offsets))
    wait_logged(primary, "disk faults plan mode=flip_read")
    mark = len(witness.log_text())

    copy.start()
    wait_logged(copy, "snapshot installed")
    assert DAMAGED in message_bodies(copy), "node 3's snapshot is not of the flipped row"
    wait_for(
        lambda: "nodes=1,2,3 damaged=undecided" in primary.log_text(),
        20.0,
        "a round of all three nodes to find no majority",
    )
    assert "database damaged" not in witness.log_text(mark), "node 2 was resynced"
    assert witness.is_running

    # Node 1's disk reads true again: 1 and 2 agree, the copy is the odd one out.
    write_control(control, Plan("off"))
    wait_for(lambda: not copy.is_running, 20.0, "node 3 to exit on the primary's resync")
    assert "database damaged, exiting" in copy.log_text()
    copy.restart()  # as supervisord would
    wait_logged(copy, "database damaged, moved aside")
    cluster.wait_in_sync()
    for node in cluster.nodes.values():
        assert BODY in message_bodies(node), f"node {node.node_id} lacks the message"
    finish(cluster)
