"""The chat rules (``service.chat``) against a simple in-memory model of them.

A hypothesis state machine runs random sequences of every chat operation
(register, login, logout, send, read with all its filters, mark_read,
delete_messages, delete_account, whoami, search, and retries of earlier
writes by request id) through real batches on a real ``Storage`` in a temp
folder, exactly as the primary runs them (``chat.apply_write`` inside a
savepoint of a batch), and the same operations on ``Model``: a few dicts and
lists that state SPEC section 3 as directly as possible. Every result and
every refusal (by error class) must agree, and after every step the stored
messages and accounts must be the model's, row for row.

The model decides which of several problems a request reports the way the
service documents it: first the session (``auth_failed``), then the shape of
the arguments (``invalid``), then what they name (``not_found``, ``gone``,
``conflict``).
"""

from __future__ import annotations

import itertools
import re
import shutil
import tempfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    MultipleResults,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from service import chat, windows
from service.chat_schema import MIGRATIONS
from service.errors import (
    AuthFailed,
    ChatError,
    Conflict,
    Gone,
    InvalidInput,
    NotFound,
)
from service.storage import Storage

PASSWORD_HASH = chat.hash_password("correct horse", chat.ScryptParams(n=2**10))
# The model has no clock and no cap on sessions: neither ends one during a run.
SESSION_LIMITS = {
    "session_lifetime": chat.MAX_SESSION_SECONDS,
    "session_idle": chat.MAX_SESSION_SECONDS,
    "session_cap": chat.MAX_SESSION_CAP,
}
NAMES = ["ann", "Ann", "ANN", "bob", "Bob", "cy", "dee.e", "x_1", "bad name", "", "z" * 51]
BODIES = ["hi", "line\nbreak", "tab\there", "é 🙂", "x" * 4000, "x" * 4001, "", "a\x00b", "\x1b"]


# ---- the model ---------------------------------------------------------------------------


@dataclass
class User:
    id: int
    name: str
    deleted: bool = False


@dataclass
class Message:
    id: int
    sender: int
    recipient: int
    body: str
    read: bool = False
    deleted: bool = False


