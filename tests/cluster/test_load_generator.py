"""The benchmark's load generator (``ops/bench/load.py``) against real nodes.

Its workers speak the wire protocol over lean connections of their own, not
through the client library; the benchmark's figures assume what these tests hold:

* count mode sends exactly the count asked for, and the primary stores each send;
* window mode acknowledges sends and keeps one latency sample for each;
* a refused send is counted under its error code, and the load goes on;
* when the primary dies or freezes in the middle of count mode, the workers find
  the new one and send again under the same request ids: every acknowledged send
  is stored once, none twice.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from ops.bench import load
from ops.cluster.waiting import wait_for
from tests.conftest import ClusterFactory
from tests.helpers.cluster import Cluster, NodeProcess
from tests.helpers.workload import run, start_cluster, wait_settled

pytestmark = pytest.mark.cluster


def messages_on(node: NodeProcess) -> int:
    return int(node.query("SELECT count(*) FROM messages"))


def loaded_cluster(
    cluster_factory: ClusterFactory, users: int
) -> tuple[Cluster, NodeProcess, load.Users]:
    """A started cluster, its primary, and ``users`` accounts logged in for the load."""
    cluster = cluster_factory()
    primary = start_cluster(cluster)
    return cluster, primary, run(load.register_users(cluster.servers, users, "load"))


def test_count_mode_sends_the_count_and_the_primary_stores_each(
    cluster_factory: ClusterFactory,
) -> None:
    cluster, primary, users = loaded_cluster(cluster_factory, 3)
    result = load.run_count(cluster.servers, users, 300, 4, 2, cluster.pids())
    assert result["acked"] == 300
    assert result["errors"] == {}
    assert messages_on(primary) == 300


def test_window_mode_keeps_one_latency_sample_per_acknowledged_send(
    cluster_factory: ClusterFactory,
) -> None:
    cluster, primary, users = loaded_cluster(cluster_factory, 3)
    result = load.run_window(cluster.servers, users, 3, 2, 0.2, 1.0, cluster.pids())
    assert result["errors"] == {}
    assert result["acked"] > 0
    assert result["latency"]["n"] == result["acked"]
    # The sends of the warm-up and those still in flight at the end are not counted.
    assert messages_on(primary) >= result["acked"]


def test_a_refused_send_is_counted_by_its_code_and_the_load_goes_on(
    cluster_factory: ClusterFactory,
) -> None:
    cluster, primary, users = loaded_cluster(cluster_factory, 2)
    # One recipient in three is a name nobody registered: ``not_found``.
    with_a_stranger = load.Users([*users.names, "nobody"], users.tokens)
    result = load.run_count(cluster.servers, with_a_stranger, 150, 2, 1, cluster.pids())
    assert result["acked"] == 150
    assert set(result["errors"]) == {"not_found"}
    assert result["errors"]["not_found"] > 0
    assert messages_on(primary) == 150


@pytest.mark.parametrize("fault", ["kill", "freeze"])
def test_count_mode_follows_a_new_primary_and_stores_each_send_once(
    cluster_factory: ClusterFactory, fault: str
) -> None:
    cluster = cluster_factory()
    start_cluster(cluster)
    primary = wait_settled(cluster)
    users = run(load.register_users(cluster.servers, 3, "load"))
    total = 3000
    with ThreadPoolExecutor(1) as pool:
        loading = pool.submit(load.run_count, cluster.servers, users, total, 8, 2, cluster.pids())
        wait_for(lambda: messages_on(primary) >= 200, 60, "the load to reach the primary")
        if fault == "kill":
            primary.kill()
        else:
            # A frozen primary answers nothing and closes nothing: only the workers'
            # watchdog gets their sends out of it.
            primary.freeze()
        try:
            successor = cluster.wait_for_primary()
            result = loading.result(timeout=60)
        finally:
            if fault == "freeze":
                primary.thaw()
    assert successor is not primary
    assert result["errors"] == {}
    assert result["acked"] == total
    assert messages_on(successor) == total
