"""The pieces of connection handling that need no node process.

* ``FrameDecoder.pop`` decodes one frame at a time, so a limit changed between
  two frames applies to the second even when both arrived in one read; a
  declared length over the limit raises from the header alone.
* The client frame limit holds the largest legal requests, written in the most
  verbose JSON a client may send (every character escaped).
* ``NodeConfig.client_limit`` leaves room for the database, peers and
  handshakes under the file limit, and an explicit ``max_clients`` wins.
* ``ThrottledLog`` writes the first event at once and then one line per
  interval, and its lines account for every event, also when the node stops
  inside a window.
* ``ended_sessions`` names exactly the token hashes without a live session
  (logged out, account deleted, never logged in), on a real database.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from service import chat, protocol
from service.chat_schema import MIGRATIONS
from service.config import MIN_CLIENT_FRAME, RESERVED_FILES, NodeConfig, Peer, load
from service.errors import FrameTooLarge, InvalidInput
from service.server import ended_sessions
from service.storage import Storage
from service.throttle import ThrottledLog, close_windows

# ---- frames -------------------------------------------------------------------------------------


def test_a_new_limit_applies_to_the_frames_after_it_even_if_they_arrived_together() -> None:
    hello = protocol.encode_frame(protocol.client_hello(1))
    big = protocol.encode_frame({"type": "request", "pad": "x" * 10_000})
    decoder = protocol.FrameDecoder(protocol.MAX_HELLO_FRAME)
    decoder.push(hello + big)
    assert decoder.pop() == protocol.client_hello(1)
    decoder.max_frame = MIN_CLIENT_FRAME
    frame = decoder.pop()
    assert frame is not None
    assert frame["pad"] == "x" * 10_000
    assert decoder.pop() is None


def test_a_frame_over_the_limit_raises_from_its_header_and_ever_after() -> None:
    decoder = protocol.FrameDecoder(protocol.MAX_HELLO_FRAME)
    decoder.push(protocol.HEADER.pack(protocol.DEFAULT_MAX_FRAME))
    with pytest.raises(FrameTooLarge):
        decoder.pop()
    decoder.push(b"{}")
    with pytest.raises(FrameTooLarge):
        decoder.pop()


def _escaped(frame: protocol.Frame) -> bytes:
    return json.dumps(frame, ensure_ascii=True).encode()


def test_the_largest_legal_requests_fit_the_client_frame_limit() -> None:
    limit = NodeConfig(1, Path("."), (Peer(1, "h", 1),), Path("s")).max_client_frame
    request_id = "\U0001f600" * protocol.MAX_REQUEST_ID
    token = "t" * 64
    widest = protocol.request(
        "send",
        request_id,
        {"to": "\u00e9" * chat.MAX_USERNAME, "body": "\U0001f600" * chat.MAX_BODY},
        token,
    )
    most = protocol.request("mark_read", request_id, {"ids": [2**63 - 1] * chat.MAX_IDS}, token)
    for request in (widest, most):
        assert len(_escaped(request)) < limit
    assert limit >= MIN_CLIENT_FRAME
    assert limit * 100 < protocol.DEFAULT_MAX_FRAME


# ---- the client limit ---------------------------------------------------------------------------


def _config(**settings: int) -> NodeConfig:
    nodes = tuple(Peer(i, "127.0.0.1", 7000 + i) for i in (1, 2, 3))
    return NodeConfig(1, Path("."), nodes, Path("s"), **settings).validate()  # type: ignore[arg-type]


def test_the_client_limit_leaves_room_under_the_file_limit() -> None:
    config = _config()
    limit = config.client_limit(1024)
    assert limit == 1024 - RESERVED_FILES - 2 * 3 - config.max_handshakes
    assert limit + config.max_handshakes + 2 * 3 < 1024
    assert config.client_limit(4096) > 3000
    assert config.client_limit(10) == 1  # a tiny limit still serves someone


def test_an_explicit_max_clients_wins_and_bad_limits_are_refused() -> None:
    assert _config(max_clients=7).client_limit(1024) == 7
    with pytest.raises(InvalidInput):
        _config(max_clients=-1)
    with pytest.raises(InvalidInput):
        _config(max_handshakes=0)
    with pytest.raises(InvalidInput):
        _config(max_client_frame=1024)
    with pytest.raises(InvalidInput):
        _config(max_client_frame=16 * 1024 * 1024)


def test_the_log_retention_in_bytes_is_a_setting_and_must_be_positive() -> None:
    assert _config().log_retention_bytes == 32 * 1024 * 1024
    required = {"node_id": "1", "data_dir": "d", "nodes": "1=127.0.0.1:7001"}
    assert load(None, {**required, "log_retention_bytes": "1048576"}).log_retention_bytes == 2**20
    for bad in (0, -1):
        with pytest.raises(InvalidInput, match="log_retention_bytes"):
            _config(log_retention_bytes=bad)


def test_the_damaged_copies_kept_are_a_setting_and_must_be_positive() -> None:
    assert _config().damaged_max_files == 2
    required = {"node_id": "1", "data_dir": "d", "nodes": "1=127.0.0.1:7001"}
    assert load(None, {**required, "damaged_max_files": "5"}).damaged_max_files == 5
    for bad in (0, -1):
        with pytest.raises(InvalidInput, match="damaged_max_files"):
            _config(damaged_max_files=bad)


# ---- throttled log lines ------------------------------------------------------------------------

_LINE = re.compile(r"refused address=(\S+) suppressed=(\d+)")


def test_a_throttled_log_writes_one_line_per_interval_and_counts_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    interval = 0.2
    logger = logging.getLogger("tests.throttle")

    def lines() -> list[tuple[str, int]]:
        return [(m[1], int(m[2])) for r in caplog.records if (m := _LINE.search(r.getMessage()))]

    async def main() -> None:
        throttle = ThrottledLog(logger, logging.WARNING, "refused", interval)
        for index in range(10):
            throttle.note(address=f"a{index}")
        # The first at once, the others counted.
        assert lines() == [("a0", 0)]
        async with asyncio.timeout(5 * interval + 5):
            while len(lines()) < 2:
                await asyncio.sleep(interval / 4)
        # The window closes with a line of its own: the last event, and the count.
        assert lines() == [("a0", 0), ("a9", 8)]
        # The next window: a later event is logged with nothing suppressed.
        async with asyncio.timeout(5 * interval + 5):
            while len(lines()) < 3:
                throttle.note(address="late")
                await asyncio.sleep(interval / 4)
        assert lines()[2][0] == "late"

    with caplog.at_level(logging.WARNING, logger="tests.throttle"):
        asyncio.run(main())
    assert lines()[:2] == [("a0", 0), ("a9", 8)]


def test_a_node_stopping_inside_a_window_still_logs_its_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The node stops (``close_windows``) before a window's timer fires: its closing
    line comes then, so the lines still account for every event; once, however
    often the windows are closed."""
    logger = logging.getLogger("tests.throttle")

    def lines() -> list[tuple[str, int]]:
        return [(m[1], int(m[2])) for r in caplog.records if (m := _LINE.search(r.getMessage()))]

    async def main() -> None:
        throttle = ThrottledLog(logger, logging.WARNING, "refused", 3600.0)
        for index in range(5):
            throttle.note(address=f"a{index}")
        assert lines() == [("a0", 0)]
        close_windows()
        close_windows()
        assert lines() == [("a0", 0), ("a4", 3)]
        assert sum(1 + suppressed for _, suppressed in lines()) == 5

    with caplog.at_level(logging.WARNING, logger="tests.throttle"):
        asyncio.run(main())


