"""One node's ``status``, typed: what ``chatctl status`` shows and the test harness reads.

The ``status`` op answers ``{"node": {...}}`` (PROTOCOL.md section 6). Every
reader of it (``chatctl status``, the local-cluster harness of ``ops/cluster``
that the tests, the benchmark and the chaos tool share) goes through
``NodeStatus.from_reply``, so a field means the same thing everywhere and a
reply of the wrong shape is refused in one place, with one clear error
(``ProtocolViolation``), instead of surfacing later as a ``KeyError``.

Invariants
----------
* ``id``, ``role``, ``epoch`` and ``seq`` must be there; every other field may
  be missing (a node of an older version, a test's stand-in) and then takes
  its "nothing known" value. A field that is there must have its type.
* ``sync_set_wire``, ``checksums.to_status`` and ``arbiter.to_status`` give
  back what the node sent, so ``chatctl status --json`` prints a node's view as
  it came.
* ``arbiter`` is there only on a node configured with an arbiter (SPEC section
  10): what that node last read from etcd (who holds the leader key, its
  lease, the sync set as etcd has it) and whether etcd answers it. It is a
  read, so it guides an operator and decides nothing; a node that cannot reach
  etcd says why.
* Two rules name a primary from several views, and they are not the same:
  ``leading`` is the node that says it is primary in the highest epoch (what
  a client follows, and what ``chatctl status`` prints); agreement (every
  node naming one primary in its epoch) is the harness's stronger rule
  (``ops/cluster/agreement.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import ProtocolViolation
from .replication.types import NO_SYNC_SET, SyncSet
from .replication.verify import Outcome as Checksums

V = TypeVar("V")

ROLES = ("primary", "backup", "electing")


@dataclass(frozen=True)
class StoredSyncSet:
    """The sync set as the arbiter holds it (E3): its version and members."""

    version: int
    members: tuple[int, ...]


@dataclass(frozen=True)
class ArbiterStatus:
    """One node's view of its arbiter (``LeasedArbiter.status``)."""

    mode: str  # "etcd"
    reachable: bool
    unreachable: str | None = None  # why not, when not reachable
    leader: int | None = None  # the node holding the leader key, as last read
    leader_epoch: int | None = None  # the epoch it took the key in
    leader_ttl: float | None = None  # seconds left on the leader's lease, as etcd said
    sync_set: StoredSyncSet | None = None  # None: etcd holds none (yet), or never read
    serving_for: float | None = None  # on the primary: seconds to its fencing deadline

    @classmethod
    def from_wire(cls, value: object) -> ArbiterStatus:
        # Keys named with their path, so that an error says "arbiter.leader is ...".
        data = {f"arbiter.{key}": item for key, item in _object(value, "arbiter").items()}
        stored = data.get("arbiter.sync_set")
        sync_set = None
        if stored is not None:
            inner = {
                f"arbiter.sync_set.{k}": v for k, v in _object(stored, "arbiter.sync_set").items()
            }
            sync_set = StoredSyncSet(
                _int(inner, "arbiter.sync_set.version"), _ints(inner, "arbiter.sync_set.members")
            )
        return cls(
            mode=_str(data, "arbiter.mode"),
            reachable=_bool(data, "arbiter.reachable"),
            unreachable=_optional_str(data, "arbiter.unreachable"),
            leader=_optional_int(data, "arbiter.leader"),
            leader_epoch=_optional_int(data, "arbiter.leader_epoch"),
            leader_ttl=_optional_number(data, "arbiter.leader_ttl"),
            sync_set=sync_set,
            serving_for=_optional_number(data, "arbiter.serving_for"),
        )

    def to_status(self) -> dict[str, Any]:
        """The object as the node sent it (``serving_for`` only on a primary)."""
        wire: dict[str, Any] = {
            "mode": self.mode,
            "reachable": self.reachable,
            "unreachable": self.unreachable,
            "leader": self.leader,
            "leader_epoch": self.leader_epoch,
            "leader_ttl": self.leader_ttl,
            "sync_set": (
                None
                if self.sync_set is None
                else {"version": self.sync_set.version, "members": list(self.sync_set.members)}
            ),
        }
        if self.serving_for is not None:
            wire["serving_for"] = self.serving_for
        return wire


