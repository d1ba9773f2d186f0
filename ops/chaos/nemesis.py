"""The nemesis: carries out the fault schedule against the running cluster.

Theory of operation
-------------------
The schedule (``schedule.py``) was drawn from the seed before the run; the
nemesis only waits for each fault's start time and carries it out, one fault
at a time, in the calling thread. At the moment a fault fires it asks every
node for its ``status`` to learn who holds the role the fault targets (the
primary is whoever says so in the highest epoch); ``Fault.pick`` then chooses
among the candidates, so the same observed roles always give the same nodes.

Every action (SIGKILL, start, SIGSTOP, SIGCONT) is an ``Event`` with its time
on the history's clock, printed as it happens and kept for the report, so the
fault log lines up with the operations of the history.

``kill-during-catch-up`` is the one fault that watches the nodes: after the
restart of the lagging backup it follows the logs for the primary's
``catch-up start ... backup=N`` line (which also says whether a snapshot is
coming) and strikes at once, mid catch-up. Catch-ups of a small database can be
over in milliseconds; the event says when the strike came too late.

The disk faults (``--faults disk``) write a plan into the node's disk fault
control file (``service/diskfaults.py``) and, after ``down``, the plan
``off``. ``corrupt-backup`` stops a backup with SIGTERM, damages one page of
its database (``corrupt.py``) and starts it again; its event names the page
and the rows on it: what that node can no longer read, and what the other
nodes must still hold.

The arbiter mode's faults (``--arbiter etcd``) cut traffic between the
nodes' own addresses and etcd's (``ArbiterCluster.cut``), and freeze, kill or
stop the etcd member; each ends with every cut removed and the member running
and thawed. A cut is also written into the logs of the nodes it names.

Invariants
----------
* Each fault leaves every node started and thawed, with its disk back, even
  when it fails half way (``heal`` in a ``finally``), so faults never stack
  up unintentionally.
* Waiting between actions is the nemesis's job (random down times); it never
  waits for the cluster to recover before the next fault: the cluster must
  cope with faults that arrive while it is still electing or catching up.
"""

from __future__ import annotations

import random
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from service import diskfaults
from service.status import NodeStatus

from .corrupt import corrupt_page
from .nodes import ArbiterCluster, Nodes, primary_of, views
from .schedule import ARBITER_KINDS, Fault

CATCH_UP_WAIT = 15.0
LOG_POLL = 0.02


@dataclass(frozen=True)
class Event:
    """One action of the nemesis."""

    at: float
    fault: int
    action: str
    node: int | None
    detail: str = ""
    wall: float = 0.0  # time.time(), to line the event up with the node logs

    def __str__(self) -> str:
        node = f" node {self.node}" if self.node is not None else ""
        detail = f" ({self.detail})" if self.detail else ""
        clock = datetime.fromtimestamp(self.wall).strftime("%H:%M:%S.%f")[:-3]
        return f"[{self.at:8.3f} {clock}] #{self.fault:<3d} {self.action}{node}{detail}"


