"""The wire codec of ``service/protocol.py``: frames, handshake, envelopes, peer messages.

Everything here is pure: bytes in, frames out (or ``ProtocolViolation``), with
no socket. The rules checked are the ones ``service/PROTOCOL.md`` states:

* a frame is a 4-byte big-endian length and that many bytes of UTF-8 JSON
  encoding one object with a string ``type`` (RFC 8259 JSON: no ``NaN``);
* the decoder buffers, so input split at any offset gives the same frames;
* whatever the peer sends, decoding raises ``ProtocolViolation`` or nothing
  (a length over ``max_frame`` raises ``FrameTooLarge`` before the body
  arrives); encoding something that is not a frame raises ``TypeError``;
* the handshake authenticates peers with an HMAC over the other side's nonce;
* request envelopes and peer messages are checked field by field, and a JSON
  ``true`` is never an integer.

The property-based tests (hypothesis) feed random bytes and random frames in
random chunkings; the explicit cases name inputs a random search rarely finds.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service import protocol
from service.errors import FrameTooLarge, ProtocolViolation
from service.replication import messages
from service.replication.types import LogRecord, Position

SECRET = b"0123456789abcdef0123456789abcdef"
OTHER_SECRET = b"fedcba9876543210fedcba9876543210"


def framed(body: bytes) -> bytes:
    """A frame around raw body bytes, valid or not."""
    return protocol.HEADER.pack(len(body)) + body


def decode_all(data: bytes, max_frame: int = protocol.DEFAULT_MAX_FRAME) -> list[protocol.Frame]:
    decoder = protocol.FrameDecoder(max_frame)
    frames = decoder.feed(data)
    assert decoder.pending == 0, "a whole stream left bytes behind"
    return frames


SAMPLE_FRAMES: list[protocol.Frame] = [
    {"type": "x"},
    {"type": "hello", "version": 1, "role": "client"},
    {"type": "request", "request_id": "r1", "op": "send", "args": {"to": "bob", "body": "héllo ✓"}},
    {"type": "reply", "request_id": "r1", "result": {"ids": [1, 2, 3], "more": False, "n": None}},
    {"type": "ünïcode 🙂", "nested": {"a": [{"b": -1.5}, '\n\t"\\']}},
]
SAMPLE_STREAM = b"".join(protocol.encode_frame(frame) for frame in SAMPLE_FRAMES)


# ---- encode and decode -----------------------------------------------------------------


def test_the_documented_example_frame_is_byte_exact() -> None:
    expected = bytes.fromhex("0000000c 7b2274797065223a2278227d")
    assert protocol.encode_frame({"type": "x"}) == expected
    assert decode_all(expected) == [{"type": "x"}]


def test_encoding_writes_compact_json_and_raw_utf8() -> None:
    data = protocol.encode_frame({"type": "x", "s": "é"})
    assert data[4:] == '{"type":"x","s":"é"}'.encode()
    (length,) = protocol.HEADER.unpack(data[:4])
    assert length == len(data) - 4, "the length counts body bytes, not characters"


@pytest.mark.parametrize("frame", SAMPLE_FRAMES, ids=lambda f: str(f["type"]))
def test_a_frame_round_trips(frame: protocol.Frame) -> None:
    assert decode_all(protocol.encode_frame(frame)) == [frame]


def test_several_frames_in_one_feed_come_out_in_order() -> None:
    assert decode_all(SAMPLE_STREAM) == SAMPLE_FRAMES


def test_the_decoder_accepts_any_json_formatting_and_escapes() -> None:
    body = b' \r\n{ "type" :\t"\\u0078" , "s": "\\u00e9\\ud83d\\ude42" }\n '
    assert decode_all(framed(body)) == [{"type": "x", "s": "é🙂"}]


def test_an_empty_feed_gives_no_frame() -> None:
    decoder = protocol.FrameDecoder()
    assert decoder.feed(b"") == []
    assert decoder.pending == 0


def test_input_split_at_any_offset_gives_the_same_frames() -> None:
    for offset in range(len(SAMPLE_STREAM) + 1):
        decoder = protocol.FrameDecoder()
        frames = decoder.feed(SAMPLE_STREAM[:offset])
        whole = sum(len(protocol.encode_frame(frame)) for frame in frames)
        # Complete frames come out at once; only the incomplete one is held back.
        assert decoder.pending == offset - whole, offset
        frames += decoder.feed(SAMPLE_STREAM[offset:])
        assert frames == SAMPLE_FRAMES, offset
        assert decoder.pending == 0, offset


def test_input_split_at_every_pair_of_offsets_gives_the_same_frames() -> None:
    stream = b"".join(protocol.encode_frame(frame) for frame in SAMPLE_FRAMES[:3])
    for first in range(len(stream) + 1):
        for second in range(first, len(stream) + 1):
            decoder = protocol.FrameDecoder()
            frames = decoder.feed(stream[:first])
            frames += decoder.feed(stream[first:second])
            frames += decoder.feed(stream[second:])
            assert frames == SAMPLE_FRAMES[:3], (first, second)


def test_input_fed_one_byte_at_a_time_gives_the_same_frames() -> None:
    decoder = protocol.FrameDecoder()
    frames: list[protocol.Frame] = []
    for index in range(len(SAMPLE_STREAM)):
        frames += decoder.feed(SAMPLE_STREAM[index : index + 1])
    assert frames == SAMPLE_FRAMES


# ---- malformed frames ------------------------------------------------------------------

MALFORMED_BODIES: dict[str, bytes] = {
    "empty body": b"",
    "not json": b"hello there",
    "truncated json": b'{"type": "x"',
    "trailing garbage": b'{"type": "x"} x',
    "two objects in one body": b'{"type":"x"}{"type":"y"}',
    "invalid utf-8": b'{"type": "\xff\xfe"}',
    "overlong utf-8 encoding": b'{"type": "\xc0\xaf"}',
    "utf-8 encoded surrogate": b'{"type": "\xed\xa0\x80"}',
    "utf-16 body": '{"type": "x"}'.encode("utf-16-le"),
    "utf-16 body with a byte order mark": '{"type": "x"}'.encode("utf-16"),
    "utf-32 body": '{"type": "x"}'.encode("utf-32"),
    "array": b'[{"type": "x"}]',
    "string": b'"x"',
    "number": b"42",
    "null": b"null",
    "no type": b'{"kind": "x"}',
    "type is a number": b'{"type": 1}',
    "type is null": b'{"type": null}',
    "type is true": b'{"type": true}',
    "type is a list": b'{"type": ["x"]}',
    "type is an object": b'{"type": {"x": 1}}',
    "NaN is not json": b'{"type": "x", "n": NaN}',
    "Infinity is not json": b'{"type": "x", "n": -Infinity}',
    "lone high surrogate escape": b'{"type": "x", "s": "\\ud800"}',
    "lone low surrogate escape": b'{"type": "\\udfff"}',
    "number too long to convert": b'{"type": "x", "n": ' + b"7" * 5000 + b"}",
    "nesting too deep": b'{"type": "x", "n": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
}


@pytest.mark.parametrize("body", MALFORMED_BODIES.values(), ids=MALFORMED_BODIES.keys())
def test_a_malformed_frame_is_a_protocol_violation(body: bytes) -> None:
    with pytest.raises(ProtocolViolation) as info:
        protocol.FrameDecoder().feed(framed(body))
    assert info.value.code == "protocol"


@pytest.mark.parametrize("name", ["not json", "array", "no type", "invalid utf-8"])
def test_a_malformed_frame_is_refused_after_a_good_one(name: str) -> None:
    decoder = protocol.FrameDecoder()
    assert decoder.feed(protocol.encode_frame({"type": "ok"})) == [{"type": "ok"}]
    with pytest.raises(ProtocolViolation):
        decoder.feed(framed(MALFORMED_BODIES[name]))


def test_a_length_over_the_maximum_raises_before_the_body_arrives() -> None:
    decoder = protocol.FrameDecoder(max_frame=100)
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(protocol.HEADER.pack(101))  # the header alone, no body byte
    assert info.value.code == "too_large"
    assert isinstance(info.value, ProtocolViolation)


def test_a_length_over_the_maximum_raises_once_the_header_is_whole() -> None:
    decoder = protocol.FrameDecoder(max_frame=100)
    header = protocol.HEADER.pack(1000)
    assert decoder.feed(header[:3]) == []
    with pytest.raises(FrameTooLarge):
        decoder.feed(header[3:])


@pytest.mark.parametrize("length", [protocol.DEFAULT_MAX_FRAME + 1, 0xFFFFFFFF])
def test_the_default_maximum_is_8_mib(length: int) -> None:
    assert protocol.DEFAULT_MAX_FRAME == 8 * 1024 * 1024
    with pytest.raises(FrameTooLarge):
        protocol.FrameDecoder().feed(protocol.HEADER.pack(length))


def test_a_length_of_exactly_the_maximum_waits_for_its_body() -> None:
    body = b'{"type":"x","pad":"' + b"a" * 80 + b'"}'
    decoder = protocol.FrameDecoder(max_frame=len(body))
    assert decoder.feed(framed(body)[:50]) == []
    assert decoder.pending == 50
    assert decoder.feed(framed(body)[50:]) == [json.loads(body)]


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "x", "v": object()},
        {"type": "x", "v": {1, 2}},
        {"type": "x", "v": b"bytes"},
        {"type": "x", "v": "lone \ud800 surrogate"},
        {"type": 1},
        {"type": None},
        {"kind": "x"},
    ],
    ids=[
        "object",
        "set",
        "bytes",
        "lone surrogate",
        "type not a string",
        "type null",
        "no type",
    ],
)
def test_encoding_something_that_is_not_a_frame_raises_type_error(frame: Any) -> None:
    with pytest.raises(TypeError):
        protocol.encode_frame(frame)


def test_non_finite_floats_are_encoded_as_null_so_the_output_stays_json() -> None:
    encoded = protocol.encode_frame({"type": "x", "v": float("nan"), "w": float("inf")})
    assert json.loads(encoded[4:]) == {"type": "x", "v": None, "w": None}


# ---- handshake -------------------------------------------------------------------------


def test_server_hello_names_the_service_versions_node_and_nonce() -> None:
    nonce = protocol.new_nonce()
    hello = protocol.server_hello(3, nonce)
    assert hello == {
        "type": "hello",
        "service": "replicated-chat",
        "min_version": protocol.PROTOCOL_MIN_VERSION,
        "max_version": protocol.PROTOCOL_MAX_VERSION,
        "node": 3,
        "nonce": nonce,
    }
    assert decode_all(protocol.encode_frame(hello)) == [hello]


def test_nonces_are_32_fresh_hex_digits() -> None:
    nonces = {protocol.new_nonce() for _ in range(100)}
    assert len(nonces) == 100
    assert all(len(n) == 32 for n in nonces)
    assert all(int(n, 16) >= 0 for n in nonces)


def test_choose_version_picks_the_highest_common_version() -> None:
    hello = protocol.server_hello(1, protocol.new_nonce())
    assert protocol.choose_version(hello) == protocol.PROTOCOL_MAX_VERSION
    newer = {**hello, "max_version": protocol.PROTOCOL_MAX_VERSION + 5}
    assert protocol.choose_version(newer) == protocol.PROTOCOL_MAX_VERSION
    assert protocol.client_hello(1) == {"type": "hello", "version": 1, "role": "client"}


_HELLO = protocol.server_hello(1, "0" * 32)


@pytest.mark.parametrize(
    "hello",
    [
        {**_HELLO, "min_version": protocol.PROTOCOL_MAX_VERSION + 1, "max_version": 99},
        {**_HELLO, "min_version": 0, "max_version": protocol.PROTOCOL_MIN_VERSION - 1},
        {**_HELLO, "min_version": 3, "max_version": 2},
        {**_HELLO, "type": "welcome"},
        {**_HELLO, "service": "some-other-service"},
        {k: v for k, v in _HELLO.items() if k != "service"},
        {k: v for k, v in _HELLO.items() if k != "max_version"},
        {**_HELLO, "min_version": "1", "max_version": "1"},
        {**_HELLO, "min_version": None},
    ],
    ids=[
        "server only newer",
        "server only older",
        "empty range",
        "not a hello",
        "not a chat node",
        "no service",
        "no max version",
        "versions as strings",
        "null version",
    ],
)
def test_choose_version_refuses_a_hello_without_a_common_version(hello: protocol.Frame) -> None:
    with pytest.raises(ProtocolViolation):
        protocol.choose_version(hello)


def peer_hello_from(
    node: int, to: int, server_nonce: str, secret: bytes = SECRET
) -> protocol.Frame:
    return protocol.peer_hello(1, secret, server_nonce, node, to, "c" * 32)


def test_a_peer_hello_with_the_secret_is_accepted() -> None:
    nonce = protocol.new_nonce()
    hello = peer_hello_from(2, 1, nonce)
    assert hello["role"] == "peer"
    assert hello["version"] == 1
    assert protocol.check_peer_hello(hello, SECRET, nonce, me=1) == 2


def test_a_peer_hello_survives_the_wire() -> None:
    nonce = protocol.new_nonce()
    [hello] = decode_all(protocol.encode_frame(peer_hello_from(2, 1, nonce)))
    assert protocol.check_peer_hello(hello, SECRET, nonce, me=1) == 2


def _tampered(mac: str) -> str:
    return ("0" if mac[0] != "0" else "1") + mac[1:]


@pytest.mark.parametrize(
    "case",
    [
        "wrong secret",
        "meant for another node",
        "another connection's nonce",
        "tampered mac",
        "mac in upper case",
        "claims another sender",
        "no mac",
        "mac not a string",
        "no node",
        "node as a string",
        "no nonce",
        "nonce not a string",
    ],
)
def test_a_bad_peer_hello_is_refused(case: str) -> None:
    nonce = protocol.new_nonce()
    hello = peer_hello_from(2, 1, nonce)
    if case == "wrong secret":
        hello = peer_hello_from(2, 1, nonce, OTHER_SECRET)
    elif case == "meant for another node":
        hello = peer_hello_from(2, 3, nonce)
    elif case == "another connection's nonce":
        hello = peer_hello_from(2, 1, protocol.new_nonce())
    elif case == "tampered mac":
        hello["mac"] = _tampered(hello["mac"])
    elif case == "mac in upper case":
        hello["mac"] = hello["mac"].upper()
    elif case == "claims another sender":
        hello["node"] = 3
    elif case == "no mac":
        del hello["mac"]
    elif case == "mac not a string":
        hello["mac"] = 12345
    elif case == "no node":
        del hello["node"]
    elif case == "node as a string":
        hello["node"] = "2"
    elif case == "no nonce":
        del hello["nonce"]
    elif case == "nonce not a string":
        hello["nonce"] = 7
    with pytest.raises(ProtocolViolation):
        protocol.check_peer_hello(hello, SECRET, nonce, me=1)


def welcome_from(server: int, to: int, dialer_nonce: str, secret: bytes = SECRET) -> protocol.Frame:
    mac = protocol.peer_mac(secret, "peer-welcome", dialer_nonce, server, to)
    return {"type": "welcome", "version": 1, "node": server, "mac": mac}


def test_a_peer_welcome_with_the_secret_is_accepted() -> None:
    nonce = protocol.new_nonce()
    protocol.check_peer_welcome(welcome_from(1, 2, nonce), SECRET, nonce, me=2, server=1)


@pytest.mark.parametrize(
    "case",
    [
        "wrong secret",
        "from another node",
        "for another node",
        "another connection's nonce",
        "tampered mac",
        "the hello's mac reflected",
        "not a welcome",
        "no mac",
        "mac not a string",
    ],
)
def test_a_bad_peer_welcome_is_refused(case: str) -> None:
    nonce = protocol.new_nonce()
    welcome = welcome_from(1, 2, nonce)
    if case == "wrong secret":
        welcome = welcome_from(1, 2, nonce, OTHER_SECRET)
    elif case == "from another node":
        welcome = welcome_from(3, 2, nonce)
    elif case == "for another node":
        welcome = welcome_from(1, 3, nonce)
    elif case == "another connection's nonce":
        welcome = welcome_from(1, 2, protocol.new_nonce())
    elif case == "tampered mac":
        welcome["mac"] = _tampered(welcome["mac"])
    elif case == "the hello's mac reflected":
        # A server that merely echoes a hello-style MAC has not proven anything.
        welcome["mac"] = protocol.peer_mac(SECRET, "peer-hello", nonce, 1, 2)
    elif case == "not a welcome":
        welcome["type"] = "hello"
    elif case == "no mac":
        del welcome["mac"]
    elif case == "mac not a string":
        welcome["mac"] = None
    with pytest.raises(ProtocolViolation):
        protocol.check_peer_welcome(welcome, SECRET, nonce, me=2, server=1)


def test_peer_macs_bind_purpose_nonce_sender_and_receiver() -> None:
    base = ("peer-hello", "n" * 32, 1, 2)
    mac = protocol.peer_mac(SECRET, *base)
    assert len(mac) == 64
    assert int(mac, 16) >= 0
    variants = [
        ("peer-welcome", "n" * 32, 1, 2),
        ("peer-hello", "m" * 32, 1, 2),
        ("peer-hello", "n" * 32, 2, 1),
        ("peer-hello", "n" * 32, 1, 3),
    ]
    assert all(protocol.peer_mac(SECRET, *variant) != mac for variant in variants)
    assert protocol.peer_mac(OTHER_SECRET, *base) != mac


# ---- client request envelopes ----------------------------------------------------------


def test_a_request_envelope_parses() -> None:
    frame = protocol.request("send", "r" * 64, {"to": "bob"}, token="t0k")
    assert protocol.parse_request(frame) == ("r" * 64, "send", {"to": "bob"}, "t0k")


def test_args_and_token_may_be_omitted_or_null() -> None:
    frame = {"type": "request", "request_id": "1", "op": "status"}
    assert protocol.parse_request(frame) == ("1", "status", {}, None)
    assert protocol.parse_request({**frame, "token": None}) == ("1", "status", {}, None)
    assert protocol.parse_request({**frame, "args": None}) == ("1", "status", {}, None)


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "hello", "version": 1, "role": "client"},
        {"type": "bogus"},
        {"type": "request", "op": "status"},
        {"type": "request", "request_id": "", "op": "status"},
        {"type": "request", "request_id": "r" * 65, "op": "status"},
        {"type": "request", "request_id": 7, "op": "status"},
    ],
    ids=["a second hello", "an unknown type", "no id", "an empty id", "a 65-character id", "7"],
)
def test_a_frame_without_a_request_id_to_answer_under_is_a_violation(
    frame: protocol.Frame,
) -> None:
    with pytest.raises(ProtocolViolation):
        protocol.request_id_of(frame)


def test_a_usable_request_id_is_found_even_when_the_rest_is_malformed() -> None:
    frame = {"type": "request", "request_id": "r1", "op": 7, "args": [1]}
    assert protocol.request_id_of(frame) == "r1"


def test_a_request_id_is_counted_in_characters_not_bytes() -> None:
    frame = protocol.request("status", "é" * 64, {})
    assert protocol.parse_request(frame)[0] == "é" * 64


_REQUEST = {"type": "request", "request_id": "abc", "op": "status", "args": {}}


@pytest.mark.parametrize(
    "frame",
    [
        {**_REQUEST, "type": "reply"},
        {**_REQUEST, "type": "hello"},
        {k: v for k, v in _REQUEST.items() if k != "request_id"},
        {**_REQUEST, "request_id": None},
        {**_REQUEST, "request_id": 42},
        {**_REQUEST, "request_id": True},
        {**_REQUEST, "request_id": ["abc"]},
        {**_REQUEST, "request_id": ""},
        {**_REQUEST, "request_id": "r" * 65},
        {k: v for k, v in _REQUEST.items() if k != "op"},
        {**_REQUEST, "op": None},
        {**_REQUEST, "op": 3},
        {**_REQUEST, "op": ["send"]},
        {**_REQUEST, "args": []},
        {**_REQUEST, "args": "to=bob"},
        {**_REQUEST, "args": 1},
        {**_REQUEST, "token": 123},
        {**_REQUEST, "token": True},
        {**_REQUEST, "token": ["t"]},
        {**_REQUEST, "token": {"t": 1}},
    ],
    ids=[
        "a reply",
        "a hello",
        "no request id",
        "null request id",
        "numeric request id",
        "boolean request id",
        "list request id",
        "empty request id",
        "65-character request id",
        "no op",
        "null op",
        "numeric op",
        "list op",
        "list args",
        "string args",
        "numeric args",
        "numeric token",
        "boolean token",
        "list token",
        "object token",
    ],
)
def test_a_malformed_request_envelope_is_a_protocol_violation(frame: protocol.Frame) -> None:
    with pytest.raises(ProtocolViolation) as info:
        protocol.parse_request(frame)
    assert info.value.code == "protocol"


def test_reply_error_and_event_frames_echo_the_request_id() -> None:
    assert protocol.reply("r", {"a": 1}) == {"type": "reply", "request_id": "r", "result": {"a": 1}}
    body = ProtocolViolation("bad").to_wire()
    assert protocol.error(None, body) == {"type": "error", "request_id": None, **body}
    assert protocol.event("L", {"id": 3}) == {
        "type": "message",
        "request_id": "L",
        "message": {"id": 3},
    }


# ---- binary fields ---------------------------------------------------------------------


def test_base64_fields_round_trip_and_refuse_garbage() -> None:
    data = bytes(range(256))
    assert protocol.unb64(protocol.b64(data)) == data
    for bad in ["not base64!", "abc", 123, None, b"AAAA"]:
        with pytest.raises(ProtocolViolation):
            protocol.unb64(bad)


# ---- peer messages ---------------------------------------------------------------------

SYNC_SET = {"version": 1, "members": [1, 2, 3], "epoch": 1, "databases": [[1, "5f0c"]]}

# A minimal valid example of every peer message type.
PEER_EXAMPLES: dict[str, protocol.Frame] = {
    "append": {
        "type": "append",
        "epoch": 2,
        "seq": 10,
        "watermark": 9,
        "records": [[2, 10, protocol.b64(b"changeset")]],
        "sync_set": SYNC_SET,
        "in_sync": [1, 2],
        "echo": 0,
    },
    "ack": {"type": "ack", "epoch": 2, "seq": 10, "ack_no": 4, "join_no": 1, "links": [1, 3]},
    "join": {
        "type": "join",
        "epoch": 2,
        "position": [2, 10],
        "durable": 9,
        "history": [[1, 1], [2, 5]],
        "join_no": 1,
        "database": "5f0c1d2e3a4b5c6d7e8f90a1b2c3d4e5",
        "snapshot": False,
    },
    "join_reply": {
        "type": "join_reply",
        "epoch": 2,
        "diverge": 7,
        "snapshot": False,
        "join_no": 1,
    },
    "snapshot": {
        "type": "snapshot",
        "epoch": 2,
        "position": [2, 10],
        "offset": 0,
        "data": protocol.b64(b"SQLite format 3"),
        "done": True,
        "size": 15,
    },
    "reject": {"type": "reject", "epoch": 3},
    "probe": {"type": "probe", "epoch": 2, "round": 1},
    "probe_reply": {
        "type": "probe_reply",
        "epoch": 2,
        "round": 1,
        "role": "backup",
        "primary": 1,
        "position": [2, 10],
        "eligible": True,
        "sync_set": SYNC_SET,
        "database": "5f0c1d2e3a4b5c6d7e8f90a1b2c3d4e5",
        "unproven": None,
        "fault": None,
    },
    "vote_request": {"type": "vote_request", "epoch": 3, "position": [2, 10], "force": False},
    "vote": {"type": "vote", "epoch": 3, "granted": True, "reason": "up to date"},
    "verify": {"type": "verify", "epoch": 2, "seq": 10, "round": 1},
    "verify_reply": {
        "type": "verify_reply",
        "epoch": 2,
        "seq": 10,
        "round": 1,
        "sums": {"users": "0" * 64},
    },
    "resync": {"type": "resync", "epoch": 2, "why": "its checksums differ"},
    "force_promote": {"type": "force_promote"},
}

# One value of each JSON type (and a bool, which Python counts as an int).
JSON_VALUES: dict[str, object] = {
    "int": 7,
    "float": 7.5,
    "whole float": 7.0,
    "bool": True,
    "str": "7",
    "list": [7],
    "dict": {"n": 7},
    "null": None,
}


def _json_type_allowed(value: object, types: tuple[type, ...]) -> bool:
    """What a schema's field types mean on the wire: an int is never a bool."""
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


