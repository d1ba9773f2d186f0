"""The chat rules of SPEC section 3, run through real batches on a real database."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apsw
import pytest

from service import chat
from service.chat_schema import MIGRATIONS
from service.errors import AuthFailed, ChatError, Conflict, Gone, InvalidInput, NotFound
from service.protocol import MAX_REQUEST_ID
from service.replication.types import LogRecord
from service.storage import Batch, Storage, schema_migrations

PASSWORD = "correct horse"
# A cheap cost: the rules of the parameters do not depend on it, and tests stay fast.
FAST = chat.ScryptParams(n=2**10)
# Computed once: the write operations take the hash, so tests need no slow hashing.
PASSWORD_HASH = chat.hash_password(PASSWORD, FAST)
# What the server passes to login from its config (the defaults).
SESSION_LIMITS = {"session_lifetime": 30 * 86400.0, "session_idle": 7 * 86400.0, "session_cap": 20}


class Service:
    """What the server does around chat: one batch per write, the savepoint (none for
    the ops that need none, as in the writer), the clock, through the application the
    primary's writer uses (its session cache included)."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.app = chat.ChatApplication(request_retention=3600.0)
        self.db = storage.db
        self.now = 1000.0  # the clock of the last write; each write moves it on by 1 s
        self.request_ids = itertools.count(1)
        self.sealed: list[bool] = []

    def write(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        token: str | None = None,
        request_id: str | None = None,
        fingerprint: str | None = None,
    ) -> dict[str, Any]:
        request_id = request_id or f"r{next(self.request_ids)}"
        if op == "read":
            return self.read_as_server(args or {}, token, request_id)
        self.now += 1
        batch = self.storage.begin_batch()
        try:
            if self.app.unguarded_bound(op) is None:
                with batch.savepoint() as db:
                    result = self.app.apply_write(
                        db, op, args or {}, token, request_id, self.now, fingerprint
                    )
            else:
                result = self.app.apply_write(
                    batch.db, op, args or {}, token, request_id, self.now, fingerprint
                )
            self.sealed.append(batch.seal(1) is not None)
            batch.commit()
        except ChatError:
            # Refused: its savepoint is undone and the cache kept, as in the writer's
            # batches, where the other writes of the batch go on.
            batch.rollback()
            raise
        except BaseException:
            self.app.reset()  # as the writer does when a batch is rolled back whole
            batch.rollback()
            raise
        return result

    def read_as_server(
        self, args: dict[str, Any], token: str | None, request_id: str
    ) -> dict[str, Any]:
        """``read`` as the server runs it: a query, then a write of the ids it marks,
        under the read's request id and fingerprint."""
        shown, to_mark = chat.read(self.db, token, args, self.now)
        if to_mark:
            fingerprint = chat.request_fingerprint("read", args)
            self.write("mark_read", {"ids": to_mark}, token, request_id, fingerprint)
        return shown

    def register(self, name: str) -> int:
        result = self.write("register", {"username": name, "password_hash": PASSWORD_HASH})
        return int(result["user_id"])

    def login(self, name: str, request_id: str | None = None, **limits: float) -> str:
        """A new session; returns its token hash (what the server passes as ``token``).
        ``limits`` replace the default session limits (``session_idle=100``, ...)."""
        _, token_hash = chat.new_token()
        args = {"username": name, "token_hash": token_hash, **SESSION_LIMITS, **limits}
        self.write("login", args, request_id=request_id)
        return token_hash

    def user(self, name: str) -> str:
        self.register(name)
        return self.login(name)

    def send(self, token: str, to: str, body: str = "hi") -> int:
        return int(self.write("send", {"to": to, "body": body}, token)["message"]["id"])

    def read(self, token: str, **args: Any) -> dict[str, Any]:
        return self.write("read", args, token)

    def ids(self, token: str, **args: Any) -> list[int]:
        return [m["id"] for m in self.read(token, **args)["messages"]]


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Service]:
    storage = Storage(tmp_path / "chat.db", migrations=MIGRATIONS)
    yield Service(storage)
    storage.close()


@pytest.fixture
def ann(svc: Service) -> str:
    return svc.user("ann")


@pytest.fixture
def bob(svc: Service) -> str:
    return svc.user("bob")


# ---- passwords and tokens ----------------------------------------------------------------


def test_password_hash_is_salted_scrypt_and_verifies() -> None:
    other = chat.hash_password(PASSWORD, FAST)
    assert PASSWORD_HASH.startswith("scrypt$1024$8$1$")
    assert other != PASSWORD_HASH
    assert PASSWORD not in PASSWORD_HASH
    assert chat.verify_password(PASSWORD, PASSWORD_HASH)
    assert chat.verify_password(PASSWORD, other)
    assert not chat.verify_password("wrong password", PASSWORD_HASH)


def test_the_default_cost_is_owasps_and_fits_its_memory_bound() -> None:
    # One hash at the real cost (~0.5 s): scrypt refuses to run past maxmem.
    assert chat.ScryptParams(2**17, 8, 1) == chat.DEFAULT_SCRYPT
    stored = chat.hash_password(PASSWORD)
    assert stored.startswith("scrypt$131072$8$1$")
    assert chat.hash_params(stored) == chat.DEFAULT_SCRYPT


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "scrypt$1$2",
        "bcrypt$1$1$1$00$00",
        "scrypt$x$8$1$00$00",
        "scrypt$1000$8$1$00$00",  # N is not a power of two
        f"scrypt${2**21}$8$1$00$00",  # dearer than any node computes
        "scrypt$1024$8$1$00$",  # no key
        "scrypt$1024$8$1$0g$00",
    ],
)
def test_malformed_stored_hashes_never_verify(stored: str) -> None:
    assert not chat.verify_password(PASSWORD, stored)


def test_check_login_refuses_unknown_users_and_wrong_passwords(svc: Service) -> None:
    svc.register("ann")
    assert chat.check_login(PASSWORD, chat.user_auth(svc.db, "ANN"), FAST) == chat.LoginCheck(True)
    assert not chat.check_login("wrong password", chat.user_auth(svc.db, "ann"), FAST).ok
    assert not chat.check_login(PASSWORD, chat.user_auth(svc.db, "nobody"), FAST).ok


def test_check_login_rehashes_a_right_password_made_with_other_parameters(svc: Service) -> None:
    svc.register("ann")
    dearer = chat.ScryptParams(n=2**11)
    check = chat.check_login(PASSWORD, chat.user_auth(svc.db, "ann"), dearer)
    assert check.ok
    assert check.new_hash is not None
    assert chat.hash_params(check.new_hash) == dearer
    assert chat.verify_password(PASSWORD, check.new_hash)
    # A wrong password is never rehashed, whatever its parameters.
    assert (
        chat.check_login("wrong password", chat.user_auth(svc.db, "ann"), dearer).new_hash is None
    )


def test_a_login_with_a_new_hash_replaces_the_stored_one(svc: Service) -> None:
    svc.register("ann")
    new_hash = chat.hash_password(PASSWORD, chat.ScryptParams(n=2**11))
    _, token_hash = chat.new_token()
    svc.write(
        "login",
        {"username": "ann", "token_hash": token_hash, "password_hash": new_hash, **SESSION_LIMITS},
    )
    assert chat.user_auth(svc.db, "ann") == (1, new_hash)
    svc.login("ann")
    assert chat.user_auth(svc.db, "ann") == (1, new_hash)


def test_new_token_is_random_and_stored_as_its_sha256() -> None:
    token, token_hash = chat.new_token()
    assert len(token) >= 43
    assert token_hash == hashlib.sha256(token.encode()).hexdigest() == chat.hash_token(token)
    assert chat.new_token()[0] != token


# ---- validation --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "Ann", "a" * 50, "x_y.z-1", "0"])
def test_valid_usernames(name: str) -> None:
    assert chat.validate_username(name) == name


@pytest.mark.parametrize("name", ["", "a" * 51, "ann smith", "ann\n", "é", "a/b", "a*", None, 5])
def test_invalid_usernames(name: object) -> None:
    with pytest.raises(InvalidInput, match="username"):
        chat.validate_username(name)


@pytest.mark.parametrize("name", ["-", ".", "..", "_", "._-", "-bob", "--help"])
def test_new_names_need_a_letter_or_digit_and_no_leading_dash(svc: Service, name: str) -> None:
    with pytest.raises(InvalidInput, match="letter or a digit"):
        svc.register(name)
    assert svc.db.value("SELECT count(*) FROM users") == 0


@pytest.mark.parametrize("name", ["_bob", "bob-", ".x", "a..b", "0"])
def test_names_with_punctuation_and_a_letter_or_digit_register(svc: Service, name: str) -> None:
    svc.register(name)
    assert chat.user_auth(svc.db, name) is not None


