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
backups, a thawed primary counting acks sent while it was stopped, waiting not
logged); they stay as regression tests.

The last section runs the simulator with an fsync delay (the runtime's group
fsync: a commit reaches the disk later) and power losses, which keep only what
was on disk; R2 is then checked against the disk. Scenarios that show a core
bug found there are strict xfails naming it: fixing the bug makes them fail
until the marker is removed.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

import pytest

from service.replication.effects import BecomePrimary, Effect, Persist, Send, StepDown
from service.replication.election import PeerVoting, ProbeView, member_problem
from service.replication.messages import Ack, Append, Join, JoinReply, Probe, ProbeReply, Reject
from service.replication.state import ReplicaCore, Timing, divergence_point, epoch_end
from service.replication.types import LogRecord, NodeState, Position, Role, SyncSet
from tests.unit.sim import ClientWrite, SimNetwork

TIMING = Timing()


def started(
    nodes: int = 3, jitter: float = 0.0, seed: int = 0, fsync_delay: float = 0.0
) -> SimNetwork:
    """A cluster that has elected its first primary and converged."""
    sim = SimNetwork(nodes, jitter=jitter, seed=seed, fsync_delay=fsync_delay)
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
    while 3 in sim.core(1).in_sync:
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
    while 3 in sim.core(1).in_sync:
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
    frame = Append(
        epoch=2,
        seq=7,
        watermark=5,
        records=[LogRecord(2, 6, b"x")],
        sync_set=SyncSet(1, (1, 2, 3), 2),
        in_sync=(1, 2, 3),
        echo=-1,
    )
    assert core.on_message(10.01, 1, frame) == [Send(1, Reject(3))]
    assert core.epoch == 3


def test_r1_primary_steps_down_on_a_higher_epoch() -> None:
    sim = started()
    core = sim.core(1)
    effects = core.on_message(sim.now, 2, Reject(5))
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


def test_r1_g1_a_thawed_primary_counts_no_ack_sent_while_it_was_stopped() -> None:
    """Node 1 is frozen; acks node 3 sent meanwhile wait in its socket.

    Node 2 is down, node 1's frames reach node 3 slowly. Node 1 thaws and reads
    the acks node 3 sent while it was stopped; node 3, confirmed but not yet
    reached by node 1's new frames, takes over alone in epoch 2 (R5), acknowledges
    a write and dies before it told node 1 anything. Those old acks say nothing of
    what node 3 did since: node 1 must not count them as having heard from node 3
    since its clock gap, so it must not drop node 3 and acknowledge alone in
    epoch 1 (the writes of one epoch or the other would be lost).
    """
    sim = started()
    sim.kill(2)
    write_acked(sim, 1, count=3)
    assert sync_members(sim, 1) == (1, 3)
    sim.set_delay(1, 3, 0.3)
    sim.set_delay(3, 1, 0.3)
    write(sim, 1)  # in flight to node 3: its ack will be sent while node 1 is stopped
    sim.advance(0.01)
    sim.freeze(1)
    sim.advance(0.7)
    sim.thaw(1)
    sim.wait_for(lambda: sim.core(3).role is Role.PRIMARY, 1.0, "node 3 takes over")
    assert (sim.core(1).role, sim.core(1).epoch) == (Role.PRIMARY, 1), "node 1 is back, unaware"
    taken_over = write_acked(sim, 3, timeout=0.001)  # before node 3's first frame to node 1
    sim.kill(3)
    stale = [write(sim, 1) for _ in range(3)]
    never(sim, 3.0, lambda: any(sim.is_acked(w) for w in stale), "node 1 acked alone in epoch 1")
    sim.slow(3, sim.delay)
    sim.restart(2)
    sim.restart(3)
    sim.wait_converged(timeout=3.0)
    sim.check_invariants(converged=True)
    assert held_everywhere(sim, taken_over, (1, 2, 3))


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
    heal(sim)
    write_acked(sim, sim.wait_primary(), count=2)


def heal(sim: SimNetwork) -> None:
    """Thaw every frozen node, restart every stopped one, and wait for convergence."""
    for node in sim.ids:
        if sim.nodes[node].status == "frozen":
            sim.thaw(node)
        elif sim.nodes[node].status == "down":
            sim.restart(node)
    sim.wait_converged(timeout=10.0)


@pytest.mark.parametrize("seed", range(16))
def test_g1_g4_random_crashes_and_freezes(seed: int) -> None:
    random_faults(seed, slow_links=False)


@pytest.mark.parametrize("seed", range(16))
def test_r1_g1_random_faults_with_slow_links(seed: int) -> None:
    random_faults(seed, slow_links=True)