def _bad_variants(kind: str, field: str) -> dict[str, protocol.Frame]:
    """The example of ``kind`` with ``field`` missing, and with every JSON type it refuses."""
    example = PEER_EXAMPLES[kind]
    types = messages.WIRE_TYPES[kind][field]
    variants = {}
    if field not in messages.WIRE_DEFAULTS[kind]:
        variants["missing"] = {k: v for k, v in example.items() if k != field}
    for label, value in JSON_VALUES.items():
        if not _json_type_allowed(value, types):
            variants[label] = {**example, field: value}
    return variants


def test_every_peer_message_type_has_an_example() -> None:
    assert PEER_EXAMPLES.keys() == messages.WIRE_TYPES.keys()


@pytest.mark.parametrize("kind", PEER_EXAMPLES)
def test_a_minimal_peer_message_is_accepted(kind: str) -> None:
    frame = PEER_EXAMPLES[kind]
    message = messages.from_wire(frame)
    assert message.to_wire() == frame
    [decoded] = decode_all(protocol.encode_frame(frame))
    assert messages.from_wire(decoded) == message


@pytest.mark.parametrize("kind", PEER_EXAMPLES)
def test_unknown_members_of_a_peer_message_are_ignored(kind: str) -> None:
    frame = {**PEER_EXAMPLES[kind], "added_in_a_later_version": [1, "x"]}
    assert messages.from_wire(frame) == messages.from_wire(PEER_EXAMPLES[kind])