# The Kelvin sign lower-cases to an ASCII 'k'; the others are simply not ASCII.
LOOKALIKES = ["\u212aate", "\u212aATE", "kat\u0435", "kate\u200b", "ka\u0307te"]


@pytest.mark.parametrize("name", LOOKALIKES)
def test_login_refuses_a_name_outside_the_charset_before_lower_casing(
    svc: Service, name: str
) -> None:
    svc.register("kate")
    with pytest.raises(InvalidInput, match="not a user name"):
        chat.user_auth(svc.db, name)
    with pytest.raises(InvalidInput, match="not a user name"):
        svc.login(name)
    assert svc.db.value("SELECT count(*) FROM sessions") == 0


@pytest.mark.parametrize("name", LOOKALIKES)
def test_send_and_read_refuse_a_name_outside_the_charset(svc: Service, ann: str, name: str) -> None:
    svc.register("kate")
    with pytest.raises(InvalidInput, match="'to' is not a user name"):
        svc.send(ann, name)
    for field in ("with", "from"):
        with pytest.raises(InvalidInput, match=f"'{field}' is not a user name"):
            svc.read(ann, **{field: name})
    assert svc.db.value("SELECT count(*) FROM messages") == 0


def test_search_does_not_lower_case_a_kelvin_sign_into_k(svc: Service, ann: str) -> None:
    svc.register("kate")
    assert chat.search(svc.db, ann, svc.now, "\u212a*")["users"] == []
    assert chat.search(svc.db, ann, svc.now, "K*")["users"] == ["kate"]


def test_an_older_account_named_only_with_punctuation_still_works(svc: Service, ann: str) -> None:
    # Registered before the stricter rule for new names: written as a node did then.
    svc.db.execute(
        "INSERT INTO users(id, name, name_key, password_hash, created_at) VALUES (?, ?, ?, ?, ?)",
        (99, "..", "..", PASSWORD_HASH, 1.0),
    )
    assert chat.user_auth(svc.db, "..") == (99, PASSWORD_HASH)
    dots = svc.login("..")
    svc.send(ann, "..", "still here")
    assert [m["body"] for m in svc.read(dots)["messages"]] == ["still here"]
    assert svc.ids(ann, **{"with": ".."}) == svc.ids(dots)


@pytest.mark.parametrize("password", ["x" * 8, "x" * 256, "pass wörd ✓"])
def test_valid_passwords(password: str) -> None:
    assert chat.validate_password(password) == password


@pytest.mark.parametrize("password", ["x" * 7, "x" * 257, "", None, 12345678])
def test_invalid_passwords(password: object) -> None:
    with pytest.raises(InvalidInput, match="password"):
        chat.validate_password(password)


@pytest.mark.parametrize("body", ["x", "x" * 4000, "line\nline\ttab", "héllo 👋 世界"])
def test_valid_bodies(body: str) -> None:
    assert chat.validate_body(body) == body


@pytest.mark.parametrize("body", ["", "x" * 4001, None, 7, ["x"]])
def test_bodies_of_wrong_size_or_type(body: object) -> None:
    with pytest.raises(InvalidInput, match="message"):
        chat.validate_body(body)


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x1b", "\r", "\x7f", "\x85", "\ud800"])
def test_bodies_with_control_characters_or_lone_surrogates(char: str) -> None:
    with pytest.raises(InvalidInput, match=f"U\\+{ord(char):04X}"):
        chat.validate_body(f"a{char}b")


# ---- register ----------------------------------------------------------------------------


def test_register_returns_the_user_and_keeps_only_the_hash(svc: Service) -> None:
    result = svc.write("register", {"username": "Ann", "password_hash": PASSWORD_HASH})
    assert result == {"user": "Ann", "user_id": 1}
    assert chat.user_auth(svc.db, "ann") == (1, PASSWORD_HASH)


@pytest.mark.parametrize("other", ["ann", "ANN", "aNn"])
def test_usernames_are_unique_without_regard_to_case(svc: Service, other: str) -> None:
    svc.register("Ann")
    with pytest.raises(Conflict, match=f"the username {other} is taken"):
        svc.register(other)


def test_a_deleted_accounts_name_is_never_reused(svc: Service, ann: str) -> None:
    svc.write("delete_account", {}, ann)
    with pytest.raises(Conflict, match="taken"):
        svc.register("ANN")


@pytest.mark.parametrize(
    "args",
    [
        {"username": "ann"},
        {"password_hash": PASSWORD_HASH},
        {"username": "bad name", "password_hash": PASSWORD_HASH},
        {"username": ["ann"], "password_hash": PASSWORD_HASH},
        {"username": "ann", "password_hash": 5},
        {"username": "ann", "password_hash": ""},
        {"username": "ann", "password_hash": PASSWORD_HASH, "password": "x" * 8},
    ],
)
def test_register_refuses_bad_arguments(svc: Service, args: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput):
        svc.write("register", args)
    assert svc.db.value("SELECT count(*) FROM users") == 0


# ---- login, sessions, logout -------------------------------------------------------------


def test_login_opens_a_session_and_leaves_its_unread_count_to_a_read(
    svc: Service, bob: str
) -> None:
    svc.register("Ann")
    svc.send(bob, "ann")
    svc.send(bob, "ann")
    _, token_hash = chat.new_token()
    result = svc.write("login", {"username": "ANN", "token_hash": token_hash, **SESSION_LIMITS})
    # Not counted in the write: a large inbox would hold the writer's batch.
    assert result == {"user": "Ann", "user_id": 2}
    assert chat.session_user(svc.db, token_hash, svc.now) == (2, "Ann")
    assert chat.unread_count(svc.db, 2) == 2


def test_several_sessions_per_user(svc: Service) -> None:
    svc.register("ann")
    phone, laptop = svc.login("ann"), svc.login("ann")
    assert chat.session_user(svc.db, phone, svc.now) == chat.session_user(svc.db, laptop, svc.now)


# ---- session limits: driven by each write's clock (svc.now) -----------------------------


def live(svc: Service, token_hash: str, now: float) -> bool:
    try:
        chat.session_user(svc.db, token_hash, now)
    except AuthFailed as exc:
        if exc.message != chat.SESSION_ENDED:
            raise
        return False
    return True


def ends_at(svc: Service, token_hash: str) -> float:
    return float(svc.db.value("SELECT ends_at FROM sessions WHERE token_hash = ?", (token_hash,)))


def test_a_session_unused_for_its_idle_timeout_ends(svc: Service) -> None:
    svc.register("ann")
    session = svc.login("ann", session_idle=100, session_lifetime=1000)
    start = svc.now
    assert live(svc, session, start + 99.9)
    assert not live(svc, session, start + 100)
    svc.now = start + 100
    with pytest.raises(AuthFailed, match="session has ended"):
        svc.send(session, "ann")
    with pytest.raises(AuthFailed, match="session has ended"):
        chat.whoami(svc.db, session, start + 100)


def test_writes_move_the_idle_clock_on_at_most_once_per_tenth_of_it(svc: Service) -> None:
    svc.register("ann")
    session = svc.login("ann", session_idle=100, session_lifetime=1000)
    start = svc.now
    svc.now = start + 49  # the write runs at start + 50
    svc.send(session, "ann")
    assert ends_at(svc, session) == start + 150
    # 5 s later the end would move by 5 s only: not worth a replicated row.
    svc.now = start + 54
    sums = svc.storage.checksums()["sessions"]
    svc.read(session)
    assert svc.storage.checksums()["sessions"] == sums
    assert live(svc, session, start + 149.9)
    assert not live(svc, session, start + 150)


def test_a_used_session_still_ends_at_its_lifetime(svc: Service) -> None:
    svc.register("ann")
    session = svc.login("ann", session_idle=100, session_lifetime=250)
    start = svc.now
    for step in range(1, 5):
        svc.now = start + 60 * step - 1
        svc.send(session, "ann")
    assert ends_at(svc, session) == start + 250
    assert live(svc, session, start + 249)
    assert not live(svc, session, start + 250)


# ---- the writer's session cache ------------------------------------------------------------


def test_the_writer_reads_a_busy_session_once(svc: Service, ann: str) -> None:
    """The cache answers: a session row changed behind the writer's back (nothing
    does that but a new reign or a batch undone) is seen only after ``reset``."""
    svc.send(ann, "ann")
    batch = svc.storage.begin_batch()
    batch.db.execute("UPDATE sessions SET ends_at = 0")
    batch.seal(1)
    batch.commit()
    svc.send(ann, "ann")
    svc.app.reset()
    with pytest.raises(AuthFailed, match="session has ended"):
        svc.send(ann, "ann")