def test_r1_g1_random_faults_seed_2299_a_thawed_primary_reads_old_acks() -> None:
    """The primary thawed and counted acks a backup sent while it was stopped; that
    backup took over alone and died unheard, and the thawed primary acknowledged
    alone in its old epoch (the scenario of
    ``test_r1_g1_a_thawed_primary_counts_no_ack_sent_while_it_was_stopped``)."""
    random_faults(2299, slow_links=True)


# ---- deferred durability: the group fsync ------------------------------------------------------
#
# With ``fsync_delay`` the simulator plays the runtime's group fsync: a commit is
# reported to the core (``on_committed``) at once and as durable (``on_local_durable``)
# only ``fsync_delay`` later; ``power_loss`` keeps only what was on disk. R2 is then
# checked against the disk (the simulator records an anomaly otherwise).

FSYNC_DELAYS = (0.005, 0.02, 0.05)
"""Durations of an fsync comparable to the heartbeat (0.1 s) and the message delay (1 ms)."""


def backup_core(node: int = 3, position: Position = Position(1, 5)) -> ReplicaCore:
    """A backup of node 1 in epoch 1 that has joined at ``position`` (on disk)."""
    sync_set = SyncSet(1, (1, 2, 3), 1)
    core = ReplicaCore(
        node, (1, 2, 3), TIMING, NodeState(1, 1, 1), position, sync_set, 10.0, history=[(1, 1)]
    )
    core.on_message(10.0, 1, heartbeat(1, position.seq))
    assert core.role is Role.BACKUP
    assert not core.joined
    join_reply = JoinReply(epoch=1, diverge=position.seq, snapshot=False, join_no=core.join_no)
    assert acks(core.on_message(10.001, 1, join_reply)) == [position.seq]
    assert core.joined
    return core


def heartbeat(epoch: int, seq: int) -> Append:
    """An ``append`` frame without records (a primary's heartbeat)."""
    return Append(
        epoch=epoch,
        seq=seq,
        watermark=0,
        records=[],
        sync_set=SyncSet(1, (1, 2, 3), 1),
        in_sync=(1, 2, 3),
        echo=-1,
    )


def acks(effects: list[Effect]) -> list[int]:
    """The seqs of the acks among ``effects``."""
    return [e.message.seq for e in effects if isinstance(e, Send) and isinstance(e.message, Ack)]


def peer_voting(core: ReplicaCore) -> PeerVoting:
    assert isinstance(core.arbiter, PeerVoting)
    return core.arbiter


def acked_missing_on(sim: SimNetwork, nodes: tuple[int, ...]) -> list[str]:
    """Every acknowledged write one of ``nodes`` lacks (G1), as readable lines."""
    return [
        f"node {n} lacks {a}"
        for a in sim.acked
        for n in nodes
        if sim.nodes[n].log.get(a.seq) != (a.epoch, a.seq, a.payload)
    ]


def test_simulator_fsync_delay_zero_keeps_every_commit_on_disk() -> None:
    sim = started()
    write_acked(sim, 1, count=5)
    for node in sim.nodes.values():
        assert node.disk_seq == node.log.position.seq
    assert all(sim.synced_at[key] == at for key, at in sim.durable_at.items())


def test_simulator_kill_keeps_the_committed_log_power_loss_keeps_the_disk() -> None:
    sim = started(fsync_delay=0.05)
    acked = write_acked(sim, 1, count=2)
    sim.advance(0.5)
    pending = [write(sim, 1) for _ in range(3)]
    sim.advance(0.01)  # committed everywhere, on no disk yet
    assert held_everywhere(sim, pending, (1, 2, 3))
    assert not any(sim.is_acked(w) for w in pending)
    on_disk = sim.nodes[2].disk_seq
    assert on_disk < pending[0].seq
    sim.kill(2)  # a crash: the page cache keeps the commits
    assert held_everywhere(sim, pending, (2,))
    sim.restart(2)  # and the restart syncs them
    assert sim.nodes[2].disk_seq == sim.nodes[2].log.position.seq
    (loss,) = sim.power_loss(3, restart=False)
    assert [r[2] for r in loss.lost] == [w.payload for w in pending]
    assert sim.nodes[3].log.position.seq == on_disk
    assert not any(sim.holds(3, w) for w in pending)
    assert held_everywhere(sim, acked, (3,))
    sim.restart(3)
    sim.wait_converged(timeout=3.0)
    assert held_everywhere(sim, acked + pending, (1, 2, 3))


