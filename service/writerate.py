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
node. Those writes (``touch``, ``mark_read``, ``delete_messages``) have a bucket
of their own, ``write_rate`` and ``write_burst``: more generous, and apart from
the sends', so that an account that sent its burst can still mark its messages
read. Not counted: ``logout`` and ``delete_account``, each of which ends something
once (bounded by the logins before them, and never to be held up by a flood of
touches), and the writes a node makes for a read (its marks, bounded by the
messages that came in unread; a session's keep-alive, by its interval).

Invariants
----------
* A refused write changes nothing: the check runs before the write is queued. A
  write let in and then refused anyway (a full queue, or taken out of a full
  queue for another account's) gets its token back.
* The line is a promise of times, not of tokens: a refused write that comes back
  at its time takes a token like any other (the node cannot tell it from a new
  one), and a new write that takes the token first sends one of those in line to
  its back. A write that never comes back leaves its token to whoever comes
  first, but its place in line stays until its time: writes refused meanwhile
  are told later times (at most ``MAX_WAIT`` ahead).
* Only a session's writes count, each against its account's bucket of its kind
  (``Application.rate_kind``, and only when the client asked for it:
  ``WritePath.enqueue``'s ``rated``): a write without a session, or whose token
  names none, is refused by its batch before anything is stored; ``register``
  and ``login`` are bounded by their password hashing instead (and ``register``
  by its address's bucket, the server's: ``ratelimit.py``).
* The buckets are the primary's memory, not the database's: a node that becomes
  primary knows nothing of what accounts wrote through another, so a failover can
  let an account write one more burst. An account whose bucket has filled again,
  with nobody in its line, is forgotten at the next sweep (every ``SWEEP_EVERY``
  writes), so the memory held is one small entry per account that wrote since
  about then: never more than the accounts there are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass

# Entries whose bucket has filled again are dropped every this many writes.
SWEEP_EVERY = 4096
# The line reaches at most this far ahead: however many writes are in it, an account
# is told to wait no longer (unless its very next token is further off).
MAX_WAIT = 60.0


@dataclass
class Tokens:
    """A token bucket: ``tokens`` as counted at ``at``, filling at a rate up to a burst
    (given by the owner, the same at every call)."""

    tokens: float
    at: float

    def refilled(self, now: float, rate: float, burst: float) -> float:
        return min(burst, self.tokens + max(0.0, now - self.at) * rate)

    def take(self, now: float, rate: float, burst: float) -> bool:
        """Count the tokens at ``now`` and spend one, if there is one."""
        self.tokens, self.at = self.refilled(now, rate, burst), now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


@dataclass
class _Bucket(Tokens):
    # When the token promised to the last write refused arrives: the end of the line
    # of writes told to come back later, each at its own time.
    line_end: float = float("-inf")


def told(wait: float) -> float:
    """``wait`` rounded up to the hundredth the wire carries: a client that waits what
    it is told is let in, never refused once more for a few milliseconds (less a
    hair, so that 1.1 s, 110.00000000000001 hundredths, stays 1.1 s)."""
    return math.ceil(wait * 100 - 1e-6) / 100


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

        Refused writes wait in line: each is told the time of the first token not
        promised to a write refused before it (the line reaches at most
        ``MAX_WAIT`` ahead). A client that hands the library many writes at once
        has them all refused together; told the same time, they came back
        together, one got in, and the others were refused again, round after
        round. Told a time each, they come back one at a time, as the tokens come
        in."""
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
        if bucket.take(now, self.rate, self.burst):
            return 0.0
        self.refused += 1
        # The next token, unless it is promised to a write refused before: then the
        # one after the last promised.
        next_token = now + (1.0 - bucket.tokens) / self.rate
        after_line = min(bucket.line_end + 1.0 / self.rate, now + MAX_WAIT)
        bucket.line_end = max(next_token, after_line)
        return bucket.line_end - now

    def give_back(self, key: Hashable) -> None:
        """Return the write ``take`` spent, for a write refused after it."""
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.tokens = min(self.burst, bucket.tokens + 1.0)

    def _sweep(self, now: float) -> None:
        full = [
            key
            for key, b in self._buckets.items()
            if b.refilled(now, self.rate, self.burst) >= self.burst and b.line_end <= now
        ]
        for key in full:
            del self._buckets[key]
