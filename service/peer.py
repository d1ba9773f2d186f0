"""Node-to-node links: one authenticated TCP connection per pair of nodes.

The node with the lower id dials, the other accepts (through the same port as
clients: the hello frame says ``peer``). Both directions of the replication
protocol share the one connection, so frames between two nodes arrive in the
order they were sent, which the catch-up and snapshot streams rely on.

Authentication: the dialer proves it holds the cluster secret with an HMAC
over the acceptor's nonce, the acceptor answers with an HMAC over the dialer's
nonce (see ``protocol``). A connection that fails either check is closed and
logged (rate-limited: a peer with another secret redials forever); it never
reaches the replication core. Until then a connection is a stranger's and
carries frames of at most ``protocol.MAX_HELLO_FRAME`` bytes; only an
authenticated link carries frames up to ``max_frame``.

Addresses: each node listens on its own entry of ``nodes`` and dials its
peers *from* that entry's host (``source_address``), so a connection's
source address says which node opened it. Nodes on one machine with one
loopback address each (127.0.0.11, .12, .13) then exchange traffic that a
packet filter can cut per pair, as a network partition would. The link-up
log line names both ends.

With TLS configured (``service/tls.py``) every link is mutual TLS: the dialer
verifies the acceptor's certificate against the cluster CA and the peer's
configured host, and presents its own, which the acceptor checks at the hello.
The HMAC handshake runs inside it unchanged. A peer whose certificate does not
verify is logged like one with another secret.

Across hosts (``arbiter = etcd``) a partition closes nothing: a link just goes
silent, and when the partition heals TCP resumes it only at its next, backed-off
retransmission (up to two minutes later), all that time without the peer in the
sync set. So there every link is given up once the peer has not acknowledged
our data, or answered keepalive probes, for ``lease_ttl`` (``give_up_when_silent``),
and redialled: the first connection after the heal goes through at once. On one
host a closed connection proves a death, so there links are left to the kernel.

Peer versions: the dialer's hello offers the highest peer version it speaks
(``protocol.PEER_VERSION``), the welcome names the lower of both, and the link
speaks that one in both directions; a node from before peer versions names
none and is spoken to in version 1 (JSON only), so nodes can be upgraded one at
a time. From version 2 the bulk of replication travels in binary frames
(``protocol``); a link of version 1 refuses them as a protocol violation.

The dialer reconnects with jittered exponential backoff (50 to 250 ms) for as long as
the node runs: a node never exits because a peer is unreachable. Link changes
are reported to the owner as ``on_link(peer, up, closed_by_us)``: a peer's
connection closing is an immediate failure signal, unless we closed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import random
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

from . import protocol, tls
from .config import NodeConfig
from .errors import ProtocolViolation
from .throttle import ThrottledLog
from .turns import TurnBudget

log = logging.getLogger("service.peer")

OPERATOR_ID = 0
# A restarted peer must be linked again quickly: until it is linked to every other
# member, the primary does not confirm it (R5), so redial often.
MAX_REDIAL = 0.25
READ_CHUNK = 256 * 1024
# A peer that stops reading (frozen) must not make us buffer without bound.
MAX_BUFFERED = 64 * 1024 * 1024
# The least a hold that fired early waits again (uvloop's timers count milliseconds).
HOLD_TICK = 0.001
# A connection that failed in its handshake gets this long to close cleanly (to
# flush the error it was told) before it is cut.
CLOSE_WAIT = 1.0

FrameHandler = Callable[[int, protocol.Frame], None]
LinkHandler = Callable[[int, bool, bool], None]
# An operator command's answer: one frame, or a stream of them (a backup's chunks).
OperatorAnswer = protocol.Frame | AsyncIterator[protocol.Frame]


class Link:
    """One live, authenticated connection to a peer, of peer ``version``."""

    def __init__(self, peer: int, writer: asyncio.StreamWriter, version: int = 1) -> None:
        self.peer = peer
        self.writer = writer
        # Its frames, once the link runs: also what tells when its writes may go on.
        self.feed: FrameFeed | None = None
        # Records and snapshot chunks may travel in binary frames (peer version 2).
        self.binary = version >= 2
        self.closed_by_us = False

    def send(self, frame: protocol.Frame) -> bool:
        if self.writer.is_closing():
            return False
        transport = self.writer.transport
        if transport.get_write_buffer_size() > MAX_BUFFERED:
            log.warning("peer not reading, closing link node=%s", self.peer)
            self.close()
            return False
        self.writer.write(protocol.encode_frame(frame))
        return True

    def close(self) -> None:
        self.closed_by_us = True
        self.writer.close()

    def buffered(self) -> int:
        return self.writer.transport.get_write_buffer_size()


class PeerLinks:
    """All links of this node, keyed by peer id."""

    def __init__(
        self,
        config: NodeConfig,
        secret: bytes,
        on_frame: FrameHandler,
        on_link: LinkHandler,
        on_operator: Callable[[protocol.Frame], OperatorAnswer],
    ) -> None:
        self.config = config
        self.secret = secret
        self.on_frame = on_frame
        self.on_link = on_link
        self.on_operator = on_operator
        self.links: dict[int, Link] = {}
        # The peer version each welcome we sent settled on, until its link runs.
        self._welcomed: dict[int, int] = {}
        # Loaded and checked at start-up (``python -m service``); None: plain TCP.
        self.tls = tls.node_tls(config)
        self._tasks: set[asyncio.Task[None]] = set()
        self._running = False

    def start(self) -> None:
        self._running = True
        for peer in self.config.peers:
            if peer.node_id > self.config.node_id:
                self._spawn(self._dial_forever(peer.node_id, peer.host, peer.port))

    async def close(self) -> None:
        self._running = False
        for link in list(self.links.values()):
            link.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def buffered(self, peer: int) -> int:
        link = self.links.get(peer)
        return link.buffered() if link is not None else 0

    def set_reading(self, peer: int, reading: bool) -> None:
        """Read the link to ``peer``, or leave what it sends in the socket (TCP then
        pushes back on it): a backup with more records waiting than it applies."""
        link = self.links.get(peer)
        if link is None or link.writer.is_closing():
            return
        transport = cast(asyncio.Transport, link.writer.transport)  # uvloop's: not a subclass
        if reading:
            transport.resume_reading()
        else:
            transport.pause_reading()

    async def drain(self, peer: int) -> None:
        link = self.links.get(peer)
        if link is not None and link.feed is not None and not link.writer.is_closing():
            await link.feed.drain()

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- dialing ---------------------------------------------------------------------

    async def _dial_forever(self, peer: int, host: str, port: int) -> None:
        delay = 0.05
        # A peer with another secret fails every redial (4 a second): log it sparingly.
        failures = ThrottledLog(
            log, logging.WARNING, "peer handshake failed", self.config.log_interval
        )
        broken = ThrottledLog(log, logging.ERROR, "peer link failed", self.config.log_interval)
        while self._running:
            try:
                # asyncio.timeout, not wait_for: see server.Server._handshake.
                async with asyncio.timeout(self.config.handshake_timeout):
                    reader, writer = await self._open(host, port)
            except ssl.SSLError as exc:
                # A peer we cannot verify: not ours, or a misconfigured one.
                failures.note(node=peer, error=tls.describe_failure(exc))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, MAX_REDIAL)
                continue
            except (OSError, TimeoutError):
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, MAX_REDIAL)
                continue
            try:
                # The other end is a stranger until its welcome proves it holds the secret.
                frames = FrameReader(reader, protocol.MAX_HELLO_FRAME)
                async with asyncio.timeout(self.config.handshake_timeout):
                    version = await self._dial_handshake(peer, frames, writer)
            except (OSError, TimeoutError, ProtocolViolation, EOFError) as exc:
                failures.note(node=peer, error=one_line(exc))
                await close_after_error(writer)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, MAX_REDIAL)
                continue
            except asyncio.CancelledError:
                writer.close()  # the node stops in the middle of the handshake
                raise
            delay = 0.05
            try:
                await self.run_link(peer, frames, writer, version)
            except Exception as exc:
                # A bug handling the link (the runtime's own handler takes every
                # frame's error itself): said, and the peer dialed again, never left
                # unlinked for good with the task's error unread.
                broken.note(exc_info=exc, node=peer, error=one_line(exc))
                forget_frames(exc)
                await asyncio.sleep(MAX_REDIAL)

    async def _open(
        self, host: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        local = source_address(self.config.me.host, host)
        if self.tls is None:
            return await asyncio.open_connection(host, port, local_addr=local)
        return await asyncio.open_connection(
            host, port, ssl=self.tls.dial, server_hostname=host.strip("[]"), local_addr=local
        )

    async def _dial_handshake(
        self,
        peer: int,
        frames: FrameReader,
        writer: asyncio.StreamWriter,
    ) -> int:
        """Our hello, their welcome: the peer version the link speaks."""
        hello = await frames.expect()
        version = protocol.choose_version(hello)
        if hello.get("node") != peer:
            raise ProtocolViolation(f"expected node {peer}, reached node {hello.get('node')}")
        nonce = hello.get("nonce")
        if not isinstance(nonce, str):
            # Not a KeyError: that would end this peer's dialing for good.
            raise ProtocolViolation(f"node {peer}'s hello has no nonce")
        my_nonce = protocol.new_nonce()
        writer.write(
            protocol.encode_frame(
                protocol.peer_hello(
                    version, self.secret, nonce, self.config.node_id, peer, my_nonce
                )
            )
        )
        welcome = await frames.expect()
        if welcome.get("type") == "error":
            raise ProtocolViolation(f"refused by node {peer}: {welcome.get('message')}")
        protocol.check_peer_welcome(welcome, self.secret, my_nonce, self.config.node_id, peer)
        settled = protocol.peer_version_of(welcome)
        if settled > protocol.PEER_VERSION:
            raise ProtocolViolation(f"node {peer} settled on peer version {settled}, not offered")
        frames.limit(self.config.max_frame)
        return settled

    # ---- accepting -------------------------------------------------------------------

    def welcome(self, hello: protocol.Frame, server_nonce: str) -> tuple[int, protocol.Frame]:
        """Check a peer's hello (raises ProtocolViolation) and build our welcome."""
        node = protocol.check_peer_hello(hello, self.secret, server_nonce, self.config.node_id)
        known = {p.node_id for p in self.config.peers}
        if node != OPERATOR_ID and node not in known:
            raise ProtocolViolation(f"node {node} is not a member of this cluster")
        version = min(protocol.peer_version_of(hello), protocol.PEER_VERSION)
        mac = protocol.peer_mac(
            self.secret, "peer-welcome", str(hello["nonce"]), self.config.node_id, node
        )
        self._welcomed[node] = version
        return node, {
            "type": "welcome",
            "version": hello.get("version"),
            "node": self.config.node_id,
            "mac": mac,
            "peer_version": version,
        }

    async def serve_operator(self, frames: FrameReader, writer: asyncio.StreamWriter) -> None:
        """An operator tool holding the secret: one command, one answer. A streamed
        answer is sent by a task of its own, so that the caller's handshake timeout
        bounds reading the command, not the stream; it ends with the node."""
        frame = await frames.expect()
        answer = self.on_operator(frame)
        if isinstance(answer, dict):
            writer.write(protocol.encode_frame(answer))
            await writer.drain()
            writer.close()
        else:
            self._spawn(self._stream_to_operator(answer, writer))

    async def _stream_to_operator(
        self, answer: AsyncIterator[protocol.Frame], writer: asyncio.StreamWriter
    ) -> None:
        failed = True
        try:
            async for frame in answer:
                writer.write(protocol.encode_frame(frame))
                await writer.drain()  # at the pace the operator reads
            failed = False
        except (ConnectionError, OSError) as exc:
            log.info("operator stream ended early node=%s error=%s", self.config.node_id, exc)
        finally:
            aclose = getattr(answer, "aclose", None)
            if aclose is not None:
                await aclose()
            # A stream sent whole closes as usual, its tail flushed however slowly
            # the operator reads; one that failed is closed taking its error.
            if failed:
                await close_after_error(writer)
            else:
                writer.close()

    # ---- a live link -----------------------------------------------------------------

    async def run_link(
        self,
        peer: int,
        frames: FrameReader,
        writer: asyncio.StreamWriter,
        version: int | None = None,
    ) -> None:
        """Serve the link to ``peer`` until it closes. ``version``: the peer version
        its handshake settled on (None: the one our welcome named)."""
        if version is None:
            version = self._welcomed.pop(peer, 1)
        old = self.links.get(peer)
        if old is not None:
            # The peer restarted and reconnected before we noticed the old link die.
            old.close()
            self.links.pop(peer, None)
            self.on_link(peer, False, False)
        link = Link(peer, writer, version)
        frames.decoder.binary = link.binary
        self.links[peer] = link
        if self.config.arbiter == "etcd":
            give_up_when_silent(writer, self.config.lease_ttl)
        log.info(
            "peer link up node=%s peer=%s version=%s local=%s remote=%s",
            self.config.node_id,
            peer,
            version,
            _endpoint(writer, "sockname"),
            _endpoint(writer, "peername"),
        )
        self.on_link(peer, True, False)
        try:
            # Each frame is decoded into a replication message by the owner, which
            # raises ProtocolViolation for a malformed one.
            link.feed = frames.hand_off(writer, lambda frame: self.on_frame(peer, frame))
            violation = await link.feed.violation()
            if violation is not None:
                log.warning("peer broke the protocol node=%s error=%s", peer, one_line(violation))
                link.close()
        finally:
            writer.close()
            if self.links.get(peer) is link:
                del self.links[peer]
                log.info("peer link down node=%s peer=%s", self.config.node_id, peer)
                self.on_link(peer, False, link.closed_by_us)


