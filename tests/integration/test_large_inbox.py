"""A large inbox on a real node: reads of it take a window of it per read turn.

An inbox may hold millions of messages, and a read that finds few of them (the
unread ones of an inbox read long ago, those with someone never written to) or
counts them made SQLite look at all of them in one query: tens of milliseconds
at 300,000 messages, longer than ``suspect_timeout`` at a few million, the
primary's event loop held meanwhile; a login counted them inside the writer's
batch, holding every write. The node now reads an inbox in windows
(``service/windows.py``), one query per read turn, and a login counts before its
write.

Alice's inbox holds a little over two windows of messages from bob, all read,
then two unread from carol. On one connection a ``whoami`` (or a ``read`` of
the unread messages, or of the unread ones with bob) and a read that needs one query are
sent in one write: the second is answered first, in the turn between two
windows of the first. The node's count of client reads says how many turns
each took, a login's count included. The answers are the same as ever.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from service import protocol, windows
from service.client import Client
from tests.conftest import ClusterFactory
from tests.helpers.cluster import NodeProcess
from tests.helpers.workload import new_user, run
from tests.integration.test_bad_input import Raw
from tests.integration.test_client_cli import PASSWORD

pytestmark = pytest.mark.cluster

OLD = 2 * windows.SCAN_CHUNK + 100
SENDERS = 8  # bob's connections sending at once


async def fill(servers: list[str], bob: str, carol: str, alice: str) -> None:
    """OLD messages from bob to alice, all read by her; then two unread from carol."""
    numbers = iter(range(OLD))

    async def sender() -> None:
        async with Client(servers, token=bob) as client:
            for n in numbers:  # each number once, whichever sender takes it
                await client.send("alice", f"old {n}")

    await asyncio.gather(*(sender() for _ in range(SENDERS)))
    async with Client(servers, token=alice) as client:
        while (await client.read(unread=True, limit=1000))["messages"]:
            pass
    async with Client(servers, token=carol) as client:
        await client.send("alice", "new 1")
        await client.send("alice", "new 2")


async def heavy_then_light(
    address: str, token: str, op: str, args: dict[str, Any]
) -> list[protocol.Frame]:
    """``op`` and then a read that needs one query (nothing before id 1), in one write
    on one connection: the answers in the order the node sent them."""
    heavy = protocol.request(op, "heavy", args, token)
    light = protocol.request("read", "light", {"before": 1}, token)
    return await Raw.pipelined(address, [heavy, light])


def client_reads(node: NodeProcess) -> float:
    scraped = node.metrics()
    assert scraped is not None, "the node serves no metrics"
    return scraped.value("chat_client_reads_total")


def test_reads_of_a_large_inbox_take_turns_with_other_reads(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory(n=1, metrics=True)
    cluster.start()
    primary = cluster.wait_for_primary()
    servers = cluster.servers
    bob, carol = run(new_user(servers, "bob", PASSWORD)), run(new_user(servers, "carol", PASSWORD))
    run(new_user(servers, "dave", PASSWORD))
    alice = run(new_user(servers, "alice", PASSWORD))
    run(fill(servers, bob, carol, alice))

    heavy: list[tuple[str, dict[str, Any], int, dict[str, Any]]] = [
        # op, args, read turns (the light read's one included), the answer
        ("whoami", {}, 4, {"user": "alice", "user_id": 4, "unread": 2}),
        ("read", {"unread": True}, 4, {"messages": ["new 2", "new 1"], "more": False}),
        ("read", {"with": "bob", "unread": True}, 4, {"messages": [], "more": False}),
    ]
    for op, args, turns, expected in heavy:
        before = client_reads(primary)
        light, answer = run(heavy_then_light(servers[0], alice, op, args))
        assert light == protocol.reply("light", {"messages": [], "more": False}), (
            f"the read that needs one query, pipelined behind {op} {args}, was answered "
            f"after it: {op} held its turn for the whole inbox ({light})"
        )
        assert answer["type"] == "reply", answer
        result = answer["result"]
        if op == "read":
            result = {**result, "messages": [m["body"] for m in result["messages"]]}
        assert result == expected
        assert client_reads(primary) - before == turns, f"{op} {args}: {turns} read turns"

    # A login counts the unread messages before its write: a window per read turn,
    # none of it in the writer's batch. (The read above marked carol's two read.)
    async def carol_sends() -> None:
        async with Client(servers, token=carol) as client:
            await client.send("alice", "new 3")

    run(carol_sends())
    before = client_reads(primary)

    async def login() -> dict[str, Any]:
        async with Client(servers) as client:
            return dict(await client.login("alice", PASSWORD))

    assert {k: v for k, v in run(login()).items() if k != "token"} == {
        "user": "alice",
        "user_id": 4,
        "unread": 1,
    }
    assert client_reads(primary) - before == 3, "the login's count: three windows"
