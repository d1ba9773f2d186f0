"""Frozen nodes (SIGSTOP): alive to the kernel, silent to their peers (SPEC sections 6 and 8).

* A primary frozen past the timeouts is replaced; thawed, it learns the new
  epoch and steps down, and never acknowledges a write alone in its old
  epoch (R1, the clock-gap rule of section 6).
* A frozen backup is dropped from the sync set after about the sync timeout,
  so writes go on being acknowledged (R3); thawed, it catches up and
  re-enters the sync set (R4).
* Both backups lost one after the other (one frozen, then the other killed):
  the primary goes on alone (G2).
* A client's request that waits on a frozen primary moves to the new primary
  without waiting out its attempt timeout, and happens once.
* With both backups frozen, a refusal that shows a write not yet acknowledged
  (``auth_failed`` after a logout) waits for that write, as a read does (R7).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from ops.cluster.waiting import wait_for
from service import protocol
from service.chat import hash_token
from service.client import Client, new_request_id
from service.status import NodeStatus
from tests.conftest import ClusterFactory
from tests.helpers.workload import (
    Workload,
    finish,
    new_user,
    run,
    start_cluster,
    view_of,
    wait_settled,
    wait_view,
)
from tests.integration.test_bad_input import Raw

pytestmark = pytest.mark.cluster

SYNC_TIMEOUT = 1.5  # the NodeConfig default the clusters here run with
# A sync timeout no step of a test outlasts: frozen backups stay in the sync set.
HELD_IN_SYNC = 30.0
# How long a held answer must stay unsent: far past the node's turn to send it.
SILENCE = 0.5
PASSWORD = "frozen-password"


def test_frozen_primary_is_replaced_and_steps_down_when_thawed(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory()
    start_cluster(cluster)
    old = wait_settled(cluster)
    with Workload(cluster.servers) as load:
        load.wait_progress(30, "before the freeze")
        old.freeze()
        new = cluster.wait_for_primary()
        assert new is not old
        epoch = view_of(new).epoch
        load.wait_progress(30, "on the new primary while the old one is frozen")
        old.thaw()

        def stepped_down(view: NodeStatus) -> bool:
            return view.role == "backup" and view.epoch >= epoch

        wait_view(old, stepped_down, f"a backup in epoch {epoch} or later")
        primary = wait_settled(cluster)  # every backup follows it, in its epoch
        assert primary is new
        assert view_of(old).epoch == view_of(new).epoch
        load.wait_progress(30, "after the thaw")
    after_thaw = old.log_text().split(f"SIGCONT node {old.node_id}")[-1]
    assert "epoch changed" in after_thaw
    assert "became primary" not in after_thaw
    finish(cluster, load.history)


def test_frozen_backup_is_dropped_then_rejoins(cluster_factory: ClusterFactory) -> None:
    """... and its metrics say how long its loop was held (``chat_loop_delay_seconds``:
    a tick later than due by the freeze, past the sync timeout)."""
    cluster = cluster_factory(metrics=True)
    start_cluster(cluster)
    primary = wait_settled(cluster)
    backup = next(n for n in cluster.nodes.values() if n is not primary)
    with Workload(cluster.servers) as load:
        load.wait_progress(30, "before the freeze")
        backup.freeze()
        frozen_at = time.monotonic()

        def dropped(view: NodeStatus) -> bool:
            return backup.node_id not in view.members and backup.node_id not in (view.in_sync or ())

        wait_view(primary, dropped, f"node {backup.node_id} out of the sync set")
        waited = time.monotonic() - frozen_at
        assert waited < SYNC_TIMEOUT + 2.0, f"the primary waited {waited:.1f} s for a frozen backup"
        load.wait_progress(30, "with the backup frozen", timeout=SYNC_TIMEOUT + 5.0)
        backup.thaw()
        assert wait_settled(cluster) is primary  # the sync set is whole again
        load.wait_progress(30, "with the backup back")
    seen = backup.metrics()
    assert seen is not None
    held = seen.over("chat_loop_delay_seconds", 1.0)
    assert held >= 1, "the frozen backup's metrics show no tick late by a second or more"
    finish(cluster, load.history)


def test_primary_serves_alone_when_its_backups_fail_one_after_the_other(
    cluster_factory: ClusterFactory,
) -> None:
    """G2: one backup freezes, the other is killed: the primary must go on alone.

    Dropping the killed one is a sync-set change that the frozen one has to
    hold before it takes effect; dropping the frozen one must not wait behind it.
    """
    cluster = cluster_factory()
    start_cluster(cluster)
    primary = wait_settled(cluster)
    frozen, killed = (n for n in cluster.nodes.values() if n is not primary)
    with Workload(cluster.servers) as load:
        load.wait_progress(30, "with every node up")
        frozen.freeze()
        killed.kill()
        load.wait_progress(30, "on the primary alone", timeout=SYNC_TIMEOUT + 10.0)
        frozen.thaw()
        killed.start()
        assert wait_settled(cluster) is primary
        load.wait_progress(10, "with every node back")
    finish(cluster, load.history)


def test_a_request_waiting_on_a_frozen_primary_moves_to_the_new_one(
    cluster_factory: ClusterFactory,
) -> None:
    """A frozen primary keeps its connections open and answers nothing. A client
    whose per-attempt timeout is longer than its whole deadline can only finish
    the send by asking the other nodes who leads while the attempt waits: it must
    end on the new primary, with the same request id, the message stored once."""
    cluster = cluster_factory()
    start_cluster(cluster)
    old = wait_settled(cluster)
    deadline = 20.0

    async def scenario() -> tuple[str | None, str | None, int]:
        async with Client(cluster.servers, timeout=deadline) as setup:
            await setup.register("alice", PASSWORD)
            await setup.register("bob", PASSWORD)
        async with Client(cluster.servers, deadline, attempt_timeout=10 * deadline) as alice:
            await alice.login("alice", PASSWORD)
            await alice.send("bob", "before the freeze")
            before = alice.answered_by
            old.freeze()
            sent = await alice.send("bob", "while the primary is frozen")
            return before, alice.answered_by, int(sent["message"]["id"])

    before, after, message_id = run(scenario())
    new = cluster.wait_for_primary()
    assert before == old.address
    assert new is not old
    assert after == new.address, f"answered by {after}, not the new primary {new.address}"
    old.thaw()
    assert wait_settled(cluster) is new

    async def inbox() -> list[tuple[int, str]]:
        async with Client(cluster.servers, timeout=deadline) as bob:
            await bob.login("bob", PASSWORD)
            page = await bob.read(limit=10)
        return [(int(m["id"]), str(m["body"])) for m in page["messages"]]

    assert run(inbox()) == [
        (message_id, "while the primary is frozen"),
        (message_id - 1, "before the freeze"),
    ]
    finish(cluster)


def test_a_refusal_waits_for_the_write_it_saw(cluster_factory: ClusterFactory) -> None:
    """A logout committed on the primary but on neither (frozen) backup ends no
    session yet: a failover could lose it. A ``whoami`` with that token, sent on
    the same connection once the primary has committed the logout, finds no
    session; its ``auth_failed`` must not go out before the logout is
    acknowledged (R7). The backups stay in the sync set while frozen (a
    ``sync_timeout`` longer than the test), so nothing may come while they are
    frozen; thawed, they acknowledge the logout, and on the connection, whose
    answers come in the order the node sends them, the logout's reply comes first."""
    cluster = cluster_factory(sync_timeout=HELD_IN_SYNC)
    start_cluster(cluster)
    primary = wait_settled(cluster)
    backups = [node for node in cluster.nodes.values() if node is not primary]

    async def scenario() -> list[protocol.Frame]:
        token = await new_user(cluster.servers, "alice", PASSWORD)
        raw = await Raw.client(primary.address)
        session = f"SELECT count(*) FROM sessions WHERE token_hash = '{hash_token(token)}'"
        assert primary.query(session) == 1
        try:
            for node in backups:
                node.freeze()
            raw.send(protocol.request("logout", new_request_id(), {}, token))
            # Committed in the primary's database; frozen, the backups cannot ack it.
            await asyncio.to_thread(
                wait_for, lambda: primary.query(session) == 0, 10.0, "the logout committed"
            )
            logout_seq = (await asyncio.to_thread(view_of, primary)).seq
            raw.send(protocol.request("whoami", new_request_id(), {}, token))
            early = await silent_for(raw, SILENCE)
            assert early is None, f"answered while the logout was not acknowledged: {early}"
            view = await asyncio.to_thread(view_of, primary)
            assert view.watermark is not None
            assert view.watermark < logout_seq, "acknowledged during the silence: it proves nothing"
        finally:
            for node in backups:
                if node.is_frozen:
                    node.thaw()
        try:
            answers = [await raw.next_frame(timeout=10.0) for _ in range(2)]
        finally:
            raw.close()
        assert all(answer is not None for answer in answers), answers
        return [answer for answer in answers if answer is not None]

    first, second = run(scenario())
    assert first["type"] == "reply", f"the logout was not answered first: {first}, {second}"
    assert second["type"] == "error", second
    assert second["code"] == "auth_failed", second
    wait_settled(cluster)
    finish(cluster)


async def silent_for(raw: Raw, seconds: float) -> protocol.Frame | None:
    """None if ``raw`` receives nothing for ``seconds``; else the frame that came
    (or an empty frame: the node closed the connection)."""
    try:
        frame = await raw.next_frame(timeout=seconds)
    except TimeoutError:
        return None
    return {} if frame is None else frame
