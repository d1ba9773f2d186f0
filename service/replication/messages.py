"""The node-to-node messages: one frozen dataclass per message, the one place their
shapes are written.

A peer frame is a JSON object whose ``type`` names the message. ``from_wire``
turns a decoded frame into its dataclass or raises ``ProtocolViolation``: every
field present, of its JSON type (an int is never a bool), positions as
``[epoch, seq]`` pairs, lists of the element type they promise. That check runs
once, at the edge (the peer link), so the replication core only ever sees
well-formed messages and dispatches on them with ``match``. ``to_wire`` is the
inverse; ``from_wire(m.to_wire()) == m`` for every message (a unit test and the
simulator, which sends every message through JSON, check it).

A field's type is its wire contract. ``WIRE_TYPES`` derives the JSON types each
field accepts from the annotations, for the protocol tests and for
``PROTOCOL.md``, which documents the same shapes for clients in other languages.
Members a frame carries beyond its fields are ignored (a later version may add
some).

Records and snapshot chunks are the bulk of the peer traffic. On a link of
peer version 2 (``peer.py``) they travel in a binary frame's payload
(``protocol``), raw: the ``records`` of an ``append`` as ``RECORD_HEADER``
(epoch, seq, changeset length) then the changeset's bytes, one record after the
other to the payload's end; the ``data`` of a ``snapshot`` as the payload
itself. On a link of version 1 they are JSON, as they always were: records as
``[epoch, seq, base64 changeset]``, data as base64. ``to_wire(binary)`` writes
either; ``from_wire`` reads both, the payload when the frame came binary, and
refuses a payload that does not split exactly into whole records. Either way an
``Append`` holds ``LogRecord`` values, checked here like every other field.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import struct
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import ProtocolViolation
from ..protocol import PAYLOAD
from .types import LogRecord, Position, SyncSet

Wire = dict[str, Any]


# ---- sync sets on the wire --------------------------------------------------------------


def sync_set_to_wire(sync_set: SyncSet) -> Wire:
    return {
        "version": sync_set.version,
        "members": list(sync_set.members),
        "epoch": sync_set.epoch,
        "databases": [list(pair) for pair in sync_set.databases],
    }


def sync_set_from_wire(data: Wire) -> SyncSet:
    """Lenient by design: a malformed part reads as empty, never as a member."""
    members = data.get("members", [])
    version, epoch = data.get("version", 0), data.get("epoch", 0)
    if not isinstance(members, list) or not all(_is_int(m) for m in members):
        members = []
    databases = data.get("databases", [])
    if not isinstance(databases, list) or not all(
        isinstance(pair, list) and len(pair) == 2 and _is_int(pair[0]) and isinstance(pair[1], str)
        for pair in databases
    ):
        databases = []
    return SyncSet(
        version if _is_int(version) else 0,
        tuple(members),
        epoch if _is_int(epoch) else 0,
        tuple((int(node), str(db)) for node, db in databases),
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---- records on the wire ---------------------------------------------------------------


# A record in a binary payload: epoch, seq, changeset length; then the changeset.
RECORD_HEADER = struct.Struct(">qqI")


def record_to_wire(record: LogRecord) -> list[Any]:
    return [record.epoch, record.seq, base64.b64encode(record.changeset).decode("ascii")]


def record_from_wire(item: Any) -> LogRecord:
    """A record of a JSON ``append``; raises ProtocolViolation if malformed."""
    if not isinstance(item, list) or len(item) != 3 or not all(_is_int(v) for v in item[:2]):
        raise ProtocolViolation("malformed record in the stream")
    try:
        return LogRecord(item[0], item[1], _unb64(item[2]))
    except (TypeError, ValueError):
        raise ProtocolViolation("malformed record in the stream") from None


def records_to_payload(records: list[LogRecord]) -> bytes:
    parts: list[bytes] = []
    for record in records:
        parts.append(RECORD_HEADER.pack(record.epoch, record.seq, len(record.changeset)))
        parts.append(record.changeset)
    return b"".join(parts)


def records_from_payload(payload: bytes) -> list[LogRecord]:
    """The records of a binary ``append``; raises ProtocolViolation unless the
    payload splits exactly into whole records."""
    records = []
    view = memoryview(payload)
    offset, end = 0, len(payload)
    while offset < end:
        if end - offset < RECORD_HEADER.size:
            raise ProtocolViolation("malformed record in the stream: a header cut short")
        epoch, seq, length = RECORD_HEADER.unpack_from(payload, offset)
        offset += RECORD_HEADER.size
        if length > end - offset:
            raise ProtocolViolation("malformed record in the stream: a changeset cut short")
        records.append(LogRecord(epoch, seq, bytes(view[offset : offset + length])))
        offset += length
    return records


# ---- the messages ---------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """Base of every peer message; ``TYPE`` is its wire name."""

    TYPE: ClassVar[str] = ""
    # The field a binary frame carries as its payload (None: the message is JSON only).
    BULK: ClassVar[str | None] = None

    def to_wire(self, binary: bool = False) -> Wire:
        """The frame of this message; ``binary``: its bulk as the payload of a binary
        frame (a link of peer version 2)."""
        frame: Wire = {"type": self.TYPE}
        bulk = self.BULK if binary else None
        for spec in _SPECS[type(self)]:
            if spec.name == bulk:
                frame[PAYLOAD] = _BULK_CODECS[spec.name][0](getattr(self, spec.name))
            else:
                frame[spec.name] = spec.encode(getattr(self, spec.name))
        return frame


@dataclass(frozen=True)
class Append(Message):
    """Primary → backup: records to apply (none: a heartbeat) and the primary's view.

    ``in_sync`` is the sync set in effect; ``echo`` the ``ack_no`` of this backup's
    latest counted ack (-1: none), which confirms it (R5)."""

    TYPE: ClassVar[str] = "append"
    BULK: ClassVar[str | None] = "records"
    epoch: int
    seq: int
    watermark: int
    records: list[LogRecord]
    sync_set: SyncSet
    in_sync: tuple[int, ...]
    echo: int


@dataclass(frozen=True)
class Ack(Message):
    """Backup → primary: everything up to ``seq`` is on disk here. Counted only if
    ``join_no`` is the backup's latest join; ``links`` are the peers it is linked to."""

    TYPE: ClassVar[str] = "ack"
    epoch: int
    seq: int
    ack_no: int
    join_no: int
    links: tuple[int, ...]


