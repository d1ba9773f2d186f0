"""The typed ``status`` (service/status.py) and the harness's rules over it (ops/cluster)."""

from __future__ import annotations

from typing import Any

import pytest

from ops.cluster import agreement
from ops.cluster.waiting import NotYet
from service.errors import ProtocolViolation
from service.replication.types import SyncSet
from service.status import ArbiterStatus, NodeStatus, StoredSyncSet, leading


def node(node_id: int, role: str = "backup", **fields: Any) -> dict[str, Any]:
    """A ``node`` object as a real node sends it (service/replication/runtime.py)."""
    return {
        "id": node_id,
        "address": f"127.0.0.1:700{node_id}",
        "role": role,
        "epoch": 3,
        "seq": 40,
        "position": [3, 40],
        "primary": "127.0.0.1:7001",
        "primary_id": 1,
        "sync_set": {"version": 5, "members": [1, 2, 3], "epoch": 3, "databases": [[1, "d1"]]},
        "in_sync": [1, 2, 3] if role == "primary" else None,
        "watermark": 40 if role == "primary" else None,
        "confirmed": True,
        "waiting_for": None,
        "reason": None,
        "database": f"d{node_id}",
        "unproven": None,
        "lag": {"2": 0, "3": 1} if role == "primary" else {},
        "links": [i for i in (1, 2, 3) if i != node_id],
        "checksums": None,
        "batches": 7,
        "writes": 9,
        **fields,
    }


def views(*nodes: dict[str, Any]) -> dict[int, NodeStatus]:
    return {n["id"]: NodeStatus.from_wire(n) for n in nodes}


def test_a_status_reply_is_read_into_typed_fields() -> None:
    checksums = {"seq": 40, "nodes": [1, 2, 3], "agreed": True, "damaged": [], "at": 1.5}
    status = NodeStatus.from_reply({"node": node(1, "primary", checksums=checksums)})
    assert (status.node_id, status.role, status.position, status.primary_id) == (
        1,
        "primary",
        (3, 40),
        1,
    )
    assert status.sync_set == SyncSet(5, (1, 2, 3), 3, ((1, "d1"),))
    assert status.members == (1, 2, 3)
    assert status.lag == {2: 0, 3: 1}
    assert status.links == (2, 3)
    assert status.checksums is not None
    assert status.checksums.to_status() == checksums
    assert status.sync_set_wire() == node(1)["sync_set"]


def test_missing_optional_fields_take_their_nothing_known_values() -> None:
    status = NodeStatus.from_wire({"id": 2, "role": "electing", "epoch": 1, "seq": 5})
    assert status.position == (1, 5)
    assert status.primary_id is None
    assert status.waiting_for is None
    assert status.members == ()
    assert status.links == ()
    assert status.arbiter is None  # the default mode: no arbiter


# A node's view of etcd as LeasedArbiter.status sends it (service/replication/leased.py).
ARBITER = {
    "mode": "etcd",
    "reachable": True,
    "unreachable": None,
    "leader": 2,
    "leader_epoch": 4,
    "leader_ttl": 2.0,
    "sync_set": {"version": 7, "members": [1, 2, 3]},
}


def test_the_arbiter_part_is_typed_and_given_back_as_it_came() -> None:
    primary = NodeStatus.from_wire(node(2, "primary", arbiter={**ARBITER, "serving_for": 2.4}))
    assert primary.arbiter == ArbiterStatus(
        "etcd", True, None, 2, 4, 2.0, StoredSyncSet(7, (1, 2, 3)), 2.4
    )
    assert primary.arbiter.to_status() == {**ARBITER, "serving_for": 2.4}
    backup = NodeStatus.from_wire(node(3, arbiter=ARBITER))
    assert backup.arbiter is not None
    assert backup.arbiter.to_status() == ARBITER  # no serving_for on a backup


