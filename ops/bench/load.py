"""The load generator: simulated users sending messages, in worker processes.

Why lean. The generator runs on the cores the cluster needs, and its CPU counts in
the CPU per acknowledged write: like pgbench, which is C, it must cost little
beside the nodes. So a worker does not drive its clients through the client
library (``service.client.Client``: a task, a timer, futures and hedging per
call, three times the CPU per send) but through ``LeanClient``: one asyncio
``Protocol`` per connection speaking the wire protocol (``service/protocol.py``)
on uvloop, request ids from a counter, and one watchdog per worker instead of a
timer per call. Its sends run in a closed loop driven by the connection's
callbacks (``_Pump``): the reply awaited is recognised by its first bytes (when
it arrives whole in one read; decoded otherwise) and the next request, made from
a template, is written at once; no coroutine step and no future per send. An
error frame or a lost or stuck link hands the send to the retries that
``LeanClient.call`` uses too, which keep the library's contract (same request
id, follow the primary that ``not_primary`` names, a lost connection tries the
next node), so a count still loads its data across a failover.

Why processes. One event loop is one core at most, and the machine may have as
few cores as the cluster has nodes, so the generator runs in ``workers``
processes (default 2), each with its own event loop and an equal share of the
clients, and each reports the CPU it used during the measurement window
(``getrusage``). A worker near 100 % of one core was saturated: the figure then
measures the generator, and the report says so.

What one client is. One ``LeanClient`` (its own connection to the primary),
holding the session of one of a few registered users, sending 100-byte
bodies to users picked at random, one send at a time, as fast as replies come
back: the closed loop of pgbench, whose row (sender, recipient, 100-byte body,
timestamp) the peer benchmark inserts.

Two modes:

* ``window``: warm up for ``warmup`` s, then count the sends acknowledged
  during the next ``secs`` s and keep the latency of each (``perf_counter``
  around each send, retries included, as a user would see it);
* ``count``: send ``total`` messages between all clients as fast as possible
  (loading data, or the sends a stopped backup will have to catch up on),
  optionally stopping after ``max_seconds``.

Each worker is ``python -m ops.bench.load``; parent and worker exchange one
JSON object per line over its stdin and stdout: the spec, then the worker says it is
ready (every client connected and its session checked), the parent names
the wall-clock start time, the worker answers with its samples. Every worker
thus measures the same window, and setup never counts.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import secrets
import select
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import uvloop

from service import errors, protocol
from service.client import ATTEMPT_TIMEOUT, BACKOFF_CAP, BACKOFF_START, Client
from service.config import is_loopback, parse_address

# The settings of the clusters it loads, re-exported for its callers.
from ..cluster.limits import UNLIMITED as UNLIMITED
from . import machine, stats

BODY_BYTES = 100
CALL_TIMEOUT = 30.0
READY_TIMEOUT = 120.0
START_DELAY = 0.3  # seconds between "go" and the start: every worker gets the message first
MAX_ERRORS = 1000  # a count-mode worker gives up after this many failed sends
SATURATED = 0.9  # a worker using this share of one core is the bottleneck
WATCH_EVERY = 0.5  # seconds between two rounds of a worker's watchdog

T = TypeVar("T")

# Workers running now, so that an interrupted benchmark can stop them (``stop_workers``).
_live: set[subprocess.Popen[str]] = set()


@dataclass(frozen=True)
class Users:
    """Registered users and one session token each."""

    names: list[str]
    tokens: list[str]


async def register_users(servers: Sequence[str], count: int, prefix: str) -> Users:
    """Register ``count`` users and log each in once.

    Sessions are shared by the clients (several devices of one user), so the
    slow password hash runs 2 x ``count`` times, not once per client.
    """
    password = secrets.token_hex(12)
    names = [f"{prefix}{i:03d}" for i in range(count)]
    tokens = []
    async with Client(servers, timeout=60.0) as client:
        for name in names:
            await client.register(name, password)
        for name in names:
            result = await client.call("login", {"username": name, "password": password})
            tokens.append(str(result["token"]))
    return Users(names, tokens)


def body(rng: random.Random) -> str:
    """A 100-byte ASCII body (100 characters, 100 bytes of UTF-8)."""
    return "".join(rng.choices("abcdefghijklmnopqrstuvwxyz ", k=BODY_BYTES))


# ---- the parent side -----------------------------------------------------------------------


def run_window(
    servers: Sequence[str],
    users: Users,
    clients: int,
    workers: int,
    warmup: float,
    secs: float,
    watch: dict[str, int],
) -> dict[str, Any]:
    """Throughput and latency of ``clients`` concurrent senders over one window."""
    spec = {"mode": "window", "warmup": warmup, "secs": secs}
    results, cpu = _run_workers(servers, users, clients, workers, spec, warmup, secs, watch)
    samples = [s for r in results for s in r["samples"]]
    acked = sum(r["acked"] for r in results)
    return {
        "clients": clients,
        "workers": len(results),
        "seconds": secs,
        "acked": acked,
        "tps": acked / secs,
        "latency": stats.latency_summary(samples),
        **_common(results, cpu),
    }


def run_count(
    servers: Sequence[str],
    users: Users,
    total: int,
    clients: int,
    workers: int,
    watch: dict[str, int],
    max_seconds: float | None = None,
) -> dict[str, Any]:
    """Send ``total`` messages with ``clients`` senders (stopping early after
    ``max_seconds``, if given); how many were acknowledged and how long it took."""
    shares = _split(total, min(workers, clients))
    spec = {"mode": "count", "counts": shares, "max_seconds": max_seconds}
    started = time.perf_counter()
    results, cpu = _run_workers(servers, users, clients, workers, spec, 0.0, None, watch)
    seconds = max(r["seconds"] for r in results)
    acked = sum(r["acked"] for r in results)
    return {
        "clients": clients,
        "acked": acked,
        "seconds": seconds,
        "rate": acked / seconds if seconds > 0 else 0.0,
        "wall_with_setup": time.perf_counter() - started,
        **_common(results, cpu),
    }


def _common(results: list[dict[str, Any]], cpu: dict[str, Any]) -> dict[str, Any]:
    errors_seen: Counter[str] = Counter()
    for r in results:
        errors_seen.update(r["errors"])
    worker_cpu = [r["cpu"] / r["seconds"] if r["seconds"] > 0 else 0.0 for r in results]
    return {
        "errors": dict(errors_seen),
        "worker_cpu": worker_cpu,
        "generator_saturated": any(share >= SATURATED for share in worker_cpu),
        "cpu": cpu,
    }


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _run_workers(
    servers: Sequence[str],
    users: Users,
    clients: int,
    workers: int,
    spec: dict[str, Any],
    warmup: float,
    secs: float | None,
    watch: dict[str, int],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Start the workers, wait until all are ready, start them together, collect."""
    per_worker = _split(clients, min(workers, clients))
    procs: list[subprocess.Popen[str]] = []
    first = 0
    try:
        for index, count in enumerate(per_worker):
            mine = {
                **spec,
                "servers": list(servers),
                "names": users.names,
                "tokens": users.tokens,
                "clients": count,
                "first": first,
                "seed": random.randrange(1 << 30),
                "count": spec["counts"][index] if "counts" in spec else 0,
            }
            first += count
            proc = subprocess.Popen(
                [sys.executable, "-m", "ops.bench.load"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append(proc)
            _live.add(proc)
            _send(proc, mine)
        for proc in procs:
            _expect(_receive(proc, READY_TIMEOUT), "ready")
        start = time.time() + START_DELAY
        for proc in procs:
            _send(proc, {"start": start})
        pids = {**watch, **{f"worker{i}": p.pid for i, p in enumerate(procs)}}
        cpu = _watch_cpu(pids, start + warmup, secs, procs)
        results = [_expect(_receive(proc, None), "result") for proc in procs]
    finally:
        for proc in procs:
            _stop(proc)
    return results, cpu


def _watch_cpu(
    pids: dict[str, int], begin_wall: float, secs: float | None, procs: list[subprocess.Popen[str]]
) -> dict[str, Any]:
    """CPU of the nodes, workers and machine over the window (or until the workers answer)."""
    time.sleep(max(0.0, begin_wall - time.time()))
    before = machine.sample_cpu(pids)
    if secs is not None:
        time.sleep(secs)
    else:
        while not all(_readable(proc, 0.05) for proc in procs):
            pass
    return machine.cpu_between(before, machine.sample_cpu(pids))


def _send(proc: subprocess.Popen[str], message: dict[str, Any]) -> None:
    assert proc.stdin is not None
    _write_line(proc.stdin.fileno(), message)


def _write_line(fd: int, message: dict[str, Any]) -> None:
    """Write ``message`` as one JSON line, whole.

    Not through a text stream: a blocking write to a pipe returns early when the
    process is stopped or a profiler attaches while the pipe is full, and
    ``TextIOWrapper`` then drops what was not written (a worker's samples are
    hundreds of KiB, several times a pipe's capacity)."""
    data = memoryview((json.dumps(message) + "\n").encode())
    while data:
        data = data[os.write(fd, data) :]


def _readable(proc: subprocess.Popen[str], timeout: float) -> bool:
    assert proc.stdout is not None
    return bool(select.select([proc.stdout], [], [], timeout)[0])


def _receive(proc: subprocess.Popen[str], timeout: float | None) -> dict[str, Any]:
    """The worker's next line; raises if it dies first or stays silent past ``timeout``.

    A worker writes one line and then waits for the parent, so nothing is
    ever left in the pipe's buffer behind the line read here.
    """
    assert proc.stdout is not None
    if timeout is not None and not _readable(proc, timeout):
        raise TimeoutError(f"a load worker sent nothing for {timeout:g} s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"a load worker exited with status {proc.wait()}")
    message: dict[str, Any] = json.loads(line)
    return message


def stop_workers() -> None:
    """SIGKILL every worker still running: the teardown of an interrupted benchmark.
    The thread waiting for their answers then sees them exit and returns."""
    for proc in list(_live):
        if proc.poll() is None:
            proc.kill()


def _stop(proc: subprocess.Popen[str]) -> None:
    _live.discard(proc)
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _expect(message: dict[str, Any], kind: str) -> dict[str, Any]:
    if "failed" in message:
        raise RuntimeError(f"a load worker failed: {message['failed']}")
    if kind not in message:
        raise RuntimeError(f"a load worker sent {message!r}, expected {kind!r}")
    return message


# ---- the worker side: lean connections -------------------------------------------------


class _Lost(Exception):
    """A connection was refused, closed, reset, broke the protocol or stopped answering:
    the call is sent again, under its request id, on a new connection."""


class _Link(asyncio.Protocol):
    """One handshaken connection to one node, carrying one request at a time.

    The handshake runs in ``data_received`` (the node's hello, our client hello, its
    welcome); then each reply or error frame resolves the one pending future, or
    tells the pump whose request it answers. Whatever ends the connection fails that
    future or tells that pump, and the link is never used again.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.loop = asyncio.get_running_loop()
        self.welcome: asyncio.Future[protocol.Frame] = self.loop.create_future()
        self.failure: BaseException | None = None
        self.pending: asyncio.Future[dict[str, Any]] | None = None
        self.sent_at = 0.0  # loop time the pending request was written (the watchdog's)
        self._request_id = ""
        self._transport: asyncio.Transport | None = None
        self._decoder = protocol.FrameDecoder()
        self._hello_answered = False
        # The closed loop (``_Pump``) whose request is in flight, told of its answer,
        # and the first bytes of the reply it expects, after the frame's length header.
        self.pump: _Pump | None = None
        self._expect = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def request(self, request_id: str, data: bytes) -> asyncio.Future[dict[str, Any]]:
        """Write one encoded request; the future gets its result, or its error."""
        assert self._transport is not None
        future: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        if self.failure is not None:
            future.set_exception(_Lost(f"{self.address}: {self.failure}"))
            return future
        self.pending, self._request_id, self.sent_at = future, request_id, self.loop.time()
        self._transport.write(data)
        return future

    def pump_request(self, pump: _Pump, request_id: str, data: bytes) -> None:
        """Write one request of ``pump``'s loop; ``pump`` hears of its answer."""
        assert self._transport is not None
        if self.failure is not None:
            pump.failed(_Lost(f"{self.address}: {self.failure}"))
            return
        self.pump, self._request_id, self.sent_at = pump, request_id, self.loop.time()
        self._expect = reply_prefix(request_id)
        self._transport.write(data)

    def data_received(self, data: bytes) -> None:
        header = protocol.HEADER.size
        pump = self.pump
        if (
            pump is not None
            and not self._decoder.pending
            and data.startswith(self._expect, header)
            and protocol.HEADER.unpack_from(data)[0] == len(data) - header
        ):
            # The usual case of a window: the one reply awaited, whole, in one read.
            # Nothing of it is needed but that it is this request's reply.
            self.pump = None
            pump.replied()
            return
        try:
            if (
                not self._decoder.pending
                and len(data) > header
                and protocol.HEADER.unpack_from(data)[0] == len(data) - header
            ):
                # One reply in one read (``call``'s usual case): decoded without the buffer.
                self._frame(protocol.decode_body(data[header:]))
                return
            for frame in self._decoder.feed(data):
                self._frame(frame)
        except errors.ProtocolViolation as exc:
            self.fail(_Lost(f"{self.address}: {exc.message}"))

    def _frame(self, frame: protocol.Frame) -> None:
        kind = frame["type"]
        if kind == "reply" or (kind == "error" and frame.get("request_id") is not None):
            pump = self.pump
            if pump is not None and frame.get("request_id") == self._request_id:
                self.pump = None
                if kind == "error":
                    pump.failed(errors.from_wire(frame))
                else:
                    pump.replied()
                return
            future = self.pending
            if future is None or future.done() or frame.get("request_id") != self._request_id:
                return  # not the request waited for (none is: one at a time)
            self.pending = None
            if kind == "error":
                future.set_exception(errors.from_wire(frame))
            else:
                result = frame.get("result")
                future.set_result(result if isinstance(result, dict) else {})
        elif kind == "error":
            # About the connection (refused handshake, protocol violation): it closes.
            self.fail(errors.from_wire(frame))
        elif kind == "hello" and not self._hello_answered:
            assert self._transport is not None
            self._hello_answered = True
            hello = protocol.client_hello(protocol.choose_version(frame))
            self._transport.write(protocol.encode_frame(hello))
        elif kind == "welcome" and not self.welcome.done():
            self.welcome.set_result(frame)
        # Anything else is ignored, as the client library does: a newer node may send more.

    def connection_lost(self, exc: Exception | None) -> None:
        reason = exc.strerror.lower() if isinstance(exc, OSError) and exc.strerror else None
        self.fail(_Lost(f"{self.address}: {reason or 'connection closed'}"))

    def check(self, now: float) -> None:
        """The watchdog's visit: a request unanswered for ATTEMPT_TIMEOUT fails the link."""
        if (self.pending is not None or self.pump is not None) and (
            now - self.sent_at > ATTEMPT_TIMEOUT
        ):
            self.fail(_Lost(f"{self.address}: no answer within {ATTEMPT_TIMEOUT:g} s"))

    def fail(self, reason: BaseException) -> None:
        """Close for good; the handshake or request waiting gets ``reason``."""
        if self.failure is not None:
            return
        self.failure = reason
        for future in (self.welcome, self.pending):
            if future is not None and not future.done():
                future.set_exception(reason)
        self.pending = None
        pump, self.pump = self.pump, None
        if pump is not None:
            pump.failed(reason)
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        self.fail(_Lost(f"{self.address}: closed by the load generator"))


class LeanClient:
    """One simulated client: a session token and one ``_Link`` to the primary.

    ``call`` sends one request and waits for its answer, as ``Client.call`` does but
    without its per-call task, timer and hedging: a retriable error (``unavailable``,
    ``not_primary``, ``busy``) or a lost connection sends the same frame, same request
    id (so a write is applied once), again: to the primary a ``not_primary`` names,
    else to the next server, after a short backoff; until CALL_TIMEOUT has passed since
    the first failure, when it raises ``errors.Unavailable``. Any other error frame is
    raised at once. A request unanswered for ATTEMPT_TIMEOUT is failed by the worker's
    watchdog (``check``), which closes its link: a frozen node is treated as down.

    Request ids are 16 hex digits of the time (ids that grow with time are cheap for
    the primary's index, PROTOCOL.md section 3), this client's 8 random hex digits and
    a counter: unique per write across clients and runs, without a random draw each.
    """

    def __init__(self, servers: Sequence[str], token: str, rng: random.Random) -> None:
        self.servers = list(servers)
        self.token = token
        self.link: _Link | None = None
        self._address = self.servers[0]
        self._rng = rng
        self._tag = f"{rng.getrandbits(32):08x}"
        self._sent = 0

    def new_request_id(self) -> str:
        self._sent += 1
        return f"{time.time_ns():016x}{self._tag}{self._sent:x}"

    async def call(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        request_id = self.new_request_id()
        data = protocol.encode_frame(protocol.request(op, request_id, args, self.token))
        link = self.link
        if link is not None and link.failure is None:
            try:
                return await link.request(request_id, data)
            except errors.ChatError as exc:
                if not exc.retriable:
                    raise
                return await self._retry(request_id, data, exc)
            except _Lost as exc:
                return await self._retry(request_id, data, exc)
        return await self._retry(request_id, data, None)

    async def resume(self, request_id: str, data: bytes, problem: BaseException | None) -> None:
        """Finish a send the pump gave back (or, ``problem`` None, one not sent yet:
        there was no usable link) as ``call`` would have."""
        if isinstance(problem, errors.ChatError) and not problem.retriable:
            raise problem
        await self._retry(request_id, data, problem)

    async def _retry(
        self, request_id: str, data: bytes, problem: BaseException | None
    ) -> dict[str, Any]:
        """The slow path: (re)connect and send ``data`` until it is answered."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CALL_TIMEOUT
        delay, redirected = BACKOFF_START, False
        while True:
            if problem is not None:
                pause = delay * self._rng.uniform(0.5, 1.0)
                delay = min(delay * 2, BACKOFF_CAP)
                if self._reroute(problem) and not redirected:
                    # Follow a named primary at once, but only once: two nodes with
                    # stale views could otherwise send us back and forth.
                    pause, redirected = 0.0, True
                elif isinstance(problem, errors.Busy):
                    pause = max(pause, problem.retry_after)
                if loop.time() + pause >= deadline:
                    raise errors.Unavailable(
                        f"no answer within {CALL_TIMEOUT:g} s (last: {problem})"
                    ) from None
                await asyncio.sleep(pause)
            try:
                link = self.link
                if link is None or link.failure is not None:
                    link = await self._connect()
                return await link.request(request_id, data)
            except errors.ChatError as exc:
                if not exc.retriable:
                    raise
                problem = exc
            except _Lost as exc:
                problem = exc

    async def _connect(self) -> _Link:
        """A handshaken link to the current address; ``_Lost`` if there is none."""
        host, port = parse_address(self._address)
        if not is_loopback(host):
            raise errors.InvalidInput(
                f"{self._address}: the load generator speaks plain TCP, to loopback addresses only"
            )
        loop = asyncio.get_running_loop()
        address = self._address
        link: _Link | None = None
        try:
            async with asyncio.timeout(ATTEMPT_TIMEOUT):
                _, link = await loop.create_connection(lambda: _Link(address), host, port)
                await link.welcome
        except (OSError, TimeoutError, errors.ChatError) as exc:
            if link is not None:
                link.close()  # connected, but no welcome in time
            raise _Lost(f"{address}: {str(exc) or 'no welcome'}") from None
        self.link = link
        return link

    def _reroute(self, problem: BaseException) -> bool:
        """Choose the node of the next attempt after ``problem``; True when it is the
        primary that a ``not_primary`` named."""
        if isinstance(problem, errors.NotPrimary):
            self._drop()
            primary = problem.details.get("primary")
            if isinstance(primary, str) and primary != self._address and _valid(primary):
                self._address = primary
                return True
            self._next_server()
        elif isinstance(problem, _Lost):
            self._drop()
            self._next_server()
        return False

    def _drop(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None

    def _next_server(self) -> None:
        index = self.servers.index(self._address) + 1 if self._address in self.servers else 0
        self._address = self.servers[index % len(self.servers)]

    def close(self) -> None:
        self._drop()


# A send the pump gave back: its request id, its frame, when it was first written, and
# what happened to it (an error frame or a lost link).
GivenBack = tuple[str, bytes, float, BaseException]


class _Pump:
    """A client's closed loop of sends, driven by its link's callbacks.

    ``LeanClient.call`` costs a coroutine step, a future and their callbacks per send.
    Here the link's ``data_received`` recognises the reply awaited by its first bytes
    and writes the next request at once: per send, one frame made from a template,
    one write, one read. Anything else (an error frame, a lost or stuck link) ends
    the run, and ``run``'s future gives the send in flight back to the coroutine,
    which finishes it with the retries of ``call`` (``LeanClient.resume``)."""

    def __init__(
        self,
        client: LeanClient,
        make: Callable[[str], bytes],
        more: Callable[[], bool],
        acked: Callable[[float], None],
    ) -> None:
        self._client, self._make, self._more, self._acked = client, make, more, acked
        self._link: _Link | None = None
        self._finished: asyncio.Future[GivenBack | None] | None = None
        self._request_id, self._data, self._t0 = "", b"", 0.0

    def run(
        self, link: _Link, request_id: str, data: bytes, t0: float
    ) -> asyncio.Future[GivenBack | None]:
        """Send ``data`` on ``link``, then more while ``more()`` says so. The future
        ends None once ``more()`` said no, or with the send given back."""
        self._link = link
        self._finished = link.loop.create_future()
        self._send(request_id, data, t0)
        return self._finished

    def _send(self, request_id: str, data: bytes, t0: float) -> None:
        assert self._link is not None
        self._request_id, self._data, self._t0 = request_id, data, t0
        self._link.pump_request(self, request_id, data)

    def replied(self) -> None:
        finished = self._finished
        assert finished is not None
        if finished.done():
            return  # its coroutine was cancelled (a worker interrupted): send no more
        try:
            self._acked(self._t0)
            if not self._more():
                finished.set_result(None)
                return
            request_id = self._client.new_request_id()
            self._send(request_id, self._make(request_id), time.perf_counter())
        except BaseException as exc:
            # Raised in the link's read callback, it would only close the link, which
            # no longer knows this pump: the coroutine would wait forever.
            if not finished.done():
                finished.set_exception(exc)

    def failed(self, problem: BaseException) -> None:
        assert self._finished is not None
        if not self._finished.done():
            self._finished.set_result((self._request_id, self._data, self._t0, problem))


def reply_prefix(request_id: str) -> bytes:
    """The first bytes of the body of the reply to ``request_id`` (``protocol.reply``,
    encoded by ``encode_frame``): what the closed loop recognises a reply by."""
    return b'{"type":"reply","request_id":"' + request_id.encode() + b'"'


def request_template(op: str, args: dict[str, Any], token: str) -> Callable[[str], bytes]:
    """``encode_frame(request(op, request_id, args, token))`` for any ``request_id`` of
    hex digits, from two pieces encoded once."""
    marker = "request-id-goes-here"
    body = protocol.encode_frame(protocol.request(op, marker, args, token))[protocol.HEADER.size :]
    head, tail = body.split(marker.encode())
    size = len(head) + len(tail)
    pack = protocol.HEADER.pack

    def frame(request_id: str) -> bytes:
        return b"".join((pack(size + len(request_id)), head, request_id.encode(), tail))

    return frame


async def _closed_loop(
    client: LeanClient,
    make: Callable[[str], bytes],
    more: Callable[[], bool],
    acked: Callable[[float], None],
    refused: Callable[[errors.ChatError], Awaitable[None]],
) -> None:
    """One client's sends while ``more()`` says so: each ``make``s a request frame;
    ``acked`` gets the start of each acknowledged one, ``refused`` each failure (the
    send is over: ``more`` decides whether another comes)."""
    while more():
        request_id = client.new_request_id()
        data, t0 = make(request_id), time.perf_counter()
        problem: BaseException | None = None
        link = client.link
        if link is not None and link.failure is None:
            pump = _Pump(client, make, more, acked)
            try:
                given_back = await pump.run(link, request_id, data, t0)
            finally:
                if link.pump is pump:
                    link.pump = None  # cancelled: its replies are nobody's now
            if given_back is None:
                return
            request_id, data, t0, problem = given_back
        try:
            await client.resume(request_id, data, problem)
        except errors.ChatError as exc:
            await refused(exc)
            continue
        acked(t0)


def _valid(address: str) -> bool:
    try:
        parse_address(address)
    except errors.InvalidInput:
        return False
    return True


async def _watchdog(clients: list[LeanClient]) -> None:
    """Fail the requests stuck for ATTEMPT_TIMEOUT, every WATCH_EVERY seconds, until
    cancelled: one timer for the worker instead of one per call."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(WATCH_EVERY)
        now = loop.time()
        for client in clients:
            if client.link is not None:
                client.link.check(now)


# ---- the worker side: the exchange and the two modes ----------------------------------


def worker_main() -> int:
    """One worker process: its spec on stdin, then the exchange of the module docstring."""
    spec = json.loads(sys.stdin.readline())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            clients = runner.run(_connect(spec))
        except (errors.ChatError, OSError) as exc:
            _say({"failed": f"connecting: {exc}"})
            return 1
        _say({"ready": True})
        go = sys.stdin.readline()
        if not go:
            return 1  # the parent gave up
        start = float(json.loads(go)["start"])
        drive = _window if spec["mode"] == "window" else _count
        try:
            result = {"result": True, **runner.run(_watched(drive(spec, clients, start), clients))}
        except Exception as exc:  # reported to the parent, which stops the benchmark
            result = {"failed": f"{type(exc).__name__}: {exc}"}
        for client in clients:
            client.close()
    _say(result)
    return 0


def _say(message: dict[str, Any]) -> None:
    _write_line(sys.stdout.fileno(), message)


async def _connect(spec: dict[str, Any]) -> list[LeanClient]:
    """One LeanClient per simulated connection, each checked with one ``whoami``."""
    tokens = spec["tokens"]
    rng = random.Random()  # request-id tags: unlike the seed, never the same in two workers
    clients = [
        LeanClient(
            spec["servers"],
            tokens[(spec["first"] + i) % len(tokens)],
            random.Random(rng.getrandbits(64)),
        )
        for i in range(spec["clients"])
    ]
    await _watched(asyncio.gather(*(c.call("whoami", {}) for c in clients)), clients)
    return clients


async def _watched(work: Awaitable[T], clients: list[LeanClient]) -> T:
    """Run ``work`` with the watchdog of ``clients``."""
    watchdog = asyncio.ensure_future(_watchdog(clients))
    try:
        return await work
    finally:
        watchdog.cancel()


def _cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _sleep_until(perf_time: float) -> None:
    await asyncio.sleep(max(0.0, perf_time - time.perf_counter()))


async def _window(spec: dict[str, Any], clients: list[LeanClient], start: float) -> dict[str, Any]:
    begin = time.perf_counter() + (start - time.time())
    window_start = begin + float(spec["warmup"])
    window_end = window_start + float(spec["secs"])
    names: list[str] = spec["names"]
    samples: list[float] = []
    failures: Counter[str] = Counter()
    rng = random.Random(spec["seed"])
    text = body(rng)

    def more() -> bool:
        return time.perf_counter() < window_end

    def acked(t0: float) -> None:
        t1 = time.perf_counter()
        if window_start <= t1 <= window_end:
            samples.append(t1 - t0)

    async def refused(exc: errors.ChatError) -> None:
        failures[exc.code] += 1
        await asyncio.sleep(0.01)

    async def sender(client: LeanClient, seed: int) -> None:
        make = _sends(client, names, text, random.Random(seed))
        await _closed_loop(client, make, more, acked, refused)

    cpu: list[float] = []

    async def meter() -> None:
        await _sleep_until(window_start)
        cpu.append(_cpu_now())
        await _sleep_until(window_end)
        cpu.append(_cpu_now())

    await _sleep_until(begin)
    await asyncio.gather(meter(), *(sender(c, rng.randrange(1 << 30)) for c in clients))
    return {
        "samples": [round(s, 7) for s in samples],
        "acked": len(samples),
        "errors": dict(failures),
        "cpu": cpu[1] - cpu[0],
        "seconds": window_end - window_start,
    }


def _sends(
    client: LeanClient, names: Sequence[str], text: str, pick: random.Random
) -> Callable[[str], bytes]:
    """The frames of ``client``'s sends of ``text``, each to one of ``names`` at random."""
    assert client.token is not None
    templates = [
        request_template("send", {"to": name, "body": text}, client.token) for name in names
    ]
    return lambda request_id: templates[pick.randrange(len(templates))](request_id)


async def _count(spec: dict[str, Any], clients: list[LeanClient], start: float) -> dict[str, Any]:
    names: list[str] = spec["names"]
    remaining = int(spec["count"])
    acked = failed = 0
    failures: Counter[str] = Counter()
    rng = random.Random(spec["seed"])
    text = body(rng)

    def more() -> bool:
        nonlocal remaining
        if remaining > 0 and failed < MAX_ERRORS and time.perf_counter() < deadline:
            remaining -= 1
            return True
        return False

    def one_acked(t0: float) -> None:
        nonlocal acked
        acked += 1

    async def refused(exc: errors.ChatError) -> None:
        nonlocal remaining, failed
        failures[exc.code] += 1
        failed += 1
        remaining += 1  # the count is of acknowledged sends
        await asyncio.sleep(0.01)

    async def sender(client: LeanClient, seed: int) -> None:
        make = _sends(client, names, text, random.Random(seed))
        await _closed_loop(client, make, more, one_acked, refused)

    await _sleep_until(time.perf_counter() + (start - time.time()))
    t0, cpu0 = time.perf_counter(), _cpu_now()
    deadline = t0 + (spec["max_seconds"] or float("inf"))
    await asyncio.gather(*(sender(c, rng.randrange(1 << 30)) for c in clients))
    seconds = time.perf_counter() - t0
    return {"acked": acked, "errors": dict(failures), "cpu": _cpu_now() - cpu0, "seconds": seconds}


if __name__ == "__main__":
    sys.exit(worker_main())
