"""The disk fault control path into a running node (service/diskfaults.py).

A node started with ``CHAT_DISK_FAULTS=<control file>`` runs on the fault
VFS and follows that file while it runs: this checks the control path only
(the file is picked up, the injected error reaches the node's storage code,
and ``off`` gives the disk back). How a node copes with a full disk is the
subject of the behavioural tests; here, whatever it does, it must come back
to the cluster's position once the disk is free.
"""

from __future__ import annotations

import itertools

import pytest

from ops.cluster.history import History
from ops.cluster.waiting import wait_for
from service.client import Client
from service.diskfaults import ENV_VAR, Plan, write_control
from tests.conftest import ClusterFactory
from tests.helpers.cluster import NodeProcess
from tests.helpers.workload import (
    new_user,
    run,
    send_recorded,
    start_cluster,
    wait_logged,
)

pytestmark = pytest.mark.cluster


def test_a_running_node_follows_its_disk_fault_control_file(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory()
    node = cluster[3]
    control = cluster.root / "node3-disk-faults.json"
    node.env[ENV_VAR] = str(control)
    start_cluster(cluster)
    cluster.wait_in_sync()
    wait_logged(node, "disk faults enabled")
    token = run(new_user(cluster.servers, "alice"))
    history = History()
    numbers = itertools.count()

    def send_one() -> None:
        """One write the whole cluster takes part in (its outcome does not matter here)."""

        async def send() -> None:
            async with Client(cluster.servers, timeout=3.0, token=token) as client:
                await send_recorded(client, "alice", "alice", f"m{next(numbers)}", history)

        run(send())

    write_control(control, Plan("full"))

    def refused_on_node() -> bool:
        send_one()
        text = node.log_text()
        return "disk faults failing op=write" in text and "database or disk is full" in text

    wait_for(refused_on_node, 30.0, "node 3 to refuse a write for a full disk")
    mark = len(node.log_text())

    write_control(control, Plan("off"))
    if not node.is_running:
        node.restart()  # it stopped on the storage error: supervisord would restart it

    def back_in_step() -> bool:
        send_one()
        return _logged_since(node, mark, "disk faults plan mode=off") and bool(
            cluster.wait_converged(timeout=5.0)
        )

    wait_for(back_in_step, 60.0, "node 3 writing again at the cluster's position")


def _logged_since(node: NodeProcess, mark: int, text: str) -> bool:
    return text in node.log_text()[mark:]