@dataclass
class Model:
    """SPEC section 3, as plainly as it can be said."""

    users: dict[str, User] = field(default_factory=dict)  # by lower-case name
    sessions: dict[str, int] = field(default_factory=dict)  # token hash -> user id
    messages: dict[int, Message] = field(default_factory=dict)

    def user_by_id(self, user_id: int) -> User:
        return next(u for u in self.users.values() if u.id == user_id)

    def session(self, token: str | None) -> User:
        user_id = self.sessions.get(token or "")
        if user_id is None:
            raise AuthFailed("no session")
        return self.user_by_id(user_id)

    def find(self, name: object) -> User:
        if not isinstance(name, str) or not name:
            raise InvalidInput("a user name")
        user = self.users.get(name.lower())
        if user is None:
            raise NotFound(name)
        return user

    def unread(self, user: User) -> int:
        return sum(
            1
            for m in self.messages.values()
            if m.recipient == user.id and not m.read and not m.deleted
        )

    def shape(self, m: Message, read: bool | None = None) -> dict[str, Any]:
        return {
            "id": m.id,
            "from": self.user_by_id(m.sender).name,
            "to": self.user_by_id(m.recipient).name,
            "body": m.body,
            "read": m.read if read is None else read,
        }

    # -- writes --

    def register(self, name: str) -> dict[str, Any]:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,50}", name):
            raise InvalidInput(name)
        if name.lower() in self.users:
            raise Conflict(name)
        user = User(max((u.id for u in self.users.values()), default=0) + 1, name)
        self.users[name.lower()] = user
        return {"user": name, "user_id": user.id}

    def login(self, name: str, token: str) -> dict[str, Any]:
        user = self.users.get(name.lower())
        if user is None or user.deleted:
            raise AuthFailed(name)
        self.sessions[token] = user.id
        return {"user": user.name, "user_id": user.id, "unread": self.unread(user)}

    def logout(self, token: str) -> dict[str, Any]:
        user = self.session(token)
        del self.sessions[token]
        return {"user": user.name}

    def send(self, token: str, to: str, body: str) -> dict[str, Any]:
        me = self.session(token)
        if not 1 <= len(body) <= 4000 or any(
            unicodedata.category(c) == "Cc" and c not in "\n\t" for c in body
        ):
            raise InvalidInput(body)
        recipient = self.find(to)
        if recipient.deleted:
            raise Gone(to)
        message = Message(max(self.messages, default=0) + 1, me.id, recipient.id, body)
        self.messages[message.id] = message
        return {"message": self.shape(message), "recipient_id": recipient.id}

    def read(self, token: str, args: dict[str, Any]) -> dict[str, Any]:
        me = self.session(token)
        box = args.get("box") or "inbox"
        other, sender = args.get("with"), args.get("from")
        if box == "sent" and (other is not None or sender is not None):
            raise InvalidInput("with/from and sent")
        if other is not None and sender is not None:
            raise InvalidInput("with and from")
        if other is not None:
            them = self.find(other).id
            pairs = {(me.id, them), (them, me.id)}
            chosen = [m for m in self.messages.values() if (m.sender, m.recipient) in pairs]
        elif box == "sent":
            chosen = [m for m in self.messages.values() if m.sender == me.id]
        else:
            chosen = [m for m in self.messages.values() if m.recipient == me.id]
            if sender is not None:
                from_id = self.find(sender).id
                chosen = [m for m in chosen if m.sender == from_id]
        chosen = [m for m in chosen if not m.deleted]
        if args.get("unread"):
            chosen = [m for m in chosen if not m.read]
        if args.get("before") is not None:
            chosen = [m for m in chosen if m.id < args["before"]]
        if args.get("after") is not None:
            chosen = [m for m in chosen if m.id > args["after"]]
        chosen.sort(key=lambda m: m.id, reverse=not args.get("oldest_first"))
        limit = args.get("limit") or 20
        shown = chosen[:limit]
        result = {"messages": [self.shape(m) for m in shown], "more": len(chosen) > limit}
        if box != "sent":
            for m in shown:
                if m.recipient == me.id:
                    m.read = True
        return result

    def mark_read(self, token: str, ids: list[int]) -> dict[str, Any]:
        me = self.session(token)
        marked = 0
        for message_id in set(ids):
            m = self.messages.get(message_id)
            if m and m.recipient == me.id and not m.read and not m.deleted:
                m.read = True
                marked += 1
        return {"marked": marked}

    def delete_messages(self, token: str, ids: list[int]) -> dict[str, Any]:
        me = self.session(token)
        wanted = sorted(set(ids))
        missing = [
            i
            for i in wanted
            if i not in self.messages
            or self.messages[i].deleted
            or me.id not in (self.messages[i].sender, self.messages[i].recipient)
        ]
        if missing:
            raise NotFound("not yours", ids=missing)
        for i in wanted:
            self.messages[i].deleted = True
            self.messages[i].body = ""
        return {"deleted": wanted}

    def delete_account(self, token: str) -> dict[str, Any]:
        me = self.session(token)
        me.deleted = True
        self.sessions = {t: u for t, u in self.sessions.items() if u != me.id}
        for m in self.messages.values():
            if m.recipient == me.id and not m.deleted:
                m.deleted = True
                m.body = ""
        return {"user": me.name, "deleted": True}

    # -- reads --

    def whoami(self, token: str) -> dict[str, Any]:
        me = self.session(token)
        return {"user": me.name, "user_id": me.id, "unread": self.unread(me)}

    def search(self, token: str, pattern: str | None, limit: int) -> dict[str, Any]:
        self.session(token)
        glob = "".join(
            ".*" if c == "*" else "." if c == "?" else re.escape(c)
            for c in (pattern or "*").lower()
        )
        names = sorted(
            (key, u.name)
            for key, u in self.users.items()
            if not u.deleted and re.fullmatch(glob, key, re.DOTALL)
        )
        return {"users": [n for _, n in names[:limit]], "more": len(names) > limit}


# ---- the machine -------------------------------------------------------------------------


def _outcome(call: Any) -> tuple[str, Any]:
    """("ok", result) or ("error", error class, and the ids of a not_found)."""
    try:
        return "ok", _without_times(call())
    except ChatError as exc:
        return "error", (type(exc), exc.details.get("ids"))


def _without_times(value: Any) -> Any:
    """A result without ``sent_at`` (the model has no clock)."""
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if k != "sent_at"}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