def test_r2_backup_acks_only_what_its_fsync_reported_durable() -> None:
    core = backup_core(position=Position(1, 5))
    core.on_committed(Position(1, 8))  # it has no effects: nothing to say yet
    assert (core.position, core.durable_seq) == (Position(1, 8), 5)
    reply = peer_voting(core).probe_reply(0)
    assert reply.position == Position(1, 8), "elections use what the database holds"
    assert acks(core.on_message(10.1, 1, heartbeat(1, 8))) == [5]
    assert acks(core.resend_ack(10.2)) == [5]
    assert acks(core.on_local_durable(10.3, Position(1, 7))) == [7]
    assert core.durable_seq == 7
    assert acks(core.on_local_durable(10.4, Position(1, 6))) == [7], "never goes back"
    assert core.durable_seq == 7
    assert acks(core.on_local_durable(10.5, Position(1, 8))) == [8]
    assert (core.position, core.durable_seq) == (Position(1, 8), 8)


def test_r2_fsync_delay_holds_the_ack_until_every_member_has_the_write_on_disk() -> None:
    delay = 0.02
    sim = started(fsync_delay=delay)
    written = write(sim, 1)
    never(sim, delay, lambda: sim.is_acked(written), "acked before any fsync was done")
    sim.wait_for(lambda: sim.is_acked(written), 0.5, "the write acked")
    acked_at = ack_time(sim, written)
    for node in (1, 2, 3):
        committed = sim.durable_at[(node, written.seq)]
        synced = sim.synced_at[(node, written.seq)]
        assert committed + delay <= synced + 1e-9 <= acked_at + 1e-9
    sim.check_invariants(converged=True)


def test_r2_primary_counts_itself_only_once_its_own_fsync_is_done() -> None:
    sim = started(fsync_delay=0.005)
    sim.set_fsync_delay(1, 0.3)  # the primary's disk is slow, the backups' fast
    written = write(sim, 1)
    sim.advance(0.05)
    for backup in (2, 3):
        assert sim.nodes[backup].disk_seq >= written.seq
        durable = sim.core(1).backup_durable(backup)
        assert (durable or -1) >= written.seq, "the backups acked it"
    assert sim.nodes[1].disk_seq < written.seq
    assert sim.statistics(1)["watermark"] < written.seq
    assert not sim.is_acked(written), "acked before it was on the primary's own disk"
    sim.wait_for(lambda: sim.is_acked(written), 0.5, "the write acked")
    assert ack_time(sim, written) - written.time >= 0.3 - 1e-9
    sim.check_invariants(converged=True)


@pytest.mark.parametrize("delay", FSYNC_DELAYS)
@pytest.mark.parametrize("cut_after", [0.013, 0.031, 0.047])
def test_g1_power_loss_of_all_three_nodes_under_load_keeps_every_acknowledged_write(
    delay: float, cut_after: float
) -> None:
    """Writes stream in (several per step); the power fails on all three nodes at once,
    with commits of every node not yet on disk. Every acknowledged write survives
    and the cluster converges (G1, G4)."""
    sim = started(fsync_delay=delay)
    write_acked(sim, 1, count=3)
    end = sim.now + 0.3 + cut_after
    while sim.now < end - 1e-9:
        for _ in range(3):
            write(sim, 1)
        sim.advance(0.004)
    acked_before = len(sim.acked)
    assert acked_before > 3, "nothing was acknowledged under load"
    assert len(sim.writes) > acked_before, "every write was acknowledged: nothing in flight"
    losses = sim.power_loss(1, 2, 3)
    assert any(loss.lost for loss in losses), "nothing was lost: every commit was on disk"
    assert acked_missing_on(sim, (1, 2, 3)) == []
    primary = sim.wait_converged(timeout=5.0)
    assert acked_missing_on(sim, (1, 2, 3)) == []
    write_acked(sim, primary, count=2)
    sim.check_invariants(converged=True)