PEER_FIELDS = [(kind, field) for kind, schema in messages.WIRE_TYPES.items() for field in schema]
OPTIONAL_FIELDS = [
    (kind, field) for kind, fields in messages.WIRE_DEFAULTS.items() for field in fields
]


@pytest.mark.parametrize(("kind", "field"), OPTIONAL_FIELDS)
def test_a_field_added_later_may_be_missing_and_takes_its_default(kind: str, field: str) -> None:
    # A node of an earlier version sends the message without it.
    earlier = {k: v for k, v in PEER_EXAMPLES[kind].items() if k != field}
    message = messages.from_wire(earlier)
    assert getattr(message, field) == messages.WIRE_DEFAULTS[kind][field]


def test_only_the_joins_snapshot_request_and_the_snapshots_size_are_optional() -> None:
    assert messages.WIRE_DEFAULTS["join"] == {"snapshot": False}
    assert messages.WIRE_DEFAULTS["snapshot"] == {"size": None}
    assert not [
        kind
        for kind, fields in messages.WIRE_DEFAULTS.items()
        if fields and kind not in ("join", "snapshot")
    ]


@pytest.mark.parametrize(("kind", "field"), PEER_FIELDS, ids=[f"{k}.{f}" for k, f in PEER_FIELDS])
def test_a_peer_message_with_a_missing_or_mistyped_field_is_refused(kind: str, field: str) -> None:
    accepted = []
    for case, frame in _bad_variants(kind, field).items():
        try:
            messages.from_wire(frame)
        except ProtocolViolation:
            continue
        accepted.append(case)
    assert accepted == [], f"{kind}.{field} accepted when {accepted}"


