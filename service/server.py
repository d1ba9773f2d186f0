"""The server: one TCP port per node for clients and peers alike.

Every connection starts with the handshake of ``protocol``: our ``hello``,
their ``hello`` naming a role. Peers (and the operator tool) are handed to
``peer.PeerLinks``; clients get a ``ClientSession``. With TLS configured
(``service/tls.py``) the port speaks TLS to everyone, and a peer hello is let
through only on a connection that presented that node's certificate.

A client session gets each request frame from the transport's callback once
its handshake is over (``peer.FrameFeed``: no task wakes to read it) and hands
each write straight to the writer, which answers it from its acknowledgement:
no task, future or timer of its own per write, on the busiest path of the node.
Other requests run as tasks of their own. So a slow write never blocks a read
on the same connection; replies carry the request id and may come back in any
order. Bad input is answered with one error frame and changes nothing: an
unknown op, wrong types, an unknown argument, a bad token. A frame that breaks
the protocol itself (garbage, an oversized length, a frame cut short, a frame
that is not a request or has no usable request id, a frame sent before our
welcome) gets an error frame with a null request id and the connection is
closed; nothing else on the node notices. A connection that does not finish its
hello within the handshake timeout, or stays idle past the idle timeout, is
closed.

At most ``protocol.MAX_IN_FLIGHT`` requests of a connection are unanswered at
once (a listen until its ``listening`` reply); one more is refused with
``invalid``. The frames already received are all dispatched before any is
served, so requests pipelined in one write count together, however fast the
node would have answered the first ones.

Connections are bounded so that a node never runs out of file descriptors or
memory because of strangers (the limits are in ``NodeConfig``):

* at most ``max_handshakes`` connections may be in their handshake; a new one
  beyond that closes the oldest (with a ``busy`` error frame), so stalled
  handshakes cannot lock out a peer, whose handshake takes one round trip;
* a client hello beyond ``client_limit`` connected clients gets a ``busy``
  error frame instead of a welcome (the client tries another node), unless its
  IP address holds at least two fewer connections than the address holding the
  most, whose oldest connection is then closed (``busy``) to make room
  (``slots.ClientSlots``: strangers' idle connections from one host cannot lock
  everyone out); peers are never refused for capacity, they are authenticated
  by their hello instead;
* frames are limited to ``MAX_HELLO_FRAME`` until the hello, then
  ``max_client_frame`` for a client, ``max_frame`` for a peer; a declared
  length over the limit is refused from its header, before any body is read.

Refusals are logged with the dialer's address, at most once per
``log_interval`` per kind, with a count of the others (``throttle``).

``register`` and ``login`` hash passwords in the bounded pool of
``ratelimit.HashPool``, never on the event loop; a login is first checked
against the backoff windows of ``ratelimit.LoginLimiter`` (keyed by the user
name and the client's IP address). Either may answer ``busy`` at once instead.

``listen`` registers the session for pushes: after the backlog (read on the
primary and released once acknowledged), every message sent to the user is
pushed when its write is acknowledged, never before (R7). When the node stops
being primary, listening connections are closed so clients resume elsewhere.
A stream lives only as long as its session: an acknowledged ``logout`` ends the
streams opened with that token, an acknowledged ``delete_account`` every stream
of the user, with an ``auth_failed`` error frame carrying the listen's request
id; and the session is checked again before each push and every
``listen_check_interval``, so a session that ends any other way ends its stream
too. A live stream keeps its connection open however long the client is
silent; once the stream has ended the idle timeout applies again. A connection
carries one live stream at most: a second ``listen`` would push every message
twice, and is refused.

The server sees the rest of the node through three small interfaces, which
the composition root (``node.py``) wires: ``Replica`` (the replicator: role,
writes, acknowledged reads, hooks), ``CommittedState`` (the database, read at
once, for what must be checked before an acknowledgement is awaited) and
``PeerDoor`` (where peer and operator connections go).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import resource
import secrets
import time
from collections.abc import Callable, Hashable, Iterable
from typing import Any, Protocol, TypeVar

from . import chat, protocol, ratelimit, tls
from .config import NodeConfig
from .errors import (
    AuthFailed,
    Busy,
    ChatError,
    Internal,
    InvalidInput,
    NotPrimary,
    ProtocolViolation,
    Refused,
    StorageCorrupt,
    StorageFault,
    Unavailable,
)
from .peer import (
    OPERATOR_ID,
    FrameFeed,
    FrameReader,
    close_after_error,
    forget_frames,
    one_line,
)
from .replication.types import Position, Role
from .slots import ClientSlots, SlotsFull
from .storage import Db
from .throttle import ThrottledLog
from .turns import TurnBudget
from .unread import HEAVY, UnreadBudget
from .writerate import Tokens, WriteRate, told

log = logging.getLogger("service.server")

MAX_UNREAD = 16 * 1024 * 1024
LISTEN_QUEUE = 10_000
# Every connection is read without pause, so the StreamReader's buffer only holds a
# burst the event loop has not got to yet; the transport stops reading at twice this.
STREAM_LIMIT = 256 * 1024
MAX_ID = 2**63 - 1
# After answering a request ``busy``, a connection is not read for the retry_after it
# was told, up to this long (``FrameFeed.hold``): a client that does not wait is
# pushed back by TCP instead of being refused frame by frame, thousands a second.
BUSY_HOLD_CAP = 1.0
# But not for the first refusals: a client may have as many requests in flight as it
# may leave unanswered, all sent before it could learn of the first ``busy``, and
# holding the connection after each would keep the others waiting in TCP past the
# client's patience. So a connection is held only once it was refused more than
# that many times at once, or more than REFUSALS_PER_SECOND after.
REFUSALS_AT_ONCE = protocol.MAX_IN_FLIGHT
REFUSALS_PER_SECOND = 10.0
# The arguments of the operations the server reads itself (the writes it passes on
# are checked by chat.apply_write): anything else is refused, as for writes.
CLIENT_FIELDS: dict[str, frozenset[str]] = {
    "status": frozenset(),
    "whoami": frozenset(),
    "search": frozenset({"pattern", "limit"}),
    "listen": frozenset({"after"}),
    "read": chat.READ_FIELDS,
    "register": frozenset({"username", "password"}),
    "login": frozenset({"username", "password"}),
}


# Writes the server passes to the writer as they are (``chat.apply_write`` checks their
# arguments); ``register`` and ``login`` first hash a password in the pool.
DIRECT_WRITES = protocol.WRITE_OPS - {"register", "login"}

T = TypeVar("T")
# A write acknowledged: (recipient id, message) of a ``send``; (op, token hash, result)
# of a write that ended sessions.
MessageHook = Callable[[int, dict[str, Any]], None]
SessionHook = Callable[[str, str | None, dict[str, Any]], None]


class Replica(Protocol):
    """The node's replication as the server uses it (``replication.runtime.Replicator``):
    its role, the primary's writes and acknowledged reads, and what it tells of
    acknowledged writes and role changes."""

    message_hooks: list[MessageHook]
    session_hooks: list[SessionHook]
    role_hooks: list[Callable[[Role], None]]

    @property
    def role(self) -> Role: ...

    def primary_address(self) -> str | None: ...

    def require_primary(self) -> None: ...

    def enqueue(
        self,
        op: str,
        args: dict[str, Any],
        token_hash: str | None,
        request_id: str,
        done: Callable[[dict[str, Any] | ChatError], None],
        fingerprint: str | None = None,
    ) -> None: ...

    async def submit(
        self,
        op: str,
        args: dict[str, Any],
        token_hash: str | None,
        request_id: str,
        fingerprint: str | None = None,
        rated: bool = True,
    ) -> dict[str, Any]: ...

    async def read_seen(
        self, query: Callable[[Db], T], token_hash: str | None, account: Hashable = None
    ) -> tuple[T, int]: ...

    def reign(self) -> int: ...

    async def wait_acked(self, seq: int) -> None: ...

    def status(self) -> dict[str, Any]: ...

    def damaged(self, why: str) -> None: ...


class CommittedState(Protocol):
    """The node's database as the server reads it directly (``storage.Storage``):
    what is committed here, not yet known to be acknowledged."""

    @property
    def reader(self) -> Db: ...

    def read(self, query: Callable[[Db], T]) -> tuple[T, int]:
        """``query``'s answer and the seq it saw, to wait for before telling it (R7)."""
        ...

    def position(self) -> Position:
        """The last committed transaction's position, as the reader sees it now."""
        ...