def test_a_retried_login_ends_the_cached_first_token(svc: Service) -> None:
    svc.register("ann")
    first_hash = svc.login("ann", request_id="login-1")
    svc.send(first_hash, "ann")
    retry_hash = svc.login("ann", request_id="login-1")
    with pytest.raises(AuthFailed, match="session has ended"):
        svc.send(first_hash, "ann")
    svc.send(retry_hash, "ann")


def test_a_login_beyond_the_cap_ends_a_cached_session(svc: Service) -> None:
    svc.register("ann")
    oldest = svc.login("ann", session_cap=1)
    svc.send(oldest, "ann")
    newest = svc.login("ann", session_cap=1)
    with pytest.raises(AuthFailed, match="session has ended"):
        svc.send(oldest, "ann")
    svc.send(newest, "ann")


@pytest.mark.parametrize("op", ["logout", "delete_account"])
def test_ending_a_session_ends_it_in_the_cache(svc: Service, op: str) -> None:
    svc.register("ann")
    phone, laptop = svc.login("ann"), svc.login("ann")
    svc.send(phone, "ann")
    svc.send(laptop, "ann")
    svc.write(op, {}, phone)
    with pytest.raises(AuthFailed, match="session has ended"):
        svc.send(phone, "ann")
    if op == "delete_account":
        with pytest.raises(AuthFailed, match="session has ended"):
            svc.send(laptop, "ann")
    else:
        svc.send(laptop, "ann")


def test_a_refused_write_leaves_the_idle_clock_to_the_next_one(svc: Service) -> None:
    """A refresh rolled back with its refused write: the next write makes it."""
    svc.register("ann")
    session = svc.login("ann", session_idle=100, session_lifetime=1000)
    start = svc.now
    svc.send(session, "ann")  # cached; its end stays start + 100 (1 s: not due)
    svc.now = start + 49
    with pytest.raises(NotFound):
        svc.send(session, "nobody")  # due at start + 50: refreshed, then undone
    assert ends_at(svc, session) == start + 100
    svc.send(session, "ann")
    assert ends_at(svc, session) == start + 151
    svc.now = start + 120
    svc.send(session, "ann")


def test_the_session_cache_has_a_bound(svc: Service) -> None:
    svc.register("ann")
    sessions = [svc.login("ann") for _ in range(3)]
    svc.app.sessions.limit = 2
    for session in sessions:
        svc.send(session, "ann")
        assert len(svc.app.sessions) <= 2


def test_reads_tell_when_a_refresh_is_due_and_touch_does_it(svc: Service) -> None:
    svc.register("ann")
    session = svc.login("ann", session_idle=100, session_lifetime=1000)
    start = svc.now
    assert not chat.session_refresh_due(svc.db, session, start + 9)
    assert chat.session_refresh_due(svc.db, session, start + 10)
    assert not chat.session_refresh_due(svc.db, session, start + 100)  # ended: nothing to keep
    assert not chat.session_refresh_due(svc.db, None, start + 10)
    svc.now = start + 29
    assert svc.write("touch", {}, session) == {"user": "ann"}
    assert ends_at(svc, session) == start + 130
    assert not chat.session_refresh_due(svc.db, session, start + 30)
    svc.now = start + 200
    with pytest.raises(AuthFailed, match="session has ended"):
        svc.write("touch", {}, session)


def test_a_login_beyond_the_cap_ends_the_users_oldest_sessions(svc: Service) -> None:
    svc.register("ann")
    bob = svc.user("bob")
    first, second, third = (svc.login("ann", session_cap=3) for _ in range(3))
    assert all(live(svc, s, svc.now) for s in (first, second, third))
    fourth = svc.login("ann", session_cap=3)
    assert not live(svc, first, svc.now)
    assert all(live(svc, s, svc.now) for s in (second, third, fourth, bob))
    # A lower cap ends as many as needed; the new session always stays.
    fifth = svc.login("ann", session_cap=1)
    assert [live(svc, s, svc.now) for s in (second, third, fourth, fifth)] == [0, 0, 0, 1]
    assert svc.db.value("SELECT count(*) FROM sessions WHERE user_id = 1") == 1


def test_an_ended_session_does_not_count_against_the_cap(svc: Service) -> None:
    svc.register("ann")
    old = svc.login("ann", session_idle=10, session_cap=2)
    kept = svc.login("ann", session_idle=1000, session_cap=2)
    svc.now += 20  # old has ended
    new = svc.login("ann", session_cap=2)
    assert live(svc, kept, svc.now)
    assert live(svc, new, svc.now)
    assert svc.db.value("SELECT count(*) FROM sessions WHERE token_hash = ?", (old,)) == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("session_lifetime", 0),
        ("session_lifetime", -1.0),
        ("session_idle", True),
        ("session_idle", "60"),
        ("session_idle", float("inf")),
        ("session_cap", 0),
        ("session_cap", 1.5),
        ("session_cap", None),
        ("password_hash", ""),
    ],
)
def test_login_refuses_bad_session_limits(svc: Service, field: str, value: object) -> None:
    svc.register("ann")
    _, token_hash = chat.new_token()
    with pytest.raises(InvalidInput, match=field):
        svc.write(
            "login", {"username": "ann", "token_hash": token_hash, **SESSION_LIMITS, field: value}
        )
    assert svc.db.value("SELECT count(*) FROM sessions") == 0


def _prune_sessions(svc: Service, now: float, limit: int) -> int:
    batch = svc.storage.begin_batch()
    with batch.savepoint() as db:
        removed = chat.prune_sessions(db, now, limit)
    batch.seal(1)
    batch.commit()
    return removed


def test_prune_sessions_deletes_ended_sessions_longest_ended_first(svc: Service) -> None:
    svc.register("ann")
    start = svc.now
    sessions = [svc.login("ann", session_idle=10 * (i + 1)) for i in range(4)]
    # Logged in at start + 1..4, ending at start + 11, 22, 33, 44.
    assert _prune_sessions(svc, start + 30, limit=1) == 1
    assert [s for s in sessions if ends_at_or_none(svc, s)] == sessions[1:]
    assert _prune_sessions(svc, start + 30, limit=10) == 1
    assert _prune_sessions(svc, start + 30, limit=10) == 0
    assert all(live(svc, s, start + 30) for s in sessions[2:])


def ends_at_or_none(svc: Service, token_hash: str) -> float | None:
    value = svc.db.value("SELECT ends_at FROM sessions WHERE token_hash = ?", (token_hash,))
    return None if value is None else float(value)


def test_login_failures_do_not_say_whether_the_user_exists(svc: Service, ann: str) -> None:
    svc.write("delete_account", {}, ann)
    for name in ("nobody", "ann"):
        with pytest.raises(AuthFailed) as failure:
            svc.login(name)
        assert failure.value.message == "wrong username or password"


@pytest.mark.parametrize("token_hash", [None, "", "abc", "G" * 64, "A" * 64, 5])
def test_login_needs_a_token_hash(svc: Service, token_hash: object) -> None:
    svc.register("ann")
    with pytest.raises(InvalidInput, match="token_hash"):
        svc.write("login", {"username": "ann", "token_hash": token_hash, **SESSION_LIMITS})


def test_user_auth_finds_live_accounts_only(svc: Service, ann: str) -> None:
    svc.register("Bob")
    assert chat.user_auth(svc.db, "BOB") == (2, PASSWORD_HASH)
    assert chat.user_auth(svc.db, "nobody") is None
    svc.write("delete_account", {}, ann)
    assert chat.user_auth(svc.db, "ann") is None


def test_session_user_without_or_with_an_unknown_token(svc: Service) -> None:
    with pytest.raises(AuthFailed, match="not logged in"):
        chat.session_user(svc.db, None, svc.now)
    with pytest.raises(AuthFailed, match="your session has ended; log in again"):
        chat.session_user(svc.db, "0" * 64, svc.now)


def test_logout_ends_only_this_session(svc: Service, ann: str) -> None:
    other = svc.login("ann")
    assert svc.write("logout", {}, ann) == {"user": "ann"}
    with pytest.raises(AuthFailed, match="session has ended"):
        chat.whoami(svc.db, ann, svc.now)
    with pytest.raises(AuthFailed, match="session has ended"):
        svc.write("logout", {}, ann)
    assert chat.whoami(svc.db, other, svc.now)["user"] == "ann"


def test_whoami_reports_the_user_and_unread(svc: Service, ann: str, bob: str) -> None:
    svc.send(bob, "ann")
    assert chat.whoami(svc.db, ann, svc.now) == {"user": "ann", "user_id": 1, "unread": 1}
    with pytest.raises(AuthFailed):
        chat.whoami(svc.db, None, svc.now)


