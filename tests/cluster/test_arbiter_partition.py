"""A partition across hosts, and its heal, with etcd as the arbiter (SPEC section 10).

Real nodes on loopback addresses of this run's own (127.N.0.41-43,
``tests/helpers/loopback.py``), so that nft (``ops/netcut.py``) can cut them
apart, and a real etcd member. A partition closes no connection: a link just
goes silent, and TCP alone would carry it on only at its next backed-off
retransmission, long after the heal. So in arbiter
mode a node gives up a link silent for ``lease_ttl`` and redials
(``peer.give_up_when_silent``); after the heal the cut-off nodes are linked and
back in the sync set within seconds. Needs nft and root, like every test that
cuts: skipped with the reason elsewhere (CI runs them).
"""

from __future__ import annotations

import time

from ops.cluster.waiting import wait_for
from ops.etcd import Etcd
from tests.helpers import loopback

HOSTS = [loopback.address(41), loopback.address(42), loopback.address(43)]
LEASE_TTL = 3.0
# From the heal to every node back in the sync set: a fresh connection and a
# catch-up. Without giving up silent links it took 20 s after a 40 s partition
# on the rehearsal (the next retransmission of the stalled connection).
REJOIN_WITHIN = 10.0


def test_links_silenced_by_a_partition_are_given_up_and_redialled_after_the_heal(
    cluster_factory, etcd: Etcd, cuts: None
) -> None:
    cluster = cluster_factory(
        hosts=HOSTS,
        arbiter="etcd",
        etcd_endpoints=etcd.client,
        etcd_prefix="/chat/partition-test",
        lease_ttl=LEASE_TTL,
    )
    cluster.start()
    primary = cluster.wait_whole_sync_set()
    backups = [node for node in cluster.nodes.values() if node is not primary]
    since = primary.log_size()
    # The primary keeps etcd (on 127.0.0.1) and loses both backups: it shrinks the
    # sync set to itself through etcd and goes on; the backups cannot lead.
    for backup in backups:
        loopback.cut(primary.host, backup.host, both=True)

    def links_given_up() -> bool:
        down = {event.fields.get("peer") for event in primary.events("peer link down", since)}
        return down >= {str(backup.node_id) for backup in backups}

    wait_for(
        links_given_up,
        LEASE_TTL + 10,
        f"node {primary.node_id} giving up its links to the cut-off backups",
    )
    loopback.heal()
    healed = time.monotonic()
    back = cluster.wait_whole_sync_set(timeout=REJOIN_WITHIN + 20)
    took = time.monotonic() - healed
    assert back.node_id == primary.node_id
    assert took < REJOIN_WITHIN, f"the backups rejoined {took:.1f} s after the heal"
