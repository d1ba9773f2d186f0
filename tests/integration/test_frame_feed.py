"""The frame feed: a connection's frames after its handshake, from the transport's callback.

Real loopback sockets on uvloop, as the node runs them. The handshake is read
through a stream reader (``FrameReader``); ``hand_off`` then gives every later
frame to a callback as it arrives. What a connection must not notice:

* frames sent right behind the last handshake frame, even more than the
  reader's handshake-sized chunk (a peer sends its first appends right behind
  its welcome), come first and in order, then the ones that arrive later;
* a frame cut short by the end of the stream ends the feed with a protocol
  violation, and the half-closed connection can still carry the error frame;
  a clean end of stream ends it with None; a bad frame, or one its callback
  refuses, stops the feed at once;
* ``drain`` waits while the other end does not read, and returns once it reads
  (catch-up and snapshot streams pace themselves with it), also when the write
  buffer passed its mark before the hand-off;
* a hold hands on nothing for its seconds, counted by ``time.monotonic`` (the
  clock the node decides a wait by), however uvloop's timers round.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest
import uvloop

from service import protocol
from service.errors import ProtocolViolation
from service.peer import FrameFeed, FrameReader, HandlerFailed
from service.turns import TurnBudget

DEADLINE = 10.0
T = TypeVar("T")


def run(scenario: Callable[[], Awaitable[T]]) -> T:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(asyncio.wait_for(scenario(), DEADLINE))


def frame(n: int, pad: int = 0) -> protocol.Frame:
    return {"type": "append", "n": n, "pad": "x" * pad}


Ends = tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.StreamReader, asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def connected() -> AsyncIterator[Ends]:
    """Both ends of one loopback connection: (server reader, writer, dialer reader,
    writer), both closed at the end, whatever the test found."""
    accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
        asyncio.get_running_loop().create_future()
    )

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result((reader, writer))

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    dial_reader, dial_writer = await asyncio.open_connection("127.0.0.1", port)
    server_reader, server_writer = await accepted
    server.close()
    try:
        yield server_reader, server_writer, dial_reader, dial_writer
    finally:
        server_writer.close()
        dial_writer.close()
        for _ in range(3):  # uvloop frees a closed handle on its next loop turns
            await asyncio.sleep(0)


async def until(what: str, done: Callable[[], bool]) -> None:
    """Poll ``done`` on the loop, failing with ``what`` at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE / 2
    while not done():
        if loop.time() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.005)


def test_frames_right_behind_the_handshake_come_first_and_in_order() -> None:
    async def scenario() -> None:
        async with connected() as (reader, writer, _, dialer):
            frames = FrameReader(reader, protocol.MAX_HELLO_FRAME)
            # The last handshake frame and, in the same write, more than a handshake-sized
            # read of frames behind it: some stay in the stream reader's buffer.
            behind = [frame(n, pad=200) for n in range(60)]
            dialer.write(b"".join(protocol.encode_frame(f) for f in [{"type": "hello"}, *behind]))
            await until(
                "the stream reader holds bytes behind the first read",
                lambda: len(getattr(reader, "_buffer", b"")) > 2 * protocol.MAX_HELLO_FRAME,
            )
            assert (await frames.expect())["type"] == "hello"
            frames.limit(protocol.DEFAULT_MAX_FRAME)
            got: list[protocol.Frame] = []
            feed = frames.hand_off(writer, got.append)
            assert got == behind, "the frames behind the handshake, at once and in order"
            later = [frame(n) for n in range(60, 63)]
            for f in later:
                dialer.write(protocol.encode_frame(f))
            await until("the later frames reach the callback", lambda: len(got) == 63)
            assert got == behind + later
            assert not feed.ended.done()
            dialer.close()
            assert await feed.ended is None, "a clean end of stream"

    run(scenario)


