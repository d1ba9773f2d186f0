"""The chaos tool's etcd arbiter mode offline: which faults it draws and what it cuts.

Partitions and etcd faults exist only in the arbiter mode (``--arbiter etcd``):
the default mode keeps drawing exactly what it always drew, and naming them
without the mode is one clear usage error. Each partition fault resolves to
cuts between roles (``nemesis._cuts``); node 0 there is the etcd member.
"""

from __future__ import annotations

import pytest

from ops.chaos import schedule
from ops.chaos.__main__ import parse_args
from ops.chaos.nemesis import _cuts

IDS = [1, 2, 3]


def test_the_default_mode_draws_no_arbiter_fault() -> None:
    assert schedule.kinds_from_spec("all") == schedule.KINDS + schedule.DISK_KINDS
    faults = schedule.generate(5, 600, kinds=schedule.kinds_from_spec("all"))
    assert not {f.kind for f in faults} & set(schedule.ARBITER_KINDS)


def test_all_in_the_arbiter_mode_adds_partitions_and_etcd_faults() -> None:
    kinds = schedule.kinds_from_spec("all", arbiter=True)
    assert set(kinds) == set(schedule.KINDS + schedule.DISK_KINDS + schedule.ARBITER_KINDS)
    faults = schedule.generate(5, 600, kinds=kinds)
    assert {f.kind for f in faults} == set(kinds)
    assert schedule.kinds_from_spec("partition", arbiter=True) == schedule.PARTITION_KINDS


@pytest.mark.parametrize("spec", ["partition", "etcd", "isolate", "process,etcd-freeze"])
def test_arbiter_faults_without_the_arbiter_mode_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="--arbiter etcd"):
        schedule.kinds_from_spec(spec)
    with pytest.raises(SystemExit) as exited:
        parse_args(["--faults", spec])
    assert exited.value.code == 2


def test_the_arbiter_mode_needs_a_cluster_of_its_own() -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(["--arbiter", "etcd", "--faults", "etcd", "--supervisord", "x.conf"])
    assert exited.value.code == 2


def test_downs_straddle_the_lease_ttl() -> None:
    kinds = schedule.kinds_from_spec("partition,etcd", arbiter=True)
    downs = [f.down for f in schedule.generate(11, 3000, kinds=kinds)]
    ttl = schedule.Timing().lease_ttl
    assert min(downs) < ttl / 2
    assert max(downs) > 2 * ttl
    assert any(0.8 * ttl <= d <= 1.5 * ttl for d in downs)


def fault(kind: str, target: str, pick: int = 0) -> schedule.Fault:
    return schedule.Fault(0, 1.0, kind, target, 2.0, pick=pick)


def test_an_isolated_node_is_cut_both_ways_from_its_peers_and_etcd() -> None:
    assert _cuts(fault("isolate", "primary"), IDS, 2, [1, 3]) == [
        (2, 1, True),
        (2, 3, True),
        (2, 0, True),
    ]


def test_the_primary_cut_from_its_backups_keeps_etcd() -> None:
    assert _cuts(fault("cut-primary-from-backups", "primary"), IDS, 3, [1, 2]) == [
        (3, 1, True),
        (3, 2, True),
    ]


def test_a_node_cut_from_etcd_keeps_its_peers() -> None:
    assert _cuts(fault("cut-from-etcd", "backup", pick=1), IDS, 1, [2, 3]) == [(3, 0, True)]


@pytest.mark.parametrize(
    ("target", "expected"),
    [("primary>backup", (1, 3)), ("backup>primary", (3, 1))],
)
def test_a_one_way_cut_goes_the_way_its_target_says(target: str, expected: tuple[int, int]) -> None:
    ((source, dest, both),) = _cuts(fault("cut-one-way", target, pick=1), IDS, 1, [2, 3])
    assert (source, dest, both) == (*expected, False)


def test_a_one_way_cut_between_backups_spares_the_primary() -> None:
    ((source, dest, both),) = _cuts(fault("cut-one-way", "backup>backup", pick=7), IDS, 2, [1, 3])
    assert {source, dest} == {1, 3}
    assert not both
