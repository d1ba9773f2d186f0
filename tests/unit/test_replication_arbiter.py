"""The etcd arbiter's rules (SPEC section 10, E1 to E6) over the simulated network.

Every node's core runs ``LeasedArbiter``; the simulator plays its I/O
(``simarbiter.py``) against a linearizable store with leases and transactions
(``simstore.py``, etcd's semantics). Nodes reach the store or not, one way or
both: a request lost is never applied, an answer lost leaves the node without
the outcome of something the store did. Each node's clock drifts from the
store's within the configured bound.

On top of the invariants of ``test_replication_state.py`` (G1, G3, G4, R1, R2
against the disk), the simulator checks in this mode, as it goes:

* E2: whenever a primary acknowledges (the moment it would release a write or
  serve a read), the store holds its leader key, for its epoch, on a live lease;
* E3: every member the stored sync set names (with its recorded database)
  holds every acknowledged write on disk, each time the set changes in the
  store and each time a write is acknowledged;
* R1: at most one node acknowledges per epoch, epochs are unique;
* E4: a node whose database was wiped never leads before it has joined a primary.

Unlike peer voting, partitions are part of the fault model here: no partition,
one-way cut or store outage may break a rule; it may only stop writes.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

import pytest

from service.replication.arbiter import (
    ArbiterView,
    Claimed,
    LeaseLost,
    LeaseRenewed,
    MemberInfo,
    SyncSetRefused,
    SyncSetStored,
)
from service.replication.effects import BecomePrimary, ClaimLeader, ReleaseLeader, StoreSyncSet
from service.replication.leased import LeasedArbiter, LeaseTiming
from service.replication.messages import Append
from service.replication.state import ReplicaCore, Timing
from service.replication.types import NodeState, Position, Role, SyncSet
from tests.unit.sim import ClientWrite, SimNetwork
from tests.unit.simarbiter import PREFIX, leader_value, parse_sync

LEASE = LeaseTiming()
# The worst drifts the configuration allows: node 1 fast, node 2 slow.
DRIFT = {1: LEASE.drift, 2: -LEASE.drift, 3: 0.0}


def started(seed: int = 0, drift: dict[int, float] | None = None) -> SimNetwork:
    """Three nodes in arbiter mode that elected their first primary and converged."""
    drift = DRIFT if drift is None else drift
    sim = SimNetwork(arbiter=LEASE, drift=drift, seed=seed, jitter=0.002)
    sim.wait_converged(timeout=5.0)
    return sim


def write(sim: SimNetwork, node: int) -> ClientWrite:
    written = sim.write(node)
    assert written is not None, f"node {node} is not primary\n{sim.describe()}"
    return written


def write_acked(sim: SimNetwork, node: int, count: int = 1) -> list[ClientWrite]:
    writes = [write(sim, node) for _ in range(count)]
    sim.wait_for(lambda: all(sim.is_acked(w) for w in writes), 2.0, f"{count} writes acked")
    return writes


def leader_key(sim: SimNetwork) -> str | None:
    sim.store.expire(sim.now)
    kv = sim.store.keys.get(PREFIX + "leader")
    return kv.value if kv is not None else None


def stored_members(sim: SimNetwork) -> tuple[int, ...]:
    kv = sim.store.keys.get(PREFIX + "sync")
    return parse_sync(kv.value).members if kv is not None else ()


def acks_by(sim: SimNetwork, node: int, since: float, epoch: int | None = None) -> list[int]:
    return [
        a.seq
        for a in sim.acks
        if a.node == node and a.time >= since and (epoch is None or a.epoch == epoch)
    ]


def never(sim: SimNetwork, seconds: float, predicate: Callable[[], object], what: str) -> None:
    """Advance ``seconds`` step by step; fail as soon as ``predicate()`` holds."""
    end = sim.now + seconds
    while True:
        assert not predicate(), f"{what}\n{sim.describe()}"
        if sim.now >= end - 1e-9:
            return
        sim.advance(min(sim.step, end - sim.now))


def heal_all(sim: SimNetwork) -> int:
    sim.store_delay = 0.002
    sim.store_jitter = 0.0
    sim.heal()
    sim.heal_store()
    for node in sim.ids:
        if sim.nodes[node].status == "frozen":
            sim.thaw(node)
        elif sim.nodes[node].status == "down":
            sim.restart(node)
    return sim.wait_converged(timeout=15.0)


# ---- E1: one leader key, one primary ----------------------------------------------------------


def test_e1_clean_start_elects_one_primary_holding_the_leader_key() -> None:
    sim = started()
    primary = sim.primary()
    assert primary is not None
    assert leader_key(sim) == leader_value(primary, sim.core(primary).epoch)
    assert stored_members(sim) == (1, 2, 3)
    write_acked(sim, primary, 3)
    sim.check_invariants(converged=True)


def test_e1_sigkill_of_the_primary_a_backup_leads_once_the_lease_expired() -> None:
    sim = started()
    old = sim.primary()
    assert old is not None
    acked = write_acked(sim, old, 3)
    killed_at = sim.now
    sim.kill(old)
    new = sim.wait_primary(timeout=LEASE.ttl + 3 * LEASE.renew_interval)
    assert new != old
    # The key outlives the process by the lease: nobody took over before it expired.
    assert sim.elections[-1].time >= killed_at + LEASE.ttl * (1 - LEASE.drift) - 0.1
    write_acked(sim, new, 2)
    sim.restart(old)
    sim.wait_converged(timeout=5.0)
    assert all(sim.holds(n, w) for n in sim.ids for w in acked)


# ---- E2 / E5: cut from the store ---------------------------------------------------------------


def test_e2_primary_cut_from_the_store_stops_acking_at_its_deadline_and_steps_down() -> None:
    sim = started()
    old = sim.primary()
    assert old is not None
    old_epoch = sim.core(old).epoch
    write_acked(sim, old, 2)
    cut_at = sim.now
    sim.cut_store(old)
    # It keeps writing until the deadline (the backups still ack), then stops.
    while sim.core(old).role is Role.PRIMARY and sim.now < cut_at + 2 * LEASE.ttl:
        sim.write(old)
        sim.advance(0.05)
    assert sim.core(old).role is not Role.PRIMARY, "the cut primary never stepped down"
    last = max(a.time for a in sim.acks if a.node == old and a.epoch == old_epoch)
    assert last < cut_at + LEASE.ttl, "acknowledged past any possible deadline"
    new = sim.wait_primary(timeout=2 * LEASE.ttl, among=[n for n in sim.ids if n != old])
    write_acked(sim, new, 2)
    sim.check_invariants()
    sim.heal_store()
    sim.wait_converged(timeout=5.0)


def test_e3_primary_cut_from_its_backups_shrinks_the_stored_set_and_goes_on_alone() -> None:
    sim = started()
    primary = sim.primary()
    assert primary is not None
    epoch = sim.core(primary).epoch
    sim.partition([primary])
    sim.wait_for(lambda: stored_members(sim) == (primary,), 5.0, "the stored set shrunk")
    write_acked(sim, primary, 3)
    # The backups see the leader key held: neither may lead, however long it lasts.
    never(
        sim,
        3 * LEASE.ttl,
        lambda: any(e.epoch > epoch for e in sim.elections),
        "a cut-off backup led while the primary held the key",
    )
    write_acked(sim, primary, 2)
    sim.heal()
    assert sim.wait_converged(timeout=5.0) == primary
    assert stored_members(sim) == (1, 2, 3)


@pytest.mark.parametrize(
    ("requests", "answers"), [(True, False), (False, True)], ids=["requests-lost", "answers-lost"]
)
def test_e2_one_way_cut_of_the_primary_from_the_store(requests: bool, answers: bool) -> None:
    sim = started()
    old = sim.primary()
    assert old is not None
    old_epoch = sim.core(old).epoch
    write_acked(sim, old, 2)
    cut_at = sim.now
    sim.cut_store(old, requests=requests, answers=answers)
    # With its answers lost, the old primary's requests still reach the store: its
    # member key stays, the most current (it is the lowest id), yet it can never
    # claim. The others yield to it for a TTL at most.
    new = sim.wait_primary(timeout=4 * LEASE.ttl, among=[n for n in sim.ids if n != old])
    assert acks_by(sim, old, cut_at + LEASE.ttl, old_epoch) == []
    write_acked(sim, new, 2)
    sim.check_invariants()
    sim.heal_store()
    sim.wait_converged(timeout=8.0)


@pytest.mark.parametrize(
    ("requests", "answers"), [(True, False), (False, True)], ids=["requests-lost", "answers-lost"]
)
def test_e5_one_way_cut_of_a_backup_from_the_store_changes_nothing(
    requests: bool, answers: bool
) -> None:
    sim = started()
    primary = sim.primary()
    assert primary is not None
    backup = next(n for n in sim.ids if n != primary)
    sim.cut_store(backup, requests=requests, answers=answers)
    for _ in range(8):
        write_acked(sim, primary, 2)
        sim.advance(0.5)
    assert sim.primary() == primary
    assert len(sim.elections) == 1
    sim.heal_store()
    sim.wait_converged(timeout=5.0)


def test_e5_store_unreachable_for_all_nobody_acks_past_a_deadline_then_writes_resume() -> None:
    sim = started()
    primary = sim.primary()
    assert primary is not None
    write_acked(sim, primary, 2)
    cut_at = sim.now
    for node in sim.ids:
        sim.cut_store(node)
    pending = []
    for _ in range(int(3 * LEASE.ttl / 0.1)):
        for node in sim.primaries():
            written = sim.write(node)
            if written is not None:
                pending.append(written)
        sim.advance(0.1)
    assert all(a.time < cut_at + LEASE.ttl for a in sim.acks), "acked with the store unreachable"
    assert len(sim.elections) == 1, "someone claimed with the store unreachable"
    assert "arbiter unreachable" in str(sim.statistics(primary)["reason"]) or (
        sim.statistics(primary)["arbiter"]["reachable"] is False
    )
    sim.heal_store()
    new = sim.wait_primary(timeout=3 * LEASE.ttl)
    write_acked(sim, new, 2)
    sim.wait_converged(timeout=8.0)


# ---- freezes ------------------------------------------------------------------------------------


def test_e2_primary_frozen_past_its_ttl_never_acks_in_its_old_epoch_after_the_thaw() -> None:
    sim = started()
    old = sim.primary()
    assert old is not None
    old_epoch = sim.core(old).epoch
    write_acked(sim, old, 2)
    stuck = [write(sim, old) for _ in range(3)]  # sealed, broadcast, not yet acked
    sim.freeze(old)
    new = sim.wait_primary(timeout=3 * LEASE.ttl, among=[n for n in sim.ids if n != old])
    write_acked(sim, new, 2)
    thawed_at = sim.now
    sim.thaw(old)
    never(
        sim,
        2.0,
        lambda: acks_by(sim, old, thawed_at, old_epoch) != [],
        "the thawed old primary acknowledged in its old epoch",
    )
    assert not any(sim.is_acked(w) and w.epoch == old_epoch for w in stuck[1:])
    sim.wait_converged(timeout=5.0)


# ---- E6: full restart ---------------------------------------------------------------------------


@pytest.mark.parametrize("order", list(itertools.permutations((1, 2, 3))))
def test_e6_after_all_three_crash_the_first_member_back_leads_without_waiting(
    order: tuple[int, ...],
) -> None:
    sim = started()
    primary = sim.primary()
    assert primary is not None
    acked = write_acked(sim, primary, 3)
    for node in sim.ids:
        sim.kill(node)
    sim.advance(LEASE.ttl + 0.5)  # every lease expired
    first, *rest = order
    sim.restart(first)
    sim.wait_primary(timeout=2 * LEASE.renew_interval + 1.0, among=[first])
    write_acked(sim, first, 2)
    for node in rest:
        sim.restart(node)
    sim.wait_converged(timeout=5.0)
    assert all(sim.holds(n, w) for n in sim.ids for w in acked)


# ---- E4: a member is its database ---------------------------------------------------------------


def test_e4_a_wiped_member_coming_back_first_does_not_lead() -> None:
    sim = started()
    primary = sim.primary()
    assert primary is not None
    acked = write_acked(sim, primary, 3)
    wiped = next(n for n in sim.ids if n != primary)
    for node in sim.ids:
        sim.kill(node)
    sim.advance(LEASE.ttl + 0.5)
    sim.wipe(wiped)
    never(sim, 3.0, lambda: sim.primaries() != [], "the wiped member led")
    assert "wiped or replaced" in str(sim.statistics(wiped)["reason"])
    other = next(n for n in sim.ids if n != wiped)
    sim.restart(other)
    sim.wait_primary(timeout=3.0, among=[other])
    sim.wait_converged(timeout=5.0)
    assert all(sim.holds(n, w) for n in (wiped, other) for w in acked)


# ---- random faults ---------------------------------------------------------------------------


def writing_for(sim: SimNetwork, rng: random.Random, seconds: float) -> None:
    """Advance ``seconds`` while clients write to every node that is primary."""
    end = sim.now + seconds
    while sim.now < end - 1e-9:
        for primary in sim.primaries():
            if rng.random() < 0.5:
                sim.write(primary)
        sim.advance(min(0.05, end - sim.now))


def wipe_leaves_a_member(sim: SimNetwork, node: int) -> bool:
    """Another member of the stored set still has its recorded database, so wiping
    ``node`` leaves someone who may lead (else the cluster rightly waits forever),
    and no write of the node, sent before it stopped, may still change the set."""
    kv = sim.store.keys.get(PREFIX + "sync")
    if kv is None or sim.store_requests_in_flight(node):
        return False
    stored = parse_sync(kv.value)
    return any(
        m != node and stored.database_of(m) in (None, sim.nodes[m].database) for m in stored.members
    )


def random_faults(seed: int, steps: int = 30) -> None:
    """Crashes, restarts, freezes, wipes, partitions between nodes, cuts from the
    store (one way or both), store outages and a slow store at random, with
    drifting clocks; then all heals. Every invariant is checked after each step;
    at the end the nodes must converge and acknowledge writes again."""
    rng = random.Random(seed)
    sim = started(seed, {n: rng.uniform(-LEASE.drift, LEASE.drift) for n in (1, 2, 3)})
    for _step in range(steps):
        action = rng.random()
        primaries = sim.primaries()
        node = rng.choice(primaries if primaries and rng.random() < 0.5 else sim.ids)
        status = sim.nodes[node].status
        if action < 0.1 and status == "up":
            sim.kill(node)
        elif action < 0.18 and status == "up":
            sim.freeze(node)
        elif action < 0.35 and status == "down":
            sim.restart(node)
        elif action < 0.45 and status == "frozen":
            sim.thaw(node)
        elif action < 0.55:
            rest = [n for n in sim.ids if n != node]
            sim.partition([node], rest) if rng.random() < 0.7 else sim.partition([1], [2], [3])
        elif action < 0.6:
            sim.heal()
        elif action < 0.72:
            way = rng.choice([(True, True), (True, False), (False, True)])
            sim.cut_store(node, *way)
        elif action < 0.75:
            for n in sim.ids:
                sim.cut_store(n)
        elif action < 0.85:
            sim.heal_store()
        elif action < 0.88 and status == "down" and wipe_leaves_a_member(sim, node):
            sim.wipe(node, restart=False)
        elif action < 0.92:
            # A slow store: answers after the request timeout leave outcomes unknown,
            # and a later request may overtake an earlier one.
            sim.store_delay = rng.choice((0.002, 0.05, 0.3, 0.6))
            sim.store_jitter = rng.choice((0.0, 0.01, 0.3))
        writing_for(sim, rng, rng.choice((0.01, 0.05, 0.2, 0.7, 1.6, 3.5)))
        sim.check_invariants()
    primary = heal_all(sim)
    write_acked(sim, primary, 2)
    sim.check_invariants(converged=True)


@pytest.mark.parametrize("seed", range(16))
def test_e1_to_e6_random_partitions_store_cuts_crashes_and_freezes(seed: int) -> None:
    random_faults(seed)


# ---- regressions of bugs these scenarios found -------------------------------------------------


def test_e6_a_member_alone_in_the_stored_set_acks_in_order_after_a_full_restart() -> None:
    """The first acknowledgement of a reign comes with its first record: the claim's
    answer must not release the previous epoch's records after ``BecomePrimary``."""
    sim = started()
    primary = sim.primary()
    assert primary is not None
    others = [n for n in sim.ids if n != primary]
    sim.partition([primary], others)
    sim.wait_for(lambda: stored_members(sim) == (primary,), 5.0, "the stored set shrunk")
    acked = write_acked(sim, primary, 3)
    for node in sim.ids:
        sim.kill(node)
    sim.heal()
    sim.advance(LEASE.ttl + 0.5)
    sim.restart(primary)
    sim.wait_primary(timeout=3.0, among=[primary])
    write_acked(sim, primary, 2)
    sim.check_invariants()
    for node in others:
        sim.restart(node)
    sim.wait_converged(timeout=5.0)
    assert all(sim.holds(n, w) for n in sim.ids for w in acked)


