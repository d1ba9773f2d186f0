"""Reads of a large inbox in windows (``service/windows.py``): every query looks at a
bounded number of rows, and the answers are those of one query over everything.

A real database file: ann's inbox holds far more messages than a window (most read
long ago, a few unread from carol, some deleted), and she sent some. Each read,
count and backlog runs twice through its own connection: with windows of
``CHUNK`` messages, and as one window (all of it in one query, as before); reads
are also checked against the single query the node ran before windows
(``read_at_once``). SQLite's own count of the steps each statement took
(``SQLITE_STMTSTATUS_VM_STEP``, through apsw's profile trace) shows how much of
the inbox a query looked at.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import apsw
import pytest

from service import chat, windows
from service.chat_schema import MIGRATIONS
from service.storage import Db, Storage
from tests.unit.test_chat import Service

CHUNK = 16
INBOX = 1200
# The most steps one statement may take with windows of CHUNK messages: up to about
# twenty per message of each of two ranges (measured: 601 at most). One query over
# the whole inbox takes about ten per message of it.
MOST_STEPS = 2 * CHUNK * 25

ReadArgs = dict[str, Any]


@pytest.fixture(scope="module")
def inbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ann (user 1) with INBOX messages from bob, all read, some deleted; then six
    unread from carol, and six she sent: three to bob, three to herself."""
    path = tmp_path_factory.mktemp("windows") / "chat.db"
    storage = Storage(path, migrations=MIGRATIONS)
    svc = Service(storage)
    ann, bob, carol = svc.user("ann"), svc.user("bob"), svc.user("carol")
    svc.user("dave")
    ids = [svc.send(bob, "ann", f"old {n}") for n in range(INBOX)]
    svc.write("delete_messages", {"ids": ids[100:200:3]}, ann)
    while svc.read(ann, unread=True, limit=1000)["messages"]:
        pass
    for n in range(6):
        svc.send(carol, "ann", f"new {n}")
        svc.send(ann, "bob" if n % 2 else "ann", f"mine {n}")
    storage.close()
    return path


class Profiled:
    """A connection of its own to the database, counting each statement's steps."""

    def __init__(self, path: Path) -> None:
        self.connection = apsw.Connection(str(path))
        self.db = Db(self.connection)
        self.steps: list[tuple[int, str]] = []
        self.connection.trace_v2(apsw.SQLITE_TRACE_PROFILE, self._profiled)

    def _profiled(self, event: dict[str, Any]) -> None:
        self.steps.append((event["stmt_status"]["SQLITE_STMTSTATUS_VM_STEP"], event["sql"]))

    def most(self) -> tuple[int, str]:
        return max(self.steps)

    def close(self) -> None:
        self.connection.close()


def both_ways(
    path: Path, monkeypatch: pytest.MonkeyPatch, run: Callable[[Db], Any]
) -> tuple[Any, tuple[int, str], tuple[int, str]]:
    """``run`` with windows of CHUNK messages, then as one window: both answers must
    agree; returns it and the most steps of a statement in each way."""
    outcomes = []
    for chunk in (CHUNK, 2**40):
        monkeypatch.setattr(windows, "SCAN_CHUNK", chunk)
        profiled = Profiled(path)
        try:
            outcomes.append((run(profiled.db), profiled.most()))
        finally:
            profiled.close()
    (windowed, most), (at_once, most_at_once) = outcomes
    assert windowed == at_once
    return windowed, most, most_at_once


def token_of(path: Path, name: str) -> str:
    """A session of ``name`` (a row written straight into the file; its hash is what
    chat's reads take as the token)."""
    connection = apsw.Connection(str(path))
    try:
        token_hash = f"hash-of-{name}"
        connection.execute(
            "INSERT OR IGNORE INTO sessions(token_hash, user_id, request_id, created_at, "
            "expires_at, idle_timeout, ends_at) SELECT ?, id, ?, 0, 1e12, 1e12, 1e12 "
            "FROM users WHERE name_key = ?",
            (token_hash, f"login-{name}", name),
        )
    finally:
        connection.close()
    return token_hash


