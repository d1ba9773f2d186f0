"""Failover: from SIGKILL (or SIGSTOP) of the primary to the first write acknowledged after it.

One writer (a ``Client`` of the library, default settings, as a user has)
sends continuously and records when each send was acknowledged. Each round:

1. wait until every node is in the sync set and the backups are confirmed
   (otherwise R5 forbids a takeover and the round would measure a full
   restart instead), and until the writer is acknowledged against this primary;
2. SIGKILL the primary;
3. ``ack``: the first acknowledgement the writer receives after the kill from
   another node than the killed one. That is what a user sees: detection,
   election, and the client finding the new primary (its retry backoff
   included) and retrying the same request id;
4. ``elected``: the time of the new primary's ``became primary`` log line,
   the server-side part of the same interval (log clock, millisecond lines);
5. restart the killed node, and time until it is back in the sync set
   (``rejoin``: start-up, rewind if any, catch-up, confirmation).

A reply the killed primary sent just before the kill can still be read after
it (it waits in the socket buffer): each acknowledgement is recorded with the
address of the node that gave it, and only the new primary's count.

Freeze rounds do the same with SIGSTOP instead of SIGKILL (``freeze``): the
frozen primary's connections stay open and its kernel still accepts new ones,
so the writer sees no error, only silence. What a user waits then is
detection (``suspect_timeout``), the election, and how soon the client stops
waiting for the silent node and finds the new primary. The frozen node is
thawed after the acknowledgement and must step down and rejoin.

In the etcd arbiter mode (``--arbiter etcd``, SPEC section 10) two more kinds
of round:

* ``stop``: a clean stop of the primary (SIGTERM, as an operator or supervisord
  stops it). On the way out the node revokes its lease, so the leader key goes
  at once and a backup claims it without waiting for the lease to run out;
* ``cut``: the primary is cut off (nft, ``Partition``): both ways from both
  backups and from etcd. The client still reaches it (the writer dials from
  127.0.0.1, which no cut names) and waits: the old primary acknowledges
  nothing past its fencing deadline and steps down when its lease has surely
  run out; meanwhile the key expires in etcd and a backup claims it. The
  figure is the first acknowledgement by another node; the cut is then healed
  and the old primary must rejoin.

A SIGKILLed primary revokes nothing: in the arbiter mode its key lives until
its lease (``lease_ttl``, 3 s) runs out, so a kill round measures about one TTL.
"""

from __future__ import annotations

import asyncio
import bisect
import random
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from ops import netcut
from ops.cluster.nodes import Cluster, NodeProcess
from ops.cluster.waiting import NotYet, wait_for
from service import errors
from service.client import Client

from .load import Users, body

WRITER_TIMEOUT = 60.0
IN_SYNC_TIMEOUT = 60.0
PRIMARY_TIMEOUT = 30.0


class Writer:
    """One client sending one message at a time, for as long as it runs."""

    def __init__(self, servers: Sequence[str], users: Users) -> None:
        self.client = Client(servers, WRITER_TIMEOUT, users.tokens[0])
        self.recipient = users.names[-1]
        self.acks: list[float] = []  # perf_counter() of each acknowledgement, ascending
        self.by: list[str | None] = []  # the node that gave each one
        self.failures: Counter[str] = Counter()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Writer:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.client.close()

    async def _run(self) -> None:
        text = body(random.Random(7))
        while True:
            try:
                await self.client.send(self.recipient, text)
            except errors.ChatError as exc:
                self.failures[exc.code] += 1
                await asyncio.sleep(0.01)
                continue
            self.acks.append(time.perf_counter())
            self.by.append(self.client.answered_by)

    async def wait_acks(self, more: int, timeout: float) -> None:
        target = len(self.acks) + more

        def check() -> bool:
            if len(self.acks) < target:
                raise NotYet(f"{len(self.acks)} of {target} acknowledgements")
            return True

        await asyncio.to_thread(wait_for, check, timeout, "the writer to be acknowledged", 0.005)

    async def first_ack_after(self, t: float, killed: str, timeout: float) -> float:
        def check() -> float:
            for i in range(bisect.bisect_right(self.acks, t), len(self.acks)):
                if self.by[i] != killed:
                    return self.acks[i]
            raise NotYet("no acknowledgement by another node since the kill")

        what = "an acknowledged write after the kill"
        return await asyncio.to_thread(wait_for, check, timeout, what, 0.001)


class Partition:
    """Cuts a node off from the others and from etcd (nft, in a table of its own)."""

    TABLE = "chatbench"

    def __init__(self, etcd_host: str) -> None:
        self.etcd_host = etcd_host

    def isolate(self, cluster: Cluster, node: NodeProcess) -> None:
        others = [n.host for n in cluster.nodes.values() if n is not node]
        for host in [*others, self.etcd_host]:
            netcut.cut(node.host, host, both=True, table=self.TABLE)
        node.note("cut off from the other nodes and etcd (failover round)")

    def heal(self) -> None:
        self.heal_all()

    @classmethod
    def heal_all(cls) -> None:
        """Every cut goes, and the table with it (the benchmark's cuts are both ways:
        no tracking to keep for a later one-way cut)."""
        netcut.clear(cls.TABLE)