def test_e4_a_member_named_by_a_takeover_first_record_is_its_database() -> None:
    """After a failover the new primary's first record names the members at its
    position; it must record their databases (from their member keys), or a
    wiped one of them could lead on an empty log."""
    sim = started()
    old = sim.primary()
    assert old is not None
    acked = write_acked(sim, old, 3)
    sim.kill(old)
    new = sim.wait_primary(timeout=3 * LEASE.ttl)
    other = next(n for n in sim.ids if n not in (old, new))
    sim.wait_for(
        lambda: stored_members(sim) == tuple(sorted((new, other))), 2.0, "the takeover stored"
    )
    sim.kill(new)
    sim.kill(other)
    sim.advance(LEASE.ttl + 0.5)
    sim.wipe(other)
    never(sim, 3.0, lambda: sim.primaries() != [], "the wiped member led")
    assert "wiped or replaced" in str(sim.statistics(other)["reason"])
    sim.restart(new)
    sim.restart(old)
    sim.wait_converged(timeout=8.0)
    assert all(sim.holds(n, w) for n in sim.ids for w in acked)


# ---- the leased arbiter driven directly: answers that arrive out of turn -----------------------
#
# Over one connection the simulated store answers in order; etcd's client multiplexes
# requests, so a read sent before a claim may be answered after it, and an answer
# may be settled late by a read-back. These drive the pure core with such answers.

