"""Admission control for logins: what a node does before it spends a password hash.

Why
---
A login or a register costs one scrypt computation: at the default cost (N=2**17,
r=8, p=1) about 0.5 s of a core and 128 MiB of memory. Left unbounded, a flood of
wrong-password logins keeps every core busy, queues work (and memory) without limit
in front of the hashing threads, delays everyone's requests past their client's
timeout, and lets a guesser try passwords as fast as the node can hash. Two
mechanisms, both in front of the hashing, bound that:

* ``LoginLimiter``: failed logins are counted per account (the lower-cased user
  name, whether or not the account exists, so the answers tell nothing about that)
  and per client address. After ``free`` failures, each further failure opens a
  backoff window, ``base`` doubling up to ``cap`` seconds, during which a login of
  that account or from that address is answered ``busy`` with ``retry_after`` at
  once, without hashing and without counting as a failure. Failures are forgotten
  ``memory`` seconds after the last one; a successful login clears its account's
  count, never its address's (a guesser could clear its own by logging in to an
  account of its own). The two limits are separate, as in Synapse's ``rc_login``:
  the account limit stops guessing one password from many addresses, the address
  limit stops one address guessing many accounts' passwords.
* ``HashPool``: at most ``workers`` hashes run at once (each in a thread of a
  pool of that size, so the event loop never waits for one) and at most ``queue``
  more wait; a register or login beyond that is answered ``busy`` at once, with
  ``retry_after`` = the average time of one hash. A full pool alone would not keep
  other users served: a flood's next request arrives the instant a slot frees,
  while a refused user comes back only after ``retry_after``. So the slots are
  shared out: one client address holds at most half of them, and the addresses
  with failed logins on record (``LoginLimiter.suspect``) hold at most
  ``workers // 2`` (at least one) together, so the rest of the pool, a core
  included when there are two, stays free for everyone else.

* Registrations are counted per client address (``register_rate`` and
  ``register_burst``, a token bucket of ``writerate.py``), before the hash: every
  new account brings its own ``send_rate``, so without this one address
  registering account after account (two a second, its share of the hashing)
  multiplied its rate of writes, and of disk filled on every node, by as many
  accounts as it made.

Every per-address key here (failed logins, the hashing's share, registrations)
is ``address_key``'s: an IPv6 address counts as its /64, one subscriber's usual
share, any of whose 2**64 addresses it may use to start afresh.

Decisions a user can see
------------------------
* While an account is in a backoff window, its right password is refused too,
  from every address: otherwise a guesser spread over many addresses would never
  be slowed. The price is that a guesser can keep an account's owner out while the
  guessing goes on (at most ``cap`` seconds after the last failure); the answer
  says so and when to try again.
* Users behind one address (a NAT, or one host; with IPv6, one /64: a LAN) share
  that address's limits, and after one failed login there, the smaller share of
  the hashing.
* A flood from ever new addresses, each failing once, is only bounded, not
  told apart from users: everyone then gets ``busy`` answers in turn.
* The state is this node's memory: it starts empty on a new primary, and each table
  keeps at most ``max_keys`` entries, least recently failed dropped first.

Invariants
----------
* A ``busy`` answer changes nothing and costs no hash; the same request may be sent
  again, with the same request id. A registration the hashing refused gives its
  address's token back; one refused later (its name taken) does not: a client
  that closed its connection after the hash may still get its account made.
* A hash's slot is freed when its thread finishes, not when the request waiting for
  it is cancelled (a closed connection): the bound is on the threads' real work.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .config import NodeConfig
from .errors import Busy

T = TypeVar("T")

MAX_KEYS = 50_000
# Before any hash was timed, a busy answer suggests this wait.
FIRST_ESTIMATE = 0.5


@dataclass
class _Failures:
    count: int
    last: float
    blocked_until: float


class FailureBackoff:
    """Failures per key, and the backoff window they open, in bounded memory."""

    def __init__(
        self, free: int, base: float, cap: float, memory: float, max_keys: int = MAX_KEYS
    ) -> None:
        self.free = free
        self.base = base
        self.cap = cap
        self.memory = memory
        self.max_keys = max_keys
        self._entries: OrderedDict[str, _Failures] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def retry_after(self, key: str, now: float) -> float:
        """Seconds until ``key`` may try again; 0 when it may now."""
        entry = self._entries.get(key)
        return 0.0 if entry is None else max(0.0, entry.blocked_until - now)

    def failed(self, key: str, now: float) -> None:
        entry = self._entries.pop(key, None)
        if entry is None or now - entry.last > self.memory:
            entry = _Failures(0, now, now)
        entry.count += 1
        entry.last = now
        beyond = entry.count - self.free
        if beyond >= 0:
            # 2**beyond overflows a float long before the cap matters: clamp first.
            window = self.base * 2.0 ** min(beyond, 64)
            entry.blocked_until = now + min(self.cap, window)
        self._entries[key] = entry
        while len(self._entries) > self.max_keys:
            self._entries.popitem(last=False)

    def forget(self, key: str) -> None:
        self._entries.pop(key, None)

    def has(self, key: str) -> bool:
        return key in self._entries


class LoginLimiter:
    """The per-account and per-address limits of failed logins."""

    def __init__(self, account: FailureBackoff, address: FailureBackoff) -> None:
        self.account = account
        self.address = address

    @classmethod
    def from_config(cls, config: NodeConfig) -> LoginLimiter:
        def table(free: int) -> FailureBackoff:
            return FailureBackoff(
                free, config.login_backoff, config.login_backoff_cap, config.login_failure_memory
            )

        return cls(table(config.login_account_failures), table(config.login_address_failures))

    def check(self, account: str, address: str, now: float) -> None:
        """Raise ``Busy`` while the account or the address is in a backoff window."""
        wait = self.account.retry_after(account, now)
        if wait > 0:
            raise Busy(
                f"too many failed logins for this account; try again in {_seconds(wait)}", wait
            )
        wait = self.address.retry_after(address, now)
        if wait > 0:
            raise Busy(
                f"too many failed logins from your address; try again in {_seconds(wait)}", wait
            )

    def failed(self, account: str, address: str, now: float) -> None:
        self.account.failed(account, now)
        self.address.failed(address, now)

    def succeeded(self, account: str) -> None:
        self.account.forget(account)

    def suspect(self, address: str) -> bool:
        """Whether ``address`` has failed logins on record (see ``HashPool``)."""
        return self.address.has(address)


class HashPool:
    """Password hashing in ``workers`` threads, with at most ``queue`` waiting."""

    def __init__(self, workers: int, queue: int) -> None:
        self.workers = workers
        self.capacity = workers + queue
        self.per_address = max(1, self.capacity // 2)
        self.suspect_share = max(1, workers // 2)
        self._executor = concurrent.futures.ThreadPoolExecutor(workers, "password-hash")
        # Touched from the loop (admission) and from worker threads (completion).
        self._lock = threading.Lock()
        self._pending = 0
        self._suspects = 0
        self._by_address: dict[str, int] = {}
        self._average: float | None = None  # seconds per job, once one was timed

    @property
    def pending(self) -> int:
        """Hashes running or waiting."""
        with self._lock:
            return self._pending

    async def run(self, address: str, work: Callable[[], T], suspect: bool = False) -> T:
        """Run ``work`` (one hash, or a check and a rehash) in a worker thread, or
        raise ``Busy`` at once when the pool, or the share of ``address``, is full.
        ``suspect``: the address has failed logins on record."""
        with self._lock:
            self._admit(address, suspect)
            self._pending += 1
            self._suspects += suspect
            self._by_address[address] = self._by_address.get(address, 0) + 1
        future = self._executor.submit(self._timed, work)
        future.add_done_callback(lambda _: self._release(address, suspect))
        return await asyncio.wrap_future(future)

    def _admit(self, address: str, suspect: bool) -> None:
        # A slot frees in about one job's time: come back then.
        wait = FIRST_ESTIMATE if self._average is None else self._average
        if self._pending >= self.capacity or (suspect and self._suspects >= self.suspect_share):
            raise Busy("the server is busy checking passwords; try again shortly", wait)
        if self._by_address.get(address, 0) >= self.per_address:
            raise Busy("too many logins at once from your address; try again shortly", wait)

    def _timed(self, work: Callable[[], T]) -> T:
        started = time.monotonic()
        try:
            return work()
        finally:
            elapsed = time.monotonic() - started
            with self._lock:
                average = elapsed if self._average is None else self._average
                self._average = average + (elapsed - average) / 8

    def _release(self, address: str, suspect: bool) -> None:
        # Called when the thread finished, or when a job that never started was
        # cancelled along with the request waiting for it.
        with self._lock:
            self._pending -= 1
            self._suspects -= suspect
            left = self._by_address.pop(address) - 1
            if left:
                self._by_address[address] = left

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def address_key(address: str) -> str:
    """The key of every per-address limit here: the address itself, or for IPv6
    its /64 (an IPv4 address mapped into IPv6 is that IPv4 address)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address  # "unknown": no peer name (the limit still applies, shared)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _seconds(wait: float) -> str:
    whole = max(1, math.ceil(wait))
    return f"{whole} second" if whole == 1 else f"{whole} seconds"
