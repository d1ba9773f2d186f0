"""The replication core (SPEC section 6) over a simulated network, one scenario per rule.

Every scenario runs three (or one) ``ReplicaCore`` objects in ``tests/unit/sim.py``:
in-memory logs, a message queue, simulated time. Nothing sleeps and nothing is
random except seeded choices, so each test is the same run every time. The
simulator asserts as it goes that every message fits the wire schema, that an
epoch is persisted before it is used (R1) and that everything acknowledged is
held by every member of the ack set (R2). ``check_invariants`` then asserts what
the SPEC promises: every acknowledged write is in the primary's log (and, once
converged, in every log: G1), the logs are identical (G4), no write appears
twice (G3), one primary per epoch and epochs that only grow (R1).

Partitions are not part of the fault model (the product does not survive them
without split brain), so no test expects safety under one. Slow links are:
a backup that is merely slow must not break any rule.

Several scenarios, and seeds of the random runs, reproduce bugs this suite
found in the core (a stale probe round reused, a decision on partial probe
answers, an unconfirmed voter blocking R5, a thawed primary confirming
backups, waiting not logged); they stay as regression tests.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

import pytest

from service.replication.state import (
    Persist,
    ReplicaCore,
    Role,
    Send,
    StepDown,
    Timing,
    divergence_point,
    epoch_end,
)
from service.storage import NodeState, Position, SyncSet
from tests.unit.sim import ClientWrite, SimNetwork

TIMING = Timing()


def started(nodes: int = 3, jitter: float = 0.0, seed: int = 0) -> SimNetwork:
    """A cluster that has elected its first primary and converged."""
    sim = SimNetwork(nodes, jitter=jitter, seed=seed)
    sim.wait_converged(timeout=2.0)
    return sim


def write(sim: SimNetwork, node: int) -> ClientWrite:
    written = sim.write(node)
    assert written is not None, f"node {node} is not primary\n{sim.describe()}"
    return written


def write_acked(
    sim: SimNetwork, node: int, count: int = 1, timeout: float = 2.0
) -> list[ClientWrite]:
    writes = [write(sim, node) for _ in range(count)]
    sim.wait_for(lambda: all(sim.is_acked(w) for w in writes), timeout, f"{count} writes acked")
    return writes


def ack_time(sim: SimNetwork, written: ClientWrite) -> float:
    at = sim.acked_at(written)
    assert at is not None, f"{written} was not acknowledged"
    return at


def sync_members(sim: SimNetwork, node: int) -> tuple[int, ...]:
    return tuple(sim.statistics(node)["sync_set"]["members"])


def held_everywhere(sim: SimNetwork, writes: list[ClientWrite], nodes: tuple[int, ...]) -> bool:
    return all(sim.holds(n, w) for n in nodes for w in writes)


def never(sim: SimNetwork, seconds: float, predicate: Callable[[], object], what: str) -> None:
    """Advance ``seconds`` step by step; fail as soon as ``predicate()`` holds."""
    end = sim.now + seconds
    while True:
        assert not predicate(), f"{what}\n{sim.describe()}"
        if sim.now >= end - 1e-9:
            return
        sim.advance(min(sim.step, end - sim.now))


def write_for(sim: SimNetwork, node: int, seconds: float, every: float = 0.05) -> None:
    """A steady stream of client writes on ``node``."""
    end = sim.now + seconds
    while sim.now < end - 1e-9:
        write(sim, node)
        sim.advance(every)


# ---- pure decisions: epoch_end and divergence_point (R4, after Kafka's KIP-101) ---------


@pytest.mark.parametrize(
    ("history", "last_seq", "epoch", "expected"),
    [
        pytest.param([(1, 1), (2, 4), (4, 9)], 15, 1, 3, id="first"),
        pytest.param([(1, 1), (2, 4), (4, 9)], 15, 2, 8, id="middle"),
        pytest.param([(1, 1), (2, 4), (4, 9)], 15, 4, 15, id="last-is-position"),
        pytest.param([(1, 1), (2, 4), (4, 9)], 15, 3, None, id="skipped-epoch"),
        pytest.param([(1, 1), (2, 4), (4, 9)], 15, 5, None, id="future-epoch"),
        pytest.param([], 0, 1, None, id="empty"),
        pytest.param([(3, 1)], 1, 3, 1, id="one-record"),
    ],
)
def test_r4_epoch_end(
    history: list[tuple[int, int]], last_seq: int, epoch: int, expected: int | None
) -> None:
    assert epoch_end(history, last_seq, epoch) == expected


@pytest.mark.parametrize(
    ("primary", "primary_last", "backup", "backup_last", "expected"),
    [
        pytest.param([(1, 1)], 10, [(1, 1)], 10, 10, id="identical"),
        pytest.param([(1, 1), (2, 6)], 12, [(1, 1), (2, 6)], 8, 8, id="behind-same-epoch"),
        pytest.param([(1, 1), (2, 6)], 12, [(1, 1)], 4, 4, id="behind-older-epoch"),
        # an old primary wrote 6..10 in epoch 1 that nobody got; epoch 2 began at 6
        pytest.param([(1, 1), (2, 6)], 12, [(1, 1)], 10, 5, id="old-primary-ahead"),
        # KIP-101 scenario 1: the backup ends before the new epoch: no truncation
        pytest.param([(1, 1), (2, 3)], 3, [(1, 1)], 2, 2, id="kip101-no-truncation"),
        # KIP-101 scenario 2: same length, different records at seq 2
        pytest.param([(1, 1), (2, 2)], 2, [(1, 1)], 2, 1, id="kip101-replica-divergence"),
        # the backup had an epoch the primary never saw: keep up to the shared epoch's end
        pytest.param([(1, 1), (3, 8)], 12, [(1, 1), (2, 6)], 9, 5, id="unknown-backup-epoch"),
        pytest.param(
            [(1, 1), (2, 4), (4, 9)], 15, [(1, 1), (2, 4), (3, 7)], 8, 6, id="shared-middle"
        ),
        # the primary went on in epoch 1 past where the backup's own epoch 2 began
        pytest.param([(1, 1), (3, 9)], 12, [(1, 1), (2, 6)], 7, 5, id="primary-longer-epoch"),
        pytest.param([(2, 1)], 5, [(1, 1)], 3, 0, id="nothing-shared"),
        pytest.param([(1, 1)], 5, [], 0, 0, id="empty-backup"),
        # cannot happen with one primary per epoch; the primary's end still bounds it
        pytest.param([(1, 1), (2, 6)], 7, [(1, 1), (2, 6)], 9, 7, id="ahead-in-current-epoch"),
    ],
)
def test_r4_divergence_point(
    primary: list[tuple[int, int]],
    primary_last: int,
    backup: list[tuple[int, int]],
    backup_last: int,
    expected: int,
) -> None:
    assert divergence_point(primary, primary_last, backup, backup_last) == expected


# ---- the simulator's own mechanics ------------------------------------------------------------


def test_simulator_partition_drops_messages_until_heal() -> None:
    """Partitions are outside the fault model: this checks only the simulator.

    No client writes, so nothing can be lost; the isolated primary is replaced,
    and after ``heal`` it learns the new epoch and the logs converge.
    """
    sim = started()
    sim.advance(0.5)  # the backups are confirmed
    sim.partition({1}, {2, 3})
    sent = len(sim.sent)
    sim.advance(2.0)
    assert any(src == 1 for _t, src, _dst, _m in sim.sent[sent:]), "node 1 kept sending"
    assert sorted(sim.primaries()) == [1, 2]
    sim.heal()
    assert sim.wait_converged(timeout=3.0) == 2


# ---- start ----------------------------------------------------------------------------------


def test_r6_fresh_cluster_elects_exactly_one_primary_the_lowest_id() -> None:
    sim = SimNetwork()
    assert sim.wait_primary(timeout=1.0) == 1
    assert [(e.node, e.epoch) for e in sim.elections] == [(1, 1)]
    sim.wait_converged(timeout=2.0)
    assert sync_members(sim, 1) == (1, 2, 3)
    assert [sim.statistics(n)["primary"] for n in (2, 3)] == [1, 1]
    kinds = {message["type"] for _t, _src, _dst, message in sim.sent}
    assert {"probe", "probe_reply", "vote_request", "vote", "append", "ack", "join"} <= kinds
    sim.advance(5.0)
    assert len(sim.elections) == 1, "a healthy cluster holds no further election"
    sim.check_invariants(converged=True)


def test_r6_fresh_cluster_waits_for_every_configured_node() -> None:
    sim = SimNetwork(started=False)
    sim.restart(2)
    sim.restart(3)
    never(sim, 3.0, sim.primaries, "elected without node 1")
    assert sim.statistics(2)["waiting_for"] == [1]
    sim.restart(1)
    assert sim.wait_primary(timeout=1.0) == 1


def test_r6_single_node_cluster_elects_itself_and_acks_alone() -> None:
    sim = SimNetwork(nodes=1)
    assert sim.wait_primary(timeout=0.5) == 1
    writes = write_acked(sim, 1, count=3, timeout=0.01)
    assert [w.seq for w in writes] == [2, 3, 4]
    sim.check_invariants(converged=True)


# ---- R2, R3, R4, R7: the sync set ---------------------------------------------------------------


def test_r2_write_is_acked_only_after_every_sync_set_member_applied_it() -> None:
    sim = started()
    written = write(sim, 1)
    assert not sim.is_acked(written), "acknowledged before any backup had it"
    sim.wait_for(lambda: sim.is_acked(written), 0.5, "the write acked")
    for node in (2, 3):
        assert sim.durable_at[(node, written.seq)] <= ack_time(sim, written)


def test_r7_watermark_stays_below_unacknowledged_writes() -> None:
    sim = started()
    sim.freeze(3)
    written = write(sim, 1)
    sim.advance(0.5)
    assert sim.statistics(1)["watermark"] < written.seq
    sim.wait_for(lambda: sim.is_acked(written), 2.0, "the write acked without node 3")
    assert sim.statistics(1)["watermark"] >= written.seq


def test_r3_a_later_shrink_is_not_blocked_by_an_earlier_one_waiting_on_a_frozen_member() -> None:
    """Freeze 2, kill 3: "drop 3" needs the frozen 2 to hold it and never takes effect;
    "drop 2" after the sync timeout must still let the primary acknowledge alone (G2)."""
    sim = started()
    write_acked(sim, 1, count=2)
    sim.freeze(2)
    sim.kill(3)
    written = write(sim, 1)
    sim.wait_for(
        lambda: sim.is_acked(written), TIMING.sync_timeout + 1.0, "the primary acked alone"
    )
    assert sync_members(sim, 1) == (1,)


def test_r3_frozen_backup_holds_acks_until_the_sync_timeout_drops_it() -> None:
    sim = started()
    write_acked(sim, 1, count=2)
    frozen_at = sim.now
    sim.freeze(3)
    written = write(sim, 1)
    never(sim, TIMING.sync_timeout - 0.2, lambda: sim.is_acked(written), "acked without node 3")
    sim.wait_for(lambda: sim.is_acked(written), 1.0, "the write acked once node 3 is dropped")
    acked_at = ack_time(sim, written)
    assert acked_at - frozen_at >= TIMING.sync_timeout
    assert sync_members(sim, 1) == (1, 2)
    # The smaller set was committed on the remaining member before the ack.
    change = next(s for _e, s, p in reversed(sim.nodes[1].log.records) if p.startswith("{"))
    assert change > written.seq
    assert sim.durable_at[(2, change)] <= acked_at
    write_acked(sim, 1, count=3, timeout=0.05)  # and writes go on without node 3
    sim.check_invariants()


def test_r4_thawed_backup_catches_up_and_reenters_the_sync_set() -> None:
    sim = started()
    sim.freeze(3)
    sim.wait_for(lambda: sync_members(sim, 1) == (1, 2), 3.0, "node 3 dropped")
    acked = write_acked(sim, 1, count=40)  # more than one catch-up frame
    sim.thaw(3)
    sim.wait_converged(timeout=3.0)
    assert sync_members(sim, 1) == (1, 2, 3)
    assert held_everywhere(sim, acked, (3,))
    sim.freeze(3)  # back in the set: writes wait for node 3 again
    written = write(sim, 1)
    never(sim, 1.0, lambda: sim.is_acked(written), "acked without node 3 after it re-entered")


def test_r4_crashed_backup_rejoins_and_reenters_the_sync_set() -> None:
    sim = started()
    sim.kill(2)  # a closed connection is an immediate signal: dropped at once
    write_acked(sim, 1, count=5, timeout=0.05)
    assert sync_members(sim, 1) == (1, 3)
    sim.restart(2)
    sim.wait_converged(timeout=3.0)
    assert sync_members(sim, 1) == (1, 2, 3)


def test_r4_backup_gets_a_snapshot_when_the_primary_log_was_pruned() -> None:
    sim = started()
    sim.kill(3)
    acked = write_acked(sim, 1, count=30)
    sim.prune(1, keep=5)
    sim.restart(3)
    sim.wait_converged(timeout=3.0)
    catch_up = sim.logged("catch-up start", node=1)[-1].fields
    assert (catch_up["backup"], catch_up["snapshot"]) == (3, "true")
    assert held_everywhere(sim, acked[-5:], (3,))
    write_acked(sim, 1, count=2)


def test_r4_old_primary_rewinds_records_it_never_replicated() -> None:
    sim = started()
    acked = write_acked(sim, 1, count=5)
    sim.advance(0.5)
    lost = [write(sim, 1) for _ in range(3)]
    sim.kill(1)  # the frames were still in flight: only node 1 holds the three records
    assert held_everywhere(sim, lost, (1,))
    primary = sim.wait_primary(timeout=1.0)
    acked += write_acked(sim, primary, count=4)
    sim.restart(1)
    sim.wait_converged(timeout=3.0)
    assert {payload for _e, _s, payload in sim.nodes[1].rolled_back} == {w.payload for w in lost}
    assert held_everywhere(sim, acked, (1, 2, 3))
    assert not any(sim.holds(n, w) for n in (1, 2, 3) for w in lost)


# ---- R5: who may take over ----------------------------------------------------------------------


def test_r5_confirmed_backup_takes_over_quickly_after_the_primary_crashes() -> None:
    sim = started()
    acked = write_acked(sim, 1, count=5)
    sim.advance(0.5)
    killed_at = sim.now
    sim.kill(1)
    assert sim.wait_primary(timeout=1.0) == 2, "equal positions: the lowest id wins"
    took = sim.elections[-1].time - killed_at
    assert took < 0.2, f"takeover took {took:.3f}s"
    assert sim.elections[-1].epoch == 2
    sim.check_invariants()
    acked += write_acked(sim, 2, count=3)
    sim.restart(1)
    sim.wait_converged(timeout=3.0)
    assert held_everywhere(sim, acked, (1, 2, 3))


def test_r5_backup_with_the_highest_position_takes_over() -> None:
    sim = started()
    sim.advance(0.5)
    sim.set_delay(1, 2, 0.02)  # node 2 receives records later than node 3
    written = write(sim, 1)
    sim.advance(0.005)
    assert sim.holds(3, written)
    assert not sim.holds(2, written)
    sim.kill(1)
    assert sim.wait_primary(timeout=1.0) == 3
    sim.wait_converged(timeout=2.0)
    assert sim.holds(2, written), "the unacknowledged write survives on the new primary"


def test_r5_slow_backup_is_dropped_and_cannot_take_over_alone() -> None:
    sim = started()
    sim.advance(0.5)
    sim.slow(3, 0.5)  # delayed, not frozen: frames still arrive every 100 ms
    deadline = sim.now + 5.0
    while 3 in sim.core(1).effective:
        assert sim.now < deadline, "the slow backup was never dropped"
        write_for(sim, 1, 0.1)
    write_for(sim, 1, 1.0)
    assert not sim.statistics(3)["confirmed"], "the dropped backup believes it is confirmed"
    sim.kill(1)
    sim.kill(2)
    never(sim, 5.0, sim.primaries, "the dropped backup took over alone")
    assert sim.statistics(3)["waiting_for"] == [1, 2]
    sim.check_invariants()


def test_r5_unconfirmed_backup_with_a_newer_position_does_not_block_the_takeover() -> None:
    """Node 3 was dropped (its acks are slow) but still receives records first.

    When the primary dies, node 2 is the only confirmed node: R5 makes it the
    primary, and node 3's extra record (never acknowledged) is rewound.
    """
    sim = started()
    sim.advance(0.5)
    sim.set_delay(3, 1, 1.0)
    deadline = sim.now + 5.0
    while 3 in sim.core(1).effective:
        assert sim.now < deadline, "the slow backup was never dropped"
        write_for(sim, 1, 0.1)
    write_for(sim, 1, 0.3)
    sim.set_delay(1, 2, 0.02)
    written = write(sim, 1)
    sim.advance(0.005)
    assert sim.holds(3, written)
    assert not sim.holds(2, written)
    sim.kill(1)
    assert sim.wait_primary(timeout=3.0) == 2
    sim.wait_converged(timeout=5.0)
    assert not held_everywhere(sim, [written], (3,))


@pytest.mark.parametrize(("first", "second"), list(itertools.permutations((1, 2, 3), 2)))
def test_g2_any_two_nodes_may_be_down(first: int, second: int) -> None:
    sim = started()
    acked = write_acked(sim, 1, count=3)
    sim.advance(0.5)
    sim.kill(first)
    sim.advance(0.3)  # the survivors notice (and elect, if the primary died)
    sim.kill(second)
    survivor = ({1, 2, 3} - {first, second}).pop()
    assert sim.wait_primary(timeout=3.0) == survivor
    sim.wait_for(lambda: sync_members(sim, survivor) == (survivor,), 3.0, "the dead dropped")
    acked += write_acked(sim, survivor, count=3, timeout=0.05)
    sim.check_invariants(converged=True)
    assert held_everywhere(sim, acked, (survivor,))
    sim.restart(first)
    sim.restart(second)
    sim.wait_converged(timeout=5.0)
    assert held_everywhere(sim, acked, (1, 2, 3))


def test_g2_two_nodes_crashing_at_the_same_instant() -> None:
    sim = started()
    acked = write_acked(sim, 1, count=3)
    sim.advance(0.5)
    sim.kill(1)
    sim.kill(2)
    assert sim.wait_primary(timeout=1.0) == 3
    acked += write_acked(sim, 3, count=2, timeout=0.05)
    assert held_everywhere(sim, acked, (3,))
    sim.check_invariants()


# ---- R6, G5: full restart ---------------------------------------------------------------------


def stale_node_3_then_all_killed() -> tuple[SimNetwork, list[ClientWrite]]:
    """Node 3 dies first; writes are acked on 1 and 2; then 1 and 2 die at one instant."""
    sim = started()
    acked = write_acked(sim, 1, count=3)
    sim.kill(3)
    acked += write_acked(sim, 1, count=5)
    assert sync_members(sim, 1) == (1, 2)
    sim.advance(0.5)
    sim.kill(1)
    sim.kill(2)
    return sim, acked


@pytest.mark.parametrize("order", list(itertools.permutations((1, 2, 3))))
def test_r6_full_restart_waits_for_the_newest_sync_set(order: tuple[int, ...]) -> None:
    sim, acked = stale_node_3_then_all_killed()
    back: list[int] = []
    for node in order:
        sim.restart(node)
        back.append(node)
        if {1, 2} <= set(back):
            break
        never(sim, 3.0, sim.primaries, f"a primary with only {back} back")
        # Nodes 1 and 2 know the newer set (1, 2); node 3 only the set it was dropped from.
        newest = (1, 2) if {1, 2} & set(back) else (1, 2, 3)
        missing = [m for m in newest if m not in back]
        for waiting in back:
            assert sim.statistics(waiting)["waiting_for"] == missing
    for node in order:
        if node not in back:
            sim.restart(node)
    assert sim.wait_primary(timeout=2.0) == 1, "equal positions among 1 and 2: lowest id"
    sim.wait_converged(timeout=3.0)
    assert held_everywhere(sim, acked, (1, 2, 3))


def test_r6_node_whose_newest_sync_set_is_only_itself_starts_alone() -> None:
    sim = started()
    sim.kill(3)
    write_acked(sim, 1, count=2)
    sim.kill(2)
    sim.wait_for(lambda: sync_members(sim, 1) == (1,), 1.0, "node 1 alone in the sync set")
    acked = write_acked(sim, 1, count=2, timeout=0.05)
    sim.kill(1)
    sim.restart(1)
    assert sim.wait_primary(timeout=2.0) == 1
    assert held_everywhere(sim, acked, (1,))
    sim.restart(2)
    sim.restart(3)
    sim.wait_converged(timeout=3.0)
    assert held_everywhere(sim, acked, (1, 2, 3))


def test_g5_stale_nodes_never_become_primary_without_the_last_one() -> None:
    sim = started()
    sim.kill(3)
    write_acked(sim, 1, count=2)
    sim.kill(2)
    acked = write_acked(sim, 1, count=2, timeout=0.2)  # only node 1 holds these
    sim.kill(1)
    sim.restart(2)
    sim.restart(3)
    never(sim, 5.0, sim.primaries, "a stale node became primary")
    for node in (2, 3):
        assert sim.statistics(node)["waiting_for"] == [1]
    sim.restart(1)
    assert sim.wait_primary(timeout=2.0) == 1
    sim.wait_converged(timeout=3.0)
    assert held_everywhere(sim, acked, (1, 2, 3))


def test_g5_waiting_is_logged_naming_the_missing_nodes() -> None:
    sim, _acked = stale_node_3_then_all_killed()
    restarted_at = sim.now
    sim.restart(3)
    sim.advance(2.0)
    assert sim.statistics(3)["waiting_for"] == [1, 2]
    said = [
        str(e.fields)
        for e in sim.events
        if e.node == 3 and e.time >= restarted_at and "wait" in e.event + str(e.fields)
    ]
    assert any("1" in text and "2" in text for text in said), "no log line names nodes 1, 2"


def test_g5_force_promote_makes_a_waiting_node_primary() -> None:
    sim, _acked = stale_node_3_then_all_killed()
    sim.restart(3)
    never(sim, 2.0, sim.primaries, "node 3 elected itself")
    sim.force_promote(3)
    assert sim.wait_primary(timeout=1.0) == 3
    assert sim.logged("forced promotion requested", node=3)
    assert sim.logged("became primary", node=3)[-1].fields["force"] == "true"
    assert sim.elections[-1].force
    forced = write_acked(sim, 3, count=2, timeout=0.05)
    # The others return, follow the forced primary and rewind what it lacks (G4);
    # writes acknowledged before the forced promotion may be lost, by design.
    sim.restart(1)
    sim.restart(2)
    sim.wait_converged(timeout=3.0)
    assert held_everywhere(sim, forced, (1, 2, 3))


# ---- R1: epochs fence; the freeze rule ---------------------------------------------------------


def test_r1_backup_refuses_frames_from_a_lower_epoch() -> None:
    sync_set = SyncSet(2, (1, 2, 3), 3)
    core = ReplicaCore(2, (1, 2, 3), TIMING, NodeState(3, 3, 1), Position(3, 5), sync_set, 10.0)
    frame = {
        "type": "append",
        "epoch": 2,
        "seq": 7,
        "watermark": 5,
        "records": [[2, 6, "x"]],
        "sync_set": {"version": 1, "members": [1, 2, 3], "epoch": 2},
        "in_sync": [1, 2, 3],
        "echo": -1,
    }
    assert core.on_message(10.01, 1, frame) == [Send(1, {"type": "reject", "epoch": 3})]
    assert core.epoch == 3


def test_r1_primary_steps_down_on_a_higher_epoch() -> None:
    sim = started()
    core = sim.core(1)
    effects = core.on_message(sim.now, 2, {"type": "reject", "epoch": 5})
    assert core.role is Role.ELECTING
    assert core.epoch == 5
    kinds = [type(effect) for effect in effects]
    assert kinds.index(Persist) < kinds.index(StepDown)


def test_r1_frozen_primary_is_replaced_and_steps_down_on_thaw() -> None:
    sim = started()
    acked = write_acked(sim, 1, count=5)
    sim.advance(0.5)  # nothing in flight: any later ack by node 1 would be a new one
    sim.freeze(1)
    primary = sim.wait_primary(timeout=2.0, among=(2, 3))
    elected = sim.elections[-1]
    assert elected.epoch == 2
    acked += write_acked(sim, primary, count=3)
    sim.advance(1.0)
    sim.thaw(1)
    stale = sim.write(1)  # a client still connected to the old primary
    assert stale is not None, "the thawed primary cannot know of epoch 2 yet"
    sim.wait_converged(timeout=3.0)
    assert (sim.core(1).role, sim.core(1).epoch) == (Role.BACKUP, 2)
    late = [a for a in sim.acks if a.node == 1 and a.epoch == 1 and a.time >= elected.time]
    assert not late, f"the old primary acknowledged in epoch 1 after epoch 2 began: {late}"
    assert not sim.is_acked(stale)
    assert not any(sim.holds(n, stale) for n in (1, 2, 3))
    assert held_everywhere(sim, acked, (1, 2, 3))


def test_r1_thawed_old_primary_alone_never_acknowledges_in_its_old_epoch() -> None:
    sim = started()
    write_acked(sim, 1, count=3)
    sim.advance(0.5)
    sim.freeze(1)
    primary = sim.wait_primary(timeout=2.0, among=(2, 3))
    acked = write_acked(sim, primary, count=3)
    sim.kill(2)
    sim.kill(3)
    sim.thaw(1)  # its connections closed while it was stopped
    stale = [write(sim, 1) for _ in range(3)]
    thawed_at = sim.now
    never(sim, 5.0, lambda: [a for a in sim.acks if a.time >= thawed_at], "node 1 acked alone")
    assert sync_members(sim, 1) == (1, 2, 3), "the thawed primary shrank its sync set"
    sim.restart(2)
    sim.restart(3)
    sim.wait_primary(timeout=3.0, among=(2, 3))
    sim.wait_converged(timeout=3.0)
    assert held_everywhere(sim, acked, (1, 2, 3))
    assert not any(sim.holds(n, w) for n in (1, 2, 3) for w in stale)


def test_r5_backup_confirmed_by_a_thawed_stale_primary_is_not_eligible() -> None:
    """Node 1 is frozen and replaced by node 2, which acknowledges alone; node 2 dies.

    Thawed, node 1 still believes it is the primary of epoch 1. Node 3 restarts,
    knows only epoch 1 and follows it. Node 1 has not heard from node 2 since its
    clock gap, so it cannot know that nobody acknowledged without node 3: it must
    not confirm node 3, or node 3 could take over without node 2's writes.
    """
    sim = started()
    write_acked(sim, 1, count=3)
    sim.advance(0.5)
    sim.freeze(1)
    sim.kill(3)
    assert sim.wait_primary(timeout=2.0, among=(2,)) == 2
    acked = write_acked(sim, 2, count=3)
    sim.kill(2)
    sim.thaw(1)
    sim.restart(3)
    sim.wait_for(lambda: sim.core(3).role is Role.BACKUP, 1.0, "node 3 follows node 1")
    never(sim, 1.0, lambda: sim.statistics(3)["confirmed"], "a stale primary confirmed node 3")
    sim.restart(2)
    assert sim.wait_primary(timeout=3.0, among=(2,)) == 2
    sim.wait_converged(timeout=3.0)
    assert held_everywhere(sim, acked, (1, 2, 3))


def test_r1_one_primary_per_epoch_when_backups_hear_each_other_slowly() -> None:
    """Answers between the two backups take longer than the election timeout."""
    sim = started()
    acked = write_acked(sim, 1, count=3)
    sim.advance(0.5)
    sim.set_delay(2, 3, 0.4)
    sim.set_delay(3, 2, 0.4)
    sim.kill(1)
    sim.advance(2.0)
    sim.check_invariants()
    sim.set_delay(2, 3, sim.delay)
    sim.set_delay(3, 2, sim.delay)
    sim.wait_converged(timeout=3.0)
    assert held_everywhere(sim, acked, (2, 3))


def test_r1_new_election_probes_afresh_after_an_epoch_adopted_from_a_probe() -> None:
    """Node 1 restarts in epoch 1 and adopts epoch 2 from a probe reply mid-round.

    When primary 2 dies, node 1 must start a new probe round, not decide at once
    from the answers of the round it abandoned (none): it would campaign alone.
    """
    sim = started()
    sim.advance(0.5)
    sim.kill(1)
    assert sim.wait_primary(timeout=1.0) == 2
    sim.restart(1)
    sim.wait_converged(timeout=2.0)
    acked = write_acked(sim, 2, count=3)
    sim.advance(0.5)
    killed_at = sim.now
    sim.kill(2)
    primary = sim.wait_primary(timeout=1.0)
    other = 3 if primary == 1 else 1
    probed = [
        m
        for t, src, dst, m in sim.sent
        if t >= killed_at and (src, dst, m["type"]) == (primary, other, "probe")
    ]
    assert probed, f"node {primary} decided without probing node {other}"
    first = next(e for e in sim.logged("sync set changed", node=primary) if e.time >= killed_at)
    assert first.fields["members"] == "1,3", "the voter at the same position joins the set"
    sim.restart(2)
    sim.wait_converged(timeout=3.0)
    assert held_everywhere(sim, acked, (1, 2, 3))


# ---- back-to-back failovers ----------------------------------------------------------------------


def test_r5_backups_not_linked_to_each_other_are_not_confirmed_so_cannot_both_take_over() -> None:
    """Node 3 restarts and links to the primary but not (yet) to node 2, whose dialer
    is in backoff. Were both counted as confirmed, each would see only itself when the
    primary dies and both would win the same epoch. Neither is confirmed while they
    are not linked, so they wait for the primary (R6) and one primary is elected."""
    sim = started()
    write_acked(sim, 1, count=2)
    sim.kill(3)
    sim.hold_link(2, 3)
    sim.restart(3)
    sim.wait_for(lambda: sync_members(sim, 1) == (1, 2, 3), 3.0, "node 3 back in the sync set")
    write_acked(sim, 1, count=3)
    # Node 3 is never confirmed while unlinked to 2; node 2's confirmation from before
    # node 3 rejoined runs out, and is not renewed while 2 is unlinked to a member.
    assert not sim.statistics(3)["confirmed"]
    sim.advance(TIMING.confirm_window + 0.3)
    assert not sim.statistics(2)["confirmed"]
    assert not sim.statistics(3)["confirmed"]
    sim.kill(1)
    sim.advance(2.0)
    assert sim.primaries() == [], f"someone took over without proof\n{sim.describe()}"
    sim.restart(1)
    sim.wait_primary(timeout=3.0)
    sim.release_link(2, 3)
    sim.wait_converged(timeout=5.0)


def test_freeze_rule_a_short_machine_stall_of_the_backups_does_not_block_failover() -> None:
    """The primary freezes, and both backups stall together for 0.8 s (a busy
    machine): they see a gap in their clocks, but their confirmation, anchored to
    their acks, still holds; having heard each other afresh they elect one of them."""
    sim = started()
    write_acked(sim, 1, count=2)
    sim.freeze(1)
    sim.advance(0.05)
    sim.freeze(2)
    sim.freeze(3)
    sim.advance(0.8)
    sim.thaw(2)
    sim.thaw(3)
    assert sim.wait_primary(timeout=1.0, among=(2, 3)) in (2, 3)
    assert sim.logged("clock gap", 2)


def test_freeze_rule_a_thawed_backup_never_takes_over_alone_without_hearing_a_peer() -> None:
    """Node 2 stalls, and while it is stopped the primary and node 3 die. On thaw it
    is still within its confirmation window, but it heard no peer since the gap: it
    must not take over alone on that stale view."""
    sim = started()
    write_acked(sim, 1, count=2)
    sim.freeze(2)
    sim.advance(0.05)
    sim.kill(1)
    sim.kill(3)
    sim.advance(0.6)
    sim.thaw(2)
    sim.advance(1.0)
    assert sim.primaries() == []


def test_r5_back_to_back_failovers() -> None:
    sim = started()
    acked: list[ClientWrite] = []
    primary = 1
    for _round in range(5):
        acked += write_acked(sim, primary, count=4)
        sim.advance(0.5)
        sim.kill(primary)
        new = sim.wait_primary(timeout=1.0)
        assert new != primary
        acked += write_acked(sim, new, count=2)
        sim.restart(primary)
        sim.wait_converged(timeout=3.0)
        primary = new
    assert [e.epoch for e in sim.elections] == list(range(1, 7))
    assert held_everywhere(sim, acked, (1, 2, 3))


def test_r5_primary_killed_right_after_its_election() -> None:
    sim = started()
    acked = write_acked(sim, 1, count=3)
    sim.advance(0.5)
    sim.kill(1)
    second = sim.wait_primary(timeout=1.0)
    sim.kill(second)  # before its backup is confirmed in the new epoch
    sim.advance(3.0)
    sim.check_invariants()
    sim.restart(1)
    sim.restart(second)
    sim.wait_converged(timeout=5.0)
    assert held_everywhere(sim, acked, (1, 2, 3))


# ---- seeded random faults ----------------------------------------------------------------------


def random_faults(seed: int, slow_links: bool) -> None:
    """Crashes, restarts, freezes, thaws (and slow links) at random; then all heals.

    ``check_invariants`` runs after every step; at the end every node must
    converge and the cluster must acknowledge writes again.
    """
    rng = random.Random(seed)
    sim = started(jitter=0.002, seed=seed)
    for _step in range(40):
        primary = sim.primary()
        if primary is not None:
            for _ in range(rng.randint(0, 3)):
                sim.write(primary)
        action = rng.random()
        node = rng.choice(sim.ids)
        status = sim.nodes[node].status
        if action < 0.15 and status == "up":
            sim.kill(node)
        elif action < 0.25 and status == "up":
            sim.freeze(node)
        elif action < 0.5 and status == "down":
            sim.restart(node)
        elif action < 0.65 and status == "frozen":
            sim.thaw(node)
        elif action < 0.75 and slow_links:
            sim.slow(node, rng.choice((0.001, 0.001, 0.05, 0.3)))
        sim.advance(rng.choice((0.01, 0.05, 0.2, 0.7, 1.6)))
        sim.check_invariants()
    for node in sim.ids:
        sim.slow(node, sim.delay)
        if sim.nodes[node].status == "frozen":
            sim.thaw(node)
        elif sim.nodes[node].status == "down":
            sim.restart(node)
    sim.wait_converged(timeout=10.0)
    write_acked(sim, sim.wait_primary(), count=2)


@pytest.mark.parametrize("seed", range(16))
def test_g1_g4_random_crashes_and_freezes(seed: int) -> None:
    random_faults(seed, slow_links=False)


@pytest.mark.parametrize("seed", range(16))
def test_r1_g1_random_faults_with_slow_links(seed: int) -> None:
    random_faults(seed, slow_links=True)