@pytest.mark.parametrize("links", [[1, "2"], [1, True], [1, 2.0], [None]])
def test_an_ack_naming_a_link_that_is_not_a_node_id_is_refused(links: list[object]) -> None:
    # Acks take a shortcut through from_wire (one per backup per record): it must
    # refuse what the general path refuses, down to the members of a list.
    with pytest.raises(ProtocolViolation, match="links"):
        messages.from_wire({**PEER_EXAMPLES["ack"], "links": links})


def test_the_primary_of_a_probe_reply_may_be_unknown() -> None:
    frame = {**PEER_EXAMPLES["probe_reply"], "primary": None}
    assert messages.from_wire(frame).to_wire() == frame


POSITION_KINDS = [kind for kind, schema in messages.WIRE_TYPES.items() if "position" in schema]


@pytest.mark.parametrize(
    "position",
    [[], [2], [2, 10, 1], ["2", 10], [2, None], [2.0, 10], [True, 10], [2, False]],
    ids=[
        "empty",
        "one number",
        "three numbers",
        "string epoch",
        "null seq",
        "float epoch",
        "bool epoch",
        "bool seq",
    ],
)
def test_a_bad_position_is_refused(position: list[object]) -> None:
    assert POSITION_KINDS, "no peer message carries a position any more"
    accepted = []
    for kind in POSITION_KINDS:
        try:
            messages.from_wire({**PEER_EXAMPLES[kind], "position": position})
        except ProtocolViolation:
            continue
        accepted.append(kind)
    assert accepted == [], f"position {position} accepted in {accepted}"


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "appendix", "epoch": 1},
        {"type": "request", "request_id": "r", "op": "status"},
        {"type": None, "epoch": 1},
        {"type": 1},
        {"epoch": 1},
    ],
    ids=["unknown type", "a client request", "null type", "numeric type", "no type"],
)
def test_a_frame_that_is_no_peer_message_is_refused(frame: protocol.Frame) -> None:
    with pytest.raises(ProtocolViolation):
        messages.from_wire(frame)


