"""The wire protocol as ``service/PROTOCOL.md`` states it, checked frame by frame.

A client written from the document alone must meet the node it describes. Each
test drives a real node process over raw sockets, with frames written by hand,
and pins one rule where the node and the document once disagreed:

* after the welcome, a frame that is not a request, or a request without a
  usable ``request_id`` (none, empty, 65 characters), is a protocol violation:
  one ``protocol`` error with a null ``request_id``, then the node closes the
  connection and answers nothing more on it;
* a frame sent before the welcome (behind the hello, in the same write) is a
  violation too: no welcome, no answer;
* ``args: null`` means no arguments, as ``token: null`` means no token;
* every operation refuses an argument it does not know, with ``invalid``;
* at most 256 requests of a connection are unanswered at once: requests
  pipelined beyond that are refused with ``invalid``, and a client that keeps
  to 256 is never refused;
* a refused write is not stored: retried under its id it runs again (and may
  succeed); a request id reused with other arguments is refused with ``conflict``;
* a second ``listen`` on a connection is refused, so no message comes twice;
* an electing node answers ``not_primary`` with a null ``primary``;
* ``status`` has exactly the fields the document lists; duplicate JSON keys
  count the last; the log lines look as the README shows them.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from service import protocol
from service.client import Client, new_request_id
from service.turns import FRAMES_PER_TURN
from tests.conftest import ClusterFactory
from tests.helpers.cluster import Cluster
from tests.integration.test_bad_input import Raw, assert_node_unharmed, close_all

pytestmark = pytest.mark.cluster

PASSWORD = "contract-password"
ANSWER_TIMEOUT = 5.0
CLOSE_TIMEOUT = 10.0
PROTOCOL_MD = Path(__file__).resolve().parents[2] / "service" / "PROTOCOL.md"

Frame = protocol.Frame


def scenario(cluster: Cluster, body: Any) -> None:
    """Run the coroutine ``body()``, close what it left open, check the node is unharmed."""

    async def main() -> None:
        try:
            await body()
        finally:
            await close_all(Raw.opened)

    asyncio.run(main())
    assert_node_unharmed(cluster)


async def user(address: str, name: str) -> str:
    """Register ``name`` and return the token of a new session."""
    async with Client([address], timeout=ANSWER_TIMEOUT) as client:
        await client.register(name, PASSWORD)
        await client.login(name, PASSWORD)
        assert client.token is not None
        return client.token


async def answers(raw: Raw, count: int) -> dict[str, list[Frame]]:
    """The next ``count`` reply or error frames, by request id."""
    found: dict[str, list[Frame]] = {}
    seen = 0
    while seen < count:
        try:
            frame = await raw.next_frame()
        except TimeoutError:
            raise AssertionError(f"only {seen} of {count} answers came") from None
        assert frame is not None, f"the node closed the connection after {seen} answers"
        if frame["type"] in ("reply", "error"):
            found.setdefault(str(frame["request_id"]), []).append(frame)
            seen += 1
    return found


async def frames_until(raw: Raw, request_id: str) -> list[Frame]:
    """Every frame up to the answer to ``request_id``, excluded."""
    frames: list[Frame] = []
    while True:
        frame = await raw.first_answer(f"the request {request_id}")
        if frame.get("request_id") == request_id and frame["type"] != "message":
            return frames
        frames.append(frame)


async def expect_violation(raw: Raw, what: str) -> None:
    """One ``protocol`` error about the connection (null request id), then the close."""
    frames = await raw.closed_by_node(CLOSE_TIMEOUT)
    assert len(frames) == 1, f"{what}: expected one error frame and a close, got {frames}"
    (error,) = frames
    assert error["type"] == "error", (what, error)
    assert error["request_id"] is None, (what, error)
    assert error["code"] == "protocol", (what, error)


# ---- violations end the connection -------------------------------------------------------

NOT_REQUESTS: dict[str, Frame] = {
    "a frame of unknown type": {"type": "bogus"},
    "a second hello": protocol.client_hello(protocol.PROTOCOL_MAX_VERSION),
    "a reply": {"type": "reply", "request_id": "rep", "result": {}},
    "a request without an id": {"type": "request", "op": "status"},
    "a request with an empty id": {"type": "request", "request_id": "", "op": "status"},
    "a request with a 65-character id": {"type": "request", "request_id": "r" * 65, "op": "status"},
    "a request with a numeric id": {"type": "request", "request_id": 7, "op": "status"},
}


def test_a_frame_without_a_request_to_answer_ends_the_connection(single_node: Cluster) -> None:
    address = single_node.servers[0]

    async def body() -> None:
        for what, frame in NOT_REQUESTS.items():
            raw = await Raw.client(address)
            # A good request right behind it must not be answered: the connection is over.
            raw.send_bytes(
                protocol.encode_frame(frame)
                + protocol.encode_frame(protocol.request("status", "after", {}))
            )
            await expect_violation(raw, what)

    scenario(single_node, body)


def test_a_bad_envelope_with_a_usable_id_is_answered_under_it(single_node: Cluster) -> None:
    address = single_node.servers[0]

    async def body() -> None:
        raw = await Raw.client(address)
        bad = {"type": "request", "request_id": "bad-op", "op": 7}
        answer = await raw.answer(bad)
        assert answer["request_id"] == "bad-op", answer
        assert answer["code"] == "protocol", answer
        reply = await raw.answer(protocol.request("status", "still-open", {}))
        assert reply["type"] == "reply", reply

    scenario(single_node, body)


def test_a_request_sent_before_the_welcome_is_a_violation(single_node: Cluster) -> None:
    address = single_node.servers[0]
    hello = protocol.encode_frame(protocol.client_hello(protocol.PROTOCOL_MAX_VERSION))
    early = protocol.encode_frame(protocol.request("status", "early", {}))

    async def body() -> None:
        raw = await Raw.connect(address)
        raw.send_bytes(hello + early)  # one write: the request is there before the welcome
        await expect_violation(raw, "a request in the same write as the hello")
        # Sent after the welcome, the same request is answered.
        raw = await Raw.client(address)
        assert (await raw.answer(protocol.request("status", "late", {})))["type"] == "reply"

    scenario(single_node, body)


# ---- the envelope and the arguments ------------------------------------------------------


def test_null_args_and_a_null_token_count_as_absent(single_node: Cluster) -> None:
    address = single_node.servers[0]

    async def body() -> None:
        raw = await Raw.client(address)
        frame = {"type": "request", "request_id": "n1", "op": "status", "args": None}
        reply = await raw.answer(frame)
        assert reply["type"] == "reply", reply
        frame = {"type": "request", "request_id": "n2", "op": "whoami", "token": None}
        refusal = await raw.answer(frame)
        assert refusal["code"] == "auth_failed", refusal

    scenario(single_node, body)


def test_duplicate_keys_count_the_last(single_node: Cluster) -> None:
    address = single_node.servers[0]
    body_text = b'{"type":"request","request_id":"dup","op":"whoami","op":"status"}'

    async def body() -> None:
        raw = await Raw.client(address)
        raw.send_body(body_text)
        reply = await raw.first_answer("a request with a duplicate key")
        assert reply["type"] == "reply", reply
        assert "node" in reply["result"], reply

    scenario(single_node, body)


def test_every_operation_refuses_an_unknown_argument(single_node: Cluster) -> None:
    address = single_node.servers[0]

    async def body() -> None:
        token = await user(address, "ann")
        await user(address, "bob")
        calls: dict[str, dict[str, Any]] = {
            "status": {},
            "whoami": {},
            "search": {"pattern": "*"},
            "listen": {"after": None},
            "read": {},
            "register": {"username": "carol", "password": PASSWORD},
            "login": {"username": "ann", "password": PASSWORD},
            "send": {"to": "bob", "body": "hi"},
            "mark_read": {"ids": [1]},
            "delete_messages": {"ids": [1]},
            "touch": {},
            "logout": {},
            "delete_account": {},
        }
        raw = await Raw.client(address)
        accepted = []
        for op, args in calls.items():
            answer = await raw.answer(
                protocol.request(op, new_request_id(), {**args, "bogus": 1}, token)
            )
            if not (answer["type"] == "error" and answer["code"] == "invalid"):
                accepted.append((op, answer))
            else:
                assert "bogus" in answer["message"], answer
        assert accepted == [], f"operations that took an unknown argument: {accepted}"
        # Nothing of it happened: carol does not exist, ann is still logged in.
        reply = await raw.answer(protocol.request("search", "s", {"pattern": "carol"}, token))
        assert reply["result"]["users"] == [], reply

    scenario(single_node, body)


# ---- requests in flight ------------------------------------------------------------------


def test_requests_beyond_the_in_flight_limit_are_refused(single_node: Cluster) -> None:
    address = single_node.servers[0]
    limit = protocol.MAX_IN_FLIGHT
    # Pipelined in one write. Reads take turns on the primary, one per turn of its
    # loop, while it takes up to 256 client frames per turn: more than 256 of them
    # are soon unanswered at once, however quickly it could answer each.
    sent = 4 * limit

    async def body() -> None:
        token = await user(address, "ann")

        def burst(prefix: str, count: int) -> tuple[list[str], bytes]:
            ids = [f"{prefix}{i}" for i in range(count)]
            data = b"".join(
                protocol.encode_frame(protocol.request("read", i, {"limit": 1}, token)) for i in ids
            )
            return ids, data

        raw = await Raw.client(address)
        ids, data = burst("a", sent)
        raw.send_bytes(data)
        got = await answers(raw, sent)
        assert sorted(got) == sorted(ids), "every request gets exactly one answer"
        assert all(len(frames) == 1 for frames in got.values())
        refused = [f[0] for f in got.values() if f[0]["type"] == "error"]
        assert refused, f"none of {sent} pipelined requests was refused (limit {limit})"
        assert len(refused) <= sent - limit, len(refused)
        for frame in refused:
            assert frame["code"] == "invalid", frame
            assert frame["retriable"] is False, frame
            assert str(limit) in frame["message"], frame
        # A client that keeps to the limit is never refused, and the connection lives on.
        ids, data = burst("b", limit)
        raw.send_bytes(data)
        got = await answers(raw, limit)
        assert all(f[0]["type"] == "reply" for f in got.values()), [
            f[0] for f in got.values() if f[0]["type"] != "reply"
        ]

    scenario(single_node, body)


# ---- idempotency ---------------------------------------------------------------------------


def test_a_refused_write_is_not_stored_and_a_reused_id_must_repeat_its_request(
    single_node: Cluster,
) -> None:
    address = single_node.servers[0]

    async def body() -> None:
        token = await user(address, "ann")
        raw = await Raw.client(address)
        send = protocol.request("send", "s1", {"to": "later", "body": "hello"}, token)
        assert (await raw.answer(send))["code"] == "not_found"
        await user(address, "later")
        # The refusal changed nothing, so the same request now runs, and succeeds.
        first = await raw.answer(send)
        assert first["type"] == "reply", first
        assert (await raw.answer(send)) == first, "a retry returns the first result"
        other = protocol.request("send", "s1", {"to": "later", "body": "another"}, token)
        refusal = await raw.answer(other)
        assert refusal["type"] == "error", refusal
        assert refusal["code"] == "conflict", refusal
        page = await raw.answer(protocol.request("read", "r1", {"box": "sent"}, token))
        assert [m["body"] for m in page["result"]["messages"]] == ["hello"]

    scenario(single_node, body)


def test_frames_past_a_turns_budget_are_answered_in_order_then_the_end_of_stream(
    single_node: Cluster,
) -> None:
    """A node takes at most ``turns.FRAMES_PER_TURN`` client frames in one turn of its
    loop; the rest of what arrived waits, reading paused, for later turns. Nothing
    of it is lost or reordered, and an end of stream behind it comes after it."""
    address = single_node.servers[0]
    count = 4 * FRAMES_PER_TURN

    async def body() -> None:
        raw = await Raw.client(address)
        raw.send_bytes(
            b"".join(
                protocol.encode_frame(protocol.request("status", f"s{n}", {})) for n in range(count)
            )
        )
        raw.writer.write_eof()  # in the same burst as the frames
        frames = await raw.closed_by_node(CLOSE_TIMEOUT)
        assert [f.get("request_id") for f in frames] == [f"s{n}" for n in range(count)]
        assert all(f["type"] == "reply" for f in frames), frames[:3]

    scenario(single_node, body)


# ---- listen ----------------------------------------------------------------------------------


def test_a_second_listen_on_a_connection_is_refused(single_node: Cluster) -> None:
    address = single_node.servers[0]

    async def body() -> None:
        ann = await user(address, "ann")
        bob = await user(address, "bob")
        raw = await Raw.client(address)
        first = await raw.answer(protocol.request("listen", "L1", {}, ann))
        assert first["type"] == "reply", first
        second = await raw.answer(protocol.request("listen", "L2", {}, ann))
        assert second["type"] == "error", second
        assert second["code"] == "invalid", second
        async with Client([address], token=bob, timeout=ANSWER_TIMEOUT) as sender:
            message_id = (await sender.send("ann", "once"))["message"]["id"]
        # The push came before the sender's reply: everything before the fence's reply.
        raw.send(protocol.request("status", "fence", {}))
        pushes = [f for f in await frames_until(raw, "fence") if f["type"] == "message"]
        assert [(p["request_id"], p["message"]["id"]) for p in pushes] == [("L1", message_id)]

    scenario(single_node, body)


def test_a_listen_past_the_users_cap_ends_that_users_oldest_stream(
    cluster_factory: ClusterFactory,
) -> None:
    """Every message to a user is pushed to each of the user's streams: one account's
    thousand streams made each send to it a thousand pushes, and a burst of 2,000
    sends silenced the primary past ``suspect_timeout`` (an election). Past
    ``listens_per_user`` a new listen ends the user's oldest stream, as a login past
    ``sessions_per_user`` ends the oldest session; other users' streams do not count."""
    cluster = cluster_factory(n=1, listens_per_user=3)
    cluster.start()
    cluster.wait_for_primary()
    address = cluster.servers[0]

    async def fence(raw: Raw) -> list[tuple[str, str]]:
        raw.send(protocol.request("status", "fence", {}))
        frames = await frames_until(raw, "fence")
        return [(f["request_id"], f["message"]["body"]) for f in frames if f["type"] == "message"]

    async def body() -> None:
        ann, bob, cy = [await user(address, name) for name in ("ann", "bob", "cy")]
        streams = []
        for n in range(4):
            raw = await Raw.client(address)
            reply = await raw.answer(protocol.request("listen", f"L{n}", {}, ann))
            assert reply["type"] == "reply", reply
            streams.append(raw)
        ended = await streams[0].first_answer("the end of ann's oldest stream")
        assert (ended["type"], ended["request_id"], ended["code"]) == ("error", "L0", "refused")
        assert "listens_per_user" in ended["message"], ended
        other = await Raw.client(address)
        assert (await other.answer(protocol.request("listen", "C", {}, cy)))["type"] == "reply"
        async with Client([address], token=bob, timeout=ANSWER_TIMEOUT) as sender:
            await sender.send("ann", "hello")
            await sender.send("cy", "hi")
        assert [await fence(raw) for raw in streams] == [
            [],  # ended: no push, and the connection serves other requests
            [("L1", "hello")],
            [("L2", "hello")],
            [("L3", "hello")],
        ]
        assert await fence(other) == [("C", "hi")]

    scenario(cluster, body)


