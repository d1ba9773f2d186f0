"""A vote or epoch the disk refuses to persist, in the runtime that carries out the
core's effects (service/replication/runtime.py), on a real Storage whose disk is
the fault VFS (service/diskfaults.py).

The core changes its role at once and lists what the runtime must do, a
``Persist`` first. When that write fails, what tells the world (a vote, a
claim, a stream) must not happen; but the node's own parts must still follow the
role the core took, or the two disagree for as long as the node runs:

* a node that won the arbiter's claim (etcd mode: the vote is persisted in the
  same list as the promotion) is primary in its core; if its writer never hears
  of it, the reign is not sealed with its sync set once the disk recovers, and
  the writer's caches are those of the reign before;
* a primary told of a newer epoch (the epoch persisted in the same list as its
  step-down) is a backup in its core; if its writer never hears of it, writes
  waiting for their acks wait for ever.

And one more transition the writer must follow without a write of its own: in
etcd mode, the renewal after a lapsed fencing deadline (reads that asked
meanwhile are answered then).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from ops.cluster.waiting import wait_for
from service.chat import ChatApplication
from service.chat_schema import MIGRATIONS
from service.config import NodeConfig, Peer
from service.diskfaults import DiskFaults, Plan
from service.errors import StorageFault, Unavailable
from service.replication.arbiter import LeaseRenewed, SyncSetStored
from service.replication.effects import Effect, Send
from service.replication.leased import LeasedArbiter
from service.replication.messages import Message
from service.replication.runtime import Replicator
from service.replication.types import NodeState, Role
from service.storage import Storage


class Node(Replicator):
    """A replicator of node 1 of three, not started (no links, no timers): each test
    feeds it the core's transitions. It keeps what it was asked to send."""

    sent: list[tuple[int, Message]]

    def send(self, peer: int, message: Message) -> bool:
        self.sent.append((peer, message))
        return super().send(peer, message)


def node(tmp_path: Path, faults: DiskFaults, arbiter: str = "peers") -> tuple[Node, Storage]:
    storage = Storage(tmp_path / "chat.db", vfs=faults.name, migrations=MIGRATIONS)
    storage.defer_sync()
    nodes = tuple(Peer(n, "127.0.0.1", 1) for n in (1, 2, 3))
    # etcd mode names an endpoint, which nothing here dials (the tests play its I/O).
    endpoints = "127.0.0.1:1" if arbiter == "etcd" else ""
    config = NodeConfig(
        1, tmp_path, nodes, tmp_path / "secret", arbiter=arbiter, etcd_endpoints=endpoints
    )
    replicator = Node(config, storage, b"s" * 32, ChatApplication(config.request_retention))
    replicator.sent = []
    return replicator, storage


def run_node(
    tmp_path: Path,
    faults: DiskFaults,
    scenario: Callable[[Node, Storage], Awaitable[None]],
    arbiter: str = "peers",
) -> None:
    """``scenario`` on a node of ``node``'s, in a loop of its own; the disk takes
    writes again, and the node and its files are closed, whatever happened."""

    async def main() -> None:
        replicator, storage = node(tmp_path, faults, arbiter)
        try:
            await scenario(replicator, storage)
        finally:
            faults.set(Plan("off"))
            await replicator.close()
            storage.close()

    asyncio.run(main())


def on_disk(path: Path) -> NodeState:
    """The node state as the files hold it, through SQLite's own VFS."""
    storage = Storage(path / "chat.db", migrations=MIGRATIONS)
    try:
        return storage.node_state()
    finally:
        storage.close()


def promoted(replicator: Replicator, epoch: int) -> list[Effect]:
    """The core's effects of winning the leader key (as ``leased._claimed`` makes
    them): the vote persisted, then the promotion, in one list."""
    out: list[Effect] = []
    replicator.core.persist_vote(epoch, replicator.core.node_id, out)
    replicator.core.become_primary(replicator.now(), epoch, (1,), False, out)
    return out


def test_a_promotion_whose_vote_the_disk_refuses_is_sealed_once_the_disk_recovers(
    tmp_path: Path, faults: DiskFaults
) -> None:
    async def scenario(replicator: Node, storage: Storage) -> None:
        roles: list[Role] = []
        replicator.role_hooks.append(roles.append)
        replicator.durability.start()
        replicator.spawn(replicator.writer.run())
        faults.set(Plan("ioerror"))
        replicator.run(promoted(replicator, 5))
        assert replicator.core.role is Role.PRIMARY
        assert replicator.core.fault is not None, "the failed vote was not reported"
        assert roles == [Role.PRIMARY], "the server was not told the node leads"
        assert replicator.writer.reign == 1, "the writer never began the reign"
        assert on_disk(tmp_path).current_epoch < 5

        faults.set(Plan("off"))
        await asyncio.to_thread(
            wait_for,
            lambda: replicator.core.position.epoch == 5,
            10.0,
            "the reign's first record, sealed once the disk took writes again",
        )
        assert on_disk(tmp_path) == NodeState(5, 5, 1)
        assert storage.sync_set().members == (1,)

    run_node(tmp_path, faults, scenario)


