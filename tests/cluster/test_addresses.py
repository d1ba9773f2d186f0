"""Each node on an address of its own: it listens there and dials its peers from there.

Three nodes on one machine, on 127.N.0.11, .12 and .13 (the whole of 127/8 is
loopback on Linux; N is this run's block, ``tests/helpers/loopback.py``, which no
other run's cuts touch). What is checked is what the kernel says, not what the
node believes: the established TCP connections of each node process, read
from ``/proc`` (its socket inodes in ``/proc/PID/fd``, their endpoints in
``/proc/net/tcp``). A connection a node opened to a peer's listening address
must have the node's own address as its source; without binding, the kernel
would pick 127.0.0.1 for every one, and a filter could not tell the nodes'
traffic apart.
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import pytest

from ops.cluster.probe import probe_status
from tests.conftest import ClusterFactory
from tests.helpers import loopback
from tests.helpers.cluster import NodeProcess
from tests.helpers.workload import start_cluster, wait_settled

HOSTS = (loopback.address(11), loopback.address(12), loopback.address(13))
_ESTABLISHED = "01"

Endpoint = tuple[str, int]


def test_each_node_listens_on_its_own_address(cluster_factory: ClusterFactory) -> None:
    cluster = cluster_factory(hosts=HOSTS)
    start_cluster(cluster)
    for node, host in zip(cluster.nodes.values(), HOSTS, strict=True):
        assert node.host == host
        assert probe_status(node.address) is not None
        port = node.address.rpartition(":")[2]
        assert probe_status(f"127.0.0.1:{port}", timeout=0.5) is None, "listens on 127.0.0.1"
    cluster.check_invariants()


def test_peer_connections_come_from_each_nodes_own_address(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory(hosts=HOSTS)
    start_cluster(cluster)
    wait_settled(cluster)  # every two nodes linked
    listening = {_endpoint(node.address): node.node_id for node in cluster.nodes.values()}
    dialed: dict[tuple[int, int], str] = {}
    for node in cluster.nodes.values():
        for local, remote in _connections(node):
            peer = listening.get(remote)
            if peer is not None and peer != node.node_id:
                dialed[(node.node_id, peer)] = local[0]
    # The lower id dials (service/peer.py): one connection per pair, from the dialer.
    assert dialed == {(1, 2): HOSTS[0], (1, 3): HOSTS[0], (2, 3): HOSTS[1]}
    # Both ends say so in their logs too, where an operator looks.
    for node in cluster.nodes.values():
        lines = [line for line in node.log_text().splitlines() if "peer link up" in line]
        assert lines, f"node {node.node_id} logged no link"
        assert all(f"local={node.host}:" in line for line in lines), lines
    cluster.check_invariants()


def _endpoint(address: str) -> Endpoint:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _connections(node: NodeProcess) -> list[tuple[Endpoint, Endpoint]]:
    """(local, remote) of every established IPv4 TCP connection of the node's process."""
    if node.pid is None:
        pytest.fail(f"node {node.node_id} is not running")
    fd_dir = Path(f"/proc/{node.pid}/fd")
    inodes = set()
    for fd in fd_dir.iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = []
    for line in Path(f"/proc/{node.pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
        if state == _ESTABLISHED and inode in inodes:
            found.append((_decode(local), _decode(remote)))
    return found


def _decode(text: str) -> Endpoint:
    """``0B00007F:1F41`` (little-endian IPv4, hex port) -> ``("127.0.0.11", 8001)``."""
    address, port = text.split(":")
    return socket.inet_ntoa(struct.pack("<I", int(address, 16))), int(port, 16)