@pytest.mark.parametrize(
    ("op", "args"),
    [
        ("logout", {}),
        ("send", {"to": "ann", "body": "hi"}),
        ("read", {}),
        ("mark_read", {"ids": [1]}),
        ("delete_messages", {"ids": [1]}),
        ("delete_account", {}),
    ],
)
def test_session_operations_need_a_valid_token(
    svc: Service, ann: str, op: str, args: dict[str, Any]
) -> None:
    with pytest.raises(AuthFailed, match="not logged in"):
        svc.write(op, args, None)
    with pytest.raises(AuthFailed, match="session has ended"):
        svc.write(op, args, "f" * 64)


# ---- send --------------------------------------------------------------------------------


def test_send_returns_the_message_and_the_recipient(svc: Service, ann: str, bob: str) -> None:
    result = svc.write("send", {"to": "BOB", "body": "hello\nthere"}, ann)
    assert result == {
        "message": {
            "id": 1,
            "from": "ann",
            "to": "bob",
            "body": "hello\nthere",
            "sent_at": result["message"]["sent_at"],
            "read": False,
        },
        "recipient_id": 2,
    }
    assert isinstance(result["message"]["sent_at"], float)
    assert chat.whoami(svc.db, bob, svc.now)["unread"] == 1


def test_message_ids_grow_by_one(svc: Service, ann: str, bob: str) -> None:
    assert [svc.send(ann, "bob") for _ in range(3)] == [1, 2, 3]


def test_sending_to_yourself_is_a_note_to_self(svc: Service, ann: str) -> None:
    svc.send(ann, "ann", "remember the milk")
    assert [m["body"] for m in svc.read(ann)["messages"]] == ["remember the milk"]


def test_send_to_an_unknown_user(svc: Service, ann: str) -> None:
    with pytest.raises(NotFound, match="no user named carol"):
        svc.send(ann, "carol")


def test_send_to_a_deleted_account(svc: Service, ann: str, bob: str) -> None:
    svc.write("delete_account", {}, bob)
    with pytest.raises(Gone, match="the account bob was deleted"):
        svc.send(ann, "BOB")


def test_a_send_after_its_recipient_deleted_the_account_is_refused(
    svc: Service, ann: str, bob: str
) -> None:
    """The writer's cache keeps the accounts sends looked up; a deletion forgets them."""
    svc.send(ann, "bob")
    svc.write("delete_account", {}, bob)
    with pytest.raises(Gone, match="the account bob was deleted"):
        svc.send(ann, "bob")


def test_an_account_of_a_batch_rolled_back_is_not_found_again(svc: Service, ann: str) -> None:
    """A batch the writer rolls back whole takes the accounts it made with it."""
    batch = svc.storage.begin_batch()
    with batch.savepoint() as db:
        svc.app.apply_write(
            db,
            "register",
            {"username": "dan", "password_hash": PASSWORD_HASH},
            None,
            "d1",
            9e3,
            None,
        )
    svc.app.apply_write(batch.db, "send", {"to": "dan", "body": "hi"}, ann, "d2", 9e3, None)
    batch.rollback()
    svc.app.reset()  # as the writer does after a batch rolled back whole
    with pytest.raises(NotFound, match="no user named dan"):
        svc.send(ann, "dan")


@pytest.mark.parametrize(
    "args",
    [
        {"body": "hi"},
        {"to": "bob"},
        {"to": "", "body": "hi"},
        {"to": 2, "body": "hi"},
        {"to": "bob", "body": ""},
        {"to": "bob", "body": "x" * 4001},
        {"to": "bob", "body": "bell\x07"},
        {"to": "bob", "body": {"text": "hi"}},
        {"to": "bob", "body": "hi", "subject": "x"},
    ],
)
def test_send_refuses_bad_arguments(svc: Service, ann: str, bob: str, args: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput):
        svc.write("send", args, ann)
    assert svc.db.value("SELECT count(*) FROM messages") == 0


# ---- read --------------------------------------------------------------------------------


@pytest.fixture
def talk(svc: Service, ann: str, bob: str) -> dict[str, list[int]]:
    """ann and bob exchange messages; carol writes to ann once."""
    carol = svc.user("carol")
    ids: dict[str, list[int]] = {"ann_to_bob": [], "bob_to_ann": [], "carol_to_ann": []}
    for _ in range(3):
        ids["bob_to_ann"].append(svc.send(bob, "ann"))
        ids["ann_to_bob"].append(svc.send(ann, "bob"))
    ids["carol_to_ann"].append(svc.send(carol, "ann"))
    return ids


def test_read_inbox_newest_first_by_default(
    svc: Service, ann: str, talk: dict[str, list[int]]
) -> None:
    inbox = sorted(talk["bob_to_ann"] + talk["carol_to_ann"], reverse=True)
    assert svc.ids(ann) == inbox
    assert svc.ids(ann, oldest_first=True) == sorted(inbox)


def test_read_limit_and_more(svc: Service, ann: str, talk: dict[str, list[int]]) -> None:
    page = svc.read(ann, limit=2)
    assert len(page["messages"]) == 2
    assert page["more"] is True
    everything = svc.read(ann, limit=4)
    assert everything["more"] is False


def test_read_pages_by_message_id(svc: Service, ann: str, talk: dict[str, list[int]]) -> None:
    inbox = sorted(talk["bob_to_ann"] + talk["carol_to_ann"], reverse=True)
    first = svc.ids(ann, limit=2)
    assert first == inbox[:2]
    assert svc.ids(ann, limit=2, before=first[-1]) == inbox[2:4]
    assert svc.ids(ann, oldest_first=True, after=inbox[-1]) == sorted(inbox[:-1])
    assert svc.ids(ann, after=inbox[3], before=inbox[0]) == inbox[1:3]


def test_read_sent_box(svc: Service, ann: str, talk: dict[str, list[int]]) -> None:
    assert svc.ids(ann, box="sent") == sorted(talk["ann_to_bob"], reverse=True)


def test_read_with_shows_one_conversation_both_ways(
    svc: Service, ann: str, talk: dict[str, list[int]]
) -> None:
    both = sorted(talk["ann_to_bob"] + talk["bob_to_ann"])
    assert svc.ids(ann, **{"with": "BOB", "oldest_first": True}) == both


def test_read_from_one_sender(svc: Service, ann: str, talk: dict[str, list[int]]) -> None:
    assert svc.ids(ann, **{"from": "carol"}) == talk["carol_to_ann"]


def test_read_unread_only(svc: Service, ann: str, talk: dict[str, list[int]]) -> None:
    svc.read(ann, limit=2)
    inbox = sorted(talk["bob_to_ann"] + talk["carol_to_ann"], reverse=True)
    assert svc.ids(ann, unread=True) == inbox[2:]
    assert svc.ids(ann, unread=True) == []


def test_read_marks_shown_inbox_messages_read(
    svc: Service, ann: str, bob: str, talk: dict[str, list[int]]
) -> None:
    assert chat.whoami(svc.db, ann, svc.now)["unread"] == 4
    first = svc.read(ann, limit=1)["messages"]
    # ``read`` tells whether the message had been read before this request.
    assert [m["read"] for m in first] == [False]
    assert chat.whoami(svc.db, ann, svc.now)["unread"] == 3
    again = svc.read(ann, limit=1)["messages"]
    assert [m["read"] for m in again] == [True]


def test_reading_sent_messages_does_not_mark_them(
    svc: Service, ann: str, bob: str, talk: dict[str, list[int]]
) -> None:
    svc.read(ann, box="sent")
    assert chat.whoami(svc.db, bob, svc.now)["unread"] == 3
    assert all(not m["read"] for m in svc.read(ann, box="sent")["messages"])


def test_a_conversation_marks_only_what_the_reader_received(
    svc: Service, ann: str, bob: str, talk: dict[str, list[int]]
) -> None:
    svc.read(ann, **{"with": "bob"})
    assert chat.whoami(svc.db, ann, svc.now)["unread"] == 1  # carol's message
    assert chat.whoami(svc.db, bob, svc.now)["unread"] == 3


def test_read_excludes_deleted_messages(
    svc: Service, ann: str, bob: str, talk: dict[str, list[int]]
) -> None:
    gone = talk["bob_to_ann"][0]
    svc.write("delete_messages", {"ids": [gone]}, ann)
    assert gone not in svc.ids(ann, limit=100)
    assert gone not in svc.ids(bob, box="sent", limit=100)


@pytest.mark.parametrize("field", ["with", "from"])
def test_read_with_an_unknown_user(svc: Service, ann: str, field: str) -> None:
    with pytest.raises(NotFound, match="no user named zed"):
        svc.read(ann, **{field: "zed"})


@pytest.mark.parametrize(
    "args",
    [
        {"box": "outbox"},
        {"box": 1},
        {"limit": 0},
        {"limit": 1001},
        {"limit": "5"},
        {"limit": True},
        {"limit": 2.5},
        {"before": -1},
        {"after": "3"},
        {"unread": "yes"},
        {"oldest_first": 1},
        {"with": 5},
        {"from": ""},
        {"with": "bob", "from": "bob"},
        {"box": "sent", "from": "bob"},
        {"box": "sent", "with": "bob"},
        {"sent": True},
    ],
)
def test_read_refuses_bad_arguments(svc: Service, ann: str, bob: str, args: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput):
        svc.read(ann, **args)


