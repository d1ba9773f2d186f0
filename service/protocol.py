"""The wire protocol: frames, the hello handshake, and message shapes. No I/O.

Theory of operation
-------------------
A connection carries *frames*: a 4-byte big-endian unsigned length N followed
by N bytes of UTF-8 JSON encoding one object with a string field ``type``.
N is bounded by what the connection is: ``MAX_HELLO_FRAME`` (4 KiB) until the
handshake ends, then the node's ``max_client_frame`` (64 KiB) for a client and
``max_frame`` (8 MiB) for an authenticated peer. A longer length is a protocol
violation, refused from the header alone (the body is never buffered), and the
connection is closed after an error frame. So a stranger can make a node hold
no more than a few KiB, and only the cluster's own nodes may send big frames.

The server speaks first with ``hello`` (its version range and a random
nonce). The dialer answers with ``hello`` naming the version it chose and its
role: ``client`` for users, ``peer`` for another node, which must prove it
holds the cluster secret with an HMAC over the server's nonce. The server
answers ``welcome`` (for a peer, with its own HMAC over the dialer's nonce, so
both sides are authenticated) or an error frame, and closes on error.

After the handshake a client sends ``request`` frames, each with a
client-chosen ``request_id`` that the reply echoes. For writes the request id
is also the idempotency key: a retry with the same id returns the first
result. Replies are ``reply`` or ``error`` frames; a ``listen`` request is
followed by any number of ``message`` frames carrying the same request id.

Binary frames (peers only). A peer link whose handshake settled on peer version
2 or later (``PEER_VERSION``: the dialer's hello offers its highest, the welcome
names the one both speak; a node that names none speaks 1) may also carry
*binary frames*, for the bulk of replication: records and snapshot chunks as raw
bytes, with no base64 nor JSON escaping to pay on either side. Their body is the
byte 0x00 (which no JSON text starts with), a 4-byte big-endian length J, J
bytes of a JSON object as above (the frame without its bulk), then the frame's
*payload*, raw bytes to the end of the body; decoded, the frame is that object
with ``payload`` set to the bytes. The same length limits apply. On any other
connection a binary frame is a protocol violation.

The full text, with every operation and error code, is ``PROTOCOL.md``.

Invariants
----------
* ``FrameDecoder`` never raises for a short read: it buffers until a frame is
  whole, so input split at any offset decodes to the same frames.
* A length over the decoder's limit raises as soon as its 4 header bytes are
  in, so at most ``max_frame`` + 4 bytes of one frame are ever held.
* ``pop`` decodes one frame at a time, so a reader may change the limit
  between two frames (at the end of the handshake) and the new limit applies
  to every frame after it, however TCP split them.
* A decoded frame's ``payload`` is ``bytes`` only if it came in a binary frame
  (JSON holds no bytes), so the bulk of a message is found in one place.
* Decoding bad bytes raises ``ProtocolViolation`` (the peer broke the
  protocol); encoding a bad object raises ``TypeError`` (we did).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass
from typing import Any

import orjson

from .errors import FrameTooLarge, ProtocolViolation

PROTOCOL_MIN_VERSION = 1
PROTOCOL_MAX_VERSION = 1
# The highest version of the node-to-node protocol this node speaks (PROTOCOL.md 2.3):
# 1, every frame JSON; 2, ``append`` and ``snapshot`` frames binary.
PEER_VERSION = 2
SERVICE_NAME = "replicated-chat"
DEFAULT_MAX_FRAME = 8 * 1024 * 1024
# Before the handshake ends nobody is known: a hello is about 250 bytes.
MAX_HELLO_FRAME = 4 * 1024
HEADER = struct.Struct(">I")
# A binary frame's body starts with the marker byte and the length of its JSON part.
BINARY_MARKER = 0
BINARY_HEADER = struct.Struct(">BI")
PAYLOAD = "payload"

Frame = dict[str, Any]


@dataclass(frozen=True)
class Op:
    """What the protocol says of one client operation (PROTOCOL.md sections 4 and 7)."""

    # Replicated through the primary's log and idempotent by request id; else a read,
    # which changes nothing a user can see (``read`` marks what it shows through a
    # ``mark_read``, and a read may move its session's idle clock through ``touch``).
    write: bool
    # Needs a session token.
    session: bool = True
    # Ends the session it runs in (and a stream listening on it): its retry replays
    # even though that session has ended.
    ends_session: bool = False


# Every client operation: the one list of op names. The others derive from it, and
# the unit tests hold chat's handlers, the server's dispatch and PROTOCOL.md to it.
OPS: dict[str, Op] = {
    "register": Op(write=True, session=False),
    "login": Op(write=True, session=False),
    "logout": Op(write=True, ends_session=True),
    "whoami": Op(write=False),
    "search": Op(write=False),
    "send": Op(write=True),
    "read": Op(write=False),
    "mark_read": Op(write=True),
    "delete_messages": Op(write=True),
    "delete_account": Op(write=True, ends_session=True),
    "touch": Op(write=True),
    "listen": Op(write=False),
    "status": Op(write=False, session=False),
}
CLIENT_OPS = frozenset(OPS)
WRITE_OPS = frozenset(name for name, op in OPS.items() if op.write)
READ_OPS = CLIENT_OPS - WRITE_OPS
SESSION_ENDING_OPS = frozenset(name for name, op in OPS.items() if op.ends_session)
MAX_REQUEST_ID = 64
# Requests of one client connection that a node holds unanswered at once (a listen
# until its ``listening`` reply); one more is refused (PROTOCOL.md section 3).
MAX_IN_FLIGHT = 256


def encode_frame(frame: Frame) -> bytes:
    """Serialise one frame; raises TypeError if it is not JSON-encodable. A frame
    whose ``payload`` is bytes becomes a binary frame (for a peer link of version 2)."""
    if not isinstance(frame.get("type"), str):
        raise TypeError("a frame needs a string 'type'")
    payload = frame.get(PAYLOAD)
    if isinstance(payload, bytes):
        head = orjson.dumps({k: v for k, v in frame.items() if k != PAYLOAD})
        size = BINARY_HEADER.size + len(head) + len(payload)
        return b"".join(
            (HEADER.pack(size), BINARY_HEADER.pack(BINARY_MARKER, len(head)), head, payload)
        )
    body = orjson.dumps(frame)
    return HEADER.pack(len(body)) + body


def decode_binary_body(body: bytes) -> Frame:
    """The frame a binary body holds: its JSON part, with ``payload`` the rest."""
    if len(body) < BINARY_HEADER.size:
        raise ProtocolViolation("binary frame shorter than its header")
    marker, head = BINARY_HEADER.unpack_from(body)
    end = BINARY_HEADER.size + head
    if marker != BINARY_MARKER or end > len(body):
        raise ProtocolViolation("binary frame with a bad header")
    frame = decode_body(body[BINARY_HEADER.size : end])
    frame[PAYLOAD] = body[end:]
    return frame


def decode_body(body: bytes) -> Frame:
    # orjson is strict RFC 8259: it refuses invalid UTF-8, lone surrogates (which no
    # UTF-8 string, nor SQLite, nor a client in another language can hold), NaN and
    # Infinity, nesting deeper than 1024, and integers too long for a double.
    try:
        frame = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ProtocolViolation("frame is not valid UTF-8 JSON (RFC 8259)") from None
    if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
        raise ProtocolViolation("frame is not a JSON object with a string 'type'")
    return frame


class FrameDecoder:
    """Bytes in, frames out. Keeps partial input between calls. ``binary``: binary
    frames are accepted too (a peer link of version 2)."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, binary: bool = False) -> None:
        self.max_frame = max_frame
        self.binary = binary
        self._buffer = bytearray()
        self._error: ProtocolViolation | None = None

    def feed(self, data: bytes) -> list[Frame]:
        """Frames completed by ``data``. A bad frame raises, but only after the good
        frames before it were returned (on the next call), so how TCP split the
        bytes never changes which frames are served."""
        if self._error is not None:
            raise copy.copy(self._error)
        self.push(data)
        frames: list[Frame] = []
        try:
            while (frame := self.pop()) is not None:
                frames.append(frame)
        except ProtocolViolation:
            if not frames:
                raise
        return frames

    def push(self, data: bytes) -> None:
        """Buffer ``data`` without decoding anything (see ``pop``)."""
        self._buffer += data

    def pop(self) -> Frame | None:
        """The next whole frame, or None until more bytes come. A bad frame raises,
        and so does every later call: the stream cannot be resynchronised."""
        if self._error is not None:
            raise copy.copy(self._error)
        try:
            return self._pop()
        except ProtocolViolation as exc:
            # The stream cannot be resynchronised: what is buffered is of no use. The
            # error kept for later calls is a copy, without this call's traceback: its
            # frames hold this decoder, a cycle that only the garbage collector's
            # rare full pass frees, and with it the buffer and the connection's
            # reader (some 0.75 MB a refused connection: 15 MB more after every
            # twenty that declared too large a frame).
            self._buffer = bytearray()
            self._error = copy.copy(exc)
            raise

    def _pop(self) -> Frame | None:
        if len(self._buffer) < HEADER.size:
            return None
        (length,) = HEADER.unpack_from(self._buffer)
        if length > self.max_frame:
            raise FrameTooLarge(f"frame of {length} bytes exceeds the maximum of {self.max_frame}")
        end = HEADER.size + length
        if len(self._buffer) < end:
            return None
        with memoryview(self._buffer) as view:
            body = bytes(view[HEADER.size : end])
        del self._buffer[:end]
        if body[:1] == b"\x00":
            if not self.binary:
                raise ProtocolViolation("binary frame on a link that did not agree to them")
            return decode_binary_body(body)
        return decode_body(body)

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buffer)