@pytest.mark.parametrize("primary_fsync", [None, 0.3], ids=["same-disks", "slow-primary-disk"])
def test_g1_power_loss_of_the_primary_alone_with_records_only_the_backups_hold(
    primary_fsync: float | None,
) -> None:
    """The primary loses records it had not yet synced that the backups hold; it
    rejoins as a backup, and gets them back from the new primary. No acked write is lost."""
    delay = 0.02
    sim = started(fsync_delay=delay)
    if primary_fsync is not None:
        sim.set_fsync_delay(1, primary_fsync)
    acked = write_acked(sim, 1, count=3, timeout=1.0)
    sim.advance(0.5)
    pending = [write(sim, 1) for _ in range(3)]
    sim.advance(0.01 if primary_fsync is None else 0.05)
    assert held_everywhere(sim, pending, (2, 3))
    assert sim.nodes[1].disk_seq < pending[0].seq
    assert not any(sim.is_acked(w) for w in pending)
    (loss,) = sim.power_loss(1)
    assert [r[2] for r in loss.lost] == [w.payload for w in pending]
    assert not any(sim.holds(1, w) for w in pending)
    primary = sim.wait_primary(timeout=2.0)
    assert primary in (2, 3)
    acked += write_acked(sim, primary, count=3, timeout=1.0)
    sim.wait_converged(timeout=5.0)
    assert sim.core(1).role is Role.BACKUP
    assert held_everywhere(sim, acked + pending, (1, 2, 3))
    assert acked_missing_on(sim, (1, 2, 3)) == []


def test_g1_power_loss_of_both_backups_then_the_primary_keeps_acknowledged_writes() -> None:
    """Power fails on the backups while their fsyncs are pending, then on the primary
    before it learns anything: whatever was acknowledged was on the disks that
    remain, and the full restart (R6) finds it."""
    sim = started(fsync_delay=0.02)
    for _ in range(10):
        write(sim, 1)
        sim.advance(0.007)
    sim.power_loss(2, 3, restart=False)
    sim.advance(0.003)
    sim.power_loss(1, restart=False)
    assert sim.acked, "nothing was acknowledged"
    assert all(loss.lost for loss in sim.power_losses), "a node lost nothing"
    for node in (3, 1, 2):
        sim.restart(node)
    sim.wait_converged(timeout=5.0)
    assert acked_missing_on(sim, (1, 2, 3)) == []


def faults_with_fsync_delay(seed: int) -> None:
    """Crashes, power losses (of one node or of all three), freezes and thaws at
    random, with commits that reach the disk only ``delay`` later; then all heals.

    ``check_invariants`` (R2 against the disk, G1 on the newest primary) runs after
    every step; at the end every node must converge and acknowledge writes again.
    """
    rng = random.Random(seed)
    delay = rng.choice(FSYNC_DELAYS)
    sim = started(jitter=0.002, seed=seed, fsync_delay=delay)
    for _step in range(30):
        primary = sim.primary()
        if primary is not None:
            for _ in range(rng.randint(0, 4)):
                sim.write(primary)
        action = rng.random()
        node = rng.choice(sim.ids)
        status = sim.nodes[node].status
        if action < 0.12 and status == "up":
            sim.kill(node)
        elif action < 0.22:
            sim.power_loss(node, restart=False)
        elif action < 0.27:
            sim.power_loss(*sim.ids, restart=False)
        elif action < 0.35 and status == "up":
            sim.freeze(node)
        elif action < 0.6 and status == "down":
            sim.restart(node)
        elif action < 0.75 and status == "frozen":
            sim.thaw(node)
        sim.advance(rng.choice((0.003, 0.01, delay, 0.2, 0.7, 1.6)))
        sim.check_invariants()
    heal(sim)
    assert acked_missing_on(sim, sim.ids) == []
    write_acked(sim, sim.wait_primary(), count=2)


@pytest.mark.parametrize(
    "seed",
    [
        *range(48),
        58,  # a primary that lost its epoch's first record was refused votes
        74,  # a joining backup was counted for records not yet on its disk
        130,  # a joining backup was counted for records not yet on its disk
        244,  # a joining backup was counted for records not yet on its disk
    ],
)
def test_g1_g4_random_crashes_power_losses_and_freezes_with_fsync_delay(seed: int) -> None:
    faults_with_fsync_delay(seed)


# ---- deferred durability: regressions of bugs this section found in the core -------------------


def test_r2_a_backup_joining_a_new_primary_is_counted_only_for_what_it_has_on_disk() -> None:
    """The backups apply three records; before their fsync is done the primary dies.
    Node 3 joins the new primary with its committed position: the primary must not
    count it as durable up to there before node 3 reports it on disk (R2)."""
    sim = started(fsync_delay=0.05)
    write_acked(sim, 1, count=3)
    sim.advance(0.5)
    pending = [write(sim, 1) for _ in range(3)]
    sim.advance(0.002)
    assert held_everywhere(sim, pending, (2, 3))
    assert sim.nodes[3].disk_seq < pending[0].seq
    sim.kill(1)
    assert sim.wait_primary(timeout=1.0) == 2
    sim.wait_converged(timeout=3.0)  # check_invariants: R2 against the disk