def test_read_treats_null_options_as_absent(
    svc: Service, ann: str, talk: dict[str, list[int]]
) -> None:
    nulls = dict.fromkeys(("box", "with", "from", "unread", "limit", "before", "after"))
    assert svc.ids(ann, **nulls) == svc.ids(ann)


def test_read_limits_range(svc: Service, ann: str) -> None:
    for i in range(25):
        svc.send(ann, "ann", f"note {i}")
    assert len(svc.ids(ann)) == 20
    assert len(svc.ids(ann, limit=1000)) == 25


# ---- mark_read, backlog (listen) -----------------------------------------


def test_mark_read_marks_only_the_callers_unread_messages(
    svc: Service, ann: str, bob: str, talk: dict[str, list[int]]
) -> None:
    mine = talk["bob_to_ann"]
    theirs = talk["ann_to_bob"]
    result = svc.write("mark_read", {"ids": [*mine[:2], *theirs, 999]}, ann)
    assert result == {"marked": 2}
    assert chat.whoami(svc.db, ann, svc.now)["unread"] == 2
    assert chat.whoami(svc.db, bob, svc.now)["unread"] == 3
    assert svc.write("mark_read", {"ids": mine[:2]}, ann) == {"marked": 0}


@pytest.mark.parametrize(
    "ids", [[], None, "1", [1, "2"], [True], [0], [-3], [1.0], list(range(1, 1002))]
)
def test_id_lists_are_checked(svc: Service, ann: str, ids: object) -> None:
    for op in ("mark_read", "delete_messages"):
        with pytest.raises(InvalidInput, match="ids"):
            svc.write(op, {"ids": ids}, ann)


def test_backlog_is_the_unread_inbox_oldest_first(
    svc: Service, ann: str, talk: dict[str, list[int]]
) -> None:
    svc.read(ann, limit=1)  # marks the newest
    inbox = sorted(talk["bob_to_ann"] + talk["carol_to_ann"])
    assert backlog_ids(svc, None) == inbox[:-1]


def test_backlog_after_an_id_resumes_a_listen_stream(
    svc: Service, ann: str, talk: dict[str, list[int]]
) -> None:
    svc.read(ann, limit=100)  # everything read: resuming still shows what came later
    inbox = sorted(talk["bob_to_ann"] + talk["carol_to_ann"])
    assert backlog_ids(svc, inbox[1]) == inbox[2:]
    svc.write("delete_messages", {"ids": [inbox[-1]]}, ann)
    assert backlog_ids(svc, inbox[1]) == inbox[2:-1]


def backlog_ids(
    svc: Service, after: int | None, past: int = 0, upto: int | None = None
) -> list[int]:
    """The ids of ann's (user 1) backlog from ``past`` on, every page of it."""
    ids: list[int] = []
    following: int | None = past
    while following is not None:
        page, following = chat.backlog(svc.db, 1, after, following, upto)
        ids += [m["id"] for m in page]
    return ids


def test_the_backlog_comes_in_pages_past_an_id(
    svc: Service, ann: str, bob: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent = [
        svc.write("send", {"to": "ann", "body": f"n{i}"}, bob)["message"]["id"] for i in range(5)
    ]
    monkeypatch.setattr(chat, "BACKLOG_PAGE", 2)
    for after in (None, 0):
        pages: list[list[int]] = []
        following: int | None = 0
        while following is not None:
            page, following = chat.backlog(svc.db, 1, after, following)
            pages.append([m["id"] for m in page])
        assert pages == [sent[:2], sent[2:4], sent[4:]]
    assert backlog_ids(svc, sent[3], past=sent[1]) == [sent[4]]
    # Bounded by the newest message when the listen began: later ones are pushed.
    assert chat.newest_message_id(svc.db) == sent[4]
    assert backlog_ids(svc, None, past=sent[1], upto=sent[2]) == [sent[2]]


def test_the_backlog_has_the_pushed_shape(svc: Service, ann: str, bob: str) -> None:
    sent = svc.write("send", {"to": "ann", "body": "yo"}, bob)["message"]
    assert chat.backlog(svc.db, 1, 0) == ([sent], None)


# ---- delete messages ---------------------------------------------------------------------


@pytest.mark.parametrize("deleter", ["sender", "recipient"])
def test_either_participant_deletes_for_both(
    svc: Service, ann: str, bob: str, deleter: str
) -> None:
    message = svc.send(ann, "bob", "oops")
    token = ann if deleter == "sender" else bob
    assert svc.write("delete_messages", {"ids": [message]}, token) == {"deleted": [message]}
    assert svc.ids(ann, box="sent") == []
    assert svc.ids(bob) == []
    assert chat.whoami(svc.db, bob, svc.now)["unread"] == 0


def test_a_deleted_message_is_a_tombstone_and_its_id_is_never_reused(
    svc: Service, ann: str, bob: str
) -> None:
    message = svc.send(ann, "bob", "secret")
    svc.write("delete_messages", {"ids": [message]}, bob)
    row = svc.db.one("SELECT body, deleted_at FROM messages WHERE id = ?", (message,))
    assert row is not None
    assert row[0] == ""
    assert row[1] is not None
    assert svc.send(ann, "bob") == message + 1


def test_delete_is_all_or_nothing(svc: Service, ann: str, bob: str) -> None:
    carol = svc.user("carol")
    mine = svc.send(ann, "bob")
    not_mine = svc.send(carol, "bob")
    sums = svc.storage.checksums()
    with pytest.raises(NotFound, match=f"no message with id {not_mine}, 99") as failure:
        svc.write("delete_messages", {"ids": [99, mine, not_mine]}, ann)
    assert failure.value.details == {"ids": [not_mine, 99]}
    assert svc.storage.checksums() == sums


def test_deleting_twice_is_not_found(svc: Service, ann: str, bob: str) -> None:
    message = svc.send(ann, "bob")
    svc.write("delete_messages", {"ids": [message]}, ann)
    with pytest.raises(NotFound):
        svc.write("delete_messages", {"ids": [message]}, bob)


def test_delete_reports_sorted_unique_ids(svc: Service, ann: str, bob: str) -> None:
    first, second = svc.send(ann, "bob"), svc.send(bob, "ann")
    result = svc.write("delete_messages", {"ids": [second, first, second]}, ann)
    assert result == {"deleted": [first, second]}


# ---- delete account ----------------------------------------------------------------------


def test_delete_account(svc: Service, ann: str, bob: str) -> None:
    second_session = svc.login("ann")
    to_bob = svc.send(ann, "bob", "from ann")
    to_ann = svc.send(bob, "ann", "to ann")
    svc.send(ann, "ann", "note to self")
    assert svc.write("delete_account", {}, ann) == {"user": "ann", "deleted": True}

    # Every session ended; the hash is gone; login and sending fail clearly.
    for token in (ann, second_session):
        with pytest.raises(AuthFailed, match="session has ended"):
            chat.whoami(svc.db, token, svc.now)
    assert svc.db.value("SELECT count(*) FROM sessions WHERE user_id = 1") == 0
    assert svc.db.value("SELECT password_hash FROM users WHERE id = 1") == ""
    with pytest.raises(AuthFailed, match="wrong username or password"):
        svc.login("ann")
    with pytest.raises(Gone):
        svc.send(bob, "ann")

    # The inbox is tombstoned; what ann sent stays with bob and shows her name.
    live = svc.db.execute("SELECT id FROM messages WHERE deleted_at IS NULL")
    assert live == [(to_bob,)]
    assert to_ann not in svc.ids(bob, box="sent")
    assert [(m["from"], m["body"]) for m in svc.read(bob)["messages"]] == [("ann", "from ann")]
    assert chat.search(svc.db, bob, svc.now, None)["users"] == ["bob"]


def test_a_deleted_user_can_still_be_named_in_a_conversation(
    svc: Service, ann: str, bob: str
) -> None:
    svc.send(ann, "bob", "kept")
    svc.write("delete_account", {}, ann)
    assert [m["body"] for m in svc.read(bob, **{"with": "ann"})["messages"]] == ["kept"]


# ---- search ------------------------------------------------------------------------------


@pytest.fixture
def people(svc: Service) -> str:
    for name in ("alice", "Albert", "al", "bob", "Bobby", "a_b", "axb", "x1"):
        svc.register(name)
    return svc.login("bob")


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        (None, ["a_b", "al", "Albert", "alice", "axb", "bob", "Bobby", "x1"]),
        ("", ["a_b", "al", "Albert", "alice", "axb", "bob", "Bobby", "x1"]),
        ("al*", ["al", "Albert", "alice"]),
        ("AL*", ["al", "Albert", "alice"]),
        ("a?", ["al"]),
        ("a?b", ["a_b", "axb"]),
        ("a_b", ["a_b"]),
        ("*b*", ["a_b", "Albert", "axb", "bob", "Bobby"]),
        ("bob", ["bob"]),
        ("a%", []),
        ("[ab]*", []),
        ("zzz", []),
    ],
)
def test_search_glob(svc: Service, people: str, pattern: str | None, expected: list[str]) -> None:
    assert chat.search(svc.db, people, svc.now, pattern) == {"users": expected, "more": False}