STORED = SyncSet(3, (1, 2, 3), 1, ((1, "db-1"), (2, "db-2"), (3, "db-3")))


def heartbeat(epoch: int, seq: int) -> Append:
    return Append(epoch, seq, 0, [], STORED, (1, 2, 3), -1)


def leased_core() -> ReplicaCore:
    """Node 1, electing at (1, 5) with a lease, the stored set naming all three."""
    core = ReplicaCore(
        1,
        (1, 2, 3),
        Timing(),
        NodeState(1, 1, 1),
        Position(1, 5),
        STORED,
        0.0,
        history=[(1, 1)],
        database="db-1",
        arbiter=LeasedArbiter(LEASE),
    )
    core.on_arbiter(0.0, LeaseRenewed(0.0))
    return core


def view(leader: int | None, epoch: int) -> ArbiterView:
    members = {n: MemberInfo(n, Position(1, 5), f"db-{n}") for n in (1, 2, 3)}
    return ArbiterView(leader, epoch if leader else 0, epoch, STORED, 7, members)


def claim(core: ReplicaCore, now: float) -> ClaimLeader:
    core.on_arbiter(now, view(None, 1))
    claims = [e for e in core.tick(now + 0.01) if isinstance(e, ClaimLeader)]
    assert claims == [ClaimLeader(2, 1, 7)], claims
    return claims[0]