def test_a_throttled_error_brings_its_traceback_with_the_line_written(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug a client can repeat (``connection failed``): the first of a window is
    written with its traceback; the ones counted in the window keep none (the closing
    line has the last one's fields, not its error)."""
    logger = logging.getLogger("tests.throttle")

    def failing(index: int) -> Exception:
        try:
            raise RuntimeError(f"bug {index}")
        except RuntimeError as exc:
            return exc

    async def main() -> None:
        throttle = ThrottledLog(logger, logging.ERROR, "refused", 3600.0)
        for index in range(3):
            throttle.note(exc_info=failing(index), address=f"a{index}")
        close_windows()

    with caplog.at_level(logging.ERROR, logger="tests.throttle"):
        asyncio.run(main())
    records = [r for r in caplog.records if _LINE.search(r.getMessage())]
    assert [r.getMessage() for r in records] == [
        "refused address=a0 suppressed=0",
        "refused address=a2 suppressed=1",
    ]
    assert records[0].exc_info is not None
    assert str(records[0].exc_info[1]) == "bug 0"
    assert "Traceback" in caplog.text
    assert not records[1].exc_info


# ---- ended sessions -----------------------------------------------------------------------------


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[Storage]:
    storage = Storage(tmp_path / "chat.db", migrations=MIGRATIONS)
    yield storage
    storage.close()


def test_ended_sessions_names_the_sessions_that_are_gone(storage: Storage) -> None:
    request_ids = itertools.count(1)

    def write(op: str, args: dict[str, object], token_hash: str | None = None) -> None:
        batch = storage.begin_batch()
        with batch.savepoint() as db:
            chat.apply_write(db, op, args, token_hash, f"r{next(request_ids)}", 1000.0)
        batch.seal(1)
        batch.commit()

    password_hash = chat.hash_password("correct horse")

    def session(name: str) -> str:
        _, token_hash = chat.new_token()
        write(
            "login",
            {
                "username": name,
                "token_hash": token_hash,
                "session_lifetime": 86400.0,
                "session_idle": 86400.0,
                "session_cap": 20,
            },
        )
        return token_hash

    for name in ("ann", "bob"):
        write("register", {"username": name, "password_hash": password_hash})
    live, logged_out, deleted, other_deleted = (
        session("ann"),
        session("ann"),
        session("bob"),
        session("bob"),
    )
    write("logout", {}, logged_out)
    write("delete_account", {}, deleted)
    never = chat.new_token()[1]
    hashes = [live, logged_out, other_deleted, never, None]
    ended, _ = storage.read(lambda db: ended_sessions(db, hashes, 1001.0))
    assert ended == {logged_out, other_deleted, never, None}