def test_search_limit_and_more(svc: Service, people: str) -> None:
    assert chat.search(svc.db, people, svc.now, "*", 3) == {
        "users": ["a_b", "al", "Albert"],
        "more": True,
    }
    assert chat.search(svc.db, people, svc.now, "b*", 2)["more"] is False


def test_search_default_limit_is_50(svc: Service) -> None:
    for i in range(51):
        svc.register(f"user{i:02d}")
    token = svc.login("user00")
    result = chat.search(svc.db, token, svc.now, None)
    assert len(result["users"]) == 50
    assert result["more"] is True


def test_search_needs_a_session(svc: Service, people: str) -> None:
    with pytest.raises(AuthFailed):
        chat.search(svc.db, None, svc.now, "*")


@pytest.mark.parametrize(
    ("pattern", "limit"), [("x" * 101, 10), ("*", 0), ("*", 1001), ("*", "5"), (5, 10)]
)
def test_search_refuses_bad_arguments(svc: Service, people: str, pattern: Any, limit: Any) -> None:
    with pytest.raises(InvalidInput):
        chat.search(svc.db, people, svc.now, pattern, limit)


def _glob_at_once(svc: Service, pattern: str | None, limit: int) -> dict[str, Any]:
    """The search as one query over every name: what a scan by chunks must answer."""
    glob = (pattern or "*").lower().replace("[", "[[]")
    rows = svc.db.execute(
        "SELECT name FROM users WHERE deleted_at IS NULL AND name_key GLOB ? "
        "ORDER BY name_key LIMIT ?",
        (glob, limit + 1),
    )
    return {"users": [str(row[0]) for row in rows[:limit]], "more": len(rows) > limit}


