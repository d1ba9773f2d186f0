"""A user asking for the most work the protocol allows does not make the primary look dead.

The largest legal ``read`` asks for 1,000 messages of 4,000 characters (it
gets as many as fit in a reply, about 2 MiB): milliseconds of the primary's
event loop. Fifty connections of one account asking for such pages at once ran
fifty of them in one turn of the loop, again and again: the primary sent no
heartbeat for seconds (the slowest read took 8.8 s) and the backups elected
another primary, for as long as the reads went on. Reads now take turns, one
query per turn of the loop (``WritePath.read``), and the heartbeats go out
between them.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from service.client import Client
from tests.conftest import ClusterFactory
from tests.helpers.workload import finish, new_user, run, start_cluster, view_of

pytestmark = pytest.mark.cluster

CONNECTIONS = 50
SECONDS = 3.0


async def load_inbox(servers: list[str], token: str, count: int) -> None:
    body = "y" * 4000
    async with Client(servers, token=token, timeout=30.0) as client:
        for start in range(0, count, 200):
            await asyncio.gather(
                *(client.send("mallory", body) for _ in range(start, min(count, start + 200)))
            )


async def read_flood(servers: list[str], token: str) -> int:
    """Largest pages read on ``CONNECTIONS`` connections for ``SECONDS``; how many."""
    deadline = time.monotonic() + SECONDS

    async def one() -> int:
        done = 0
        async with Client(servers, token=token, timeout=30.0) as client:
            while time.monotonic() < deadline:
                page = await client.read(limit=1000)
                assert page["messages"], page  # as many as fit in a reply
                done += 1
        return done

    return sum(await asyncio.gather(*(one() for _ in range(CONNECTIONS))))


def test_many_connections_reading_the_largest_pages_cause_no_election(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory(heartbeat_interval=0.05, suspect_timeout=0.3)
    primary = start_cluster(cluster)
    token = run(new_user(cluster.servers, "mallory"))
    run(load_inbox(cluster.servers, token, 1000))
    epoch = view_of(primary).epoch
    assert run(read_flood(cluster.servers, token)) > 0
    for node in cluster.nodes.values():
        view = view_of(node)
        assert view.epoch == epoch, f"an election while the reads went on: {view}"
    finish(cluster)
