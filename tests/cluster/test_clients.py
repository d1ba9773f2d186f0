"""What clients see across a failover (SPEC sections 3 and 8).

* A write retried with the same request id after the primary died is applied
  once, whether its first reply was received or lost.
* The same user name registered by several clients while the primary dies:
  one account, one winner, the others told ``conflict``.
* A ``listen`` stream follows the primary to its successor and delivers every
  message once, in order.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import pytest

from ops.cluster.history import OK, History
from ops.cluster.waiting import wait_for
from service import errors, protocol
from service.client import Client, new_request_id
from service.config import parse_address
from tests.conftest import ClusterFactory
from tests.helpers.cluster import Cluster, NodeProcess
from tests.helpers.workload import (
    PASSWORD,
    finish,
    new_user,
    run,
    send_recorded,
    start_cluster,
    stopped_storage,
    stored_messages,
    view_of,
    wait_committed,
    wait_settled,
)

pytestmark = pytest.mark.cluster


async def send_with_id(cluster: Cluster, token: str, body: str, request_id: str) -> int:
    async with Client(cluster.servers, token=token) as client:
        result = await client.call("send", {"to": "alice", "body": body}, request_id=request_id)
    return int(result["message"]["id"])


def send_unanswered(node: NodeProcess, token: str, body: str, request_id: str) -> socket.socket:
    """Send a ``send`` request to ``node`` and never read the reply (it is lost with the node).

    Returns the open socket; the caller closes it once it is done with the node.
    """
    host, port = parse_address(node.address)
    sock = socket.create_connection((host, port), timeout=5.0)
    decoder = protocol.FrameDecoder()
    frames: list[protocol.Frame] = []
    while not frames:
        frames += decoder.feed(sock.recv(65536))
    sock.sendall(protocol.encode_frame(protocol.client_hello(protocol.choose_version(frames[0]))))
    while len(frames) < 2:  # the welcome: a request sent before it is a protocol violation
        frames += decoder.feed(sock.recv(65536))
    args = {"to": "alice", "body": body}
    sock.sendall(protocol.encode_frame(protocol.request("send", request_id, args, token)))
    return sock


def bodies_stored(cluster: Cluster, body: str) -> list[int]:
    """The ids under which every node stores ``body`` (checked identical across nodes)."""
    per_node = {
        node.node_id: [m.id for m in stored_messages(node) if m.body == body]
        for node in cluster.nodes.values()
    }
    first = next(iter(per_node.values()))
    assert all(ids == first for ids in per_node.values()), per_node
    return first


@pytest.mark.parametrize("first_reply", ["received", "lost"])
def test_a_retry_with_the_same_request_id_across_a_failover_sends_once(
    cluster_factory: ClusterFactory, first_reply: str
) -> None:
    cluster = cluster_factory()
    start_cluster(cluster)
    primary = wait_settled(cluster)
    token = run(new_user(cluster.servers, "alice"))
    request_id = new_request_id()
    body = f"once, first reply {first_reply}"
    if first_reply == "received":
        first_id: int | None = run(send_with_id(cluster, token, body, request_id))
    else:
        seq = view_of(primary).seq
        sock = send_unanswered(primary, token, body, request_id)
        wait_committed(primary, seq, "the send committed")
        first_id = None
    primary.kill()
    if first_reply == "lost":
        sock.close()
    assert cluster.wait_for_primary() is not primary
    retried_id = run(send_with_id(cluster, token, body, request_id))
    assert first_id in (None, retried_id)
    primary.start()
    finish(cluster)
    assert bodies_stored(cluster, body) == [retried_id]


def test_one_name_registered_concurrently_across_a_failover_gives_one_account(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory()
    start_cluster(cluster)
    primary = wait_settled(cluster)
    names = ["carol", "Carol", "CAROL"]  # names are unique without regard to case
    passwords = [f"{PASSWORD}-{i}" for i in range(len(names))]
    outcomes: list[Any] = [None] * len(names)

    async def register(i: int, gate: asyncio.Barrier) -> None:
        async with Client(cluster.servers, timeout=30.0) as client:
            await gate.wait()
            try:
                outcomes[i] = await client.register(names[i], passwords[i])
            except errors.ChatError as exc:
                outcomes[i] = exc

    async def race(started: threading.Event) -> None:
        # Every registration waits at the gate, and this task too: they leave together.
        gate = asyncio.Barrier(len(names) + 1)
        tasks = [asyncio.create_task(register(i, gate)) for i in range(len(names))]
        await gate.wait()
        started.set()
        await asyncio.gather(*tasks)

    started = threading.Event()
    seq = view_of(primary).seq
    racing = threading.Thread(target=asyncio.run, args=(race(started),), daemon=True)
    racing.start()
    wait_for(started.is_set, 10.0, "the registrations to start")
    # Kill once the first registration is committed, the others still in flight.
    wait_committed(primary, seq, "a registration committed")
    primary.kill()
    racing.join(60.0)
    assert not racing.is_alive(), "a registration never returned"
    winners = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, dict)]
    losers = [outcome for outcome in outcomes if not isinstance(outcome, dict)]
    assert len(winners) == 1, f"outcomes: {outcomes}"
    assert all(isinstance(outcome, errors.Conflict) for outcome in losers), outcomes
    (winner,) = winners
    run(login_ok(cluster, names[winner], passwords[winner]))
    primary.start()
    finish(cluster)
    for node in cluster.nodes.values():
        accounts = accounts_named(node, "carol")
        assert accounts == [names[winner]], f"node {node.node_id} holds {accounts}"


async def login_ok(cluster: Cluster, name: str, password: str) -> None:
    async with Client(cluster.servers) as client:
        await client.login(name, password)


def accounts_named(node: NodeProcess, name: str) -> list[str]:
    with stopped_storage(node) as storage:
        rows = storage.db.execute("SELECT name FROM users WHERE lower(name) = ?", (name,))
    return [str(row[0]) for row in rows]


def test_listen_survives_a_failover_without_gap_or_duplicate(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory()
    start_cluster(cluster)
    primary = wait_settled(cluster)
    history = History()
    received: list[dict[str, Any]] = []
    sent_before_kill = threading.Event()
    killed = threading.Event()

    async def scenario() -> None:
        listener_token = await new_user(cluster.servers, "alice")
        sender_token = await new_user(cluster.servers, "bob")
        async with (
            Client(cluster.servers, token=listener_token) as listener,
            Client(cluster.servers, token=sender_token) as sender,
        ):

            async def listen() -> None:
                async for message in listener.listen():
                    received.append(message)

            stream = asyncio.create_task(listen())
            for n in range(60):
                if n == 20:
                    sent_before_kill.set()
                    await asyncio.to_thread(killed.wait, 30.0)
                await send_recorded(sender, "bob", "alice", f"live {n}", history)
            acked = {r.body for r in history.of_kind("send", OK)}
            await asyncio.to_thread(
                wait_for,
                lambda: acked <= {m["body"] for m in received},
                30.0,
                "the listener to receive every acknowledged message",
            )
            stream.cancel()

    thread = threading.Thread(target=asyncio.run, args=(scenario(),), daemon=True)
    thread.start()
    wait_for(sent_before_kill.is_set, 30.0, "20 messages sent before the kill")
    primary.kill()
    killed.set()
    cluster.wait_for_primary()
    thread.join(90.0)
    assert not thread.is_alive(), "the listen scenario never finished"
    ids = [m["id"] for m in received]
    assert ids == sorted(set(ids)), f"out of order or duplicated: {ids}"
    bodies = [m["body"] for m in received]
    assert len(bodies) == len(set(bodies))
    acked = [r.body for r in history.of_kind("send", OK)]
    assert [b for b in bodies if b in acked] == acked
    assert set(bodies) <= {r.body for r in history.ops}
    primary.start()
    finish(cluster, history)


def test_listen_gets_a_message_whose_sender_hung_up_before_the_acknowledgement(
    cluster_factory: ClusterFactory,
) -> None:
    """A send commits on the primary while its backups are frozen, and its client
    hangs up before the acknowledgement (a client timeout). Once acknowledged the
    message must still reach the recipient's listen stream: no gap (SPEC section 3)."""
    cluster = cluster_factory()
    start_cluster(cluster)
    primary = wait_settled(cluster)
    backups = [n for n in cluster.nodes.values() if n is not primary]
    received: list[int] = []

    async def raw_send_then_hang_up(token: str) -> None:
        host, port = parse_address(primary.address)
        reader, writer = await asyncio.open_connection(host, port)
        decoder = protocol.FrameDecoder()
        while not decoder.feed(await reader.read(65536)):
            pass
        writer.write(protocol.encode_frame(protocol.client_hello(1)))
        while not decoder.feed(await reader.read(65536)):
            pass
        seq = primary.view()
        assert seq is not None
        before = seq.seq
        request = protocol.request("send", new_request_id(), {"to": "alice", "body": "gap?"}, token)
        writer.write(protocol.encode_frame(request))
        await writer.drain()
        await asyncio.to_thread(
            wait_for,
            lambda: (view := primary.view()) is not None and view.seq > before,
            10.0,
            "the primary to commit the send locally",
        )
        writer.close()

    async def scenario() -> list[int]:
        listener_token = await new_user(cluster.servers, "alice")
        sender_token = await new_user(cluster.servers, "bob")
        async with (
            Client(cluster.servers, token=listener_token) as listener,
            Client(cluster.servers, token=sender_token) as sender,
        ):

            async def listen() -> None:
                async for message in listener.listen():
                    received.append(int(message["id"]))

            stream = asyncio.create_task(listen())
            first = (await sender.send("alice", "one"))["message"]["id"]
            await asyncio.to_thread(wait_for, lambda: first in received, 10.0, "message one")
            for node in backups:
                node.freeze()
            await raw_send_then_hang_up(sender_token)
            # The primary notices the hang-up before anything is acknowledged.
            await asyncio.to_thread(wait_for, primary.status, 10.0, "the primary to answer")
            for node in backups:
                node.thaw()
            last = (await sender.send("alice", "three"))["message"]["id"]
            await asyncio.to_thread(wait_for, lambda: last in received, 20.0, "message three")
            inbox = await listener.read(limit=10, oldest_first=True)
            stream.cancel()
            return [int(m["id"]) for m in inbox["messages"]]

    inbox = asyncio.run(scenario())
    assert len(inbox) == 3, inbox
    assert received == inbox, f"listen got {received}, the inbox holds {inbox}"
    finish(cluster, History())