@dataclass(frozen=True)
class NodeStatus:
    """One node's own view of the cluster, as its ``status`` op tells it."""

    node_id: int
    role: str
    epoch: int
    seq: int
    # (epoch, seq) of the node's last committed transaction. Convergence compares
    # positions, not seqs: the primary's seq in another epoch is a diverged history.
    position: tuple[int, int]
    address: str | None = None
    primary: str | None = None  # the primary's address as this node knows it
    primary_id: int | None = None
    sync_set: SyncSet = NO_SYNC_SET  # the latest sync set the node knows
    in_sync: tuple[int, ...] | None = None  # on the primary: the members it waits for
    watermark: int | None = None
    # A backup recently named a member by the primary: it may take over (R5).
    confirmed: bool = False
    # Why a node cannot serve or elect, and for which nodes (G5).
    waiting_for: tuple[int, ...] | None = None
    reason: str | None = None
    lag: Mapping[int, int] = field(default_factory=dict)  # on the primary: behind by
    # On the primary: backups whose snapshot cannot be made yet, and why.
    snapshot_waits: Mapping[int, str] = field(default_factory=dict)
    links: tuple[int, ...] = ()  # the peers it has a live connection to
    database: str | None = None
    unproven: str | None = None
    checksums: Checksums | None = None
    batches: int = 0
    writes: int = 0
    arbiter: ArbiterStatus | None = None  # only with an arbiter (SPEC section 10)

    @classmethod
    def from_reply(cls, reply: object) -> NodeStatus:
        """From the ``status`` op's result ``{"node": {...}}``."""
        return cls.from_wire(_object(reply, "status reply").get("node"))

    @classmethod
    def from_wire(cls, node: object) -> NodeStatus:
        """From the ``node`` object of a ``status`` reply; ProtocolViolation if malformed."""
        data = _object(node, "node")
        role = _str(data, "role")
        if role not in ROLES:
            raise ProtocolViolation(f"status: role {role!r} is none of {', '.join(ROLES)}")
        epoch, seq = _int(data, "epoch"), _int(data, "seq")
        return cls(
            node_id=_int(data, "id"),
            role=role,
            epoch=epoch,
            seq=seq,
            position=_position(data.get("position"), (epoch, seq)),
            address=_optional_str(data, "address"),
            primary=_optional_str(data, "primary"),
            primary_id=_optional_int(data, "primary_id"),
            sync_set=_sync_set(data.get("sync_set")),
            in_sync=_optional_ints(data, "in_sync"),
            watermark=_optional_int(data, "watermark"),
            confirmed=bool(data.get("confirmed")),
            waiting_for=_optional_ints(data, "waiting_for"),
            reason=_optional_str(data, "reason"),
            lag=_lag(data.get("lag")),
            snapshot_waits=_snapshot_waits(data.get("snapshot_waits")),
            links=_optional_ints(data, "links") or (),
            database=_optional_str(data, "database"),
            unproven=_optional_str(data, "unproven"),
            checksums=_checksums(data.get("checksums")),
            batches=_optional_int(data, "batches") or 0,
            writes=_optional_int(data, "writes") or 0,
            arbiter=None
            if data.get("arbiter") is None
            else ArbiterStatus.from_wire(data["arbiter"]),
        )

    @property
    def is_primary(self) -> bool:
        return self.role == "primary"

    @property
    def members(self) -> tuple[int, ...]:
        """The members of the latest sync set the node knows."""
        return self.sync_set.members

    def follows(self, primary: NodeStatus) -> bool:
        """This node names ``primary`` as the primary, in the primary's epoch."""
        return self.primary_id == primary.node_id and self.epoch == primary.epoch

    def sync_set_wire(self) -> dict[str, Any]:
        """The sync set as the node sent it."""
        return {
            "version": self.sync_set.version,
            "members": list(self.sync_set.members),
            "epoch": self.sync_set.epoch,
            "databases": [list(pair) for pair in self.sync_set.databases],
        }

    def __str__(self) -> str:
        text = (
            f"node {self.node_id}: {self.role} epoch={self.epoch} position={self.position} "
            f"primary={self.primary_id} sync_set={list(self.members)} in_sync={self.in_sync}"
        )
        if self.reason or self.waiting_for:
            text += f" waiting_for={self.waiting_for} reason={self.reason!r}"
        return text


