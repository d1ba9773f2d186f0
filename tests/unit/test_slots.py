"""Client connections by address, and who gives way when a node is full (service/slots.py)."""

from __future__ import annotations

import random

import pytest

from service.slots import ClientSlots, SlotsFull


def test_a_full_node_closes_the_crowded_addresss_oldest_for_a_newcomer() -> None:
    slots: ClientSlots[str] = ClientSlots(limit=4)
    for name in ("m0", "m1", "m2"):
        assert slots.make_room("mallory") is None
        slots.add("mallory", name)
    assert slots.make_room("alice") is None
    slots.add("alice", "a0")
    # Full. The crowd's own address is refused; so is alice's second (it would
    # only swap places: two each after). bob's first takes mallory's oldest.
    with pytest.raises(SlotsFull):
        slots.make_room("mallory")
    assert slots.make_room("bob") == "m0"
    slots.add("bob", "b0")
    with pytest.raises(SlotsFull):
        slots.make_room("alice")
    assert (len(slots), slots.held_by("mallory"), slots.held_by("bob")) == (4, 2, 1)


def test_a_connection_removed_twice_or_given_way_already_counts_once() -> None:
    slots: ClientSlots[str] = ClientSlots(limit=2)
    slots.add("mallory", "m0")
    slots.add("mallory", "m1")
    assert slots.make_room("alice") == "m0"  # forgotten here already
    slots.add("alice", "a0")
    slots.remove("mallory", "m0")  # its connection's own end: nothing more
    slots.remove("alice", "a0")
    slots.remove("alice", "a0")
    assert (len(slots), slots.held_by("mallory"), slots.held_by("alice")) == (1, 1, 0)


def test_random_arrivals_and_departures_keep_the_bound_and_the_counts() -> None:
    rng = random.Random(11)
    slots: ClientSlots[int] = ClientSlots(limit=30)
    held: dict[str, list[int]] = {}
    for n in range(20_000):
        address = rng.choice("mmmmmmabcde")
        if rng.random() < 0.6:
            try:
                crowded = slots.make_room(address)
            except SlotsFull:
                assert len(slots) == 30
                assert len(held.get(address, [])) + 2 > max(map(len, held.values()))
                continue
            if crowded is not None:
                owner = next(a for a, conns in held.items() if crowded in conns)
                assert len(held[owner]) == max(map(len, held.values()))
                assert held[owner][0] == crowded  # its oldest
                held[owner].remove(crowded)
            slots.add(address, n)
            held.setdefault(address, []).append(n)
        elif held.get(address):
            slots.remove(address, held[address].pop(rng.randrange(len(held[address]))))
        held = {a: conns for a, conns in held.items() if conns}
        assert len(slots) == sum(map(len, held.values())) <= 30
        for a, conns in held.items():
            assert slots.held_by(a) == len(conns)