async def measure(
    cluster: Cluster,
    users: Users,
    kills: int,
    freezes: int = 0,
    stops: int = 0,
    cuts: int = 0,
    partition: Partition | None = None,
) -> dict[str, Any]:
    """``kills`` rounds of kill-the-primary, ``freezes`` of freeze-the-primary, ``stops``
    of stop-the-primary and ``cuts`` of cut-off-the-primary (``partition`` needed);
    the figures and every round's raw times."""
    rounds, frozen, stopped, cut = [], [], [], []
    async with Writer(cluster.servers, users) as writer:
        for _ in range(kills):
            rounds.append(await _one_round(cluster, writer))
        for _ in range(freezes):
            frozen.append(await _one_freeze(cluster, writer))
        for _ in range(stops):
            stopped.append(await _one_stop(cluster, writer))
        for _ in range(cuts if partition is not None else 0):
            assert partition is not None
            cut.append(await _one_cut(cluster, writer, partition))
        failures = dict(writer.failures)
    figures: dict[str, float | None] = {}
    if rounds:
        acks = [r["ack"] for r in rounds]
        elected = [r["elected"] for r in rounds if r["elected"] is not None]
        figures["failover_median"] = statistics.median(acks)
        figures["failover_max"] = max(acks)
        figures["failover_elected_median"] = statistics.median(elected) if elected else None
        figures["rejoin_median"] = statistics.median(r["rejoin"] for r in rounds)
    for key, done in (("freeze", frozen), ("stop", stopped), ("cut", cut)):
        if done:
            figures[f"{key}_median"] = statistics.median(r["ack"] for r in done)
            figures[f"{key}_max"] = max(r["ack"] for r in done)
    return {
        "figures": figures,
        "rounds": rounds,
        "freezes": frozen,
        "stops": stopped,
        "cuts": cut,
        "writer_failures": failures,
    }


async def _one_round(cluster: Cluster, writer: Writer) -> dict[str, Any]:
    primary = await asyncio.to_thread(cluster.wait_in_sync, IN_SYNC_TIMEOUT)
    await writer.wait_acks(5, 30)
    offsets = {i: node.log_size() for i, node in cluster.nodes.items()}
    wall, t_kill = time.time(), time.perf_counter()
    await asyncio.to_thread(primary.kill)
    primary.note("SIGKILL (failover round)")
    t_ack = await writer.first_ack_after(t_kill, primary.address, WRITER_TIMEOUT)
    new = await asyncio.to_thread(cluster.wait_for_primary, PRIMARY_TIMEOUT)
    became = new.events("became primary", offsets[new.node_id])
    t_start = time.perf_counter()
    primary.start(wait=False)
    await asyncio.to_thread(cluster.wait_in_sync, IN_SYNC_TIMEOUT)
    return {
        "killed": primary.node_id,
        "new_primary": new.node_id,
        "ack": t_ack - t_kill,
        "elected": became[0].at - wall if became else None,
        "rejoin": time.perf_counter() - t_start,
    }


async def _one_freeze(cluster: Cluster, writer: Writer) -> dict[str, Any]:
    primary = await asyncio.to_thread(cluster.wait_in_sync, IN_SYNC_TIMEOUT)
    await writer.wait_acks(5, 30)
    t_freeze = time.perf_counter()
    primary.freeze()
    primary.note("SIGSTOP (freeze round)")
    try:
        t_ack = await writer.first_ack_after(t_freeze, primary.address, WRITER_TIMEOUT)
        new = await asyncio.to_thread(cluster.wait_for_primary, PRIMARY_TIMEOUT)
    finally:
        primary.thaw()
        primary.note("SIGCONT (freeze round)")
    await asyncio.to_thread(cluster.wait_in_sync, IN_SYNC_TIMEOUT)
    return {"frozen": primary.node_id, "new_primary": new.node_id, "ack": t_ack - t_freeze}


async def _one_stop(cluster: Cluster, writer: Writer) -> dict[str, Any]:
    primary = await asyncio.to_thread(cluster.wait_in_sync, IN_SYNC_TIMEOUT)
    await writer.wait_acks(5, 30)
    offsets = {i: node.log_size() for i, node in cluster.nodes.items()}
    wall, t_stop = time.time(), time.perf_counter()
    stopping = asyncio.create_task(asyncio.to_thread(primary.stop))
    t_ack = await writer.first_ack_after(t_stop, primary.address, WRITER_TIMEOUT)
    await stopping
    elected = _elected(cluster, primary, offsets, wall)
    primary.start(wait=False)
    await asyncio.to_thread(cluster.wait_in_sync, IN_SYNC_TIMEOUT)
    return {"stopped": primary.node_id, "ack": t_ack - t_stop, "elected": elected}


async def _one_cut(cluster: Cluster, writer: Writer, partition: Partition) -> dict[str, Any]:
    primary = await asyncio.to_thread(cluster.wait_in_sync, IN_SYNC_TIMEOUT)
    await writer.wait_acks(5, 30)
    offsets = {i: node.log_size() for i, node in cluster.nodes.items()}
    wall, t_cut = time.time(), time.perf_counter()
    try:
        await asyncio.to_thread(partition.isolate, cluster, primary)
        t_ack = await writer.first_ack_after(t_cut, primary.address, WRITER_TIMEOUT)
    finally:
        await asyncio.to_thread(partition.heal)
        primary.note("cuts healed (failover round)")
    elected = _elected(cluster, primary, offsets, wall)
    await asyncio.to_thread(cluster.wait_in_sync, IN_SYNC_TIMEOUT)
    return {"cut_off": primary.node_id, "ack": t_ack - t_cut, "elected": elected}


def _elected(
    cluster: Cluster, old: NodeProcess, offsets: dict[int, int], wall: float
) -> float | None:
    """Seconds from ``wall`` to the first ``became primary`` of another node since then."""
    times = [
        event.at - wall
        for node in cluster.nodes.values()
        if node is not old
        for event in node.events("became primary", offsets[node.node_id])
    ]
    return min(times) if times else None
