"""TLS between clients and nodes, mutual TLS between nodes (SPEC section 10).

Real node processes with certificates made by ``trustme`` (one cluster CA; a
second CA plays a stranger's), real ``chatctl`` runs, and raw TLS sockets where
a test must be a misbehaving peer. All nodes listen on 127.0.0.1 here, so one
certificate naming 127.0.0.1 serves every node; what a certificate is checked
against (its CA, its dates, its names) is the same as on three hosts.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trustme

from ops.cluster.waiting import wait_for
from service import protocol
from service.config import parse_address
from tests.helpers.cluster import REPO_ROOT, Cluster, NodeProcess

PASSWORD = "s3cret-password"
COMMAND_TIMEOUT = 60.0
_SCRIPT = Path(sys.executable).with_name("chatctl")
CHATCTL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "service.cli"]
HOST = "127.0.0.1"
Dates = tuple[datetime.datetime | None, datetime.datetime | None]


class Pki:
    """One CA and the PEM files it issues, in a folder of their own."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True)
        self.folder = folder
        self.ca = trustme.CA()
        self.ca_file = folder / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def issue(self, name: str, host: str = HOST, valid: Dates = (None, None)) -> tuple[Path, Path]:
        """A certificate (with its chain) and key naming ``host``, valid from and to
        ``valid`` (default: now, for a year or so): (cert file, key file)."""
        leaf = self.ca.issue_cert(host, not_before=valid[0], not_after=valid[1])
        cert, key = self.folder / f"{name}.pem", self.folder / f"{name}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        return cert, key

    def settings(self, name: str = "node", valid: Dates = (None, None)) -> dict[str, object]:
        cert, key = self.issue(name, valid=valid)
        return {"tls_cert": cert, "tls_key": key, "tls_ca": self.ca_file}

    def client(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file)
        return context


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def stranger(tmp_path: Path) -> Pki:
    """Another CA: certificates of another cluster."""
    return Pki(tmp_path / "stranger")


def tls_cluster(factory, pki: Pki, n: int = 3, **kwargs: object) -> Cluster:
    cluster: Cluster = factory(n, tls=pki.client(), **pki.settings(), **kwargs)
    return cluster


