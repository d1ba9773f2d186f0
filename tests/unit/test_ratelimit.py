"""The login limits and the hashing bound of service/ratelimit.py, with a driven clock.

Backoff tests pass ``now`` explicitly. Hashing tests run real worker threads
whose work waits on a ``threading.Event`` the test sets, so "running", "waiting"
and "done" are states the test chooses, not timings it hopes for.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from service import chat
from service.config import NodeConfig, Peer, load
from service.errors import Busy, InvalidInput
from service.ratelimit import FailureBackoff, HashPool, LoginLimiter, address_key

T = TypeVar("T")
FAST = chat.ScryptParams(n=2**10)


def backoff(free: int = 3, cap: float = 60.0, max_keys: int = 100) -> FailureBackoff:
    return FailureBackoff(free, base=1.0, cap=cap, memory=600.0, max_keys=max_keys)


# ---- failure backoff ---------------------------------------------------------------------


def test_failures_up_to_the_free_count_open_no_window() -> None:
    table = backoff(free=3)
    for second in range(2):
        table.failed("ann", float(second))
        assert table.retry_after("ann", float(second)) == 0


def test_each_further_failure_doubles_the_window_up_to_the_cap() -> None:
    table = backoff(free=3, cap=10.0)
    windows = []
    now = 0.0
    for _ in range(8):
        table.failed("ann", now)
        windows.append(table.retry_after("ann", now))
        now += windows[-1] + 1  # the next failure comes after the window
    assert windows == [0, 0, 1, 2, 4, 8, 10, 10]


def test_a_window_closes_on_time_and_other_keys_are_not_affected() -> None:
    table = backoff(free=1)
    table.failed("ann", 100.0)
    assert table.retry_after("ann", 100.5) == pytest.approx(0.5)
    assert table.retry_after("ann", 101.0) == 0
    assert table.retry_after("bob", 100.5) == 0


def test_failures_are_forgotten_after_the_memory_without_one() -> None:
    table = backoff(free=2)
    table.failed("ann", 0.0)
    table.failed("ann", 1.0)
    assert table.retry_after("ann", 1.0) == 1.0
    table.failed("ann", 700.0)  # more than 600 s later: the count starts again
    assert table.retry_after("ann", 700.0) == 0


def test_an_enormous_failure_count_stays_at_the_cap() -> None:
    table = backoff(free=1, cap=300.0)
    for second in range(5000):
        table.failed("ann", float(second))
    assert table.retry_after("ann", 4999.0) == 300.0


def test_memory_is_bounded_least_recently_failed_dropped_first() -> None:
    table = FailureBackoff(1, base=100.0, cap=100.0, memory=600.0, max_keys=3)
    for second, key in enumerate(["a", "b", "c", "a", "d"]):
        table.failed(key, float(second))
    assert len(table) == 3
    assert table.retry_after("b", 4.0) == 0  # dropped
    assert table.retry_after("a", 4.0) > 0
    assert table.retry_after("c", 4.0) > 0
    assert table.retry_after("d", 4.0) > 0


# ---- login limiter -----------------------------------------------------------------------


def limiter() -> LoginLimiter:
    return LoginLimiter(backoff(free=2), backoff(free=4))


def test_an_account_in_a_window_is_refused_from_every_address() -> None:
    limits = limiter()
    limits.failed("ann", "10.0.0.1", 0.0)
    limits.failed("ann", "10.0.0.2", 0.0)
    for address in ("10.0.0.1", "10.0.0.3"):
        with pytest.raises(Busy, match="too many failed logins for this account") as raised:
            limits.check("ann", address, 0.5)
        assert raised.value.retry_after == 0.5
        assert raised.value.retriable
        assert "try again in 1 second" in raised.value.message
    limits.check("bob", "10.0.0.3", 0.5)
    limits.check("ann", "10.0.0.3", 1.0)


def test_an_address_guessing_many_accounts_is_refused_for_every_account() -> None:
    limits = limiter()
    for name in ("a", "b", "c", "d"):
        limits.failed(name, "10.0.0.9", 0.0)
    with pytest.raises(Busy, match="from your address"):
        limits.check("zed", "10.0.0.9", 0.0)
    limits.check("zed", "10.0.0.1", 0.0)


def test_a_success_clears_the_account_but_not_the_address() -> None:
    limits = limiter()
    for name in ("ann", "ann", "ann", "mallory"):
        limits.failed(name, "10.0.0.9", 0.0)
    limits.succeeded("ann")
    limits.check("ann", "10.0.0.1", 0.0)
    with pytest.raises(Busy, match="from your address"):
        limits.check("ann", "10.0.0.9", 0.0)


def test_the_limiter_is_built_from_the_node_config(tmp_path: Path) -> None:
    config = NodeConfig(
        1,
        tmp_path,
        (Peer(1, "127.0.0.1", 7001),),
        tmp_path / "secret",
        login_account_failures=1,
        login_address_failures=2,
        login_backoff=3.0,
    ).validate()
    limits = LoginLimiter.from_config(config)
    limits.failed("ann", "10.0.0.1", 0.0)
    with pytest.raises(Busy) as raised:
        limits.check("ann", "10.0.0.2", 0.0)
    assert raised.value.retry_after == 3.0


# ---- the settings -------------------------------------------------------------------------


def node_conf(tmp_path: Path, **settings: object) -> Path:
    lines = ["[node]", "node_id = 1", "data_dir = data", "nodes = 1=127.0.0.1:7001"]
    path = tmp_path / "node.conf"
    path.write_text("\n".join([*lines, *(f"{k} = {v}" for k, v in settings.items())]) + "\n")
    return path


def test_the_login_settings_come_from_the_ini_file(tmp_path: Path) -> None:
    config = load(node_conf(tmp_path, scrypt_n=65536, session_idle=60, sessions_per_user=3), {})
    assert (config.scrypt_n, config.session_idle, config.sessions_per_user) == (65536, 60.0, 3)
    defaults = load(node_conf(tmp_path), {})
    assert defaults.scrypt_n == 2**17
    assert (defaults.hash_workers, defaults.hash_queue) == (2, 2)
    assert (defaults.session_lifetime, defaults.session_idle) == (30 * 86400, 7 * 86400)
    assert (defaults.sessions_per_user, defaults.listens_per_user) == (20, 10)
    assert (defaults.register_rate, defaults.register_burst) == (0.1, 10)
    config = load(node_conf(tmp_path, register_rate=0.5, register_burst=3), {})
    assert (config.register_rate, config.register_burst) == (0.5, 3)
    assert load(node_conf(tmp_path, register_rate=0), {}).register_rate == 0.0


@pytest.mark.parametrize(
    "setting",
    [
        {"scrypt_n": 1000},
        {"scrypt_n": 512},
        {"scrypt_n": 2**21},
        {"hash_workers": 0},
        {"hash_queue": -1},
        {"login_account_failures": 0},
        {"login_backoff": 0},
        {"login_backoff_cap": 1000},  # longer than the failures are remembered
        {"session_idle": 0},
        {"sessions_per_user": 0},
        {"listens_per_user": 0},
        {"register_rate": -1},
        {"register_rate": "inf"},
        {"register_burst": 0},
        {"register_burst": 1.5},
    ],
)
def test_bad_login_settings_are_refused(tmp_path: Path, setting: dict[str, object]) -> None:
    with pytest.raises(InvalidInput):
        load(node_conf(tmp_path, **setting), {})


# ---- the key of a per-address limit ------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("10.0.0.1", "10.0.0.1"),
        ("127.0.0.2", "127.0.0.2"),
        # One subscriber's IPv6 share is a /64: any address in it is the same key.
        ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::1", "::/64"),
        # An IPv4 client of a dual-stack socket is its IPv4 address.
        ("::ffff:10.0.0.1", "10.0.0.1"),
        # No peer name: one shared key, still limited.
        ("unknown", "unknown"),
    ],
)
def test_an_address_is_its_own_key_and_an_ipv6_one_its_64(address: str, key: str) -> None:
    assert address_key(address) == key


# ---- the hashing pool --------------------------------------------------------------------


class Gate:
    """Work for the pool that runs until the test opens the gate."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.started = threading.Semaphore(0)

    def work(self) -> str:
        self.started.release()
        assert self.opened.wait(10), "the test never opened the gate"
        return "done"

    async def wait_started(self, count: int = 1) -> None:
        for _ in range(count):
            await asyncio.wait_for(asyncio.to_thread(self.started.acquire), 5)