def leading(statuses: Iterable[NodeStatus]) -> NodeStatus | None:
    """The node that says it is primary in the highest epoch (the first of a tie), if any."""
    primaries = [status for status in statuses if status.is_primary]
    return max(primaries, key=lambda status: status.epoch, default=None)


# ---- validation of the wire fields ---------------------------------------------------


def _bad(what: str, value: object, expected: str) -> ProtocolViolation:
    return ProtocolViolation(f"status: {what} is {value!r}, not {expected}")


def _object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(what, value, "an object")
    return value


def _int(data: Mapping[str, Any], key: str) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(key, value, "an integer")
    return value


def _number(data: Mapping[str, Any], key: str) -> float:
    value = data.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _bad(key, value, "a number")
    return float(value)


def _bool(data: Mapping[str, Any], key: str) -> bool:
    value = data.get(key)
    if not isinstance(value, bool):
        raise _bad(key, value, "true or false")
    return value


def _str(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise _bad(key, value, "a string")
    return value


def _optional_int(data: Mapping[str, Any], key: str) -> int | None:
    return None if data.get(key) is None else _int(data, key)


def _optional_number(data: Mapping[str, Any], key: str) -> float | None:
    return None if data.get(key) is None else _number(data, key)


def _optional_str(data: Mapping[str, Any], key: str) -> str | None:
    return None if data.get(key) is None else _str(data, key)


def _ints(data: Mapping[str, Any], key: str) -> tuple[int, ...]:
    value = data.get(key)
    if not isinstance(value, list) or not all(
        isinstance(item, int) and not isinstance(item, bool) for item in value
    ):
        raise _bad(key, value, "a list of integers")
    return tuple(value)


def _optional_ints(data: Mapping[str, Any], key: str) -> tuple[int, ...] | None:
    return None if data.get(key) is None else _ints(data, key)


def _position(value: object, default: tuple[int, int]) -> tuple[int, int]:
    if value is None:
        return default
    pair = _ints({"position": value}, "position")
    if len(pair) != 2:
        raise _bad("position", value, "[epoch, seq]")
    return pair[0], pair[1]


def _sync_set(value: object) -> SyncSet:
    if value is None:
        return NO_SYNC_SET
    data = _object(value, "sync_set")
    databases = data.get("databases") or []
    if not isinstance(databases, list) or not all(
        isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], int)
        and isinstance(pair[1], str)
        for pair in databases
    ):  # fmt: skip
        raise _bad("sync_set.databases", databases, "a list of [node id, database id]")
    return SyncSet(
        version=_int(data, "version"),
        members=_ints(data, "members"),
        epoch=_optional_int(data, "epoch") or 0,
        databases=tuple((int(node), str(db)) for node, db in databases),
    )


def _checksums(value: object) -> Checksums | None:
    """The primary's last comparison of per-table checksums (replication/verify.py)."""
    if value is None:
        return None
    data = _object(value, "checksums")
    return Checksums(
        seq=_int(data, "seq"),
        nodes=_ints(data, "nodes"),
        agreed=_bool(data, "agreed"),
        damaged=_ints(data, "damaged"),
        at=_number(data, "at"),
    )


def _by_node(
    value: object, name: str, what: str, read: Callable[[Mapping[str, Any], str], V]
) -> dict[int, V]:
    """An object of node ids (as strings) mapped to ``what``, each value ``read``."""
    if value is None:
        return {}
    data = _object(value, name)
    found: dict[int, V] = {}
    for key in data:
        if not str(key).isdigit():
            raise _bad(name, value, f"node ids mapped to {what}")
        found[int(key)] = read(data, key)
    return found


def _snapshot_waits(value: object) -> dict[int, str]:
    return _by_node(value, "snapshot_waits", "reasons", _str)


def _lag(value: object) -> dict[int, int]:
    return _by_node(value, "lag", "counts", _int)
