"""The server: one TCP port per node for clients and peers alike.

Every connection starts with the handshake of ``protocol``: our ``hello``,
their ``hello`` naming a role. Peers (and the operator tool) are handed to
``peer.PeerLinks``; clients get a ``ClientSession``.

A client session reads request frames and runs each as its own task, so a
slow write never blocks a read on the same connection; replies carry the
request id and may come back in any order. Bad input is answered with one
error frame and changes nothing: an unknown op, wrong types, a bad token. A
frame that breaks the protocol itself (garbage, an oversized length, a frame
cut short) gets an error frame and the connection is closed; nothing else on
the node notices. A connection that does not finish its hello within the
handshake timeout, or stays idle past the idle timeout, is closed.

``register`` and ``login`` hash passwords in the bounded pool of
``ratelimit.HashPool``, never on the event loop; a login is first checked
against the backoff windows of ``ratelimit.LoginLimiter`` (keyed by the user
name and the client's IP address). Either may answer ``busy`` at once instead.

``listen`` registers the session for pushes: after the backlog (read on the
primary and released once acknowledged), every message sent to the user is
pushed when its write is acknowledged, never before (R7). When the node stops
being primary, listening connections are closed so clients resume elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import Any

from . import chat, protocol, ratelimit
from .config import NodeConfig
from .errors import AuthFailed, ChatError, Internal, InvalidInput, ProtocolViolation
from .peer import OPERATOR_ID, FrameReader
from .replication.runtime import Replicator
from .replication.state import Role
from .storage import Db

log = logging.getLogger("service.server")

MAX_IN_FLIGHT = 256
MAX_UNREAD = 16 * 1024 * 1024
LISTEN_QUEUE = 10_000


class Listener:
    """One ``listen`` stream: messages for ``user_id`` after ``last_id``."""

    def __init__(self, session: ClientSession, request_id: str, user_id: int) -> None:
        self.session = session
        self.request_id = request_id
        self.user_id = user_id
        self.last_id = 0
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(LISTEN_QUEUE)

    def push(self, message: dict[str, Any]) -> None:
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            # A listener that does not read its stream is dropped; it resumes after
            # the last message it saw when it reconnects.
            self.session.close()


class Server:
    def __init__(self, config: NodeConfig, replicator: Replicator) -> None:
        self.config = config
        self.replicator = replicator
        self.listeners: dict[int, set[Listener]] = {}
        self.sessions: set[ClientSession] = set()
        self._server: asyncio.Server | None = None
        self.scrypt = chat.ScryptParams(n=config.scrypt_n)
        self.limiter = ratelimit.LoginLimiter.from_config(config)
        self.hashing = ratelimit.HashPool(config.hash_workers, config.hash_queue)
        replicator.message_hooks.append(self._on_message)
        replicator.role_hooks.append(self._on_role)

    async def start(self) -> None:
        me = self.config.me
        self._server = await asyncio.start_server(
            self._handle, me.host, me.port, reuse_address=True, limit=2**20
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for session in list(self.sessions):
            session.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        self.hashing.close()

    def _on_message(self, recipient_id: int, message: dict[str, Any]) -> None:
        for listener in list(self.listeners.get(recipient_id, ())):
            listener.push(message)

    def _on_role(self, role: Role) -> None:
        if role is not Role.PRIMARY:
            for listeners in list(self.listeners.values()):
                for listener in list(listeners):
                    listener.session.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frames = FrameReader(reader, self.config.max_frame)
        nonce = protocol.new_nonce()
        try:
            writer.write(protocol.encode_frame(protocol.server_hello(self.config.node_id, nonce)))
            hello = await asyncio.wait_for(frames.expect(), self.config.handshake_timeout)
            role = hello.get("role")
            if (
                hello.get("type") != "hello"
                or hello.get("version") != protocol.PROTOCOL_MAX_VERSION
            ):
                raise ProtocolViolation("expected a hello with a supported version first")
            if role == "peer":
                node, welcome = self.replicator.links.welcome(hello, nonce)
                writer.write(protocol.encode_frame(welcome))
                if node == OPERATOR_ID:
                    await asyncio.wait_for(
                        self.replicator.links.serve_operator(frames, writer),
                        self.config.handshake_timeout,
                    )
                    return
                await self.replicator.links.run_link(node, frames, writer)
                return
            if role != "client":
                raise ProtocolViolation("hello 'role' must be 'client' or 'peer'")
            writer.write(protocol.encode_frame(self._welcome()))
        except (ProtocolViolation, EOFError, TimeoutError, ConnectionError, OSError) as exc:
            if isinstance(exc, ProtocolViolation):
                log.info("connection refused at handshake error=%s", _one_line(exc))
                with contextlib.suppress(Exception):
                    writer.write(protocol.encode_frame(protocol.error(None, exc.to_wire())))
            writer.close()
            return
        session = ClientSession(self, frames, writer)
        self.sessions.add(session)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)

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
        self.frames = frames
        self.writer = writer
        self.tasks: set[asyncio.Task[None]] = set()
        self.listeners: list[Listener] = []
        self.address = client_address(writer)

    def close(self) -> None:
        self.writer.close()

    def send(self, frame: protocol.Frame) -> None:
        if self.writer.is_closing():
            return
        if self.writer.transport.get_write_buffer_size() > MAX_UNREAD:
            # The client does not read its replies: drop it rather than buffer forever.
            log.info("closing a client that does not read its replies")
            self.close()
            return
        self.writer.write(protocol.encode_frame(frame))

    async def run(self) -> None:
        try:
            while True:
                # A listening client may stay silent for as long as it likes.
                idle = None if self.listeners else self.server.config.idle_client_timeout
                frame = await asyncio.wait_for(self.frames.next(), idle)
                if frame is None:
                    break
                self._dispatch(frame)
        except ProtocolViolation as exc:
            self.send(protocol.error(None, exc.to_wire()))
        except (TimeoutError, ConnectionError, OSError):
            pass
        finally:
            for listener in self.listeners:
                self.server.listeners.get(listener.user_id, set()).discard(listener)
            for task in list(self.tasks):
                task.cancel()
            self.writer.close()

    def _dispatch(self, frame: protocol.Frame) -> None:
        try:
            request_id, op, args, token = protocol.parse_request(frame)
        except ProtocolViolation as exc:
            rid = frame.get("request_id")
            self.send(protocol.error(rid if isinstance(rid, str) else None, exc.to_wire()))
            return
        if len(self.tasks) >= MAX_IN_FLIGHT:
            self.send(
                protocol.error(
                    request_id,
                    InvalidInput(
                        f"too many requests in flight on one connection (max {MAX_IN_FLIGHT})"
                    ).to_wire(),
                )
            )
            return
        task = asyncio.get_running_loop().create_task(self._serve(request_id, op, args, token))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(
        self, request_id: str, op: str, args: dict[str, Any], token: str | None
    ) -> None:
        try:
            if op == "listen":
                await self._listen(request_id, args, token)
                return
            result = await self._execute(op, args, token, request_id)
            self.send(protocol.reply(request_id, result))
        except ChatError as exc:
            self.send(protocol.error(request_id, exc.to_wire()))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("request failed op=%s", op)
            self.send(protocol.error(request_id, Internal(f"internal error: {exc}").to_wire()))

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
        if op in chat.WRITE_OPS:
            result = await replicator.submit(op, args, token_hash, request_id)
            # recipient_id is for the listen pushes only; clients see names.
            return {k: v for k, v in result.items() if k != "recipient_id"}
        now = time.time()
        if op == "whoami":
            result = await replicator.read(lambda db: chat.whoami(db, token_hash, now))
        elif op == "search":
            pattern, limit = args.get("pattern"), args.get("limit")
            result = await replicator.read(
                lambda db: chat.search(db, token_hash, now, pattern, limit)
            )
        else:
            raise InvalidInput(f"unknown operation {op!r}")
        await self._keep_alive(token_hash, now)
        return dict(result)

    async def _register(self, args: dict[str, Any], request_id: str) -> dict[str, Any]:
        self.replicator.require_primary()
        name = chat.validate_username(args.get("username"))
        password = chat.validate_password(args.get("password"))
        params = self.server.scrypt
        password_hash = await self.server.hashing.run(
            self.address,
            lambda: chat.hash_password(password, params),
            self.server.limiter.suspect(self.address),
        )
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
        server.limiter.check(account, self.address, time.monotonic())
        auth = chat.user_auth(replicator.storage.reader, user)
        params = server.scrypt
        check = await server.hashing.run(
            self.address,
            lambda: chat.check_login(secret, auth, params),
            server.limiter.suspect(self.address),
        )
        if not check.ok:
            server.limiter.failed(account, self.address, time.monotonic())
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
        result = await replicator.submit("login", write, None, request_id)
        return {**result, "token": new_token}

    async def _keep_alive(self, token_hash: str | None, now: float) -> None:
        """After a read that used a session: move its idle clock on when due.

        Writes do that themselves; a user who only reads (``whoami``, ``search``,
        ``listen``) would otherwise see the session end while in use. Due at most
        once per ``idle_timeout / chat.IDLE_REFRESH_FRACTION``, so this costs one
        small replicated write per session and that much time, not one per read."""
        due = chat.session_refresh_due(self.replicator.storage.reader, token_hash, now)
        if due:
            await self.replicator.submit("touch", {}, token_hash, f"touch-{secrets.token_hex(16)}")

    async def _listen(self, request_id: str, args: dict[str, Any], token: str | None) -> None:
        replicator = self.replicator
        token_hash = chat.hash_token(token) if token is not None else None
        after = args.get("after")
        if after is not None and (not isinstance(after, int) or isinstance(after, bool)):
            raise InvalidInput("'after' must be a message id")
        replicator.require_primary()

        now = time.time()

        def start(db: Db) -> tuple[int, list[dict[str, Any]]]:
            user_id, _name = chat.session_user(db, token_hash, now)
            return user_id, chat.backlog(db, user_id, after)

        # Read the backlog and register in one synchronous step: a message committed
        # after the read is acknowledged (and pushed) only after we listen, so it is
        # either in the backlog or pushed, never lost (duplicates are dropped by id).
        (user_id, backlog), seen = replicator.storage.read(start)
        listener = Listener(self, request_id, user_id)
        self.server.listeners.setdefault(user_id, set()).add(listener)
        self.listeners.append(listener)
        await self._keep_alive(token_hash, now)
        await replicator.wait_acked(seen)
        self.send(protocol.reply(request_id, {"listening": True}))
        if after is not None:
            listener.last_id = after
        for message in backlog:
            self._push(listener, message)
        while True:
            message = await listener.queue.get()
            self._push(listener, message)

    def _push(self, listener: Listener, message: dict[str, Any]) -> None:
        if int(message["id"]) <= listener.last_id:
            return
        listener.last_id = int(message["id"])
        self.send(protocol.event(listener.request_id, message))


def client_address(writer: asyncio.StreamWriter) -> str:
    """The peer's IP address, the key of the per-address login limits."""
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and peer and isinstance(peer[0], str):
        return peer[0]
    return "unknown"


def chat_auth_failed() -> ChatError:
    return AuthFailed(chat.GENERIC_LOGIN_FAILURE)


def _one_line(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__).replace("\n", " ")
