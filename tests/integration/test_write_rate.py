"""An account's send and write rates (``service/writerate.py``) on real nodes, and
with ``chatctl``.

A cluster whose accounts may send a message every 4 s and 5 at once. Mallory
pipelines 7 sends on one connection: 5 are stored, 2 are answered ``busy`` with
the time to wait, each its own (4 and 8 s: in line), and nothing of those 2
reaches anyone's inbox. Then ``chatctl send``, run as mallory while her bucket
is still empty (a new token takes 4 s; the command starts in well under that),
is told ``busy`` too, waits the time the node names (behind the two) and is
stored: a user within the rate never sees the limit, one beyond it is slowed to
it. Alice, another account, sends as if nothing happened. The primary counts the
refusals in ``chat_sends_refused_rate_total`` and its log names the account. A
program handing the client library many sends at once gets them all through, at
the rate; only a connection refused more often than that is held.

An account's other writes have a bucket of their own: pipelined ``touch``es
past ``write_burst`` are refused ``busy`` and leave no request row, and the
account can still send.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sqlite3
from pathlib import Path

import pytest

from ops.cluster.scrape import scrape
from service import protocol
from service.client import Client
from service.server import REFUSALS_AT_ONCE
from tests.conftest import ClusterFactory
from tests.helpers.workload import new_user, run, start_cluster
from tests.integration.test_bad_input import Raw
from tests.integration.test_client_cli import PASSWORD, User

pytestmark = pytest.mark.cluster

RATE = 0.25
BURST = 5
SENT = 7


async def mallory_pipelines(address: str, token: str) -> dict[str, protocol.Frame]:
    """``SENT`` sends to alice at once on one connection; the answers by request id."""
    raw = await Raw.client(address)
    try:
        for n in range(SENT):
            args = {"to": "alice", "body": f"spam {n}"}
            raw.send(protocol.request("send", f"spam-{n}", args, token))
        answers: dict[str, protocol.Frame] = {}
        while len(answers) < SENT:
            frame = await raw.next_frame()
            assert frame is not None, f"the node closed the connection after {answers}"
            answers[str(frame["request_id"])] = frame
        return answers
    finally:
        raw.close()


async def inbox(servers: list[str], token: str) -> list[str]:
    async with Client(servers, token=token) as client:
        page = await client.read(limit=1000)
    return [message["body"] for message in page["messages"]]


def test_an_account_past_its_send_rate_is_answered_busy_and_nothing_of_it_is_stored(
    cluster_factory: ClusterFactory, tmp_path: Path
) -> None:
    cluster = cluster_factory(send_rate=RATE, send_burst=BURST, metrics=True)
    primary = start_cluster(cluster)
    assert primary.metrics_address is not None
    mallory_token = run(new_user(cluster.servers, "mallory", PASSWORD))
    alice_token = run(new_user(cluster.servers, "alice", PASSWORD))
    mallory = User(tmp_path, "mallory", cluster.servers)
    mallory.ok("login", "mallory", CHATCTL_PASSWORD=PASSWORD)  # before her bucket empties

    answers = run(mallory_pipelines(primary.address, mallory_token))
    replies = {rid for rid, frame in answers.items() if frame["type"] == "reply"}
    busy = {rid: frame for rid, frame in answers.items() if frame["type"] == "error"}
    assert len(replies) == BURST, answers
    assert len(busy) == SENT - BURST, answers
    for frame in busy.values():
        assert frame["code"] == "busy", frame
        assert "send_rate" in frame["message"], frame
    # The bucket gives one send every 1/RATE s, and is empty now: the refused are
    # told a time each, in line, 1/RATE s apart.
    waits = sorted(frame["retry_after"] for frame in busy.values())
    assert waits == pytest.approx([n / RATE for n in range(1, SENT - BURST + 1)], abs=0.05)

    # chatctl is refused too, waits the retry_after it is told and sends again.
    assert mallory.ok("send", "alice", "one more", "--timeout", "30").startswith("sent message")
    scraped = scrape(primary.metrics_address)
    assert scraped is not None, "the primary serves no metrics"
    assert scraped.value("chat_sends_refused_rate_total") >= SENT - BURST + 1, (
        "chatctl's send was never refused: it came 4 s after the burst, or the limit let it in"
    )

    # The primary's log names the account (at most a line per log_interval).
    assert "send refused: account past send_rate" in primary.log_text()

    async def alice_sends() -> None:
        async with Client(cluster.servers, token=alice_token) as client:
            await client.send("mallory", "hello mallory")

    run(alice_sends())  # another account: its own bucket, full
    stored = run(inbox(cluster.servers, alice_token))
    spam = {f"spam {rid.removeprefix('spam-')}" for rid in replies}
    assert sorted(stored) == sorted([*spam, "one more"])


async def answer_times(address: str, token: str, count: int) -> dict[str, tuple[float, str]]:
    """``count`` sends at once on one connection (``s0``, ``s1``...), ignoring every
    ``retry_after``: when each answer came (seconds after the sends) and its kind."""
    raw = await Raw.client(address)
    loop = asyncio.get_running_loop()
    try:
        start = loop.time()
        for n in range(count):
            raw.send(protocol.request("send", f"s{n}", {"to": "alice", "body": "x"}, token))
        times: dict[str, tuple[float, str]] = {}
        while len(times) < count:
            frame = await raw.next_frame(timeout=30.0)
            assert frame is not None, f"the node closed the connection after {times}"
            times[str(frame["request_id"])] = (loop.time() - start, str(frame.get("code", "reply")))
        return times
    finally:
        raw.close()


def test_a_client_that_does_not_wait_after_busy_is_not_read_meanwhile(
    cluster_factory: ClusterFactory,
) -> None:
    """Answered ``busy`` with a ``retry_after`` more often than a client that waits
    would be, a connection is not read for that long (at most a second): what it
    sends meanwhile waits in TCP, and the node spends nothing on it. It used to
    decode, look up and refuse every frame at once: a flood of the largest sends that
    ignored retry_after got 178,693 refusals in 20 s.

    One send every 4 s: s0 is stored; the next ``REFUSALS_AT_ONCE`` are refused at
    once (as many as a client may have in flight, sent before it could know); past
    them (and the few the allowance gained meanwhile, 10 a second), the frame after
    a refusal is read only a second later."""
    cluster = cluster_factory(send_rate=0.25, send_burst=1)
    primary = start_cluster(cluster)
    mallory = run(new_user(cluster.servers, "mallory", PASSWORD))
    alice = run(new_user(cluster.servers, "alice", PASSWORD))
    count = REFUSALS_AT_ONCE + 12
    times = run(answer_times(primary.address, mallory, count))
    kinds = {rid: kind for rid, (_, kind) in times.items()}
    assert kinds == {"s0": "reply"} | {f"s{n}": "busy" for n in range(1, count)}, kinds
    at = [times[f"s{n}"][0] for n in range(1, count)]
    # gaps[i]: from the answer to refusal i + 1 to the next one's.
    gaps = [later - earlier for earlier, later in itertools.pairwise(at)]
    held = [i for i, gap in enumerate(gaps) if gap >= 0.8]
    assert held, f"never held: the longest wait between refusals {max(gaps):.2f} s"
    assert held[0] >= REFUSALS_AT_ONCE, f"held after refusal {held[0] + 1}: {gaps[held[0]]:.2f} s"

    async def alice_sends() -> None:
        async with Client(cluster.servers, token=alice) as client:
            await client.send("mallory", "hello")

    run(alice_sends())  # another connection, another account: never held


def test_a_client_sending_past_its_rate_at_once_gets_every_send_through_at_the_rate(
    cluster_factory: ClusterFactory,
) -> None:
    """A program that hands the client library many sends at once, past its rate: the
    sends beyond the burst are refused ``busy``, each told a later time than the one
    before (its place in line), so they come back one at a time and get in at the
    rate. Refused all at once, they were all told the same tenth of a second and
    came back together, one getting in; the connection was held after each refusal,
    so the requests behind waited past the client's attempt timeout, and the client
    closed the connection and failed them (``no primary reachable``)."""
    rate, burst, count = 20, 10, 150
    cluster = cluster_factory(send_rate=rate, send_burst=burst)
    start_cluster(cluster)
    mallory = run(new_user(cluster.servers, "mallory", PASSWORD))
    alice = run(new_user(cluster.servers, "alice", PASSWORD))

    async def mallory_sends() -> tuple[float, list[str]]:
        loop = asyncio.get_running_loop()
        async with Client(cluster.servers, token=mallory, timeout=30.0) as client:
            start = loop.time()
            outcomes = await asyncio.gather(
                *(client.send("alice", f"bulk {n}") for n in range(count)),
                return_exceptions=True,
            )
            failed = [repr(o) for o in outcomes if isinstance(o, BaseException)]
            return loop.time() - start, failed

    took, failed = run(mallory_sends())
    assert not failed, f"{len(failed)} of {count} sends failed: {failed[:3]}"
    # The rate holds: the burst at once, then one every 1/rate s.
    assert took >= (count - burst) / rate - 0.5, f"{count} sends in {took:.2f} s"
    stored = run(inbox(cluster.servers, alice))
    assert sorted(stored) == sorted(f"bulk {n}" for n in range(count))


async def touches(address: str, token: str, count: int) -> dict[str, protocol.Frame]:
    """``count`` touches at once on one connection (``t0``, ``t1``...); the answers."""
    raw = await Raw.client(address)
    try:
        for n in range(count):
            raw.send(protocol.request("touch", f"t{n}", {}, token))
        answers: dict[str, protocol.Frame] = {}
        while len(answers) < count:
            frame = await raw.next_frame(timeout=30.0)
            assert frame is not None, f"the node closed the connection after {answers}"
            answers[str(frame["request_id"])] = frame
        return answers
    finally:
        raw.close()


def test_writes_other_than_sends_have_their_own_rate_and_refused_ones_store_nothing(
    cluster_factory: ClusterFactory,
) -> None:
    """Each write keeps a request row for ``request_retention`` (an hour), so a flood
    of ``touch``es stored thousands of rows a second on every node. Past
    ``write_burst`` they are refused ``busy`` with the time to wait and store
    nothing; the account's sends, counted apart, still go through."""
    cluster = cluster_factory(
        write_rate=0.25, write_burst=3, send_rate=1, send_burst=1, metrics=True
    )
    primary = start_cluster(cluster)
    assert primary.metrics_address is not None
    mallory = run(new_user(cluster.servers, "mallory", PASSWORD))
    run(new_user(cluster.servers, "alice", PASSWORD))

    async def mallory_sends(body: str) -> None:
        # Told to wait past the deadline, the client raises busy at once.
        async with Client(cluster.servers, token=mallory, timeout=5.0) as client:
            await client.send("alice", body)

    run(mallory_sends("first"))  # the send rate's burst spent: writes go on
    answers = run(touches(primary.address, mallory, 5))
    kinds = {rid: str(frame.get("code", frame["type"])) for rid, frame in answers.items()}
    assert kinds == {"t0": "reply", "t1": "reply", "t2": "reply", "t3": "busy", "t4": "busy"}
    for rid, wait in (("t3", 4.0), ("t4", 8.0)):  # in line, 1/rate apart
        frame = answers[rid]
        assert "write_rate" in frame["message"], frame
        assert frame["retry_after"] == pytest.approx(wait, abs=0.05), frame

    # The send rate's bucket (a token within a second), not the write line (12 s on).
    run(mallory_sends("still here"))

    uri = f"file:{primary.db_path}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        stored = sorted(
            str(row[0])
            for row in conn.execute("SELECT request_id FROM requests WHERE op = 'touch'")
        )
    assert stored == ["t0", "t1", "t2"], "a refused touch left its request row"

    scraped = scrape(primary.metrics_address)
    assert scraped is not None, "the primary serves no metrics"
    assert scraped.value("chat_writes_refused_rate_total") == 2
    assert "write refused: account past write_rate" in primary.log_text()
