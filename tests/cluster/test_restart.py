"""Nodes that crash and come back: one backup, two nodes, all three (SPEC sections 6 and 8).

* A backup killed under load comes back and catches up from the primary's log.
* Any two nodes killed at once: the remaining in-sync node serves reads and
  writes alone (G2), and the two catch up when they return.
* All three killed, restarted in orders that pass every state, one stale (killed first
  and behind): the stale node never becomes primary (G5, R6) and says which
  nodes it waits for; once the newest sync set is back a primary is elected
  and nothing acknowledged is lost (G1).
* A node that does not hold the cluster secret cannot join.
* A node stopped the moment it starts (once it runs any code) exits 0, as a
  stop later does, and then starts as usual.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ops.cluster.history import OK
from service.client import Client
from service.status import NodeStatus
from tests.conftest import ClusterFactory
from tests.helpers.cluster import Cluster, NodeProcess
from tests.helpers.workload import (
    PASSWORD,
    Workload,
    assert_stays,
    finish,
    read_inbox,
    run,
    start_cluster,
    wait_logged,
    wait_settled,
    wait_view,
    waiting_for,
)

pytestmark = pytest.mark.cluster

# Long enough for several election rounds (heartbeats of 0.1 s, elections of 0.3 s).
STAYS_OUT = 1.0


def backups_of(cluster: Cluster, primary: NodeProcess) -> list[NodeProcess]:
    return [node for node in cluster.nodes.values() if node is not primary]


def test_backup_killed_under_load_catches_up_from_the_log(cluster_factory: ClusterFactory) -> None:
    cluster = cluster_factory()
    start_cluster(cluster)
    primary = wait_settled(cluster)
    backup = backups_of(cluster, primary)[0]
    with Workload(cluster.servers) as load:
        load.wait_progress(30, "with every node up")
        backup.kill()
        load.wait_progress(60, "with the backup down")
        backup.start()
        assert wait_settled(cluster) is primary
        load.wait_progress(30, "with the backup back")
    assert f"catch-up start node={primary.node_id} backup={backup.node_id}" in primary.log_text()
    assert "snapshot installed" not in backup.log_text()
    finish(cluster, load.history)


def the_pair(survivor: int) -> str:
    return "kill-" + "-".join(str(i) for i in (1, 2, 3) if i != survivor)


@pytest.mark.parametrize("survivor", [1, 2, 3], ids=the_pair)
def test_any_two_nodes_killed_the_third_serves_alone(
    cluster_factory: ClusterFactory, survivor: int
) -> None:
    cluster = cluster_factory()
    start_cluster(cluster)
    wait_settled(cluster)
    with Workload(cluster.servers) as load:
        load.wait_progress(20, "with every node up")
        # Both at once: freeze them first, so that neither acts on the other's death.
        pair = [node for node in cluster.nodes.values() if node.node_id != survivor]
        for node in pair:
            node.freeze()
        for node in pair:
            node.kill()
        assert cluster.wait_for_primary() is cluster[survivor]
        load.wait_progress(30, f"on node {survivor} alone", timeout=15.0)
    # Reads too: every acknowledged message is in its recipient's inbox (G1, G2).
    inbox = run(inbox_of(cluster, load.users[1]))
    sent_to_it = {r.body for r in load.history.ops if r.recipient == load.users[1]}
    acked = {r.body for r in load.history.of_kind("send", OK) if r.recipient == load.users[1]}
    bodies = [m["body"] for m in inbox]
    assert acked <= set(bodies) <= sent_to_it
    assert len(bodies) == len(set(bodies))
    cluster.start()
    finish(cluster, load.history)


async def inbox_of(cluster: Cluster, user: str) -> list[dict[str, object]]:
    async with Client(cluster.servers) as client:
        await client.login(user, PASSWORD)
        return await read_inbox(client)


def restart_order(order: tuple[str, ...]) -> str:
    return "-".join(order)


# Three of the six orders: each node comes back first once, and each pair of them is
# back together once (the two newest alone lead, any other pair waits), which are
# every state a full restart passes through; the order within a pair only changes
# which node was alone first. The simulator runs all six
# (tests/unit/test_replication_state.py::test_r6_full_restart_waits_for_the_newest_sync_set).
ORDERS = [
    ("stale", "primary", "backup"),
    ("backup", "stale", "primary"),
    ("primary", "backup", "stale"),
]


@pytest.mark.parametrize("order", ORDERS, ids=restart_order)
def test_full_restart_through_every_state(
    cluster_factory: ClusterFactory, order: tuple[str, ...]
) -> None:
    cluster = cluster_factory()
    start_cluster(cluster)
    primary = wait_settled(cluster)
    stale, backup = backups_of(cluster, primary)
    role = {"stale": stale, "primary": primary, "backup": backup}
    with Workload(cluster.servers) as load:
        load.wait_progress(20, "with every node up")
        stale.kill()
        load.wait_progress(30, "without the stale node")
    assert cluster.wait_in_sync() is primary  # the newest sync set is {primary, backup}
    # Freeze first, so that neither notices the other's death and acts on it.
    for node in (backup, primary):
        node.freeze()
    for node in (backup, primary):
        node.kill()

    newest = {primary, backup}
    started: list[NodeProcess] = []
    for name in order:
        node = role[name]
        node.start()
        started.append(node)
        missing = sorted(n.node_id for n in newest - set(started))
        if missing:
            expect_waiting(started, missing)
        else:
            assert cluster.wait_for_primary() in newest
    finish(cluster, load.history)


def expect_waiting(started: list[NodeProcess], missing: list[int]) -> None:
    """G5: no primary, and every started node says it waits for ``missing``."""

    def names_missing(view: NodeStatus) -> bool:
        return set(missing) <= waiting_for(view)

    for node in started:
        wait_view(node, names_missing, f"status naming nodes {missing} in waiting_for")
    assert_stays(
        lambda: no_primary(started),
        STAYS_OUT,
        f"with nodes {[n.node_id for n in started]} back and {missing} missing",
    )


def test_primary_stopped_gracefully_then_stale_does_not_start_alone(
    cluster_factory: ClusterFactory,
) -> None:
    """SIGTERM (supervisord's stop) of the primary, the others go on, then crash.

    The stopped node must not come back believing it was the last to fail
    (R6: a node whose newest sync set is only itself may start alone): the
    others acknowledged writes after it left, so it is stale (G5).
    """
    cluster = cluster_factory()
    start_cluster(cluster)
    old = wait_settled(cluster)
    with Workload(cluster.servers) as load:
        load.wait_progress(20, "with every node up")
        old.stop()
        assert cluster.wait_for_primary() is not old
        load.wait_progress(30, "after the graceful stop")
    others = backups_of(cluster, old)
    assert wait_settled(cluster) in others
    for node in others:
        node.freeze()
    for node in others:
        node.kill()
    old.start()
    expect_waiting([old], sorted(n.node_id for n in others))
    cluster.start()
    finish(cluster, load.history)


def no_primary(nodes: list[NodeProcess]) -> str | None:
    for node in nodes:
        view = node.view()
        if view is not None and view.role == "primary":
            return f"node {node.node_id} became primary: {view}"
    return None


def use_secret(node: NodeProcess, secret_file: Path) -> None:
    """Point the node's config at another secret file (takes effect at its next start)."""
    lines = [
        f"secret_file = {secret_file}" if line.startswith("secret_file =") else line
        for line in node.config_path.read_text().splitlines()
    ]
    node.config_path.write_text("\n".join(lines) + "\n")


def test_a_node_without_the_cluster_secret_cannot_join(
    cluster_factory: ClusterFactory, tmp_path: Path
) -> None:
    cluster = cluster_factory()
    start_cluster(cluster)
    primary = wait_settled(cluster)
    # The middle id: it dials one peer and accepts the other (lower ids dial).
    intruder = backups_of(cluster, primary)[0]
    intruder.kill()
    wrong = tmp_path / "wrong.secret"
    wrong.write_text("0123456789abcdef" * 4 + "\n")
    use_secret(intruder, wrong)
    intruder.start()
    others = [n for n in cluster.nodes.values() if n is not intruder]

    wait_view(intruder, lambda view: view.role == "electing", "electing, alone")

    def joined() -> str | None:
        view = intruder.view()
        if view is not None and view.role != "electing":
            return f"it is {view}"
        for node in others:
            other = node.view()
            if other is not None and intruder.node_id in other.members:
                return f"node {node.node_id} counts it in the sync set: {other}"
        return None

    assert_stays(joined, 2 * STAYS_OUT, "a node with the wrong secret joined")
    for node in cluster.nodes.values():
        wait_logged(node, "failed authentication")
    intruder.kill()
    use_secret(intruder, cluster.secret_file)
    intruder.start()
    finish(cluster)


def test_a_node_stopped_as_it_starts_exits_cleanly(cluster_factory: ClusterFactory) -> None:
    """A stop that follows a start at once (a supervisor's restart and stop, a
    fault schedule) reaches the node during its imports or while it opens its
    database: it exits 0 (``stopped while starting``), never by SIGTERM's
    default action (-15, a crash to a supervisor). Each stop is sent as soon as
    the process handles SIGTERM (the harness's ``terminate``), the earliest a
    stop can be anything but a crash; three rounds, then a start that serves."""
    cluster = cluster_factory()
    node = cluster[1]
    for round_ in range(3):
        node.start(wait=False)
        assert node.stop() == 0, f"round {round_}: exited {node.returncode}; see {node.log_path}"
    assert "stopped while starting" in node.log_path.read_text()
    node.start()
    assert node.view() is not None, "the node does not answer status after the stops"