@dataclass(frozen=True)
class Join(Message):
    """Backup → primary: where my history stands, before any record is applied (R4)."""

    TYPE: ClassVar[str] = "join"
    epoch: int
    position: Position
    durable: int
    history: tuple[tuple[int, int], ...]
    join_no: int
    database: str
    # Send a snapshot, whatever the histories say: this database does not continue
    # the history its position names (a node made by ops.restore, whose position
    # another cluster's records may share), or a rewind found the log too short. A
    # field of later versions: a join without it asks for none.
    snapshot: bool = False


@dataclass(frozen=True)
class JoinReply(Message):
    """Primary → backup: keep records up to ``diverge`` (rewind the rest), or take a
    snapshot. Echoes the join's number: a reply to an earlier join is ignored."""

    TYPE: ClassVar[str] = "join_reply"
    epoch: int
    diverge: int
    snapshot: bool
    join_no: int


@dataclass(frozen=True)
class Snapshot(Message):
    """Primary → backup: one chunk (``data`` at ``offset``, base64 on the wire) of a
    snapshot file of ``size`` bytes in all (None from a sender of an earlier version),
    so that a backup without room for it says so before taking any of it."""

    TYPE: ClassVar[str] = "snapshot"
    BULK: ClassVar[str | None] = "data"
    epoch: int
    position: Position
    offset: int
    data: bytes
    done: bool
    size: int | None = None


@dataclass(frozen=True)
class Reject(Message):
    """Any → stale sender: my epoch is higher than yours."""

    TYPE: ClassVar[str] = "reject"
    epoch: int


@dataclass(frozen=True)
class Probe(Message):
    """Electing node → all: who is there, and what do you know?"""

    TYPE: ClassVar[str] = "probe"
    epoch: int
    round: int