# ---- handshake ---------------------------------------------------------------------


def new_nonce() -> str:
    return secrets.token_hex(16)


def server_hello(node_id: int, nonce: str) -> Frame:
    return {
        "type": "hello",
        "service": SERVICE_NAME,
        "min_version": PROTOCOL_MIN_VERSION,
        "max_version": PROTOCOL_MAX_VERSION,
        "node": node_id,
        "nonce": nonce,
    }


def choose_version(hello: Frame) -> int:
    """The version a dialer uses with a server that sent ``hello``."""
    if hello.get("type") != "hello" or hello.get("service") != SERVICE_NAME:
        raise ProtocolViolation("the server did not greet with a chat hello")
    low, high = hello.get("min_version"), hello.get("max_version")
    if not isinstance(low, int) or not isinstance(high, int):
        raise ProtocolViolation("hello without a version range")
    version = min(high, PROTOCOL_MAX_VERSION)
    if version < max(low, PROTOCOL_MIN_VERSION):
        raise ProtocolViolation(f"no common protocol version (server speaks {low}..{high})")
    return version


def client_hello(version: int) -> Frame:
    return {"type": "hello", "version": version, "role": "client"}


def peer_mac(secret: bytes, purpose: str, nonce: str, sender: int, receiver: int) -> str:
    message = f"{purpose}|{nonce}|{sender}|{receiver}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def peer_hello(
    version: int, secret: bytes, server_nonce: str, me: int, server: int, my_nonce: str
) -> Frame:
    return {
        "type": "hello",
        "version": version,
        "role": "peer",
        "node": me,
        "nonce": my_nonce,
        "mac": peer_mac(secret, "peer-hello", server_nonce, me, server),
        "peer_version": PEER_VERSION,
    }


