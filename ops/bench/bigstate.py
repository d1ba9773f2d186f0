"""A cluster holding many messages: memory per node, and the time to start it.

The messages are loaded through the real write path (the load generator,
many concurrent clients): the three databases must be genuine replicas with
consistent logs, which copying or generating files offline would not give.
At the service's current rate (about a thousand sends per second on two
cores) a million messages take a quarter of an hour, so the count is a
parameter (``--big``), ``--big-secs`` may cut the load short (the quick run
does, to stay within its time), and the report names the count reached.

Then, per run: stop the whole cluster (SIGTERM to every node, as
supervisord does), start all three together, and time from the start until
the first write is acknowledged (a ``Client`` with default settings that
retries until a primary answers, so its backoff is included, as a user would
see it), plus the server-side part (the ``became primary`` log line). RSS
(``VmRSS``) of each node is read after the load, and again after the restart
and first write: a fresh process, holding the same data.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from ops.cluster.nodes import Cluster
from service.client import Client

from . import load, machine

FIRST_WRITE_TIMEOUT = 300.0
IN_SYNC_TIMEOUT = 60.0


async def fill(
    cluster: Cluster,
    users: load.Users,
    n: int,
    clients: int,
    workers: int,
    max_seconds: float | None,
) -> dict[str, Any]:
    """Send ``n`` messages (fewer if ``max_seconds`` runs out); the load's rate, then
    each node's memory and disk."""
    await asyncio.to_thread(cluster.wait_in_sync, IN_SYNC_TIMEOUT)
    sent = await asyncio.to_thread(
        load.run_count, cluster.servers, users, n, clients, workers, cluster.pids(), max_seconds
    )
    if sent["acked"] < n and not (max_seconds and sent["seconds"] >= max_seconds):
        raise RuntimeError(f"only {sent['acked']} of {n} sends were acknowledged: {sent}")
    primary = await asyncio.to_thread(cluster.wait_in_sync, IN_SYNC_TIMEOUT)
    # Every message the cluster holds, from this load and the sections before it: the
    # plain baseline is built with as many rows.
    messages = await asyncio.to_thread(primary.query, "SELECT count(*) FROM messages")
    return {"load": sent, "nodes": memory(cluster), "messages": int(messages)}


def memory(cluster: Cluster) -> dict[str, dict[str, int | None]]:
    """RSS, peak RSS and database bytes of every node, in bytes."""
    out: dict[str, dict[str, int | None]] = {}
    for i, node in cluster.nodes.items():
        pid = node.pid
        rss = machine.rss_kb(pid) if pid is not None else None
        peak = machine.rss_kb(pid, "VmHWM") if pid is not None else None
        out[str(i)] = {
            "rss": rss * 1024 if rss is not None else None,
            "peak_rss": peak * 1024 if peak is not None else None,
            "disk": node.disk_bytes(),
        }
    return out


async def restart(cluster: Cluster, users: load.Users) -> dict[str, Any]:
    """Stop every node, start them all, time until a write is acknowledged."""
    t0 = time.perf_counter()
    await asyncio.to_thread(cluster.stop_all, together=True)
    stopped = time.perf_counter() - t0
    offsets = {i: node.log_size() for i, node in cluster.nodes.items()}
    wall, t_start = time.time(), time.perf_counter()
    cluster.start(wait=False)
    async with Client(cluster.servers, FIRST_WRITE_TIMEOUT, users.tokens[0]) as client:
        await client.send(users.names[0], load.body(random.Random(5)))
    first_write = time.perf_counter() - t_start
    became = [
        e.at - wall
        for i, node in cluster.nodes.items()
        for e in node.events("became primary", offsets[i])
    ]
    await asyncio.to_thread(cluster.wait_in_sync, IN_SYNC_TIMEOUT)
    return {
        "stop": stopped,
        "first_write": first_write,
        "elected": min(became) if became else None,
        "nodes": memory(cluster),
    }