def test_a_frame_cut_short_ends_the_feed_and_the_error_frame_still_goes_out() -> None:
    async def scenario() -> None:
        async with connected() as (reader, writer, dial_reader, dialer):
            frames = FrameReader(reader, protocol.DEFAULT_MAX_FRAME)
            got: list[protocol.Frame] = []
            feed = frames.hand_off(writer, got.append)
            whole = protocol.encode_frame(frame(1))
            cut = protocol.encode_frame(frame(2))
            dialer.write(whole + cut[: len(cut) // 2])
            dialer.write_eof()
            why = await feed.ended
            assert isinstance(why, ProtocolViolation), why
            assert "middle of a frame" in why.message
            assert got == [frame(1)]
            # Half-closed: the node's answer still reaches the dialer.
            writer.write(protocol.encode_frame(protocol.error(None, why.to_wire())))
            writer.close()
            answer = protocol.FrameDecoder().feed(await dial_reader.read())
            assert [f["code"] for f in answer] == ["protocol"], answer

    run(scenario)


@pytest.mark.parametrize("bad", [b"\x00\x00\x00\x03abc", b"\xff\xff\xff\xff"])
def test_a_bad_frame_stops_the_feed_before_the_frames_behind_it(bad: bytes) -> None:
    async def scenario() -> None:
        async with connected() as (reader, writer, _, dialer):
            frames = FrameReader(reader, 1024)
            got: list[protocol.Frame] = []
            feed = frames.hand_off(writer, got.append)
            dialer.write(protocol.encode_frame(frame(1)) + bad + protocol.encode_frame(frame(3)))
            why = await feed.ended
            assert isinstance(why, ProtocolViolation), why
            assert got == [frame(1)], "nothing after the bad frame"

    run(scenario)


def test_what_the_callback_raises_ends_the_feed() -> None:
    async def scenario() -> None:
        async with connected() as (reader, writer, _, dialer):
            got: list[protocol.Frame] = []

            def refuse_the_second(f: protocol.Frame) -> None:
                got.append(f)
                if f["n"] == 2:
                    raise ProtocolViolation("not this one")

            feed = FrameReader(reader, 1024).hand_off(writer, refuse_the_second)
            dialer.write(b"".join(protocol.encode_frame(frame(n)) for n in (1, 2, 3)))
            why = await feed.ended
            assert isinstance(why, ProtocolViolation)
            assert why.message == "not this one"
            assert [f["n"] for f in got] == [1, 2]

    run(scenario)


def test_an_os_error_of_the_callback_is_no_clean_end() -> None:
    """A transport's OSError ends a feed as a close would (nobody's fault); the
    callback's own (its disk, a bug) is raised by ``violation`` for its owner to log.
    Before, it too ended the connection as if it had closed, and nothing said why."""

    async def scenario() -> None:
        async with connected() as (reader, writer, _, dialer):

            def fail(f: protocol.Frame) -> None:
                raise OSError(5, "Input/output error")

            feed = FrameReader(reader, 1024).hand_off(writer, fail)
            dialer.write(protocol.encode_frame(frame(1)))
            with pytest.raises(HandlerFailed, match="Input/output error"):
                await feed.violation()

    run(scenario)


@pytest.mark.parametrize("filled", ["after the hand-off", "before the hand-off"])
def test_drain_waits_while_the_other_end_does_not_read(filled: str) -> None:
    async def scenario() -> None:
        async with connected() as (reader, writer, dial_reader, _):
            frames = FrameReader(reader, 1024)
            feed: FrameFeed | None = None
            if filled == "after the hand-off":
                feed = frames.hand_off(writer, lambda f: None)
            transport = writer.transport
            transport.set_write_buffer_limits(high=64 * 1024)
            chunk = b"x" * 65536
            # The dialer reads nothing: the kernel's buffers fill, then the transport's.
            while transport.get_write_buffer_size() <= 64 * 1024:
                transport.write(chunk)
                await asyncio.sleep(0)
            if feed is None:
                # The stream reader's protocol was told to pause, not the feed.
                feed = frames.hand_off(writer, lambda f: None)
            drained = asyncio.ensure_future(feed.drain())
            for _ in range(10):  # loop turns: a drain that did not wait is done after one
                await asyncio.sleep(0)
            assert not drained.done(), "drain returned while the other end read nothing"
            while not drained.done():
                await dial_reader.read(1 << 20)
            await drained

    run(scenario)


@pytest.mark.parametrize("budget", [None, 2], ids=["alone", "with a turn budget"])
def test_a_hold_hands_on_nothing_until_it_ends_and_the_end_of_stream_waits_for_it(
    budget: int | None,
) -> None:
    """``hold``: the owner answered busy and told the client to wait. The frames behind
    the one that was refused are handed on only after the hold, in order, under the
    turn budget too; an end of stream that came meanwhile ends the feed after them."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        async with connected() as (reader, writer, _, dialer):
            got: list[tuple[int, float]] = []
            feed: FrameFeed | None = None

            def on_frame(f: protocol.Frame) -> None:
                got.append((f["n"], loop.time()))
                if f["n"] == 2 and feed is not None:
                    feed.hold(0.3)

            turns = None if budget is None else TurnBudget(frames_per_turn=budget)
            feed = FrameReader(reader, 1024).hand_off(writer, on_frame, turns)
            sent = loop.time()
            dialer.write(b"".join(protocol.encode_frame(frame(n)) for n in range(1, 7)))
            dialer.write_eof()
            assert await feed.ended is None, "a clean end, after the held frames"
            assert [n for n, _ in got] == [1, 2, 3, 4, 5, 6]
            held = [at - sent for n, at in got if n > 2]
            assert min(held) >= 0.29, f"handed on during the hold: {got}"

    run(scenario)


def test_a_hold_lasts_its_seconds_by_the_clock_the_node_decides_with() -> None:
    """The node decides when an account may send again by ``time.monotonic`` and
    holds the connection that long. uvloop counts a timer in whole milliseconds of a
    clock it reads at the loop's turns, so a loop busy with other connections fired
    it up to a millisecond early: the client's next frame was read before the
    account could send, answered busy at once, and the frame behind it let in
    (seen in CI). Twenty holds of 10 ms while the loop turns without pause: each
    lasts its 10 ms by ``time.monotonic`` (before, most of them ended early)."""

    async def scenario() -> None:
        async with connected() as (reader, writer, _, dialer):
            got: dict[int, float] = {}
            held: dict[int, float] = {}
            feed: FrameFeed | None = None

            def on_frame(f: protocol.Frame) -> None:
                got[f["n"]] = time.monotonic()
                if feed is not None:
                    held[f["n"]] = time.monotonic()
                    feed.hold(0.01)

            async def other_connections() -> None:  # the loop never waits long
                while not feed_ended.done():
                    await asyncio.sleep(0)

            feed = FrameReader(reader, 1024).hand_off(writer, on_frame)
            feed_ended = feed.ended
            busy = asyncio.ensure_future(other_connections())
            dialer.write(b"".join(protocol.encode_frame(frame(n)) for n in range(1, 22)))
            dialer.write_eof()
            assert await feed.ended is None
            await busy
            gaps = [got[n + 1] - held[n] for n in range(1, 21)]
            short = [round(gap, 5) for gap in gaps if gap < 0.01]
            assert not short, f"holds of 0.01 s that ended early: {short}"

    run(scenario)