def read_at_once(db: Db, user_id: int, args: ReadArgs) -> dict[str, Any]:
    """The read as the node ran it before windows: one query over every message."""
    conditions, params = ["m.deleted_at IS NULL", "r.deleted_at IS NULL"], []
    user = {name: uid for uid, name in db.execute("SELECT id, name_key FROM users")}
    if "with" in args:
        other = user[args["with"]]
        conditions.append(
            "((m.sender_id = ? AND m.recipient_id = ?) OR (m.sender_id = ? AND m.recipient_id = ?))"
        )
        params += [user_id, other, other, user_id]
    elif args.get("box") == "sent":
        conditions.append("m.sender_id = ?")
        params.append(user_id)
    else:
        conditions.append("m.recipient_id = ?")
        params.append(user_id)
        if "from" in args:
            conditions.append("m.sender_id = ?")
            params.append(user[args["from"]])
    if args.get("unread"):
        conditions.append("m.read_at IS NULL")
    for field, operator in (("before", "<"), ("after", ">")):
        if args.get(field) is not None:
            conditions.append(f"m.id {operator} ?")
            params.append(args[field])
    limit = args.get("limit", chat.DEFAULT_READ_LIMIT)
    rows = db.execute(
        "SELECT m.id, s.name, r.name, m.body, m.sent_at, m.read_at IS NOT NULL FROM messages m "
        "JOIN users s ON s.id = m.sender_id JOIN users r ON r.id = m.recipient_id "
        f"WHERE {' AND '.join(conditions)} "
        f"ORDER BY m.id{'' if args.get('oldest_first') else ' DESC'} LIMIT ?",
        [*params, limit + 1],
    )
    messages = [
        {"id": r[0], "from": r[1], "to": r[2], "body": r[3], "sent_at": r[4], "read": bool(r[5])}
        for r in rows
    ]
    return {"messages": messages[:limit], "more": len(messages) > limit}


READS: list[ReadArgs] = [
    {},
    {"unread": True},
    {"unread": True, "oldest_first": True},
    {"unread": True, "limit": 1000},
    {"with": "carol"},
    {"with": "dave"},
    {"with": "ann"},
    {"with": "bob", "limit": 3},
    {"from": "carol", "oldest_first": True},
    {"from": "dave"},
    {"box": "sent"},
    {"box": "sent", "limit": 1000, "oldest_first": True},
    {"before": 5, "unread": True},
    {"after": 100, "before": 300, "oldest_first": True, "limit": 1000},
    {"after": 2**63 - 1},
    {"before": 0},
    {"limit": 1000},
]


@pytest.mark.parametrize("args", READS, ids=[str(args) for args in READS])
def test_a_read_looks_at_a_window_per_query_and_answers_as_one_query(
    inbox: Path, monkeypatch: pytest.MonkeyPatch, args: ReadArgs
) -> None:
    token = token_of(inbox, "ann")
    answer, most, _ = both_ways(inbox, monkeypatch, lambda db: chat.read(db, token, args, 1.0))
    assert most[0] <= MOST_STEPS, f"a query of {args} took {most[0]} steps: {most[1]}"
    profiled = Profiled(inbox)
    try:
        assert answer[0] == read_at_once(profiled.db, 1, args)
    finally:
        profiled.close()
    if args.get("unread") and "before" not in args:
        assert [m["body"] for m in answer[0]["messages"]][-1].startswith("new")