def test_e1_a_read_older_than_the_claim_does_not_depose_the_new_primary() -> None:
    core = leased_core()
    claim(core, 0.1)
    core.on_arbiter(0.12, Claimed(2))
    assert core.role is Role.PRIMARY
    # Read before the claim was applied (the store's epoch still 1), answered after.
    effects = core.on_arbiter(0.13, view(None, 1))
    assert core.role is Role.PRIMARY, effects
    assert not any(isinstance(e, ReleaseLeader) for e in effects)
    # A read that follows the claim and finds the key gone still deposes it.
    core.on_arbiter(0.5, view(None, 2))
    assert core.statistics()["role"] == "electing"


def test_e1_a_claim_settled_after_the_node_saw_a_newer_epoch_is_given_back() -> None:
    core = leased_core()
    claim(core, 0.1)
    # Before the claim's answer: a primary of epoch 3 streams to us, then goes silent.
    core.on_message(0.2, 2, heartbeat(3, 5))
    assert core.role is Role.BACKUP
    for tick in range(1, 40):
        core.tick(0.2 + tick * 0.02)
    assert core.statistics()["role"] == "electing"
    effects = core.on_arbiter(1.0, Claimed(2))
    assert core.statistics()["role"] == "electing", "led epoch 2 after seeing epoch 3"
    assert core.epoch == 3
    assert ReleaseLeader() in effects


