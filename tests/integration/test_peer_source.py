"""A node's links leave from its own address (``peer.source_address``).

On one machine with a loopback address per node (the rehearsal of SPEC section
10), this is what lets ``ops/netcut.py`` cut one pair of nodes: were every link to
come from 127.0.0.1, no address rule could tell the nodes apart.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ops.cluster.ports import free_port
from service.config import NodeConfig, Peer
from service.peer import PeerLinks, source_address


def test_a_link_to_a_peer_comes_from_the_node_address(tmp_path: Path) -> None:
    async def scenario() -> str:
        dialers: asyncio.Queue[str] = asyncio.Queue()

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            dialers.put_nowait(writer.get_extra_info("peername")[0])
            writer.close()

        port = free_port("127.0.0.12")
        server = await asyncio.start_server(accept, "127.0.0.12", port)
        nodes = (Peer(1, "127.0.0.11", free_port("127.0.0.11")), Peer(2, "127.0.0.12", port))
        config = NodeConfig(node_id=1, data_dir=tmp_path, nodes=nodes, secret_file=tmp_path / "s")
        links = PeerLinks(config, b"s" * 32, lambda *_: None, lambda *_: None, lambda _: {})
        links.start()  # node 1 dials node 2 (and redials: the "node" here says nothing)
        try:
            async with asyncio.timeout(10):
                return await dialers.get()
        finally:
            await links.close()
            server.close()
            await server.wait_closed()

    assert asyncio.run(scenario()) == "127.0.0.11"


@pytest.mark.parametrize(
    ("mine", "peer", "expected"),
    [
        ("127.0.0.11", "127.0.0.12", ("127.0.0.11", 0)),
        ("[::1]", "::1", ("::1", 0)),
        ("0.0.0.0", "127.0.0.12", None),
        ("127.0.0.11", "::1", None),
        ("localhost", "127.0.0.12", None),
    ],
)
def test_source_address(mine, peer, expected):
    assert source_address(mine, peer) == expected