@dataclass(frozen=True)
class ProbeReply(Message):
    """The answer to a probe of ``round``: the node's role, view and eligibility."""

    TYPE: ClassVar[str] = "probe_reply"
    epoch: int
    round: int
    role: str
    primary: int | None
    position: Position
    eligible: bool
    sync_set: SyncSet
    database: str
    unproven: str | None
    fault: str | None


@dataclass(frozen=True)
class VoteRequest(Message):
    """Candidate → every node that answered its probe: your vote in ``epoch``?"""

    TYPE: ClassVar[str] = "vote_request"
    epoch: int
    position: Position
    force: bool


@dataclass(frozen=True)
class Vote(Message):
    TYPE: ClassVar[str] = "vote"
    epoch: int
    granted: bool
    reason: str


@dataclass(frozen=True)
class Verify(Message):
    """Primary → in-sync backup: your per-table checksums at ``seq``, please."""

    TYPE: ClassVar[str] = "verify"
    epoch: int
    seq: int
    round: int


@dataclass(frozen=True)
class VerifyReply(Message):
    """Backup → primary: the checksums, or None when no longer at that seq."""

    TYPE: ClassVar[str] = "verify_reply"
    epoch: int
    seq: int
    round: int
    sums: dict[str, Any] | None


@dataclass(frozen=True)
class Resync(Message):
    """Primary → backup: your data differs from the majority's; move it aside."""

    TYPE: ClassVar[str] = "resync"
    epoch: int
    why: str


@dataclass(frozen=True)
class ForcePromote(Message):
    """Operator tool → node: become primary even though R5/R6 do not allow it."""

    TYPE: ClassVar[str] = "force_promote"


MESSAGES: tuple[type[Message], ...] = (
    Append,
    Ack,
    Join,
    JoinReply,
    Snapshot,
    Reject,
    Probe,
    ProbeReply,
    VoteRequest,
    Vote,
    Verify,
    VerifyReply,
    Resync,
    ForcePromote,
)
BY_TYPE: dict[str, type[Message]] = {cls.TYPE: cls for cls in MESSAGES}


def from_wire(frame: Wire) -> Message:
    """The message a decoded frame holds; raises ProtocolViolation if malformed."""
    kind = frame.get("type")
    if kind == "ack":
        # One per backup per record: checked inline; anything unusual takes the
        # general path below, which names the bad field.
        ack = _well_formed_ack(frame)
        if ack is not None:
            return ack
    cls = BY_TYPE.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolViolation(f"unknown peer message type {kind!r}")
    values = {}
    payload = frame.get(PAYLOAD)
    if cls.BULK is not None and isinstance(payload, bytes):
        # A binary frame (only bytes mean one): the bulk is its payload.
        values[cls.BULK] = _BULK_CODECS[cls.BULK][1](payload)
    for spec in _SPECS[cls]:
        if spec.name in values:
            continue
        if spec.name not in frame:
            if spec.default is not dataclasses.MISSING:
                continue  # a field added later: a node of an earlier version omits it
            raise ProtocolViolation(f"peer message {kind!r} has a bad field {spec.name!r}")
        try:
            values[spec.name] = spec.decode(frame[spec.name])
        except (TypeError, ValueError):
            raise ProtocolViolation(
                f"peer message {kind!r} has a bad field {spec.name!r}"
            ) from None
    return cls(**values)


def _well_formed_ack(frame: Wire) -> Ack | None:
    epoch, seq = frame.get("epoch"), frame.get("seq")
    ack_no, join_no, links = frame.get("ack_no"), frame.get("join_no"), frame.get("links")
    if (
        type(epoch) is int
        and type(seq) is int
        and type(ack_no) is int
        and type(join_no) is int
        and type(links) is list
        and all(type(link) is int for link in links)
    ):
        return Ack(epoch, seq, ack_no, join_no, tuple(links))
    return None


# ---- field codecs, derived from the annotations ------------------------------------------


@dataclass(frozen=True)
class _Field:
    name: str
    json_types: tuple[type, ...]
    decode: Callable[[Any], Any]
    encode: Callable[[Any], Any]
    default: Any = dataclasses.MISSING  # a field that may be missing, and its value then


def _strict(kind: type) -> Callable[[Any], Any]:
    def decode(value: Any) -> Any:
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise TypeError(kind.__name__)
        return value

    return decode