def run(scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(scenario())


def test_work_beyond_the_workers_and_the_queue_is_busy_at_once() -> None:
    async def scenario() -> None:
        pool, gate = HashPool(workers=1, queue=1), Gate()
        try:
            running = asyncio.ensure_future(pool.run("10.0.0.1", gate.work))
            await gate.wait_started()
            waiting = asyncio.ensure_future(pool.run("10.0.0.2", gate.work))
            await asyncio.sleep(0)
            assert pool.pending == 2
            with pytest.raises(Busy, match="busy checking passwords") as raised:
                await pool.run("10.0.0.3", gate.work)
            assert raised.value.retry_after > 0
            # The event loop is free meanwhile: other requests are served.
            assert await asyncio.wait_for(asyncio.sleep(0, "served"), 1) == "served"
            gate.opened.set()
            assert await running == await waiting == "done"
            assert pool.pending == 0
            assert await pool.run("10.0.0.3", lambda: "again") == "again"
        finally:
            gate.opened.set()
            pool.close()

    run(scenario)


def test_one_address_holds_at_most_half_of_the_slots() -> None:
    async def scenario() -> None:
        pool, gate = HashPool(workers=2, queue=2), Gate()
        try:
            mine = [asyncio.ensure_future(pool.run("10.0.0.9", gate.work)) for _ in range(2)]
            await gate.wait_started(2)
            with pytest.raises(Busy, match="from your address"):
                await pool.run("10.0.0.9", gate.work)
            other = asyncio.ensure_future(pool.run("10.0.0.1", lambda: "served"))
            gate.opened.set()
            assert await other == "served"
            assert await asyncio.gather(*mine) == ["done", "done"]
        finally:
            gate.opened.set()
            pool.close()

    run(scenario)


def test_addresses_with_failures_share_a_small_part_of_the_pool() -> None:
    limits = limiter()
    limits.failed("ann", "10.0.0.8", 0.0)
    limits.failed("bob", "10.0.0.9", 0.0)
    assert limits.suspect("10.0.0.8")
    assert not limits.suspect("10.0.0.1")

    async def scenario() -> None:
        pool, gate = HashPool(workers=2, queue=2), Gate()
        try:
            first = asyncio.ensure_future(pool.run("10.0.0.8", gate.work, suspect=True))
            await gate.wait_started()
            # Another failing address finds the suspects' share (workers // 2) taken...
            with pytest.raises(Busy, match="busy checking passwords"):
                await pool.run("10.0.0.9", gate.work, suspect=True)
            # ...while everyone else still has a core and the queue.
            clean = [asyncio.ensure_future(pool.run(f"10.0.0.{i}", gate.work)) for i in (1, 2)]
            await gate.wait_started()
            gate.opened.set()
            assert await asyncio.gather(first, *clean) == ["done"] * 3
        finally:
            gate.opened.set()
            pool.close()

    run(scenario)


def test_a_cancelled_request_frees_its_slot_only_when_its_thread_is_done() -> None:
    async def scenario() -> None:
        pool, gate = HashPool(workers=1, queue=1), Gate()
        try:
            running = asyncio.ensure_future(pool.run("10.0.0.1", gate.work))
            await gate.wait_started()
            waiting = asyncio.ensure_future(pool.run("10.0.0.2", gate.work))
            await asyncio.sleep(0)
            # A closed connection cancels both requests: the waiting job never
            # starts and frees its slot; the running one still holds a core.
            waiting.cancel()
            running.cancel()
            await asyncio.gather(running, waiting, return_exceptions=True)
            assert pool.pending == 1
            queued = asyncio.ensure_future(pool.run("10.0.0.3", lambda: "queued"))
            await asyncio.sleep(0)
            with pytest.raises(Busy):
                await pool.run("10.0.0.4", gate.work)  # 1 running + 1 queued: full again
            gate.opened.set()
            assert await queued == "queued"
        finally:
            gate.opened.set()
            pool.close()

    run(scenario)


def test_a_failing_job_frees_its_slot_and_raises_to_its_caller() -> None:
    def broken() -> str:
        raise ValueError("boom")

    async def scenario() -> None:
        pool = HashPool(workers=1, queue=0)
        try:
            with pytest.raises(ValueError, match="boom"):
                await pool.run("10.0.0.1", broken)
            assert pool.pending == 0
            hashed = await pool.run("10.0.0.1", lambda: chat.hash_password("password", FAST))
            assert chat.verify_password("password", hashed)
        finally:
            pool.close()

    run(scenario)
