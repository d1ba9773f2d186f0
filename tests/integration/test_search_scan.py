"""A search over many names on a real node: a chunk of names per read turn.

A pattern that matches few names makes SQLite look at every name, and one query
over a million accounts held the primary's event loop for a tenth of a second:
no write, no answer and no heartbeat meanwhile, as often as one account could ask.
The node runs a search as a keyset scan (``chat.SearchScan``), ``SEARCH_CHUNK``
names per read turn, and other reads take turns with it.

With a little over two chunks of accounts on one node, a search that matches
none of them is counted as three client reads by the node's metrics (one query
before), and a ``whoami`` pipelined behind it on the same connection is answered
first: it took the turn between two chunks. The answers are those of one query
over every name.
"""

from __future__ import annotations

import asyncio

import pytest

from service import chat, protocol
from service.client import Client
from tests.conftest import ClusterFactory
from tests.helpers.workload import new_user, run
from tests.integration.test_bad_input import Raw
from tests.integration.test_client_cli import PASSWORD

pytestmark = pytest.mark.cluster

ACCOUNTS = 2 * chat.SEARCH_CHUNK + 100
# Clients registering at once, and as many hashings the node queues (2 by default:
# the rest would be told ``busy`` and wait).
REGISTERING = 16


async def register_many(servers: list[str], names: list[str]) -> None:
    queue = iter(names)

    async def registrar() -> None:
        async with Client(servers) as client:
            for name in queue:  # each name once, whichever registrar takes it
                await client.register(name, PASSWORD)

    await asyncio.gather(*(registrar() for _ in range(REGISTERING)))


async def search_then_whoami(address: str, token: str, pattern: str) -> list[protocol.Frame]:
    """A search and a whoami in one write on one connection: the answers in the order
    the node sent them."""
    search = protocol.request("search", "s", {"pattern": pattern}, token)
    return await Raw.pipelined(address, [search, protocol.request("whoami", "w", {}, token)])


async def search(servers: list[str], token: str, pattern: str, limit: int) -> dict[str, object]:
    async with Client(servers, token=token) as client:
        return dict(await client.search(pattern, limit))


def test_a_search_over_many_names_takes_turns_with_other_reads(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory(n=1, metrics=True, hash_queue=REGISTERING)
    cluster.start()
    primary = cluster.wait_for_primary()
    names = [f"m{n:05d}" for n in range(ACCOUNTS)]
    run(register_many(cluster.servers, names))
    token = run(new_user(cluster.servers, "searcher", PASSWORD))

    def reads() -> float:
        scraped = primary.metrics()
        assert scraped is not None, "the node serves no metrics"
        return scraped.value("chat_client_reads_total")

    before = reads()
    first, second = run(search_then_whoami(cluster.servers[0], token, "*q*"))
    assert first["request_id"] == "w", (
        "the whoami pipelined behind a search of three chunks was answered after it: "
        f"the search held its turn for all {ACCOUNTS} names ({first})"
    )
    assert second == protocol.reply("s", {"users": [], "more": False})
    assert reads() - before == 4, "three chunks of the search, one whoami"

    # The answers are those of one query over all of them, in name order.
    expected = sorted(n for n in names if n.endswith("7"))
    found = run(search(cluster.servers, token, "*7", 1000))
    assert found == {"users": expected[:1000], "more": len(expected) > 1000}
    found = run(search(cluster.servers, token, "M0?1*", 30))
    matching = [n for n in names if n[:2] == "m0" and n[3] == "1"]
    assert found == {"users": matching[:30], "more": True}
    everyone = sorted([*names, "searcher"])
    for limit in (1, 50, 1000):
        found = run(search(cluster.servers, token, "", limit))
        assert found == {"users": everyone[:limit], "more": True}