def test_r4_backup_does_not_ack_a_new_primary_before_joining_it() -> None:
    """A durability report that arrives after the backup followed a new primary (and
    before that primary answered its join) is about records of the old primary's log:
    an ack then would tell the new primary that the backup holds its records up to there."""
    core = backup_core(3, Position(1, 5))
    core.on_committed(Position(1, 8))  # records from node 1, their fsync pending
    core.on_message(10.2, 2, heartbeat(2, 6))  # node 2 is primary of epoch 2
    assert (core.role, core.primary, core.joined) == (Role.BACKUP, 2, False)
    assert acks(core.on_local_durable(10.25, Position(1, 8))) == []


def test_r2_a_durability_report_from_before_a_join_is_not_counted_by_the_new_primary() -> None:
    """Node 3 was dropped (its acks are slow) but holds three records node 2 lacks;
    node 1 dies and node 2 takes over. Node 3's slow fsync of those records completes
    after it sent its join and before node 2's answer (over a slow link) arrives: its
    ack must not make node 2 count it for node 2's own, different, records."""
    sim = started(fsync_delay=0.01)
    sim.advance(0.5)
    sim.set_delay(3, 1, 1.0)
    deadline = sim.now + 5.0
    while 3 in sim.core(1).in_sync:
        assert sim.now < deadline, "the slow backup was never dropped"
        write_for(sim, 1, 0.1)
    write_for(sim, 1, 0.3)
    sim.set_delay(1, 2, 0.05)
    sim.set_fsync_delay(3, 0.38)
    sim.set_fsync_delay(2, 0.19)
    extra = [write(sim, 1) for _ in range(3)]
    sim.advance(0.005)
    assert held_everywhere(sim, extra, (3,))
    assert not any(sim.holds(2, w) for w in extra)
    sim.set_delay(2, 3, 0.1)
    sim.kill(1)
    assert sim.wait_primary(timeout=3.0) == 2
    joined_at = sim.now
    for _ in range(3):
        write(sim, 2)
    sim.advance(1.0)
    late = [
        (t, m["seq"])
        for t, src, dst, m in sim.sent
        if t >= joined_at and (src, dst, m["type"]) == (3, 2, "ack") and m["seq"] >= extra[0].seq
    ]
    assert late, "scenario drift: node 3 never acked beyond the divergence point"
    sim.check_invariants()
    sim.set_delay(2, 3, sim.delay)
    sim.wait_converged(timeout=5.0)


def test_g4_a_primary_that_lost_the_first_record_of_its_epoch_is_elected_again() -> None:
    """Node 1 is alone in the sync set. After a full power loss it starts a new epoch
    (R6) and seals that epoch's first record; node 3, catching up, applies it; then
    node 1 loses power before its own fsync of it. Node 1 is still the only member of
    the newest sync set, so only it can win, and node 3 holds an unacknowledged record
    of a newer epoch: the cluster must still elect node 1 and converge (G4)."""
    sim = started(fsync_delay=0.05)
    sim.kill(3)
    sim.kill(2)
    sim.wait_for(lambda: sync_members(sim, 1) == (1,), 2.0, "node 1 alone in the sync set")
    acked = write_acked(sim, 1, count=2, timeout=1.0)
    sim.power_loss(1, 2, 3, restart=False)
    sim.restart(3)
    sim.restart(1)
    assert sim.wait_primary(timeout=2.0, among=(1,)) == 1
    sealed = sim.nodes[1].log.position
    assert sealed.epoch == 2
    sim.wait_for(
        lambda: sim.nodes[3].log.position == sealed, 1.0, "node 3 holds the new epoch's record"
    )
    assert sim.nodes[1].disk_seq < sealed.seq
    (loss,) = sim.power_loss(1)
    assert [r[:2] for r in loss.lost] == [(sealed.epoch, sealed.seq)]
    sim.restart(2)
    sim.wait_converged(timeout=10.0)
    assert held_everywhere(sim, acked, (1, 2, 3))


# ---- joins are numbered: a stale answer or ack never counts (R4) -----------------------------


def test_r4_a_reply_to_an_earlier_join_never_rewinds_the_backup() -> None:
    """The backup joined, applied records, then joined again (a gap in the stream).
    An answer to its first join arriving now names a divergence point below what the
    backup has since applied: obeying it would undo records the others acknowledged."""
    core = backup_core(3, Position(1, 5))
    first = core.join_no
    core.on_committed(Position(1, 9))
    core.on_local_durable(10.1, Position(1, 9))
    effects = core.rejoin(10.2, "a gap in the stream")
    assert not core.joined
    assert core.join_no == first + 1
    (join,) = [e.message for e in effects if isinstance(e, Send) and isinstance(e.message, Join)]
    assert join.join_no == core.join_no
    stale = JoinReply(epoch=1, diverge=5, snapshot=False, join_no=first)
    effects = core.on_message(10.25, 1, stale)
    assert effects == [], f"a reply to join {first} was obeyed: {effects}"
    assert not core.joined
    current = JoinReply(epoch=1, diverge=9, snapshot=False, join_no=core.join_no)
    assert acks(core.on_message(10.3, 1, current)) == [9]
    assert core.joined