def test_a_claim_settled_after_the_disk_refused_a_write_is_given_back() -> None:
    """No election makes a node whose disk refuses writes primary: one whose disk
    failed between its claim and the answer gives the key back for another member
    to take, rather than lead a reign it cannot write (with heirs it would not even
    step aside: it took the role after the fault was reported)."""
    core = leased_core()
    claim(core, 0.1)
    core.on_storage_fault(0.11, "the disk is full")
    effects = core.on_arbiter(0.12, Claimed(2))
    assert core.statistics()["role"] == "electing", effects
    assert not any(isinstance(e, BecomePrimary) for e in effects)
    assert ReleaseLeader() in effects


def test_e3_an_answer_to_a_previous_reign_sync_set_write_is_ignored() -> None:
    core = leased_core()
    claim(core, 0.1)
    effects = core.on_arbiter(0.12, Claimed(2))
    assert any(isinstance(e, BecomePrimary) for e in effects)
    first = SyncSet(4, (1, 2, 3), 2, STORED.databases)
    writes = [e for e in core.on_sealed(0.13, 6, first) if isinstance(e, StoreSyncSet)]
    assert [w.seq for w in writes] == [6]
    # The lease is lost before the answer: the node steps down, claims again, and
    # its new reign seals its first record and writes it.
    core.on_arbiter(0.2, LeaseLost("expired"))
    core.on_arbiter(0.3, LeaseRenewed(0.3))
    core.on_arbiter(0.65, view(None, 2))
    claims = [e for e in core.tick(0.66) if isinstance(e, ClaimLeader)]
    assert claims == [ClaimLeader(3, 2, 7)], claims
    core.on_arbiter(0.67, Claimed(3))
    second = SyncSet(5, (1, 2, 3), 3, STORED.databases)
    writes = [e for e in core.on_sealed(0.68, 7, second) if isinstance(e, StoreSyncSet)]
    assert [w.seq for w in writes] == [7]
    # The first reign's write is answered only now: it concerns no write in flight.
    core.on_arbiter(0.69, SyncSetRefused(6, "compare failed", retry=False, epoch=2))
    assert core.statistics()["role"] == "primary"
    core.on_arbiter(0.7, SyncSetStored(6, 9, epoch=2))
    stored = [e for e in core.tick(0.72) if isinstance(e, StoreSyncSet)]
    assert stored == [], "a second write of the sync set while one is in flight"