def peer_version_of(frame: Frame) -> int:
    """The peer version a hello offers or a welcome settles: 1 when it names none
    (a node from before peer versions); raises ProtocolViolation for a bad one."""
    version = frame.get("peer_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ProtocolViolation("'peer_version' must be an integer from 1")
    return version


def check_peer_hello(frame: Frame, secret: bytes, server_nonce: str, me: int) -> int:
    """Return the dialing node's id if its MAC proves it holds the cluster secret."""
    node, mac = frame.get("node"), frame.get("mac")
    if not isinstance(node, int) or not isinstance(mac, str):
        raise ProtocolViolation("peer hello needs 'node' and 'mac'")
    expected = peer_mac(secret, "peer-hello", server_nonce, node, me)
    if not hmac.compare_digest(mac, expected):
        raise ProtocolViolation("peer hello failed authentication")
    if not isinstance(frame.get("nonce"), str):
        raise ProtocolViolation("peer hello needs a 'nonce'")
    return node


def check_peer_welcome(frame: Frame, secret: bytes, my_nonce: str, me: int, server: int) -> None:
    mac = frame.get("mac")
    expected = peer_mac(secret, "peer-welcome", my_nonce, server, me)
    if frame.get("type") != "welcome" or not isinstance(mac, str):
        raise ProtocolViolation("peer was not welcomed")
    if not hmac.compare_digest(mac, expected):
        raise ProtocolViolation("peer welcome failed authentication")


# ---- client frames -----------------------------------------------------------------


def request(op: str, request_id: str, args: dict[str, Any], token: str | None = None) -> Frame:
    frame: Frame = {"type": "request", "request_id": request_id, "op": op, "args": args}
    if token is not None:
        frame["token"] = token
    return frame


def reply(request_id: str, result: dict[str, Any]) -> Frame:
    return {"type": "reply", "request_id": request_id, "result": result}


def error(request_id: str | None, body: dict[str, Any]) -> Frame:
    return {"type": "error", "request_id": request_id, **body}


def event(request_id: str, message: dict[str, Any]) -> Frame:
    return {"type": "message", "request_id": request_id, "message": message}


def request_id_of(frame: Frame) -> str:
    """The request id of a client's frame after the handshake. A frame that is not a
    request, or has no usable id, cannot be answered as a request: the node treats
    it as a protocol violation of the connection (error with a null id, then close)."""
    if frame.get("type") != "request":
        raise ProtocolViolation(f"unexpected frame type {frame.get('type')!r}")
    request_id = frame.get("request_id")
    if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_REQUEST_ID:
        raise ProtocolViolation("request_id must be a string of 1 to 64 characters")
    return request_id


def parse_request(frame: Frame) -> tuple[str, str, dict[str, Any], str | None]:
    """Validate the envelope of a client request: (request_id, op, args, token).

    ``args`` and ``token`` are optional: omitted or null, as optional arguments are
    (PROTOCOL.md section 3)."""
    request_id = request_id_of(frame)
    op = frame.get("op")
    if not isinstance(op, str):
        raise ProtocolViolation("request needs a string 'op'")
    args = frame.get("args")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ProtocolViolation("'args' must be an object")
    token = frame.get("token")
    if token is not None and not isinstance(token, str):
        raise ProtocolViolation("'token' must be a string")
    return request_id, op, args, token


# ---- binary fields -----------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise ProtocolViolation("expected a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise ProtocolViolation("invalid base64") from None
