"""The checker: the history of a run against what every node holds after healing.

Theory of operation
-------------------
The checker runs once the faults have stopped, every node is back and the
cluster has converged (one primary, every node at its position, the sync set
all three). It gets the ``History`` (what clients were told) and one
``NodeData`` per node (``snapshot.py``: rows, log, position, node log), and
checks the properties of SPEC section 8, each reported with the number of
violations and the number of things it looked at:

* **acknowledged writes lost**: an ok send whose row is missing, different, or
  erased though no delete names it; a message a read or a listen showed that
  is gone (R7: only acknowledged writes are shown); an ok registration whose
  account is missing (G1);
* **duplicates**: a body stored in two live rows, or an ok send's body stored
  under another id too (G3);
* **failed writes that appeared**: a refused send's body stored; ids of a
  refused delete deleted although no other delete named them;
* **deleted messages that came back**: an id of an ok delete that is not a
  tombstone on some node, or that a read invoked after the delete was
  acknowledged still showed;
* **usernames registered twice**: two ok registrations of one name (without
  regard to case), or two rows with one name key;
* **per-table checksums equal**: a replicated table whose checksum differs
  between nodes (G4);
* **(epoch, seq) monotonic, never reused**: a gap or a falling epoch in a
  node's log, a position that is not its last record, a seq that all nodes
  hold with a different epoch or content, a rewound (epoch, seq) that a log
  holds with other content;
* **at most one primary per epoch**: two nodes that logged ``became primary``
  in one epoch, or a node whose epochs do not grow (R1);
* **at most one node acknowledging per epoch**: two nodes that logged
  ``acknowledging`` (a primary's first acknowledgement of its reign) in one
  epoch, or a node that did so in an epoch it did not become primary in;
* **listen streams**: an id pushed twice or out of order, an owed message never
  pushed, a message for someone else, a stream that ended in an error;
* **no traceback or error in node logs** (``Traceback`` blocks, ERROR and
  CRITICAL lines), **database integrity** (``PRAGMA
  integrity_check``), **node processes** (no node exits by itself; each exits
  0 on SIGTERM), **all nodes converged**;
* **tokens refused after logout**: a token that still worked after its logout
  was acknowledged;
* **unexpected client errors**: ``internal`` or ``protocol``, or a refusal the
  workload never provokes (only a delete's ``not_found`` and a registration's
  ``conflict`` are expected).

Unknown outcomes are free either way, but never twice: an unknown send may be
stored once or not at all, which the duplicates check covers; the report
counts how many were applied.

Every check reads the data; none raises. A deleted message keeps only a
tombstone (empty body), so checks by body see live rows only, and checks by
id (the id an ok send returned) see tombstones too.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise

from ops.cluster import agreement, logs
from ops.cluster.history import FAILED, OK, UNKNOWN, History, Op

from .snapshot import NodeData

# The refusals the workload provokes on purpose; any other refusal is a finding.
EXPECTED_REFUSALS = {
    "delete": {"not_found"},
    "register": {"conflict"},
    "stale-token": {"auth_failed"},
}
_ERROR_LINE = re.compile(r"^\S+ (ERROR|CRITICAL) ")
_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\S+ [A-Z]+ ")
MAX_DETAILS = 15


@dataclass
class Check:
    """One property: how many things were examined and what broke it."""

    name: str
    checked: int = 0
    violations: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def ok(self) -> bool:
        return not self.violations


@dataclass
class Facts:
    """What the run learnt outside the history and the databases."""

    converge_error: str | None = None
    position: tuple[int, int] | None = None
    process_problems: list[str] = field(default_factory=list)


def check_all(history: History, nodes: dict[int, NodeData], facts: Facts) -> list[Check]:
    ops = list(history.ops)
    data = [nodes[i] for i in sorted(nodes)]
    return [
        _converged(facts, data),
        _processes(facts),
        _lost(ops, history, data),
        _duplicates(ops, data),
        _failed_appeared(ops, data),
        _deletes(ops, data),
        _registrations(ops, data),
        _checksums(data),
        _sequence(data),
        _one_primary(data),
        _one_acknowledging(data),
        _listens(history, ops),
        _tracebacks(data),
        _integrity(data),
        _stale_tokens(ops),
        _client_errors(ops),
    ]


# ---- helpers -----------------------------------------------------------------------------


def _sends(ops: Iterable[Op], outcome: str) -> list[Op]:
    return [op for op in ops if op.kind == "send" and op.outcome == outcome]


def _message_id(op: Op) -> int:
    message_id = op.message_id
    assert message_id is not None
    return message_id


def _named_by_deletes(ops: Iterable[Op]) -> Counter[int]:
    """How many deletes (whatever their outcome) name each id."""
    return Counter(int(i) for op in ops if op.kind == "delete" for i in op.args["ids"])


def _live_bodies(node: NodeData) -> dict[str, list[int]]:
    bodies: dict[str, list[int]] = defaultdict(list)
    for row in node.messages.values():
        if not row.deleted:
            bodies[row.body].append(row.id)
    return bodies


class _Findings:
    """Violations keyed by the thing broken, so one lost write counts once, not per node."""

    def __init__(self) -> None:
        self._by_key: dict[object, list[str]] = {}

    def add(self, key: object, text: str) -> None:
        self._by_key.setdefault(key, []).append(text)

    def lines(self) -> list[str]:
        return ["; ".join(texts) for texts in self._by_key.values()]


# ---- the checks --------------------------------------------------------------------------


def _converged(facts: Facts, data: list[NodeData]) -> Check:
    check = Check("all nodes converged", checked=len(data))
    if facts.converge_error:
        check.violations.append(facts.converge_error)
    positions = {node.node_id: node.position for node in data}
    if len(set(positions.values())) > 1:
        check.violations.append(f"positions in the databases differ: {positions}")
    for node in data:
        found = node.sync_set.get("members")
        if not isinstance(found, list) or sorted(found) != sorted(positions):
            check.violations.append(f"node {node.node_id}: the sync set is {found}")
    if facts.position is not None:
        check.note = f"position {facts.position}"
    return check


def _processes(facts: Facts) -> Check:
    return Check("node processes", checked=1, violations=list(facts.process_problems))


def _lost(ops: list[Op], history: History, data: list[NodeData]) -> Check:
    check = Check("acknowledged writes lost")
    found = _Findings()
    named = _named_by_deletes(ops)
    for op in _sends(ops, OK):
        check.checked += 1
        message_id, body = _message_id(op), op.args["body"]
        expected = (op.process, op.args["to"], body)
        for node in data:
            row = node.messages.get(message_id)
            where = f"node {node.node_id}: acknowledged message {message_id} {body!r}"
            if row is None:
                found.add(message_id, f"{where} is missing")
            elif row.deleted and message_id not in named:
                found.add(message_id, f"{where} was erased though no delete names it")
            elif not row.deleted and (row.sender, row.recipient, row.body) != expected:
                found.add(message_id, f"{where} is stored as {row}")
    for message_id, body, how in _observed(ops, history):
        check.checked += 1
        for node in data:
            row = node.messages.get(message_id)
            where = f"node {node.node_id}: message {message_id} {body!r} shown by {how}"
            if row is None or (row.deleted and message_id not in named):
                found.add(("shown", message_id), f"{where} is gone")
            elif not row.deleted and row.body != body:
                found.add(("shown", message_id), f"{where} is stored as {row}")
    for op in ops:
        if op.kind == "register" and op.outcome == OK and op.result is not None:
            check.checked += 1
            name, user_id = str(op.result["user"]), int(op.result["user_id"])
            for node in data:
                if not any(u.id == user_id and u.name == name for u in node.users):
                    found.add(("user", name), f"node {node.node_id}: registered {name} is missing")
    check.violations = found.lines()
    return check


def _observed(ops: list[Op], history: History) -> list[tuple[int, str, str]]:
    """(id, body, by what) of every message a read or a listen showed."""
    seen: dict[int, tuple[str, str]] = {}
    for op in ops:
        if op.kind == "read" and op.outcome == OK and op.result is not None:
            for message in op.result["messages"]:
                seen.setdefault(int(message["id"]), (str(message["body"]), f"op {op.index}"))
    for stream in history.streams:
        for message_id, body in stream.bodies.items():
            seen.setdefault(message_id, (body, f"the listen of {stream.user}"))
    return [(i, body, how) for i, (body, how) in sorted(seen.items())]


def _duplicates(ops: list[Op], data: list[NodeData]) -> Check:
    check = Check("duplicates")
    found = _Findings()
    sent = [op for op in ops if op.kind == "send"]
    check.checked = len(sent)
    for node in data:
        bodies = _live_bodies(node)
        for body, ids in bodies.items():
            if len(ids) > 1:
                found.add(body, f"node {node.node_id}: {body!r} is stored {len(ids)} times: {ids}")
        for op in _sends(ops, OK):
            others = [i for i in bodies.get(op.args["body"], []) if i != _message_id(op)]
            if others:
                found.add(
                    op.args["body"],
                    f"node {node.node_id}: acknowledged as {_message_id(op)}, "
                    f"{op.args['body']!r} is also stored as {others}",
                )
    check.violations = found.lines()
    if data:
        bodies = _live_bodies(data[0])
        unknown = _sends(ops, UNKNOWN)
        applied = sum(1 for op in unknown if op.args["body"] in bodies)
        check.note = (
            f"{len(unknown)} unknown sends: {applied} applied, {len(unknown) - applied} not"
        )
    return check


def _failed_appeared(ops: list[Op], data: list[NodeData]) -> Check:
    check = Check("failed writes that appeared")
    found = _Findings()
    for op in _sends(ops, FAILED):
        check.checked += 1
        for node in data:
            ids = _live_bodies(node).get(op.args["body"])
            if ids:
                found.add(op.index, f"node {node.node_id}: refused {op} is stored as {ids}")
    # Counted once for the whole history: a soak has thousands of refused deletes.
    named = _named_by_deletes(ops)
    for op in ops:
        if op.kind != "delete" or op.outcome != FAILED:
            continue
        check.checked += 1
        own = Counter(int(i) for i in op.args["ids"])
        for node in data:
            for message_id in op.args["ids"]:
                row = node.messages.get(int(message_id))
                # Deleted, and no other delete named it: this refused one did it.
                others = named[int(message_id)] - own[int(message_id)]
                if row is not None and row.deleted and others == 0:
                    found.add(
                        op.index, f"node {node.node_id}: refused {op} deleted {message_id} anyway"
                    )
    check.violations = found.lines()
    return check


def _deletes(ops: list[Op], data: list[NodeData]) -> Check:
    check = Check("deleted messages that came back")
    found = _Findings()
    acked: dict[int, float] = {}
    for op in ops:
        if op.kind == "delete" and op.outcome == OK and op.completed is not None:
            for message_id in op.args["ids"]:
                acked[int(message_id)] = min(op.completed, acked.get(int(message_id), op.completed))
    check.checked = len(acked)
    for message_id in acked:
        for node in data:
            row = node.messages.get(message_id)
            if row is None or not row.deleted:
                state = "missing" if row is None else f"live again: {row}"
                found.add(message_id, f"node {node.node_id}: deleted {message_id} is {state}")
    for op in ops:
        if op.kind != "read" or op.outcome != OK or op.result is None:
            continue
        for message in op.result["messages"]:
            deleted_at = acked.get(int(message["id"]))
            if deleted_at is not None and op.invoked > deleted_at:
                found.add(
                    message["id"],
                    f"{op} showed message {message['id']}, deleted at {deleted_at:.3f}",
                )
    check.violations = found.lines()
    return check


def _registrations(ops: list[Op], data: list[NodeData]) -> Check:
    check = Check("usernames registered twice")
    attempts: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        if op.kind == "register":
            attempts[str(op.args["username"]).lower()].append(op)
    check.checked = len(attempts)
    for key, tries in sorted(attempts.items()):
        winners = [op for op in tries if op.outcome == OK]
        if len(winners) > 1:
            check.violations.append(
                f"{key}: {len(winners)} registrations acknowledged: "
                + ", ".join(f"op {op.index} as {op.args['username']}" for op in winners)
            )
    for node in data:
        keys = Counter(user.name_key for user in node.users)
        for key, count in keys.items():
            if count > 1:
                check.violations.append(f"node {node.node_id}: {count} accounts named {key}")
    return check


def _checksums(data: list[NodeData]) -> Check:
    check = Check("per-table checksums equal")
    if not data:
        return check
    check.checked = len(data[0].checksums)
    differ = agreement.differing_tables({node.node_id: node.checksums for node in data})
    check.violations = [
        f"{table}: nodes {nodes} differ from node {data[0].node_id}"
        for table, nodes in differ.items()
    ]
    return check


def _sequence(data: list[NodeData]) -> Check:
    check = Check("(epoch, seq) monotonic, never reused")
    for node in data:
        check.violations += _own_log_problems(node)
    common = set.intersection(*(set(n.txlog) for n in data)) if data else set()
    check.checked = len(common)
    for seq in sorted(common):
        versions = {n.node_id: n.txlog[seq] for n in data}
        if len(set(versions.values())) > 1:
            epochs = {node_id: epoch for node_id, (epoch, _) in versions.items()}
            check.violations.append(f"seq {seq}: the nodes hold other records (epochs {epochs})")
    for node in data:
        for epoch, seq, changeset in node.rolled_back:
            for other in data:
                held = other.txlog.get(seq)
                if held is not None and held[0] == epoch and held[1] != changeset:
                    check.violations.append(
                        f"({epoch}, {seq}) rewound on node {node.node_id} is held with other "
                        f"content by node {other.node_id}"
                    )
    return check


def _own_log_problems(node: NodeData) -> list[str]:
    where = f"node {node.node_id}"
    problems: list[str] = []
    seqs = sorted(node.txlog)
    for a, b in pairwise(seqs):
        if b != a + 1:
            problems.append(f"{where}: the log jumps from seq {a} to {b}")
        if node.txlog[b][0] < node.txlog[a][0]:
            problems.append(f"{where}: the epoch falls from seq {a} to {b}")
    if seqs:
        last = (node.txlog[seqs[-1]][0], seqs[-1])
        if last != node.position:
            problems.append(f"{where}: position {node.position} but last record {last}")
    starts = dict(node.epochs)
    for (e1, s1), (e2, s2) in pairwise(node.epochs):
        if not (e1 < e2 and s1 < s2):
            problems.append(f"{where}: epochs table out of order: {(e1, s1)} then {(e2, s2)}")
    for seq in seqs:
        epoch = node.txlog[seq][0]
        begun = [e for e, start in starts.items() if start <= seq]
        if begun and max(begun) != epoch:
            problems.append(f"{where}: seq {seq} is in epoch {epoch}, not {max(begun)}")
            break
    return problems


def _one_primary(data: list[NodeData]) -> Check:
    check = Check("at most one primary per epoch")
    holders, check.violations = logs.primary_epochs({node.node_id: node.log for node in data})
    check.checked = len(holders)
    check.note = f"{len(holders)} epochs with a primary"
    return check


def _one_acknowledging(data: list[NodeData]) -> Check:
    check = Check("at most one node acknowledging per epoch")
    texts = {node.node_id: node.log for node in data}
    holders, check.violations = logs.acknowledging_epochs(texts)
    check.checked = len(holders)
    check.note = f"{len(holders)} epochs with acknowledgements"
    return check


def _listens(history: History, ops: list[Op]) -> Check:
    check = Check("listen streams: each message once, in order")
    acked = {_message_id(op): op for op in _sends(ops, OK)}
    restarts = 0
    for stream in history.streams:
        who = f"listener {stream.user}"
        restarts += stream.restarts
        check.checked += len(stream.received)
        check.violations += [f"{who}: {error}" for error in stream.errors]
        counts = Counter(stream.received)
        check.violations += [f"{who}: {i} pushed {n} times" for i, n in counts.items() if n > 1]
        check.violations += [
            f"{who}: {b} pushed after {a}" for a, b in pairwise(stream.received) if b <= a
        ]
        missing = sorted(history.expected_pushes(stream) - set(stream.received))
        check.violations += [f"{who}: never pushed: {acked[i]}" for i in missing]
        for message_id in stream.received:
            op = acked.get(message_id)
            if op is not None and (
                str(op.args["to"]).lower() != stream.user.lower()
                or stream.bodies.get(message_id) != op.args["body"]
            ):
                check.violations.append(f"{who}: {message_id} is not the message {op} sent")
    check.note = f"{len(history.streams)} streams, {restarts} re-listens after no primary"
    return check


def _tracebacks(data: list[NodeData]) -> Check:
    """Each ``Traceback`` block, and each ERROR or CRITICAL line (asyncio reports a
    "Future exception was never retrieved" at ERROR, sometimes with no traceback)."""
    check = Check("no traceback or error in node logs", checked=len(data))
    for node in data:
        lines = node.log.splitlines()
        reported = False  # the traceback just below an error line is the same event
        for index, line in enumerate(lines):
            if _ERROR_LINE.search(line):
                check.violations.append(f"node {node.node_id}: {line.strip()}")
                reported = True
            elif line.startswith("Traceback"):
                if not reported:
                    tail = next(
                        (t for t in lines[index + 1 :] if t and not t.startswith((" ", "\t"))),
                        "?",
                    )
                    check.violations.append(f"node {node.node_id}: {tail}")
            elif _LOG_LINE.match(line):
                reported = False
    return check


def _integrity(data: list[NodeData]) -> Check:
    check = Check("database integrity", checked=len(data))
    for node in data:
        if node.error is not None:
            check.violations.append(f"node {node.node_id}: {node.error}")
        elif node.integrity != "ok":
            check.violations.append(f"node {node.node_id}: integrity_check: {node.integrity}")
    return check


def _stale_tokens(ops: list[Op]) -> Check:
    probes = [op for op in ops if op.kind == "stale-token"]
    check = Check("tokens refused after logout", checked=len(probes))
    check.violations = [f"{op}: a logged-out token works" for op in probes if op.outcome == OK]
    return check


def _client_errors(ops: list[Op]) -> Check:
    check = Check("unexpected client errors", checked=len(ops))
    for op in ops:
        if op.unexpected:
            check.violations.append(str(op))
        elif op.outcome == FAILED and op.error not in EXPECTED_REFUSALS.get(op.kind, set()):
            check.violations.append(f"{op}: refused")
        elif op.outcome is None:
            check.violations.append(f"{op}: never completed")
    return check


# ---- the report --------------------------------------------------------------------------


def format_report(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'check':<{width}}  result  violations/checked  note"]
    for c in checks:
        result = "PASS" if c.ok else "FAIL"
        counts = f"{len(c.violations)}/{c.checked}"
        lines.append(f"{c.name:<{width}}  {result:<6}  {counts:>18}  {c.note}".rstrip())
    for c in checks:
        if not c.ok:
            lines.append(f"\n{c.name}: {len(c.violations)} violations")
            lines += [f"  - {v}" for v in c.violations[:MAX_DETAILS]]
            if len(c.violations) > MAX_DETAILS:
                lines.append(f"  ... and {len(c.violations) - MAX_DETAILS} more")
    return "\n".join(lines)