class HandlerFailed(RuntimeError):
    """What a ``FrameFeed``'s owner raised handling a frame, when it was an OSError."""


def _ignore_frame(frame: protocol.Frame) -> None:
    """What an ended ``FrameFeed`` hands its frames to: it hands on none."""


class FrameFeed(asyncio.Protocol):
    """A connection's frames once its handshake is over, each handed to ``on_frame``
    as soon as it is whole, from the transport's own callback.

    Why. Reading through a stream reader wakes a task for every frame (a future, a
    task step, a copy of the bytes), and a node reads one frame per client write and
    per replication message: from the callback, a frame read and answered costs a
    sixth less CPU (35 us instead of 42 on a loopback ping-pong). A connection then
    needs no task of its own.

    ``ended`` resolves once, to why the connection ended: None (a clean end of
    stream), the ``ProtocolViolation`` of a bad frame (or of one cut short by the
    end of stream), the error that closed the transport, or whatever ``on_frame``
    raised (an OSError of its own as ``HandlerFailed``). After that no frame is
    handed on; its owner answers and closes.
    ``drain`` waits while the transport's write buffer is over its high-water mark.
    With a ``budget`` (a client's connection: ``turns.TurnBudget``) it hands on no
    more frames in a turn of the loop than the budget has left; the rest wait, with
    reading paused, for a later turn. ``hold`` stops handing on (and reading) for a
    while: its owner answered ``busy`` and told the client how long to wait.
    """

    def __init__(
        self,
        decoder: protocol.FrameDecoder,
        on_frame: Callable[[protocol.Frame], None],
        over_tls: bool = False,
        budget: TurnBudget | None = None,
    ) -> None:
        self.decoder = decoder
        self.on_frame = on_frame
        self.over_tls = over_tls
        self.budget = budget
        self.transport: asyncio.Transport | None = None  # set by hand_off
        self._loop = asyncio.get_running_loop()
        self.ended: asyncio.Future[BaseException | None] = self._loop.create_future()
        self._writable: asyncio.Future[None] | None = None
        self._waiting = False  # frames held for a later turn, reading paused
        self._held: asyncio.TimerHandle | None = None  # frames held by ``hold``, until
        self._held_until = 0.0  # when the hold ends, by time.monotonic
        self._eof_held = False  # the end of stream came while frames were held
        self.stream_protocol: asyncio.BaseProtocol | None = None  # the one hand_off replaced

    def data_received(self, data: bytes) -> None:
        if self.ended.done():
            return
        self.decoder.push(data)
        if not self._waiting and self._held is None:
            self._hand_on()

    def _hand_on(self, most: int | None = None) -> None:
        """Hand on the whole frames held, as far as the budget goes (and, waiting in
        line, at most ``most`` before going to the back of it)."""
        budget = self.budget
        taken = 0
        try:
            while not self.ended.done():
                if budget is None:
                    frame = self.decoder.pop()
                    if frame is None:
                        return
                else:
                    if not budget.take():
                        self._wait(budget)
                        return
                    held = self.decoder.pending
                    frame = self.decoder.pop()
                    if frame is None:
                        budget.give_back()
                        return
                    budget.spend(held - self.decoder.pending)
                try:
                    self.on_frame(frame)
                except OSError as exc:
                    # The owner's own I/O failed handling the frame (its disk, a
                    # bug): not the transport's error, which ``violation`` takes
                    # for a clean end. Raised there, so the owner logs it.
                    raise HandlerFailed(f"handling a frame failed: {exc}") from exc
                if self._held is not None:
                    return  # the owner said to hand on nothing more for a while
                taken += 1
                if most is not None and taken >= most and budget is not None:
                    if self.decoder.pending and not self.ended.done():
                        self._wait(budget)
                    return
        except Exception as exc:
            self._end(exc)

    def _wait(self, budget: TurnBudget) -> None:
        self._waiting = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        budget.wait(self)

    def go_on(self) -> None:
        """A later turn: hand on what is held, one frame (the others waiting take
        theirs in turn), then read again once nothing is held."""
        self._waiting = False
        if self._held is None:
            self._hand_on(most=1)
        self._read_again()

    def hold(self, seconds: float) -> None:
        """Hand on no frame, and read none, for ``seconds``: the client was answered
        ``busy`` and told to wait that long. A client that waits loses nothing; one
        that does not is pushed back by TCP, and what it sends meanwhile costs the
        node nothing (it was decoded, looked up and refused frame by frame before)."""
        if self.ended.done() or self._held is not None:
            return
        self._held_until = time.monotonic() + seconds
        self._held = self._loop.call_later(seconds, self._release)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def _release(self) -> None:
        # The owner decided the wait by ``time.monotonic`` (an account's send
        # rate); uvloop counts timers in whole milliseconds of a clock read at the
        # loop's turns and can fire up to one early: the rest is waited again.
        early = self._held_until - time.monotonic()
        if early > 0:
            self._held = self._loop.call_later(max(early, HOLD_TICK), self._release)
            return
        self._held = None
        if not self._waiting:
            self._hand_on()
        self._read_again()

    def _read_again(self) -> None:
        """Read again unless frames are still held (by the budget or by ``hold``)."""
        if self._waiting or self._held is not None:
            return
        if self._eof_held:
            self._at_eof()
            return
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    def eof_received(self) -> bool:
        if self._waiting or self._held is not None:
            self._eof_held = True  # the frames before it first
        else:
            self._at_eof()
        # Half-closed: the owner may still answer (an error frame) before it closes.
        # TLS has no half-close (its transport closes whatever this returns).
        return not self.over_tls

    def _at_eof(self) -> None:
        if self.decoder.pending and not self.ended.done():
            self._end(ProtocolViolation("connection closed in the middle of a frame"))
        self._end(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(exc)
        self.resume_writing()
        # The stream's own protocol, replaced at the hand-off, lets go of its writer
        # (which holds it: a cycle, with the transport and its TLS buffers) only here.
        stream_protocol, self.stream_protocol = self.stream_protocol, None
        if stream_protocol is not None:
            stream_protocol.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    async def drain(self) -> None:
        if self._writable is not None:
            await asyncio.shield(self._writable)

    async def violation(self) -> ProtocolViolation | None:
        """Wait for the end: the protocol violation that ended the connection, or
        None (a clean end, or the transport's error: a closed connection is no
        one's fault). Whatever else ``on_frame`` raised, a bug, is raised here."""
        why = await self.ended
        if why is None or isinstance(why, ProtocolViolation):
            return why
        if isinstance(why, OSError):
            return None
        raise why

    def _end(self, why: BaseException | None) -> None:
        if self._held is not None:
            self._held.cancel()
            self._held = None
        if isinstance(why, (ProtocolViolation, OSError)):
            # The other end's doing, not a bug: nobody reads its traceback, whose
            # frames hold this protocol and so ``ended``, which holds the error.
            forget_frames(why)
        # No frame is handed on after the end: let go of the owner (its session holds
        # this protocol, another cycle).
        self.on_frame = _ignore_frame
        if not self.ended.done():
            self.ended.set_result(why)


class FrameReader:
    """Frames from a stream, one at a time, under a limit that may change between frames.

    Frames are decoded one by one (``FrameDecoder.pop``), never ahead, so a new
    ``limit`` applies to every frame after the one just taken, however TCP split
    them (bytes that came with the hello are refused by the server anyway: nothing
    may be sent before its welcome). Reads are
    no bigger than a frame under the limit, so a connection holds at most about
    twice its limit in our buffers.
    """

    def __init__(self, reader: asyncio.StreamReader, max_frame: int) -> None:
        self.reader = reader
        self.decoder = protocol.FrameDecoder(max_frame)
        self.chunk = _chunk(max_frame)

    def limit(self, max_frame: int) -> None:
        """Frames from now on may be up to ``max_frame`` bytes long."""
        self.decoder.max_frame = max_frame
        self.chunk = _chunk(max_frame)

    async def next(self) -> protocol.Frame | None:
        """The next frame, or None at a clean end of stream. Cancelling it loses
        nothing: bytes read are in the decoder before any frame is taken."""
        while (frame := self.decoder.pop()) is None:
            data = await self.reader.read(self.chunk)
            if not data:
                if self.decoder.pending:
                    raise ProtocolViolation("connection closed in the middle of a frame")
                return None
            self.decoder.push(data)
        return frame

    async def expect(self) -> protocol.Frame:
        frame = await self.next()
        if frame is None:
            raise EOFError("connection closed during the handshake")
        return frame

    def hand_off(
        self,
        writer: asyncio.StreamWriter,
        on_frame: Callable[[protocol.Frame], None],
        budget: TurnBudget | None = None,
    ) -> FrameFeed:
        """Once the handshake is over: every later frame goes to ``on_frame`` as it
        arrives (``FrameFeed``, under ``budget`` if given), the ones already here
        first, in order. Call it with nothing awaited since the last frame taken,
        and read nothing from this reader after."""
        over_tls = writer.get_extra_info("sslcontext") is not None
        feed = FrameFeed(self.decoder, on_frame, over_tls, budget)
        # What the stream reader holds beyond the bytes read so far (a peer may send
        # its first frames right behind its welcome) comes before anything newer.
        # asyncio has no public way to take it: a Python whose StreamReader keeps it
        # elsewhere must fail here, loudly, not lose those frames.
        held = self.reader._buffer  # type: ignore[attr-defined]
        if not isinstance(held, bytearray):
            raise TypeError(f"StreamReader._buffer is a {type(held).__name__}, not a bytearray")
        early = bytes(held)
        held.clear()
        lost = self.reader.at_eof() or writer.is_closing()
        transport = cast(asyncio.Transport, writer.transport)  # uvloop's: not a subclass
        feed.transport = transport
        feed.stream_protocol = transport.get_protocol()
        transport.set_protocol(feed)
        # The stream reader pauses the transport when its buffer is full; the feed
        # decodes as it goes and never needs that.
        transport.resume_reading()
        if transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]:
            feed.pause_writing()  # told to the stream reader's protocol, before us
        feed.data_received(early)
        if lost:
            # The connection ended before the hand-off: no callback will say so again.
            feed.eof_received()
        return feed


