"""Bad input against a real node: garbage, broken frames, stalls, bad requests, false peers.

SPEC section 5: "Garbage, truncated frames, oversized lengths, slow or half-open
connections and unknown request types get an error or a closed connection and
never disturb other clients or stop the node." Each test starts one real node
process (short ``handshake_timeout`` and ``idle_client_timeout`` so stalls end
quickly) and, for its whole length, runs a *bystander*: a well-behaved
``service.client.Client`` that keeps registering, sending and reading in the
background and must succeed every time. Against it, raw sockets send what a
broken or hostile client or peer would, and check the node's answer as
``service/PROTOCOL.md`` states it:

* a frame that breaks the framing (garbage, a length over ``max_frame``, a frame
  cut short) gets one error frame with ``request_id`` null (``protocol`` or
  ``too_large``) and the connection is closed;
* a bad request (unknown op, wrong argument types, unknown user, bad token)
  with a usable request id gets exactly one error frame carrying that id, with
  the right code, changes nothing in the database, and the connection stays open;
* a connection that stalls in the handshake, or mid-frame, is closed by the
  node after its timeout; many idle connections cost nothing lasting;
* a peer without the cluster secret is refused and replicates nothing.

Every test ends with the same checks: the bystander made progress and never
failed, its acknowledged messages are all there, the node process is alive and
answers, and its log holds no traceback.

Waiting is on observable state (a frame, a closed socket, a count of the
bystander's successes) with a deadline. The one pause in this file paces a
deliberately slow sender; it never waits for state.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, ClassVar

import pytest

from ops.cluster.probe import probe_status
from ops.cluster.waiting import wait_for
from service import protocol
from service.client import Client, new_request_id
from service.errors import ChatError
from tests.conftest import ClusterFactory
from tests.helpers.cluster import Cluster

HANDSHAKE_TIMEOUT = 1.0
IDLE_TIMEOUT = 2.0
# How long the node may take to close a stalled connection after its timeout.
CLOSE_MARGIN = 10.0
ANSWER_TIMEOUT = 5.0
PASSWORD = "bystander-password"

Frame = protocol.Frame


@pytest.fixture
def single_node(cluster_factory: ClusterFactory) -> Cluster:
    """A one-node cluster, started and primary, with short handshake and idle timeouts."""
    cluster = cluster_factory(
        n=1, handshake_timeout=HANDSHAKE_TIMEOUT, idle_client_timeout=IDLE_TIMEOUT
    )
    cluster.start()
    cluster.wait_for_primary()
    return cluster


# ---- the bystander -----------------------------------------------------------------------


class Bystander:
    """A well-behaved user of the node under attack: registers, sends and reads in a loop.

    Every operation must succeed; ``failures`` lists those that did not.
    ``lock`` is held around each operation, so a test holding it knows no
    request of the bystander is in flight (to compare database checksums).
    """

    def __init__(self, servers: list[str]) -> None:
        self.client = Client(servers, timeout=ANSWER_TIMEOUT)
        self.lock = asyncio.Lock()
        self.done = 0
        self.failures: list[str] = []
        self.sent: list[int] = []
        self._changed = asyncio.Condition()
        self._stop = asyncio.Event()

    async def run(self) -> None:
        await self._step("register", self.client.register("bystander", PASSWORD))
        await self._step("register", self.client.register("friend", PASSWORD))
        await self._step("login", self.client.login("bystander", PASSWORD))
        turn = 0
        while not self._stop.is_set():
            turn += 1
            if turn % 10 == 0:
                await self._step("register", self.client.register(f"walker{turn}", PASSWORD))
            elif turn % 5 == 0:
                await self._step("read", self.client.read(sent=True, limit=5))
            else:
                await self._step("send", self._send(f"message {turn}"))

    async def _send(self, body: str) -> dict[str, Any]:
        result = await self.client.send("friend", body)
        self.sent.append(int(result["message"]["id"]))
        return result

    async def _step(self, what: str, operation: Coroutine[Any, Any, object]) -> None:
        async with self.lock:
            try:
                await operation
            except ChatError as exc:
                self.failures.append(f"{what}: {exc.code}: {exc.message}")
            except Exception as exc:  # a bug of the client library or of this test
                self.failures.append(f"{what}: {exc!r}")
            else:
                self.done += 1
        async with self._changed:
            self._changed.notify_all()

    async def wait_progress(self, steps: int = 3, timeout: float = 20.0) -> None:
        """Wait until ``steps`` more operations succeeded; fail at once on a failure."""
        target = self.done + steps
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.done >= target or bool(self.failures)),
                    timeout,
                )
            except TimeoutError:
                raise AssertionError(
                    f"the bystander made {self.done - target + steps} of {steps} steps "
                    f"in {timeout}s"
                ) from None
        assert self.failures == [], f"the bystander was disturbed: {self.failures}"

    async def stop(self, task: asyncio.Task[None]) -> None:
        self._stop.set()
        await asyncio.wait({task}, timeout=ANSWER_TIMEOUT + 1)
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task

    async def check_sent_messages(self) -> None:
        """Every message the bystander had acknowledged is in its sent box."""
        found: set[int] = set()
        before: int | None = None
        while True:
            page = await self.client.read(sent=True, limit=1000, before=before)
            ids = [int(message["id"]) for message in page["messages"]]
            found.update(ids)
            if not page["more"]:
                break
            before = min(ids)
        missing = sorted(set(self.sent) - found)
        assert missing == [], f"acknowledged messages missing: {missing}"


@asynccontextmanager
async def bystander(cluster: Cluster) -> AsyncIterator[Bystander]:
    """Run a bystander for the body of the ``async with``; check it at the end."""
    user = Bystander(cluster.servers)
    task = asyncio.create_task(user.run(), name="bystander")
    try:
        await user.wait_progress(steps=4)
        yield user
        await user.wait_progress()  # still served once the abuse is over
        async with user.lock:
            await user.check_sent_messages()
    finally:
        await user.stop(task)
        await user.client.close()
    assert user.failures == [], f"the bystander was disturbed: {user.failures}"
    assert len(user.sent) >= 3


def assert_node_unharmed(cluster: Cluster) -> None:
    node = cluster[1]
    node.check_alive()
    assert node.is_running
    assert probe_status(node.address) is not None, "the node stopped answering status"
    assert "Traceback" not in node.log_text(), f"a traceback in the log:\n{node.log_tail(60)}"


def run(cluster: Cluster, scenario: Callable[[Bystander], Awaitable[None]]) -> None:
    """Run ``scenario`` while a bystander works, then check the node is unharmed."""

    async def main() -> None:
        try:
            async with bystander(cluster) as user:
                await scenario(user)
        finally:
            await close_all(Raw.opened)

    asyncio.run(main())
    assert_node_unharmed(cluster)


async def close_all(connections: list[Raw]) -> None:
    for raw in connections:
        raw.close()
    for raw in connections:
        with suppress(OSError):
            await raw.writer.wait_closed()
    connections.clear()


# ---- raw connections ---------------------------------------------------------------------


class Raw:
    """One connection driven by hand: any bytes out, frames in, no client library.

    ``opened`` lists every connection of the running scenario, so ``run`` can
    close what a failed scenario left open.
    """

    opened: ClassVar[list[Raw]] = []

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = protocol.FrameDecoder()
        self.ready: list[Frame] = []
        self.hello: Frame = {}
        Raw.opened.append(self)

    @classmethod
    async def connect(cls, address: str, source: str | None = None) -> Raw:
        """Connect (from the loopback address ``source``, if given) and read the node's
        hello (the server speaks first)."""
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(
            host, int(port), local_addr=None if source is None else (source, 0)
        )
        raw = cls(reader, writer)
        hello = await raw.next_frame()
        assert hello is not None, "the node closed before its hello"
        assert hello["type"] == "hello", hello
        raw.hello = hello
        return raw

    @classmethod
    async def client(cls, address: str, source: str | None = None) -> Raw:
        """Connect (from ``source``, as ``connect``) and finish the client handshake."""
        raw = await cls.connect(address, source)
        raw.send(protocol.client_hello(protocol.choose_version(raw.hello)))
        welcome = await raw.next_frame()
        assert welcome is not None, "the node closed instead of welcoming a client"
        assert welcome["type"] == "welcome", welcome
        return raw

    @classmethod
    async def pipelined(cls, address: str, frames: list[Frame]) -> list[Frame]:
        """``frames`` sent in one write on a new client connection: as many answers,
        in the order the node sent them."""
        raw = await cls.client(address)
        try:
            raw.send_bytes(b"".join(protocol.encode_frame(frame) for frame in frames))
            answers: list[Frame] = []
            for _ in frames:
                frame = await raw.next_frame()
                assert frame is not None, f"the node closed the connection after {answers}"
                answers.append(frame)
            return answers
        finally:
            raw.close()

    def send_bytes(self, data: bytes) -> None:
        self.writer.write(data)

    def send(self, frame: Frame) -> None:
        self.writer.write(protocol.encode_frame(frame))

    def send_body(self, body: bytes) -> None:
        """A frame around raw body bytes, valid JSON or not."""
        self.writer.write(protocol.HEADER.pack(len(body)) + body)

    def close(self) -> None:
        self.writer.close()

    async def next_frame(self, timeout: float = ANSWER_TIMEOUT) -> Frame | None:
        """The next frame from the node, or None once it closed the connection."""
        async with asyncio.timeout(timeout):
            while not self.ready:
                try:
                    data = await self.reader.read(65536)
                except (ConnectionResetError, BrokenPipeError):
                    # The node closed on us while we still had bytes to send: the
                    # transport's failed write is how that close shows here.
                    return None
                if not data:
                    return None
                self.ready.extend(self.decoder.feed(data))
        return self.ready.pop(0)

    async def closed_by_node(self, timeout: float) -> list[Frame]:
        """Every frame until the node closes the connection; fails after ``timeout``."""
        frames: list[Frame] = []
        try:
            async with asyncio.timeout(timeout):
                while (frame := await self.next_frame(timeout)) is not None:
                    frames.append(frame)
        except TimeoutError:
            raise AssertionError(
                f"the node kept the connection open for {timeout}s; got {frames}"
            ) from None
        self.close()
        return frames

    async def answer(self, frame: Frame) -> Frame:
        """Send a request; return the reply or error for it (or for the connection)."""
        request_id = frame.get("request_id")
        self.send(frame)
        while True:
            answer = await self.first_answer(str(frame))
            if answer.get("request_id") in (request_id, None):
                return answer

    async def first_answer(self, what: str) -> Frame:
        """The next frame; fails if the node closes or stays silent instead."""
        try:
            answer = await self.next_frame()
        except TimeoutError:
            raise AssertionError(f"no answer within {ANSWER_TIMEOUT}s to {what}") from None
        assert answer is not None, f"the node closed the connection instead of answering {what}"
        return answer

    async def no_more_answers_for(self, request_id: object) -> None:
        """Send a fence (``status``); nothing more for ``request_id`` may come before its reply."""
        fence = protocol.request("status", new_request_id(), {})
        self.send(fence)
        while True:
            frame = await self.next_frame()
            assert frame is not None, "the node closed the connection after a refused request"
            if frame.get("request_id") == fence["request_id"]:
                assert frame["type"] == "reply", frame
                return
            assert frame.get("request_id") != request_id, f"a second answer: {frame}"


def is_connection_error(frame: Frame, *codes: str) -> bool:
    return (
        frame.get("type") == "error" and frame.get("request_id") is None and frame["code"] in codes
    )


async def expect_refused_and_closed(raw: Raw, code: str, what: str) -> None:
    """One error frame with ``code`` about the connection, then the node closes it."""
    frames = await raw.closed_by_node(HANDSHAKE_TIMEOUT + CLOSE_MARGIN)
    assert len(frames) == 1, f"{what}: expected one error frame, got {frames}"
    assert is_connection_error(frames[0], code), f"{what}: {frames[0]}"
    assert isinstance(frames[0]["message"], str)
    assert frames[0]["message"]


async def expect_closed_at_most_one_error(raw: Raw, what: str) -> None:
    """The node closes the connection, with at most one connection error frame."""
    frames = await raw.closed_by_node(IDLE_TIMEOUT + CLOSE_MARGIN)
    assert len(frames) <= 1, f"{what}: {frames}"
    assert all(is_connection_error(f, "protocol", "too_large") for f in frames), f"{what}: {frames}"


def checksums_and_position(cluster: Cluster) -> tuple[dict[str, str], object]:
    node = cluster[1]
    status = probe_status(node.address)
    assert status is not None
    return cluster.checksums(node), status["node"]["position"]


# ---- garbage and broken frames -------------------------------------------------------------

HELLO = protocol.encode_frame(protocol.client_hello(protocol.PROTOCOL_MAX_VERSION))


def test_garbage_and_broken_frames_get_an_error_and_a_closed_connection(
    single_node: Cluster,
) -> None:
    address = single_node.servers[0]
    too_big = protocol.DEFAULT_MAX_FRAME + 1

    async def as_hello(payload: bytes, code: str, what: str) -> None:
        raw = await Raw.connect(address)
        raw.send_bytes(payload)
        await expect_refused_and_closed(raw, code, f"{what} instead of a hello")

    async def after_welcome(payload: bytes, code: str, what: str) -> None:
        raw = await Raw.client(address)
        raw.send_bytes(payload)
        await expect_refused_and_closed(raw, code, f"{what} after the handshake")

    def body(data: bytes) -> bytes:
        return protocol.HEADER.pack(len(data)) + data

    cases = {
        "a length of 0xFFFFFFFF": (protocol.HEADER.pack(0xFFFFFFFF), "too_large"),
        "a length of max_frame + 1": (protocol.HEADER.pack(too_big), "too_large"),
        "an HTTP request": (b"GET / HTTP/1.1\r\nHost: chat\r\n\r\n", "too_large"),
        "a TLS client hello": (bytes.fromhex("160301020001000200fc0303") + bytes(32), "too_large"),
        "a body that is not json": (body(b"GET / HTTP/1.1\r\n\r\n"), "protocol"),
        "a body of invalid utf-8": (body(b'{"type": "\xff"}'), "protocol"),
        "a json array": (body(b'[{"type": "hello"}]'), "protocol"),
        "an object without a type": (body(b'{"version": 1}'), "protocol"),
        "an empty body": (body(b""), "protocol"),
    }

    async def scenario(user: Bystander) -> None:
        for what, (payload, code) in cases.items():
            await as_hello(payload, code, what)
            await after_welcome(payload, code, what)
        await user.wait_progress()

    run(single_node, scenario)


def test_a_bad_hello_is_refused_and_the_connection_closed(single_node: Cluster) -> None:
    address = single_node.servers[0]
    version = protocol.PROTOCOL_MAX_VERSION
    hellos: dict[str, Frame] = {
        "an unsupported version": {"type": "hello", "version": 99, "role": "client"},
        "no version": {"type": "hello", "role": "client"},
        "an unknown role": {"type": "hello", "version": version, "role": "admin"},
        "no role": {"type": "hello", "version": version},
        "a request first": protocol.request("status", "r1", {}),
        "a welcome": {"type": "welcome", "version": version},
    }

    async def scenario(user: Bystander) -> None:
        for what, hello in hellos.items():
            raw = await Raw.connect(address)
            raw.send(hello)
            await expect_refused_and_closed(raw, "protocol", what)
        await user.wait_progress()

    run(single_node, scenario)


def test_random_bytes_get_at_most_an_error_and_a_closed_connection(single_node: Cluster) -> None:
    address = single_node.servers[0]
    rng = random.Random(20240521)
    blobs = [rng.randbytes(size) for size in (1, 3, 4, 5, 64, 1000, 5000, 60000)]
    # Random bytes behind a valid header: always a whole frame that is not a chat frame.
    blobs += [protocol.HEADER.pack(size) + rng.randbytes(size) for size in (1, 10, 500)]

    async def scenario(user: Bystander) -> None:
        async def one(blob: bytes, handshake: bool) -> None:
            raw = await (Raw.client(address) if handshake else Raw.connect(address))
            raw.send_bytes(blob)
            await expect_closed_at_most_one_error(raw, f"{len(blob)} random bytes")

        await asyncio.gather(
            *(one(blob, handshake) for blob in blobs for handshake in (False, True))
        )
        await user.wait_progress()

    run(single_node, scenario)


def test_a_frame_cut_short_gets_an_error_and_a_closed_connection(single_node: Cluster) -> None:
    address = single_node.servers[0]
    request = protocol.encode_frame(protocol.request("status", "cut", {}))

    async def scenario(user: Bystander) -> None:
        for cut in (2, 4, len(HELLO) // 2, len(HELLO) - 1):
            # Half-close: the node sees the end of the stream in the middle of a frame
            # and can still answer.
            raw = await Raw.connect(address)
            raw.send_bytes(HELLO[:cut])
            raw.writer.write_eof()
            frames = await raw.closed_by_node(HANDSHAKE_TIMEOUT + CLOSE_MARGIN)
            assert len(frames) <= 1, frames
            assert all(is_connection_error(f, "protocol") for f in frames), frames
        raw = await Raw.client(address)
        raw.send_bytes(request[: len(request) // 2])
        raw.writer.write_eof()
        await expect_refused_and_closed(raw, "protocol", "a request cut short")
        # Cut short and gone at once: nobody to answer, the node just cleans up.
        for payload in (HELLO[:5], b""):
            raw = await Raw.connect(address)
            raw.send_bytes(payload)
            raw.close()
        raw = await Raw.client(address)
        raw.send_bytes(request[:7])
        raw.close()
        await user.wait_progress()

    run(single_node, scenario)


# ---- stalled, slow, half-open and many connections ---------------------------------------


def test_stalled_connections_are_closed_while_others_are_served(single_node: Cluster) -> None:
    address = single_node.servers[0]
    request = protocol.encode_frame(protocol.request("status", "stall", {}))

    async def slow_hello(raw: Raw) -> None:
        # One byte every 200 ms: the whole hello would take seconds, longer than the
        # handshake timeout, which bounds the handshake, not the gap between bytes.
        for index in range(len(HELLO)):
            if raw.writer.is_closing() or raw.reader.at_eof():
                return
            with suppress(ConnectionError):
                raw.send_bytes(HELLO[index : index + 1])
                await raw.writer.drain()
            await asyncio.sleep(0.2)

    async def scenario(user: Bystander) -> None:
        silent = await Raw.connect(address)  # says nothing at all
        half_hello = await Raw.connect(address)
        half_hello.send_bytes(HELLO[: len(HELLO) // 2])
        half_request = await Raw.client(address)
        half_request.send_bytes(request[: len(request) // 2])
        idle = await Raw.client(address)  # a whole handshake, then nothing
        dripping = await Raw.connect(address)
        drip = asyncio.create_task(slow_hello(dripping))
        # The node keeps serving others while these hang.
        await user.wait_progress()
        for raw, limit, what in [
            (silent, HANDSHAKE_TIMEOUT, "a silent connection"),
            (half_hello, HANDSHAKE_TIMEOUT, "half a hello"),
            (dripping, HANDSHAKE_TIMEOUT, "a hello sent one byte at a time"),
            (half_request, IDLE_TIMEOUT, "half a request"),
            (idle, IDLE_TIMEOUT, "an idle client"),
        ]:
            frames = await raw.closed_by_node(limit + CLOSE_MARGIN)
            assert all(is_connection_error(f, "protocol") for f in frames), (what, frames)
        drip.cancel()
        with suppress(asyncio.CancelledError):
            await drip
        await user.wait_progress()

    run(single_node, scenario)


def test_half_open_connections_are_closed_quietly(single_node: Cluster) -> None:
    address = single_node.servers[0]

    async def scenario(user: Bystander) -> None:
        before_hello = await Raw.connect(address)
        before_hello.writer.write_eof()
        after_welcome = await Raw.client(address)
        after_welcome.writer.write_eof()
        for raw in (before_hello, after_welcome):
            frames = await raw.closed_by_node(HANDSHAKE_TIMEOUT + CLOSE_MARGIN)
            assert all(is_connection_error(f, "protocol") for f in frames), frames
        await user.wait_progress()

    run(single_node, scenario)


def _open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_many_idle_connections_do_not_disturb_others(single_node: Cluster) -> None:
    address = single_node.servers[0]
    pid = single_node[1].pid
    assert pid is not None
    count_files = Path("/proc/self/fd").is_dir()
    files_before = _open_files(pid) if count_files else 0

    async def scenario(user: Bystander) -> None:
        silent = await asyncio.gather(*(Raw.connect(address) for _ in range(100)))
        idle = await asyncio.gather(*(Raw.client(address) for _ in range(20)))
        await user.wait_progress()
        # The node still answers a new client at once.
        newcomer = await Raw.client(address)
        reply = await newcomer.answer(protocol.request("status", "newcomer", {}))
        assert reply["result"]["node"]["role"] == "primary"
        newcomer.close()
        closes = [raw.closed_by_node(IDLE_TIMEOUT + CLOSE_MARGIN) for raw in [*silent, *idle]]
        for frames in await asyncio.gather(*closes):
            assert all(is_connection_error(f, "protocol") for f in frames), frames
        await user.wait_progress()

    run(single_node, scenario)
    if count_files:
        # Every connection the node closed gave its descriptor back.
        wait_for(
            lambda: _open_files(pid) <= files_before + 3,
            10,
            f"the node to be back to about {files_before} open files",
        )


def test_clients_that_never_read_are_dropped_and_their_buffers_freed(
    cluster_factory: ClusterFactory,
) -> None:
    """What a node writes waits in memory until its client reads it. A connection
    holding 16 MiB unread was closed, but a close keeps the buffer until the client
    reads, which such a client never does; and nothing bounded the sum over
    connections: one account's 200 connections, each pipelining the largest
    ``read`` and never reading, grew the primary by 2.6 GB in 20 s. Now such a
    connection is dropped at once, and past ``max_client_unread`` over all clients
    the one holding the most goes (each of these asks for about 12 MB, under the
    16 MiB a connection may hold alone)."""
    cluster = cluster_factory(n=1, metrics=True, max_client_unread=2 * 1024 * 1024)
    cluster.start()
    cluster.wait_for_primary()
    address = cluster.servers[0]
    node = cluster[1]

    def dropped() -> float:
        scrape = node.metrics()
        return 0 if scrape is None else scrape.value("chat_clients_dropped_total")

    async def scenario(user: Bystander) -> None:
        async with Client([address], timeout=ANSWER_TIMEOUT) as hog:
            await hog.register("hog", PASSWORD)
            await hog.login("hog", PASSWORD)
            for _ in range(3):  # an inbox whose read replies are 1.2 MB each
                await asyncio.gather(*(hog.send("hog", "x" * 4000) for _ in range(100)))
            token = hog.token
        hogs = [await Raw.client(address) for _ in range(3)]
        for n, raw in enumerate(hogs):
            for k in range(10):
                raw.send(protocol.request("read", f"r{n}.{k}", {"limit": 1000}, token))
        await asyncio.to_thread(
            wait_for, lambda: dropped() >= len(hogs), 20.0, "the node to drop the three readers"
        )
        for raw in hogs:
            frames = await raw.closed_by_node(CLOSE_MARGIN)
            assert len(frames) < 10, f"a reader that never reads got all {len(frames)} replies"
        assert "max_client_unread" in node.log_text()
        await user.wait_progress()

    run(cluster, scenario)


# ---- bad requests on a good connection ---------------------------------------------------


MINE = "<the caller's own token>"
VICTIMS_MESSAGE = -1  # stands for the id of a message the caller neither sent nor received


def account(username: object, password: object = PASSWORD) -> dict[str, Any]:
    return {"username": username, "password": password}


def to_victim(body: object) -> dict[str, Any]:
    return {"to": "victim", "body": body}


# Malformed envelopes with a usable request id: error ``protocol`` under that id, and
# the connection stays open. (Without one, or not a request at all, the connection is
# closed: see test_protocol_contract.)
ENVELOPES: dict[str, Frame] = {
    "no op": {"type": "request", "request_id": "no-op"},
    "a numeric op": {"type": "request", "request_id": "op-7", "op": 7},
    "args as a list": {"type": "request", "request_id": "args", "op": "status", "args": ["x"]},
    "a numeric token": {"type": "request", "request_id": "tok", "op": "whoami", "token": 5},
}

# (what, op, args, token, expected code) of well-formed requests the service refuses.
BAD_REQUESTS: list[tuple[str, str, dict[str, Any], str | None, str]] = [
    ("an unknown op", "format_disk", {}, MINE, "invalid"),
    ("an empty op", "", {}, MINE, "invalid"),
    ("send: body a number", "send", to_victim(12345), MINE, "invalid"),
    ("send: body of 5000 characters", "send", to_victim("x" * 5000), MINE, "invalid"),
    ("send: empty body", "send", to_victim(""), MINE, "invalid"),
    ("send: NUL in the body", "send", to_victim("a\x00b"), MINE, "invalid"),
    ("send: escape sequence", "send", to_victim("\x1b[2J"), MINE, "invalid"),
    ("send: DEL in the body", "send", to_victim("a\x7f"), MINE, "invalid"),
    ("send: to a number", "send", {"to": 42, "body": "hi"}, MINE, "invalid"),
    ("send: unknown field", "send", {**to_victim("hi"), "cc": "x"}, MINE, "invalid"),
    ("send: unknown user", "send", {"to": "nobody_here", "body": "hi"}, MINE, "not_found"),
    ("send: no token", "send", to_victim("hi"), None, "auth_failed"),
    ("send: bad token", "send", to_victim("hi"), "f" * 43, "auth_failed"),
    ("read: limit a string", "read", {"limit": "5"}, MINE, "invalid"),
    ("read: limit a bool", "read", {"limit": True}, MINE, "invalid"),
    ("read: limit 0", "read", {"limit": 0}, MINE, "invalid"),
    ("read: limit 1001", "read", {"limit": 1001}, MINE, "invalid"),
    ("read: before a string", "read", {"before": "x"}, MINE, "invalid"),
    ("read: unknown box", "read", {"box": "trash"}, MINE, "invalid"),
    ("read: with and from", "read", {"with": "victim", "from": "victim"}, MINE, "invalid"),
    ("read: bad token", "read", {}, "not-a-token", "auth_failed"),
    ("search: limit a string", "search", {"limit": "10"}, MINE, "invalid"),
    ("search: pattern a number", "search", {"pattern": 5}, MINE, "invalid"),
    ("search: pattern too long", "search", {"pattern": "a" * 101}, MINE, "invalid"),
    ("search: bad token", "search", {}, "not-a-token", "auth_failed"),
    ("mark_read: ids a string", "mark_read", {"ids": "1,2"}, MINE, "invalid"),
    ("mark_read: no ids", "mark_read", {"ids": []}, MINE, "invalid"),
    ("mark_read: ids of bools", "mark_read", {"ids": [True]}, MINE, "invalid"),
    ("delete: ids a string", "delete_messages", {"ids": "1"}, MINE, "invalid"),
    ("delete: ids of strings", "delete_messages", {"ids": ["1"]}, MINE, "invalid"),
    ("delete: another's message", "delete_messages", {"ids": [VICTIMS_MESSAGE]}, MINE, "not_found"),
    ("delete: no such message", "delete_messages", {"ids": [10**9]}, MINE, "not_found"),
    ("register: bad name", "register", account("bad name!"), None, "invalid"),
    ("register: long name", "register", account("n" * 51), None, "invalid"),
    ("register: numeric name", "register", account(12), None, "invalid"),
    ("register: short password", "register", account("newbie", "short"), None, "invalid"),
    ("register: name taken", "register", account("VICTIM"), None, "conflict"),
    ("login: wrong password", "login", account("victim", "wrong-password"), None, "auth_failed"),
    ("login: unknown user", "login", account("nobody_here"), None, "auth_failed"),
    ("login: numeric password", "login", account("victim", 12345678), None, "invalid"),
    ("logout: bad token", "logout", {}, "not-a-token", "auth_failed"),
    ("whoami: bad token", "whoami", {}, "not-a-token", "auth_failed"),
    ("delete_account: bad token", "delete_account", {}, "not-a-token", "auth_failed"),
    ("listen: after a string", "listen", {"after": "x"}, MINE, "invalid"),
]


def test_bad_requests_get_one_error_each_and_change_nothing(single_node: Cluster) -> None:
    address = single_node.servers[0]

    async def scenario(user: Bystander) -> None:
        async with Client(single_node.servers, timeout=ANSWER_TIMEOUT) as setup:
            await setup.register("victim", PASSWORD)
            await setup.register("mallory", PASSWORD)
            await setup.login("victim", PASSWORD)
            private = (await setup.send("victim", "a note to self"))["message"]["id"]
            await setup.login("mallory", PASSWORD)
            assert setup.token is not None
            token = setup.token

        def frame_of(op: str, args: dict[str, Any], tok: str | None) -> Frame:
            if args.get("ids") == [VICTIMS_MESSAGE]:
                args = {"ids": [private]}
            request_id = new_request_id()
            return protocol.request(op, request_id, args, token if tok == MINE else tok)

        cases = [(what, frame, "protocol") for what, frame in ENVELOPES.items()]
        cases += [
            (what, frame_of(op, args, tok), code) for what, op, args, tok, code in BAD_REQUESTS
        ]
        raw = await Raw.client(address)
        async with user.lock:  # no request of the bystander in flight
            before = checksums_and_position(single_node)
            for what, frame, code in cases:
                answer = await raw.answer(frame)
                assert answer["type"] == "error", (what, answer)
                assert answer["code"] == code, (what, answer)
                assert isinstance(answer["message"], str), (what, answer)
                assert answer["retriable"] is False, (what, answer)
                await raw.no_more_answers_for(frame.get("request_id"))
            after = checksums_and_position(single_node)
        assert after == before, "a refused request changed the database"
        reply = await raw.answer(protocol.request("search", "all", {"pattern": "*"}, token))
        names = set(reply["result"]["users"])
        assert {"victim", "mallory"} <= names
        assert not {"bad name!", "newbie"} & names
        raw.close()
        await user.wait_progress()

    run(single_node, scenario)


def test_a_peer_without_the_cluster_secret_is_refused(single_node: Cluster) -> None:
    address = single_node.servers[0]
    secret = single_node.secret_file.read_bytes().strip()
    version = protocol.PROTOCOL_MAX_VERSION

    def hello(nonce: str, secret: bytes, node: int) -> Frame:
        return protocol.peer_hello(version, secret, nonce, node, 1, protocol.new_nonce())

    def tampered(frame: Frame) -> Frame:
        mac = str(frame["mac"])
        return {**frame, "mac": ("0" if mac[0] != "0" else "1") + mac[1:]}

    # A primary's append in a far epoch: a node that took it would bump its epoch.
    append = {
        "type": "append",
        "epoch": 99,
        "seq": 1,
        "watermark": 1,
        "records": [],
        "sync_set": {"version": 99, "members": [2], "epoch": 99},
        "in_sync": [2],
        "echo": 1,
    }
    attempts: dict[str, Callable[[str], Frame]] = {
        "the wrong secret": lambda nonce: hello(nonce, b"not the cluster secret at all", 2),
        "the wrong secret as the operator": lambda nonce: hello(nonce, b"wrong" * 8, 0),
        "a tampered mac": lambda nonce: tampered(hello(nonce, secret, 2)),
        "a mac for another nonce": lambda nonce: hello(protocol.new_nonce(), secret, 2),
        "no mac": lambda nonce: {k: v for k, v in hello(nonce, secret, 2).items() if k != "mac"},
        "a node that is not a member": lambda nonce: hello(nonce, secret, 7),
    }

    async def scenario(user: Bystander) -> None:
        epoch_before = _epoch(single_node)
        async with user.lock:
            before = checksums_and_position(single_node)
            for what, make in attempts.items():
                raw = await Raw.connect(address)
                # Pipelined: the append is already there when the hello is refused.
                peer_hello = make(str(raw.hello["nonce"]))
                raw.send_bytes(protocol.encode_frame(peer_hello) + protocol.encode_frame(append))
                await expect_refused_and_closed(raw, "protocol", f"a peer hello with {what}")
            after = checksums_and_position(single_node)
        assert after == before, "a refused peer changed the database"
        assert _epoch(single_node) == epoch_before
        await user.wait_progress()

    run(single_node, scenario)


def _epoch(cluster: Cluster) -> int:
    status = probe_status(cluster.servers[0])
    assert status is not None
    return int(status["node"]["epoch"])


# ---- text a node cannot store or send back ---------------------------------------------


SURROGATE = "<a lone surrogate>"


def with_lone_surrogate(frame: Frame) -> bytes:
    """The JSON text of ``frame`` with every SURROGATE written as the escape ``\\ud800``."""
    return json.dumps(frame).replace(SURROGATE, "\\ud800").encode()


def test_a_lone_surrogate_is_refused_and_writes_go_on(single_node: Cluster) -> None:
    """JSON may escape a lone UTF-16 surrogate (``"\\ud800"``); it is no Unicode text.

    The node can neither store it (SQLite text is UTF-8) nor send it back, so it
    must refuse it with one error (``protocol`` for the frame, or ``invalid``
    for the field) and go on serving everyone, writes included.
    """
    address = single_node.servers[0]
    requests: dict[str, tuple[str, dict[str, Any]]] = {
        "the recipient": ("send", {"to": f"vic{SURROGATE}tim", "body": "hi"}),
        "the message body": ("send", to_victim(f"a{SURROGATE}")),
        "a search pattern": ("search", {"pattern": SURROGATE}),
        "a user name": ("register", account(f"x{SURROGATE}")),
        "the request id of a read": ("whoami", {}),
        "the request id of a write": ("send", to_victim("hi")),
    }

    async def scenario(user: Bystander) -> None:
        async with Client(single_node.servers, timeout=ANSWER_TIMEOUT) as setup:
            await setup.register("victim", PASSWORD)
            await setup.login("victim", PASSWORD)
            token = setup.token
        problems: list[str] = []
        for what, (op, args) in requests.items():
            request_id = f"r{SURROGATE}" if "request id" in what else new_request_id()
            raw = await Raw.client(address)
            raw.send_body(with_lone_surrogate(protocol.request(op, request_id, args, token)))
            try:
                answer = await raw.first_answer(f"a lone surrogate in {what}")
            except AssertionError as exc:
                problems.append(str(exc))
            else:
                if not (
                    answer["type"] == "error"
                    and answer["request_id"] in (request_id, None)
                    and answer["code"] in ("protocol", "invalid")
                ):
                    problems.append(f"a lone surrogate in {what}: answered {answer}")
            raw.close()
            await user.wait_progress(steps=2)  # writes still succeed
        assert problems == [], "\n".join(problems)

    run(single_node, scenario)


def test_a_frame_that_is_not_utf8_json_gets_a_protocol_error(single_node: Cluster) -> None:
    """PROTOCOL.md section 1: a body of invalid UTF-8 or invalid JSON is a violation."""
    address = single_node.servers[0]
    hello = '{"type": "hello", "version": 1, "role": "client"}'
    number = b'{"type": "request", "request_id": "big", "op": "status", "args": {"n": ' + (
        b"9" * 5000 + b"}}"
    )
    bodies = {
        "a hello in UTF-16": (hello.encode("utf-16"), False),
        "a hello with a UTF-8 encoded surrogate": (
            b'{"type": "hello", "version": 1, "role": "client", "x": "\xed\xa0\x80"}',
            False,
        ),
        "a NaN": (b'{"type": "request", "request_id": "n", "op": "status", "n": NaN}', True),
        "a 5000-digit number": (number, True),
    }

    async def scenario(user: Bystander) -> None:
        problems: list[str] = []
        for what, (body, handshake) in bodies.items():
            raw = await (Raw.client(address) if handshake else Raw.connect(address))
            raw.send_body(body)
            try:
                await expect_refused_and_closed(raw, "protocol", what)
            except AssertionError as exc:
                problems.append(str(exc).splitlines()[0])
        await user.wait_progress()
        assert problems == [], "\n".join(problems)

    run(single_node, scenario)
