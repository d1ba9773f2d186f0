"""Client connections by address: who gives way when a node is full.

Why
---
A node serves at most ``client_limit`` clients (what its file descriptors
allow), and a client hello needs no account. Anyone who can reach the port
could take every slot with idle connections from one host (each lasts
``idle_client_timeout``, and is opened again when it ends), and then nobody
else could connect, to any of the three nodes: a hello beyond the limit was
refused ``busy``, whoever sent it.

How
---
When the node is full, a hello from an address holding at least two fewer
connections than the address holding the most is welcomed, and the oldest
connection of that address is closed to make room (with a ``busy`` error
frame: the client may come back, and finds the same rule); any other hello is
refused ``busy``, as before. So connections from one address, or from a few,
hold slots only against themselves: a newcomer from elsewhere gets in. Users
behind one address (a NAT, one host) share its count.

Invariants: ``len`` is the sum of the addresses' counts; ``_counts`` tallies
each address by its connections (``tally.Tally``).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

from .tally import Tally

C = TypeVar("C", bound=Hashable)


class SlotsFull(Exception):
    """The newcomer is refused: its address holds (nearly) the most connections."""


class ClientSlots(Generic[C]):
    """At most ``limit`` client connections, counted by address."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        # Each address's connections, oldest first (a dict keeps insertion order).
        self._by_address: dict[str, dict[C, None]] = {}
        self._counts = Tally()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[C]:
        """Every connection held (a copy: closing them may change the slots)."""
        return iter([c for held in self._by_address.values() for c in held])

    def held_by(self, address: str) -> int:
        """How many connections ``address`` holds."""
        held = self._by_address.get(address)
        return len(held) if held is not None else 0

    def make_room(self, address: str) -> C | None:
        """Before welcoming a client from ``address``: None when a slot is free, else
        the connection to close for it (already forgotten here). Raises
        ``SlotsFull`` when the newcomer is the one refused."""
        if self._count < self.limit:
            return None
        if self.held_by(address) + 2 > self._counts.most:
            raise SlotsFull
        crowd = str(self._counts.one_of_the_most())
        oldest = next(iter(self._by_address[crowd]))
        self.remove(crowd, oldest)
        return oldest

    def add(self, address: str, connection: C) -> None:
        held = self._by_address.setdefault(address, {})
        held[connection] = None
        self._count += 1
        self._counts.moved(address, len(held) - 1, len(held))

    def remove(self, address: str, connection: C) -> None:
        """Forget ``connection`` (closed, or given way); nothing if it is not here."""
        held = self._by_address.get(address)
        if held is None or connection not in held:
            return
        del held[connection]
        self._count -= 1
        if not held:
            del self._by_address[address]
        self._counts.moved(address, len(held) + 1, len(held))