async def close_after_error(writer: asyncio.StreamWriter) -> None:
    """Close a connection that failed before its hand-off (a reset, a timeout, a bad
    hello), taking the error it ended with. asyncio keeps that error in a second
    place, a future of the stream's protocol that only ``wait_closed`` reads; the
    error's traceback holds the handler's frame, and so the writer and that future:
    a cycle. When the collector happens to free the future before the protocol
    (the exit of the process, say), asyncio logs "Future exception was never
    retrieved" at ERROR, with a traceback, for a client that merely went away."""
    writer.close()
    try:
        async with asyncio.timeout(CLOSE_WAIT):
            await writer.wait_closed()
    except Exception as exc:  # the error it ended with, or a peer that reads nothing
        # The stream reader keeps this error too, and this frame holds the writer,
        # which holds the reader.
        forget_frames(exc)
        writer.transport.abort()


def forget_frames(exc: BaseException) -> None:
    """Drop the traceback of an error that is kept (in a future, a reader), and
    of its context (a JSONDecodeError behind "not valid JSON", raised ``from None``
    but still there): their frames hold whatever keeps the error, a cycle per bad
    connection, freed with its buffers only by the collector's rare full pass."""
    exc.__traceback__ = None
    exc.__context__ = exc.__cause__ = None


def source_address(mine: str, peer: str) -> tuple[str, int] | None:
    """Where a link to ``peer`` comes from: this node's own address, so that a packet
    filter can tell the nodes apart (three nodes on 127.0.0.11, .12 and .13 would all
    dial from 127.0.0.1 otherwise). None (the kernel's choice) unless both are IP
    addresses of one version and ours is a specific one."""
    try:
        ours, theirs = (
            ipaddress.ip_address(mine.strip("[]")),
            ipaddress.ip_address(peer.strip("[]")),
        )
    except ValueError:
        return None
    if ours.version != theirs.version or ours.is_unspecified:
        return None
    return str(ours), 0


def give_up_when_silent(writer: asyncio.StreamWriter, seconds: float) -> None:
    """Have the kernel close this connection once the peer has been silent for about
    ``seconds``: data we sent unacknowledged that long (TCP_USER_TIMEOUT), or, when we
    have nothing to send, keepalive probes unanswered for that long. A frozen peer's
    kernel still acknowledges, so only a lost peer or a partition closes it. Where
    the options are missing (not Linux), the link is left as it is."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    whole = max(1, math.ceil(seconds))
    options = [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), whole),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", None), int(seconds * 1000)),
    ]
    for level, option, value in options:
        if option is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(level, option, value)


def _chunk(max_frame: int) -> int:
    return min(READ_CHUNK, max_frame + protocol.HEADER.size)


def one_line(exc: BaseException) -> str:
    """An error as one log field: its message on one line (or its type's name)."""
    return (str(exc) or type(exc).__name__).replace("\n", " ")


def _endpoint(writer: asyncio.StreamWriter, which: str) -> str:
    """``HOST:PORT`` of one end of a connection (``sockname`` or ``peername``)."""
    address = writer.get_extra_info(which)
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return "-"