class PeerDoor(Protocol):
    """Where peer and operator connections go after our hello (``peer.PeerLinks``)."""

    def welcome(self, hello: protocol.Frame, server_nonce: str) -> tuple[int, protocol.Frame]: ...

    async def run_link(
        self, peer: int, frames: FrameReader, writer: asyncio.StreamWriter
    ) -> None: ...

    async def serve_operator(self, frames: FrameReader, writer: asyncio.StreamWriter) -> None: ...


class Listener:
    """One ``listen`` stream: messages for ``user_id`` after ``last_id``, for as long
    as the session of ``token_hash`` lives."""

    def __init__(
        self,
        session: ClientSession,
        request_id: str,
        user: tuple[int, str],
        token_hash: str | None,
    ) -> None:
        self.session = session
        self.request_id = request_id
        self.user_id, self.user_name = user
        self.token_hash = token_hash
        self.last_id = 0
        self.number = next(_listener_numbers)  # the oldest of a user's streams: the lowest
        # Messages to push; a ChatError ends the stream with that error.
        self.queue: asyncio.Queue[dict[str, Any] | ChatError] = asyncio.Queue(LISTEN_QUEUE)

    def push(self, message: dict[str, Any]) -> None:
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            # A listener that does not read its stream is dropped; it resumes after
            # the last message it saw when it reconnects.
            self.session.close()

    def end(self, reason: ChatError) -> None:
        """Push nothing more; the stream ends with ``reason`` after what is queued."""
        self.session.forget(self)
        try:
            self.queue.put_nowait(reason)
        except asyncio.QueueFull:
            self.session.close()


_listener_numbers = itertools.count()


def session_ended() -> ChatError:
    return AuthFailed(chat.SESSION_ENDED)


def ended_sessions(db: Db, token_hashes: Iterable[str | None], now: float) -> set[str | None]:
    """The token hashes among ``token_hashes`` whose session is no longer live at ``now``."""
    ended: set[str | None] = set()
    for token_hash in token_hashes:
        try:
            chat.session_user(db, token_hash, now)
        except AuthFailed:
            ended.add(token_hash)
    return ended


