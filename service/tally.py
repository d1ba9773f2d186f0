"""Keys by how many things each holds, and the largest such count, in O(1) per change.

The fair queues (``replication/fairqueue.py``: requests by account) and the client
slots (``slots.py``: connections by address) both refuse, or make room at the cost
of, whoever holds the most; a flood can hold thousands of keys, so the largest
count is kept as things come and go rather than searched for.

Invariants: ``_keys[n]`` is the set of keys holding ``n``, for every ``n`` some key
holds (never empty); ``most`` is the largest such ``n`` (0 when none). Counts
change by one at a time (``moved``).
"""

from __future__ import annotations

from collections.abc import Hashable


class Tally:
    def __init__(self) -> None:
        self._keys: dict[int, set[Hashable]] = {}
        self.most = 0

    def one_of_the_most(self) -> Hashable:
        """A key holding ``most`` (there must be one)."""
        return next(iter(self._keys[self.most]))

    def moved(self, key: Hashable, old: int, new: int) -> None:
        """``key`` went from holding ``old`` to ``new`` (one more or one fewer)."""
        keys = self._keys
        if old:
            holders = keys[old]
            holders.discard(key)
            if not holders:
                del keys[old]
                if old == self.most and new < old:
                    self.most = new
        if new:
            keys.setdefault(new, set()).add(key)
            if new > self.most:
                self.most = new

    def clear(self) -> None:
        self._keys.clear()
        self.most = 0
