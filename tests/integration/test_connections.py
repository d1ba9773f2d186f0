"""Connection limits, frame limits, the end of listen streams, and quiet refusals.

Real node processes, raw sockets where a client would misbehave:

* A ``listen`` stream lives as long as its session: when its token logs out
  (from another connection) the stream ends with one ``auth_failed`` error
  frame carrying the listen's request id and gets nothing more, while a stream
  of another session of the same user goes on; the connection then idles out
  like any other. Deleting the account ends every stream of the user.
* A node serves at most ``max_clients`` clients: a client hello beyond that
  gets one retriable ``busy`` error frame and the connection is closed, the
  clients already connected keep working, and the cluster's own nodes still get
  through (a restarted backup links to full nodes whose handshake slots are
  taken by silent connections, and catches up). Refusals are logged with the
  dialer's address, a line per interval with a count. A full node welcomes a
  client from an address holding fewer connections than the most crowded one,
  whose oldest connection gives way with ``busy``.
* A frame declared longer than the limit is refused from its header at once,
  before and after the handshake (the node does not wait for a body it would
  buffer), and the node's memory does not grow; the largest legal requests
  still fit the client frame limit.
* ``listen`` with an ``after`` outside SQLite's integers is ``invalid`` and
  leaves no traceback in the log.
* Peer hellos with a bad MAC are logged with the dialer's address, at most once
  per ``log_interval`` with a count of the others.

The bystander of ``test_bad_input`` runs through the single-node tests and
must never be disturbed; those tests end with its checks (node alive, no
traceback in its log).
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from ops.cluster.waiting import wait_for
from service import chat, protocol
from service.client import Client, new_request_id
from service.config import parse_address
from tests.conftest import ClusterFactory
from tests.helpers.cluster import Cluster, NodeProcess
from tests.helpers.workload import wait_settled
from tests.integration.test_bad_input import Bystander, Raw, close_all, run
from tests.integration.test_security import peer_attempt

pytestmark = pytest.mark.cluster

PASSWORD = "connections-password"
ANSWER_TIMEOUT = 5.0
IDLE_TIMEOUT = 2.0
# Long timeouts where a test shows the node did NOT wait for them.
LONG_HANDSHAKE = 30.0
LONG_IDLE = 60.0
# A refusal the node makes from a frame header comes in well under a second.
PROMPTLY = 3.0
LOG_INTERVAL = 1.0
CLOSE_MARGIN = 10.0

Frame = protocol.Frame


def single(cluster_factory: ClusterFactory, **settings: object) -> Cluster:
    cluster = cluster_factory(n=1, log_interval=LOG_INTERVAL, **settings)
    cluster.start()
    cluster.wait_for_primary()
    return cluster


async def login(raw: Raw, user: str) -> str:
    answer = await raw.answer(
        protocol.request("login", new_request_id(), {"username": user, "password": PASSWORD})
    )
    assert answer["type"] == "reply", answer
    return str(answer["result"]["token"])


async def listen(address: str, token: str) -> tuple[Raw, str]:
    """A raw connection listening with ``token``; returns it and the listen's request id."""
    raw = await Raw.client(address)
    request_id = new_request_id()
    answer = await raw.answer(protocol.request("listen", request_id, {"after": None}, token))
    assert answer == {
        "type": "reply",
        "request_id": request_id,
        "result": {"listening": True},
    }, answer
    return raw, request_id


async def pushed(raw: Raw, request_id: str) -> Frame:
    """The next frame of the stream ``request_id`` (a message or the error ending it)."""
    while True:
        try:
            frame = await raw.next_frame(ANSWER_TIMEOUT)
        except TimeoutError:
            raise AssertionError(
                f"nothing on the stream {request_id} in {ANSWER_TIMEOUT}s"
            ) from None
        assert frame is not None, "the node closed a listening connection"
        if frame.get("request_id") == request_id:
            return frame


def assert_stream_ended(frame: Frame, request_id: str) -> None:
    assert frame["type"] == "error", f"the stream went on after its session ended: {frame}"
    assert frame["request_id"] == request_id, frame
    assert frame["code"] == "auth_failed", frame
    assert frame["retriable"] is False, frame


