"""A database damaged on disk is contained, never spread (the hardening of storage faults).

Bytes overwritten in a stopped backup's ``chat.db`` (the b-tree header of one
page) once went unnoticed: the node rejoined, was elected after the others
were killed, crash-looped, and its snapshot shipped the damaged pages to both
others, making acknowledged messages unreadable everywhere. Now the node
checks its pages at start (``PRAGMA quick_check``), moves the damaged file
aside for inspection, starts with an empty database (not the member its sync
set names, so it cannot lead) and catches up from the healthy primary (its log,
or a snapshot that is itself checked before it is sent and installed). After
that it may lead, with sound data: every acknowledged message is readable from
it alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3

import pytest

from ops.chaos.corrupt import corrupt_page, flip_payload
from ops.cluster.waiting import wait_for
from service.client import Client
from tests.conftest import ClusterFactory
from tests.helpers.cluster import Cluster
from tests.helpers.workload import (
    PASSWORD,
    finish,
    message_bodies,
    new_user,
    read_inbox,
    run,
    start_cluster,
    wait_logged,
    wait_settled,
)

pytestmark = pytest.mark.cluster

MESSAGES = 300


async def send_many(servers: list[str], token: str) -> set[str]:
    bodies = {f"message {i} " + "x" * 200 for i in range(MESSAGES)}
    async with Client(servers, token=token) as client:
        await asyncio.gather(*(client.send("bob", body) for body in bodies))
    return bodies


def loaded_cluster(factory: ClusterFactory, **settings: object) -> tuple[Cluster, set[str]]:
    """A cluster led by node 1 whose every node holds the bodies sent to bob."""
    cluster = factory(**settings)
    start_cluster(cluster)
    assert wait_settled(cluster) is cluster[1]
    alice = run(new_user(cluster.servers, "alice"))
    run(new_user(cluster.servers, "bob"))
    sent = run(send_many(cluster.servers, alice))
    cluster.wait_converged()
    return cluster, sent


async def bobs_inbox(servers: list[str]) -> list[str]:
    async with Client(servers) as client:
        await client.login("bob", PASSWORD)
        return [str(m["body"]) for m in await read_inbox(client)]


def test_a_damaged_backup_moves_its_database_aside_and_rejoins_by_snapshot(
    cluster_factory: ClusterFactory,
) -> None:
    cluster, sent = loaded_cluster(cluster_factory, damaged_max_files=1)
    damaged = cluster[3]
    damaged.stop()  # SIGTERM: checkpointed, so the damage is in the file SQLite reads
    # A copy moved aside at an earlier damage: only the newest is kept.
    folder = damaged.db_path.parent / "damaged"
    folder.mkdir(mode=0o700)
    for suffix in ("", "-wal"):
        (folder / f"chat.db.20260101T000000{suffix}").write_bytes(b"an older damage")
    damage = corrupt_page(damaged.db_path, pick=7, size=16)
    damaged.start()
    wait_logged(damaged, "database damaged, moved aside")
    # Empty now: it catches up from the primary's log (or a snapshot, were the log
    # pruned), like a node whose disk was replaced.
    wait_logged(damaged, "database proven")
    files = sorted(p.name for p in folder.iterdir())
    copies = [name for name in files if not name.endswith(("-wal", "-shm"))]
    assert len(copies) == 1, f"{files}: {damage.describe()}"
    assert not any(name.startswith("chat.db.20260101T000000") for name in files), files
    assert "damaged copies pruned" in damaged.log_text()
    assert wait_settled(cluster) is cluster[1]
    cluster.wait_in_sync()
    # The healed node alone serves every acknowledged message.
    for node in (cluster[1], cluster[2]):
        node.freeze()
    for node in (cluster[1], cluster[2]):
        node.kill()
    assert cluster.wait_for_primary() is damaged
    assert set(run(bobs_inbox([damaged.address]))) == sent
    assert damaged.starts == 2, "the damaged node restarted more than once"
    cluster.start()
    finish(cluster)


def test_a_backup_whose_rows_differ_is_found_by_checksums_and_resyncs(
    cluster_factory: ClusterFactory,
) -> None:
    """No damaged page this time: one row of a stopped backup is changed behind
    SQLite's back, so every structural check passes. The primary's checksum round
    finds it (two nodes against one), tells the backup, and the backup moves its
    database aside and catches up."""
    cluster, _ = loaded_cluster(cluster_factory, verify_interval=0.3)
    wait_logged(cluster[1], "checksums agree")
    odd = cluster[3]
    odd.stop()
    with contextlib.closing(sqlite3.connect(odd.db_path)) as conn:
        conn.execute(
            "UPDATE messages SET body = 'tampered' WHERE id = (SELECT max(id) FROM messages)"
        )
        conn.commit()
    odd.start()
    wait_logged(cluster[1], "checksums differ")
    wait_for(lambda: not odd.is_running, 20.0, "node 3 to exit on the primary's resync")
    assert "database damaged, exiting" in odd.log_text()
    odd.restart()  # as supervisord would
    wait_logged(odd, "database damaged, moved aside")
    cluster.wait_in_sync()
    finish(cluster)


async def delete_as_bob(servers: list[str], message_id: int) -> None:
    async with Client(servers) as client:
        await client.login("bob", PASSWORD)
        await client.delete_messages([message_id])


def test_a_record_that_never_applies_to_a_backups_rows_brings_a_snapshot(
    cluster_factory: ClusterFactory,
) -> None:
    """One row of a stopped backup is changed behind SQLite's back, and then a record
    updates that row (its deletion). SQLite's apply refuses the record there (the
    row's old values differ), and a rejoin streams the same record again: the backup
    once rejoined and failed forever, thousands of times a second. Now it asks for a
    snapshot when the same records fail a second time, and holds the primary's rows."""
    cluster, _ = loaded_cluster(cluster_factory)  # no checksum round in this test
    odd = cluster[3]
    odd.stop()
    with contextlib.closing(sqlite3.connect(odd.db_path)) as conn:
        (newest,) = conn.execute("SELECT max(id) FROM messages").fetchone()
        conn.execute("UPDATE messages SET body = 'tampered' WHERE id = ?", (newest,))
        conn.commit()
    odd.start()
    cluster.wait_in_sync()
    run(delete_as_bob(cluster.servers, newest))
    wait_logged(odd, "snapshot installed")
    cluster.wait_in_sync()
    rejoins = odd.log_text().count(" rejoin ")
    assert rejoins <= 3, f"node 3 rejoined {rejoins} times"
    finish(cluster)


