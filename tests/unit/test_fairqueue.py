"""The primary's queue of writes, shared out between accounts (replication/fairqueue.py)."""

from __future__ import annotations

import random
from collections.abc import Hashable

import pytest

from service.replication.fairqueue import FairQueue, QueueFull


def items(taken: list[tuple[Hashable, str]]) -> list[str]:
    return [item for _, item in taken]


def test_a_batch_takes_one_write_of_each_account_in_turn() -> None:
    queue: FairQueue[str] = FairQueue(limit=100)
    for n in range(5):
        queue.push("mallory", f"m{n}")
    queue.push("alice", "a0")
    queue.push("bob", "b0")
    queue.push("alice", "a1")
    # alice's writes, behind five of mallory's, go in the first batch; each line
    # keeps its order; a line that had its turn goes to the back.
    assert queue.take(4) == [("mallory", "m0"), ("alice", "a0"), ("bob", "b0"), ("mallory", "m1")]
    assert items(queue.take(10)) == ["a1", "m2", "m3", "m4"]
    assert len(queue) == 0
    assert not queue


def test_a_full_queue_lets_in_a_smaller_account_and_refuses_the_floods_newest() -> None:
    queue: FairQueue[str] = FairQueue(limit=4)
    for n in range(4):
        queue.push("mallory", f"m{n}")
    # alice holds nothing: mallory's newest makes room for her write.
    assert queue.push("alice", "a0") == "m3"
    # mallory, the longest line, is refused; so is a write that would only swap
    # places (alice's second would make her line as long as mallory's was).
    with pytest.raises(QueueFull):
        queue.push("mallory", "m4")
    assert queue.push("bob", "b0") == "m2"
    with pytest.raises(QueueFull):
        queue.push("alice", "a1")
    assert len(queue) == 4
    assert items(queue.take(10)) == ["m0", "a0", "b0", "m1"]


def test_writes_put_back_go_first_in_their_lines_and_others_keep_their_turns() -> None:
    """A batch ends (full, or its record out of room) before writes it took: they go
    back to the front of their accounts' lines. A key whose line emptied comes first
    again; a write that came meanwhile still gets its turn in the next batch, not
    behind everything put back (a flood's 480 largest sends: fifteen batches)."""
    queue: FairQueue[str] = FairQueue(limit=20)
    for item in ("a0", "a1", "a2"):
        queue.push("alice", item)
    queue.push("bob", "b0")
    taken = queue.take(3)
    assert items(taken) == ["a0", "b0", "a1"]
    queue.put_back(taken[1:])  # the batch ended after a0
    assert len(queue) == 3
    assert items(queue.take(10)) == ["b0", "a1", "a2"]

    for n in range(8):
        queue.push("mallory", f"m{n}")
    taken = queue.take(8)
    queue.put_back(taken[2:])  # the batch ended after m1
    queue.push("carol", "c0")
    assert items(queue.take(3)) == ["m2", "c0", "m3"]
    assert queue.waiting("mallory") == 4


def filled(rng: random.Random, keys: int, deepest: int) -> FairQueue[str]:
    queue: FairQueue[str] = FairQueue(limit=10_000)
    for n in range(rng.randrange(keys * deepest)):
        key = f"k{rng.randrange(keys)}"
        queue.push(key, f"{key}.{n}")
    return queue


def test_a_put_back_leaves_the_queue_as_the_shorter_take_would() -> None:
    """take(n) with the last n - w put back is take(w): the same writes come next,
    in the same turns (compared by what every later take gives)."""
    for seed in range(300):
        rng = random.Random(seed)
        keys, deepest = rng.randrange(1, 12), rng.randrange(1, 8)
        one = filled(random.Random(-seed), keys, deepest)
        other = filled(random.Random(-seed), keys, deepest)
        most = rng.randrange(1, keys * deepest + 2)
        taken = one.take(most)
        written = rng.randrange(len(taken) + 1)
        one.put_back(taken[written:])
        assert taken[:written] == other.take(written), seed
        assert len(one) == len(other), seed
        while other:
            step = rng.randrange(1, 6)
            assert one.take(step) == other.take(step), seed


def test_deep_lines_all_get_turns_when_every_batch_ends_early() -> None:
    """Sixty-four accounts each with many of the largest sends waiting: a batch takes
    512 and writes some 32 (BATCH_BYTES). With the keys of the writes put back left
    at the back of the turns, the same 32 accounts were written batch after batch and
    the other 32 never; every account is written within a few batches."""
    queue: FairQueue[str] = FairQueue(limit=10_000)
    for n in range(60):
        for account in range(64):
            queue.push(account, f"{account}.{n}")
    written: dict[Hashable, int] = {}
    for _ in range(4):
        taken = queue.take(512)
        for key, _item in taken[:32]:
            written[key] = written.get(key, 0) + 1
        queue.put_back(taken[32:])
    assert sorted(written.values()) == [2] * 64, written


def test_drain_returns_every_write_and_empties_the_queue() -> None:
    queue: FairQueue[str] = FairQueue(limit=10)
    queue.push("alice", "a0")
    queue.push("bob", "b0")
    queue.push("alice", "a1")
    queue.put_back([("dave", "x")])
    assert sorted(queue.drain()) == ["a0", "a1", "b0", "x"]
    assert len(queue) == 0
    assert queue.take(10) == []
    queue.push("carol", "c0")  # usable again
    assert items(queue.take(10)) == ["c0"]


def test_random_operations_keep_the_bound_the_counts_and_each_lines_order() -> None:
    """Pushes, takes and batches that end early (the rest put back), at random."""
    rng = random.Random(7)
    queue: FairQueue[tuple[str, int]] = FairQueue(limit=50)
    held: dict[str, list[int]] = {}
    sent = {key: 0 for key in "abcdefg"}
    for _ in range(20_000):
        if rng.random() < 0.7:
            key = rng.choice("aaaaabcdefg")  # a is the flood
            item = (key, sent[key])
            sent[key] += 1
            try:
                evicted = queue.push(key, item)
            except QueueFull:
                # Refused only when full, and only an account among the longest.
                assert len(queue) == 50
                assert len(held.get(key, [])) + 2 > max(map(len, held.values()))
                continue
            held.setdefault(key, []).append(item[1])
            if evicted is not None:
                longest = max(map(len, held.values()))
                assert len(held[evicted[0]]) == longest or evicted[0] == key
                assert held[evicted[0]].pop() == evicted[1]  # its newest
        else:
            taken = queue.take(rng.randrange(1, 20))
            written = rng.randrange(len(taken) + 1)
            for name, (owner, n) in taken[:written]:
                assert name == owner
                assert held[owner].pop(0) == n  # each line in its order
            queue.put_back(taken[written:])  # the batch ended before these
        held = {key: line for key, line in held.items() if line}
        assert len(queue) == sum(map(len, held.values())) <= 50
        for key, line in held.items():
            assert queue.waiting(key) == len(line)
