"""Client library: one logical conversation with whichever node is the primary.

Used by ``chatctl``, the tests and the benchmark. The wire format is
``service/protocol.py``; this module adds what a client of a replicated service
needs on top of it.

Layers, top to bottom (one module, because each layer is small and only
the next one up uses it):

* ``SyncClient``: a blocking facade with its own event loop, for ``chatctl``;
* ``Client``: the policy: which node to ask, when to retry, listen resume;
* ``status_all``: one ``status`` per node, for an operator's view;
* ``Connection``: one handshaken connection, requests multiplexed by id.

Theory of operation
-------------------
A ``Client`` is configured with every node's address. It keeps one
``Connection`` open to the node that last answered as the primary and sends
every request over it; several requests may be in flight on that connection
at once, and replies are matched by ``request_id``.

``call`` runs one request to completion under an overall deadline
(``timeout``):

* ``not_primary`` with a ``primary`` address: follow it (once at once, then
  with backoff, so two nodes with stale views cannot make us spin);
  without an address: try the next configured server.
* ``unavailable`` (a primary that cannot serve yet), a refused, closed or
  reset connection, or no reply within the attempt timeout
  (``min(attempt_timeout, remaining)``; a frozen node accepts TCP connections
  but never answers): back off (20 ms doubling to 250 ms, with jitter) and
  retry, on another server when the connection was the problem.
* ``busy`` (the primary will not do it now: too many failed logins, its hashing
  or its queue full, the account past its rate): wait the ``retry_after`` it
  names, and a little more at random (up to half of it, at most ``BUSY_SPREAD``:
  a rate tells each refused write its own time, and a long spread would waste
  it), and retry; raise it at once when that wait would pass the deadline, and
  raise it (not "no primary reachable") when the deadline passes after it.
* no reply yet after ``hedge_after`` (0.2 s, a small part of the attempt
  timeout): while the attempt goes on waiting, ask the other nodes who leads
  (``status`` over one connection each, every 0.1 s). The answer that counts
  is the one in the highest epoch: a primary naming itself, or a backup naming
  its primary. When that is another node than the one we wait for, the
  attempt is abandoned (its connection closed) and the request goes there at
  once, with the same request id. So a frozen primary costs a client about
  the time the cluster takes to replace it, not the attempt timeout; a primary
  that is merely slow is still the one the others name, and is waited for.
* any other error frame (the service refused the request): raise it at once.
* when the deadline passes: raise ``errors.Unavailable("no primary reachable
  within N s ...")``.

Invariants
----------
* Every retry of one ``call`` sends the same ``request_id``: write operations
  are idempotent by request id, so a request whose reply was lost (timeout,
  failover) is executed at most once however many times it is sent.
* A retry loop never outlives its deadline; nothing here retries forever.
* A connection that missed a reply deadline is closed, never reused: a late
  reply could otherwise be mistaken for an answer to a later request.
* ``listen`` yields message ids in strictly increasing order. After a failover
  it re-issues ``listen`` with ``after`` = the last id it yielded, and drops
  anything at or below that id, so the stream has no gap and no duplicate.
  While the stream is idle it probes the node every ``keepalive`` seconds, so a
  frozen or demoted primary is noticed and the stream moves to the new one.

Transport: plain TCP to loopback addresses; anything else only over TLS, with
the node's certificate verified against a CA file (``tls.client_context``,
``chatctl --ca``). A certificate that does not verify, or a node that does not
speak TLS, fails the call at once (``errors.Refused``): every node of a cluster
shares one CA, so trying the others would only delay the same answer.

Exceptions leaving this module are ``errors.ChatError`` subclasses (the tree in
``service/errors.py``); socket and timeout errors are translated here.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

from . import errors, protocol
from .config import is_loopback, parse_address
from .tls import describe_failure

DEFAULT_SERVERS = ("127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003")
DEFAULT_TIMEOUT = 10.0
# A node that does not answer one request within this long is treated as down.
ATTEMPT_TIMEOUT = 2.0
# An election takes tens of milliseconds: poll at that pace, not slower.
BACKOFF_START = 0.01
BACKOFF_CAP = 0.1
# At most this much is added to a busy answer's retry_after (at most half of it).
BUSY_SPREAD = 0.5
# An idle listen stream checks its node this often (a frozen node sends nothing).
KEEPALIVE = 1.0
# A request unanswered this long starts asking the other nodes who leads; then
# again every HEDGE_INTERVAL, each node given HEDGE_PROBE_TIMEOUT to answer.
HEDGE_AFTER = 0.2
HEDGE_INTERVAL = 0.1
HEDGE_PROBE_TIMEOUT = 0.5
READ_CHUNK = 64 * 1024

Result = dict[str, Any]
T = TypeVar("T")


def new_request_id() -> str:
    """A fresh request id: 32 hex characters (the protocol allows 1 to 64), the
    time in nanoseconds then 64 random bits.

    Time first, so that ids sort roughly by age: the primary stores each write's
    request id in an index, and ids that arrive in order land on the same few
    index pages, where random ones would dirty one page of the index per write.
    The random half keeps ids unique across clients."""
    return f"{time.time_ns():016x}{secrets.token_hex(8)}"


class ConnectionLost(Exception):
    """The connection was refused, closed, reset, or stopped answering.

    Internal to the client: the request may be retried on another connection.
    ``call`` turns it into ``errors.Unavailable`` when its deadline passes.
    """

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"{address}: {reason}")
        self.address = address
        self.reason = reason


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, EOFError):
        return "connection closed"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    if isinstance(exc, ConnectionLost):
        return exc.reason
    if isinstance(exc, errors.ChatError):
        return exc.message
    return str(exc) or type(exc).__name__


def _copy(exc: BaseException) -> BaseException:
    """A fresh instance of a stored failure, so each waiter gets its own traceback."""
    if isinstance(exc, errors.ChatError):
        return type(exc)(exc.message, **exc.details)
    if isinstance(exc, ConnectionLost):
        return ConnectionLost(exc.address, exc.reason)
    return ConnectionLost("?", str(exc))


class _FrameReader:
    """Whole frames from a stream, for the handshake (before the read loop runs)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.decoder = protocol.FrameDecoder()
        self.ready: list[protocol.Frame] = []

    async def next(self) -> protocol.Frame:
        while not self.ready:
            data = await self.reader.read(READ_CHUNK)
            if not data:
                raise EOFError("connection closed")
            self.ready.extend(self.decoder.feed(data))
        return self.ready.pop(0)