# ---- properties ------------------------------------------------------------------------

_DECODER_INPUTS = st.one_of(
    st.binary(max_size=300),
    # a well-formed header around random bytes: exercises the body decoding
    st.binary(max_size=200).map(framed),
    # ... and around random text, which is sometimes close to JSON
    st.text(alphabet='{}[]":,0123456789.-eEtrufalsny \\/ux"type', max_size=80).map(
        lambda text: framed(text.encode())
    ),
)


@settings(max_examples=400)
@given(data=_DECODER_INPUTS, max_frame=st.sampled_from([0, 16, 150, protocol.DEFAULT_MAX_FRAME]))
def test_random_bytes_never_raise_anything_but_a_protocol_violation(
    data: bytes, max_frame: int
) -> None:
    decoder = protocol.FrameDecoder(max_frame)
    try:
        frames = decoder.feed(data)
    except ProtocolViolation:
        return
    for frame in frames:
        assert isinstance(frame, dict)
        assert isinstance(frame["type"], str)


_JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
_JSON_VALUES = st.recursive(
    _JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=8,
)
_FRAMES = st.builds(
    lambda members, kind: {**members, "type": kind},
    st.dictionaries(st.text(max_size=10), _JSON_VALUES, max_size=4),
    st.text(max_size=20),
)