def test_a_step_down_whose_epoch_the_disk_refuses_fails_the_writes_waiting(
    tmp_path: Path, faults: DiskFaults
) -> None:
    async def scenario(replicator: Node, storage: Storage) -> None:
        roles: list[Role] = []
        replicator.role_hooks.append(roles.append)
        replicator.run(promoted(replicator, 5))
        assert roles == [Role.PRIMARY]
        assert replicator.core.fault is None
        waiting = asyncio.ensure_future(replicator.writer.wait_acked(1))
        await asyncio.to_thread(
            wait_for, lambda: replicator.writer.waiters, 10.0, "the write's ack waiter"
        )

        faults.set(Plan("ioerror"))
        replicator.sent.clear()
        out: list[Effect] = []
        replicator.core.adopt_epoch(replicator.now(), 7, 2, "node 2 leads epoch 7", out)
        replicator.run(out)
        assert replicator.core.role is Role.BACKUP
        assert roles == [Role.PRIMARY, Role.BACKUP], "the server was not told"
        with pytest.raises(Unavailable, match="retry with the same request id"):
            await asyncio.wait_for(waiting, timeout=10)
        # The join to the new primary names epoch 7, which the disk has not
        # taken: it waits for the recovery.
        assert [m for _, m in replicator.sent] == []
        assert any(isinstance(e, Send) for e in out)
        with pytest.raises(StorageFault):
            storage.save_node_state(NodeState(7, 5, 1))

    run_node(tmp_path, faults, scenario)


def test_a_forced_promotion_of_a_node_whose_disk_refuses_writes_is_refused(
    tmp_path: Path, faults: DiskFaults
) -> None:
    """No election makes a node that cannot write primary, a forced one neither: the
    operator is told so (ops.promote prints it), rather than shown a status as if
    the promotion went ahead while its campaign is abandoned."""

    async def scenario(replicator: Node, storage: Storage) -> None:
        faults.set(Plan("full"))
        out: list[Effect] = []
        replicator.core.adopt_epoch(replicator.now(), 3, None, "a test", out)
        replicator.run(out)  # the epoch's Persist fails: a storage fault
        assert replicator.core.fault is not None
        answer = replicator._on_operator({"type": "force_promote"})
        assert isinstance(answer, dict), answer
        assert answer["type"] == "error", answer
        assert answer["code"] == "storage_fault", answer
        assert "cannot write" in answer["message"], answer
        assert replicator.core.role is Role.ELECTING
        assert replicator.sent == [], "a campaign's requests went out"

    run_node(tmp_path, faults, scenario)


def test_a_read_that_waited_out_a_lapsed_deadline_is_answered_at_the_renewal(
    tmp_path: Path, faults: DiskFaults
) -> None:
    """etcd mode (E2): past its fencing deadline a primary releases nothing, and a
    read asked then waits, though what it saw is acknowledged. The renewal that
    lets the node serve again moves no watermark: the read must be answered then,
    not at the next write to anyone (on a quiet cluster: never, until its client
    gave up). The arbiter's events are fed as its I/O reports them; nothing of
    etcd is reached."""

    async def scenario(replicator: Node, storage: Storage) -> None:
        replicator.etcd = None  # its I/O: played here
        arbiter = replicator.core.arbiter
        assert isinstance(arbiter, LeasedArbiter)
        replicator.durability.start()
        replicator.spawn(replicator.writer.run())
        replicator._on_arbiter(LeaseRenewed(sent_at=replicator.now()))
        replicator.run(promoted(replicator, 5))
        storing = await asyncio.to_thread(
            wait_for, lambda: arbiter.storing, 10.0, "the reign's sync set sealed, to store"
        )
        seq, epoch = storing
        # Renewed again first: the sealing may have taken up the deadline on a busy machine.
        replicator._on_arbiter(LeaseRenewed(sent_at=replicator.now()))
        replicator._on_arbiter(SyncSetStored(seq, 1, epoch=epoch))
        await asyncio.to_thread(
            wait_for,
            lambda: replicator.core.acknowledged(seq, replicator.now()),
            10.0,
            "the reign's first record acknowledged",
        )
        seq = replicator.core.position.seq
        await asyncio.to_thread(
            wait_for,
            lambda: not replicator.core.acknowledged(seq, replicator.now()),
            10.0,
            "the fencing deadline passed (no renewal)",
        )
        waiting = asyncio.ensure_future(replicator.writer.wait_acked(seq))
        await asyncio.to_thread(
            wait_for, lambda: replicator.writer.waiters, 10.0, "the read's ack waiter"
        )
        assert not waiting.done(), "a read answered past the fencing deadline"
        replicator._on_arbiter(LeaseRenewed(sent_at=replicator.now()))
        assert replicator.core.position.seq == seq, "a write moved the watermark"
        await asyncio.wait_for(waiting, timeout=1.0)

    run_node(tmp_path, faults, scenario, arbiter="etcd")
