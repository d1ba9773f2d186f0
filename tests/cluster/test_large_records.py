"""No request can make a record too large for the replication stream (SPEC §6, G1/G2).

A user who sends themselves hundreds of the longest messages, then reads them
all at once, once made the primary seal a record of 10.8 MB (the whole listing,
stored as the read's result) above the peer frame limit: both backups refused
it and reconnected for ever while the primary acknowledged alone. Now a read is
a query and only the ids it marks read are written; a batch of many large
sends is split before its record outgrows the budget; an account deletion
tombstones a large inbox over several records.

Each scenario checks the outcome a user and an operator can see: every node
keeps the whole sync set, converges to the same data, and no record in any
log exceeds the budget.
"""

from __future__ import annotations

import asyncio

import pytest

from service.client import Client
from service.replication.writer import RECORD_BUDGET
from service.storage import Storage
from tests.conftest import ClusterFactory
from tests.helpers.cluster import Cluster
from tests.helpers.workload import PASSWORD, new_user, run, start_cluster, wait_settled

pytestmark = pytest.mark.cluster

LONGEST = "\U0001f600" * 4000  # 4000 characters of 4 bytes: the largest legal body


def largest_record(cluster: Cluster) -> int:
    sizes = []
    for node in cluster.nodes.values():
        storage = Storage(node.db_path)
        try:
            sizes.append(int(storage.db.value("SELECT max(length(changeset)) FROM txlog") or 0))
        finally:
            storage.close()
    return max(sizes)


def assert_whole_sync_set(cluster: Cluster) -> None:
    primary = wait_settled(cluster)
    view = primary.view()
    assert view is not None
    assert view.members == (1, 2, 3), view
    assert view.in_sync == (1, 2, 3), view


async def send_concurrently(servers: list[str], token: str, count: int) -> list[int]:
    """``count`` of the longest sends, 200 in flight at a time (below the per-connection
    limit), so that the primary groups hundreds into each batch."""
    ids: list[int] = []
    async with Client(servers, token=token) as client:
        while len(ids) < count:
            wave = min(200, count - len(ids))
            results = await asyncio.gather(*(client.send("ann", LONGEST) for _ in range(wave)))
            ids += [int(r["message"]["id"]) for r in results]
    return ids


def test_many_concurrent_largest_sends_stay_in_records_the_backups_take(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory()
    start_cluster(cluster)
    token = run(new_user(cluster.servers, "ann"))
    ids = run(send_concurrently(cluster.servers, token, 400))
    assert len(set(ids)) == 400
    assert_whole_sync_set(cluster)
    cluster.wait_identical()
    assert 0 < largest_record(cluster) <= RECORD_BUDGET


async def read_everything(servers: list[str], token: str) -> int:
    """Read the sent box and the inbox a thousand at a time; a page of the longest
    messages ends early (it must fit a frame) and says there is more."""
    shown = 0
    async with Client(servers, token=token) as client:
        for sent in (True, False):
            before = None
            while True:
                page = await client.read(sent=sent, limit=1000, before=before)
                shown += len(page["messages"])
                if not page["more"]:
                    break
                assert 0 < len(page["messages"]) < 1000
                before = page["messages"][-1]["id"]
        await client.send("ann", "written after the large reads")
    return shown


def test_reading_a_thousand_of_the_longest_messages_does_not_stop_replication(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory()
    start_cluster(cluster)
    token = run(new_user(cluster.servers, "ann"))
    run(send_concurrently(cluster.servers, token, 1000))
    assert run(read_everything(cluster.servers, token)) == 2000
    assert_whole_sync_set(cluster)
    cluster.wait_identical()
    assert largest_record(cluster) <= RECORD_BUDGET


async def delete_account_with_a_full_inbox(servers: list[str], ann: str) -> dict[str, object]:
    async with Client(servers, token=ann) as client:
        before = await client.read(sent=True, limit=1000)
        assert before["messages"], "the sent box is empty"
        assert before["more"], "a page of 300 of the longest messages fit one reply"
        async with Client(servers) as bob:
            await bob.login("bob", PASSWORD)
            await bob.delete_account()
        return await client.read(sent=True, limit=1000)


def test_deleting_an_account_with_a_large_inbox_tombstones_it_in_bounded_records(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory()
    start_cluster(cluster)
    ann = run(new_user(cluster.servers, "ann"))
    run(new_user(cluster.servers, "bob"))

    async def fill() -> None:
        async with Client(cluster.servers, token=ann) as client:
            await asyncio.gather(*(client.send("bob", LONGEST) for _ in range(300)))

    run(fill())
    after = run(delete_account_with_a_full_inbox(cluster.servers, ann))
    # Gone for the sender at once, before the purge has tombstoned every message.
    assert after["messages"] == []
    assert_whole_sync_set(cluster)
    cluster.wait_identical()
    for node in cluster.nodes.values():
        storage = Storage(node.db_path)
        try:
            left = storage.db.value("SELECT count(*) FROM messages WHERE body != ''")
        finally:
            storage.close()
        assert left == 0, f"node {node.node_id} still holds {left} bodies of the deleted inbox"
    assert largest_record(cluster) <= RECORD_BUDGET