def test_r2_an_ack_of_an_earlier_join_is_not_counted() -> None:
    """An ack sent before the backup's latest join describes a log that join may have
    rewound: the primary must not count it toward the watermark or a sync set grow."""
    sim = started()
    sim.kill(3)
    write_acked(sim, 1, count=5, timeout=0.5)
    sim.restart(3)
    sim.wait_converged(timeout=3.0)
    primary = sim.core(1)
    before = primary.backup_durable(3)
    assert before is not None
    (join,) = [m for _t, src, dst, m in sim.sent if (src, dst, m["type"]) == (3, 1, "join")][-1:]
    stale = Ack(
        epoch=primary.epoch, seq=before + 50, ack_no=1, join_no=join["join_no"] - 1, links=(1, 2)
    )
    primary.on_message(sim.now, 3, stale)
    assert primary.backup_durable(3) == before


def test_r4_join_resent_before_its_answer_arrives_rewinds_nothing() -> None:
    """A restarted backup far behind joins; the primary's answers reach it slowly, so
    it joins again before the first answer arrives. The first answer lets it apply a
    stream of records; the second (to the second join) must still not rewind them."""
    sim = started()
    sim.kill(3)
    write_for(sim, 1, 0.5, every=0.01)
    sim.set_delay(1, 3, TIMING.election_timeout * 1.5)
    sim.restart(3)
    sim.advance(TIMING.election_timeout * 4)
    joins = [m for _t, src, dst, m in sim.sent if (src, dst, m["type"]) == (3, 1, "join")]
    assert len(joins) >= 2, "scenario drift: the backup never joined twice"
    sim.set_delay(1, 3, sim.delay)
    sim.wait_converged(timeout=5.0)
    assert sim.nodes[3].rolled_back == [], sim.describe()
    sim.check_invariants(converged=True)


# ---- E4/G5: a member is its database -----------------------------------------------------------


def probe_view(node: int, database: str, unproven: str | None = None) -> ProbeView:
    return ProbeView(
        node, 3, "electing", None, Position(3, 9), False, SyncSet(4, (1, 2), 3), database, unproven
    )


def test_g5_a_member_whose_database_is_not_the_recorded_one_does_not_count() -> None:
    newest = SyncSet(4, (1, 2), 3, ((1, "db-one"), (2, "db-two")))
    assert member_problem(newest, probe_view(1, "db-one")) is None
    assert "wiped or replaced" in str(member_problem(newest, probe_view(1, "db-new")))
    assert member_problem(newest, probe_view(1, "db-one", "its WAL is gone")) == "its WAL is gone"
    # A set written before database ids existed names none: nothing to compare.
    assert member_problem(SyncSet(4, (1, 2), 3), probe_view(1, "db-new")) is None


def test_g5_r6_waits_for_a_member_that_lost_its_database() -> None:
    core = ReplicaCore(
        2,
        (1, 2, 3),
        TIMING,
        NodeState(3, 3, 1),
        Position(3, 7),
        SyncSet(4, (1, 2), 3),
        0.0,
        database="db-two",
    )
    newest = SyncSet(5, (1, 2), 3, ((1, "db-one"), (2, "db-two")))
    views = {
        1: ProbeView(1, 3, "electing", None, Position(0, 0), False, newest, "db-new"),
        2: ProbeView(2, 3, "electing", None, Position(3, 7), False, newest, "db-two"),
    }
    assert peer_voting(core)._winner(views) is None
    assert core.waiting_for == (1,)
    assert "wiped or replaced" in core.reason