@settings(max_examples=150)
@given(frames=st.lists(_FRAMES, max_size=6), data=st.data())
def test_frames_round_trip_through_any_chunking(
    frames: list[protocol.Frame], data: st.DataObject
) -> None:
    stream = b"".join(protocol.encode_frame(frame) for frame in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8), label="cuts"))
    decoder = protocol.FrameDecoder()
    decoded: list[protocol.Frame] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        decoded += decoder.feed(stream[start:end])
    assert decoded == frames
    assert decoder.pending == 0


# ---- binary frames and peer versions ---------------------------------------------------------

RECORDS = [LogRecord(2, 10, b"changeset \x00\xff"), LogRecord(2, 11, b""), LogRecord(3, 12, b"x")]
BULKY: list[messages.Message] = [
    messages.Append(2, 12, 9, RECORDS, messages.sync_set_from_wire(SYNC_SET), (1, 2), 0),
    messages.Append(2, 12, 9, [], messages.sync_set_from_wire(SYNC_SET), (1, 2), -1),
    messages.Snapshot(2, Position(2, 10), 0, b"SQLite format 3\x00", True, 16),
]


def binary_body(frame: protocol.Frame) -> bytes:
    return protocol.encode_frame(frame)[protocol.HEADER.size :]


@pytest.mark.parametrize("message", BULKY, ids=["append", "heartbeat", "snapshot"])
def test_records_and_snapshot_chunks_survive_a_binary_frame_and_json(
    message: messages.Message,
) -> None:
    wire = message.to_wire(binary=True)
    assert isinstance(wire[protocol.PAYLOAD], bytes)
    data = protocol.encode_frame(wire)
    assert data[protocol.HEADER.size] == protocol.BINARY_MARKER
    [frame] = protocol.FrameDecoder(binary=True).feed(data)
    assert messages.from_wire(frame) == message
    # A link of peer version 1 gets the same message as JSON, with base64.
    [frame] = decode_all(protocol.encode_frame(message.to_wire()))
    assert messages.from_wire(frame) == message