class Nemesis:
    """Runs a schedule; ``events`` is what it did."""

    def __init__(
        self,
        nodes: Nodes,
        schedule: list[Fault],
        clock: Callable[[], float],
        out: Callable[[str], None] = print,
    ) -> None:
        self.nodes = nodes
        self.schedule = schedule
        self.clock = clock
        self.out = out
        self.events: list[Event] = []
        self.stopped = threading.Event()
        self._exits_seen = 0

    def run(self, duration: float) -> None:
        """Carry out every fault that starts before ``duration`` (or until ``stop``)."""
        for fault in self.schedule:
            if not self._pause_until(fault.at) or self.clock() >= duration:
                break
            try:
                self._carry_out(fault)
            except (OSError, TimeoutError) as exc:
                self._event(fault, "error", None, f"{type(exc).__name__}: {exc}")
            finally:
                self.nodes.heal()
                self._report_exits(fault)
        self._pause_until(duration)

    def stop(self) -> None:
        self.stopped.set()

    # ---- the kinds ---------------------------------------------------------------------

    def _carry_out(self, fault: Fault) -> None:
        seen = views(self.nodes)
        self._event(fault, "begin", None, f"{fault.kind} target={fault.target}; {_roles(seen)}")
        ids = sorted(self.nodes.node_ids)
        primary = primary_of(seen)
        backups = [i for i in ids if i != primary]
        if fault.kind in ("kill-primary", "kill-backup"):
            (node,) = _choose(fault.target, fault.pick, ids, primary, backups)
            self._kill(fault, node, seen)
            self._down(fault.down)
            self._start(fault, node)
        elif fault.kind == "kill-two":
            pair = _choose(fault.target, fault.pick, ids, primary, backups)
            for node in pair:
                self._kill(fault, node, seen)
            self._down(fault.down)
            for k, node in enumerate(random.Random(fault.pick).sample(pair, len(pair))):
                if k:
                    self._pause(fault.spread)
                self._start(fault, node)
        elif fault.kind == "kill-all":
            self._kill_all(fault, ids, seen)
        elif fault.kind == "freeze":
            (node,) = _choose(fault.target, fault.pick, ids, primary, backups)
            self._event(fault, "SIGSTOP", node, f"{_role(seen, node)} for {fault.down:.2f}s")
            self.nodes.freeze(node)
            self._pause(fault.down)
            self._event(fault, "SIGCONT", node)
            self.nodes.thaw(node)
        elif fault.kind == "freeze-all":
            for node in ids:
                self._event(fault, "SIGSTOP", node, _role(seen, node))
                self.nodes.freeze(node)
            self._pause(fault.down)
            for k, node in enumerate(random.Random(fault.pick).sample(ids, len(ids))):
                if k:
                    self._pause(fault.spread)
                self._event(fault, "SIGCONT", node)
                self.nodes.thaw(node)
        elif fault.kind == "freeze-and-kill":
            self._freeze_and_kill(fault, ids, primary, backups, seen)
        elif fault.kind == "kill-during-catch-up":
            self._kill_during_catch_up(fault, ids, primary, backups, seen)
        elif fault.kind in ("disk-full", "io-error"):
            (node,) = _choose(fault.target, fault.pick, ids, primary, backups)
            self._disk_fault(fault, node, seen)
        elif fault.kind == "corrupt-backup":
            if primary is None:
                # Damaging a node while nobody leads (after a kill-all, say) may take
                # the newest data of a member the others need: the cluster then rightly
                # waits for an operator (G5). That is a lost disk on top of the fault
                # model's crashes, so the nemesis damages backups of a live primary only.
                self._event(fault, "skipped", None, "no primary: no backup to damage")
                return
            (node,) = _choose("backup", fault.pick, ids, primary, backups)
            self._corrupt(fault, node, seen)
        elif fault.kind in ARBITER_KINDS:
            if not isinstance(self.nodes, ArbiterCluster):
                raise OSError(f"{fault.kind} needs the etcd arbiter mode (--arbiter etcd)")
            self._arbiter_fault(self.nodes, fault, ids, primary, backups, seen)
        else:
            raise ValueError(f"unknown fault kind {fault.kind!r}")

    def _arbiter_fault(
        self,
        cluster: ArbiterCluster,
        fault: Fault,
        ids: list[int],
        primary: int | None,
        backups: list[int],
        seen: dict[int, NodeStatus | None],
    ) -> None:
        if fault.kind == "etcd-freeze":
            self._event(fault, "SIGSTOP etcd", None, f"for {fault.down:.2f}s")
            cluster.freeze_etcd()
            self._pause(fault.down)
            self._event(fault, "SIGCONT etcd", None)
            cluster.thaw_etcd()
            return
        if fault.kind == "etcd-restart":
            action = "SIGKILL etcd" if fault.victim == "kill" else "SIGTERM etcd"
            self._event(fault, action, None, f"down for {fault.down:.2f}s")
            if fault.victim == "kill":
                cluster.kill_etcd()
            else:
                cluster.stop_etcd()
            self._pause(fault.down)
            self._event(fault, "start etcd", None)
            cluster.start_etcd()
            self._event(fault, "etcd healthy", None)
            return
        cuts = _cuts(fault, ids, primary, backups)
        for source, dest, both in cuts:
            self._cut(cluster, fault, seen, source, dest, both)
        self._pause(fault.down)
        self._event(fault, "heal cuts", None)
        cluster.heal_cuts()
        for node in sorted({n for source, dest, _ in cuts for n in (source, dest) if n}):
            cluster.note(node, "cuts healed")

    def _cut(
        self,
        cluster: ArbiterCluster,
        fault: Fault,
        seen: dict[int, NodeStatus | None],
        source: int,
        dest: int,
        both: bool,
    ) -> None:
        """Cut node ``source`` from node ``dest`` (0: the etcd member)."""
        a = cluster.host(source)
        b = cluster.host(dest) if dest else cluster.etcd_host
        name = f"node {dest}" if dest else "etcd"
        arrow = "<->" if both else "->"
        self._event(
            fault, "cut", source, f"{_role(seen, source)}; {arrow} {name} ({a} {arrow} {b})"
        )
        cluster.cut(a, b, both)
        cluster.note(source, f"cut {arrow} {name}")
        if dest:
            cluster.note(dest, f"cut {arrow} node {source} (from its side)")

    def _kill_all(self, fault: Fault, ids: list[int], seen: dict[int, NodeStatus | None]) -> None:
        stale = ids[fault.pick % len(ids)]
        others = [i for i in ids if i != stale]
        self._kill(fault, stale, seen, "the stalest")
        self._pause(fault.lag)
        for node in others:
            self._kill(fault, node, seen)
        self._down(fault.down)
        if fault.order == "stalest-first":
            order = [stale, *others]
        elif fault.order == "stalest-last":
            order = [*others, stale]
        else:
            order = random.Random(fault.pick).sample(ids, len(ids))
        for k, node in enumerate(order):
            if k:
                self._pause(fault.spread)
            self._start(fault, node, "the stalest" if node == stale else "")

    def _freeze_and_kill(
        self,
        fault: Fault,
        ids: list[int],
        primary: int | None,
        backups: list[int],
        seen: dict[int, NodeStatus | None],
    ) -> None:
        """Two overlapping faults: one node frozen while another is killed."""
        (frozen,) = _choose(fault.target, fault.pick, ids, primary, backups)
        others = [i for i in ids if i != frozen]
        candidates = [i for i in others if i != primary]
        if fault.victim == "primary" and primary in others:
            killed = primary
        else:
            killed = candidates[fault.pick % len(candidates)]
        self._event(fault, "SIGSTOP", frozen, f"{_role(seen, frozen)} for the whole fault")
        self.nodes.freeze(frozen)
        self._pause(fault.lag)
        self._kill(fault, killed, seen, f"while node {frozen} is frozen")
        self._pause(fault.down)
        steps = [("start", killed), ("SIGCONT", frozen)]
        for action, node in random.Random(fault.pick).sample(steps, 2):
            if action == "start":
                self._start(fault, node)
            else:
                self._event(fault, "SIGCONT", node)
                self.nodes.thaw(node)

    def _kill_during_catch_up(
        self,
        fault: Fault,
        ids: list[int],
        primary: int | None,
        backups: list[int],
        seen: dict[int, NodeStatus | None],
    ) -> None:
        (joiner,) = _choose("backup", fault.pick, ids, primary, backups)
        self._kill(fault, joiner, seen)
        # From here on, a catch-up of the joiner is one of its next incarnation.
        marks = {i: self.nodes.log_size(i) for i in ids}
        self._down(fault.down)
        self._start(fault, joiner)
        found = self._wait_catch_up(joiner, marks)
        if found is None:
            self._event(fault, "no catch-up seen", joiner, f"within {CATCH_UP_WAIT:g}s")
            return
        sender, line = found
        victim = joiner if fault.victim == "joiner" else sender
        texts = {i: self.nodes.log_text(i, marks[i]) for i in ids}
        ended = any(f"catch-up end node={sender} backup={joiner}" in t for t in texts.values())
        when = "after it ended" if ended else "while it runs"
        self._kill(fault, victim, None, f"{fault.victim} {when}: {line}")
        self._down(fault.spread)
        self._start(fault, victim)

    def _disk_fault(self, fault: Fault, node: int, seen: dict[int, NodeStatus | None]) -> None:
        if fault.kind == "disk-full":
            plan = diskfaults.Plan("full", after_bytes=fault.size)
            action, back = "disk full", "disk space back"
        else:
            plan = diskfaults.Plan(
                "ioerror", after_bytes=fault.size, ops=tuple(fault.ops.split(","))
            )
            action, back = "I/O errors", "I/O errors over"
        detail = f"{_role(seen, node)}; after {fault.size} bytes, for {fault.down:.2f}s"
        self._event(fault, action, node, detail)
        self.nodes.set_disk(node, plan)
        self._pause(fault.down)
        self._event(fault, back, node)
        self.nodes.set_disk(node, diskfaults.OFF)

    def _corrupt(self, fault: Fault, node: int, seen: dict[int, NodeStatus | None]) -> None:
        self._event(fault, "SIGTERM", node, _role(seen, node))
        self.nodes.stop(node)
        # The rows on the damaged page are lost on this node only: the others hold them.
        try:
            damage = corrupt_page(self.nodes.db_path(node), fault.pick, fault.size)
        except (ValueError, sqlite3.Error) as exc:
            self._event(fault, "error", node, f"nothing damaged: {type(exc).__name__}: {exc}")
        else:
            self._event(fault, "corrupt", node, damage.describe())
            self.nodes.note(node, f"corrupt {damage.describe()}")
        self._down(fault.down)
        self._start(fault, node)

    def _wait_catch_up(self, joiner: int, marks: dict[int, int]) -> tuple[int, str] | None:
        pattern = re.compile(rf"catch-up start node=(\d+) backup={joiner}\b[^\n]*")
        deadline = self.clock() + CATCH_UP_WAIT
        while self.clock() < deadline and not self.stopped.is_set():
            for node_id, mark in marks.items():
                match = pattern.search(self.nodes.log_text(node_id, mark))
                if match:
                    return int(match.group(1)), match.group(0)
            self.stopped.wait(LOG_POLL)
        return None

    # ---- actions ---------------------------------------------------------------------

    def _kill(
        self, fault: Fault, node: int, seen: dict[int, NodeStatus | None] | None, why: str = ""
    ) -> None:
        detail = ", ".join(filter(None, [_role(seen, node) if seen else "", why]))
        self._event(fault, "SIGKILL", node, detail)
        self.nodes.kill(node)

    def _start(self, fault: Fault, node: int, why: str = "") -> None:
        self._event(fault, "start" if self.nodes.controls_restarts else "await restart", node, why)
        self.nodes.start(node)

    def _event(self, fault: Fault, action: str, node: int | None, detail: str = "") -> None:
        event = Event(round(self.clock(), 3), fault.index, action, node, detail, time.time())
        self.events.append(event)
        self.out(str(event))

    def _report_exits(self, fault: Fault) -> None:
        exits = self.nodes.unexpected_exits()
        for text in exits[self._exits_seen :]:
            self._event(fault, "UNEXPECTED EXIT", None, text)
        self._exits_seen = len(exits)

    def _pause(self, seconds: float) -> None:
        self.stopped.wait(max(0.0, seconds))

    def _down(self, seconds: float) -> None:
        """Keep killed nodes down; where supervisord restarts them, it decides how long."""
        if self.nodes.controls_restarts:
            self._pause(seconds)

    def _pause_until(self, at: float) -> bool:
        """Wait until the clock reads ``at``; False if stopped first."""
        return not self.stopped.wait(max(0.0, at - self.clock()))