def test_the_client_library_listens_again_after_giving_up_a_stream(single_node: Cluster) -> None:
    """``Client.listen`` closes the connection of a stream it gives up, so listening
    again through the same client is not a second listen on that connection."""
    address = single_node.servers[0]

    async def body() -> None:
        ann = await user(address, "ann")
        bob = await user(address, "bob")
        async with (
            Client([address], token=ann, timeout=ANSWER_TIMEOUT) as listener,
            Client([address], token=bob, timeout=ANSWER_TIMEOUT) as sender,
        ):
            first_stream = listener.listen()
            await sender.send("ann", "one")
            first = await anext(first_stream)
            await first_stream.aclose()
            assert (await listener.whoami())["user"] == "ann"  # the client goes on
            second_stream = listener.listen(after=first["id"])
            await sender.send("ann", "two")
            second = await anext(second_stream)
            await second_stream.aclose()
        assert (first["body"], second["body"]) == ("one", "two")

    scenario(single_node, body)


# ---- redirects and status ------------------------------------------------------------------


def test_an_electing_node_answers_not_primary_with_a_null_primary(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory(n=3)
    cluster.start(ids=[1])  # a fresh cluster elects only once every node is there
    address = cluster.servers[0]

    async def body() -> None:
        raw = await Raw.connect(address)
        raw.send(protocol.client_hello(protocol.PROTOCOL_MAX_VERSION))
        welcome = await raw.first_answer("the hello")
        assert welcome["role"] == "electing", welcome
        assert welcome["primary"] is None, welcome
        for op in ("whoami", "send", "register"):
            answer = await raw.answer(protocol.request(op, f"e-{op}", {}))
            assert answer["type"] == "error", answer
            assert answer["code"] == "not_primary", answer
            assert answer["primary"] is None, answer
            assert answer["retriable"] is True, answer
        status = await raw.answer(protocol.request("status", "e-status", {}))
        assert status["result"]["node"]["role"] == "electing", status

    scenario(cluster, body)


def _documented_status_fields() -> set[str]:
    """The field names of the ``status`` table of PROTOCOL.md section 6."""
    text = PROTOCOL_MD.read_text()
    start = text.index("**status**")
    table = text[start : text.index("\n\n", text.index("| field |", start))]
    return set(re.findall(r"^ *\| `([a-z_]+)` \|", table, re.MULTILINE))


def test_status_has_exactly_the_documented_fields(single_node: Cluster) -> None:
    address = single_node.servers[0]

    async def body() -> None:
        raw = await Raw.client(address)
        reply = await raw.answer(protocol.request("status", "st", {}))
        fields = set(reply["result"]["node"])
        # ``arbiter`` is there only with arbiter = etcd (tests/cluster/test_arbiter_status.py).
        documented = _documented_status_fields() - {"arbiter"}
        assert fields == documented, (
            f"undocumented: {sorted(fields - documented)}; "
            f"documented but absent: {sorted(documented - fields)}"
        )

    scenario(single_node, body)


LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} (INFO|WARNING|ERROR) [a-z][a-z -]* [a-z_]+=\S"
)


def test_log_lines_have_the_form_the_readme_shows(single_node: Cluster) -> None:
    readme = (PROTOCOL_MD.parents[1] / "README.md").read_text()
    example = readme[readme.index("one line per event: ") :]
    example = example[example.index("```\n") + 4 : example.index("\n```", example.index("```\n"))]
    for line in example.splitlines():
        assert LOG_LINE.match(line), f"the README's example log line {line!r}"
    became = [line for line in single_node[1].log_text().splitlines() if " became primary " in line]
    assert became, "no 'became primary' line in the node's log"
    assert all(LOG_LINE.match(line) for line in became), became
