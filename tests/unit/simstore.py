"""A linearizable key-value store with leases and transactions: an etcd stand-in.

The simulator (``sim.py``) plays SPEC section 10's arbiter against this store,
so the rules of ``service/replication/leased.py`` meet the semantics they rely
on, and only those. It follows etcd v3 where the arbiter's safety depends on it:

* Every change (a put, a delete, a lease expiring with keys on it) makes one new
  store *revision*; a key carries the revision that created it
  (``create_revision``) and the one that last changed it (``mod_revision``).
* A lease has a TTL on the store's clock. ``keepalive`` sets what is left back to
  the whole TTL; once none is left the lease is gone, and every key on it is
  deleted (one revision). A gone lease is never renewed again (``keepalive``
  answers 0, as etcd's TTL 0).
* A transaction compares (``Compare``), then applies one branch of operations,
  atomically, in one revision. As etcd: a missing key has ``create_revision``,
  ``mod_revision`` and ``version`` 0 and lease 0, but a *value* compare on a
  missing key always fails; a put on a lease that does not exist fails the whole
  transaction (``LeaseNotFound``, nothing applied).

Time is passed in with every call (the simulator's true time, which is the
store's clock); leases are expired lazily, before each call, exactly at their
end. Nothing here knows about nodes, delays or partitions: that is the
simulator's transport.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal


class LeaseNotFound(Exception):
    """etcd's "requested lease not found": the operation was not applied."""


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: str
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


Target = Literal["value", "create", "mod", "version", "lease"]


@dataclass(frozen=True)
class Compare:
    """``target`` of ``key`` equals ``expected`` (the only compare the arbiter uses)."""

    key: str
    target: Target
    expected: str | int


@dataclass(frozen=True)
class Put:
    key: str
    value: str
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str


@dataclass(frozen=True)
class Get:
    """One key, or every key starting with ``key`` when ``prefix``."""

    key: str
    prefix: bool = False


Operation = Put | Delete | Get


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    # The store's revision after the transaction (etcd's response header).
    revision: int
    # What each Get of the branch taken found (one list per Get, in order).
    found: list[list[KeyValue]]


@dataclass
class _Lease:
    ttl: float
    expires_at: float
    keys: set[str] = field(default_factory=set)


class SimStore:
    """The store: keys with revisions, leases, transactions."""

    def __init__(self) -> None:
        self.revision = 1
        self.keys: dict[str, KeyValue] = {}
        self.leases: dict[int, _Lease] = {}
        self._next_lease = 0x1000
        # (time, revision, key, value or None) of every change, for the invariants.
        self.changes: list[tuple[float, int, str, str | None]] = []

    # ---- leases ---------------------------------------------------------------------

    def grant(self, now: float, ttl: float) -> int:
        self.expire(now)
        self._next_lease += 1
        self.leases[self._next_lease] = _Lease(ttl, now + ttl)
        return self._next_lease

    def keepalive(self, now: float, lease: int) -> float:
        """The TTL the lease has again, or 0 if it is gone."""
        self.expire(now)
        found = self.leases.get(lease)
        if found is None:
            return 0.0
        found.expires_at = now + found.ttl
        return found.ttl

    def time_to_live(self, now: float, lease: int) -> float:
        """Seconds the lease has left, or -1 if it is gone."""
        self.expire(now)
        found = self.leases.get(lease)
        return -1.0 if found is None else found.expires_at - now

    def alive(self, now: float, lease: int) -> bool:
        return self.time_to_live(now, lease) > 0

    def expire(self, now: float) -> None:
        """Delete every lease whose TTL ran out by ``now``, with its keys (one
        revision per lease, as etcd's revoke)."""
        for lease_id, lease in sorted(self.leases.items(), key=lambda item: item[1].expires_at):
            if lease.expires_at > now:
                continue
            del self.leases[lease_id]
            gone = sorted(
                k for k in lease.keys if k in self.keys and self.keys[k].lease == lease_id
            )
            if gone:
                self.revision += 1
                for key in gone:
                    del self.keys[key]
                    self.changes.append((lease.expires_at, self.revision, key, None))

    # ---- reads and transactions -------------------------------------------------------

    def get(self, now: float, key: str, prefix: bool = False) -> list[KeyValue]:
        self.expire(now)
        if prefix:
            return [kv for k, kv in sorted(self.keys.items()) if k.startswith(key)]
        found = self.keys.get(key)
        return [] if found is None else [found]

    def txn(
        self,
        now: float,
        compares: list[Compare],
        success: list[Operation],
        failure: Sequence[Operation] = (),
    ) -> TxnResult:
        """Compare, then apply one branch atomically (raises ``LeaseNotFound``, and
        applies nothing, if a put of that branch names a lease that is gone)."""
        self.expire(now)
        succeeded = all(self._holds(c) for c in compares)
        branch = list(success if succeeded else failure)
        for op in branch:
            if isinstance(op, Put) and op.lease and op.lease not in self.leases:
                raise LeaseNotFound(f"lease {op.lease:x} not found")
        changed = any(
            isinstance(op, Put) or (isinstance(op, Delete) and op.key in self.keys) for op in branch
        )
        revision = self.revision + 1 if changed else self.revision
        found: list[list[KeyValue]] = []
        for op in branch:
            if isinstance(op, Get):
                found.append(self.get(now, op.key, op.prefix))
            elif isinstance(op, Put):
                self._put(now, op, revision)
            elif op.key in self.keys:
                self._drop_from_lease(self.keys.pop(op.key))
                self.changes.append((now, revision, op.key, None))
        self.revision = revision
        return TxnResult(succeeded, revision, found)

    def _put(self, now: float, op: Put, revision: int) -> None:
        old = self.keys.get(op.key)
        if old is not None:
            self._drop_from_lease(old)
        self.keys[op.key] = KeyValue(
            op.key,
            op.value,
            old.create_revision if old is not None else revision,
            revision,
            old.version + 1 if old is not None else 1,
            op.lease,
        )
        if op.lease:
            self.leases[op.lease].keys.add(op.key)
        self.changes.append((now, revision, op.key, op.value))

    def _drop_from_lease(self, kv: KeyValue) -> None:
        lease = self.leases.get(kv.lease)
        if lease is not None:
            lease.keys.discard(kv.key)

    def _holds(self, compare: Compare) -> bool:
        kv = self.keys.get(compare.key)
        if compare.target == "value":
            # etcd: a value compare on a missing key always fails.
            return kv is not None and kv.value == compare.expected
        actual = {
            "create": kv.create_revision if kv else 0,
            "mod": kv.mod_revision if kv else 0,
            "version": kv.version if kv else 0,
            "lease": kv.lease if kv else 0,
        }[compare.target]
        return actual == compare.expected