def test_the_heaviest_reads_of_one_query_looked_at_the_whole_inbox(
    inbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the bound above guards against: the same reads in one window."""
    token = token_of(inbox, "ann")
    for args in ({"unread": True}, {"with": "dave"}):

        def read(db: Db, args: ReadArgs = args) -> Any:
            return chat.read(db, token, args, 1.0)

        _, _, at_once = both_ways(inbox, monkeypatch, read)
        assert at_once[0] > 3 * MOST_STEPS, (args, at_once)


def test_the_unread_count_and_the_backlog_look_at_a_window_per_query(
    inbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    count, most, at_once = both_ways(inbox, monkeypatch, lambda db: chat.unread_count(db, 1))
    assert count == 9  # carol's six, and three notes to herself
    assert most[0] <= MOST_STEPS < at_once[0] / 3, (most, at_once)

    def whole_backlog(db: Db, after: int | None) -> list[int]:
        ids: list[int] = []
        following: int | None = 0
        while following is not None:
            page, following = chat.backlog(db, 1, after, following)
            ids += [m["id"] for m in page]
        return ids

    unread, most, at_once = both_ways(inbox, monkeypatch, lambda db: whole_backlog(db, None))
    assert len(unread) == 9
    assert most[0] <= MOST_STEPS < at_once[0] / 3, (most, at_once)
    resumed, most, _ = both_ways(inbox, monkeypatch, lambda db: whole_backlog(db, unread[0]))
    assert resumed == unread[1:]
    assert most[0] <= MOST_STEPS


def test_windows_cover_the_ids_between_start_and_stop_once(
    inbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Adjacent, not overlapping, the last reaching the stop; each holds at most
    CHUNK of a range's messages."""
    monkeypatch.setattr(windows, "SCAN_CHUNK", CHUNK)
    profiled = Profiled(inbox)
    db = profiled.db
    # Two terms: what ann received from bob, what she sent to bob.
    terms = [[windows.inbox(1), windows.sent(2)], [windows.sent(1), windows.inbox(2)]]
    try:
        for ascending, start, stop in ((True, None, None), (False, None, None), (True, 50, 700)):
            scan = windows.Windows(terms, ascending, start, stop)
            seen: list[int] = []
            while not scan.done:
                window, params, chosen = scan.next(db)
                rows = db.execute(
                    f"SELECT m.id, m.recipient_id, m.sender_id FROM messages m "
                    f"WHERE {window} ORDER BY m.id",
                    params,
                )
                for through in chosen:
                    held = [
                        r
                        for r in rows
                        if r[1 if through.column == "recipient_id" else 2] == through.account
                    ]
                    assert len(held) <= CHUNK, (through, len(held))
                seen += [r[0] for r in rows]
            low, high = (start or 0, stop or 2**63) if ascending else (0, 2**63)
            expected = [r[0] for r in db.execute("SELECT id FROM messages ORDER BY id")]
            assert sorted(seen) == [i for i in expected if low < i < high]
            assert len(seen) == len(set(seen))
    finally:
        profiled.close()


def test_a_read_of_a_sparse_conversation_takes_one_window(
    inbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Received from carol: in ann's large inbox, and in carol's six sends. The window
    ends where carol's sends run out, not after CHUNK of ann's inbox."""
    monkeypatch.setattr(windows, "SCAN_CHUNK", CHUNK)
    token = token_of(inbox, "ann")
    profiled = Profiled(inbox)
    try:
        for args in ({"from": "carol"}, {"with": "carol"}, {"with": "dave"}, {"from": "dave"}):
            scan = chat.ReadScan(token, 1.0, args)
            assert scan.step(profiled.db), f"{args} took more than one window"
        assert profiled.most()[0] <= MOST_STEPS
    finally:
        profiled.close()


def test_random_reads_in_windows_answer_as_the_single_query_did(
    inbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every filter, bound, order and limit at random, with windows of 1 to CHUNK
    messages, against ``read_at_once``; bob and carol read too."""
    rng = random.Random(20261207)
    tokens = {1: token_of(inbox, "ann"), 2: token_of(inbox, "bob"), 3: token_of(inbox, "carol")}
    profiled = Profiled(inbox)
    newest = int(profiled.db.value("SELECT max(id) FROM messages"))
    try:
        for _ in range(300):
            monkeypatch.setattr(windows, "SCAN_CHUNK", rng.choice([1, 2, 3, 7, CHUNK]))
            user_id = rng.choice(list(tokens))
            args: ReadArgs = {}
            kind = rng.choice(["inbox", "sent", "with", "from"])
            if kind == "sent":
                args["box"] = "sent"
            elif kind != "inbox":
                args[kind] = rng.choice(["ann", "bob", "carol", "dave"])
            for flag in ("unread", "oldest_first"):
                if rng.random() < 0.4:
                    args[flag] = True
            for bound in ("before", "after"):
                if rng.random() < 0.3:
                    args[bound] = rng.randint(0, newest + 2)
            args["limit"] = rng.choice([1, 2, 5, 20, 1000])
            shown, _ = chat.read(profiled.db, tokens[user_id], args, 1.0)
            assert shown == read_at_once(profiled.db, user_id, args), (user_id, args)
    finally:
        profiled.close()