def test_the_core_loads_without_storage_or_chat() -> None:
    """The replication core is pure decisions: importing it pulls in neither apsw
    nor the storage or chat modules (checked in a fresh interpreter)."""
    import subprocess
    import sys

    probe = (
        "import sys, service.replication.state; "
        "print([m for m in ('apsw', 'service.storage', 'service.chat') if m in sys.modules])"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"


# ---- a node made by ops.restore -------------------------------------------------------

RESTORED_DB = "r" * 32


def restored_core() -> ReplicaCore:
    """Node 1 as ``prepare_restore`` leaves it: at the backup's position (epoch 4),
    alone in a sync set it wrote itself, naming its new database."""
    alone = SyncSet(8, (1,), 4, ((1, RESTORED_DB),))
    return ReplicaCore(
        1, (1, 2, 3), TIMING, NodeState(4, 0, None), Position(4, 20), alone, 10.0,
        history=[(1, 1), (4, 12)], database=RESTORED_DB, restored=True,
    )  # fmt: skip


def probe_reply(core: ReplicaCore, position: Position, sync_set: SyncSet, db: str) -> ProbeReply:
    return ProbeReply(
        epoch=position.epoch, round=peer_voting(core).round, role="electing", primary=None,
        position=position, eligible=False, sync_set=sync_set, database=db, unproven=None,
        fault=None,
    )  # fmt: skip


def campaigned(effects: list[Effect]) -> bool:
    return any(isinstance(e, Persist) and e.state.voted_for == 1 for e in effects)


def test_a_restored_node_alone_in_its_sync_set_does_not_lead_by_itself() -> None:
    """Unlike a lone survivor (``test_r6_node_whose_newest_sync_set_is_only_itself_...``):
    the restore wrote that set, and the other nodes may hold newer data."""
    core = restored_core()
    effects = [e for t in range(20) for e in core.tick(10.0 + t * 0.1)]
    assert not campaigned(effects)
    assert core.role is Role.ELECTING
    assert "restored from a backup" in core.reason
    assert core.waiting_for == (2, 3)


@pytest.mark.parametrize(
    ("position", "sync_set"),
    [
        # Newer than the backup: R6 itself waits for that set's members.
        (Position(9, 38), SyncSet(24, (2, 3), 9, ((2, "b" * 32), (3, "c" * 32)))),
        # Older than the backup (a sync set the restored one outranks): the restore
        # rule alone keeps node 1 from leading over it.
        (Position(3, 15), SyncSet(5, (1, 2, 3), 3, ((2, "b" * 32),))),
    ],
)
def test_a_restored_node_waits_while_another_node_holds_other_data(
    position: Position, sync_set: SyncSet
) -> None:
    core = restored_core()
    core.on_link(10.0, 2, up=True)
    effects = core.tick(10.4)  # past the start's wait for links (node 3 is down)
    effects += core.on_message(10.41, 2, probe_reply(core, position, sync_set, "b" * 32))
    effects += core.tick(10.42)
    assert not campaigned(effects)
    assert core.role is Role.ELECTING
    if position == Position(3, 15):
        assert "node 2 holds other data (position [3, 15]" in core.reason, core.reason


def test_a_restored_node_leads_once_an_empty_node_makes_a_majority() -> None:
    core = restored_core()
    core.on_link(10.0, 2, up=True)
    core.tick(10.4)  # past the start's wait for links (node 3 is down)
    empty = probe_reply(core, Position.ZERO, SyncSet(0, (), 0), "e" * 32)
    effects = core.on_message(10.41, 2, empty)
    effects += [e for t in range(10) for e in core.tick(10.42 + t * 0.1)]
    assert campaigned(effects), core.reason


def test_a_restored_nodes_join_asks_for_a_snapshot() -> None:
    """Following the old cluster's primary, its position may name their records while
    its rows differ (its sync set row, at least): only a snapshot makes them theirs."""
    core = restored_core()
    heard = Append(
        epoch=9, seq=38, watermark=38, records=[], sync_set=SyncSet(24, (2, 3), 9),
        in_sync=(2, 3), echo=-1,
    )  # fmt: skip
    sent = [e.message for e in core.on_message(10.0, 2, heard) if isinstance(e, Send)]
    assert core.role is Role.BACKUP
    joins = [m for m in sent if isinstance(m, Join)]
    assert joins, sent
    assert all(join.snapshot for join in joins)


def test_a_primary_answers_a_join_asking_for_a_snapshot_with_one() -> None:
    sim = started()
    write_acked(sim, 1, count=3)
    core = sim.nodes[1].core
    assert core is not None
    position = core.position
    join = Join(
        core.epoch, position, position.seq, tuple(core.history), 99, "x" * 32, snapshot=True
    )
    replies = [e.message for e in core.on_message(sim.now, 2, join) if isinstance(e, Send)]
    assert [r.snapshot for r in replies if isinstance(r, JoinReply)] == [True]


# ---- storage faults during an election ---------------------------------------------------------


@pytest.mark.parametrize("recovers_before_the_deadline", [False, True])
def test_a_campaign_whose_vote_the_disk_refused_does_not_win(
    recovers_before_the_deadline: bool,
) -> None:
    """The runtime drops a campaign's vote requests when the Persist of its own vote
    fails (nothing that depends on a write the disk refused goes out), and reports
    the fault. Its peers were never asked, so they answer nothing, and the campaign
    must not take their silence, at the deadline, for peers gone frozen: it would
    lead alone in an epoch its peers may give to another node (two primaries in one
    epoch). It gives up when the fault is reported; had it looked only at its
    deadline, a disk that took writes again 0.2 s later (the runtime's first retry)
    let it lead all the same."""
    sync_set = SyncSet(1, (1, 2, 3), 1)
    cores = {
        n: ReplicaCore(n, (1, 2, 3), TIMING, NodeState(1, 1, 1), Position(1, 5), sync_set, 10.0)
        for n in (1, 2, 3)
    }
    candidate = cores[1]
    now = 10.0
    candidate.started(now)
    for peer in (2, 3):
        candidate.on_link(now, peer, True)
    # Probe rounds until node 1 (the lowest id among equals) campaigns.
    voted: list[Effect] = []
    for _ in range(200):
        now += 0.02
        for effect in candidate.tick(now):
            if isinstance(effect, Send) and isinstance(effect.message, Probe):
                voter = cores[effect.to].arbiter
                assert isinstance(voter, PeerVoting)
                reply = voter.probe_reply(effect.message.round)
                voted += candidate.on_message(now, effect.to, reply)
            elif isinstance(effect, Persist):
                voted.append(effect)
        if any(isinstance(e, Persist) for e in voted):
            break
    assert any(isinstance(e, Persist) for e in voted), "node 1 never campaigned"
    assert candidate.state.voted_for == 1

    # The Persist of its vote failed: its requests never left.
    later = candidate.on_storage_fault(now, "the disk is full")
    for step in range(100):
        now += 0.02
        if recovers_before_the_deadline and step == 10:
            later += candidate.on_storage_recovered(now)
        later += candidate.tick(now)
    assert candidate.role is Role.ELECTING, later
    assert not [e for e in later if isinstance(e, BecomePrimary)], later


def backup_held_by_its_loop() -> tuple[ReplicaCore, ReplicaCore, float]:
    """A converged cluster's primary and a backup whose ticks came regularly until
    ``t`` + 0.3, the primary last heard before ``t``; the backup's next tick comes
    0.4 s late (short of a clock gap), past the suspect timeout."""
    sim = started()
    primary, backup = sim.core(1), sim.core(2)
    assert backup.role is Role.BACKUP
    t = sim.now
    for after in (0.1, 0.2, 0.3):
        backup.tick(t + after)
    assert backup.role is Role.BACKUP
    late = t + 0.7
    assert late - (t + 0.3) < TIMING.clock_gap
    assert late - t > TIMING.suspect_timeout
    backup.tick(late)
    return primary, backup, late


def test_a_backup_reads_the_heartbeats_that_waited_before_suspecting_after_a_late_tick() -> None:
    """A late tick runs before the frames that waited in the socket are read: the
    primary's heartbeats were there, and the backup became electing all the same."""
    primary, backup, late = backup_held_by_its_loop()
    assert backup.role is Role.BACKUP, "suspected the primary before reading its socket"
    backup.on_message(late + 0.001, 1, primary.stream_header(2, []))
    backup.tick(late + 0.02)
    assert backup.role is Role.BACKUP
    assert backup.primary_live(late + 0.02)


def test_an_input_just_before_a_late_tick_does_not_hide_that_it_came_late() -> None:
    """After a stall another input (an etcd answer, a link) may come first in the
    same turn, still before the sockets are read."""
    sim = started()
    primary, backup = sim.core(1), sim.core(2)
    t = sim.now
    for after in (0.1, 0.2, 0.3):
        backup.tick(t + after)
    backup.on_link(t + 0.699, 3, True)
    backup.tick(t + 0.7)
    assert backup.role is Role.BACKUP, "suspected the primary before reading its socket"
    backup.on_message(t + 0.701, 1, primary.stream_header(2, []))
    backup.tick(t + 0.72)
    assert backup.role is Role.BACKUP


def test_a_backup_suspects_a_silent_primary_one_tick_after_a_late_one() -> None:
    _, backup, late = backup_held_by_its_loop()
    backup.tick(late + 0.02)
    assert backup.role is Role.ELECTING


def test_a_backup_whose_every_tick_comes_late_still_suspects_a_silent_primary() -> None:
    _, backup, late = backup_held_by_its_loop()
    backup.tick(late + 0.4)
    assert backup.role is Role.ELECTING, "a second late tick deferred the suspicion again"