def _optional(inner: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else inner(value)


def _position(value: Any) -> Position:
    if not isinstance(value, list) or len(value) != 2 or not all(_is_int(v) for v in value):
        raise ValueError("position")
    return Position(value[0], value[1])


def _ints(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(_is_int(v) for v in value):
        raise ValueError("list of ints")
    return tuple(value)


def _pairs(value: Any) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, list) or not all(
        isinstance(pair, list) and len(pair) == 2 and all(_is_int(v) for v in pair)
        for pair in value
    ):
        raise ValueError("list of [int, int]")
    return tuple((pair[0], pair[1]) for pair in value)


def _sync_set(value: Any) -> SyncSet:
    if not isinstance(value, dict):
        raise TypeError("object")
    # Every append carries the sync set, and it changes rarely: the last one decoded
    # is reused when the frame's is equal (a comparison in C, not a decode per frame).
    if _last_sync_set and value == _last_sync_set[0][0]:
        return _last_sync_set[0][1]
    decoded = sync_set_from_wire(value)
    _last_sync_set[:] = [(value, decoded)]
    return decoded


_last_sync_set: list[tuple[Any, SyncSet]] = []


def _same(value: Any) -> Any:
    return value


def _records(value: Any) -> list[LogRecord]:
    if not isinstance(value, list):
        raise TypeError("list of records")
    return [record_from_wire(item) for item in value]


def _unb64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise TypeError("base64 string")
    return base64.b64decode(value, validate=True)  # binascii.Error is a ValueError


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# Every append carries the sync set, which changes rarely: its wire form is made once
# per sync set (the dict is only ever serialised, never changed).
_sync_set_wire = functools.lru_cache(maxsize=16)(sync_set_to_wire)

# annotation → (JSON types accepted, decode, encode)
_CODECS: dict[object, tuple[tuple[type, ...], Callable[[Any], Any], Callable[[Any], Any]]] = {
    int: ((int,), _strict(int), _same),
    bool: ((bool,), _strict(bool), _same),
    str: ((str,), _strict(str), _same),
    bytes: ((str,), _unb64, _b64),
    int | None: ((int, type(None)), _optional(_strict(int)), _same),
    str | None: ((str, type(None)), _optional(_strict(str)), _same),
    Position: ((list,), _position, lambda p: [p.epoch, p.seq]),
    SyncSet: ((dict,), _sync_set, _sync_set_wire),
    tuple[int, ...]: ((list,), _ints, list),
    tuple[tuple[int, int], ...]: ((list,), _pairs, lambda pairs: [list(p) for p in pairs]),
    list[LogRecord]: ((list,), _records, lambda records: [record_to_wire(r) for r in records]),
    dict[str, Any] | None: ((dict, type(None)), _optional(_strict(dict)), _same),
}


# bulk field -> (to payload, from payload) in binary frames
_BULK_CODECS: dict[str, tuple[Callable[[Any], bytes], Callable[[bytes], Any]]] = {
    "records": (records_to_payload, records_from_payload),
    "data": (_same, _same),
}


def _specs(cls: type[Message]) -> tuple[_Field, ...]:
    hints = typing.get_type_hints(cls)
    specs = []
    for field in dataclasses.fields(cls):
        # Annotations compare by value (``int | None == int | None``), so they key the table.
        json_types, decode, encode = _CODECS[hints[field.name]]
        specs.append(_Field(field.name, json_types, decode, encode, field.default))
    return tuple(specs)


_SPECS: dict[type[Message], tuple[_Field, ...]] = {cls: _specs(cls) for cls in MESSAGES}

# For the protocol tests and documentation: each message's fields and their JSON types.
WIRE_TYPES: dict[str, dict[str, tuple[type, ...]]] = {
    cls.TYPE: {spec.name: spec.json_types for spec in _SPECS[cls]} for cls in MESSAGES
}
# The fields a message may lack (added in a later version), with the value they take then.
WIRE_DEFAULTS: dict[str, dict[str, Any]] = {
    cls.TYPE: {s.name: s.default for s in _SPECS[cls] if s.default is not dataclasses.MISSING}
    for cls in MESSAGES
}
