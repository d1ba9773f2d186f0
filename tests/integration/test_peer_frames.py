"""Peer versions and binary frames on a live node (``service/peer.py``).

A dialer that offers no peer version (a node from before them) is welcomed in
version 1, one that offers version 2 in version 2. Whatever an authenticated
peer sends that breaks the protocol (a binary frame on a link of version 1, a
binary ``append`` whose records do not add up) closes that link and nothing
else: the node goes on answering, logs why, and never crashes; a bad hello to
its dial is refused and the peer dialled again.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest

from service import protocol
from service.config import parse_address
from service.replication import messages
from tests.conftest import ClusterFactory
from tests.helpers.cluster import Cluster

pytestmark = pytest.mark.cluster

TIMEOUT = 5.0
Frame = dict[str, Any]


class PeerSocket:
    """An authenticated peer connection, as node ``me``, of a chosen peer version."""

    def __init__(self, address: str, secret: bytes, me: int, offer: int | None) -> None:
        host, port = parse_address(address)
        self.sock = socket.create_connection((host, port), timeout=TIMEOUT)
        self.decoder = protocol.FrameDecoder(binary=True)
        self.frames: list[Frame] = []
        hello = self.next_frame()
        nonce = protocol.new_nonce()
        mine = protocol.peer_hello(1, secret, str(hello["nonce"]), me, int(hello["node"]), nonce)
        if offer is None:
            del mine["peer_version"]
        else:
            mine["peer_version"] = offer
        self.sock.sendall(protocol.encode_frame(mine))
        self.welcome = self.next_frame()
        assert self.welcome["type"] == "welcome", self.welcome

    def next_frame(self) -> Frame:
        while not self.frames:
            data = self.sock.recv(65536)
            assert data, "the node closed the connection"
            self.frames += self.decoder.feed(data)
        return self.frames.pop(0)

    def closed_by_the_node(self) -> bool:
        """Read (and drop) what the node sends until it closes; False on a timeout."""
        try:
            while self.sock.recv(65536):
                pass
        except TimeoutError:
            return False
        except ConnectionResetError:
            pass
        return True

    def close(self) -> None:
        self.sock.close()


def started_alone(cluster_factory: ClusterFactory) -> Cluster:
    cluster = cluster_factory()
    cluster[1].start()
    return cluster


def bad_append(payload: bytes) -> bytes:
    frame = messages.Append(1, 1, 0, [], messages.sync_set_from_wire({}), (), -1)
    return protocol.encode_frame({**frame.to_wire(binary=True), protocol.PAYLOAD: payload})


@pytest.mark.parametrize(("offer", "settled"), [(None, 1), (1, 1), (2, 2), (9, 2)])
def test_the_welcome_settles_on_the_peer_version_both_speak(
    cluster_factory: ClusterFactory, offer: int | None, settled: int
) -> None:
    cluster = started_alone(cluster_factory)
    secret = cluster.secret_file.read_bytes().strip()
    peer = PeerSocket(cluster[1].address, secret, 2, offer)
    assert protocol.peer_version_of(peer.welcome) == settled
    peer.close()


@pytest.mark.parametrize(
    ("offer", "data", "why"),
    [
        (1, bad_append(b""), "binary frame on a link that did not agree"),
        (2, bad_append(messages.RECORD_HEADER.pack(1, 1, 100) + b"short"), "malformed record"),
        (2, bad_append(b"\x00" * 7), "malformed record"),
    ],
    ids=["binary on version 1", "changeset cut short", "record header cut short"],
)
def test_a_peer_frame_that_breaks_the_protocol_closes_the_link_only(
    cluster_factory: ClusterFactory, offer: int, data: bytes, why: str
) -> None:
    cluster = started_alone(cluster_factory)
    node = cluster[1]
    secret = cluster.secret_file.read_bytes().strip()
    peer = PeerSocket(node.address, secret, 2, offer)
    peer.sock.sendall(data)
    assert peer.closed_by_the_node(), "the node kept the link after a malformed frame"
    peer.close()
    assert node.status() is not None, "the node stopped answering"
    log = node.log_text()
    assert "peer broke the protocol node=2" in log, log[-2000:]
    assert why in log, log[-2000:]
    assert "Traceback" not in log
    # The same peer, well-behaved, is welcomed again.
    PeerSocket(node.address, secret, 2, offer).close()


def test_a_peer_whose_hello_has_no_nonce_is_dialled_again(
    cluster_factory: ClusterFactory,
) -> None:
    """Something at node 2's address that answers node 1's dial with a hello without
    a nonce: a bad hello, refused like any other, and node 2 is dialled again. It
    was a KeyError outside what the dialer expects of a handshake, which ended its
    task: node 1 never dialled node 2 again, not even once node 2 ran."""
    cluster = cluster_factory()
    host, port = parse_address(cluster[2].address)
    listener = socket.create_server((host, port))
    listener.settimeout(TIMEOUT * 4)
    try:
        cluster[1].start()
        hello = {k: v for k, v in protocol.server_hello(2, "n").items() if k != "nonce"}
        for attempt in (1, 2):
            try:
                dialled, _ = listener.accept()
            except TimeoutError:
                pytest.fail(f"node 1 never dialled node 2's address (attempt {attempt})")
            dialled.sendall(protocol.encode_frame(hello))
            dialled.close()
        assert cluster[1].is_running, "node 1 died of the hello"
    finally:
        listener.close()