def test_an_unreachable_arbiter_and_an_empty_store_read_as_nothing_known() -> None:
    cut = {
        "mode": "etcd",
        "reachable": False,
        "unreachable": "127.0.0.10:2379: ConnectionTimeoutError: read timed out",
        "leader": None,
        "leader_epoch": None,
        "leader_ttl": None,
        "sync_set": None,
    }
    status = NodeStatus.from_wire(node(1, "electing", arbiter=cut))
    assert status.arbiter is not None
    assert not status.arbiter.reachable
    assert status.arbiter.unreachable == cut["unreachable"]
    assert (status.arbiter.leader, status.arbiter.sync_set) == (None, None)
    assert status.arbiter.to_status() == cut


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"role": "leader"}, "role"),
        ({"epoch": "3"}, "epoch"),
        ({"seq": None}, "seq"),
        ({"position": [3]}, "position"),
        ({"sync_set": {"version": 1, "members": ["a"]}}, "members"),
        ({"waiting_for": 2}, "waiting_for"),
        ({"lag": {"x": 1}}, "lag"),
        ({"checksums": {"seq": 1}}, "nodes"),
        ({"arbiter": "etcd"}, "arbiter is 'etcd', not an object"),
        ({"arbiter": {"mode": "etcd"}}, "arbiter.reachable is None, not true or false"),
        ({"arbiter": {**ARBITER, "leader": "2"}}, "arbiter.leader is '2', not an integer"),
        ({"arbiter": {**ARBITER, "leader_ttl": "soon"}}, "arbiter.leader_ttl"),
        ({"arbiter": {**ARBITER, "sync_set": {"version": 1}}}, "arbiter.sync_set.members"),
    ],
)
def test_a_malformed_status_is_one_clear_error(fields: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ProtocolViolation, match=complaint):
        NodeStatus.from_wire(node(2, **fields))


def test_a_reply_without_a_node_is_refused() -> None:
    with pytest.raises(ProtocolViolation, match="node"):
        NodeStatus.from_reply({"nodes": []})


def test_the_agreed_primary_is_named_by_every_node_in_its_epoch() -> None:
    assert agreement.agreed_primary(views(node(1, "primary"), node(2), node(3))) == 1


def test_no_agreed_primary_while_a_node_follows_another() -> None:
    stale = node(3, primary="127.0.0.1:7002", primary_id=2)
    with pytest.raises(NotYet, match=r"nodes \[3\] do not name node 1"):
        agreement.agreed_primary(views(node(1, "primary"), node(2), stale))


def test_no_agreed_primary_across_epochs() -> None:
    behind = node(2, epoch=2)
    with pytest.raises(NotYet, match="do not name node 1"):
        agreement.agreed_primary(views(node(1, "primary"), behind, node(3)))


def test_two_primaries_are_no_agreement_but_the_highest_epoch_leads() -> None:
    old = node(2, "primary", epoch=2, primary_id=2)
    seen = views(node(1, "primary"), old)
    with pytest.raises(NotYet, match="2 primaries"):
        agreement.agreed_primary(seen)
    head = leading(seen.values())
    assert head is not None
    assert head.node_id == 1


def test_converged_means_the_same_position_in_the_same_epoch() -> None:
    seen = views(node(1, "primary"), node(2), node(3, seq=39, position=[3, 39]))
    with pytest.raises(NotYet, match="not at"):
        agreement.common_position(seen, 1)
    assert agreement.common_position(views(node(1, "primary"), node(2)), 1) == (3, 40)


def test_in_sync_wants_every_node_in_the_sync_set_and_confirmed() -> None:
    agreement.in_sync(views(node(1, "primary"), node(2), node(3)), 1)
    with pytest.raises(NotYet, match="not a confirmed backup"):
        agreement.in_sync(views(node(1, "primary"), node(2, confirmed=False)), 1)
    with pytest.raises(NotYet, match="not in sync"):
        agreement.in_sync(views(node(1, "primary", in_sync=[1, 3]), node(2)), 1)


def test_differing_tables_name_the_nodes_that_differ() -> None:
    sums = {1: {"users": "a", "messages": "b"}, 2: {"users": "a", "messages": "c"}, 3: {}}
    assert agreement.differing_tables(sums) == {"messages": [2, 3], "users": [3]}
