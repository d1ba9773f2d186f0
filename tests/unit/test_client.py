"""``client.leader_of``: which node leads, from the ``status`` reports of several nodes.

It decides where a request waiting on a silent node goes next, so a stale
claim (an old primary not yet told of the new epoch) must never win over a
report of a newer epoch, and an unreachable or garbled report counts for nothing.
"""

from __future__ import annotations

from typing import Any

from service.client import leader_of

A, B, C = "127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"


def up(address: str, role: str, epoch: Any, primary: Any = None) -> dict[str, Any]:
    return {
        "address": address,
        "up": True,
        "node": {"role": role, "epoch": epoch, "primary": primary},
    }


def down(address: str) -> dict[str, Any]:
    return {"address": address, "up": False, "error": "no answer"}


def test_a_node_claiming_the_role_leads() -> None:
    assert leader_of([up(B, "primary", 4), up(C, "backup", 4, B)]) == B


def test_a_backup_names_the_primary_it_follows() -> None:
    assert leader_of([down(B), up(C, "backup", 4, A)]) == A


def test_the_highest_epoch_wins_over_an_older_primary_still_claiming() -> None:
    # B was primary in epoch 3 and has not heard of epoch 4, where C follows A.
    assert leader_of([up(B, "primary", 3), up(C, "backup", 4, A)]) == A


def test_in_one_epoch_a_claim_outranks_hearsay() -> None:
    assert leader_of([up(B, "backup", 5, A), up(C, "primary", 5)]) == C


def test_nobody_leads_during_an_election_or_when_nodes_are_silent() -> None:
    assert leader_of([up(B, "electing", 5), down(C)]) is None
    assert leader_of([]) is None


def test_garbled_reports_count_for_nothing() -> None:
    reports = [
        up(B, "backup", "5", A),  # epoch not an int
        up(C, "backup", 6, "not an address"),
        {"address": A, "up": True, "node": None},
        {"address": A, "up": True},
    ]
    assert leader_of(reports) is None
