"""Logins and sessions on real node processes: floods, password cost, session ends.

* A flood of wrong-password logins from several connections and addresses is
  answered ``busy`` (backoff windows, the bounded hashing) instead of being
  hashed, and meanwhile another user, on another address, registers, logs in
  and sends within the client's ordinary timeout. The flood runs at the
  production scrypt cost, where one hash takes about half a second.
* A password hashed at an older cost moves to the node's cost at the next
  login, in the replicated login write: every node stores the new hash.
* A session ends at its lifetime although in use, a login beyond the per-user
  cap ends the oldest session, and the primary prunes ended sessions on every node.

The flood comes from 127.0.0.2 to 127.0.0.5 (all of 127/8 is loopback on Linux)
so that the per-address limit is seen to be per address: the other user talks
from 127.0.0.1 as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from ops.cluster.waiting import wait_for
from service import protocol
from service.client import Client, new_request_id
from service.config import parse_address
from service.errors import AuthFailed, InvalidInput
from service.storage import Storage
from tests.conftest import ClusterFactory
from tests.helpers.cluster import Cluster, NodeProcess
from tests.helpers.workload import run, start_cluster

pytestmark = pytest.mark.cluster

PASSWORD = "the-right-password"
FLOOD_ADDRESSES = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
# Each flooding connection sends this many logins at once, pipelined, and again
# every FLOOD_PACE seconds: about 1000 logins a second from the four. (The request
# rate itself is a load of its own, on the event loop, for any cheap request; what
# is tested here is the hashing, which without bounds costs 0.5 s of a core each.)
FLOOD_BURST = 64
FLOOD_PACE = 0.25
# The client's ordinary deadline (chatctl's default --timeout).
CLIENT_TIMEOUT = 10.0


@contextlib.contextmanager
def open_storage(node: NodeProcess) -> Iterator[Storage]:
    storage = Storage(node.db_path)
    try:
        yield storage
    finally:
        storage.close()


# ---- a flooding connection ---------------------------------------------------------------


async def flood(
    address: str, source: str, names: list[str], stop: asyncio.Event, answers: Counter[str]
) -> None:
    """Bursts of ``FLOOD_BURST`` pipelined wrong-password logins for ``names`` in
    turn, one burst every ``FLOOD_PACE`` seconds, from ``source``, until ``stop``;
    counts the answers of each code in ``answers``."""
    host, port = parse_address(address)
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    decoder = protocol.FrameDecoder()
    sent = 0
    try:
        writer.write(protocol.encode_frame(protocol.client_hello(protocol.PROTOCOL_MAX_VERSION)))
        # Requests only after the welcome: one sent before it is a protocol violation.
        greeting: list[protocol.Frame] = []
        while not any(frame["type"] == "welcome" for frame in greeting):
            data = await asyncio.wait_for(reader.read(65536), 30)
            assert data, f"the node closed the flooding connection from {source} at once"
            greeting += decoder.feed(data)
        while not stop.is_set():
            for _ in range(FLOOD_BURST):
                guess = {"username": names[sent % len(names)], "password": f"wrong-{sent:06d}"}
                frame = protocol.request("login", new_request_id(), guess)
                writer.write(protocol.encode_frame(frame))
                sent += 1
            pending = FLOOD_BURST
            while pending:
                data = await asyncio.wait_for(reader.read(65536), 30)
                assert data, f"the node closed the flooding connection from {source}"
                for frame in decoder.feed(data):
                    if frame["type"] in ("reply", "error"):
                        pending -= 1
                        answers[str(frame.get("code", frame["type"]))] += 1
            # The attacker's own pace, not a wait for a state: a burst per interval.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), FLOOD_PACE)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def flood_while(servers: list[str], primary: str, victim: str) -> tuple[Counter[str], float]:
    """Flood ``primary`` while ``victim`` logs in and sends; the flood's answers and
    how long the victim took."""
    stop = asyncio.Event()
    answers: Counter[str] = Counter()
    names = ["alice", "nobody", "alice", f"x{time.time_ns()}"]
    floods = [
        asyncio.ensure_future(flood(primary, source, names, stop, answers))
        for source in FLOOD_ADDRESSES
    ]
    try:
        # The victim comes once the flood is under way: the first refusals are in.
        deadline = time.monotonic() + CLIENT_TIMEOUT
        while sum(answers.values()) < 8:
            assert time.monotonic() < deadline, f"the flood got no answers: {answers}"
            await asyncio.wait(floods, timeout=0.01)
        started = time.monotonic()
        async with Client(servers, timeout=CLIENT_TIMEOUT) as client:
            await client.login(victim, PASSWORD)
            await client.send("alice", "still here")
            assert (await client.whoami())["user"] == victim
        took = time.monotonic() - started
    finally:
        stop.set()
    await asyncio.gather(*floods)
    return answers, took


async def register(servers: list[str], *names: str) -> None:
    async with Client(servers, timeout=CLIENT_TIMEOUT) as client:
        for name in names:
            await client.register(name, PASSWORD)


def test_a_login_flood_is_answered_busy_while_another_user_is_served(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory(scrypt_n=2**17)
    primary = start_cluster(cluster)
    run(register(cluster.servers, "alice", "bob"))
    answers, took = run(flood_while(cluster.servers, primary.address, "bob"))
    # Every flooding login was refused; only a few of them cost a hash at all: the
    # account's and the addresses' free failures, and what was in the pool when a
    # window opened. The rest were answered busy without hashing.
    assert set(answers) <= {"auth_failed", "busy"}, answers
    assert answers["busy"] >= 10 * answers["auth_failed"], answers
    assert answers["auth_failed"] <= 30, answers
    assert took < CLIENT_TIMEOUT, f"bob's login and send took {took:.1f} s under the flood"
    cluster.check_invariants()


def test_login_checks_the_password_length_before_any_hash(single_node: Cluster) -> None:
    servers = single_node.servers
    run(register(servers, "alice"))

    async def attempts() -> None:
        async with Client(servers, timeout=CLIENT_TIMEOUT) as client:
            # Refused like a register would refuse them, and not counted as failures:
            # more of them than the account and the address may fail.
            for password in ["short", "x" * 257] * 15:
                with pytest.raises(InvalidInput, match="a password has 8 to 256 characters"):
                    await client.login("alice", password)
            with pytest.raises(AuthFailed, match="wrong username or password"):
                await client.login("a" * 51, PASSWORD)  # no account has such a name
            with pytest.raises(AuthFailed, match="wrong username or password"):
                await client.login("alice", "a-wrong-password")
            assert (await client.login("alice", PASSWORD))["user"] == "alice"

    run(attempts())


# ---- password cost ---------------------------------------------------------------------------


def stored_hash(node: NodeProcess, name: str) -> str:
    with open_storage(node) as storage:
        return str(storage.db.value("SELECT password_hash FROM users WHERE name = ?", (name,)))


def set_setting(node: NodeProcess, key: str, value: object) -> None:
    lines = [
        line
        for line in node.config_path.read_text().splitlines()
        if not line.startswith(f"{key} =")
    ]
    node.config_path.write_text("\n".join([*lines, f"{key} = {value}"]) + "\n")


def test_an_old_password_hash_moves_to_the_new_cost_at_the_next_login(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory(scrypt_n=2**10)
    start_cluster(cluster)
    run(register(cluster.servers, "alice"))
    cluster.wait_identical()
    old = {node.node_id: stored_hash(node, "alice") for node in cluster.nodes.values()}
    assert all(value.startswith("scrypt$1024$8$1$") for value in old.values()), old
    cluster.stop_all()
    for node in cluster.nodes.values():
        set_setting(node, "scrypt_n", 2**11)
    start_cluster(cluster)

    async def logins() -> None:
        async with Client(cluster.servers, timeout=CLIENT_TIMEOUT) as client:
            await client.login("alice", PASSWORD)
            await client.login("alice", PASSWORD)  # the new hash verifies
            with pytest.raises(AuthFailed):
                await client.login("alice", "not-the-password")

    run(logins())
    cluster.wait_identical()
    new = {node.node_id: stored_hash(node, "alice") for node in cluster.nodes.values()}
    assert len(set(new.values())) == 1, new
    assert next(iter(new.values())).startswith("scrypt$2048$8$1$"), new
    cluster.check_invariants()


# ---- session ends ----------------------------------------------------------------------------


def session_rows(node: NodeProcess) -> int:
    with open_storage(node) as storage:
        return int(storage.db.value("SELECT count(*) FROM sessions"))


def test_sessions_end_at_their_lifetime_and_beyond_the_cap(
    cluster_factory: ClusterFactory,
) -> None:
    lifetime = 3.0
    cluster = cluster_factory(session_lifetime=lifetime, sessions_per_user=2)
    start_cluster(cluster)
    run(register(cluster.servers, "alice", "bob"))

    async def tokens() -> list[str]:
        found = []
        for _ in range(3):
            async with Client(cluster.servers, timeout=CLIENT_TIMEOUT) as client:
                found.append((await client.login("alice", PASSWORD))["token"])
        return found

    async def whoami(token: str) -> str:
        async with Client(cluster.servers, timeout=CLIENT_TIMEOUT, token=token) as client:
            try:
                return str((await client.whoami())["user"])
            except AuthFailed as exc:
                return exc.message

    logged_in = time.monotonic()
    first, second, third = run(tokens())
    ended = "your session has ended; log in again"
    assert run(whoami(first)) == ended  # the cap of 2 ended the oldest
    assert run(whoami(second)) == run(whoami(third)) == "alice"
    # In use all along (each whoami is a use), the session still ends at its lifetime.
    wait_for(lambda: run(whoami(third)) == ended, 4 * lifetime, "the session to end")
    assert time.monotonic() - logged_in >= lifetime

    async def write_something() -> None:
        async with Client(cluster.servers, timeout=CLIENT_TIMEOUT) as client:
            await client.login("bob", PASSWORD)
            await client.send("bob", "a write: the primary prunes in its batches")

    # The primary's batches delete the ended sessions, on every node alike.
    run(write_something())
    cluster.wait_identical()
    assert {session_rows(node) for node in cluster.nodes.values()} == {1}  # bob's
    cluster.check_invariants()