def test_a_node_whose_own_state_does_not_parse_moves_its_database_aside(
    cluster_factory: ClusterFactory,
) -> None:
    """Every page sound, but one of the node's own values (here its current epoch)
    no longer parses, as after a bit the disk flipped inside the row. The node once
    exited with a parse error at every start. It is damage like a malformed page:
    found at open, the database moved aside, the node caught up from the primary."""
    cluster, sent = loaded_cluster(cluster_factory)
    odd = cluster[3]
    odd.stop()
    with contextlib.closing(sqlite3.connect(odd.db_path)) as conn:
        conn.execute("UPDATE node_state SET value = '{\"bad' WHERE key = 'current_epoch'")
        conn.commit()
    odd.start()
    wait_logged(odd, "database damaged, moved aside")
    cluster.wait_in_sync()
    assert sent <= message_bodies(odd)
    assert odd.is_running, "node 3 exited"
    finish(cluster)


async def login(servers: list[str], name: str) -> str:
    async with Client(servers) as client:
        await client.login(name, PASSWORD)
        assert client.token is not None
        return client.token


async def send_after(servers: list[str], token: str) -> set[str]:
    bodies = {f"after {i}" for i in range(20)}
    async with Client(servers, token=token) as client:
        for body in sorted(bodies):
            await client.send("bob", body)
    return bodies


def test_a_node_whose_position_the_disk_raised_does_not_lead_with_it(
    cluster_factory: ClusterFactory,
) -> None:
    """One bit of a stopped backup's ``last_position``, flipped in the file so that it
    still parses: epoch 1 becomes epoch 9, which nobody reached. Meanwhile the others
    acknowledge more messages, then the primary dies, and the damaged node comes back.
    It used to believe the value: it came up claiming position (9, N), a history no
    node has, and asked the new primary to catch up from there. Only the sync set
    kept it from leading (it had left it while stopped), and the snapshot it then got
    replaced its rows. Now the value's checksum (made when it was written) no longer
    matches: the node says its database is damaged, moves it aside and catches up,
    and the node that holds every acknowledged message leads."""
    cluster, sent = loaded_cluster(cluster_factory)
    odd, keeper = cluster[3], cluster[2]
    odd.stop()  # SIGTERM: checkpointed, so the flip is in the file SQLite reads
    with contextlib.closing(sqlite3.connect(odd.db_path)) as conn:
        query = "SELECT value FROM node_state WHERE key = 'last_position'"
        (text,) = conn.execute(query).fetchone()
    assert text.startswith("[1, "), text
    flip_payload(odd.db_path, "node_state", text.encode(), bit=0x08, at=1)  # 1 -> 9
    alice = run(login(cluster.servers, "alice"))
    sent |= run(send_after(cluster.servers, alice))  # acknowledged by nodes 1 and 2
    cluster[1].kill()
    odd.start()
    wait_logged(odd, "database damaged, moved aside")
    assert "node_state_last_position_fails_its_checksum" in odd.log_text()  # the why
    assert cluster.wait_for_primary() is keeper
    assert set(run(bobs_inbox([keeper.address]))) == sent
    cluster.start()
    cluster.wait_in_sync()
    assert sent <= message_bodies(odd)
    finish(cluster)