def test_a_binary_frame_split_anywhere_decodes_the_same() -> None:
    data = b"".join(protocol.encode_frame(m.to_wire(binary=True)) for m in BULKY)
    for cut in range(len(data) + 1):
        decoder = protocol.FrameDecoder(binary=True)
        frames = decoder.feed(data[:cut]) + decoder.feed(data[cut:])
        assert [messages.from_wire(f) for f in frames] == BULKY


def test_a_binary_frame_is_refused_on_a_link_that_did_not_agree_to_them() -> None:
    data = protocol.encode_frame(BULKY[0].to_wire(binary=True))
    with pytest.raises(ProtocolViolation, match="binary"):
        protocol.FrameDecoder().feed(data)


def test_a_json_payload_is_never_taken_for_a_binary_one() -> None:
    frame = {**BULKY[0].to_wire(), protocol.PAYLOAD: "AAAA"}
    [decoded] = protocol.FrameDecoder(binary=True).feed(protocol.encode_frame(frame))
    assert messages.from_wire(decoded) == BULKY[0]


HEAD = protocol.BINARY_HEADER
APPEND_HEAD = json.dumps({k: v for k, v in PEER_EXAMPLES["append"].items() if k != "records"})


@pytest.mark.parametrize(
    "body",
    [
        b"\x00",
        b"\x00\x00\x00",
        HEAD.pack(0, 100) + b'{"type": "append"}',
        HEAD.pack(0, 5) + b'{"type": "append"}',
        HEAD.pack(0, 2) + b"[]",
        HEAD.pack(0, 0),
        HEAD.pack(0, 4) + b"\xff\xfe{}",
    ],
    ids=[
        "marker alone",
        "header cut short",
        "json part past the end",
        "json part cut",
        "json part not an object",
        "json part empty",
        "json part not utf-8",
    ],
)
def test_a_malformed_binary_frame_is_a_protocol_violation(body: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        protocol.FrameDecoder(binary=True).feed(framed(body))


def _append_with_payload(payload: bytes) -> protocol.Frame:
    head = APPEND_HEAD.encode()
    [frame] = protocol.FrameDecoder(binary=True).feed(
        framed(HEAD.pack(0, len(head)) + head + payload)
    )
    return frame


RECORD = messages.RECORD_HEADER


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00" * (RECORD.size - 1),
        RECORD.pack(2, 10, 5) + b"abcd",
        RECORD.pack(2, 10, 2**32 - 1) + b"abcd",
        RECORD.pack(2, 10, 1) + b"a" + b"\x00",
    ],
    ids=["header cut short", "changeset cut short", "huge length", "trailing byte"],
)
def test_a_binary_append_with_malformed_records_is_a_protocol_violation(payload: bytes) -> None:
    with pytest.raises(ProtocolViolation, match="malformed record"):
        messages.from_wire(_append_with_payload(payload))


@settings(max_examples=300)
@given(payload=st.binary(max_size=200), head=st.sampled_from([APPEND_HEAD, '{"type": "snapshot"}']))
def test_random_binary_payloads_never_raise_anything_but_a_protocol_violation(
    payload: bytes, head: str
) -> None:
    data = head.encode()
    try:
        [frame] = protocol.FrameDecoder(binary=True).feed(
            framed(HEAD.pack(0, len(data)) + data + payload)
        )
        message = messages.from_wire(frame)
    except ProtocolViolation:
        return
    if isinstance(message, messages.Append):
        assert messages.records_to_payload(message.records) == payload


def test_a_hello_without_a_peer_version_speaks_version_1() -> None:
    hello = peer_hello_from(2, 1, protocol.new_nonce())
    assert protocol.peer_version_of(hello) == protocol.PEER_VERSION == 2
    old = {k: v for k, v in hello.items() if k != "peer_version"}
    assert protocol.peer_version_of(old) == 1


@pytest.mark.parametrize("version", [0, -1, "2", 2.0, True, None, [2]])
def test_a_bad_peer_version_is_refused(version: object) -> None:
    with pytest.raises(ProtocolViolation, match="peer_version"):
        protocol.peer_version_of({"type": "welcome", "peer_version": version})
