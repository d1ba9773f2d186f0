"""``ops/netcut.py``: nft cuts between loopback addresses, seen by real TCP connections.

Two asyncio echo servers listen on 127.N.0.11 and 127.N.0.12 (this run's block);
each connection binds its source address, as the nodes of the rehearsal do, so
that the filter can tell the ends apart. Needs nft and root: without them every test is skipped with
the reason (``netcut.unavailable``); CI runs as root and ``.ci/run`` installs nft.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from ops import netcut
from ops.cluster.ports import free_port
from tests.helpers import loopback

# This run's own addresses and table (``tests/helpers/loopback.py``; the ``cuts``
# fixture makes the table, tracking connections, before the test's first one).
A, B = loopback.address(11), loopback.address(12)
TABLE = loopback.table()
# Long enough for a loopback connection to be made many times over; a cut one is
# still not made then (its SYN is dropped and retried after a second).
CONNECT_TIMEOUT = 0.5


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(await reader.readline())
    await writer.drain()
    writer.close()


@asynccontextmanager
async def servers() -> AsyncIterator[dict[str, int]]:
    """An echo server on each of A and B; their ports by address."""
    ports = {A: free_port(A), B: free_port(B)}
    started = [await asyncio.start_server(_echo, host, port) for host, port in ports.items()]
    try:
        yield ports
    finally:
        for server in started:
            server.close()
            await server.wait_closed()


async def reaches(source: str, dest: str, port: int) -> bool:
    """Whether ``source`` can open a connection to ``dest`` and get an echo back."""
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            reader, writer = await asyncio.open_connection(dest, port, local_addr=(source, 0))
            try:
                writer.write(b"ping\n")
                return await reader.readline() == b"ping\n"
            finally:
                writer.close()
    except (TimeoutError, OSError):
        return False


async def both_ways(ports: dict[str, int]) -> tuple[bool, bool]:
    return await reaches(A, B, ports[B]), await reaches(B, A, ports[A])


@pytest.mark.usefixtures("cuts")
def test_a_one_way_cut_stops_connections_from_a_to_b_only():
    async def scenario() -> None:
        async with servers() as ports:
            assert await both_ways(ports) == (True, True)
            netcut.cut(A, B, table=TABLE)
            assert netcut.cuts(TABLE) == [netcut.Cut(A, B)]
            assert await both_ways(ports) == (False, True)
            netcut.heal(TABLE)
            assert netcut.cuts(TABLE) == []
            assert await both_ways(ports) == (True, True)

    asyncio.run(scenario())


@pytest.mark.usefixtures("cuts")
def test_a_cut_both_ways_stops_both_and_an_open_connection_stalls_until_healed():
    async def scenario() -> None:
        async with servers() as ports:
            reader, writer = await asyncio.open_connection(B, ports[B], local_addr=(A, 0))
            netcut.cut(A, B, both=True, table=TABLE)
            netcut.cut(A, B, both=True, table=TABLE)  # once is enough: not added twice
            assert netcut.cuts(TABLE) == [netcut.Cut(A, B, both=True)]
            assert await both_ways(ports) == (False, False)
            # The open connection is not reset: what is sent waits in the kernel...
            writer.write(b"held\n")
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await reader.readline()
            # ...and arrives once the partition heals (TCP retransmits it).
            netcut.heal(TABLE)
            async with asyncio.timeout(10):
                assert await reader.readline() == b"held\n"
            writer.close()
            assert await both_ways(ports) == (True, True)

    asyncio.run(scenario())


@pytest.mark.usefixtures("cuts")
def test_a_one_way_cut_holds_on_an_open_connection_whichever_end_speaks_first():
    """Who opened a connection is conntrack's: B speaking first after the cut must not
    make B the opener (it would on a connection conntrack did not follow from its
    start), which would let A's packets through and hold B's."""

    async def scenario() -> None:
        accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
        accepted = asyncio.Queue()

        async def keep(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await accepted.put((reader, writer))

        server = await asyncio.start_server(keep, B, free_port(B))
        port = server.sockets[0].getsockname()[1]
        try:
            a_reader, a_writer = await asyncio.open_connection(B, port, local_addr=(A, 0))
            b_reader, b_writer = await accepted.get()
            netcut.heal(TABLE)  # connections stay tracked across a heal
            netcut.cut(A, B, table=TABLE)
            b_writer.write(b"from B\n")  # the first packet after the cut is B's
            async with asyncio.timeout(CONNECT_TIMEOUT):
                assert await a_reader.readline() == b"from B\n"
            a_writer.write(b"from A\n")
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await b_reader.readline()
            for writer in (a_writer, b_writer):
                writer.close()
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())


def test_only_loopback_addresses_are_cut():
    with pytest.raises(netcut.NetcutError, match="not a loopback address"):
        netcut.cut(A, "192.0.2.1", table=TABLE)
    with pytest.raises(netcut.NetcutError, match="not an IP address"):
        netcut.cut("node1", B, table=TABLE)
