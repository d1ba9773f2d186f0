"""How fast one account may write: a token bucket per account, on the primary.

Why
---
The fair queue (``replication/fairqueue.py``) keeps one account's flood from
shutting other users' writes out, but not from being written: an account with
many connections, each pipelining the largest ``send``, had its share of every
batch, and its share was most of the primary's write rate, tens of megabytes a
minute stored on every node, for as long as it kept on. A disk that fills
refuses everyone's writes (SPEC's storage faults), and an inbox buried under
one sender's messages is lost to its owner just as surely. So each account may
send ``send_rate`` messages a second on average and ``send_burst`` at once, as
chat services limit their users (Matrix's ``rc_message``, Slack's message rate);
a send beyond is answered ``busy`` with the ``retry_after`` at which the account
may send again, and is neither queued nor stored. Clients wait that long and send
again (``service/client.py``), so a person or a bot within the rate never sees it,
and one beyond it is slowed to it.

An account's other writes store less, but store it all the same: each keeps a
request row (its id, op and result) for ``request_retention``, an hour by
default, so that a retry is answered and not done twice. A flood of ``touch``
stored thousands of such rows a second, every one kept for an hour on every
node. Those writes have a bucket of their own, ``write_rate`` and
``write_burst``: more generous (a client reading fast marks what it read, and
moves its session's idle clock), and apart from the sends', so that an account
that sent its burst can still mark its messages read.

Invariants
----------
* A refused write changes nothing: the check runs before the write is queued. A
  write let in and then refused anyway (a full queue, or taken out of a full
  queue for another account's) gets its token back.
* The line is a promise of times, not of tokens: a refused write that comes back
  at its time takes a token like any other (the node cannot tell it from a new
  one), so one that comes back late, or never, costs nobody anything; a new write
  that takes the token first only sends one of those in line to its back.
* Only a session's writes count, each against its account's bucket of its kind
  (``Application.rate_kind``): a write without a session, or whose token names
  none, is refused by its batch before anything is stored; ``register`` and
  ``login`` are bounded by their password hashing instead.
* The buckets are the primary's memory, not the database's: a node that becomes
  primary knows nothing of what accounts sent through another, so a failover can
  let an account write one more burst. An account whose bucket has filled again,
  with nobody in its line, is forgotten at the next sweep (every ``SWEEP_EVERY``
  writes), so the memory held is one small entry per account that wrote since
  about then: never more than the accounts there are.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

# Entries whose bucket has filled again are dropped every this many writes.
SWEEP_EVERY = 4096
# The longest an account is told to wait, however many of its writes are in line.
MAX_WAIT = 60.0


@dataclass
class _Bucket:
    tokens: float
    at: float  # when ``tokens`` and ``owed`` were counted
    # Writes refused and told to come back later, each at its own time: the line
    # moves on at ``rate`` as the tokens for them come in.
    owed: float = 0.0


class WriteRate:
    """``rate`` writes a second per key on average, ``burst`` at once; ``rate`` 0: no limit."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self.refused = 0  # writes answered busy since start
        self._buckets: dict[Hashable, _Bucket] = {}
        self._checks = 0

    def __len__(self) -> int:
        """Accounts whose bucket is not full (what memory the limiter holds)."""
        return len(self._buckets)

    def take(self, key: Hashable) -> float:
        """Spend one of ``key``'s writes: 0.0 when it may write now, otherwise the
        seconds until it may (nothing is spent then).

        Refused writes wait in line: each is told the time of the token after those
        promised to the writes refused before it (at most ``MAX_WAIT``). A client
        that hands the library many writes at once has them all refused together;
        told the same time, they came back together, one got in, and the others
        were refused again, round after round. Told a time each, they come back
        one at a time, as the tokens come in."""
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        self._checks += 1
        if self._checks % SWEEP_EVERY == 0:
            self._sweep(now)
        bucket = self._buckets.get(key)
        if bucket is None:  # a full bucket (``burst`` is at least 1)
            self._buckets[key] = _Bucket(self.burst - 1.0, now)
            return 0.0
        tokens = self._refilled(bucket, now)
        owed = max(0.0, bucket.owed - (now - bucket.at) * self.rate)
        bucket.at = now
        if tokens >= 1.0:
            bucket.tokens, bucket.owed = tokens - 1.0, owed
            return 0.0
        self.refused += 1
        wait = min(MAX_WAIT, (owed + 1.0 - tokens) / self.rate)
        bucket.tokens, bucket.owed = tokens, min(owed + 1.0, MAX_WAIT * self.rate)
        return wait

    def give_back(self, key: Hashable) -> None:
        """Return the write ``take`` spent, for a write refused after it."""
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.tokens = min(self.burst, bucket.tokens + 1.0)

    def _refilled(self, bucket: _Bucket, now: float) -> float:
        return min(self.burst, bucket.tokens + max(0.0, now - bucket.at) * self.rate)

    def _sweep(self, now: float) -> None:
        full = [
            key
            for key, b in self._buckets.items()
            if self._refilled(b, now) >= self.burst and b.owed <= (now - b.at) * self.rate
        ]
        for key in full:
            del self._buckets[key]
