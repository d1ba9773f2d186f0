"""The last member of the sync set loses its database (G5, E4).

Nodes 2 and 3 stop, so the sync set shrinks to node 1 alone, which then
acknowledges writes nobody else holds. Node 1 is killed and loses its data: its
whole data folder wiped, or only the ``-wal`` file after the crash (the
database falls back to its last checkpoint). When all three start again, no
node may lead with the older state: node 1's new database is not the one the
sync set names, and a lost WAL is recognised by the identity file. The cluster
waits, every node says why, and an operator's forced promotion
(``ops.promote``) is the explicit way out.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from service.client import Client
from service.status import NodeStatus
from tests.conftest import ClusterFactory
from tests.helpers.cluster import Cluster
from tests.helpers.workload import (
    PASSWORD,
    assert_stays,
    new_user,
    run,
    start_cluster,
    wait_settled,
    wait_view,
    waiting_for,
)

pytestmark = pytest.mark.cluster

ALONE_WRITES = 40


async def send_many(servers: list[str], token: str, count: int) -> None:
    async with Client(servers, token=token) as client:
        for i in range(count):
            await client.send("bob", f"only node 1 holds this {i}")


def shrink_to_node_1_and_write(cluster: Cluster) -> None:
    start_cluster(cluster)
    assert wait_settled(cluster) is cluster[1]
    token = run(new_user(cluster.servers, "alice"))
    run(new_user(cluster.servers, "bob"))
    cluster[2].kill()
    cluster[3].kill()
    wait_view(cluster[1], lambda v: v.members == (1,), "sync set shrunk to node 1 alone")
    run(send_many([cluster[1].address], token, ALONE_WRITES))


def no_primary(cluster: Cluster) -> str | None:
    for node in cluster.nodes.values():
        view = node.view()
        if view is not None and view.role == "primary":
            return f"node {node.node_id} became primary: {view}"
    return None


def expect_waiting_for_node_1(cluster: Cluster, why: str) -> None:
    def names_node_1(view: NodeStatus) -> bool:
        return 1 in waiting_for(view) and why in str(view.reason or "")

    for node in (cluster[2], cluster[3]):
        wait_view(node, names_node_1, f"status saying it waits for node 1 ({why})")
    assert_stays(lambda: no_primary(cluster), 1.5, "with node 1's database lost")


@pytest.mark.parametrize("loss", ["wiped-folder", "deleted-wal"])
def test_the_last_member_that_lost_its_database_does_not_let_the_others_lead(
    cluster_factory: ClusterFactory, loss: str
) -> None:
    cluster = cluster_factory()
    shrink_to_node_1_and_write(cluster)
    cluster[1].kill()
    data = cluster[1].db_path.parent
    if loss == "wiped-folder":
        shutil.rmtree(data)
        why = "wiped or replaced"
    else:
        for suffix in ("-wal", "-shm"):
            (data / f"chat.db{suffix}").unlink(missing_ok=True)
        why = "write-ahead log is gone"
    cluster.start()
    expect_waiting_for_node_1(cluster, why)


def test_a_forced_promotion_is_the_way_out(cluster_factory: ClusterFactory) -> None:
    cluster = cluster_factory()
    shrink_to_node_1_and_write(cluster)
    cluster[1].kill()
    shutil.rmtree(cluster[1].db_path.parent)
    cluster.start()
    expect_waiting_for_node_1(cluster, "wiped or replaced")
    promote = subprocess.run(
        [
            sys.executable,
            "-m",
            "ops.promote",
            "3",
            "--address",
            cluster[3].address,
            "--secret-file",
            str(cluster.secret_file),
            "--yes",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert promote.returncode == 0, promote.stderr
    assert cluster.wait_for_primary() is cluster[3]
    # The cluster serves again, and node 1 rejoins with a copy of node 3's data.
    run(login_and_send(cluster.servers))
    cluster.wait_converged()


async def login_and_send(servers: list[str]) -> None:
    async with Client(servers) as client:
        await client.login("alice", PASSWORD)
        await client.send("bob", "after the promotion")
