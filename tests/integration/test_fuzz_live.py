"""A live node fed random and mutated frames from several connections at once.

SPEC section 5: garbage, truncated frames, oversized lengths and unknown
requests "get an error or a closed connection and never disturb other clients
or stop the node". ``tests/unit/test_protocol.py`` checks the decoder alone
and ``test_bad_input.py`` checks each kind of bad input on its own; here the
same node gets all of it at once, from ``CONNECTIONS`` concurrent connections,
each opening ``ROUNDS`` connections in turn and sending a few payloads made
from valid frames (client and peer hellos, every request, peer messages) by
random mutations: a field dropped, added or replaced by random JSON, bits
flipped, the body cut short or grown, the length prefix replaced, frames
spliced, plain random bytes; written in random chunks, with or without a
proper handshake first.

Meanwhile a well-behaved client sends numbered messages to a friend whose
``listen`` stream must get each of them exactly once, in order, and reads its
sent box; every one of its operations must succeed. Everything the node sends
to a fuzzing connection must be a well-formed frame, and no error may be
``internal``. At the end the node is alive, answers, has no traceback in its
log and passes ``PRAGMA integrity_check``.

The random generator is seeded (``SEED``, printed on failure), so a failure
replays with the same payloads; the count of payloads and the total time are
bounded.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import pytest

from ops.cluster.probe import probe_status
from service import protocol
from service.client import Client
from service.errors import ChatError, ProtocolViolation
from service.storage import Storage
from tests.conftest import ClusterFactory
from tests.helpers.cluster import Cluster

SEED = 5150
CONNECTIONS = 6
ROUNDS = 40
TIME_BUDGET = 120.0
# How long a fuzzing connection listens for answers once the node has gone quiet.
QUIET = 0.3
ANSWER_WINDOW = 1.5
PASSWORD = "well-behaved-password"
KNOWN_CODES = {
    "invalid",
    "auth_failed",
    "not_found",
    "conflict",
    "gone",
    "refused",
    "unavailable",
    "not_primary",
    "busy",
    "protocol",
    "too_large",
}
FRAME_TYPES = {"hello", "welcome", "reply", "error", "message"}

Frame = dict[str, Any]


@pytest.fixture
def node(cluster_factory: ClusterFactory) -> Cluster:
    cluster = cluster_factory(n=1, handshake_timeout=1.0, idle_client_timeout=3.0)
    cluster.start()
    cluster.wait_for_primary()
    return cluster


# ---- the corpus and the mutations ----------------------------------------------------------


def corpus() -> list[Frame]:
    """Valid frames of every kind a node reads (whether or not they fit the connection)."""
    token = "t" * 43
    requests: list[tuple[str, dict[str, Any], str | None]] = [
        ("register", {"username": "fuzzy", "password": "fuzzy-password"}, None),
        ("login", {"username": "fuzzy", "password": "fuzzy-password"}, None),
        ("logout", {}, token),
        ("whoami", {}, token),
        ("search", {"pattern": "f*", "limit": 5}, token),
        ("send", {"to": "friend", "body": "hello"}, token),
        ("read", {"box": "inbox", "limit": 3, "before": 10, "oldest_first": True}, token),
        ("mark_read", {"ids": [1, 2]}, token),
        ("delete_messages", {"ids": [1]}, token),
        ("delete_account", {}, token),
        ("listen", {"after": None}, token),
        ("status", {}, None),
    ]
    frames: list[Frame] = [
        protocol.client_hello(protocol.PROTOCOL_MAX_VERSION),
        protocol.peer_hello(1, b"not the secret of this cluster!", "0" * 32, 2, 1, "1" * 32),
        {"type": "append", "epoch": 9, "seq": 1, "watermark": 1, "records": [], "echo": -1},
        {"type": "vote_request", "epoch": 9, "position": [9, 1], "force": False},
        {"type": "join", "epoch": 9, "position": [1, 1], "history": [[1, 1]]},
    ]
    frames += [
        protocol.request(op, f"fz{i}", args, tok) for i, (op, args, tok) in enumerate(requests)
    ]
    return frames


def random_json(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(10 if depth < 3 else 6)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.choice([0, -1, 1, 2**31, 2**63, -(2**63) - 1, 10**30, rng.randrange(100)])
    if choice == 3:
        return rng.choice([0.5, -1e308, 1e-300, 3.0])
    if choice == 4:
        length = rng.choice([0, 1, 5, 64, 65, 300, 5000])
        return "".join(rng.choice("aZ_.-* ?\n\t\x00\x1bé🙂\u2028") for _ in range(length))
    if choice == 5:
        return rng.choice(["", "status", "send", "hello", "client", "peer", "inbox", "sent"])
    if choice in (6, 7):
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {
        rng.choice(["type", "op", "args", "ids", "x", "token", "version"]): random_json(
            rng, depth + 1
        )
        for _ in range(rng.randrange(4))
    }


def mutate_json(rng: random.Random, frame: Frame) -> Frame:
    """A structural mutation of a frame: fields dropped, added or replaced."""
    frame = copy.deepcopy(frame)
    for _ in range(rng.randint(1, 3)):
        target: Any = frame
        # Sometimes go one level down (into args).
        nested = [v for v in frame.values() if isinstance(v, dict)]
        if nested and rng.random() < 0.5:
            target = rng.choice(nested)
        keys = list(target)
        action = rng.randrange(3)
        if action == 0 and keys:
            del target[rng.choice(keys)]
        elif action == 1 and keys:
            target[rng.choice(keys)] = random_json(rng)
        else:
            target[rng.choice(["extra", "type", "request_id", "op", "role", "ids"])] = random_json(
                rng
            )
    return frame


def encode_loosely(frame: Frame) -> bytes:
    """Encode whatever the mutations made (``encode_frame`` refuses non-frames)."""
    body = json.dumps(frame, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return protocol.HEADER.pack(len(body)) + body


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """A byte-level mutation of an encoded frame."""
    out = bytearray(data)
    action = rng.randrange(6)
    if action == 0 and out:  # flip bits
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    elif action == 1:  # cut short
        del out[rng.randrange(len(out) + 1) :]
    elif action == 2:  # random bytes inside
        at = rng.randrange(len(out) + 1)
        out[at:at] = rng.randbytes(rng.randint(1, 16))
    elif action == 3:  # another length prefix
        length = rng.choice([0, 1, 3, len(out), 2**24, protocol.DEFAULT_MAX_FRAME + 1, 2**32 - 1])
        out[:4] = protocol.HEADER.pack(length)
    elif action == 4:  # a body that is not JSON of an object
        body = rng.choice([b"", b"[]", b"null", b'"x"', b"{", b"\xff\xfe", b'{"type":1}'])
        out = bytearray(protocol.HEADER.pack(len(body)) + body)
    else:  # plain random bytes
        out = bytearray(rng.randbytes(rng.randint(1, 64)))
    return bytes(out)


def payload(rng: random.Random, seeds: list[Frame]) -> bytes:
    frame = rng.choice(seeds)
    kind = rng.randrange(4)
    if kind == 0:
        return encode_loosely(mutate_json(rng, frame))
    if kind == 1:
        return mutate_bytes(rng, encode_loosely(frame))
    if kind == 2:
        return mutate_bytes(rng, encode_loosely(mutate_json(rng, frame)))
    return encode_loosely(frame) + encode_loosely(mutate_json(rng, rng.choice(seeds)))


# ---- a fuzzing connection -----------------------------------------------------------------


class Answers:
    """Everything the node sent back on one connection, checked as it arrives."""

    def __init__(self) -> None:
        self.decoder = protocol.FrameDecoder()
        self.problems: list[str] = []
        self.frames = 0
        self.kinds: Counter[str] = Counter()  # frame types, and error codes

    def feed(self, data: bytes, context: str) -> None:
        try:
            frames = self.decoder.feed(data)
        except ProtocolViolation as exc:
            self.problems.append(f"{context}: the node sent a malformed frame: {exc}")
            return
        for frame in frames:
            self.frames += 1
            self.kinds[str(frame.get("code") or frame.get("type"))] += 1
            if frame.get("type") not in FRAME_TYPES:
                self.problems.append(f"{context}: unexpected frame {frame}")
            if frame.get("type") == "error" and frame.get("code") not in KNOWN_CODES:
                self.problems.append(f"{context}: error {frame}")


async def drain(reader: asyncio.StreamReader, answers: Answers, context: str) -> None:
    """Read answers until the node closes, goes quiet, or the window ends."""
    with suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(ANSWER_WINDOW):
            while True:
                data = await asyncio.wait_for(reader.read(65536), QUIET)
                if not data:
                    return
                answers.feed(data, context)


async def fuzz_connection(address: str, worker: int, answers: Answers) -> int:
    rng = random.Random(f"{SEED}:{worker}")
    seeds = corpus()
    host, port = address.rsplit(":", 1)
    sent = 0
    for round_ in range(ROUNDS):
        context = f"seed {SEED} worker {worker} round {round_}"
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            hello = protocol.FrameDecoder()
            frames: list[Frame] = []
            while not frames:
                data = await asyncio.wait_for(reader.read(65536), 10)
                assert data, f"{context}: the node closed before its hello"
                frames = hello.feed(data)
            if rng.random() < 0.7:
                # A proper handshake: the payloads only after the welcome (a frame
                # sent before it is refused as such, and would reach nothing further).
                writer.write(protocol.encode_frame(protocol.client_hello(1)))
                welcome: list[Frame] = []
                while not welcome:
                    data = await asyncio.wait_for(reader.read(65536), 10)
                    assert data, f"{context}: the node closed instead of a welcome"
                    welcome = hello.feed(data)
                answers.kinds[str(welcome[0].get("code") or welcome[0].get("type"))] += 1
            stream = b"".join(payload(rng, seeds) for _ in range(rng.randint(1, 4)))
            while stream:
                cut = rng.randint(1, max(1, len(stream)))
                writer.write(stream[:cut])
                stream = stream[cut:]
                with suppress(ConnectionError):
                    await writer.drain()
            sent += 1
            await drain(reader, answers, context)
        finally:
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()
    return sent


# ---- the well-behaved client --------------------------------------------------------------


class Bystander:
    """Sends numbered messages to a listening friend; every operation must succeed."""

    def __init__(self, servers: list[str]) -> None:
        self.sender = Client(servers, timeout=10)
        self.friend = Client(servers, timeout=10)
        self.sent: list[int] = []
        self.pushed: list[int] = []
        self.failures: list[str] = []
        self.stop = asyncio.Event()

    async def setup(self) -> None:
        for name, client in (("bystander", self.sender), ("friend", self.friend)):
            await client.register(name, PASSWORD)
            await client.login(name, PASSWORD)

    async def send_loop(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            await self._step(f"send {n}", self._send(f"note {n}"))
            if n % 5 == 0:
                await self._step("read", self.sender.read(sent=True, limit=5))

    async def _send(self, body: str) -> None:
        result = await self.sender.send("friend", body)
        self.sent.append(int(result["message"]["id"]))

    async def _step(self, what: str, call: Any) -> None:
        try:
            await call
        except ChatError as exc:
            self.failures.append(f"{what}: {exc.code}: {exc.message}")
        except Exception as exc:
            self.failures.append(f"{what}: {exc!r}")

    async def listen_loop(self) -> None:
        try:
            async for message in self.friend.listen():
                self.pushed.append(int(message["id"]))
        except ChatError as exc:
            self.failures.append(f"listen: {exc.code}: {exc.message}")

    async def wait_pushed(self, timeout: float) -> None:
        await _wait(
            lambda: not set(self.sent) - set(self.pushed),
            timeout,
            "every message the bystander sent to be pushed to its listener",
        )

    async def close(self) -> None:
        await self.sender.close()
        await self.friend.close()


# ---- the test ---------------------------------------------------------------------------


def test_random_and_mutated_frames_from_many_connections(node: Cluster) -> None:
    address = node.servers[0]
    answers = Answers()

    async def main() -> tuple[int, Bystander]:
        user = Bystander(node.servers)
        await user.setup()
        listener = asyncio.create_task(user.listen_loop())
        sender = asyncio.create_task(user.send_loop())
        try:
            async with asyncio.timeout(TIME_BUDGET):
                counts = await asyncio.gather(
                    *(fuzz_connection(address, worker, answers) for worker in range(CONNECTIONS))
                )
                before = len(user.sent)
                await _wait(lambda: len(user.sent) >= before + 5, 20, "the bystander to go on")
            user.stop.set()
            await sender
            await user.wait_pushed(20)
        finally:
            user.stop.set()
            sender.cancel()
            listener.cancel()
            await asyncio.gather(sender, listener, return_exceptions=True)
            await user.close()
        return sum(counts), user

    sent, user = asyncio.run(main())
    assert answers.problems == [], f"seed {SEED}:\n" + "\n".join(answers.problems[:30])
    assert sent == CONNECTIONS * ROUNDS
    # The payloads reach every layer: framing, handshake, envelope and the operations.
    assert {"welcome", "protocol", "reply"} <= set(answers.kinds), answers.kinds
    assert {"invalid", "auth_failed"} & set(answers.kinds), answers.kinds
    assert user.failures == [], f"the well-behaved client was disturbed: {user.failures[:10]}"
    assert len(user.sent) >= 10, "the well-behaved client hardly made progress"
    assert user.pushed == sorted(set(user.pushed)), "the listen stream repeated or reordered"
    assert set(user.sent) <= set(user.pushed)

    process = node[1]
    process.check_alive()
    assert probe_status(process.address) is not None, "the node stopped answering status"
    assert "Traceback" not in process.log_text(), process.log_tail(60)
    storage = Storage(process.db_path)
    try:
        assert storage.integrity_check() == "ok"
    finally:
        storage.close()


async def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` on the event loop until it holds; fail after ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None
