"""What the primary's accounts wait for, shared out between them: batches and reads.

Why
---
The primary serves what its clients ask in shared lines: the writes waiting for a
batch (``WritePath``: eight batches' worth) and the reads waiting for their turn
of the loop (one query per turn). Both were first come, first served. One
account pipelining the largest ``send`` on a hundred connections kept the write
queue full (4,096 writes, some five seconds of batches): every other user's
write was either refused ``busy`` or let in behind the flood's, longer than a
client waits for one attempt (2 s); the client sent it again, to wait again, and
nobody else wrote while the flood went on. Reads had no bound at all: a hundred
connections with 256 reads each put 25,600 in line before anyone else's, and
each waiting read held a task.

How
---
Each item counts against a key, its account (``Application.share_key``), and
waits in that key's own line. The lines are taken in turns, one item from each
(round robin; a line that had its turn goes to the back), so an account with
nothing waiting is served next however long the others' lines are. When the
queue is full, an item whose line is shorter than the longest by two or more is
let in, and the newest item of the longest line is refused (``busy``, which
changes nothing) to make room; any other item is refused itself. So a flood,
from one account or from many, holds the queue only against itself: anyone with
fewer waiting gets in. What one account's items keep is their order: a line is
first in, first out.

Items put back (taken for a batch that ended before them: full, or its record out
of room) go back as if never taken: to the front of their own lines, in their
order, their keys where the take found them in the turns. They do not go before
everyone's: a batch of the largest sends ends after some 32 of the 512 it took,
and the other accounts' writes would wait behind the 480 put back, some fifteen
batches, where in turns they go into the next one.

Invariants: ``len`` is the items in the lines; every line is non-empty and its
key is in ``_rotation`` exactly once; ``_lengths`` tallies each key by the length
of its line (``tally.Tally``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

from ..tally import Tally

T = TypeVar("T")


class QueueFull(Exception):
    """The item was not let in: its account holds (nearly) the most of the queue."""


class FairQueue(Generic[T]):
    """Items by key, at most ``limit`` of them, taken in turns between keys."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lines: dict[Hashable, deque[T]] = {}
        self._rotation: deque[Hashable] = deque()
        self._lengths = Tally()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def waiting(self, key: Hashable) -> int:
        """How many of ``key``'s items wait in its line."""
        line = self._lines.get(key)
        return len(line) if line is not None else 0

    def push(self, key: Hashable, item: T) -> T | None:
        """Queue ``item`` at the end of ``key``'s line. When the queue is full, the
        newest item of the longest line is taken out to make room and returned (its
        client is to be refused); raises ``QueueFull`` if ``item`` is refused instead."""
        evicted: T | None = None
        if self._count >= self.limit:
            if self.waiting(key) + 2 > self._lengths.most:
                raise QueueFull
            evicted = self._evict_newest_of_longest()
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = deque()
            self._rotation.append(key)
        line.append(item)
        self._count += 1
        self._lengths.moved(key, len(line) - 1, len(line))
        return evicted

    def take(self, most: int) -> list[tuple[Hashable, T]]:
        """Up to ``most`` items, one from each line in turn, each with its key."""
        taken: list[tuple[Hashable, T]] = []
        rotation, lines = self._rotation, self._lines
        while rotation and len(taken) < most:
            key = rotation.popleft()
            line = lines[key]
            taken.append((key, line.popleft()))
            length = len(line)
            if length:
                rotation.append(key)
            else:
                del lines[key]
            self._lengths.moved(key, length + 1, length)
        self._count -= len(taken)
        return taken

    def put_back(self, items: list[tuple[Hashable, T]]) -> None:
        """``items``, the last ones ``take`` gave (not written), go back as if never
        taken: each to the front of its line, its key where the take found it in the
        turns. Undone newest first: a take sent a key that kept a line to the back of
        the turns, where it still is (nothing comes between a take and its put-back).
        Only the take's own keys must go back to the front: left at the back, the
        keys a full batch passed over always came after the same ones, and with more
        deep lines than a batch writes, some were never written."""
        lines, rotation = self._lines, self._rotation
        for key, item in reversed(items):
            line = lines.get(key)
            if line is None:
                line = lines[key] = deque()
            elif rotation[-1] == key:
                rotation.pop()
            else:
                rotation.remove(key)  # a push came between: not how the writer calls it
            rotation.appendleft(key)
            line.appendleft(item)
            self._lengths.moved(key, len(line) - 1, len(line))
        self._count += len(items)

    def drain(self) -> list[T]:
        """Every item, the queue left empty."""
        items: list[T] = []
        for key in self._rotation:
            items.extend(self._lines[key])
        self._lines.clear()
        self._rotation.clear()
        self._lengths.clear()
        self._count = 0
        return items

    def _evict_newest_of_longest(self) -> T:
        key = self._lengths.one_of_the_most()
        line = self._lines[key]
        item = line.pop()
        self._count -= 1
        self._lengths.moved(key, len(line) + 1, len(line))
        if not line:  # not reached: a longest line lets in only when it holds two or more
            del self._lines[key]
            self._rotation.remove(key)
        return item
