"""The fault schedule: every fault of a run, drawn from the seed before the run starts.

Theory of operation
-------------------
``generate(seed, duration, timing)`` draws, with ``random.Random(seed)`` only,
the list of faults the nemesis will inject: when (seconds after the workload
starts), which kind, which role it targets, and how long each node stays
down or frozen. Nothing observed at run time feeds back into the draw, so the
same seed always prints the same schedule and a failing run is replayed with
``--seed``. What *is* decided at run time is which node id holds a role
(``primary`` is whoever is primary when the fault fires); ``pick`` makes that
choice deterministic among the candidates, and the nemesis logs the ids it
actually hit.

The kinds (SPEC section 8's scenarios, at random):

* ``kill-primary``: SIGKILL the primary; restart it after ``down``;
* ``kill-backup``: SIGKILL a backup; restart it after ``down`` (a long one
  needs a log or snapshot catch-up);
* ``kill-two``: SIGKILL two nodes (``primary+backup`` or ``backups``); restart
  them ``spread`` apart, in an order drawn from ``pick``;
* ``kill-all``: SIGKILL one node, ``lag`` later the other two (so the first is
  the stalest); restart all three after ``down``, ``spread`` apart, in
  ``order``: ``stalest-first``, ``stalest-last`` or ``random``;
* ``freeze``: SIGSTOP a node for ``down``, then SIGCONT; ``down`` is drawn
  below the suspect timeout (nobody notices), between it and the sync timeout
  (a frozen primary is replaced, a frozen backup kept), or past the sync
  timeout (dropped from the sync set);
* ``freeze-all``: SIGSTOP all three, SIGCONT them ``spread`` apart after
  ``down``: every node sees a gap in its clock at once;
* ``freeze-and-kill``: SIGSTOP one node (``target``), ``lag`` later SIGKILL
  another (``victim``: the primary, or a backup when the frozen node is the
  primary); after ``down`` restart the killed node and thaw the frozen one,
  in an order drawn from ``pick``;
* ``kill-during-catch-up``: SIGKILL a backup, restart it after ``down``, and as
  soon as its catch-up (or snapshot) starts, SIGKILL ``victim``: the joining
  node or the primary feeding it; restart that one after ``spread``.

Disk faults (``DISK_KINDS``), drawn only when ``--faults`` asks for them
(``kinds_from_spec``); the first two need nodes started with a disk fault
control file (``service/diskfaults.py``):

* ``disk-full``: the ``target`` node's disk has ``size`` bytes left, then
  refuses writes with SQLITE_FULL for ``down``; then the space is back;
* ``io-error``: the ``target`` node's writes (and, when ``ops`` says so, its
  SQLite fsyncs) fail with SQLITE_IOERR for ``down`` after ``size`` bytes:
  a transient I/O error;
* ``corrupt-backup``: stop a backup (SIGTERM), damage ``size`` bytes of one
  b-tree page of its ``chat.db`` (a page of a table or index in the middle of
  the file, drawn from ``pick``; ``corrupt.py``), start it again after
  ``down``.

Faults of the etcd arbiter mode (``--arbiter etcd``, SPEC section 10), drawn only
there: the nodes run on their own loopback addresses with an etcd member on one
more, so traffic can be cut between any two (nft, ``ops/netcut.py``) and the
member frozen or restarted. ``down`` is drawn around the lease TTL: shorter
than half of it (nothing expires), about one TTL, or up to three (the leader
key expires and, if the primary cannot renew, someone else takes it).
``PARTITION_KINDS`` need root and nft; ``ETCD_KINDS`` do not:

* ``isolate``: the ``target`` node is cut, both ways, from the other two nodes
  and from etcd for ``down`` (clients still reach it: it must not answer as a
  primary once its lease is gone);
* ``cut-primary-from-backups``: the primary is cut, both ways, from both backups
  but still reaches etcd, so it keeps the leader key;
* ``cut-one-way``: the ``target`` pair (``primary>backup``, ``backup>primary``
  or ``backup>backup``): the first can no longer reach the second, which can
  still reach it;
* ``cut-from-etcd``: the ``target`` node is cut, both ways, from etcd only;
* ``etcd-freeze``: SIGSTOP the etcd member for ``down``, then SIGCONT;
* ``etcd-restart``: SIGKILL (``victim`` ``kill``) or SIGTERM (``stop``) the etcd
  member, start it again after ``down``.

Invariants
----------
* Faults do not overlap: each one ends with every node running and thawed,
  and the next starts ``gap`` later (the nemesis starts a fault late, never
  early, when the one before ran long).
* Every fault starts before ``duration``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

KINDS = (
    "kill-primary",
    "kill-backup",
    "kill-two",
    "kill-all",
    "freeze",
    "freeze-all",
    "freeze-and-kill",
    "kill-during-catch-up",
)
WEIGHTS = (4, 3, 2, 2, 4, 1, 2, 2)
DISK_KINDS = ("disk-full", "io-error", "corrupt-backup")
DISK_WEIGHTS = (3, 2, 2)
PARTITION_KINDS = ("isolate", "cut-primary-from-backups", "cut-one-way", "cut-from-etcd")
PARTITION_WEIGHTS = (3, 2, 2, 3)
ETCD_KINDS = ("etcd-freeze", "etcd-restart")
ETCD_WEIGHTS = (2, 2)
# The kinds only the etcd arbiter mode has.
ARBITER_KINDS = PARTITION_KINDS + ETCD_KINDS
_WEIGHT_OF = dict(
    zip(
        KINDS + DISK_KINDS + ARBITER_KINDS,
        WEIGHTS + DISK_WEIGHTS + PARTITION_WEIGHTS + ETCD_WEIGHTS,
        strict=True,
    )
)
# The names ``--faults`` takes besides single kinds; ``process`` is the default.
GROUPS = {"process": KINDS, "disk": DISK_KINDS, "all": KINDS + DISK_KINDS}
# In the etcd arbiter mode ``all`` takes the arbiter's faults too.
ARBITER_GROUPS = {
    **GROUPS,
    "partition": PARTITION_KINDS,
    "etcd": ETCD_KINDS,
    "all": KINDS + DISK_KINDS + ARBITER_KINDS,
}
DEFAULT_FAULTS = "process"
# Seconds of quiet load before the first fault and between faults.
WARMUP = (1.0, 3.0)
GAP = (0.2, 4.0)


@dataclass(frozen=True)
class Timing:
    """The node timeouts the fault durations are drawn around (service.config defaults)."""

    suspect_timeout: float = 0.6
    sync_timeout: float = 1.5
    lease_ttl: float = 3.0


@dataclass(frozen=True)
class Fault:
    """One planned fault; see the module docstring for the fields of each kind."""

    index: int
    at: float
    kind: str
    target: str  # primary | backup | any | primary+backup | backups | all
    down: float  # seconds down (kills) or frozen (freeze)
    lag: float = 0.0  # kill-all: the stalest node is down this much longer
    order: str = ""  # kill-all: restart order
    spread: float = 0.0  # seconds between successive restarts
    victim: str = ""  # kill-during-catch-up: joiner | primary; freeze-and-kill: primary | backup
    pick: int = 0  # chooses among the nodes that hold ``target`` at run time
    size: int = 0  # disk-full, io-error: bytes written before the fault; corrupt-backup: bytes
    ops: str = ""  # io-error: the failing operations, "write" or "write,sync"

    def describe(self) -> str:
        parts = [f"#{self.index:<3d} t={self.at:7.2f}s {self.kind:<20s} target={self.target}"]
        parts.append(f"down={self.down:.2f}s")
        if self.kind in ("kill-all", "freeze-and-kill"):
            parts.append(f"lag={self.lag:.2f}s")
        if self.order:
            parts.append(f"order={self.order}")
        if self.kind in ("kill-two", "kill-all", "freeze-all", "kill-during-catch-up"):
            parts.append(f"spread={self.spread:.2f}s")
        if self.victim:
            parts.append(f"victim={self.victim}")
        if self.kind in DISK_KINDS:
            parts.append(f"size={self.size}")
        if self.ops:
            parts.append(f"ops={self.ops}")
        parts.append(f"pick={self.pick}")
        return " ".join(parts)

    def length(self) -> float:
        """About how long the fault takes, to space the next one."""
        if self.kind == "kill-all":
            return self.lag + self.down + 2 * self.spread
        if self.kind == "freeze-all":
            return self.down + 2 * self.spread
        if self.kind == "freeze-and-kill":
            return self.lag + self.down
        if self.kind in ("kill-during-catch-up", "corrupt-backup", "etcd-restart"):
            return self.down + self.spread + 1.0
        return self.down + self.spread


def kinds_from_spec(spec: str, arbiter: bool = False) -> tuple[str, ...]:
    """The kinds a ``--faults`` value names: comma-separated kinds and groups (``GROUPS``,
    or with ``arbiter`` (the etcd arbiter mode) ``ARBITER_GROUPS``).

    ValueError names what is unknown, or an arbiter fault named without ``arbiter``;
    the order is that of ``KINDS + DISK_KINDS + ARBITER_KINDS``.
    """
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise ValueError("no fault kinds named")
    groups = ARBITER_GROUPS if arbiter else GROUPS
    chosen: set[str] = set()
    for name in names:
        if name in groups:
            chosen.update(groups[name])
        elif name in ARBITER_GROUPS or name in ARBITER_KINDS:
            raise ValueError(f"{name!r} faults need the etcd arbiter mode (--arbiter etcd)")
        elif name in _WEIGHT_OF:
            chosen.add(name)
        else:
            known = ", ".join([*ARBITER_GROUPS, *_WEIGHT_OF])
            raise ValueError(f"unknown fault kind {name!r} (known: {known})")
    return tuple(kind for kind in _WEIGHT_OF if kind in chosen)


def generate(
    seed: int, duration: float, timing: Timing | None = None, kinds: tuple[str, ...] = KINDS
) -> list[Fault]:
    """The whole schedule of a run of ``duration`` seconds, from ``seed`` and ``kinds`` alone
    (the default kinds draw exactly the schedules they always drew)."""
    timing = timing or Timing()
    weights = [_WEIGHT_OF[kind] for kind in kinds]
    rng = random.Random(seed)
    faults: list[Fault] = []
    at = rng.uniform(*WARMUP)
    while at < duration:
        kind = rng.choices(kinds, weights)[0]
        fault = _draw(rng, len(faults), at, kind, timing)
        faults.append(fault)
        at += fault.length() + rng.uniform(*GAP)
    return faults


def _draw(rng: random.Random, index: int, at: float, kind: str, timing: Timing) -> Fault:
    pick = rng.randrange(1 << 16)
    at = round(at, 2)
    if kind == "kill-primary":
        return Fault(index, at, kind, "primary", _r(rng, 0.1, 4.0), pick=pick)
    if kind == "kill-backup":
        return Fault(index, at, kind, "backup", _r(rng, 0.1, 8.0), pick=pick)
    if kind == "kill-two":
        target = rng.choice(("primary+backup", "backups"))
        return Fault(
            index, at, kind, target, _r(rng, 0.2, 4.0), spread=_r(rng, 0.0, 1.5), pick=pick
        )
    if kind == "kill-all":
        order = rng.choice(("stalest-first", "stalest-first", "stalest-last", "random"))
        return Fault(
            index,
            at,
            kind,
            "all",
            _r(rng, 0.2, 6.0),  # past the client deadline (5 s) at times: unknown outcomes
            lag=_r(rng, 0.0, 3.0),
            order=order,
            spread=_r(rng, 0.0, 1.5),
            pick=pick,
        )
    if kind == "freeze":
        target = rng.choice(("primary", "primary", "backup", "any"))
        band = rng.choice(("short", "middle", "long"))
        if band == "short":  # the peers never suspect it
            down = _r(rng, 0.05, timing.suspect_timeout * 0.7)
        elif band == "middle":  # suspected (a primary is replaced), but not dropped
            down = _r(rng, timing.suspect_timeout * 1.2, timing.sync_timeout * 0.9)
        else:  # past the sync timeout: dropped from the sync set
            down = _r(rng, timing.sync_timeout * 1.2, timing.sync_timeout * 4)
        return Fault(index, at, kind, target, down, pick=pick)
    if kind == "freeze-all":
        down = _r(rng, 0.1, timing.sync_timeout * 3)
        return Fault(index, at, kind, "all", down, spread=_r(rng, 0.0, 1.0), pick=pick)
    if kind == "freeze-and-kill":
        return Fault(
            index,
            at,
            kind,
            rng.choice(("primary", "backup")),
            _r(rng, 0.3, 5.0),
            lag=_r(rng, 0.0, timing.sync_timeout * 2),
            victim=rng.choice(("primary", "backup")),
            pick=pick,
        )
    if kind == "kill-during-catch-up":
        return Fault(
            index,
            at,
            kind,
            "backup",
            _r(rng, 0.5, 10.0),
            spread=_r(rng, 0.1, 2.0),
            victim=rng.choice(("joiner", "primary")),
            pick=pick,
        )
    if kind in DISK_KINDS:
        return _draw_disk(rng, index, at, kind, pick)
    if kind in ARBITER_KINDS:
        return _draw_arbiter(rng, index, at, kind, timing, pick)
    raise ValueError(f"unknown fault kind {kind!r}")


def _draw_disk(rng: random.Random, index: int, at: float, kind: str, pick: int) -> Fault:
    if kind == "disk-full":
        # No room at all, or room for a few commits first (a commit appends a few
        # 4 KiB pages to the WAL).
        size = rng.choice((0, 0, rng.randrange(1, 16) * 4096))
        target = rng.choice(("primary", "backup", "any"))
        return Fault(index, at, kind, target, _r(rng, 0.3, 6.0), size=size, pick=pick)
    if kind == "io-error":
        size = rng.choice((0, rng.randrange(1, 8) * 4096))
        target = rng.choice(("primary", "backup", "any"))
        ops = rng.choice(("write", "write,sync"))
        return Fault(index, at, kind, target, _r(rng, 0.05, 2.0), size=size, ops=ops, pick=pick)
    if kind == "corrupt-backup":
        size = rng.randrange(8, 64)
        return Fault(index, at, kind, "backup", _r(rng, 0.1, 3.0), size=size, pick=pick)
    raise ValueError(f"unknown disk fault kind {kind!r}")


def _draw_arbiter(
    rng: random.Random, index: int, at: float, kind: str, timing: Timing, pick: int
) -> Fault:
    ttl = timing.lease_ttl
    band = rng.choice(("short", "about-ttl", "long"))
    if band == "short":  # no lease runs out
        down = _r(rng, 0.1, ttl * 0.5)
    elif band == "about-ttl":  # the leader key expires, or nearly
        down = _r(rng, ttl * 0.8, ttl * 1.5)
    else:  # someone else takes the key, and holds it a while
        down = _r(rng, ttl * 1.5, ttl * 3)
    if kind in ("isolate", "cut-from-etcd"):
        target = rng.choice(("primary", "primary", "backup", "any"))
        return Fault(index, at, kind, target, down, pick=pick)
    if kind == "cut-primary-from-backups":
        return Fault(index, at, kind, "primary", down, pick=pick)
    if kind == "cut-one-way":
        target = rng.choice(("primary>backup", "backup>primary", "backup>backup"))
        return Fault(index, at, kind, target, down, pick=pick)
    if kind == "etcd-freeze":
        return Fault(index, at, kind, "etcd", down, pick=pick)
    if kind == "etcd-restart":
        victim = rng.choice(("kill", "stop"))
        return Fault(index, at, kind, "etcd", down, victim=victim, pick=pick)
    raise ValueError(f"unknown arbiter fault kind {kind!r}")


def _r(rng: random.Random, low: float, high: float) -> float:
    return round(rng.uniform(low, high), 2)