def chatctl(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CHAT_SERVERS", "CHAT_CA", "CHATCTL_PASSWORD", "CHATCTL_HOME")
    }
    environment.update(CHATCTL_HOME=str(home), CHATCTL_PASSWORD=PASSWORD, **env)
    return subprocess.run(
        [*CHATCTL, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=environment,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr}"
    return done.stdout


# ---- a TLS cluster ------------------------------------------------------------------------


def test_a_tls_cluster_serves_chatctl_with_the_ca(cluster_factory, pki, tmp_path):
    cluster = tls_cluster(cluster_factory, pki)
    cluster.start()
    cluster.wait_in_sync()  # the peer links are up: over mutual TLS
    servers = ",".join(cluster.servers)
    home = tmp_path / "alice"
    ca = str(pki.ca_file)
    ok(chatctl(home, "--ca", ca, "--servers", servers, "register", "alice"))
    ok(chatctl(home, "--ca", ca, "--servers", servers, "register", "bob"))
    ok(chatctl(home, "--ca", ca, "--servers", servers, "login", "alice"))
    ok(chatctl(home, "--ca", ca, "send", "alice", "over TLS"))
    # The CA from the environment works the same.
    assert "over TLS" in ok(chatctl(home, "read", CHAT_CA=ca))
    assert "primary" in ok(chatctl(home, "status", CHAT_CA=ca, CHAT_SERVERS=servers))
    # The port speaks nothing but TLS: a plain client is never answered.
    plain = chatctl(home, "--timeout", "2", "whoami", CHAT_SERVERS=servers)
    assert plain.returncode == 3, plain.stderr
    cluster.check_invariants()


def test_clients_that_come_and_go_over_tls_leave_nothing_behind(cluster_factory, pki):
    """A connection handed to its frame feed left asyncio's stream protocol and its
    writer holding each other, and with them the TLS transport and its buffers (some
    280 KB a connection), and a frame that is not JSON left the error behind its
    refusal holding the feed and the frame's bytes: each kept until the collector's
    rare full pass (four rounds of forty after the first: 7.4-7.6 MB more). After a
    first round (buffers the node keeps for good), four more add next to nothing
    (-0.7 to 0.9 MB)."""
    cluster = tls_cluster(cluster_factory, pki, n=1)
    cluster.start()
    node = cluster.wait_for_primary()
    assert node.pid is not None
    host, port = parse_address(node.address)
    context = pki.client()
    # A frame that is not JSON, and a MiB behind it that the node will never read.
    not_json = protocol.HEADER.pack(60_000) + b"x" * 60_000 + bytes(1024 * 1024)
    status = protocol.encode_frame(protocol.request("status", "s", {}))

    def welcomed() -> tuple[ssl.SSLSocket, protocol.FrameDecoder]:
        sock = context.wrap_socket(
            socket.create_connection((host, port), timeout=10), server_hostname=host
        )
        decoder = protocol.FrameDecoder()
        receive(sock, decoder)  # the node's hello
        sock.sendall(protocol.encode_frame(protocol.client_hello(1)))
        assert receive(sock, decoder)["type"] == "welcome"
        return sock, decoder

    def a_round() -> None:
        for _ in range(20):
            sock, decoder = welcomed()
            with sock:
                with contextlib.suppress(OSError):  # closed before it took all of it
                    sock.sendall(not_json)
                assert receive(sock, decoder)["code"] == "protocol"
        for _ in range(20):
            sock, decoder = welcomed()
            with sock:
                sock.sendall(status)
                assert receive(sock, decoder)["type"] == "reply"

    def rss_kib() -> int:
        for line in Path(f"/proc/{node.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    a_round()
    first = rss_kib()
    for _ in range(4):
        a_round()
    grown = rss_kib() - first
    assert grown < 3 * 1024, f"the node grew by {grown} KiB over four rounds of forty clients"
    cluster.check_invariants()


def receive(sock: ssl.SSLSocket, decoder: protocol.FrameDecoder) -> protocol.Frame:
    """The next frame the node sends."""
    while True:
        frame = decoder.pop()
        if frame is not None:
            return frame
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("the node closed the connection")
        decoder.push(data)


def test_a_client_with_another_ca_is_refused_at_once(cluster_factory, pki, stranger, tmp_path):
    cluster = tls_cluster(cluster_factory, pki, n=1)
    cluster.start()
    cluster.wait_for_primary()
    started = time.monotonic()
    done = chatctl(
        tmp_path / "eve",
        "--ca",
        str(stranger.ca_file),
        "--servers",
        cluster.servers[0],
        "register",
        "eve",
    )
    assert done.returncode == 1, done.stderr
    assert "certificate does not verify" in done.stderr
    assert "not signed by the CA file" in done.stderr
    # Not retried until --timeout (10 s): every node would give the same answer.
    assert time.monotonic() - started < 5.0
    missing = chatctl(tmp_path / "eve", "--ca", str(tmp_path / "nope.pem"), "register", "eve")
    assert missing.returncode == 2
    assert "--ca" in missing.stderr
    assert "no such file" in missing.stderr


# ---- mutual TLS between nodes ---------------------------------------------------------------


def test_a_node_with_a_certificate_of_another_ca_cannot_join(cluster_factory, pki, stranger):
    """Node 3 is consistent in itself (its certificate and CA are another cluster's):
    it starts, but nodes 1 and 2 cannot verify it and it cannot verify them."""
    cluster = tls_cluster(cluster_factory, pki, node_settings={3: stranger.settings()})
    cluster[3].tls = stranger.client()
    cluster.start()

    def refused_by_both() -> bool:
        return all(
            "peer handshake failed" in cluster[i].log_text()
            and "not signed by the CA file" in cluster[i].log_text()
            for i in (1, 2)
        )

    wait_for(refused_by_both, 20, "nodes 1 and 2 to refuse node 3's certificate")
    wait_for(lambda: links(cluster[1]) == [2], 20, "nodes 1 and 2 to link to each other")
    assert links(cluster[2]) == [1]
    assert links(cluster[3]) == []


def links(node: NodeProcess) -> list[int] | None:
    status = node.status()
    return None if status is None else list(status["node"]["links"])


def test_the_node_port_takes_a_peer_only_with_its_certificate(cluster_factory, pki, stranger):
    """Dialing node 1 as node 2, the only way in is a certificate of the cluster CA
    that names node 2's address; the secret alone does not do."""
    cluster = tls_cluster(cluster_factory, pki, n=2)
    cluster.start([1])
    secret = cluster.secret_file.read_bytes().strip()
    address = cluster[1].address

    other_cert, other_key = stranger.issue("other")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        dial_as_node_2(address, secret, pki, other_cert, other_key)
    refused = dial_as_node_2(address, secret, pki, None, None)
    assert refused["type"] == "error"
    assert "must present a certificate of the cluster CA" in refused["message"]
    wrong_name = pki.issue("elsewhere", host="127.0.0.2")
    refused = dial_as_node_2(address, secret, pki, *wrong_name)
    assert refused["type"] == "error"
    assert "not for its address 127.0.0.1" in refused["message"]
    # The same dial with node 2's own certificate is welcomed.
    welcome = dial_as_node_2(address, secret, pki, *pki.issue("node2"))
    assert welcome["type"] == "welcome", welcome


def dial_as_node_2(
    address: str, secret: bytes, pki: Pki, cert: Path | None, key: Path | None
) -> protocol.Frame:
    """A peer hello from node 2 to node 1 over TLS; the node's answer."""
    context = pki.client()
    if cert is not None:
        context.load_cert_chain(cert, key)
    host, port = parse_address(address)
    with (
        socket.create_connection((host, port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=host) as sock,
    ):
        decoder = protocol.FrameDecoder()

        def receive() -> protocol.Frame:
            frames: list[protocol.Frame] = []
            while not frames:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("the node closed the connection")
                frames = decoder.feed(data)
            return frames[0]

        hello = receive()
        version = protocol.choose_version(hello)
        nonce = protocol.new_nonce()
        sock.sendall(
            protocol.encode_frame(
                protocol.peer_hello(version, secret, str(hello["nonce"]), 2, 1, nonce)
            )
        )
        return receive()


# ---- a node refuses to start --------------------------------------------------------------


def expired(pki: Pki) -> dict[str, object]:
    return pki.settings(
        "old",
        (
            datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC),
            datetime.datetime(2021, 1, 1, tzinfo=datetime.UTC),
        ),
    )


def mismatched(pki: Pki) -> dict[str, object]:
    settings = pki.settings("one")
    settings["tls_key"] = pki.issue("two")[1]
    return settings


def missing(pki: Pki) -> dict[str, object]:
    settings = pki.settings()
    Path(str(settings["tls_cert"])).unlink()
    return settings


def unreadable(pki: Pki) -> dict[str, object]:
    """A key the node cannot read as a file (a folder in its place: running as root,
    permission bits would not stop the read)."""
    settings = pki.settings()
    key = Path(str(settings["tls_key"]))
    key.unlink()
    key.mkdir()
    return settings


def from_another_ca(pki: Pki) -> dict[str, object]:
    other = Pki(pki.folder.parent / "other")
    return {**other.settings(), "tls_ca": pki.ca_file}


def half(pki: Pki) -> dict[str, object]:
    settings = pki.settings()
    del settings["tls_key"]
    return settings


REFUSED = "would be refused by the other nodes"


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (missing, "tls_cert {folder}/node.pem: no such file"),
        (unreadable, "tls_key {folder}/node.key: is a folder, not a PEM file"),
        (mismatched, "tls_key {folder}/two.key does not belong to the certificate in tls_cert"),
        (expired, "tls_cert {folder}/old.pem " + REFUSED + ": certificate has expired"),
        (from_another_ca, REFUSED + ": it is not signed by the CA in tls_ca"),
        (half, "tls_cert, tls_key and tls_ca go together"),
    ],
)
def test_a_node_refuses_to_start_on_unusable_tls_files(cluster_factory, pki, make, expected):
    cluster: Cluster = cluster_factory(1, **make(pki))
    node = cluster[1]
    node.start(wait=False)
    wait_for(lambda: not node.is_running, 20, "the node to exit")
    assert node.kill() == 2
    log = node.log_text()
    assert expected.format(folder=pki.folder) in log, log
    assert "Traceback" not in log
    assert len([line for line in log.splitlines() if "configuration" in line]) == 1