def open_file_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Server:
    def __init__(
        self,
        config: NodeConfig,
        replicator: Replica,
        database: CommittedState,
        peers: PeerDoor,
    ) -> None:
        self.config = config
        self.replicator = replicator
        self.database = database
        self.peers = peers
        self.listeners: dict[int, set[Listener]] = {}
        # Connections in their handshake, oldest first, with the dialer's address.
        self.handshakes: dict[asyncio.StreamWriter, str] = {}
        self.open_files = open_file_limit()
        self.client_limit = config.client_limit(self.open_files)
        # TLS on the port when configured (service/tls.py): checked at start-up.
        self.tls = tls.node_tls(config)
        self._server: asyncio.Server | None = None
        self._checker: asyncio.Task[None] | None = None
        interval = config.log_interval
        self._busy = ThrottledLog(log, logging.WARNING, "client refused: busy", interval)
        self._failed = ThrottledLog(log, logging.ERROR, "connection failed", interval)
        self._gave_way = ThrottledLog(
            log, logging.WARNING, "client closed to make room for another address", interval
        )
        # Client connections by IP address, and who gives way when full (slots.py).
        self.slots: ClientSlots[ClientSession] = ClientSlots(self.client_limit)
        self._crowded = ThrottledLog(
            log, logging.WARNING, "closed the oldest unfinished handshake", interval
        )
        self._bad_hello = ThrottledLog(log, logging.INFO, "connection refused at hello", interval)
        self._bad_peer = ThrottledLog(log, logging.WARNING, "peer hello refused", interval)
        self.dropped = ThrottledLog(log, logging.WARNING, "client dropped", interval)
        self.drops = 0  # connections dropped for what their clients did not read
        # What clients have not read yet, over every connection (service/unread.py).
        self.unread = UnreadBudget(config.max_client_unread)
        # The client frames taken in one turn of the loop (service/turns.py).
        self.turns = TurnBudget()
        self.scrypt = chat.ScryptParams(n=config.scrypt_n)
        self.limiter = ratelimit.LoginLimiter.from_config(config)
        self.hashing = ratelimit.HashPool(config.hash_workers, config.hash_queue)
        # Accounts registered per client address (ratelimit.address_key), before the
        # hash: each new account is another send_rate.
        self.registrations = WriteRate(config.register_rate, config.register_burst, time.monotonic)
        self._registering_fast = ThrottledLog(
            log, logging.WARNING, "register refused: address past register_rate", interval
        )
        replicator.message_hooks.append(self._on_message)
        replicator.role_hooks.append(self._on_role)
        replicator.session_hooks.append(self._on_session_end)

    def registering_too_fast(self, key: str, wait: float) -> Busy:
        config = self.config
        wait = told(wait)
        self._registering_fast.note(node=config.node_id, address=key)
        return Busy(
            f"this address registers accounts faster than node {config.node_id} allows "
            f"({config.register_rate:g} a second, {config.register_burst} at once: "
            f"register_rate, register_burst); retry in {wait:.2f} s",
            retry_after=wait,
        )

    async def start(self) -> None:
        me = self.config.me
        self._server = await asyncio.start_server(
            self._handle,
            me.host,
            me.port,
            reuse_address=True,
            limit=STREAM_LIMIT,
            ssl=None if self.tls is None else self.tls.server,
            ssl_handshake_timeout=None if self.tls is None else self.config.handshake_timeout,
        )
        self._checker = asyncio.get_running_loop().create_task(self._check_listeners_forever())
        log.info(
            "connection limits node=%s max_clients=%s max_handshakes=%s open_files=%s",
            self.config.node_id,
            self.client_limit,
            self.config.max_handshakes,
            self.open_files,
        )
        if self.client_limit + self.config.max_handshakes >= self.open_files:
            log.warning(
                "max_clients and max_handshakes leave no descriptors for the database and "
                "peers: raise the file limit (supervisord minfds, ulimit -n) or lower them"
            )

    async def close(self) -> None:
        if self._checker is not None:
            self._checker.cancel()
        if self._server is not None:
            self._server.close()
        for session in self.slots:
            session.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        self.hashing.close()

    def all_listeners(self) -> list[Listener]:
        return [listener for group in self.listeners.values() for listener in group]

    def _on_message(self, recipient_id: int, message: dict[str, Any]) -> None:
        for listener in list(self.listeners.get(recipient_id, ())):
            listener.push(message)

    def _on_role(self, role: Role) -> None:
        if role is not Role.PRIMARY:
            for listener in self.all_listeners():
                listener.session.close()

    def _on_session_end(self, op: str, token_hash: str | None, result: dict[str, Any]) -> None:
        """An acknowledged logout or delete_account: end the streams it left without a
        session (logout: those of its token; delete_account: every one of the user)."""
        for listener in self.all_listeners():
            if op == "logout":
                ended = listener.token_hash == token_hash
            else:
                ended = listener.user_name == result.get("user")
            if ended:
                listener.end(session_ended())

    async def _check_listeners_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.listen_check_interval)
            try:
                await self._end_dead_listeners()
            except ChatError:
                pass  # no longer primary: the role hook closed the streams
            except Exception:
                log.exception("checking the sessions of listen streams failed")

    async def _end_dead_listeners(self) -> None:
        listeners = self.all_listeners()
        if not listeners or self.replicator.role is not Role.PRIMARY:
            return
        hashes = {listener.token_hash for listener in listeners}
        ended, seen = self.database.read(lambda db: ended_sessions(db, hashes, time.time()))
        if ended:
            # The end of a session is told only once it is acknowledged (R7).
            await self.replicator.wait_acked(seen)
            for listener in listeners:
                if listener.token_hash in ended:
                    listener.end(session_ended())

    # ---- accepting connections -----------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """asyncio's task for one connection. Cancelled when the node stops, it ends
        quietly: Python 3.11's stream server logs a cancelled handler as an error
        with a traceback (it asks the task for its exception)."""
        try:
            await self._connection(reader, writer)
        except asyncio.CancelledError:
            writer.close()
        except Exception as exc:
            # A bug, or this node's own I/O failing while it served the connection
            # (peer.HandlerFailed): said with its traceback (once a window, should a
            # client find a way to repeat it), and the node goes on. The traceback's
            # frames hold the connection's parts, which hold the error: let go.
            self._failed.note(exc_info=exc, address=_dialer_address(writer), error=one_line(exc))
            forget_frames(exc)
            writer.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        address = _dialer_address(writer)
        frames = FrameReader(reader, protocol.MAX_HELLO_FRAME)
        self._make_room_for_a_handshake()
        self.handshakes[writer] = address
        try:
            welcomed = await self._handshake(frames, writer, address)
        except (ProtocolViolation, EOFError, TimeoutError, ConnectionError, OSError) as exc:
            if isinstance(exc, ProtocolViolation):
                self._bad_hello.note(address=address, error=one_line(exc))
                _refuse(writer, exc)
            self.handshakes.pop(writer, None)  # its place is free while it closes
            await close_after_error(writer)
            return
        finally:
            self.handshakes.pop(writer, None)
        if welcomed is None:
            return
        role, node = welcomed
        if role == "peer":
            frames.limit(self.config.max_frame)
            await self._serve_peer(node, frames, writer)
            return
        frames.limit(self.config.max_client_frame)
        session = ClientSession(self, frames, writer)
        self.slots.add(session.address, session)
        try:
            await session.run()
        finally:
            self.slots.remove(session.address, session)

    async def _handshake(
        self, frames: FrameReader, writer: asyncio.StreamWriter, address: str
    ) -> tuple[str, int] | None:
        """Our hello, theirs, our welcome: ("peer", node) or ("client", 0) once
        welcomed, None once refused (the error frame is sent and logged)."""
        nonce = protocol.new_nonce()
        writer.write(protocol.encode_frame(protocol.server_hello(self.config.node_id, nonce)))
        # asyncio.timeout, not wait_for: wait_for runs the read in a task of its own,
        # which keeps the error (a bad hello) whose traceback holds wait_for's frame
        # and so the task: a cycle per refused connection, holding its reader's
        # buffer until the collector's rare full pass (15 MB more for every twenty
        # connections that declared a too large frame).
        async with asyncio.timeout(self.config.handshake_timeout):
            hello = await frames.expect()
        if writer.is_closing():
            raise EOFError("closed to make room for a newer handshake")
        role = hello.get("role")
        if hello.get("type") != "hello" or hello.get("version") != protocol.PROTOCOL_MAX_VERSION:
            raise ProtocolViolation("expected a hello with a supported version first")
        if role == "peer":
            try:
                self._check_peer_certificate(hello, writer)
                node, welcome = self.peers.welcome(hello, nonce)
            except ProtocolViolation as exc:
                claimed = hello.get("node")
                self._bad_peer.note(
                    address=address,
                    node=claimed if isinstance(claimed, int) else "?",
                    error=one_line(exc),
                )
                _refuse(writer, exc)
                return None
            _nothing_before_welcome(frames)
            writer.write(protocol.encode_frame(welcome))
            return "peer", node
        if role != "client":
            raise ProtocolViolation("hello 'role' must be 'client' or 'peer'")
        _nothing_before_welcome(frames)
        try:
            crowded = self.slots.make_room(client_address(writer))
        except SlotsFull:
            self._busy.note(address=address, clients=len(self.slots))
            _refuse(
                writer,
                Busy(
                    f"node {self.config.node_id} serves as many clients as it can "
                    f"({self.client_limit}); try another node or again later"
                ),
            )
            return None
        if crowded is not None:
            # Full, and this address holds fewer than the one holding the most: that
            # one's oldest connection gives way (service/slots.py).
            self._gave_way.note(address=crowded.address, clients=len(self.slots))
            _refuse(
                crowded.writer,
                Busy(
                    f"node {self.config.node_id} serves as many clients as it can "
                    f"({self.client_limit}) and this address holds the most of them: "
                    "its oldest connection was closed to make room for another address"
                ),
            )
        writer.write(protocol.encode_frame(self._welcome()))
        return "client", 0

    def _check_peer_certificate(self, hello: protocol.Frame, writer: asyncio.StreamWriter) -> None:
        """Mutual TLS: on a TLS port a node's link needs its certificate (the operator,
        node 0, proves itself with the secret alone, as it does over plain TCP)."""
        claimed = hello.get("node")
        if self.tls is None or claimed == OPERATOR_ID:
            return
        peer = next((p for p in self.config.peers if p.node_id == claimed), None)
        if peer is None:
            return  # not a member: ``welcome`` refuses it
        problem = tls.peer_certificate_problem(writer, peer.host)
        if problem is not None:
            raise ProtocolViolation(f"node {claimed}: {problem}")

    def _make_room_for_a_handshake(self) -> None:
        if len(self.handshakes) < self.config.max_handshakes:
            return
        oldest, address = next(iter(self.handshakes.items()))
        del self.handshakes[oldest]
        self._crowded.note(address=address, handshakes=self.config.max_handshakes)
        _refuse(oldest, Busy("too many connections are in their handshake; try again"))

    async def _serve_peer(
        self, node: int, frames: FrameReader, writer: asyncio.StreamWriter
    ) -> None:
        if node != OPERATOR_ID:
            await self.peers.run_link(node, frames, writer)
            return
        try:
            async with asyncio.timeout(self.config.handshake_timeout):  # as in _handshake
                await self.peers.serve_operator(frames, writer)
        except (ProtocolViolation, EOFError, TimeoutError, ConnectionError, OSError) as exc:
            if isinstance(exc, ProtocolViolation):
                _refuse(writer, exc)
            await close_after_error(writer)

    def _welcome(self) -> protocol.Frame:
        return {
            "type": "welcome",
            "version": protocol.PROTOCOL_MAX_VERSION,
            "node": self.config.node_id,
            "role": self.replicator.role.value,
            "primary": self.replicator.primary_address(),
        }


class ClientSession:
    """One client connection after the handshake."""

    def __init__(self, server: Server, frames: FrameReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.replicator = server.replicator
        self.database = server.database
        self.frames = frames
        self.writer = writer
        # Replies go to the transport itself (StreamWriter.write only forwards there).
        self.transport = writer.transport
        self.tasks: set[asyncio.Task[None]] = set()
        self.listeners: list[Listener] = []
        # Requests read and not yet answered (a listen until its ``listening`` reply).
        self.unanswered = 0
        self.address = client_address(writer)
        # The key of its address's limits on password checks and registrations: an
        # IPv6 client counts as its /64, any of whose addresses it may use.
        self.limit_key = ratelimit.address_key(self.address)
        self.loop = asyncio.get_running_loop()
        self.last_frame = self.loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None
        # The connection's frames and write side, once ``run`` handed it off.
        self.feed: FrameFeed | None = None
        # The refusals it may still be answered without a hold.
        self._spare_refusals = Tokens(float(REFUSALS_AT_ONCE), 0.0)

    def close(self) -> None:
        self.writer.close()

    def unread(self) -> int:
        return self.transport.get_write_buffer_size()

    def abort(self, why: str) -> None:
        """Close at once, dropping what the client has not read: a close would keep it
        in memory until the client reads, which such a client never does."""
        self.server.drops += 1
        self.server.dropped.note(address=self.address, why=why)
        self.server.unread.forget(self)
        self.transport.abort()

    def forget(self, listener: Listener) -> None:
        """``listener`` gets no more pushes."""
        self.server.listeners.get(listener.user_id, set()).discard(listener)
        if listener in self.listeners:
            self.listeners.remove(listener)

    def send(self, frame: protocol.Frame) -> None:
        transport = self.transport
        if transport.is_closing():
            return
        if transport.get_write_buffer_size() > MAX_UNREAD:
            # The client does not read its replies: drop it rather than buffer forever.
            self.abort(f"its client has not read {MAX_UNREAD} bytes of replies")
            return
        transport.write(protocol.encode_frame(frame))
        unread = self.server.unread
        size = transport.get_write_buffer_size()
        if size > HEAVY or self in unread.sizes:
            unread.wrote(self, size)

    async def run(self) -> None:
        self._idle_timer = self.loop.call_later(
            self.server.config.idle_client_timeout, self._check_idle
        )
        try:
            # Frames are dispatched as they arrive, those already received before any
            # request is served (see the module docstring: the in-flight limit).
            self.feed = self.frames.hand_off(self.writer, self._on_frame, self.server.turns)
            violation = await self.feed.violation()
            if violation is not None:
                self.send(protocol.error(None, violation.to_wire()))
        finally:
            self._idle_timer.cancel()
            self.server.unread.forget(self)
            for listener in list(self.listeners):
                self.forget(listener)
            for task in list(self.tasks):
                task.cancel()
            self.writer.close()

    def _on_frame(self, frame: protocol.Frame) -> None:
        self.last_frame = self.loop.time()
        self._dispatch(frame)

    def _check_idle(self) -> None:
        """Close the connection once idle: no frame for ``idle_client_timeout``.

        A client with a live listen stream may stay silent for as long as it likes;
        once its streams have ended (a session that ended, say), the idle timeout
        counts from its last frame again. One timer per connection, moved on only
        when it fires: a frame costs no timer of its own."""
        idle = self.server.config.idle_client_timeout
        left = self.last_frame + idle - self.loop.time()
        if left <= 0 and not self.listeners:
            self.close()
            return
        self._idle_timer = self.loop.call_later(left if left > 0 else idle, self._check_idle)

    def _dispatch(self, frame: protocol.Frame) -> None:
        # Not a request, or no id to answer it under: a protocol violation that ends
        # the connection (raised to ``run``).
        request_id = protocol.request_id_of(frame)
        try:
            _, op, args, token = protocol.parse_request(frame)
        except ProtocolViolation as exc:
            self.send(protocol.error(request_id, exc.to_wire()))
            return
        limit = protocol.MAX_IN_FLIGHT
        if self.unanswered >= limit:
            refusal = InvalidInput(
                f"more than {limit} requests unanswered on one connection; "
                "wait for answers before sending more"
            )
            self.send(protocol.error(request_id, refusal.to_wire()))
            return
        self.unanswered += 1
        if op in DIRECT_WRITES:
            self._write(request_id, op, args, token)
            return
        task = self.loop.create_task(self._serve(request_id, op, args, token))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _write(self, request_id: str, op: str, args: dict[str, Any], token: str | None) -> None:
        """A write that needs nothing but the writer: queued at once, answered from
        its acknowledgement (``WritePath``'s callback), with no task of its own."""

        def done(outcome: dict[str, Any] | ChatError) -> None:
            self.unanswered -= 1
            if isinstance(outcome, ChatError):
                self.send(protocol.error(request_id, outcome.to_wire()))
                self._hold_if_busy(outcome)
            else:
                self.send(protocol.reply(request_id, _client_result(outcome)))

        token_hash = chat.hash_token(token) if token is not None else None
        try:
            self.replicator.enqueue(op, args, token_hash, request_id, done)
        except ChatError as exc:
            done(exc)

    def _hold_if_busy(self, error: ChatError) -> None:
        """Read nothing more from this client for the time it was told to wait, once
        it was refused more often than a client that waits would be."""
        if not isinstance(error, Busy) or error.retry_after <= 0 or self.feed is None:
            return
        now = self.loop.time()
        if self._spare_refusals.take(now, REFUSALS_PER_SECOND, REFUSALS_AT_ONCE):
            return
        self.feed.hold(min(error.retry_after, BUSY_HOLD_CAP))

    async def _serve(
        self, request_id: str, op: str, args: dict[str, Any], token: str | None
    ) -> None:
        unanswered = True

        def answer(frame: protocol.Frame) -> None:
            """The one reply or error to this request (a listen's stream comes after)."""
            nonlocal unanswered
            if unanswered:
                unanswered = False
                self.unanswered -= 1
            self.send(frame)

        # The reign the request began in: a refusal is told only from the same (below).
        reign = self.replicator.reign()
        try:
            _check_fields(op, args)
            if op == "listen":
                await self._listen(request_id, args, token, answer)
                return
            result = await self._execute(op, args, token, request_id)
            answer(protocol.reply(request_id, result))
        except StorageCorrupt as exc:
            # A query found a damaged page: contain it (the node exits and, at its next
            # start, moves the database aside and takes a snapshot).
            answer(protocol.error(request_id, Internal("internal error").to_wire()))
            self.replicator.damaged(str(exc))
        except ChatError as exc:
            if unanswered and isinstance(exc, Refused) and not isinstance(exc, InvalidInput):
                # (A listen's error after ``listening`` ends its stream: the end of a
                # session once acknowledged, or the cap on streams, nothing unacked.)
                exc = await self._once_acknowledged(exc, reign)
            answer(protocol.error(request_id, exc.to_wire()))
            self._hold_if_busy(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("request failed op=%s", op)
            answer(protocol.error(request_id, Internal(f"internal error: {exc}").to_wire()))
        finally:
            if unanswered:  # cancelled: the connection is closing
                self.unanswered -= 1

    async def _once_acknowledged(self, refusal: Refused, reign: int) -> ChatError:
        """A refusal that tells what the primary's data showed (no such user, a
        session ended, a name taken) is an answer like a read's: it goes out only
        once every write it may have seen is acknowledged (R7). Scenario: a logout
        committed on the primary, not yet on its backups; a ``whoami`` with that
        token finds no session. Told at once, it would say ``auth_failed`` of a
        session that a failover then brings back, the logout lost with its primary.
        The committed position now is past anything the request saw, if this node
        has been primary throughout (``reign``: a login waits for its password's
        hash, and a node may step down, rewind what was not acknowledged and lead
        again meanwhile). If it has not, or the wait fails (this node stepped
        down), a retriable error goes out instead, and the next try is answered
        from what survived.

        ``invalid`` is not held: it judges the request, not the data, and is the
        answer a backup gives to bad input too."""
        if self.replicator.reign() != reign:
            if self.replicator.role is Role.PRIMARY:  # and leads again: ask it again
                return Unavailable("this node led anew while it served the request; retry")
            return NotPrimary("this node stepped down while it served the request", primary=None)
        try:
            await self.replicator.wait_acked(self.database.position().seq)
        except StorageCorrupt as exc:
            self.replicator.damaged(str(exc))
            return Internal("internal error")
        except ChatError as exc:
            return exc
        return refusal

    async def _execute(
        self, op: str, args: dict[str, Any], token: str | None, request_id: str
    ) -> dict[str, Any]:
        token_hash = chat.hash_token(token) if token is not None else None
        replicator = self.replicator
        if op == "status":
            return {"node": replicator.status()}
        if op == "register":
            return await self._register(args, request_id)
        if op == "login":
            return await self._login(args, request_id)
        if op == "read":
            # A query on the primary, released once acknowledged (R7); the inbox
            # messages it shows become read through a small write of their ids.
            now = time.time()
            # A window of the account's messages per read turn (chat.ReadScan): a
            # filter that matches few of millions must not hold the loop meanwhile.
            scan = chat.ReadScan(token_hash, now, args)
            await self._scan(scan.step, token_hash)
            shown, to_mark = scan.result()
            if to_mark:
                # A primary whose disk refuses writes still serves reads; what they
                # show stays unread until it can write again.
                with contextlib.suppress(StorageFault):
                    await replicator.submit(
                        "mark_read",
                        {"ids": to_mark},
                        token_hash,
                        request_id,
                        # The read's own: a reused id is told apart by what was read.
                        chat.request_fingerprint("read", args),
                        # Not counted against the account's write rate: what a read
                        # marks is what came in unread, bounded by the senders' rates.
                        rated=False,
                    )
            else:
                await self._keep_alive(token_hash, now)
            return shown
        now = time.time()
        if op == "whoami":
            whoami = chat.WhoamiScan(token_hash, now)
            await self._scan(whoami.step, token_hash)
            result = whoami.result()
        elif op == "search":
            # A chunk of names per read turn (chat.SearchScan): a pattern that matches
            # few names looks at all of them, and must not hold the loop meanwhile.
            search = chat.SearchScan(token_hash, now, args.get("pattern"), args.get("limit"))
            await self._scan(search.step, token_hash)
            result = search.result()
        else:
            raise InvalidInput(f"unknown operation {op!r}")
        await self._keep_alive(token_hash, now)
        return dict(result)

    async def _register(self, args: dict[str, Any], request_id: str) -> dict[str, Any]:
        """Checked in the order of their cost: the arguments, the address's rate of
        registrations, then the hash (see service/ratelimit.py)."""
        server = self.server
        self.replicator.require_primary()
        name = chat.validate_username(args.get("username"))
        password = chat.validate_password(args.get("password"))
        key = self.limit_key
        # A retry of a registration that was made (its reply lost) makes no account:
        # it takes no token, or a client would be told busy about its own account.
        counted = not chat.registered_by(self.database.reader, request_id, name)
        if counted:
            wait = server.registrations.take(key)
            if wait > 0:
                raise server.registering_too_fast(key, wait)
        params = server.scrypt
        try:
            password_hash = await server.hashing.run(
                key,
                lambda: chat.hash_password(password, params),
                server.limiter.suspect(key),
            )
        except Busy:
            if counted:  # nothing was done: the pool refused it
                server.registrations.give_back(key)
            raise
        return await self.replicator.submit(
            "register", {"username": name, "password_hash": password_hash}, None, request_id
        )

    async def _login(self, args: dict[str, Any], request_id: str) -> dict[str, Any]:
        """Check the password (bounded: see service/ratelimit.py), then open a session.

        The checks that cost nothing come first: the argument sizes, then the
        backoff windows of the account and of the client's address."""
        replicator, server, config = self.replicator, self.server, self.server.config
        replicator.require_primary()
        user, secret = args.get("username"), args.get("password")
        if not isinstance(user, str) or not isinstance(secret, str):
            raise InvalidInput("login needs a username and a password")
        if not 1 <= len(user) <= chat.MAX_USERNAME:
            # No account has such a name; and it would be a key of the limiter.
            raise chat_auth_failed()
        chat.validate_password(secret)
        account = user.lower()
        server.limiter.check(account, self.limit_key, time.monotonic())
        auth = chat.user_auth(self.database.reader, user)
        params = server.scrypt
        check = await server.hashing.run(
            self.limit_key,
            lambda: chat.check_login(secret, auth, params),
            server.limiter.suspect(self.limit_key),
        )
        if not check.ok:
            server.limiter.failed(account, self.limit_key, time.monotonic())
            raise chat_auth_failed()
        server.limiter.succeeded(account)
        new_token, new_hash = chat.new_token()
        write: dict[str, Any] = {
            "username": user,
            "token_hash": new_hash,
            "session_lifetime": config.session_lifetime,
            "session_idle": config.session_idle,
            "session_cap": config.sessions_per_user,
        }
        if check.new_hash is not None:
            write["password_hash"] = check.new_hash
        # Counted before the write, which changes no message: once the session is
        # made, nothing may fail the login (a busy read line, say) and leave it behind.
        assert auth is not None, "a login whose password checked has an account"
        counter = chat.UnreadCount(auth[0])
        await self._scan(counter.step, None, account=auth[0])
        result = await replicator.submit("login", write, None, request_id)
        return {**result, "unread": counter.count, "token": new_token}

    async def _scan(
        self, step: Callable[[Db], bool], token_hash: str | None, account: Hashable = None
    ) -> None:
        """Run a scan (``service/windows.py``) a step per read turn until ``step`` says
        it is done; then wait, once, until nothing any step saw is unacknowledged (R7).
        A wait per step made a scan of a large inbox wait for a batch's acks hundreds
        of times while others wrote, longer than a client's attempt. ``account``: the
        read line to wait in, when not the session's."""
        replicator = self.replicator
        reign: int | None = None
        seen = 0
        while True:
            done, seq = await replicator.read_seen(step, token_hash, account)
            # The reign the step ran in: nothing awaits between its query and here.
            reign = replicator.reign() if reign is None else reign
            if replicator.reign() != reign:
                # Primary again between two steps, having stepped down: what the
                # earlier steps saw may have been rewound, and its seqs used again.
                raise NotPrimary("this node stepped down during the read", primary=None)
            seen = max(seen, seq)
            if done:
                break
        await replicator.wait_acked(seen)

    async def _keep_alive(self, token_hash: str | None, now: float) -> None:
        """After a read that used a session: move its idle clock on when due.

        Writes do that themselves; a user who only reads (``whoami``, ``search``,
        ``listen``) would otherwise see the session end while in use. Due at most
        once per ``idle_timeout / chat.IDLE_REFRESH_FRACTION``, so this costs one
        small replicated write per session and that much time, not one per read."""
        due = chat.session_refresh_due(self.database.reader, token_hash, now)
        if due:
            # Not counted against the write rate: due once per session and interval.
            await self.replicator.submit(
                "touch", {}, token_hash, f"touch-{secrets.token_hex(16)}", rated=False
            )

    async def _listen(
        self,
        request_id: str,
        args: dict[str, Any],
        token: str | None,
        answer: Callable[[protocol.Frame], None],
    ) -> None:
        replicator = self.replicator
        token_hash = chat.hash_token(token) if token is not None else None
        after = _listen_after(args)
        if self.listeners:
            # Checked before the first await: of two listens pipelined, the first has
            # registered before the second runs.
            raise InvalidInput(
                "this connection already carries a listen stream; "
                "listen on another connection, or close this one first"
            )
        replicator.require_primary()

        now = time.time()

        def start(db: Db) -> tuple[tuple[int, str], list[dict[str, Any]], int | None, int]:
            user = chat.session_user(db, token_hash, now)
            upto = chat.newest_message_id(db)
            backlog, following = chat.backlog(db, user[0], after, upto=upto)
            return user, backlog, following, upto

        # Read the backlog's first page and register in one synchronous step: a
        # message committed after the read is acknowledged (and pushed) only after we
        # listen, so it is either in the backlog or pushed, never lost (duplicates are
        # dropped by id). Pushes wait in the listener's queue until the backlog is out.
        (user, backlog, following, upto), seen = self.database.read(start)
        listener = Listener(self, request_id, user, token_hash)
        group = self.server.listeners.setdefault(listener.user_id, set())
        cap = self.server.config.listens_per_user
        while len(group) >= cap:
            # Every message to a user is pushed to each of its streams: one account's
            # thousand streams made each send to it a thousand pushes, and a burst of
            # sends silenced the primary past suspect_timeout. The oldest goes, as
            # with sessions: a stream whose client vanished must not lock out a new one.
            oldest = min(group, key=lambda other: other.number)
            oldest.end(
                Refused(
                    f"{user[1]} has {cap} listen streams on this node, the most it serves "
                    "(listens_per_user): this one, the oldest, ended"
                )
            )
        group.add(listener)
        self.listeners.append(listener)
        try:
            # Inside: a refused refresh (a full disk, a full queue) must not leave the
            # stream registered, pushed to and counted, with its request answered.
            await self._keep_alive(token_hash, now)
            await replicator.wait_acked(seen)
            answer(protocol.reply(request_id, {"listening": True}))
            if after is not None:
                listener.last_id = after
            while True:
                for message in backlog:
                    self._push(listener, message)
                if following is None:
                    break
                # The next page once the client has taken this one (a backlog of any
                # size never sits in memory, nor in the socket's buffer, at once).
                if self.feed is not None:
                    await self.feed.drain()
                await self._require_session(listener)  # a logout meanwhile ends it
                (backlog, following), seen = await replicator.read_seen(
                    functools.partial(
                        chat.backlog,
                        user_id=listener.user_id,
                        after=after,
                        past=following,
                        upto=upto,
                    ),
                    listener.token_hash,
                )
                if backlog:
                    # Shown once nothing it saw is unacked (R7); the window of a mostly
                    # read inbox often holds nothing to show, and waits for nothing.
                    await replicator.wait_acked(seen)
            while True:
                await self._push_queued(listener)
        finally:
            self.forget(listener)

    async def _push_queued(self, listener: Listener) -> None:
        """Wait for pushes, then send every queued one, if the session still lives."""
        items = [await listener.queue.get()]
        while not listener.queue.empty():
            items.append(listener.queue.get_nowait())
        messages = [item for item in items if not isinstance(item, ChatError)]
        if messages:
            await self._require_session(listener)
            for message in messages:
                self._push(listener, message)
        for item in items:
            if isinstance(item, ChatError):
                raise item

    async def _require_session(self, listener: Listener) -> None:
        """Raise ``auth_failed`` if the listener's session has ended (once that end is
        acknowledged: a logout lost in a failover did not end anything)."""
        ended, seen = self.database.read(
            lambda db: ended_sessions(db, [listener.token_hash], time.time())
        )
        if ended:
            await self.replicator.wait_acked(seen)
            raise session_ended()

    def _push(self, listener: Listener, message: dict[str, Any]) -> None:
        if int(message["id"]) <= listener.last_id:
            return
        listener.last_id = int(message["id"])
        self.send(protocol.event(listener.request_id, message))


def _listen_after(args: dict[str, Any]) -> int | None:
    """``listen``'s arguments: ``after``, null or a message id (SQLite's integers are
    signed 64-bit: a larger one must be refused here, not overflow in a query)."""
    after = args.get("after")
    if after is None:
        return None
    if not isinstance(after, int) or isinstance(after, bool) or not 0 <= after <= MAX_ID:
        raise InvalidInput(f"the field 'after' must be null or a whole number from 0 to {MAX_ID}")
    return after


def _client_result(result: dict[str, Any]) -> dict[str, Any]:
    """A write's result as its client sees it: ``recipient_id`` is for the listen
    pushes only; clients see names."""
    if "recipient_id" not in result:
        return result
    return {k: v for k, v in result.items() if k != "recipient_id"}


def _check_fields(op: str, args: dict[str, Any]) -> None:
    """Refuse an argument ``op`` does not know (writes: chat.apply_write checks)."""
    fields = CLIENT_FIELDS.get(op)
    if fields is None:
        return
    unknown = sorted(set(args) - fields)
    if unknown:
        raise InvalidInput(f"unknown field '{unknown[0]}' for {op}")


def _nothing_before_welcome(frames: FrameReader) -> None:
    """Until the handshake ends each side sends one frame and waits for the answer:
    bytes behind the hello, already here before our welcome, break that."""
    if frames.decoder.pending:
        raise ProtocolViolation("a frame came before the welcome; wait for it first")


def _refuse(writer: asyncio.StreamWriter, exc: ChatError) -> None:
    """Send the error frame about a whole connection and close it."""
    with contextlib.suppress(Exception):
        writer.write(protocol.encode_frame(protocol.error(None, exc.to_wire())))
    writer.close()


def _dialer_address(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return "?"


def client_address(writer: asyncio.StreamWriter) -> str:
    """The peer's IP address (``ratelimit.address_key`` makes the key of the
    per-address limits from it; ``slots.py`` counts connections by it)."""
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and peer and isinstance(peer[0], str):
        return peer[0]
    return "unknown"


def chat_auth_failed() -> ChatError:
    return AuthFailed(chat.GENERIC_LOGIN_FAILURE)
