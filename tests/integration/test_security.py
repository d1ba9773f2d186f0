"""Security properties of a real three-node cluster (SPEC sections 3 and 5).

* A peer without the cluster secret cannot replicate, vote or join: its peer
  hello is refused with one ``protocol`` error and the connection closed, and
  nothing it pipelined behind the hello (an ``append`` of a far epoch, a
  ``vote_request``, a ``join``, a ``force_promote``) changes any node. The same
  hello made with the right secret is welcomed, which shows the refusals are
  about the secret and nothing else.
* A node started with another secret never joins: it stays unlinked, the
  primary never counts it in the sync set, it receives no record; once it has
  the right secret again it catches up and joins.
* A token is useless after its logout (on every node: also after a failover)
  and after the account is deleted; other sessions are untouched by a logout.
* After a workload with known passwords (right and wrong ones) and known
  tokens, including a catch-up and a failover, no node log, database file
  (with its WAL and shared-memory files) or rollback file holds any of them
  in clear, nor the cluster secret; the tokens' hashes are there (so the scan
  reads what the nodes stored).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service import protocol
from service.client import Client
from service.config import parse_address
from service.errors import AuthFailed, ChatError, Gone
from tests.conftest import ClusterFactory
from tests.helpers.cluster import Cluster, NodeProcess
from tests.helpers.workload import assert_stays, start_cluster, wait_settled

pytestmark = pytest.mark.cluster

PASSWORD = "security-password"
TIMEOUT = 5.0
# Long enough to see a node redial and re-probe several times (backoff ~1 s).
WATCH = 4.0

Frame = dict[str, Any]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# ---- a raw peer connection ---------------------------------------------------------------


def peer_attempt(
    address: str, secret: bytes, me: int, follow: list[Frame], pipelined: bool = True
) -> list[Frame]:
    """Dial ``address`` as node ``me`` holding ``secret``; send the peer hello and
    ``follow`` at once (``pipelined``), or ``follow`` only once the node answered the
    hello (as a peer must: a frame before the welcome is a protocol violation);
    return every frame the node sends until it closes the connection (or stops
    talking for ``TIMEOUT``)."""
    host, port = parse_address(address)
    decoder = protocol.FrameDecoder()
    frames: list[Frame] = []
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:

        def receive() -> bool:
            try:
                data = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                return False
            frames.extend(decoder.feed(data))
            return bool(data)

        while not frames and receive():
            pass
        hello = frames.pop(0)
        server = int(hello["node"])
        nonce = protocol.new_nonce()
        data = protocol.encode_frame(
            protocol.peer_hello(1, secret, str(hello["nonce"]), me, server, nonce)
        )
        rest = b"".join(protocol.encode_frame(f) for f in follow)
        if pipelined:
            sock.sendall(data + rest)
        else:
            sock.sendall(data)
            while not frames and receive():
                pass
            sock.sendall(rest)
        while receive():
            pass
    return frames


def far_epoch_frames(epoch: int) -> list[Frame]:
    sync_set = {"version": 999, "members": [2], "epoch": epoch}
    return [
        {
            "type": "append",
            "epoch": epoch,
            "seq": 10**6,
            "watermark": 10**6,
            "records": [],
            "sync_set": sync_set,
            "in_sync": [2],
            "echo": -1,
        },
        {"type": "vote_request", "epoch": epoch, "position": [epoch, 10**6], "force": True},
        {"type": "join", "epoch": epoch, "position": [epoch, 10**6], "history": [[epoch, 1]]},
        {"type": "probe", "epoch": epoch, "round": 1},
    ]


def state(cluster: Cluster) -> list[tuple[int, str, int, tuple[int, int]]]:
    views = [node.view() for node in cluster.nodes.values()]
    assert all(view is not None for view in views)
    return [(v.node_id, v.role, v.epoch, v.position) for v in views if v is not None]


def test_a_peer_without_the_secret_cannot_replicate_vote_or_join(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory()
    start_cluster(cluster)
    primary = wait_settled(cluster)
    secret = cluster.secret_file.read_bytes().strip()
    wrong = secrets.token_hex(32).encode()
    before = state(cluster)
    sums = {node.node_id: cluster.checksums(node) for node in cluster.nodes.values()}
    attempts = [
        (node, me, frames)
        for node in cluster.nodes.values()
        for me in (1, 2, 3, 0)
        if me != node.node_id
        for frames in (far_epoch_frames(before[0][2] + 50), [{"type": "force_promote"}])
    ]
    for node, me, frames in attempts:
        answer = peer_attempt(node.address, wrong, me, frames)
        what = f"node {node.node_id} dialled as node {me} with a wrong secret"
        assert len(answer) == 1, f"{what}: {answer}"
        assert answer[0]["type"] == "error", f"{what}: {answer}"
        assert answer[0]["code"] == "protocol", f"{what}: {answer}"
        assert answer[0]["request_id"] is None, f"{what}: {answer}"
    # The control: the operator's hello with the secret is welcomed and answered.
    answer = peer_attempt(primary.address, secret, 0, [{"type": "status"}], pipelined=False)
    assert [frame["type"] for frame in answer] == ["welcome", "reply"], answer
    assert state(cluster) == before, "a refused peer changed a node's role, epoch or position"
    assert {node.node_id: cluster.checksums(node) for node in cluster.nodes.values()} == sums
    assert wait_settled(cluster) is primary
    cluster.check_invariants()


# ---- a node with another secret -------------------------------------------------------------


def use_secret(node: NodeProcess, secret_file: Path) -> None:
    lines = node.config_path.read_text().splitlines()
    lines = [f"secret_file = {secret_file}" if x.startswith("secret_file") else x for x in lines]
    node.config_path.write_text("\n".join(lines) + "\n")


def test_a_node_with_another_secret_never_joins(
    cluster_factory: ClusterFactory, tmp_path: Path
) -> None:
    cluster = cluster_factory()
    start_cluster(cluster)
    wait_settled(cluster)
    impostor = cluster[3]
    impostor.stop()
    primary = wait_settled(cluster)
    other_secret = tmp_path / "other.secret"
    other_secret.write_text(secrets.token_hex(32) + "\n")
    use_secret(impostor, other_secret)
    impostor.start()
    stale = impostor.view()
    assert stale is not None

    async def write_some(count: int) -> None:
        async with Client(cluster.servers, timeout=TIMEOUT) as client:
            name = f"writer{secrets.token_hex(3)}"
            await client.register(name, PASSWORD)
            await client.login(name, PASSWORD)
            for n in range(count):
                await client.send(name, f"while the impostor waits {n}")

    run(write_some(10))

    def breach() -> str | None:
        view = impostor.view()
        if view is None:
            return "the impostor stopped answering"
        if view.position != stale.position:
            return f"the impostor received records: {view}"
        if view.role != "electing":
            return f"the impostor found a primary: {view}"
        links = impostor.status()
        if links is not None and links["node"].get("links"):
            return f"the impostor is linked: {links['node']['links']}"
        head = primary.view()
        if head is None or 3 in head.members or 3 in (head.in_sync or ()):
            return f"the primary counts the impostor in: {head}"
        return None

    assert_stays(breach, WATCH, "a node with another secret stays out")
    # The control: with the cluster's secret it is let in and catches up.
    impostor.stop()
    use_secret(impostor, cluster.secret_file)
    impostor.start()
    assert wait_settled(cluster) is primary
    cluster.check_invariants()


# ---- tokens -------------------------------------------------------------------------------


async def login(cluster: Cluster, user: str, password: str = PASSWORD) -> str:
    async with Client(cluster.servers, timeout=TIMEOUT) as client:
        result = await client.login(user, password)
        return str(result["token"])


async def refused_everywhere(cluster: Cluster, token: str, what: str) -> None:
    """Every operation of a session fails with ``auth_failed`` for ``token``."""
    calls: list[tuple[str, dict[str, Any]]] = [
        ("whoami", {}),
        ("search", {}),
        ("send", {"to": "bob", "body": "with a dead token"}),
        ("read", {}),
        ("mark_read", {"ids": [1]}),
        ("delete_messages", {"ids": [1]}),
        ("logout", {}),
        ("delete_account", {}),
    ]
    accepted: list[str] = []
    async with Client(cluster.servers, timeout=TIMEOUT, token=token) as client:
        for op, args in calls:
            try:
                await client.call(op, args)
            except AuthFailed:
                continue
            accepted.append(op)
        try:
            async for _ in client.listen():
                break
        except AuthFailed:
            pass
        else:
            accepted.append("listen")
    assert accepted == [], f"{what}: a dead token was accepted for {accepted}"


async def works(cluster: Cluster, token: str) -> str:
    async with Client(cluster.servers, timeout=TIMEOUT, token=token) as client:
        return str((await client.whoami())["user"])


def test_a_token_is_useless_after_logout_and_after_account_deletion(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory()
    start_cluster(cluster)
    wait_settled(cluster)

    async def setup() -> tuple[str, str, str]:
        async with Client(cluster.servers, timeout=TIMEOUT) as client:
            await client.register("alice", PASSWORD)
            await client.register("bob", PASSWORD)
        first, second, third = [await login(cluster, "alice") for _ in range(3)]
        async with Client(cluster.servers, timeout=TIMEOUT, token=first) as client:
            await client.send("bob", "before the logout")
            await client.logout()
        return first, second, third

    first, second, third = run(setup())
    run(refused_everywhere(cluster, first, "after logout"))
    assert run(works(cluster, second)) == "alice", "a logout ended another session"
    # The logout is replicated: the next primary refuses the token too.
    old = wait_settled(cluster)
    old.kill()
    assert cluster.wait_for_primary() is not old
    run(refused_everywhere(cluster, first, "after logout and a failover"))
    assert run(works(cluster, second)) == "alice"

    async def delete_alice() -> None:
        async with Client(cluster.servers, timeout=TIMEOUT, token=second) as client:
            await client.delete_account()
        with pytest.raises(AuthFailed):
            await login(cluster, "alice")
        bob = await login(cluster, "bob")
        async with Client(cluster.servers, timeout=TIMEOUT, token=bob) as client:
            with pytest.raises(Gone):
                await client.send("alice", "are you there?")

    run(delete_alice())
    for token in (first, second, third):
        run(refused_everywhere(cluster, token, "after the account was deleted"))
    old.start()
    wait_settled(cluster)
    cluster.check_invariants()


# ---- nothing in clear ---------------------------------------------------------------------


def token_hash(token: str) -> bytes:
    """How the service stores a session token (sha256, hex)."""
    return hashlib.sha256(token.encode()).hexdigest().encode()


def files_under(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            yield path


def test_no_password_token_or_secret_in_clear_in_logs_or_databases(
    cluster_factory: ClusterFactory,
) -> None:
    # A short log retention: the backup restarted below gets a snapshot. The 36 wrong
    # logins all come from this host: more than an address may fail before its backoff.
    cluster = cluster_factory(log_retention=20, login_address_failures=100)
    start_cluster(cluster)
    wait_settled(cluster)
    passwords = {f"user{i}": f"Pw-{secrets.token_hex(10)}" for i in range(4)}
    wrong_passwords = [f"Wrong-{secrets.token_hex(10)}" for _ in range(3)]
    tokens: list[str] = []
    live: list[str] = []

    async def workload(round_: int) -> None:
        async with Client(cluster.servers, timeout=TIMEOUT) as client:
            for index, (user, password) in enumerate(passwords.items()):
                if round_ == 0:
                    await client.register(user, password)
                else:  # a refused registration carries a password too
                    with pytest.raises(ChatError):
                        await client.register(user, wrong_passwords[0])
                for wrong in wrong_passwords:
                    with pytest.raises(AuthFailed):
                        await client.login(user, wrong)
                token = str((await client.login(user, password))["token"])
                tokens.append(token)
                for n in range(15):
                    await client.send(user, f"round {round_} note {n}")
                await client.read(limit=5)
                if index % 2:
                    await client.logout()
                else:
                    live.append(token)

    run(workload(0))
    primary = wait_settled(cluster)
    backup = next(node for node in cluster.nodes.values() if node is not primary)
    backup.kill()
    run(workload(1))  # past the log retention: the backup will need a snapshot
    backup.start()
    primary = wait_settled(cluster)
    primary.kill()
    cluster.wait_for_primary()
    run(workload(2))
    primary.start()
    wait_settled(cluster)
    cluster.check_invariants()  # converges, then stops every node: the files are final

    secret = cluster.secret_file.read_bytes().strip()
    needles = {f"password {p!r}": p.encode() for p in [*passwords.values(), *wrong_passwords]}
    needles |= {f"token {t[:8]}...": t.encode() for t in tokens}
    needles |= {f"hex of password {p!r}": p.encode().hex().encode() for p in passwords.values()}
    needles["the cluster secret"] = secret
    found: list[str] = []
    hashes_seen = set()
    scanned = 0
    for path in files_under(cluster.root):
        if path == cluster.secret_file:
            continue
        scanned += 1
        content = path.read_bytes()
        where = path.relative_to(cluster.root)
        found += [f"{what} in {where}" for what, needle in needles.items() if needle in content]
        hashes_seen |= {token for token in live if token_hash(token) in content}
    assert found == [], "\n".join(found)
    assert scanned >= 6, "the scan missed the node logs or databases"
    assert hashes_seen == set(live), "the scan did not find the stored token hashes"