def test_a_search_looks_at_a_chunk_of_names_per_step_and_answers_as_one_query(
    svc: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pattern that matches few names must not make one query look at all of them
    (a tenth of a second of the primary's loop at a million accounts): each step
    looks at ``SEARCH_CHUNK`` names at most, from the pattern's literal start on."""
    monkeypatch.setattr(chat, "SEARCH_CHUNK", 4)
    names = [f"{a}{b}{n}" for a in "AbC" for b in "xY" for n in range(6)]  # 36
    for name in names:
        svc.register(name)
    token = svc.login("Ax0")
    for gone in ("bx3", "bY0", "CY5"):
        svc.write("delete_account", {}, svc.login(gone))
    patterns = [None, "", "*", "b*", "B?1", "*y*", "*3", "c*5", "zz*", "*q*", "bx", "a%", "[b*"]
    for pattern in patterns:
        for limit in (1, 2, 5, 50):
            scan = chat.SearchScan(token, svc.now, pattern, limit)
            steps = 1
            while not scan.step(svc.db):
                steps += 1
            assert scan.result() == _glob_at_once(svc, pattern, limit), (pattern, limit)
            start = (pattern or "").lower().split("*")[0].split("?")[0]
            in_range = sum(name.lower().startswith(start) for name in names)
            # The chunks of names from the literal start on, and one more step when
            # the last chunk was full (the scan learns the range ended then).
            assert steps <= in_range // chat.SEARCH_CHUNK + 1, (pattern, limit, steps)
    scan = chat.SearchScan(token, svc.now, "*q*", 10)
    steps = 1
    while not scan.step(svc.db):
        steps += 1
    assert steps == len(names) // chat.SEARCH_CHUNK + 1


def test_a_search_sees_each_name_once_whatever_is_registered_between_its_steps(
    svc: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chat, "SEARCH_CHUNK", 2)
    for name in ("b1", "b2", "b3", "b4", "b5"):
        svc.register(name)
    token = svc.login("b1")
    scan = chat.SearchScan(token, svc.now, "*", 50)
    assert scan.step(svc.db) is False  # b1, b2
    svc.register("a1")  # behind the scan: a search a moment earlier would miss it too
    svc.register("b0")
    svc.register("c1")  # ahead of it
    while not scan.step(svc.db):
        pass
    assert scan.result() == {"users": ["b1", "b2", "b3", "b4", "b5", "c1"], "more": False}


def test_a_search_whose_session_ends_between_steps_is_refused(
    svc: Service, people: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chat, "SEARCH_CHUNK", 2)
    scan = chat.SearchScan(people, svc.now, "*", 50)
    assert scan.step(svc.db) is False
    svc.write("logout", {}, people)
    with pytest.raises(AuthFailed):
        scan.step(svc.db)


# ---- dispatch and idempotency ------------------------------------------------------------


def test_unknown_operation(svc: Service) -> None:
    with pytest.raises(InvalidInput, match="unknown operation 'fly'"):
        svc.write("fly", {})


@pytest.mark.parametrize("request_id", ["", "x" * 65])
def test_request_ids_have_a_size(svc: Service, ann: str, request_id: str) -> None:
    with pytest.raises(InvalidInput, match="request id"):
        chat.apply_write(svc.db, "logout", {}, ann, request_id, 1.0)


@pytest.mark.parametrize("args", [None, [], "x", 5])
def test_arguments_must_be_an_object(svc: Service, ann: str, args: Any) -> None:
    with pytest.raises(InvalidInput, match="object"):
        chat.apply_write(svc.db, "logout", args, ann, "r", 1.0)


GARBAGE: list[Any] = [None, True, 0, -1, 2.5, "", "x", [], [None], {}, {"a": 1}]


@pytest.mark.parametrize("op", sorted(chat.WRITE_HANDLERS))
def test_wrong_types_are_invalid_input_never_a_crash(svc: Service, ann: str, op: str) -> None:
    fields = sorted(chat.WRITE_HANDLERS[op][1])
    for field, junk in itertools.product(fields, GARBAGE):
        args = {field: junk}
        # Refused with a message is fine; any other exception fails the test.
        with contextlib.suppress(ChatError):
            svc.write(op, args, ann)


def test_a_retry_returns_the_first_result_and_changes_nothing(
    svc: Service, ann: str, bob: str
) -> None:
    first = svc.write("send", {"to": "bob", "body": "once"}, ann, request_id="req-1")
    sums = svc.storage.checksums()
    position = svc.storage.position()
    retry = svc.write("send", {"to": "bob", "body": "once"}, ann, request_id="req-1")
    assert retry == first
    assert svc.sealed[-1] is False
    assert svc.storage.checksums() == sums
    assert svc.storage.position() == position
    assert svc.db.value("SELECT count(*) FROM messages") == 1


def test_a_retried_read_shows_the_page_again_and_writes_nothing_more(
    svc: Service, ann: str, bob: str
) -> None:
    svc.send(bob, "ann")
    first = svc.write("read", {}, ann, request_id="read-1")
    assert first["messages"][0]["read"] is False
    sealed = len(svc.sealed)
    retry = svc.write("read", {}, ann, request_id="read-1")
    assert [m["id"] for m in retry["messages"]] == [m["id"] for m in first["messages"]]
    assert retry["messages"][0]["read"] is True
    assert svc.sealed[sealed:] == []


def test_read_results_are_never_stored(svc: Service, ann: str, bob: str) -> None:
    """A listing can be large: the replicated record of a read holds ids only."""
    for _ in range(3):
        svc.send(bob, "ann", "x" * 4000)
    svc.write("read", {"limit": 1000}, ann, request_id="big-read")
    stored = str(svc.db.value("SELECT result FROM requests WHERE request_id = 'big-read'"))
    assert "x" * 100 not in stored
    assert len(stored) < 100


def test_a_request_id_reused_for_another_operation(svc: Service, ann: str, bob: str) -> None:
    svc.write("send", {"to": "bob", "body": "x"}, ann, request_id="req-1")
    with pytest.raises(Conflict, match="request id req-1 was already used"):
        svc.write("delete_messages", {"ids": [1]}, ann, request_id="req-1")


def test_a_request_id_replays_only_for_its_caller(svc: Service, ann: str, bob: str) -> None:
    svc.write("mark_read", {"ids": [1]}, ann, request_id="guessable")
    with pytest.raises(Conflict):
        svc.write("mark_read", {"ids": [1]}, bob, request_id="guessable")


def test_a_failed_request_stores_nothing_and_may_be_retried(svc: Service, ann: str) -> None:
    with pytest.raises(NotFound):
        svc.write("send", {"to": "bob", "body": "x"}, ann, request_id="req-1")
    svc.register("bob")
    result = svc.write("send", {"to": "bob", "body": "x"}, ann, request_id="req-1")
    assert result["message"]["to"] == "bob"


def test_a_request_id_reused_with_other_arguments_is_a_conflict(
    svc: Service, ann: str, bob: str
) -> None:
    first = svc.write("send", {"to": "bob", "body": "first"}, ann, request_id="s1")
    sums = svc.storage.checksums()
    for other in ({"to": "bob", "body": "second"}, {"to": "ann", "body": "first"}):
        with pytest.raises(Conflict, match="other arguments"):
            svc.write("send", other, ann, request_id="s1")
    assert svc.storage.checksums() == sums
    # The same request again, with its members in another order: the first result.
    assert svc.write("send", {"body": "first", "to": "bob"}, ann, request_id="s1") == first


def test_a_fingerprint_is_canonical_and_leaves_out_passwords_and_server_fields() -> None:
    fp = chat.request_fingerprint
    assert fp("send", {"to": "bob", "body": "x"}) == fp("send", {"body": "x", "to": "bob"})
    assert fp("read", {"after": None, "limit": 5}) == fp("read", {"limit": 5})
    assert fp("read", {"limit": 5}) != fp("read", {"limit": 6})
    assert fp("read", {}) != fp("mark_read", {})
    client = fp("login", {"username": "ann", "password": "correct horse"})
    server = fp("login", {"username": "ann", "token_hash": "ab" * 32, **SESSION_LIMITS})
    assert client == server == fp("login", {"username": "ann", "password": "other"})
    assert client != fp("login", {"username": "Ann"})
    digest = hashlib.sha256(b'{"args":{"username":"ann"},"op":"login"}').hexdigest()
    assert client == digest


def test_a_read_marks_under_its_own_fingerprint(svc: Service, ann: str, bob: str) -> None:
    svc.send(bob, "ann")
    first = svc.write("read", {"limit": 5}, ann, request_id="rd")
    with pytest.raises(Conflict, match="other arguments"):
        svc.write("mark_read", {"ids": [first["messages"][0]["id"]]}, ann, request_id="rd")


def test_a_request_stored_before_fingerprints_replays_as_before(tmp_path: Path) -> None:
    """The v4 migration: a request stored by the code before it has no fingerprint,
    and its retry returns its result whatever its arguments, as it did then."""
    path = tmp_path / "v3.db"
    with contextlib.closing(sqlite3.connect(path)) as old:
        old.executescript("".join(schema_migrations(MIGRATIONS)[:3]))
        old.execute(
            "INSERT INTO requests VALUES ('old', 'logout', '{\"user\": \"ann\"}', "
            "'session:' || ?, 1000.0)",
            ("ab" * 32,),
        )
        old.execute("PRAGMA user_version=3")
        old.commit()
    storage = Storage(path, migrations=MIGRATIONS)
    try:
        assert storage.db.value("SELECT fingerprint FROM requests") == ""
        batch = storage.begin_batch()
        with batch.savepoint() as db:
            replay = chat.apply_write(db, "logout", {}, "ab" * 32, "old", 1001.0)
        batch.rollback()
        assert replay == {"user": "ann"}
    finally:
        storage.close()


def test_a_retried_register_returns_the_first_result(svc: Service) -> None:
    args = {"username": "ann", "password_hash": PASSWORD_HASH}
    first = svc.write("register", args, request_id="reg")
    assert svc.write("register", args, request_id="reg") == first
    with pytest.raises(Conflict):
        svc.write("register", {**args, "username": "bob"}, request_id="reg")


def test_a_retried_login_rotates_the_token(svc: Service) -> None:
    svc.register("ann")
    first_hash = svc.login("ann", request_id="login-1")
    retry_hash = svc.login("ann", request_id="login-1")
    assert retry_hash != first_hash
    with pytest.raises(AuthFailed, match="session has ended"):
        chat.session_user(svc.db, first_hash, svc.now)
    assert chat.session_user(svc.db, retry_hash, svc.now) == (1, "ann")
    assert svc.db.value("SELECT count(*) FROM sessions") == 1
    stored = svc.db.value("SELECT result FROM requests WHERE request_id = 'login-1'")
    assert first_hash not in stored
    assert retry_hash not in stored


def test_a_login_request_id_cannot_be_replayed_by_another_user(svc: Service) -> None:
    svc.register("ann")
    svc.register("mallory")
    ann_session = svc.login("ann", request_id="login-1")
    with pytest.raises(Conflict):
        svc.login("mallory", request_id="login-1")
    assert chat.session_user(svc.db, ann_session, svc.now) == (1, "ann")


@pytest.mark.parametrize("op", ["logout", "delete_account"])
def test_retries_after_the_session_ended_return_the_first_result(
    svc: Service, ann: str, op: str
) -> None:
    first = svc.write(op, {}, ann, request_id="end")
    sums = svc.storage.checksums()
    assert svc.write(op, {}, ann, request_id="end") == first
    assert svc.storage.checksums() == sums


# ---- request id retention ---------------------------------------------------------------


def _prune(svc: Service, before: float, limit: int) -> int:
    batch = svc.storage.begin_batch()
    with batch.savepoint() as db:
        removed = chat.prune_requests(db, before, limit)
    batch.seal(1)
    batch.commit()
    return removed


def test_prune_requests_forgets_only_ids_older_than_the_cutoff_oldest_first(
    svc: Service, ann: str
) -> None:
    svc.write("touch", {}, ann)
    svc.write("touch", {}, ann, request_id="keep-me")
    cutoff = float(svc.db.value("SELECT created_at FROM requests WHERE request_id = 'keep-me'"))
    stored = svc.db.value("SELECT count(*) FROM requests")
    older = svc.db.value("SELECT count(*) FROM requests WHERE created_at < ?", (cutoff,))
    assert older >= 2  # the registration and login of ann, then the first touch
    assert _prune(svc, before=cutoff, limit=1) == 1
    assert svc.db.value("SELECT count(*) FROM requests") == stored - 1
    assert _prune(svc, before=cutoff, limit=100) == older - 1
    assert svc.db.value("SELECT count(*) FROM requests WHERE request_id = 'keep-me'") == 1


def test_a_retry_within_retention_returns_the_first_result_after_pruning_older_ids(
    svc: Service, ann: str
) -> None:
    first = svc.write("send", {"to": "ann", "body": "once"}, ann, request_id="r-keep")
    _prune(svc, before=float(first["message"]["sent_at"]), limit=1000)
    again = svc.write("send", {"to": "ann", "body": "once"}, ann, request_id="r-keep")
    assert again == first
    assert svc.ids(ann) == [first["message"]["id"]]


def test_a_logged_out_session_replays_nothing(svc: Service, ann: str, bob: str) -> None:
    """A stolen, since logged-out token with an old request id gets no body back."""
    svc.write("send", {"to": "bob", "body": "secret plans"}, ann, request_id="send-1")
    svc.write("logout", {}, ann)
    with pytest.raises(AuthFailed, match="session has ended"):
        svc.write("send", {"to": "bob", "body": "secret plans"}, ann, request_id="send-1")


def test_a_deleted_message_is_not_kept_for_replays(svc: Service, ann: str, bob: str) -> None:
    first = svc.write("send", {"to": "bob", "body": "delete me"}, ann, request_id="send-1")
    assert svc.db.value("SELECT count(*) FROM requests WHERE request_id = 'send-1'") == 0
    svc.write("delete_messages", {"ids": [first["message"]["id"]]}, ann)
    replay = svc.write("send", {"to": "bob", "body": "delete me"}, ann, request_id="send-1")
    assert replay["message"]["id"] == first["message"]["id"]
    assert replay["message"]["body"] == ""


def test_a_send_is_one_replicated_row_and_replays_its_first_reply(
    svc: Service, ann: str, bob: str
) -> None:
    """The request is kept in the message row (no requests row), its id in 16 bytes,
    and a replay after the message was read still says what the first reply said."""
    request_id = "0123456789abcdef" * 2
    requests = svc.db.value("SELECT count(*) FROM requests")
    first = svc.write("send", {"to": "bob", "body": "once"}, ann, request_id=request_id)
    record = svc.storage.log_range(svc.storage.position().seq - 1, 1)[0]
    tables = {change.name for change in apsw.Changeset.iter(record.changeset)}
    assert tables == {"messages"}
    assert svc.db.value("SELECT count(*) FROM requests") == requests
    key, check = svc.db.one(
        "SELECT request_key, request_check FROM messages WHERE id = ?", (first["message"]["id"],)
    ) or (None, None)
    assert key == bytes.fromhex(request_id)
    assert len(check) == chat.CHECK_BYTES
    svc.read(bob)
    assert svc.write("send", {"to": "bob", "body": "once"}, ann, request_id=request_id) == first
    assert svc.db.value("SELECT count(*) FROM messages") == 1


def refresh_due(svc: Service) -> float:
    """A time at which a session made by ``svc.login`` before is due to move its idle
    clock on (its next write op changes the session row)."""
    return svc.now + SESSION_LIMITS["session_idle"] / chat.IDLE_REFRESH_FRACTION + 1


def sealed(batch: Batch) -> LogRecord:
    """Seal and commit ``batch``; its record."""
    record = batch.seal(1)
    batch.commit()
    assert record is not None
    return record


def tables_changed(record: LogRecord) -> set[str]:
    return {change.name for change in apsw.Changeset.iter(record.changeset)}


def test_a_refused_send_changes_nothing_in_its_batch(svc: Service, ann: str, bob: str) -> None:
    """The writer runs a send without a savepoint (``unguarded_bound``): every refusal
    comes before its first change, the session's idle clock included."""
    svc.write("delete_account", {}, svc.user("carl"))
    kept = svc.send(bob, "ann")
    svc.write("mark_read", {"ids": [kept]}, ann, request_id="taken")
    now = refresh_due(svc)
    refusals: list[tuple[dict[str, Any], str | None, str]] = [
        ({"to": "bob", "body": "hi"}, None, "refused-1"),
        ({"to": "bob", "body": "hi"}, "f" * 64, "refused-2"),
        ({"to": "nobody", "body": "hi"}, ann, "refused-3"),
        ({"to": "carl", "body": "hi"}, ann, "refused-4"),
        ({"to": "bob", "body": ""}, ann, "refused-5"),
        ({"to": "bob"}, ann, "refused-6"),
        ({"to": "bob", "body": "hi", "subject": "x"}, ann, "refused-7"),
        ({"to": "bob", "body": "hi"}, ann, "taken"),
    ]
    for args, token, request_id in refusals:
        batch = svc.storage.begin_batch()
        with pytest.raises(ChatError):
            svc.app.apply_write(batch.db, "send", args, token, request_id, now, None)
        assert batch.size() == 0, (args, token, request_id)
        batch.rollback()
    batch = svc.storage.begin_batch()
    svc.app.apply_write(batch.db, "send", {"to": "bob", "body": "hi"}, ann, "accepted", now, None)
    assert tables_changed(sealed(batch)) == {"messages", "sessions"}


def test_the_largest_send_stays_within_its_bound(svc: Service, ann: str) -> None:
    """What the writer checks against the record's budget before an unguarded send."""
    widest = "\U0001f600"  # four bytes in UTF-8
    batch = svc.storage.begin_batch()
    svc.app.apply_write(
        batch.db,
        "send",
        {"to": "ann", "body": widest * chat.MAX_BODY},
        ann,
        widest * MAX_REQUEST_ID,
        refresh_due(svc),
        None,
    )
    size = batch.size()
    record = sealed(batch)
    assert tables_changed(record) == {"messages", "sessions"}
    bound = svc.app.unguarded_bound("send")
    assert bound is not None
    assert len(record.changeset) <= size <= bound


def test_request_keys_tell_every_request_id_apart(svc: Service, ann: str) -> None:
    """Hex ids are kept as bytes, any other as text: never two ids for one key."""
    ids = ["00ff", "00FF", "0x00ff", "00f", "\x00\xff"]
    sent = [svc.write("send", {"to": "ann", "body": "x"}, ann, request_id=i) for i in ids]
    assert len({r["message"]["id"] for r in sent}) == len(ids)
    assert chat.request_key("00ff") == b"\x00\xff"
    assert chat.request_key("00FF") == "00FF"
    for request_id, first in zip(ids, sent, strict=True):
        assert svc.write("send", {"to": "ann", "body": "x"}, ann, request_id=request_id) == first


def test_a_send_id_is_refused_to_another_op_another_user_and_another_session(
    svc: Service, ann: str, bob: str
) -> None:
    first = svc.write("send", {"to": "bob", "body": "x"}, ann, request_id="s1")
    other_session = svc.login("ann")
    sums = svc.storage.checksums()
    with pytest.raises(Conflict, match="another operation"):
        svc.write("send", {"to": "bob", "body": "x"}, bob, request_id="s1")
    with pytest.raises(Conflict, match="another operation"):
        svc.write("mark_read", {"ids": [1]}, ann, request_id="s1")
    with pytest.raises(Conflict, match="another operation"):
        svc.write("logout", {}, ann, request_id="s1")
    with pytest.raises(Conflict, match="another session"):
        svc.write("send", {"to": "bob", "body": "x"}, other_session, request_id="s1")
    assert svc.storage.checksums() == sums
    # And the other way: an id kept in requests is refused to a send.
    svc.write("mark_read", {"ids": [first["message"]["id"]]}, bob, request_id="m1")
    with pytest.raises(Conflict, match="another operation"):
        svc.write("send", {"to": "ann", "body": "x"}, bob, request_id="m1")


def test_a_send_id_is_forgotten_after_the_request_retention(
    svc: Service, ann: str, bob: str
) -> None:
    first = svc.write("send", {"to": "bob", "body": "x"}, ann, request_id="s1")
    svc.now += svc.app.request_retention - 2  # the retry comes 1 s before the end
    assert svc.write("send", {"to": "bob", "body": "x"}, ann, request_id="s1") == first
    svc.now += 2
    again = svc.write("send", {"to": "bob", "body": "y"}, ann, request_id="s1")
    assert again["message"]["id"] != first["message"]["id"]
    # The newest message of the id is the one a retry finds.
    assert svc.write("send", {"to": "bob", "body": "y"}, ann, request_id="s1") == again
    with pytest.raises(Conflict, match="other arguments"):
        svc.write("send", {"to": "bob", "body": "x"}, ann, request_id="s1")


def _v4_database(path: Path) -> None:
    """A database as the code of schema v4 left it: ann (session ``"ab" * 32``) sent two
    messages to herself, each with a requests row, one in each form a send's result
    was stored in (its id; before that, the message without its body)."""
    caller = "session:" + "ab" * 32
    fingerprint = chat.request_fingerprint("send", {"to": "ann", "body": "old"})
    message = {"id": 2, "from": "ann", "to": "ann", "sent_at": 1000.0, "read": False}
    with contextlib.closing(sqlite3.connect(path)) as old:
        old.executescript("".join(schema_migrations(MIGRATIONS)[:4]))
        old.execute("INSERT INTO users VALUES (1, 'ann', 'ann', ?, 900.0, NULL)", (PASSWORD_HASH,))
        old.execute(
            "INSERT INTO sessions VALUES (?, 1, 'login', 900.0, 1e12, 1e12, 1e12)", ("ab" * 32,)
        )
        for message_id, result in (
            (1, {"message_id": 1}),
            (2, {"message": message, "recipient_id": 1}),
        ):
            old.execute(
                "INSERT INTO messages VALUES (?, 1, 1, 'old', 1000.0, NULL, NULL)", (message_id,)
            )
            old.execute(
                "INSERT INTO requests VALUES (?, 'send', ?, ?, 1000.0, ?)",
                (f"old-{message_id}", json.dumps(result), caller, fingerprint),
            )
        old.execute("PRAGMA user_version=4")
        old.commit()


def test_sends_stored_by_schema_v4_still_replay_after_the_migration(tmp_path: Path) -> None:
    path = tmp_path / "v4.db"
    _v4_database(path)
    svc = Service(Storage(path, migrations=MIGRATIONS))
    try:
        assert svc.db.value("SELECT count(*) FROM messages WHERE request_key IS NULL") == 2
        svc.now = 1010.0
        ann = "ab" * 32
        args = {"to": "ann", "body": "old"}
        for message_id in (1, 2):
            replay = svc.write("send", args, ann, request_id=f"old-{message_id}")
            assert replay["message"]["id"] == message_id
            assert replay["message"]["body"] == "old"
            with pytest.raises(Conflict, match="other arguments"):
                svc.write("send", {**args, "body": "new"}, ann, request_id=f"old-{message_id}")
        assert svc.db.value("SELECT count(*) FROM messages") == 2
        new = svc.write("send", args, ann, request_id="new")
        assert svc.write("send", args, ann, request_id="new") == new
    finally:
        svc.storage.close()


def test_a_delete_names_at_most_a_bounded_number_of_ids(svc: Service, ann: str) -> None:
    ids = list(range(1, chat.MAX_DELETE_IDS + 2))
    with pytest.raises(InvalidInput, match=f"1 to {chat.MAX_DELETE_IDS} message ids"):
        svc.write("delete_messages", {"ids": ids}, ann)