def test_e3_a_late_answer_for_a_reused_seq_of_an_earlier_reign_is_ignored() -> None:
    """After a rewind a later reign may seal a change at the very seq an earlier
    reign's write had: the earlier answer, arriving late, must not put the later
    change in effect (its set is not the one stored)."""
    core = leased_core()
    claim(core, 0.1)
    core.on_arbiter(0.12, Claimed(2))
    first = SyncSet(4, (1, 2, 3), 2, STORED.databases)
    writes = [e for e in core.on_sealed(0.13, 7, first) if isinstance(e, StoreSyncSet)]
    assert [(w.seq, w.sync_set.epoch) for w in writes] == [(7, 2)]
    core.on_arbiter(0.2, LeaseLost("expired"))
    core.on_arbiter(0.3, LeaseRenewed(0.3))
    core.on_arbiter(0.65, view(None, 2))
    assert [e for e in core.tick(0.66) if isinstance(e, ClaimLeader)]
    core.on_arbiter(0.67, Claimed(3))
    second = SyncSet(5, (1, 2, 3), 3, STORED.databases)
    writes = [e for e in core.on_sealed(0.68, 7, second) if isinstance(e, StoreSyncSet)]
    assert [(w.seq, w.sync_set.epoch) for w in writes] == [(7, 3)]
    core.on_arbiter(0.69, SyncSetStored(7, 9, epoch=2))
    pending = {seq for seq, _ in core.pending_changes}
    assert 7 in pending, "the answer to epoch 2's write put epoch 3's change in effect"
    core.on_arbiter(0.7, SyncSetStored(7, 10, epoch=3))
    assert core.pending_changes == ()
