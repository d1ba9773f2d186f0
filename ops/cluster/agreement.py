"""What the nodes' status views must say before a harness may go on: the one set of rules.

Every wait of the tests, the benchmark and the chaos tool reduces to these
checks over one ``NodeStatus`` per node (``service/status.py``), taken at one
moment from the nodes expected to answer. Each returns what it found, or
raises ``NotYet`` saying what is missing, so that a wait's timeout reports
the last state it saw.

From weakest to strongest:

* ``agreed_primary``: exactly one node says it is primary, and every node
  names it (``primary_id``) in its epoch. This is *the* agreed primary; a
  node claiming the role in a stale epoch, or a backup still following an
  old primary, means there is none yet. (``service.status.leading`` is the
  weaker rule a client follows: the claim in the highest epoch.)
* ``common_position``: and every node at the primary's (epoch, seq) position,
  compared as positions: the same seq in another epoch is a diverged history;
* ``in_sync``: and every node in the primary's sync set and among the members
  it waits for, each backup confirmed in it (the precondition of a failover
  that R5 allows);
* ``whole_sync_set``: the primary's sync set, latest and in effect, is exactly
  the given nodes (reachable under load, where positions differ between two
  writes);
* ``differing_tables``: per-table checksums of converged nodes agree (G4).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from service.status import NodeStatus

from .waiting import NotYet

Position = tuple[int, int]
Views = Mapping[int, NodeStatus]


def describe(views: Views) -> str:
    return "; ".join(str(view) for view in views.values())


def agreed_primary(views: Views) -> int:
    """The id of the one primary every view names, in its epoch; else NotYet."""
    primaries = [node_id for node_id, view in views.items() if view.is_primary]
    if len(primaries) != 1:
        raise NotYet(f"{len(primaries)} primaries: {describe(views)}")
    head = views[primaries[0]]
    strays = [node_id for node_id, view in views.items() if not view.follows(head)]
    if strays:
        raise NotYet(f"nodes {strays} do not name node {head.node_id}: {describe(views)}")
    return primaries[0]


def common_position(views: Views, primary: int) -> Position:
    """The primary's position if every view has it (in the same epoch); else NotYet."""
    head = views[primary]
    behind = [
        str(view)
        for view in views.values()
        if (view.epoch, view.position) != (head.epoch, head.position)
    ]
    if behind:
        raise NotYet(f"not at {head.position} of node {primary}: {'; '.join(behind)}")
    return head.position


def in_sync(views: Views, primary: int) -> None:
    """Every view's node in the primary's sync set and in effect, each backup confirmed."""
    head = views[primary]
    members = set(head.members) & set(head.in_sync or ())
    outside = [str(view) for node_id, view in views.items() if node_id not in members]
    if outside:
        raise NotYet(f"primary {head}; not in sync: {outside}")
    confirmed_backups(views, primary)


def whole_sync_set(views: Views, primary: int, nodes: Collection[int]) -> None:
    """The primary's sync set, the latest and the one in effect, is exactly ``nodes``."""
    head = views[primary]
    expected = set(nodes)
    if set(head.members) != expected or set(head.in_sync or ()) != expected:
        raise NotYet(f"the sync set is not {sorted(expected)}: {head}")


def confirmed_backups(views: Views, primary: int) -> None:
    """Every backup recently confirmed in the sync set (it may take over, R5)."""
    unconfirmed = [str(v) for i, v in views.items() if i != primary and not v.confirmed]
    if unconfirmed:
        raise NotYet(f"not a confirmed backup of node {primary}: {'; '.join(unconfirmed)}")


def differing_tables(sums: Mapping[int, Mapping[str, str]]) -> dict[str, list[int]]:
    """Table -> the nodes whose checksum of it differs from the first node's."""
    if not sums:
        return {}
    (_, expected), *others = sums.items()
    differ: dict[str, list[int]] = {}
    for node_id, actual in others:
        for table in sorted(expected.keys() | actual.keys()):
            if expected.get(table) != actual.get(table):
                differ.setdefault(table, []).append(node_id)
    return differ
