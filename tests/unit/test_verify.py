"""Cross-node checksums (``service/replication/verify.py``) and the storage checks
behind them: who is judged damaged, and what a snapshot check finds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from service.chat_schema import MIGRATIONS
from service.replication.messages import Message, VerifyReply
from service.replication.verify import Verifier, judge
from service.storage import Storage, check_database_file

A = {"users": "a", "messages": "a"}
B = {"users": "a", "messages": "b"}


@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        pytest.param({1: A, 2: A, 3: A}, (True, ()), id="all-agree"),
        pytest.param({1: A, 2: A, 3: B}, (False, (3,)), id="one-backup-differs"),
        pytest.param({1: B, 2: A, 3: A}, (False, (1,)), id="the-primary-differs"),
        pytest.param({1: A, 2: B}, (False, ()), id="two-differ-undecided"),
        pytest.param({1: A}, (True, ()), id="alone"),
    ],
)
def test_judge_names_the_nodes_outside_a_majority(
    answers: dict[int, dict[str, str]], expected: tuple[bool, tuple[int, ...]]
) -> None:
    assert judge(answers) == expected


class Wire:
    def __init__(self) -> None:
        self.sent: list[tuple[int, dict[str, Any]]] = []
        self.damaged: list[str] = []
        self.spawned: list[object] = []

    def send(self, peer: int, msg: Message) -> bool:
        self.sent.append((peer, msg.to_wire()))
        return True

    def verifier(self, own: dict[str, str] | None) -> Verifier:
        return Verifier(
            1,
            10.0,
            lambda seq: own,
            self.send,
            self.damaged.append,
            self.spawned.append,
        )


def test_a_round_waits_for_a_quiet_moment_then_tells_the_odd_backup_to_resync() -> None:
    wire = Wire()
    verifier = wire.verifier(A)
    verifier.next_at = 0.0
    verifier.tick(1.0, epoch=2, seq=7, quiet=False, members=(1, 2, 3))
    assert verifier.round is None
    assert wire.sent == []
    verifier.tick(2.0, epoch=2, seq=7, quiet=True, members=(1, 2, 3))
    assert [(peer, msg["type"], msg["seq"]) for peer, msg in wire.sent] == [
        (2, "verify", 7),
        (3, "verify", 7),
    ]
    for coro in wire.spawned:
        coro.close()  # type: ignore[attr-defined]
    number = verifier.numbers
    verifier._record(number, 1, A)
    verifier.on_reply(2, VerifyReply(2, 7, number, dict(A)))
    verifier.on_reply(3, VerifyReply(2, 7, number, dict(B)))
    assert wire.sent[-1][0] == 3
    assert wire.sent[-1][1]["type"] == "resync"
    assert wire.damaged == []
    assert verifier.last is not None
    assert verifier.last.damaged == (3,)


@pytest.mark.parametrize(
    ("answers", "copies", "expected"),
    [
        # Node 3 installed node 1's snapshot: 1 and 3 are one witness against 2.
        pytest.param({1: B, 2: A, 3: B}, {3: 1}, (False, ()), id="primary-and-its-copy"),
        # The copy differs from its source: 1 and 2 are independent witnesses.
        pytest.param({1: A, 2: A, 3: B}, {3: 1}, (False, (3,)), id="the-copy-differs"),
        # The copy agrees with the node it was not copied from: two witnesses.
        pytest.param({1: B, 2: A, 3: A}, {3: 1}, (False, (1,)), id="the-copy-sides-with-2"),
        pytest.param({1: A, 2: A, 3: A}, {3: 1}, (True, ()), id="all-agree"),
    ],
)
def test_a_snapshot_copy_counts_with_its_source(
    answers: dict[int, dict[str, str]],
    copies: dict[int, int],
    expected: tuple[bool, tuple[int, ...]],
) -> None:
    assert judge(answers, copies) == expected


def finish_round(
    verifier: Verifier, wire: Wire, own: dict[str, str], others: dict[int, dict[str, str]]
) -> None:
    for coro in wire.spawned:
        coro.close()  # type: ignore[attr-defined]
    wire.spawned.clear()
    verifier._record(verifier.numbers, 1, own)
    for peer, sums in others.items():
        verifier.on_reply(peer, VerifyReply(2, 7, verifier.numbers, dict(sums)))


def test_a_backup_sent_the_primarys_snapshot_is_no_witness_until_all_agree() -> None:
    wire = Wire()
    verifier = wire.verifier(B)
    verifier.snapshot_sent(3)
    verifier.next_at = 0.0
    verifier.tick(1.0, epoch=2, seq=7, quiet=True, members=(1, 2, 3))
    finish_round(verifier, wire, B, {2: A, 3: B})
    assert verifier.last is not None
    assert (verifier.last.agreed, verifier.last.damaged) == (False, ())
    assert [msg["type"] for _, msg in wire.sent] == ["verify", "verify"]  # no resync
    assert wire.damaged == []
    # Once all agree, a later difference is the node's own again.
    verifier.next_at = 0.0
    verifier.tick(2.0, epoch=2, seq=7, quiet=True, members=(1, 2, 3))
    finish_round(verifier, wire, A, {2: A, 3: A})
    assert verifier.last.agreed
    verifier.next_at = 0.0
    verifier.tick(3.0, epoch=2, seq=7, quiet=True, members=(1, 2, 3))
    finish_round(verifier, wire, B, {2: A, 3: B})
    assert verifier.last.damaged == (2,)
    assert (wire.sent[-1][0], wire.sent[-1][1]["type"]) == (2, "resync")


def test_a_node_that_moved_on_drops_the_round() -> None:
    wire = Wire()
    verifier = wire.verifier(A)
    verifier.next_at = 0.0
    verifier.tick(1.0, epoch=2, seq=7, quiet=True, members=(1, 2))
    for coro in wire.spawned:
        coro.close()  # type: ignore[attr-defined]
    verifier.on_reply(2, VerifyReply(2, 7, verifier.numbers, None))
    assert verifier.round is None
    assert verifier.last is None


def test_checksums_at_a_seq_the_database_is_not_at_is_none(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "chat.db", migrations=MIGRATIONS)
    try:
        batch = storage.begin_batch()
        batch.db.execute(
            "INSERT INTO users(name, name_key, password_hash, created_at) VALUES ('a','a','h',1)"
        )
        batch.seal(1)
        batch.commit()
        assert storage.checksums_at(1) == storage.checksums()
        assert storage.checksums_at(2) is None
    finally:
        storage.close()


def test_a_damaged_snapshot_file_is_found_before_it_is_sent_or_installed(
    tmp_path: Path,
) -> None:
    storage = Storage(tmp_path / "chat.db", migrations=MIGRATIONS)
    try:
        for i in range(300):
            batch = storage.begin_batch()
            batch.db.execute(
                "INSERT INTO users(name, name_key, password_hash, created_at) "
                "VALUES (?, ?, 'h', 1)",
                (f"user{i}" + "x" * 40, f"user{i}" + "x" * 40),
            )
            batch.seal(1)
            batch.commit()
        snapshot = tmp_path / "snapshot.db"
        storage.make_snapshot(snapshot)
        assert storage.check_file(snapshot) is None
        data = bytearray(snapshot.read_bytes())
        page = 4096
        middle = (len(data) // page // 2) * page
        data[middle : middle + 16] = bytes(b ^ 0x5A for b in data[middle : middle + 16])
        snapshot.write_bytes(bytes(data))
        problem = check_database_file(snapshot)
        assert problem is not None
    finally:
        storage.close()