# ---- listen streams end with their session ---------------------------------------------------


def test_a_listen_stream_ends_when_its_token_logs_out(cluster_factory: ClusterFactory) -> None:
    cluster = single(cluster_factory, idle_client_timeout=IDLE_TIMEOUT)
    address = cluster.servers[0]

    async def scenario(user: Bystander) -> None:
        async with Client(cluster.servers, timeout=ANSWER_TIMEOUT) as setup:
            await setup.register("alice", PASSWORD)
            await setup.register("bob", PASSWORD)
            await setup.login("bob", PASSWORD)
            other = await Raw.client(address)
            ended_token, kept_token = await login(other, "alice"), await login(other, "alice")
            ended, ended_id = await listen(address, ended_token)
            kept, kept_id = await listen(address, kept_token)
            first = (await setup.send("alice", "before the logout"))["message"]
            for raw, request_id in ((ended, ended_id), (kept, kept_id)):
                assert (await pushed(raw, request_id))["message"] == first

            answer = await other.answer(
                protocol.request("logout", new_request_id(), {}, ended_token)
            )
            assert answer["type"] == "reply", answer
            assert_stream_ended(await pushed(ended, ended_id), ended_id)

            second = (await setup.send("alice", "after the logout"))["message"]
            assert (await pushed(kept, kept_id))["message"] == second
            # The ended stream got nothing more: the fence's reply comes first.
            await ended.no_more_answers_for(ended_id)
            whoami = await ended.answer(protocol.request("whoami", "who", {}, ended_token))
            assert whoami["code"] == "auth_failed", whoami
            # With its stream over, the connection idles out like any other.
            started = time.monotonic()
            frames = await ended.closed_by_node(IDLE_TIMEOUT + CLOSE_MARGIN)
            assert all(f["type"] != "message" for f in frames), frames
            assert time.monotonic() - started < IDLE_TIMEOUT + CLOSE_MARGIN
            # The other session's stream is still served.
            third = (await setup.send("alice", "still listening"))["message"]
            assert (await pushed(kept, kept_id))["message"] == third
        await user.wait_progress()

    run(cluster, scenario)


async def next_messages(stream: Any, count: int) -> list[dict[str, Any]]:
    return [await asyncio.wait_for(anext(stream), ANSWER_TIMEOUT) for _ in range(count)]


def test_a_backlog_of_many_pages_streams_in_order_then_live_messages(
    cluster_factory: ClusterFactory,
) -> None:
    """``listen`` reads its backlog a page at a time (``chat.BACKLOG_PAGE``): every
    message comes once, in order, across the pages, with a live one after them;
    and so for a listen that resumes after a given id."""
    cluster = single(cluster_factory)
    total = 2 * chat.BACKLOG_PAGE + 7

    async def scenario(user: Bystander) -> None:
        async with Client(cluster.servers, timeout=ANSWER_TIMEOUT) as bob:
            await bob.register("alice", PASSWORD)
            await bob.register("bob", PASSWORD)
            await bob.login("bob", PASSWORD)
            sent = []
            for start in range(0, total, 100):
                results = await asyncio.gather(
                    *(bob.send("alice", f"note {i}") for i in range(start, min(total, start + 100)))
                )
                sent += sorted(int(r["message"]["id"]) for r in results)
            async with Client(cluster.servers, timeout=ANSWER_TIMEOUT) as alice:
                await alice.login("alice", PASSWORD)
                stream = alice.listen()
                backlog = await next_messages(stream, total)
                assert [m["id"] for m in backlog] == sent
                live = int((await bob.send("alice", "live"))["message"]["id"])
                assert [m["id"] for m in await next_messages(stream, 1)] == [live]
                await stream.aclose()
                resumed = alice.listen(after=sent[chat.BACKLOG_PAGE - 1])
                rest = await next_messages(resumed, total - chat.BACKLOG_PAGE + 1)
                assert [m["id"] for m in rest] == [*sent[chat.BACKLOG_PAGE :], live]
                await resumed.aclose()
        await user.wait_progress()

    run(cluster, scenario)