class Connection:
    """One handshaken connection to one node, multiplexing requests by id.

    A background task reads frames and routes them: ``reply``/``error`` to the
    future of the request with that id, ``message`` to the queue of the
    ``listen`` with that id. When the connection ends, every waiter gets the
    reason (``ConnectionLost``, or the error of an error frame without a
    request id) and the connection never carries another request.
    """

    def __init__(
        self,
        address: str,
        writer: asyncio.StreamWriter,
        frames: _FrameReader,
        welcome: protocol.Frame,
    ) -> None:
        self.address = address
        self.welcome = welcome
        self._writer = writer
        self._frames = frames
        self._pending: dict[str, asyncio.Future[Result]] = {}
        self._streams: dict[str, asyncio.Queue[Result | BaseException]] = {}
        self._failure: BaseException | None = None
        # The node refuses a request beyond this many unanswered on a connection:
        # more wait here for a slot instead.
        self._slots = asyncio.Semaphore(protocol.MAX_IN_FLIGHT)
        self._task = asyncio.create_task(self._read_loop(), name=f"chat-client {address}")

    @classmethod
    async def open(
        cls, address: str, timeout: float, tls: ssl.SSLContext | None = None
    ) -> Connection:
        """Connect and handshake within ``timeout``; ConnectionLost if the node is not
        there, ``errors.Refused`` if it cannot be spoken to safely (see "Transport")."""
        host, port = parse_address(address)
        if tls is None and not is_loopback(host):
            raise errors.InvalidInput(
                f"{address} is not a loopback address: plain TCP is allowed on loopback "
                "only; give the cluster's CA file (chatctl --ca FILE or CHAT_CA)"
            )
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await _open(host, port, tls)
                try:
                    frames = _FrameReader(reader)
                    version = protocol.choose_version(await frames.next())
                    writer.write(protocol.encode_frame(protocol.client_hello(version)))
                    await writer.drain()
                    welcome = await frames.next()
                except BaseException:
                    writer.close()
                    raise
        except ssl.SSLError as exc:
            raise errors.Refused(f"{address}: {describe_failure(exc)}") from None
        except (OSError, TimeoutError, EOFError, errors.ProtocolViolation) as exc:
            raise ConnectionLost(address, _describe(exc)) from None
        if welcome.get("type") != "welcome":
            writer.close()
            if welcome.get("type") == "error":
                raise errors.from_wire(welcome)
            raise ConnectionLost(address, f"unexpected {welcome.get('type')!r} frame")
        return cls(address, writer, frames, welcome)

    @property
    def closed(self) -> bool:
        return self._failure is not None

    async def request(
        self, frame: protocol.Frame, timeout: float, *, stream: bool = False
    ) -> tuple[Result, asyncio.Queue[Result | BaseException] | None]:
        """Send one request and wait for its reply; with ``stream``, also return
        the queue that will receive its ``message`` frames (and, at the end, an
        exception). On a reply timeout the connection is closed."""
        if self._failure is not None:
            raise _copy(self._failure)
        request_id = str(frame["request_id"])
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        queue: asyncio.Queue[Result | BaseException] | None = None
        if stream:
            queue = asyncio.Queue()
            self._streams[request_id] = queue
        try:
            async with asyncio.timeout(timeout), self._slots:
                self._writer.write(protocol.encode_frame(frame))
                await self._writer.drain()
                result = await future
        except TimeoutError:
            self.close(ConnectionLost(self.address, f"no answer within {timeout:.1f} s"))
            raise ConnectionLost(self.address, "no answer") from None
        except OSError as exc:
            self.close(ConnectionLost(self.address, _describe(exc)))
            raise ConnectionLost(self.address, _describe(exc)) from None
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        finally:
            self._pending.pop(request_id, None)
        return result, queue

    def unsubscribe(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def close(self, reason: BaseException | None = None) -> None:
        """Close now; pending requests and streams fail with ``reason``."""
        self._fail(reason or ConnectionLost(self.address, "connection closed"))
        if self._task is not asyncio.current_task():
            self._task.cancel()

    async def aclose(self) -> None:
        self.close()
        with contextlib.suppress(BaseException):
            await self._task
        with contextlib.suppress(OSError, RuntimeError):
            await self._writer.wait_closed()

    async def _read_loop(self) -> None:
        reason: BaseException = ConnectionLost(self.address, "connection closed")
        try:
            for frame in self._frames.ready:
                self._dispatch(frame)
            self._frames.ready.clear()
            while self._failure is None:
                data = await self._frames.reader.read(READ_CHUNK)
                if not data:
                    break
                for frame in self._frames.decoder.feed(data):
                    self._dispatch(frame)
        except (OSError, errors.ProtocolViolation) as exc:
            reason = ConnectionLost(self.address, _describe(exc))
        finally:
            self._fail(reason)

    def _dispatch(self, frame: protocol.Frame) -> None:
        kind, request_id = frame.get("type"), frame.get("request_id")
        if kind == "message":
            queue = self._streams.get(str(request_id))
            message = frame.get("message")
            if queue is not None and isinstance(message, dict):
                queue.put_nowait(message)
        elif kind == "error" and request_id is None:
            # About the connection as a whole (the node is closing it): fail everything.
            self._fail(errors.from_wire(frame))
        elif kind in ("reply", "error"):
            future = self._pending.pop(str(request_id), None)
            outcome: Result | BaseException
            if kind == "error":
                outcome = errors.from_wire(frame)
            else:
                result = frame.get("result")
                outcome = result if isinstance(result, dict) else {}
            if future is not None and not future.done():
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
            elif isinstance(outcome, BaseException) and str(request_id) in self._streams:
                # A stream that was running ended with an error.
                self._streams.pop(str(request_id)).put_nowait(outcome)
        # Unknown frame types are ignored: a newer node may send more than we know.

    def _fail(self, reason: BaseException) -> None:
        if self._failure is not None:
            return
        self._failure = reason
        for future in self._pending.values():
            if not future.done():
                future.set_exception(_copy(reason))
        self._pending.clear()
        for queue in self._streams.values():
            queue.put_nowait(_copy(reason))
        self._streams.clear()
        self._writer.close()


async def _open(
    host: str, port: int, tls: ssl.SSLContext | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if tls is None:
        return await asyncio.open_connection(host, port)
    return await asyncio.open_connection(host, port, ssl=tls, server_hostname=host.strip("[]"))


class _Elsewhere(Exception):
    """While an attempt waited, the other nodes named another primary (``leader``)."""

    def __init__(self, leader: str) -> None:
        super().__init__(leader)
        self.leader = leader


def leader_of(reports: Sequence[Result]) -> str | None:
    """The primary that ``status`` reports name in the highest epoch, or None.

    A node claiming the role itself outranks hearsay in the same epoch. A node
    that was primary in an older epoch (frozen and thawed, not yet told) loses
    to any report of a newer one."""
    best: tuple[tuple[int, bool], str] | None = None
    for report in reports:
        node = report.get("node") if report.get("up") else None
        if not isinstance(node, dict) or not isinstance(node.get("epoch"), int):
            continue
        claims = node.get("role") == "primary"
        named = report.get("address") if claims else node.get("primary")
        if not _valid_address(named):
            continue
        key = (int(node["epoch"]), claims)
        if best is None or key > best[0]:
            best = (key, str(named))
    return best[1] if best is not None else None


class _Backoff:
    """Exponential backoff with jitter that never sleeps past a deadline."""

    def __init__(self) -> None:
        self.delay = BACKOFF_START

    async def sleep(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        pause = self.delay * random.uniform(0.5, 1.0)
        self.delay = min(self.delay * 2, BACKOFF_CAP)
        await asyncio.sleep(max(0.0, min(pause, deadline - loop.time())))


class Client:
    """The asyncio client. Construct anywhere; use inside one event loop.

    ``servers`` are ``HOST:PORT`` strings (any node of the cluster);
    ``timeout`` bounds each call, retries included; ``token`` is the session
    token sent with requests that need one (``login`` sets it); ``tls`` the
    context that verifies the nodes (``tls.client_context``), None for plain TCP.
    """

    def __init__(
        self,
        servers: Sequence[str],
        timeout: float = DEFAULT_TIMEOUT,
        token: str | None = None,
        *,
        attempt_timeout: float = ATTEMPT_TIMEOUT,
        keepalive: float = KEEPALIVE,
        hedge_after: float | None = HEDGE_AFTER,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if not servers:
            raise errors.InvalidInput("no server addresses given")
        for address in servers:
            parse_address(address)
        self.servers = list(servers)
        self.timeout = timeout
        self.token = token
        self.attempt_timeout = attempt_timeout
        self.keepalive = keepalive
        self.hedge_after = hedge_after  # None: wait out every attempt
        self.tls = tls
        self._conn: Connection | None = None
        self._hint: str | None = None  # the node that last answered as primary
        self._cursor = 0  # next configured server to try when there is no hint
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.aclose()

    # ---- the generic request --------------------------------------------------------

    async def call(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        token: str | None = None,
        *,
        request_id: str | None = None,
    ) -> Result:
        """Run one operation on the primary and return its ``result`` object.

        ``token`` defaults to the client's session token. ``request_id``
        defaults to a fresh one; it is reused on every retry of this call.
        """
        frame = protocol.request(
            op, request_id or new_request_id(), args or {}, token or self.token
        )
        _, result, _ = await self._exchange(frame)
        return result

    async def _exchange(
        self, frame: protocol.Frame, *, stream: bool = False
    ) -> tuple[Connection, Result, asyncio.Queue[Result | BaseException] | None]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        backoff = _Backoff()
        problem = "no server answered"
        redirected = False
        # A refused or closed connection means a dead node: try the others at once,
        # and pause only after every server failed in a row.
        unreachable = 0
        busy: errors.Busy | None = None  # the last answer, when it was busy
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                if busy is not None:
                    raise busy
                raise errors.Unavailable(
                    f"no primary reachable within {self.timeout:g} s (last: {problem})"
                )
            busy = None
            address = self._pick()
            try:
                conn, result, queue = await self._hedged(address, frame, deadline, stream)
            except _Elsewhere as exc:
                # The node we waited for is silent and the others follow another.
                await self._drop(address)
                problem = f"{address}: no answer, and the other nodes name {exc.leader}"
                self._hint = exc.leader
                continue
            except errors.NotPrimary as exc:
                await self._drop(address)
                problem = f"{address}: {exc.message}"
                primary = exc.details.get("primary")
                if _valid_address(primary) and primary != address:
                    self._hint = primary
                    if not redirected:
                        redirected = True
                        continue
                else:
                    self._hint = None
                    self._advance(address)
            except errors.Busy as exc:
                # The primary would not do it now (a password hash, a full queue, the
                # account's rate) and said when to come back: wait that long (a little
                # more, so that clients told the same time do not all return at once;
                # not much more: a rate tells each refused write its own time), unless
                # it is past the deadline.
                if loop.time() + exc.retry_after >= deadline:
                    raise
                busy = exc
                wait = max(exc.retry_after, BACKOFF_CAP)
                pause = wait + random.uniform(0.0, min(wait / 2, BUSY_SPREAD))
                await asyncio.sleep(min(pause, deadline - loop.time()))
                continue
            except errors.Unavailable as exc:
                # The node is the primary but cannot serve yet (e.g. waiting for
                # its sync set): ask it again after a pause.
                problem = f"{address}: {exc.message}"
                if self._conn is None or self._conn.closed:
                    self._hint = None
                    self._advance(address)
            except ConnectionLost as exc:
                await self._drop(address)
                problem = str(exc)
                self._hint = None
                self._advance(address)
                unreachable += 1
                if unreachable % len(self.servers):
                    continue
            else:
                self._hint = address
                return conn, result, queue
            redirected = False
            await backoff.sleep(deadline)

    async def _attempt(
        self, address: str, frame: protocol.Frame, deadline: float, stream: bool
    ) -> tuple[Connection, Result, asyncio.Queue[Result | BaseException] | None]:
        """One attempt on one node: connect if needed, send, wait for the reply."""
        loop = asyncio.get_running_loop()
        remaining = max(0.001, deadline - loop.time())
        conn = await self._connection(address, min(self.attempt_timeout, remaining))
        remaining = max(0.001, deadline - loop.time())
        result, queue = await conn.request(
            frame, min(self.attempt_timeout, remaining), stream=stream
        )
        return conn, result, queue

    async def _hedged(
        self, address: str, frame: protocol.Frame, deadline: float, stream: bool
    ) -> tuple[Connection, Result, asyncio.Queue[Result | BaseException] | None]:
        """``_attempt``, asking the other nodes who leads once it is slow to answer;
        raises ``_Elsewhere`` when they name another node (see the module docstring)."""
        attempt = asyncio.ensure_future(self._attempt(address, frame, deadline, stream))
        others = [server for server in self.servers if server != address]
        if self.hedge_after is None or not others:
            return await attempt
        search: asyncio.Future[str] | None = None
        try:
            await asyncio.wait({attempt}, timeout=self.hedge_after)
            if not attempt.done():
                search = asyncio.ensure_future(self._find_leader(address, others))
                await asyncio.wait({attempt, search}, return_when=asyncio.FIRST_COMPLETED)
            if attempt.done() or search is None:
                return attempt.result()
            raise _Elsewhere(search.result())
        finally:
            for task in (attempt, search):
                if task is not None and not task.done():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)

    async def _find_leader(self, waiting_on: str, others: list[str]) -> str:
        """Ask ``others`` for their status until they name a leader other than
        ``waiting_on``; return its address. Runs until cancelled otherwise."""
        conns: dict[str, Connection] = {}
        try:
            while True:
                reports = await asyncio.gather(*(self._ask_status(a, conns) for a in others))
                leader = leader_of(reports)
                if leader is not None and leader != waiting_on:
                    return leader
                await asyncio.sleep(HEDGE_INTERVAL)
        finally:
            for conn in conns.values():
                await conn.aclose()

    async def _ask_status(self, address: str, conns: dict[str, Connection]) -> Result:
        """One node's status over a connection kept in ``conns``; ``up`` False on failure."""
        try:
            conn = conns.get(address)
            if conn is None or conn.closed:
                conn = conns[address] = await Connection.open(
                    address, HEDGE_PROBE_TIMEOUT, self.tls
                )
            frame = protocol.request("status", new_request_id(), {})
            result, _ = await conn.request(frame, HEDGE_PROBE_TIMEOUT)
        except (ConnectionLost, errors.ChatError) as exc:
            return {"address": address, "up": False, "error": _describe(exc)}
        return {"address": address, "up": True, **result}

    @property
    def answered_by(self) -> str | None:
        """The address of the node that answered the last successful call."""
        return self._hint

    def _pick(self) -> str:
        if self._conn is not None and not self._conn.closed:
            return self._conn.address
        if self._hint is not None:
            return self._hint
        return self.servers[self._cursor % len(self.servers)]

    def _advance(self, failed: str) -> None:
        if failed in self.servers:
            self._cursor = (self.servers.index(failed) + 1) % len(self.servers)

    async def _connection(self, address: str, timeout: float) -> Connection:
        async with self._lock:
            conn = self._conn
            if conn is not None and not conn.closed and conn.address == address:
                return conn
            self._conn = None
            if conn is not None:
                await conn.aclose()
            self._conn = await Connection.open(address, timeout, self.tls)
            return self._conn

    def _abandon(self, conn: Connection) -> None:
        """Close a connection whose listen stream the caller gave up: the node ends a
        stream only with its connection, and refuses a second one on it. Requests in
        flight on it are retried on a new connection, under their ids."""
        if self._conn is conn:
            self._conn = None
        conn.close()

    async def _drop(self, address: str) -> None:
        conn = self._conn
        if conn is not None and conn.address == address:
            self._conn = None
            await conn.aclose()

    # ---- typed operations -----------------------------------------------------------

    async def register(self, username: str, password: str) -> Result:
        """[user, user_id]"""
        return await self.call("register", {"username": username, "password": password})

    async def login(self, username: str, password: str) -> Result:
        """[user, user_id, unread, token]; the token becomes this client's token."""
        result = await self.call("login", {"username": username, "password": password})
        token = result.get("token")
        if not isinstance(token, str):
            raise errors.ProtocolViolation("the login reply carries no session token")
        self.token = token
        return result

    async def logout(self, token: str | None = None) -> Result:
        """[user]; ends the session (this client's token unless one is given)."""
        result = await self.call("logout", {}, token)
        if token is None or token == self.token:
            self.token = None
        return result

    async def whoami(self) -> Result:
        """[user, user_id, unread]"""
        return await self.call("whoami")

    async def search(self, pattern: str | None = None, limit: int = 50) -> Result:
        """[users, more]: names matching a ``*``/``?`` glob, case-insensitive, sorted."""
        return await self.call("search", {"pattern": pattern, "limit": limit})

    async def send(self, to: str, body: str) -> Result:
        """[message]"""
        return await self.call("send", {"to": to, "body": body})

    async def read(
        self,
        *,
        sent: bool = False,
        with_user: str | None = None,
        from_user: str | None = None,
        unread: bool = False,
        limit: int = 20,
        before: int | None = None,
        after: int | None = None,
        oldest_first: bool = False,
    ) -> Result:
        """[messages, more]; newest first unless ``oldest_first``."""
        args = {
            "box": "sent" if sent else "inbox",
            "with": with_user,
            "from": from_user,
            "unread": unread,
            "limit": limit,
            "before": before,
            "after": after,
            "oldest_first": oldest_first,
        }
        return await self.call("read", args)

    async def mark_read(self, ids: Sequence[int]) -> Result:
        """[marked]"""
        return await self.call("mark_read", {"ids": list(ids)})

    async def delete_messages(self, ids: Sequence[int]) -> Result:
        """[deleted]"""
        return await self.call("delete_messages", {"ids": list(ids)})

    async def delete_account(self) -> Result:
        """[user, deleted]; every session of the user ends."""
        result = await self.call("delete_account")
        self.token = None
        return result

    async def status(self) -> Result:
        """[node, nodes]: the view of whichever node this client is talking to."""
        return await self.call("status")

    async def status_all(self) -> list[Result]:
        """One status report per configured server (see ``status_all``)."""
        return await status_all(
            self.servers, self.timeout, attempt_timeout=self.attempt_timeout, tls=self.tls
        )

    async def listen(
        self,
        after: int | None = None,
        token: str | None = None,
        *,
        on_stream: Callable[[str | None], None] | None = None,
    ) -> AsyncGenerator[Result, None]:
        """Yield each message for this user as it arrives, across failovers.

        First the backlog (unread messages, or every message after ``after``),
        then live ones. Raises ``errors.Unavailable`` when no primary can be
        reached within ``timeout`` of losing the stream, and a refusal (e.g.
        ``auth_failed`` once the session ends) at once. ``on_stream`` is told
        the primary's address each time the stream starts, and None each time
        it breaks (until the next start, there is no primary to listen to).
        """
        last = after
        while True:
            frame = protocol.request(
                "listen", new_request_id(), {"after": last}, token or self.token
            )
            conn, _, queue = await self._exchange(frame, stream=True)
            assert queue is not None
            if on_stream is not None:
                on_stream(conn.address)
            live = True
            try:
                async for message in self._stream(conn, queue, token):
                    message_id = message.get("id")
                    if not isinstance(message_id, int) or (last is not None and message_id <= last):
                        continue
                    last = message_id
                    yield message
                live = False  # the stream broke: listen again, elsewhere if need be
            except errors.ChatError:
                live = False  # the node ended the stream
                raise
            finally:
                conn.unsubscribe(str(frame["request_id"]))
                if live:
                    self._abandon(conn)
            if on_stream is not None:
                on_stream(None)

    async def _stream(
        self,
        conn: Connection,
        queue: asyncio.Queue[Result | BaseException],
        token: str | None,
    ) -> AsyncIterator[Result]:
        """The messages of one listen on one connection; returns when it breaks."""
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), self.keepalive)
            except TimeoutError:
                if await self._alive(conn, token):
                    continue
                return
            if isinstance(item, errors.ChatError) and not item.retriable:
                raise item
            if isinstance(item, BaseException):
                await self._drop(conn.address)
                return
            yield item

    async def _alive(self, conn: Connection, token: str | None) -> bool:
        """Probe an idle stream's node: is it still a primary that answers?"""
        probe = protocol.request("whoami", new_request_id(), {}, token or self.token)
        try:
            await conn.request(probe, min(self.attempt_timeout, self.timeout))
        except errors.ChatError as exc:
            if not exc.retriable:
                raise
        except ConnectionLost:
            pass
        else:
            return True
        await self._drop(conn.address)
        return False


def _valid_address(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        parse_address(value)
    except errors.InvalidInput:
        return False
    return True


async def status_all(
    servers: Sequence[str],
    timeout: float = DEFAULT_TIMEOUT,
    *,
    attempt_timeout: float = ATTEMPT_TIMEOUT,
    tls: ssl.SSLContext | None = None,
) -> list[Result]:
    """Ask every server for its status, concurrently, once each.

    Returns one dict per server, in order: ``{"address", "up": True, "node",
    "nodes"}`` (the node's own view, see PROTOCOL.md) or ``{"address", "up":
    False, "error"}`` when it cannot be reached or does not answer within
    ``min(attempt_timeout, timeout)``.
    """
    limit = min(attempt_timeout, timeout)

    async def one(address: str) -> Result:
        conn: Connection | None = None
        try:
            async with asyncio.timeout(limit):
                conn = await Connection.open(address, limit, tls)
                frame = protocol.request("status", new_request_id(), {})
                result, _ = await conn.request(frame, limit)
        except (ConnectionLost, TimeoutError, errors.ChatError) as exc:
            return {"address": address, "up": False, "error": _describe(exc)}
        finally:
            if conn is not None:
                await conn.aclose()
        return {"address": address, "up": True, **result}

    return list(await asyncio.gather(*(one(address) for address in servers)))


class SyncClient:
    """A blocking facade over a ``Client`` with its own event loop (for ``chatctl``).

    with SyncClient(Client(servers)) as chat:
        chat.run(chat.client.login("alice", password))
        for message in chat.listen():
            ...
    """

    def __init__(self, client: Client) -> None:
        self.client = client
        self._runner = asyncio.Runner()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run one coroutine of the client to completion (Ctrl-C cancels it)."""
        return self._runner.run(coro)

    def call(self, op: str, args: dict[str, Any] | None = None, token: str | None = None) -> Result:
        return self.run(self.client.call(op, args, token))

    def listen(self, after: int | None = None) -> Iterator[Result]:
        stream = self.client.listen(after)

        async def following() -> Result | None:
            try:
                return await anext(stream)
            except StopAsyncIteration:
                return None

        try:
            while (message := self.run(following())) is not None:
                yield message
        finally:
            self.run(stream.aclose())

    def close(self) -> None:
        try:
            self.run(self.client.close())
        finally:
            self._runner.close()