def _choose(
    target: str, pick: int, ids: list[int], primary: int | None, backups: list[int]
) -> list[int]:
    """The node ids a fault's target names now (any node when no primary is known)."""
    if primary is None:
        count = 2 if target in ("primary+backup", "backups") else 1
        return random.Random(pick).sample(ids, count)
    if target == "primary":
        return [primary]
    if target == "backup":
        return [backups[pick % len(backups)]]
    if target == "any":
        return [ids[pick % len(ids)]]
    if target == "primary+backup":
        return [primary, backups[pick % len(backups)]]
    if target == "backups":
        return list(backups)
    raise ValueError(f"unknown target {target!r}")


def _cuts(
    fault: Fault, ids: list[int], primary: int | None, backups: list[int]
) -> list[tuple[int, int, bool]]:
    """The cuts a partition fault makes: (source node, dest node or 0 for etcd, both ways)."""
    if fault.kind == "isolate":
        (node,) = _choose(fault.target, fault.pick, ids, primary, backups)
        return [(node, other, True) for other in ids if other != node] + [(node, 0, True)]
    if fault.kind == "cut-from-etcd":
        (node,) = _choose(fault.target, fault.pick, ids, primary, backups)
        return [(node, 0, True)]
    if fault.kind == "cut-primary-from-backups":
        (node,) = _choose("primary", fault.pick, ids, primary, backups)
        return [(node, other, True) for other in ids if other != node]
    if fault.kind == "cut-one-way":
        if primary is None or fault.target == "backup>backup":
            pool = backups if primary is not None else ids
            source, dest = random.Random(fault.pick).sample(pool, 2)
        else:
            backup = backups[fault.pick % len(backups)]
            source, dest = (
                (primary, backup) if fault.target == "primary>backup" else (backup, primary)
            )
        return [(source, dest, False)]
    raise ValueError(f"unknown partition kind {fault.kind!r}")


def _role(seen: dict[int, NodeStatus | None], node: int) -> str:
    view = seen.get(node)
    return f"{view.role} at {view.position}" if view is not None else "not answering"


def _roles(seen: dict[int, NodeStatus | None]) -> str:
    return ", ".join(
        f"{i}={v.role}@{v.position[0]}.{v.position[1]}" if v else f"{i}=down"
        for i, v in sorted(seen.items())
    )