class ChatAgainstModel(RuleBasedStateMachine):
    tokens = Bundle("tokens")

    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="chat-model-"))
        # NORMAL: no fsync per batch; durability is not what this test is about.
        self.storage = Storage(self.folder / "chat.db", synchronous="NORMAL", migrations=MIGRATIONS)
        self.model = Model()
        self.now = 1000.0  # the clock of the last write
        self.request_ids = itertools.count(1)
        self.done: list[tuple[str, dict[str, Any], str | None, str, dict[str, Any]]] = []
        # Windows of two messages and chunks of two names, so that the few a run makes
        # cross their edges: every read, count and search runs in several steps.
        self.chunks = windows.SCAN_CHUNK, chat.SEARCH_CHUNK
        windows.SCAN_CHUNK, chat.SEARCH_CHUNK = 2, 2

    def teardown(self) -> None:
        windows.SCAN_CHUNK, chat.SEARCH_CHUNK = self.chunks
        self.storage.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def write(
        self, op: str, args: dict[str, Any], token: str | None, request_id: str | None = None
    ) -> dict[str, Any]:
        request_id = request_id or f"r{next(self.request_ids)}"
        if op == "read":
            # As the server runs it: a query, then a write of the ids it marks read.
            shown, to_mark = chat.read(self.storage.db, token, args, self.now)
            if to_mark:
                self.write("mark_read", {"ids": to_mark}, token, request_id)
            return shown
        self.now += 1
        batch = self.storage.begin_batch()
        try:
            with batch.savepoint() as db:
                result = chat.apply_write(db, op, args, token, request_id, self.now)
            batch.seal(1)
            batch.commit()
        except BaseException:
            batch.rollback()
            raise
        if op != "login":
            self.done.append((op, args, token, request_id, result))
        else:  # as the server adds it (it counts just before the write)
            result = {**result, "unread": chat.unread_count(self.storage.db, result["user_id"])}
        return result

    def agree(self, service: Any, model: Any) -> tuple[str, Any]:
        got, expected = _outcome(service), _outcome(model)
        assert got == expected, f"service {got} but model {expected}"
        return got

    # -- rules --

    @initialize(target=tokens)
    def three_users_logged_in(self) -> MultipleResults[str]:
        """Most sequences should do something: start with three live sessions."""
        tokens: list[str] = []
        for name in ("ann", "bob", "cy"):
            self.register(name)
            _, token_hash = chat.new_token()
            self.write(
                "login", {"username": name, "token_hash": token_hash, **SESSION_LIMITS}, None
            )
            self.model.login(name, token_hash)
            tokens.append(token_hash)
        return multiple(*tokens)

    @rule(name=st.sampled_from(NAMES))
    def register(self, name: str) -> None:
        self.agree(
            lambda: self.write(
                "register", {"username": name, "password_hash": PASSWORD_HASH}, None
            ),
            lambda: self.model.register(name),
        )

    @rule(target=tokens, name=st.sampled_from(NAMES[:8]))
    def login(self, name: str) -> str:
        _, token_hash = chat.new_token()
        self.agree(
            lambda: self.write(
                "login", {"username": name, "token_hash": token_hash, **SESSION_LIMITS}, None
            ),
            lambda: self.model.login(name, token_hash),
        )
        return token_hash

    @rule(token=tokens, dice=st.integers(1, 3))
    def logout(self, token: str, dice: int) -> None:
        if dice != 1:  # one in three: most sequences should keep live sessions
            return
        self.agree(lambda: self.write("logout", {}, token), lambda: self.model.logout(token))

    @rule(
        token=tokens,
        to=st.sampled_from(NAMES[:8]),
        body=st.sampled_from(BODIES) | st.text(max_size=20),
    )
    def send(self, token: str, to: str, body: str) -> None:
        self.agree(
            lambda: self.write("send", {"to": to, "body": body}, token),
            lambda: self.model.send(token, to, body),
        )

    @rule(
        token=tokens,
        to=st.sampled_from(["ann", "bob", "cy", "Bob"]),
        body=st.text(
            st.characters(codec="utf-8", exclude_categories=["Cc", "Cs"]), min_size=1, max_size=20
        ),
    )
    def chat(self, token: str, to: str, body: str) -> None:
        """A send that should succeed (most of ``send``'s draws are refused)."""
        self.send(token, to, body)

    @rule(
        token=tokens,
        box=st.sampled_from([None, "inbox", "sent"]),
        other=st.sampled_from([None, None, None, "ann", "Bob", "cy", "dee.e"]),
        sender=st.sampled_from([None, None, None, "ann", "Bob", "cy", "dee.e"]),
        unread=st.booleans(),
        limit=st.sampled_from([None, 1, 2, 3, 5]),
        before=st.sampled_from([None, None, None, 0, 2, 4, 7, 12]),
        after=st.sampled_from([None, None, None, 0, 1, 3, 6, 10]),
        oldest_first=st.booleans(),
    )
    def read(self, token: str, **options: Any) -> None:
        args = {
            "box": options["box"],
            "with": options["other"],
            "from": options["sender"],
            "unread": options["unread"],
            "limit": options["limit"],
            "before": options["before"],
            "after": options["after"],
            "oldest_first": options["oldest_first"],
        }
        self.agree(lambda: self.write("read", args, token), lambda: self.model.read(token, args))

    @rule(token=tokens, limit=st.integers(1, 4), oldest_first=st.booleans())
    def read_inbox(self, token: str, limit: int, oldest_first: bool) -> None:
        """The plain read (most of ``read``'s draws filter everything out)."""
        args = {"limit": limit, "oldest_first": oldest_first}
        self.agree(lambda: self.write("read", args, token), lambda: self.model.read(token, args))

    @rule(token=tokens, ids=st.lists(st.integers(1, 25), min_size=1, max_size=4))
    def mark_read(self, token: str, ids: list[int]) -> None:
        self.agree(
            lambda: self.write("mark_read", {"ids": ids}, token),
            lambda: self.model.mark_read(token, ids),
        )

    @rule(token=tokens, ids=st.lists(st.integers(1, 25), min_size=1, max_size=3))
    def delete_messages(self, token: str, ids: list[int]) -> None:
        self.agree(
            lambda: self.write("delete_messages", {"ids": ids}, token),
            lambda: self.model.delete_messages(token, ids),
        )

    @rule(token=tokens, dice=st.integers(1, 6))
    def delete_account(self, token: str, dice: int) -> None:
        if dice != 1:  # one in six: a deleted account ends what its sessions can do
            return
        self.agree(
            lambda: self.write("delete_account", {}, token),
            lambda: self.model.delete_account(token),
        )

    @precondition(lambda self: bool(self.model.messages))
    @rule(token=tokens, data=st.data())
    def delete_one(self, token: str, data: st.DataObject) -> None:
        """A delete of a message that exists (random ids rarely hit one)."""
        message_id = data.draw(st.sampled_from(sorted(self.model.messages)))
        self.delete_messages(token, [message_id])

    @rule(token=tokens)
    def whoami(self, token: str) -> None:
        self.agree(
            lambda: chat.whoami(self.storage.db, token, self.now), lambda: self.model.whoami(token)
        )

    @rule(
        token=tokens,
        pattern=st.none() | st.text(alphabet="anbBdy.*?[", max_size=4),
        limit=st.integers(1, 4),
    )
    def search(self, token: str, pattern: str | None, limit: int) -> None:
        self.agree(
            lambda: chat.search(self.storage.db, token, self.now, pattern, limit),
            lambda: self.model.search(token, pattern, limit),
        )

    @precondition(lambda self: bool(self.done))
    @rule(data=st.data())
    def retry_a_write(self, data: st.DataObject) -> None:
        """The same request id again: the first result, and nothing changes (the
        invariants compare the tables with the unchanged model)."""
        op, args, token, request_id, first = data.draw(st.sampled_from(self.done))
        try:
            again = self.write(op, args, token, request_id)
        except AuthFailed:
            # A session that has ended replays nothing (but the request that ended it).
            assert op not in ("logout", "delete_account")
            assert token not in self.model.sessions
            return
        if op == "send" and self.model.messages[first["message"]["id"]].deleted:
            # A body deleted since is not kept for replays either.
            first = {**first, "message": {**first["message"], "body": ""}}
        assert again == first

    @precondition(lambda self: bool(self.done))
    @rule(data=st.data())
    def reuse_a_request_id_for_another_op(self, data: st.DataObject) -> None:
        op, _, token, request_id, _ = data.draw(st.sampled_from(self.done))
        other = "mark_read" if op != "mark_read" else "delete_messages"
        try:
            self.write(other, {"ids": [1]}, token or "0" * 64, request_id)
        except Conflict:
            return
        except AuthFailed:
            # A session that ended (or never was) is refused before any replay.
            assert token is None or token not in self.model.sessions
            return
        raise AssertionError(f"request id {request_id} of a {op} was accepted for {other}")

    # -- the stored rows are the model's --

    @invariant()
    def messages_are_the_models(self) -> None:
        rows = self.storage.db.execute(
            "SELECT id, sender_id, recipient_id, body, read_at IS NOT NULL, "
            "deleted_at IS NOT NULL FROM messages ORDER BY id"
        )
        expected = [
            (m.id, m.sender, m.recipient, m.body, m.read, m.deleted)
            for _, m in sorted(self.model.messages.items())
        ]
        assert [tuple(r) for r in rows] == expected

    @invariant()
    def accounts_and_sessions_are_the_models(self) -> None:
        users = self.storage.db.execute(
            "SELECT id, name, deleted_at IS NOT NULL FROM users ORDER BY id"
        )
        expected = sorted((u.id, u.name, u.deleted) for u in self.model.users.values())
        assert [tuple(r) for r in users] == expected
        sessions = self.storage.db.execute("SELECT token_hash, user_id FROM sessions")
        assert dict((str(t), int(u)) for t, u in sessions) == self.model.sessions


ChatAgainstModel.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestChatAgainstModel = ChatAgainstModel.TestCase