def test_a_node_on_a_non_loopback_address_refuses_plain_tcp(tmp_path):
    flags = {
        "--node-id": "1",
        "--data-dir": str(tmp_path / "d"),
        "--nodes": "1=192.0.2.1:7001,2=127.0.0.1:7002",
        "--secret-file": str(tmp_path / "s"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "service", *(part for pair in flags.items() for part in pair)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    assert done.returncode == 2
    assert "node addresses 192.0.2.1:7001 are not loopback" in done.stderr
    assert "plain TCP is allowed on loopback only" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "d").exists()


# ---- operator tools -------------------------------------------------------------------------


def tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


def test_the_operator_tools_verify_a_tls_node(cluster_factory, pki, stranger, tmp_path):
    cluster = tls_cluster(cluster_factory, pki, n=1)
    cluster.start()
    cluster.wait_for_primary()
    node = cluster[1]
    # With --config the tool takes the CA from the node's tls_ca.
    taken = tool("ops.backup", "--to", str(tmp_path / "a.db"), "--config", str(node.config_path))
    assert taken.returncode == 0, taken.stderr
    assert (tmp_path / "a.db").exists()
    by_address = ["--address", node.address, "--secret-file", str(cluster.secret_file)]
    taken = tool(
        "ops.backup", "--to", str(tmp_path / "b.db"), *by_address, "--ca", str(pki.ca_file)
    )
    assert taken.returncode == 0, taken.stderr
    refused = tool(
        "ops.backup", "--to", str(tmp_path / "c.db"), *by_address, "--ca", str(stranger.ca_file)
    )
    assert refused.returncode == 3
    assert "TLS certificate does not verify: it is not signed by the CA file" in refused.stderr
    assert not (tmp_path / "c.db").exists()
    promote = tool("ops.promote", "1", "--yes", *by_address, "--ca", str(stranger.ca_file))
    assert promote.returncode == 3
    assert "TLS certificate does not verify" in promote.stderr