def test_deleting_the_account_ends_every_stream_of_the_user(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = single(cluster_factory)
    address = cluster.servers[0]

    async def scenario(user: Bystander) -> None:
        async with Client(cluster.servers, timeout=ANSWER_TIMEOUT) as setup:
            await setup.register("carol", PASSWORD)
            await setup.register("dave", PASSWORD)
            await setup.login("dave", PASSWORD)
            other = await Raw.client(address)
            tokens = [await login(other, "carol") for _ in range(3)]
            streams = [await listen(address, token) for token in tokens[:2]]
            dave_stream, dave_id = await listen(address, str(setup.token))

            answer = await other.answer(
                protocol.request("delete_account", new_request_id(), {}, tokens[2])
            )
            assert answer["type"] == "reply", answer
            for raw, request_id in streams:
                assert_stream_ended(await pushed(raw, request_id), request_id)
            # Another user's stream is untouched.
            note = (await setup.send("dave", "a note to self"))["message"]
            assert (await pushed(dave_stream, dave_id))["message"] == note
        await user.wait_progress()

    run(cluster, scenario)


# ---- the client cap; peers always get through ------------------------------------------------


async def client_hello(address: str, source: str | None = None) -> tuple[Raw, Frame | None]:
    """Connect (from ``source``), say hello as a client; the node's answer (None: it closed)."""
    raw = await Raw.connect(address, source)
    raw.send(protocol.client_hello(protocol.choose_version(raw.hello)))
    return raw, await raw.next_frame()


async def fill(address: str, limit: int) -> list[Raw]:
    """Client connections until the node refuses one; at most ``limit`` are welcomed."""
    welcomed: list[Raw] = []
    for _ in range(limit + 1):
        raw, answer = await client_hello(address)
        assert answer is not None, f"{address} closed a client hello without an answer"
        if answer["type"] != "welcome":
            await expect_busy(raw, answer, address)
            return welcomed
        welcomed.append(raw)
    raise AssertionError(f"{address} welcomed {limit + 1} clients with max_clients={limit}")


async def expect_busy(raw: Raw, answer: Frame | None, what: str) -> None:
    assert answer is not None, f"{what}: closed without an error frame"
    assert answer["type"] == "error", f"{what}: {answer}"
    assert answer["code"] == "busy", f"{what}: {answer}"
    assert answer["request_id"] is None, f"{what}: {answer}"
    assert answer["retriable"] is True, f"{what}: {answer}"
    assert answer["message"], f"{what}: {answer}"
    rest = await raw.closed_by_node(PROMPTLY)
    assert rest == [], f"{what}: more after the refusal: {rest}"


def operator_status(address: str, secret: bytes) -> dict[str, Any]:
    """``status`` over an operator (node 0) connection: a peer's way in, not a client's."""
    frames = peer_attempt(address, secret, 0, [{"type": "status"}], pipelined=False)
    assert [frame["type"] for frame in frames] == ["welcome", "reply"], frames
    node: dict[str, Any] = frames[1]["result"]
    return node


def throttled_lines(node: NodeProcess, event: str) -> list[tuple[str, int]]:
    """(address, suppressed) of each line of a throttled ``event`` in the node's log."""
    pattern = re.compile(re.escape(event) + r" address=(\S+).* suppressed=(\d+)")
    return [(match[1], int(match[2])) for match in pattern.finditer(node.log_text())]


def wait_all_logged(node: NodeProcess, event: str, at_least: int) -> list[tuple[str, int]]:
    """Wait until the lines of ``event`` account for ``at_least`` events."""

    def accounted() -> list[tuple[str, int]] | None:
        lines = throttled_lines(node, event)
        return lines if sum(1 + suppressed for _, suppressed in lines) >= at_least else None

    return wait_for(
        accounted, 3 * LOG_INTERVAL + CLOSE_MARGIN, f"node {node.node_id} to log {at_least} {event}"
    )


def test_clients_over_the_cap_are_refused_and_peers_still_get_through(
    cluster_factory: ClusterFactory,
) -> None:
    max_clients, max_handshakes, extra = 12, 8, 5
    cluster = cluster_factory(
        max_clients=max_clients,
        max_handshakes=max_handshakes,
        handshake_timeout=LONG_HANDSHAKE,
        idle_client_timeout=LONG_IDLE,
        log_interval=LOG_INTERVAL,
    )
    cluster.start()
    primary = wait_settled(cluster)
    secret = cluster.secret_file.read_bytes().strip()
    backups = sorted(n.node_id for n in cluster.nodes.values() if n is not primary)
    # The lowest backup dials every node above it when it restarts, and node 1 is
    # dialled by nobody: restart the lowest, so some full node must accept its link.
    restarted = cluster[backups[0]]

    async def main() -> None:
        try:
            await scenario()
        finally:
            await close_all(Raw.opened)

    async def scenario() -> None:
        async with Client([primary.address], timeout=ANSWER_TIMEOUT) as bystander:
            await bystander.register("erin", PASSWORD)
            await bystander.login("erin", PASSWORD)
            await bystander.send("erin", "connected before the crowd")
            started = time.monotonic()
            for node in cluster.nodes.values():
                crowd = await fill(node.address, max_clients)
                assert len(crowd) >= max_clients - 2, (node, len(crowd))
                for index in range(extra):
                    raw, answer = await client_hello(node.address)
                    await expect_busy(raw, answer, f"client {index} over the cap of {node}")
                # Strangers that never say hello take every handshake slot.
                for _ in range(max_handshakes):
                    await Raw.connect(node.address)
            # The client connected before the crowd is still served.
            await bystander.send("erin", "served while the node is full")
            elapsed = time.monotonic() - started

            await asyncio.to_thread(restarted.restart)
            # Its peers are full of clients and silent handshakes, yet it links and
            # catches up: the primary counts it in sync again.
            await asyncio.to_thread(wait_in_sync_by_operator, primary, restarted, secret)
            sent = await bystander.send("erin", "replicated to the restarted node")
            await asyncio.to_thread(wait_in_sync_by_operator, primary, restarted, secret)
            assert restarted.status() is not None
        for node in cluster.nodes.values():
            if node is restarted:
                continue
            lines = wait_all_logged(node, "client refused: busy", extra + 1)
            assert all(address.startswith("127.0.0.1:") for address, _ in lines), lines
            assert len(lines) <= 3 + elapsed / LOG_INTERVAL, lines
        assert sent["message"]["id"] > 0

    asyncio.run(main())
    wait_settled(cluster)
    cluster.check_invariants()


def test_a_full_node_makes_room_for_another_address_by_closing_the_crowds_oldest(
    cluster_factory: ClusterFactory,
) -> None:
    """A hello needs no account: one host's idle connections used to take every
    slot, and a client from anywhere else was refused ``busy`` (service/slots.py)."""
    max_clients = 6
    cluster = single(cluster_factory, max_clients=max_clients, idle_client_timeout=LONG_IDLE)
    (node,) = cluster.nodes.values()

    async def main() -> None:
        try:
            crowd = await fill(node.address, max_clients)  # all from 127.0.0.1
            assert len(crowd) >= max_clients - 2, len(crowd)
            newcomer, answer = await client_hello(node.address, source="127.0.0.2")
            assert answer is not None, "the node closed the newcomer's hello unanswered"
            assert answer["type"] == "welcome", answer
            # The crowd's oldest connection gave way, with a busy error frame.
            await expect_busy(crowd[0], await crowd[0].next_frame(), "the crowd's oldest")
            # Another from the crowd's address is still refused; the rest of the
            # crowd and the newcomer are served.
            raw, answer = await client_hello(node.address)
            await expect_busy(raw, answer, "one more from the crowd's address")
            for served in (newcomer, crowd[-1]):
                reply = await served.answer(protocol.request("status", new_request_id(), {}))
                assert reply["type"] == "reply", reply
            # A second newcomer from yet another address gets in too.
            _, answer = await client_hello(node.address, source="127.0.0.3")
            assert answer is not None
            assert answer["type"] == "welcome", answer
            await expect_busy(crowd[1], await crowd[1].next_frame(), "the crowd's next oldest")
        finally:
            await close_all(Raw.opened)

    asyncio.run(main())
    lines = wait_all_logged(node, "client closed to make room for another address", 2)
    assert all(address == "127.0.0.1" for address, _ in lines), lines


def wait_in_sync_by_operator(primary: NodeProcess, node: NodeProcess, secret: bytes) -> None:
    def in_sync() -> bool:
        status = operator_status(primary.address, secret)
        return node.node_id in (status.get("in_sync") or []) and not any(
            status.get("lag", {}).values()
        )

    wait_for(in_sync, 30, f"node {node.node_id} in the primary's sync set, caught up")


# ---- frame limits ----------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_declared_oversized_frame_is_refused_at_once(cluster_factory: ClusterFactory) -> None:
    cluster = single(
        cluster_factory, handshake_timeout=LONG_HANDSHAKE, idle_client_timeout=LONG_IDLE
    )
    address = cluster.servers[0]
    pid = cluster[1].pid
    assert pid is not None
    # As large as the peer frame limit: legal for an authenticated peer only.
    declared = protocol.HEADER.pack(protocol.DEFAULT_MAX_FRAME)
    body = bytes(1024 * 1024)
    # Over 64 KiB of valid JSON: a client request no legal operation needs.
    padded = protocol.encode_frame(protocol.request("status", "padded", {"pad": "x" * 70_000}))

    async def refused_at_once(raw: Raw, what: str) -> None:
        started = time.monotonic()
        frames = await raw.closed_by_node(PROMPTLY)
        assert len(frames) == 1, f"{what}: {frames}"
        assert frames[0]["type"] == "error", (what, frames)
        assert frames[0]["code"] == "too_large", (what, frames)
        assert frames[0]["request_id"] is None, (what, frames)
        assert time.monotonic() - started < PROMPTLY, what

    async def scenario(user: Bystander) -> None:
        before = rss_kib(pid)
        # Only the header and a few bytes: the node must answer without the body.
        raw = await Raw.connect(address)
        raw.send_bytes(declared + body[:16])
        await refused_at_once(raw, "8 MiB declared instead of a hello")
        raw = await Raw.client(address)
        raw.send_bytes(declared + body[:16])
        await refused_at_once(raw, "8 MiB declared after the welcome")
        raw = await Raw.client(address)
        raw.send_bytes(padded[:100])
        await refused_at_once(raw, "a 70 KB request")
        # Twenty senders each declaring the peer limit and pushing 2 MiB, half before
        # their hello and half after their welcome, five times over: each is closed
        # at once (the node resets what it did not read, so the error frame may be
        # lost), and nothing of it stays with the node. A refused connection used to
        # leave a cycle of objects (a task and the error it kept, whose traceback
        # held the task; the decoder and its error; the session and its protocol)
        # that only the collector's rare full pass freed, with the connection's
        # buffers: some 15 MB more after every twenty, 45-60 MB after five rounds.
        for _ in range(5):
            crowd = [await Raw.connect(address) for _ in range(10)]
            crowd += [await Raw.client(address) for _ in range(10)]
            for each in crowd:
                each.send_bytes(declared + body + body)
            for index, each in enumerate(crowd):
                frames = await each.closed_by_node(PROMPTLY)
                assert all(f.get("code") == "too_large" for f in frames), (index, frames)
            await user.wait_progress()
        grown = rss_kib(pid) - before
        assert grown < 6 * 1024, f"the node grew by {grown} KiB after refusing big frames"

        # The largest legal requests still fit the client frame limit.
        async with Client(cluster.servers, timeout=ANSWER_TIMEOUT) as setup:
            await setup.register("frank", PASSWORD)
            await setup.login("frank", PASSWORD)
            token = str(setup.token)
        client = await Raw.client(address)
        widest = "\U0001f600" * 4000
        send = protocol.request("send", "widest", {"to": "frank", "body": widest}, token)
        escaped = json.dumps(send, ensure_ascii=True).encode()  # 12 bytes a character
        assert len(escaped) > 48_000
        client.send_body(escaped)
        answer = await client.first_answer("the widest send")
        assert answer["type"] == "reply", answer
        assert answer["result"]["message"]["body"] == widest
        ids = [2**63 - 1 - i for i in range(1000)]
        mark = protocol.request("mark_read", "most", {"ids": ids}, token)
        answer = await client.answer(mark)
        assert answer["type"] == "reply", answer
        assert answer["result"] == {"marked": 0}, answer

    run(cluster, scenario)


# ---- out-of-range integers; bad peer MACs -----------------------------------------------------


def test_listen_after_out_of_range_is_invalid_without_a_traceback(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = single(cluster_factory)
    address = cluster.servers[0]

    async def scenario(user: Bystander) -> None:
        async with Client(cluster.servers, timeout=ANSWER_TIMEOUT) as setup:
            await setup.register("grace", PASSWORD)
            await setup.login("grace", PASSWORD)
            token = str(setup.token)
        raw = await Raw.client(address)
        for args in (
            {"after": 2**64 - 1},
            {"after": 2**63},
            {"after": -1},
            {"after": True},
            {"after": 1.5},
            {"after": None, "since": 3},
        ):
            request_id = new_request_id()
            answer = await raw.answer(protocol.request("listen", request_id, args, token))
            assert answer["type"] == "error", (args, answer)
            assert answer["code"] == "invalid", (args, answer)
            assert answer["request_id"] == request_id, (args, answer)
            await raw.no_more_answers_for(request_id)
        # The largest id is fine.
        await listen(address, token)
        listening = await raw.answer(protocol.request("listen", "top", {"after": 2**63 - 1}, token))
        assert listening["type"] == "reply", listening
        await user.wait_progress()

    run(cluster, scenario)  # ends with: no traceback in the node's log


def bad_mac_hello(address: str) -> str:
    """Dial as node 2 with a wrong secret; return our address as the node saw it."""
    host, port = parse_address(address)
    decoder = protocol.FrameDecoder()
    with socket.create_connection((host, port), timeout=ANSWER_TIMEOUT) as sock:
        mine = "{}:{}".format(*sock.getsockname()[:2])
        frames: list[Frame] = []
        while not frames:
            frames += decoder.feed(sock.recv(65536))
        hello = protocol.peer_hello(
            1, secrets.token_bytes(32), str(frames[0]["nonce"]), 2, 1, protocol.new_nonce()
        )
        sock.sendall(protocol.encode_frame(hello))
        answers: list[Frame] = []
        while data := sock.recv(65536):
            answers += decoder.feed(data)
    assert [a.get("code") for a in answers] == ["protocol"], answers
    return mine


def test_bad_peer_macs_are_logged_with_the_address_once_per_interval(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = single(cluster_factory)
    node = cluster[1]
    attempts = 30
    started = time.monotonic()
    dialers = {bad_mac_hello(node.address) for _ in range(attempts)}
    elapsed = time.monotonic() - started
    lines = wait_all_logged(node, "peer hello refused", attempts)
    assert sum(1 + suppressed for _, suppressed in lines) == attempts, lines
    assert {address for address, _ in lines} <= dialers, (lines, dialers)
    # One line when it starts, then at most one per interval (and one closing it).
    assert len(lines) <= 3 + elapsed / LOG_INTERVAL, lines
    assert "failed authentication" in node.log_text()
    assert "Traceback" not in node.log_text()


def test_a_node_stopping_with_clients_connected_logs_no_error(
    cluster_factory: ClusterFactory,
) -> None:
    """SIGTERM while clients are connected (mid-handshake and after it): their
    handlers are cancelled, and the node stops with no error or traceback."""
    cluster = single(cluster_factory)
    node = cluster[1]

    async def connect_then_stop() -> None:
        raws = [(await client_hello(node.address))[0] for _ in range(5)]
        raws.append(await Raw.connect(node.address))  # still in its handshake
        assert node.stop() == 0
        await close_all(raws)

    asyncio.run(connect_then_stop())
    log = node.log_text()
    assert "Traceback" not in log
    assert " ERROR " not in log
