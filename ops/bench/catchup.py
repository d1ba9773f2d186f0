"""Catch-up: how fast a backup that missed N sends is back in the sync set.

Each measurement:

1. wait until every node is in the sync set; SIGKILL one backup (the primary
   drops it from the sync set at once: its connection closed);
2. send N messages to the two remaining nodes with the load generator;
3. for the snapshot case, wait until the primary has pruned its log past the
   backup's position (it prunes every few seconds to ``log_retention``
   records; the benchmark reads the primary's ``txlog`` read-only), so that
   the primary must send a snapshot (R4);
4. restart the backup and poll the primary's ``status`` every 10 ms until the
   backup is in its ``in_sync`` set again.

Figures: ``in_sync``, from the restart to back in the sync set (process
start-up included); ``catchup``, from the primary's ``catch-up start`` line
to its ``catch-up end`` line for that backup (the transfer and apply alone);
the rate, N / ``catchup``, in messages/s, and in records/s (the primary groups
concurrent sends into one record, so there are fewer records than sends);
for the snapshot case, the primary's ``snapshot sent`` and the backup's
``snapshot installed`` durations from their log lines.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ops.cluster.logs import Event
from ops.cluster.nodes import Cluster, NodeProcess
from ops.cluster.probe import probe_node
from ops.cluster.waiting import NotYet, wait_for
from service.status import NodeStatus

from . import load

PRUNE_TIMEOUT = 30.0
IN_SYNC_TIMEOUT = 60.0
POLL = 0.01


async def measure(
    cluster: Cluster, users: load.Users, n: int, clients: int, workers: int, snapshot: bool
) -> dict[str, Any]:
    """One catch-up of ``n`` missed sends; ``snapshot``: the log must not reach back."""
    primary = await asyncio.to_thread(cluster.wait_in_sync, IN_SYNC_TIMEOUT)
    backup = cluster.nodes[max(i for i, node in cluster.nodes.items() if node is not primary)]
    backup_seq = (await _view(backup)).seq
    await asyncio.to_thread(backup.kill)
    backup.note("SIGKILL (catch-up)")
    sent = await asyncio.to_thread(
        load.run_count, cluster.servers, users, n, clients, workers, cluster.pids()
    )
    if sent["acked"] != n:
        raise RuntimeError(f"only {sent['acked']} of {n} sends were acknowledged: {sent}")
    primary_seq = (await _view(primary)).seq
    if snapshot:
        await _wait_pruned(primary, backup_seq)
    offsets = {i: node.log_size() for i, node in cluster.nodes.items()}
    t_start = time.perf_counter()
    backup.start(wait=False)
    in_sync = await _wait_back(primary, backup.node_id) - t_start
    starts = _for(primary.events("catch-up start", offsets[primary.node_id]), backup.node_id)
    ends = _for(primary.events("catch-up end", offsets[primary.node_id]), backup.node_id)
    records = primary_seq - backup_seq
    result: dict[str, Any] = {
        "messages": n,
        "records": records,
        "in_sync": in_sync,
        "load": sent,
        "catchup_starts": len(starts),
        "snapshot_used": any(e.fields.get("snapshot") == "true" for e in starts),
    }
    if starts and ends:
        catchup = max(ends[-1].at - starts[0].at, 0.001)  # log lines have 1 ms resolution
        result.update(catchup=catchup, rate=n / catchup, records_rate=records / catchup)
    if snapshot:
        sent_lines = primary.events("snapshot sent", offsets[primary.node_id])
        installed = backup.events("snapshot installed", offsets[backup.node_id])
        result["snapshot_send"] = _seconds(sent_lines)
        result["snapshot_install"] = _seconds(installed)
    return result


async def _view(node: NodeProcess) -> NodeStatus:
    view = await asyncio.to_thread(node.view)
    if view is None:
        raise RuntimeError(f"node {node.node_id} does not answer status")
    return view


def _for(events: list[Event], backup: int) -> list[Event]:
    return [e for e in events if e.fields.get("backup") == str(backup)]


def _seconds(events: list[Event]) -> float | None:
    return float(events[-1].fields["seconds"]) if events else None


async def _wait_back(primary: NodeProcess, backup: int, timeout: float = 120.0) -> float:
    """perf_counter() of the first status of the primary that has ``backup`` in sync."""

    def check() -> float:
        view = probe_node(primary.address, timeout=2.0)
        if view is None or backup not in (view.in_sync or ()):
            raise NotYet(f"in_sync={view.in_sync if view else 'no answer'}")
        return time.perf_counter()

    what = f"node {backup} back in the sync set"
    return await asyncio.to_thread(wait_for, check, timeout, what, POLL)


async def _wait_pruned(primary: NodeProcess, backup_seq: int) -> None:
    """Until the primary's log no longer holds the record after ``backup_seq``."""

    def check() -> bool:
        first = primary.query("SELECT min(seq) FROM txlog")
        if first is None or first <= backup_seq + 1:
            raise NotYet(f"the log still starts at seq {first}; the backup needs {backup_seq + 1}")
        return True

    what = "the primary to prune its log"
    await asyncio.to_thread(wait_for, check, PRUNE_TIMEOUT, what, 0.2)
