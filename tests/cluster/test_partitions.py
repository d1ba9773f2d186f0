"""Partitions with etcd as the arbiter, on real processes (SPEC section 10, E1 to E6).

The rehearsal of hosts on one machine, on addresses of this run's own (etcd on
127.N.0.30, the nodes on .31, .32 and .33, in a block that no other run of the
tests, nor a rehearsal an operator runs here, uses: ``tests/helpers/loopback.py``):
each node dials its peers and etcd from its own address, so that
``ops/netcut.py`` (nft on ``lo``, in this run's table) can cut any pair, one way
or both. The test's clients connect from 127.0.0.1, which no cut touches: they
are the clients "that can still reach" a node cut from the others.

Each scenario runs a workload (``tests/helpers/workload.py``) and ends with the
checks of SPEC section 8 (``finish``): every acknowledged write on every node
exactly once, no refused write stored, identical tables, at most one node
becoming primary per epoch (the ``became primary ... epoch=N`` lines of the
logs), no traceback. Scenarios that fence a primary also pin a client to it
(``tests/helpers/pinned.py``): from the moment the primary loses etcd, its
fencing deadline (E2) is at most ``lease_ttl * (1 - clock_drift) - lease_margin``
away, and after it (give or take ``SLACK`` for the reply to travel) the node
must neither acknowledge a write nor serve a read.

The lease is etcd's shortest (2 s) so that the scenarios stay short. Cutting
needs nft and root: where they are missing, the tests that cut say why and
skip (CI runs as root and ``.ci/run`` installs nftables).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.cluster.history import OK, History
from ops.cluster.waiting import wait_for
from ops.etcd import Etcd
from service.client import Client
from service.status import NodeStatus
from tests.conftest import ClusterFactory
from tests.helpers import loopback
from tests.helpers.cluster import Cluster, NodeProcess
from tests.helpers.etcd import running_etcd
from tests.helpers.pinned import Pinned
from tests.helpers.workload import (
    PASSWORD,
    Workload,
    assert_stays,
    finish,
    new_user,
    run,
    send_recorded,
    start_cluster,
    view_of,
    wait_settled,
    wait_view,
)

pytestmark = pytest.mark.cluster

ETCD_HOST = loopback.address(30)
HOSTS = (loopback.address(31), loopback.address(32), loopback.address(33))
LEASE_TTL = 2.0
CLOCK_DRIFT = 0.01
# Wider than the default, so that the deadline comes well before the lease surely ran
# out (``ttl * (1 + drift)``, when a primary steps down anyway): a node that did not
# fence itself would be seen acknowledging in between.
LEASE_MARGIN = 0.5
SETTINGS: dict[str, object] = {
    "arbiter": "etcd",
    "etcd_prefix": "/chat/partitions",
    "lease_ttl": LEASE_TTL,
    "clock_drift": CLOCK_DRIFT,
    "lease_margin": LEASE_MARGIN,
    "lease_renew_interval": 0.3,
    "etcd_request_timeout": 0.4,
}
# E2: the fencing deadline is this long after the send of the last successful renewal,
# which is at the latest the moment a primary is cut from etcd.
FENCE = LEASE_TTL * (1 - CLOCK_DRIFT) - LEASE_MARGIN
# From a node's decision to acknowledge to the client reading the reply, on two busy cores.
SLACK = 0.25
# Long enough for a dead primary's key to expire and another node to take it.
TAKEOVER = LEASE_TTL + 10.0
PROBER = "prober"


@pytest.fixture
def arbiter(tmp_path: Path) -> Iterator[Etcd]:
    """One etcd member on an address of its own, so that it can be cut separately."""
    with running_etcd(tmp_path, ETCD_HOST) as member:
        yield member


def start(cluster_factory: ClusterFactory, arbiter: Etcd) -> tuple[Cluster, NodeProcess]:
    """Three nodes with etcd as their arbiter, settled; returns the cluster and its primary."""
    cluster = cluster_factory(hosts=HOSTS, etcd_endpoints=arbiter.client, **SETTINGS)
    start_cluster(cluster)
    return cluster, wait_settled(cluster)


def others(cluster: Cluster, node: NodeProcess) -> list[NodeProcess]:
    return [n for n in cluster.nodes.values() if n is not node]


def isolate(cluster: Cluster, node: NodeProcess) -> None:
    """Cut ``node`` from every other node and from etcd, both ways."""
    cut_from_peers(cluster, node)
    loopback.cut(node.host, ETCD_HOST, both=True)


def cut_from_peers(cluster: Cluster, node: NodeProcess) -> None:
    for other in others(cluster, node):
        loopback.cut(node.host, other.host, both=True)


def pinned(
    cluster: Cluster, node: NodeProcess, history: History, attempt: float = 1.0, sends: bool = True
) -> Pinned:
    """A client that asks ``node`` only (the workload's users must exist)."""
    token = run(new_user(cluster.servers, PROBER))
    return Pinned(node, PROBER, "writer0", token, history, attempt, sends=sends)


def assert_fenced(probe: Pinned, cut_at: float, what: str) -> None:
    """E2 seen from a client: the pinned node went on trying past its deadline and
    acknowledged no write and served no read after it."""
    deadline = cut_at + FENCE + SLACK
    # Asked after the deadline, or asked before and answered after (a frozen node's).
    tried = [op for op in probe.ops() if op.completed is None or op.completed > deadline]
    assert tried, f"the pinned client had nothing to ask past the deadline ({what})"
    late = probe.acknowledged_after(deadline)
    assert not late, (
        f"node {probe.node.node_id} answered after its fencing deadline ({what}, "
        f"cut at {cut_at:.3f}, deadline {deadline:.3f}): " + "; ".join(map(str, late[:5]))
    )


def wait_new_primary(nodes: list[NodeProcess], above: int, what: str) -> NodeProcess:
    """Wait until one of ``nodes`` is primary in an epoch above ``above``; return it."""

    def found() -> NodeProcess | None:
        for node in nodes:
            view = node.view()
            if view is not None and view.is_primary and view.epoch > above:
                return node
        return None

    return wait_for(found, TAKEOVER, f"a primary in an epoch above {above} ({what})")


def became_primary_since(node: NodeProcess, mark: int) -> bool:
    return bool(node.events("became primary", mark))


# ---- partitions ---------------------------------------------------------------------------


@pytest.mark.usefixtures("cuts")
def test_primary_cut_from_everything_is_fenced_and_replaced(
    cluster_factory: ClusterFactory, arbiter: Etcd
) -> None:
    cluster, old = start(cluster_factory, arbiter)
    epoch = view_of(old).epoch
    with Workload(cluster.servers) as load:
        with pinned(cluster, old, load.history) as probe:
            probe.wait_answered(5, "before the cut")
            isolate(cluster, old)
            cut_at = load.history.now()  # renewals sent from now on are lost
            new = wait_new_primary(others(cluster, old), epoch, "the old primary cut off")
            load.wait_progress(20, f"on node {new.node_id} while the old primary is cut off")
            wait_view(old, lambda v: not v.is_primary, "stepped down without its lease")
        assert_fenced(probe, cut_at, "cut from everything")
        loopback.heal()
        wait_view(old, lambda v: v.epoch >= view_of(new).epoch, "in the new epoch")
        assert wait_settled(cluster) is new
        load.wait_progress(10, "after the heal")
    finish(cluster, load.history)


@pytest.mark.usefixtures("cuts")
def test_primary_cut_from_its_backups_but_not_from_etcd_goes_on_alone(
    cluster_factory: ClusterFactory, arbiter: Etcd
) -> None:
    """It keeps the leader key: it shrinks the sync set in etcd and acknowledges alone
    (E3), while the backups, which cannot hear it, wait for the key (E1)."""
    cluster, primary = start(cluster_factory, arbiter)
    backups = others(cluster, primary)
    marks = {node.node_id: node.log_size() for node in backups}
    with Workload(cluster.servers) as load:
        load.wait_progress(10, "before the cut")
        cut_from_peers(cluster, primary)
        wait_view(
            primary,
            lambda v: v.is_primary and v.in_sync == (primary.node_id,),
            "alone in the sync set in effect",
        )
        load.wait_progress(20, "on the primary alone")
        for backup in backups:
            wait_view(backup, lambda v: v.role == "electing", "no longer following the primary")
            assert f"node {primary.node_id} holds the leader key" in (view_of(backup).reason or "")
        loopback.heal()
        assert wait_settled(cluster) is primary
        load.wait_progress(10, "after the heal")
    for backup in backups:
        assert not became_primary_since(backup, marks[backup.node_id])
    finish(cluster, load.history)


@pytest.mark.usefixtures("cuts")
def test_backup_cut_off_is_dropped_and_rejoins(
    cluster_factory: ClusterFactory, arbiter: Etcd
) -> None:
    cluster, primary = start(cluster_factory, arbiter)
    backup = others(cluster, primary)[0]
    with Workload(cluster.servers) as load:
        load.wait_progress(10, "before the cut")
        isolate(cluster, backup)
        wait_view(primary, lambda v: backup.node_id not in (v.in_sync or ()), "the backup dropped")
        load.wait_progress(20, "without the backup")
        wait_view(backup, lambda v: "arbiter unreachable" in (v.reason or ""), "says why it waits")
        loopback.heal()
        assert wait_settled(cluster) is primary
        load.wait_progress(10, "with the backup back")
    finish(cluster, load.history)


@pytest.mark.usefixtures("cuts")
def test_one_way_cut_from_primary_to_backup(cluster_factory: ClusterFactory, arbiter: Etcd) -> None:
    """What the primary sends to one backup is lost; what the backup sends arrives.
    The backup hears no primary but must not take the key the primary holds; the
    primary drops it for its silence and goes on."""
    cluster, primary = start(cluster_factory, arbiter)
    # netcut drops A's packets on connections A opened; the lower id dials its peers.
    backup = max(others(cluster, primary), key=lambda n: n.node_id)
    assert primary.node_id < backup.node_id, "the primary must be the one that dialed"
    mark = backup.log_size()
    with Workload(cluster.servers) as load:
        load.wait_progress(10, "before the cut")
        loopback.cut(primary.host, backup.host)
        wait_view(primary, lambda v: backup.node_id not in (v.in_sync or ()), "the backup dropped")
        load.wait_progress(20, "without the backup")
        loopback.heal()
        assert wait_settled(cluster) is primary
        load.wait_progress(10, "after the heal")
    assert not became_primary_since(backup, mark)
    finish(cluster, load.history)


@pytest.mark.usefixtures("cuts")
def test_primary_cut_from_etcd_only_stops_at_its_deadline(
    cluster_factory: ClusterFactory, arbiter: Etcd
) -> None:
    """Its renewals fail: past the fencing deadline it acknowledges nothing and serves no
    read, though its clients and backups still reach it (E2, E5); once its key expires a
    backup takes it, and the old primary follows the new one over the links it kept."""
    cluster, old = start(cluster_factory, arbiter)
    epoch = view_of(old).epoch
    with Workload(cluster.servers) as load:
        with pinned(cluster, old, load.history) as probe:
            probe.wait_answered(5, "before the cut")
            loopback.cut(old.host, ETCD_HOST, both=True)
            cut_at = load.history.now()  # renewals sent from now on are lost
            new = wait_new_primary(others(cluster, old), epoch, "the old primary cut from etcd")
            wait_view(old, lambda v: v.primary_id == new.node_id, "following the new primary")
        assert_fenced(probe, cut_at, "cut from etcd")
        load.wait_progress(20, f"on node {new.node_id}")
        loopback.heal()
        assert wait_settled(cluster) is new
        load.wait_progress(10, "after the heal")
    assert "arbiter unreachable" in old.log_text()
    finish(cluster, load.history)


def test_etcd_stopped_for_ten_seconds(cluster_factory: ClusterFactory, arbiter: Etcd) -> None:
    """No renewal, so nobody acknowledges past the deadline, every node says "arbiter
    unreachable", nobody is promoted; writes resume by themselves once etcd is back (E5)."""
    cluster, primary = start(cluster_factory, arbiter)
    with Workload(cluster.servers) as load:
        with pinned(cluster, primary, load.history) as probe:
            probe.wait_answered(5, "before etcd stops")
            arbiter.stop()
            stopped_at = load.history.now()
            wait_for(
                lambda: not any(_arbiter_reachable(n) for n in cluster.nodes.values()),
                FENCE + 5.0,
                "every node to report the arbiter unreachable",
            )
            time.sleep(10.0)  # etcd stays down for ten seconds, on purpose
        assert_fenced(probe, stopped_at, "etcd stopped")
        restarted_at = load.history.now()
        arbiter.start()
        late = [
            op
            for op in load.history.of_kind("send", OK)
            if op.completed is not None and stopped_at + FENCE + SLACK < op.completed < restarted_at
        ]
        assert not late, f"acknowledged while etcd was down: {late[:5]}"
        load.wait_progress(20, "after etcd is back", timeout=TAKEOVER)
    finish(cluster, load.history)


def _arbiter_reachable(node: NodeProcess) -> bool:
    status = node.status()
    return status is not None and bool(status["node"]["arbiter"]["reachable"])


def test_primary_frozen_past_its_ttl_is_fenced_when_thawed(
    cluster_factory: ClusterFactory, arbiter: Etcd
) -> None:
    """Frozen, the primary renews nothing; its key expires and a backup takes it. Thawed,
    it is past its deadline: a read that waited in its socket all along must not be
    served from its stale state before it steps down, and it never leads again.

    The cluster is quiet around the freeze: under writes a read waits anyway for the
    writes it saw to be acknowledged (R7), and would prove nothing."""
    cluster, old = start(cluster_factory, arbiter)
    epoch = view_of(old).epoch
    with Workload(cluster.servers) as load:
        load.wait_progress(20, "before the freeze")
    history = load.history
    with pinned(cluster, old, history, attempt=TAKEOVER, sends=False) as probe:
        probe.wait_answered(5, "before the freeze")
        old.freeze()
        frozen_at = history.now()
        new = wait_new_primary(others(cluster, old), epoch, "the old primary frozen")
        run(send_some(cluster, history, 10, "while frozen"))
        old.thaw()
        wait_view(old, lambda v: v.primary_id == new.node_id, "following the new primary")
    assert_fenced(probe, frozen_at, "frozen past the lease")
    assert wait_settled(cluster) is new
    after_thaw = old.log_text().split(f"SIGCONT node {old.node_id}")[-1]
    assert "became primary" not in after_thaw
    finish(cluster, history)


async def send_some(cluster: Cluster, history: History, count: int, what: str) -> None:
    """``count`` sends of the pinned client's user through the cluster, each acknowledged."""
    async with Client(cluster.servers, timeout=TAKEOVER) as client:
        await client.login(PROBER, PASSWORD)
        for n in range(count):
            op = await send_recorded(client, PROBER, "writer0", f"{what} {n}", history)
            assert op.outcome == OK, f"not acknowledged: {op}"


# ---- restarts -----------------------------------------------------------------------------


def test_all_killed_then_any_member_leads_alone(
    cluster_factory: ClusterFactory, arbiter: Etcd
) -> None:
    """E6: the sync set in etcd names who may lead, so after all three crash (under
    load, so their positions may differ) the first member back leads without waiting
    for the others. Each node comes back first once, second once and last once."""
    cluster, _ = start(cluster_factory, arbiter)
    with Workload(cluster.servers) as load:
        for order in ((1, 2, 3), (2, 3, 1), (3, 1, 2)):
            load.wait_progress(10, "before the crash")
            for node in cluster.nodes.values():
                node.kill()
            first, *rest = (cluster[i] for i in order)
            first.start()
            wait_view(first, lambda v: v.is_primary, "primary alone", timeout=TAKEOVER)
            load.wait_progress(5, f"on node {first.node_id} alone")
            for node in rest:
                node.start()
                assert wait_settled(cluster) is first
    finish(cluster, load.history)


def test_a_wiped_member_does_not_lead(cluster_factory: ClusterFactory, arbiter: Etcd) -> None:
    """E4: a member whose data folder was wiped comes back with another database than
    the one the stored sync set names: alone, it waits and says why; it rejoins from a
    member that leads."""
    cluster, primary = start(cluster_factory, arbiter)
    with Workload(cluster.servers) as load:
        load.wait_progress(20, "before the crash")
    for node in cluster.nodes.values():
        node.kill()
    shutil.rmtree(primary.data_dir)
    primary.start()

    def refused(view: NodeStatus) -> bool:
        return "wiped or replaced" in (view.reason or "")

    wait_view(primary, refused, "refusing to lead on a wiped database", timeout=TAKEOVER)
    assert_stays(
        lambda: None if not view_of(primary).is_primary else "it became primary",
        LEASE_TTL + 1.0,
        f"node {primary.node_id} leading on a wiped database",
    )
    heir = others(cluster, primary)[0]
    heir.start()
    assert wait_settled(cluster) is heir
    cluster.start()
    assert wait_settled(cluster) is heir
    finish(cluster, load.history)


# ---- everything at once ---------------------------------------------------------------------


@pytest.mark.usefixtures("cuts")
def test_rolling_partitions_while_writing(cluster_factory: ClusterFactory, arbiter: Etcd) -> None:
    cluster, _ = start(cluster_factory, arbiter)
    with Workload(cluster.servers) as load:
        for round_ in range(4):
            primary = wait_settled(cluster)
            load.wait_progress(10, f"before round {round_}")
            backup = others(cluster, primary)[round_ % 2]
            if round_ == 0:
                isolate(cluster, primary)
            elif round_ == 1:
                isolate(cluster, backup)
            elif round_ == 2:
                loopback.cut(primary.host, ETCD_HOST, both=True)
            else:
                cut_from_peers(cluster, primary)
            time.sleep(LEASE_TTL + 1.0)  # stays cut past a lease, on purpose
            loopback.heal()
        wait_settled(cluster)
        load.wait_progress(10, "after the last heal")
    finish(cluster, load.history)
