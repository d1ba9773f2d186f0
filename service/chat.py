"""The chat rules (SPEC section 3) as deterministic functions over a storage ``Db``.

Theory of operation
-------------------
Nothing here touches sockets, clocks or apsw. The server passes the time
(``now``), and a write operation's whole effect is the rows it changes inside
the primary's batch, so every node ends with the same rows whatever order it
learns of them in. Work that must not hold the single writer is split out:
the server hashes and verifies passwords (``hash_password``; ``check_login``
on the answer of ``user_auth``, which costs the same for an unknown user) in a
thread, and makes session tokens (``new_token``), then calls the write
operation with the hashes only. A password hash records its scrypt parameters;
``check_login`` verifies with those and, when they are not the server's
current ones, returns a new hash, which ``login`` stores in the same write.

Sessions end. ``login`` stores, from the server's config, the absolute end
(``expires_at``), the idle timeout and the end the session has now
(``ends_at``, never past ``expires_at``); ``session_user`` compares ``ends_at``
with the ``now`` its caller passes, so the same rows and the same ``now`` give
the same answer on any node. A write that uses a session moves ``ends_at`` on
(``_use_session``) at most once per ``IDLE_REFRESH_FRACTION`` of the idle
timeout; reads cannot write, so the server asks ``session_refresh_due`` after
one and then runs ``touch``. ``prune_sessions`` deletes ended sessions inside
the primary's batches.

Requests
--------
Write operations go through ``apply_write``, which makes them idempotent: the
first result of a request id is stored in the same transaction as the change,
and a retry with the same id (after a timeout or a failover) returns it and
changes nothing more; a session that has ended replays nothing but the request
that ended it. With the result goes the request's *fingerprint*
(``request_fingerprint``: a hash of its op and of the arguments the client
sent), so a request id reused for other arguments is refused (``Conflict``)
instead of answered with a result that is not its own, as payment APIs treat
their idempotency keys.

Where the first result is kept depends on the op:

* a ``send`` keeps its request in its own message row (schema v5): the id as
  ``request_key`` (``request_key``: 16 bytes for a client's 32 hex digits) and
  ``request_check``, 8 bytes of a hash of the caller and the fingerprint
  (``request_check``). The result is the row itself: a replay reads it back
  (``_replay_sent``), so a deleted body replays empty and no copy of a body
  outlives its deletion. Sends are nearly all the writes, and a ``requests`` row
  per send cost more than its message (about 290 bytes with its two indexes,
  against 160, and as much again in the log): this way a message is one
  replicated row, 25 bytes wider, plus an entry of about 30 bytes in the partial
  index ``messages_by_request``. The id is forgotten when its message is older
  than ``request_retention`` (the lookup ignores it: nothing is written to
  forget it), so the index is not UNIQUE and the newest message of a key counts;
* every other write keeps a ``requests`` row (op, result, caller, fingerprint),
  deleted after ``request_retention`` by ``prune_requests``. Sends stored there
  before v5 still replay from it (``_replayed_send``) until pruned.

Every write looks its id up in both places, so an id is refused for another op
wherever its first use is kept.

Only successes are stored. A refused write changed nothing, and its retry may
rightly succeed (a ``send`` to a name registered since); storing refusals would
also cost a replicated row for every bad request.

``read`` is a query, not a write: its listing would make a replicated record of
up to 1,000 bodies. It returns the ids it shows unread, and the server marks
them with a ``mark_read`` write. Every write is bounded so that the record of
a batch stays within the stream's budget: at most ``MAX_DELETE_IDS`` bodies per
delete, and a deleted account's inbox tombstoned ``PURGE_CHUNK`` messages per
record (``purge_deleted_inboxes``), hidden from every read meanwhile.

Arguments are checked strictly: a missing field, a field of the wrong type or
an unknown field is ``InvalidInput``, never a ``KeyError`` or ``TypeError``. A
failed operation raises; the caller rolls back its savepoint, so nothing of it,
not even the request id, is stored. A ``send`` needs none: it refuses before its
first change (``ChatApplication.unguarded_bound``).

Decisions a user can see
------------------------
* Sending to yourself is allowed: a note to self lands in your own inbox.
* ``read`` lists newest first unless ``oldest_first``; ``limit`` takes the
  first messages of that order within the ``before``/``after`` id range. Each
  message's ``read`` says whether it had been read *before* this request, so a
  client can mark the new ones; the inbox messages shown are then marked read.
  ``unread`` keeps the messages their recipient has not read yet.
* A deleted message, or one that never existed, is "not found" to a later
  delete; all the ids of one request are deleted or none is.
* ``mark_read`` quietly skips ids that are not the caller's unread messages
  (``listen`` marks what it showed, and a message may have been deleted since).
* A search with no pattern, or an empty one, lists every account. Its
  pattern is lower-cased in ASCII only, so a non-ASCII character matches no name.
* A login beyond the user's ``session_cap`` live sessions ends the oldest ones
  (by login time); the new session always stays.
* Every name an operation looks up (``login``, ``send``'s ``to``, ``read``'s
  ``with`` and ``from``) is checked against the charset of names before it is
  lower-cased, so ``\u212aate`` (a Kelvin sign) is invalid, not ``kate``. A new
  name must also hold a letter or a digit and not start with ``-`` (so not
  ``-``, ``.``, ``..`` or ``_``); that rule is for registration only, so an
  account made before it can still log in and receive messages.

Invariants
----------
* Tokens and passwords are stored only as hashes.
* A user name's ``name_key`` (lower case) is unique over every account ever
  made, deleted ones included, so a name is never reused.
* Message ids come from the replicated ``messages`` table (``max + 1``) and a
  deleted message stays as a tombstone (empty body, ``deleted_at`` set), so ids
  are never reused and catch-up never brings a deleted message back.
* A stored request can be replayed only by the caller that made it (the same
  session, or for ``register``/``login`` the same user name), so a guessed
  request id reveals nothing and cannot take over another user's login.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import json
import math
import re
import secrets
import string
import unicodedata
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

import orjson

from .config import MAX_SCRYPT_N
from .errors import AuthFailed, ChatError, Conflict, Gone, Internal, InvalidInput, NotFound
from .protocol import MAX_REQUEST_ID, OPS, SESSION_ENDING_OPS, WRITE_OPS
from .replication.app import RateKind
from .storage import ConstraintViolation, Db
from .windows import Range, Windows, inbox, sent

MAX_USERNAME = 50
MIN_PASSWORD, MAX_PASSWORD = 8, 256
MAX_BODY = 4000
# The most one send adds to a replicated record (``unguarded_bound``): its message
# row (a body of MAX_BODY four-byte characters, a request id of MAX_REQUEST_ID of
# them, numbers), its session's row as the idle clock moves on (old and new values),
# and the changeset's framing, with room to spare.
SEND_RECORD_BOUND = 4 * (MAX_BODY + MAX_REQUEST_ID) + 2048
MAX_PATTERN = 100
MAX_LIMIT = 1000
MAX_IDS = 1000
# A delete writes each message's old body into the replicated record (so a rewind
# can undo it): at most 100 bodies of 4000 four-byte characters, 1.6 MB, keep one
# request far inside the record budget of the replication stream.
MAX_DELETE_IDS = 100
# The bodies of one read reply add up to at most this many bytes (see read).
READ_REPLY_BYTES = 2 * 1024 * 1024
# An account's inbox is tombstoned this many messages per record (the rest in the
# following batches, see purge_deleted_inboxes), for the same reason.
PURGE_CHUNK = 64
DEFAULT_READ_LIMIT = 20
DEFAULT_SEARCH_LIMIT = 50
MAX_HASH = 512

SCRYPT_SALT_BYTES, SCRYPT_KEY_BYTES = 16, 32

# A session's idle clock moves on at most once per this fraction of its idle timeout.
IDLE_REFRESH_FRACTION = 10
MAX_SESSION_SECONDS = 100 * 365 * 86400.0
MAX_SESSION_CAP = 10_000

GENERIC_LOGIN_FAILURE = "wrong username or password"
SESSION_ENDED = "your session has ended; log in again"
NOT_LOGGED_IN = "you are not logged in; log in first"

# The end a session gets when used at ``?`` (now), and whether moving it there is due.
_SESSION_END = "min(expires_at, ? + idle_timeout)"
_REFRESH_DUE = f"{_SESSION_END} - ends_at >= idle_timeout / {IDLE_REFRESH_FRACTION}"
_USERNAME = re.compile(r"[A-Za-z0-9_.\-]+")
_HAS_ALNUM = re.compile(r"[A-Za-z0-9]")
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_TOKEN_HASH = re.compile(r"[0-9a-f]{64}")
_BODY_CONTROLS_ALLOWED = frozenset("\n\t")

Args = dict[str, Any]
Result = dict[str, Any]
WriteOp = Callable[[Db, float, Args, str | None, str, "Sessions"], Result]


# ---- passwords, tokens, validation -----------------------------------------------------


@dataclass(frozen=True)
class ScryptParams:
    """scrypt's cost. A hash string records the parameters it was made with, so a
    change of cost applies to new hashes and to old ones at their next login."""

    n: int = 2**17
    r: int = 8
    p: int = 1

    @property
    def memory(self) -> int:
        """The bytes scrypt allocates (OpenSSL's own count), plus slack for its checks."""
        return 128 * self.r * (self.n + 2 + self.p) + 2**20

    def plausible(self) -> bool:
        # A stored hash is ours, but its cost decides how much memory we give it.
        return (
            2 <= self.n <= MAX_SCRYPT_N
            and self.n & (self.n - 1) == 0
            and 0 < self.r <= 32
            and 0 < self.p <= 16
        )


DEFAULT_SCRYPT = ScryptParams()


@dataclass(frozen=True)
class LoginCheck:
    """What the server learns from a password check: whether it matched, and the
    hash to store instead when the stored one was made with other parameters."""

    ok: bool
    new_hash: str | None = None


def hash_password(password: str, params: ScryptParams = DEFAULT_SCRYPT) -> str:
    """A salted scrypt hash: ``scrypt$n$r$p$salt_hex$key_hex`` (slow on purpose)."""
    salt = secrets.token_bytes(SCRYPT_SALT_BYTES)
    key = _scrypt(password, salt, params)
    return f"scrypt${params.n}${params.r}${params.p}${salt.hex()}${key.hex()}"


def hash_params(stored: str) -> ScryptParams | None:
    """The parameters a ``hash_password`` string was made with; None if it is not one."""
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt" or not all(x.isdigit() for x in parts[1:4]):
        return None
    params = ScryptParams(int(parts[1]), int(parts[2]), int(parts[3]))
    return params if params.plausible() else None


def verify_password(password: str, stored: str) -> bool:
    """Constant-time check of ``password`` against a ``hash_password`` string,
    computed with the parameters the string records."""
    params = hash_params(stored)
    if params is None:
        return False
    try:
        salt_hex, key_hex = stored.split("$")[4:]
        salt, expected = bytes.fromhex(salt_hex), bytes.fromhex(key_hex)
        if not expected:
            return False
        key = _scrypt(password, salt, params, len(expected))
    except ValueError:
        return False
    return hmac.compare_digest(key, expected)


def check_login(
    password: str, auth: tuple[int, str] | None, params: ScryptParams = DEFAULT_SCRYPT
) -> LoginCheck:
    """``verify_password`` for a ``user_auth`` answer, and the rehash when due.

    An unknown user costs the same time as a wrong password (a dummy hash at the
    current parameters), so the delay does not tell whether the user exists. A
    right password under other parameters is hashed again with ``params``: the
    login stores it, and the account moves to the current cost.
    """
    if auth is None:
        verify_password(password, _dummy_hash(params))
        return LoginCheck(False)
    if not verify_password(password, auth[1]):
        return LoginCheck(False)
    if hash_params(auth[1]) == params:
        return LoginCheck(True)
    return LoginCheck(True, hash_password(password, params))


@functools.cache
def _dummy_hash(params: ScryptParams) -> str:
    return hash_password(secrets.token_hex(16), params)


def _scrypt(
    password: str, salt: bytes, params: ScryptParams, length: int = SCRYPT_KEY_BYTES
) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8", "surrogatepass"),
        salt=salt,
        n=params.n,
        r=params.r,
        p=params.p,
        maxmem=params.memory,
        dklen=length,
    )


def new_token() -> tuple[str, str]:
    """A fresh session token and the hash under which it is stored."""
    token = secrets.token_urlsafe(32)
    return token, hash_token(token)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def validate_name(name: object, field: str = "username") -> str:
    """A user name as it may appear anywhere: the SPEC's ASCII charset, 1 to 50 long.

    Every lookup goes through this before lower-casing (``_name_key``): Python's
    ``lower`` maps some non-ASCII characters to ASCII letters (the Kelvin sign
    U+212A to ``k``), which would let an invalid spelling reach an account."""
    if not isinstance(name, str):
        raise InvalidInput(f"the field '{field}' must be a user name")
    if not 1 <= len(name) <= MAX_USERNAME or not _USERNAME.fullmatch(name):
        raise InvalidInput(
            f"the field '{field}' is not a user name: a user name has 1 to {MAX_USERNAME} "
            "characters among A-Z a-z 0-9 _ . -"
        )
    return name


def validate_username(name: object) -> str:
    """A new account's name: ``validate_name``, and not made only of ``_ . -`` nor
    starting with ``-`` (it would read as an option, or as a path like ``..``).
    Applied at registration only, so an older account with such a name can still
    log in and be written to."""
    name = validate_name(name)
    if not _HAS_ALNUM.search(name) or name.startswith("-"):
        raise InvalidInput("a username needs a letter or a digit and may not start with '-'")
    return name


def validate_password(password: object) -> str:
    if not isinstance(password, str):
        raise InvalidInput("the password must be a string")
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise InvalidInput(f"a password has {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    return password


def validate_body(body: object) -> str:
    if not isinstance(body, str):
        raise InvalidInput("the message body must be a string")
    if not 1 <= len(body) <= MAX_BODY:
        raise InvalidInput(f"a message has 1 to {MAX_BODY} characters")
    if body.isprintable():
        # No control character and no surrogate (a fast path: most bodies).
        return body
    for char in body:
        # Control characters other than newline and tab; a lone surrogate is not text.
        if char not in _BODY_CONTROLS_ALLOWED and unicodedata.category(char) in ("Cc", "Cs"):
            raise InvalidInput(f"a message may not contain the control character U+{ord(char):04X}")
    return body


def _name_key(name: object, field: str = "username") -> str:
    """The unique key of a name: validated first (see ``validate_name``), then lower case."""
    return validate_name(name, field).lower()


# ---- argument checks ---------------------------------------------------------------------


def _optional(args: Args, field: str, default: Any) -> Any:
    """An optional field's value; JSON null counts as absent."""
    value = args.get(field)
    return default if value is None else value


def _required_str(args: Args, field: str) -> str:
    value = args.get(field)
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"the field '{field}' must be a non-empty string")
    return value


def _optional_str(args: Args, field: str) -> str | None:
    return None if args.get(field) is None else _required_str(args, field)


def _bool(args: Args, field: str) -> bool:
    value = _optional(args, field, False)
    if not isinstance(value, bool):
        raise InvalidInput(f"the field '{field}' must be true or false")
    return value


def _int(value: object, field: str, low: int, high: int) -> int:
    # bool is an int in Python but never a count or an id on the wire.
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidInput(f"the field '{field}' must be a whole number from {low} to {high}")
    return value


def _optional_id(args: Args, field: str) -> int | None:
    value = args.get(field)
    return None if value is None else _int(value, field, 0, 2**63 - 1)


def _ids(args: Args, most: int = MAX_IDS) -> list[int]:
    ids = args.get("ids")
    if not isinstance(ids, list) or not 1 <= len(ids) <= most:
        raise InvalidInput(f"the field 'ids' must be a list of 1 to {most} message ids")
    return sorted({_int(i, "ids", 1, 2**63 - 1) for i in ids})


def _token_hash_arg(args: Args) -> str:
    value = args.get("token_hash")
    if not isinstance(value, str) or not _TOKEN_HASH.fullmatch(value):
        raise InvalidInput("the field 'token_hash' must be 64 lower-case hex digits")
    return value


def _seconds_arg(args: Args, field: str) -> float:
    value = args.get(field)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 < value <= MAX_SESSION_SECONDS
    ):
        raise InvalidInput(f"the field '{field}' must be a number of seconds")
    return float(value)


def _password_hash_arg(args: Args) -> str:
    value = args.get("password_hash")
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_HASH:
        raise InvalidInput("the field 'password_hash' must be a password hash")
    return value


# ---- lookups -----------------------------------------------------------------------------


def session_user(db: Db, token_hash: str | None, now: float) -> tuple[int, str]:
    """The (user_id, name) of a session live at ``now``, or AuthFailed."""
    if token_hash is None:
        raise AuthFailed(NOT_LOGGED_IN)
    row = db.one(
        "SELECT u.id, u.name FROM sessions s JOIN users u ON u.id = s.user_id "
        "WHERE s.token_hash = ? AND s.ends_at > ? AND u.deleted_at IS NULL",
        (token_hash, now),
    )
    if row is None:
        raise AuthFailed(SESSION_ENDED)
    return int(row[0]), str(row[1])


def session_refresh_due(db: Db, token_hash: str | None, now: float) -> bool:
    """Whether the session's idle clock is due a refresh (see ``_use_session``); for
    the server, after a read that used the session."""
    if token_hash is None:
        return False
    due = db.value(
        f"SELECT {_REFRESH_DUE} FROM sessions WHERE token_hash = ? AND ends_at > ?",
        (now, token_hash, now),
    )
    return bool(due)


def _use_session(db: Db, token_hash: str | None, now: float) -> tuple[int, str]:
    """``session_user`` for a write op, which also moves the session's idle clock on.

    Only when due (once per ``idle_timeout / IDLE_REFRESH_FRACTION``), so a busy
    user costs no extra replicated row per request; the price is that a session may
    end up to that fraction early after its last use."""
    user = session_user(db, token_hash, now)
    db.execute(
        f"UPDATE sessions SET ends_at = {_SESSION_END} WHERE token_hash = ? AND {_REFRESH_DUE}",
        (now, token_hash, now),
    )
    return user


class Sessions:
    """How a write finds its session: ``user`` (``session_user``) and ``use`` (also
    moves the idle clock on, ``_use_session``). This one asks the database each
    time; the primary's writer uses ``SessionCache``."""

    def user(self, db: Db, token_hash: str | None, now: float) -> tuple[int, str]:
        return session_user(db, token_hash, now)

    def use(self, db: Db, token_hash: str | None, now: float) -> tuple[int, str]:
        return _use_session(db, token_hash, now)

    def account(self, db: Db, name: str, field: str) -> tuple[int, str, bool]:
        """``_find_user``: (id, stored name, deleted) of the account ``name``."""
        return _find_user(db, name, field)

    def forget(self) -> None:
        """Sessions and accounts may have changed without this object seeing it."""


UNCACHED = Sessions()


@dataclass(frozen=True)
class _SessionRow:
    user_id: int
    name: str
    expires_at: float
    idle_timeout: float
    ends_at: float


class SessionCache(Sessions):
    """The sessions the writer has read, so that a busy session costs no query per write.

    Every write checks its session, and nearly all of them find it unchanged: the
    cache keeps each live session's row (with its user's name) as the writer read
    it, and answers ``user``/``use`` from it, with the same rules as the queries
    (``ends_at > now``; the idle clock moves on when ``_REFRESH_DUE`` holds).

    Invariant: an entry equals its row in the writer's open transaction. So:

    * an entry is dropped as soon as its row is written here (the idle clock
      moving on: the row is read again the next time);
    * the whole cache is forgotten after an operation that ends sessions, renames
      a token or deletes an account (``login``, ``logout``, ``delete_account``,
      replays included), after ``prune_sessions`` deleted rows, and whenever the
      database may have changed without the writer (``ChatApplication.reset``: a
      batch rolled back whole, a new reign after rows came from another primary);
    * a savepoint rolled back after its read changes nothing: a read only caches
      what the transaction already held, and a write drops the entry.

    Misses are not cached: a session that does not exist costs one query, as before.

    It keeps the accounts a send looked up by name too (``account``: id, stored
    name, deleted), under the same invariant: an account's row stays (a deleted
    one is a tombstone, and its name stays taken), and of what is kept only
    ``deleted`` changes, by ``delete_account``, after which the whole cache is
    forgotten, accounts included.
    """

    def __init__(self, limit: int = 65_536) -> None:
        self.limit = limit
        self._rows: dict[str, _SessionRow] = {}
        self._accounts: dict[str, tuple[int, str, bool]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def forget(self) -> None:
        self._rows.clear()
        self._accounts.clear()

    def account(self, db: Db, name: str, field: str) -> tuple[int, str, bool]:
        key = _name_key(name, field)
        found = self._accounts.get(key)
        if found is None:
            found = _account_by_key(db, key, name)
            if len(self._accounts) >= self.limit:
                self._accounts.clear()
            self._accounts[key] = found
        return found

    def owner(self, token_hash: str) -> int | None:
        """The account of a session the writer has read (None: not read, or forgotten)."""
        row = self._rows.get(token_hash)
        return row.user_id if row is not None else None

    def user(self, db: Db, token_hash: str | None, now: float) -> tuple[int, str]:
        row = self._live(db, token_hash, now)
        return row.user_id, row.name

    def use(self, db: Db, token_hash: str | None, now: float) -> tuple[int, str]:
        row = self._live(db, token_hash, now)
        # _REFRESH_DUE in Python: the same IEEE doubles, the same answer as SQLite's.
        due = min(row.expires_at, now + row.idle_timeout) - row.ends_at >= (
            row.idle_timeout / IDLE_REFRESH_FRACTION
        )
        if due:
            assert token_hash is not None
            self._rows.pop(token_hash, None)
            _use_session(db, token_hash, now)
        return row.user_id, row.name

    def _live(self, db: Db, token_hash: str | None, now: float) -> _SessionRow:
        if token_hash is None:
            raise AuthFailed(NOT_LOGGED_IN)
        row = self._rows.get(token_hash)
        if row is None:
            found = db.one(
                "SELECT s.user_id, u.name, s.expires_at, s.idle_timeout, s.ends_at "
                "FROM sessions s JOIN users u ON u.id = s.user_id "
                "WHERE s.token_hash = ? AND u.deleted_at IS NULL",
                (token_hash,),
            )
            if found is None:
                raise AuthFailed(SESSION_ENDED)
            row = _SessionRow(
                int(found[0]), str(found[1]), float(found[2]), float(found[3]), float(found[4])
            )
            if len(self._rows) >= self.limit:
                self._rows.clear()
            self._rows[token_hash] = row
        if not row.ends_at > now:
            raise AuthFailed(SESSION_ENDED)
        return row


# The keys of ``ChatApplication.share_key`` that are no account (accounts are ints).
NO_SESSION = "no session"
UNKNOWN_SESSION = "unknown session"


def session_owner(db: Db, token_hash: str) -> Hashable:
    """The account that holds the session ``token_hash``, live or not; or UNKNOWN_SESSION."""
    found = db.value("SELECT user_id FROM sessions WHERE token_hash = ?", (token_hash,))
    return int(found) if found is not None else UNKNOWN_SESSION


def user_auth(db: Db, username: str) -> tuple[int, str] | None:
    """(user_id, password_hash) of a live account, for the server to verify a password.

    A string that is not a user name is InvalidInput: no account can have it, so
    saying so tells nothing about which accounts exist."""
    if not isinstance(username, str):
        return None
    row = db.one(
        "SELECT id, password_hash FROM users WHERE name_key = ? AND deleted_at IS NULL",
        (_name_key(username),),
    )
    return None if row is None else (int(row[0]), str(row[1]))


def _find_user(db: Db, name: str, field: str) -> tuple[int, str, bool]:
    """(id, stored name, deleted) of any account, deleted ones included, or NotFound."""
    return _account_by_key(db, _name_key(name, field), name)


def _account_by_key(db: Db, key: str, name: str) -> tuple[int, str, bool]:
    row = db.one("SELECT id, name, deleted_at IS NOT NULL FROM users WHERE name_key = ?", (key,))
    if row is None:
        raise NotFound(f"no user named {name}")
    return int(row[0]), str(row[1]), bool(row[2])


class UnreadCount:
    """An account's unread messages, counted a window of its inbox per step
    (``service/windows.py``): an inbox may hold millions."""

    def __init__(self, user_id: int) -> None:
        self.user_id = user_id
        self.count = 0
        self._windows = Windows([[inbox(user_id)]], ascending=True)

    def step(self, db: Db) -> bool:
        """Count the next window; True once every window is counted."""
        window, params, _ = self._windows.next(db)
        self.count += int(
            db.value(
                "SELECT count(*) FROM messages m INDEXED BY messages_by_recipient "
                f"WHERE m.recipient_id = ? AND {window} "
                "AND m.read_at IS NULL AND m.deleted_at IS NULL",
                [self.user_id, *params],
                default=0,
            )
        )
        return self._windows.done


def _at_once(db: Db, step: Callable[[Db], bool]) -> None:
    """Run a scan's steps to its end in one go (tests, and callers with no loop)."""
    while not step(db):
        pass


def unread_count(db: Db, user_id: int) -> int:
    """``UnreadCount`` at once."""
    counter = UnreadCount(user_id)
    _at_once(db, counter.step)
    return counter.count


_MESSAGE_COLUMNS = (
    "SELECT m.id, s.name, r.name, m.body, m.sent_at, m.read_at IS NOT NULL FROM messages m"
)
_MESSAGE_JOINS = " JOIN users s ON s.id = m.sender_id JOIN users r ON r.id = m.recipient_id "


# What a read selects, one way (a term of ``service/windows.py``): the account
# columns of its messages and their values ({"recipient_id": 1, "sender_id": 2}).
TermColumns = dict[str, int]


def _term_ranges(term: TermColumns) -> list[Range]:
    return [inbox(v) if column == "recipient_id" else sent(v) for column, v in term.items()]


def _window_messages(
    db: Db, terms: list[TermColumns], where: str, windows: Windows, limit: int
) -> list[Result]:
    """The messages of the next window of ``windows``, in its order, at most ``limit``:
    each term read through the index of the range the window chose for it (the other
    columns written ``+m.column``, which no index serves), with ``where`` besides."""
    window, window_params, chosen = windows.next(db)
    selects, values = [], []
    for term, through in zip(terms, chosen, strict=True):
        conditions = [f"m.{through.column} = ?"]
        values.append(through.account)
        for column, account in term.items():
            if column != through.column:
                conditions.append(f"+m.{column} = ?")
                values.append(account)
        selects.append(
            f"{_MESSAGE_COLUMNS} INDEXED BY {through.index}{_MESSAGE_JOINS}"
            f"WHERE {' AND '.join(conditions)} AND {where} AND {window}"
        )
        values += window_params
    order = "" if windows.ascending else " DESC"
    rows = db.execute(f"{' UNION ALL '.join(selects)} ORDER BY 1{order} LIMIT ?", [*values, limit])
    return [_message_dict(r[0], r[1], r[2], r[3], r[4], read=bool(r[5])) for r in rows]


def _message_dict(
    message_id: int, sender: str, recipient: str, body: str, sent_at: float, read: bool
) -> Result:
    """A message as every reply and push shows it."""
    return {
        "id": message_id,
        "from": sender,
        "to": recipient,
        "body": body,
        "sent_at": sent_at,
        "read": read,
    }


# ---- read operations ---------------------------------------------------------------------


def whoami(db: Db, token_hash: str | None, now: float) -> Result:
    """``WhoamiScan`` at once."""
    scan = WhoamiScan(token_hash, now)
    _at_once(db, scan.step)
    return scan.result()


class WhoamiScan:
    """``whoami``: the session's account and its unread count, a window of its inbox
    per step; the session is checked in every step (a logout midway ends it)."""

    def __init__(self, token_hash: str | None, now: float) -> None:
        self._token_hash, self._now = token_hash, now
        self._user: tuple[int, str] | None = None
        self._count: UnreadCount | None = None

    def step(self, db: Db) -> bool:
        self._user = session_user(db, self._token_hash, self._now)
        if self._count is None:
            self._count = UnreadCount(self._user[0])
        return self._count.step(db)

    def result(self) -> Result:
        assert self._user is not None, "whoami has not run"
        assert self._count is not None
        return {"user": self._user[1], "user_id": self._user[0], "unread": self._count.count}


def search(
    db: Db, token_hash: str | None, now: float, pattern: str | None, limit: int | None = None
) -> Result:
    """Live accounts whose name matches a ``*``/``?`` glob, without regard to case: a
    ``SearchScan`` run to its end at once (the node runs it a chunk per turn)."""
    scan = SearchScan(token_hash, now, pattern, limit)
    _at_once(db, scan.step)
    return scan.result()


# A search looks at this many names per query; enough that one turn's query finds
# a page of names in any ordinary directory, few enough (about 1 ms) to keep the
# loop turning.
SEARCH_CHUNK = 2048


class SearchScan:
    """A search run a chunk of ``SEARCH_CHUNK`` names at a time, in name order.

    A pattern that matches few names (``*q*z*``) makes SQLite look at every name:
    about 0.1 µs each here, so a tenth of a second at a million accounts, during
    which the primary's event loop would neither write, nor answer, nor send a
    heartbeat. Run as a keyset scan, one chunk per read turn, it costs each turn a
    millisecond at most and other accounts' reads take turns with it.

    The scan resumes after the last name it looked at, so a name is seen once
    whatever is registered meanwhile; one registered, or deleted, behind the scan
    while it runs may or may not be listed, as with any search a moment earlier or
    later. The pattern's literal start (before its first ``*`` or ``?``) bounds the
    range, so ``al*`` looks only at names from ``al``."""

    def __init__(self, token_hash: str | None, now: float, pattern: object, limit: object) -> None:
        self._token_hash, self._now = token_hash, now
        self._pattern, self._limit = pattern, limit
        self._glob: str | None = None  # checked in the first step, after the session
        self._after: str | None = None  # the last name key looked at
        self._low = self._high = ""  # the keys from the literal start, and past them
        self._users: list[str] = []
        self._want = 0
        self._done = False

    def step(self, db: Db) -> bool:
        """Look at the next chunk of names; True once the search has its answer."""
        session_user(db, self._token_hash, self._now)
        if self._glob is None:
            self._start()
        assert self._glob is not None
        if self._after is None:
            bound, after = ">=", self._low
        else:
            bound, after = ">", self._after
        chunk = (
            f"SELECT name, name_key, deleted_at FROM users WHERE name_key {bound} ? "
            "AND name_key < ? ORDER BY name_key LIMIT ?"
        )
        rows = db.execute(
            f"SELECT name FROM ({chunk}) WHERE deleted_at IS NULL AND name_key GLOB ? "
            "ORDER BY name_key LIMIT ?",
            (after, self._high, SEARCH_CHUNK, self._glob, self._want - len(self._users)),
        )
        self._users.extend(str(row[0]) for row in rows)
        if len(self._users) >= self._want:
            self._done = True
            return True
        last = db.one(
            f"SELECT name_key FROM users WHERE name_key {bound} ? AND name_key < ? "
            "ORDER BY name_key LIMIT 1 OFFSET ?",
            (after, self._high, SEARCH_CHUNK - 1),
        )
        if last is None:  # the chunk was the range's last
            self._done = True
        else:
            self._after = str(last[0])
        return self._done

    def _start(self) -> None:
        pattern = self._pattern
        if pattern is not None and not isinstance(pattern, str):
            raise InvalidInput("the search pattern must be a string")
        if pattern is not None and len(pattern) > MAX_PATTERN:
            raise InvalidInput(f"a search pattern has at most {MAX_PATTERN} characters")
        limit = self._limit
        self._want = 1 + _int(
            DEFAULT_SEARCH_LIMIT if limit is None else limit, "limit", 1, MAX_LIMIT
        )
        # GLOB on the lower-cased key; '[' is GLOB's only other special character. Only
        # ASCII is lower-cased: str.lower() would turn a Kelvin sign into a 'k'.
        lowered = (pattern or "*").translate(_ASCII_LOWER)
        self._glob = lowered.replace("[", "[[]")
        # Every name key is made of ASCII below DEL: those starting with the literal
        # start sort before it followed by DEL.
        self._low = lowered.split("*", 1)[0].split("?", 1)[0]
        self._high = self._low + "\x7f"

    def result(self) -> Result:
        assert self._done, "the search has not run to its end"
        limit = self._want - 1
        return {"users": self._users[:limit], "more": len(self._users) > limit}


# ``listen`` reads its backlog this many messages at a time (at most about 1 MiB
# of bodies): an inbox may hold any number, and one read of all of them held the
# primary's event loop for seconds and their bodies in memory at once.
BACKLOG_PAGE = 256


def backlog(
    db: Db, user_id: int, after: int | None, past: int = 0, upto: int | None = None
) -> tuple[list[Result], int | None]:
    """One page of what ``listen`` shows first, oldest first, ids above ``past``
    and up to ``upto``: unread messages, or (given ``after``) every message after
    ``after``; and the ``past`` of the next page, None when none follows.

    A page holds at most ``BACKLOG_PAGE`` messages, from one window of the inbox
    (``service/windows.py``): an inbox of millions read long ago has a backlog of
    none, found a window per page, not in one query.

    ``upto`` is ``newest_message_id`` when the listen began: a later message is
    pushed to the stream when it commits, never read here, so that one marked read
    elsewhere meanwhile is not skipped by a later page."""
    start = max(after, past) if after is not None else past
    stop = None if upto is None else upto + 1
    windows = Windows([[inbox(user_id)]], ascending=True, start=start, stop=stop)
    if windows.done:
        return [], None
    where = "m.deleted_at IS NULL" + ("" if after is not None else " AND m.read_at IS NULL")
    page = _window_messages(db, [{"recipient_id": user_id}], where, windows, BACKLOG_PAGE)
    if len(page) == BACKLOG_PAGE:
        return page, int(page[-1]["id"])
    return page, None if windows.done else windows.cursor


def newest_message_id(db: Db) -> int:
    """The id of the newest message (0: none), the bound of a listen's backlog."""
    return int(db.value("SELECT max(id) FROM messages", default=0) or 0)


# ---- write operations --------------------------------------------------------------------


def register(
    db: Db,
    now: float,
    args: Args,
    token_hash: str | None,
    request_id: str,
    sessions: Sessions = UNCACHED,
) -> Result:
    name = validate_username(args.get("username"))
    password_hash = _password_hash_arg(args)
    # Deleted accounts still hold their name_key: a name is never reused.
    if db.one("SELECT 1 FROM users WHERE name_key = ?", (_name_key(name),)) is not None:
        raise Conflict(f"the username {name} is taken")
    try:
        row = db.one(
            "INSERT INTO users(name, name_key, password_hash, created_at) "
            "VALUES (?, ?, ?, ?) RETURNING id",
            (name, _name_key(name), password_hash, now),
        )
    except ConstraintViolation:
        raise Conflict(f"the username {name} is taken") from None
    assert row is not None
    return {"user": name, "user_id": int(row[0])}


def login(
    db: Db,
    now: float,
    args: Args,
    token_hash: str | None,
    request_id: str,
    sessions: Sessions = UNCACHED,
) -> Result:
    """Open a session; the server has already checked the password.

    The server passes the session limits of its config, and a new ``password_hash``
    when the stored one was made with other scrypt parameters: it replaces the old
    one in this same write. Beyond ``session_cap`` live sessions, the user's oldest
    ones end."""
    name = _required_str(args, "username")
    new_hash = _token_hash_arg(args)
    lifetime = _seconds_arg(args, "session_lifetime")
    idle = _seconds_arg(args, "session_idle")
    cap = _int(args.get("session_cap"), "session_cap", 1, MAX_SESSION_CAP)
    rehash = None if args.get("password_hash") is None else _password_hash_arg(args)
    row = db.one(
        "SELECT id, name FROM users WHERE name_key = ? AND deleted_at IS NULL",
        (_name_key(name),),
    )
    if row is None:
        raise AuthFailed(GENERIC_LOGIN_FAILURE)
    user_id, stored_name = int(row[0]), str(row[1])
    if rehash is not None:
        db.execute("UPDATE users SET password_hash = ? WHERE id = ?", (rehash, user_id))
    db.execute(
        "INSERT INTO sessions(token_hash, user_id, request_id, created_at, expires_at, "
        "idle_timeout, ends_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (new_hash, user_id, request_id, now, now + lifetime, idle, now + min(lifetime, idle)),
    )
    _end_surplus_sessions(db, user_id, new_hash, now, cap)
    # The unread count is the server's to add, read before the write: counted here
    # it would hold the writer's batch as long as a large inbox takes.
    return {"user": stored_name, "user_id": user_id}


def _end_surplus_sessions(db: Db, user_id: int, kept: str, now: float, cap: int) -> None:
    """Delete the user's ended sessions, then the oldest live ones beyond ``cap``
    (``kept``, the new one, counts as one of them and always stays)."""
    db.execute("DELETE FROM sessions WHERE user_id = ? AND ends_at <= ?", (user_id, now))
    db.execute(
        "DELETE FROM sessions WHERE token_hash IN (SELECT token_hash FROM sessions "
        "WHERE user_id = ? AND token_hash != ? ORDER BY created_at DESC, token_hash DESC "
        "LIMIT -1 OFFSET ?)",
        (user_id, kept, cap - 1),
    )


def touch(
    db: Db,
    now: float,
    args: Args,
    token_hash: str | None,
    request_id: str,
    sessions: Sessions = UNCACHED,
) -> Result:
    """Keep a session alive: its idle clock moves on, when due, as with any write."""
    _, name = sessions.use(db, token_hash, now)
    return {"user": name}


def logout(
    db: Db,
    now: float,
    args: Args,
    token_hash: str | None,
    request_id: str,
    sessions: Sessions = UNCACHED,
) -> Result:
    _, name = sessions.user(db, token_hash, now)
    db.execute("DELETE FROM sessions WHERE token_hash = ?", (token_hash,))
    return {"user": name}


def send(
    db: Db,
    now: float,
    args: Args,
    token_hash: str | None,
    request_id: str,
    sessions: Sessions = UNCACHED,
    check: bytes | None = None,
    key: bytes | str | None = None,
) -> Result:
    """A new message; its row also keeps the request (see "Requests" above): the key
    of ``request_id`` (``key``, when the caller has it already) and ``check`` (by
    default the one of ``args`` as the client sent them, for the caller of
    ``token_hash``).

    Every check that can refuse it comes before its first change (the session's
    idle clock, then the message): the writer runs a send without a savepoint
    (``ChatApplication.unguarded_bound``)."""
    sessions.user(db, token_hash, now)  # the caller first: no other refusal before it
    to = _required_str(args, "to")
    body = validate_body(args.get("body"))
    recipient_id, recipient, deleted = sessions.account(db, to, "to")
    if deleted:
        raise Gone(f"the account {recipient} was deleted")
    if check is None:
        check = request_check(
            request_caller("send", args, token_hash), request_fingerprint("send", args)
        )
    sender_id, sender = sessions.use(db, token_hash, now)
    row = db.one(
        "INSERT INTO messages(sender_id, recipient_id, body, sent_at, request_key, request_check) "
        "VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
        (
            sender_id,
            recipient_id,
            body,
            now,
            request_key(request_id) if key is None else key,
            check,
        ),
    )
    assert row is not None
    # The row as a read would show it, without reading it back.
    message = _message_dict(row[0], sender, recipient, body, now, read=False)
    return {"message": message, "recipient_id": recipient_id}


READ_FIELDS = frozenset(
    {"box", "with", "from", "unread", "limit", "before", "after", "oldest_first"}
)


def read(db: Db, token_hash: str | None, args: Args, now: float) -> tuple[Result, list[int]]:
    """List messages (see the module docstring for the order): a query, not a write;
    ``ReadScan`` at once.

    Returns the reply and the ids of the inbox messages it shows that are unread:
    the server marks those read with a small ``mark_read`` write of their ids, so
    the replicated record holds ids, never the listing (a listing of 1,000 long
    messages would not fit in one record of the replication stream)."""
    scan = ReadScan(token_hash, now, args)
    _at_once(db, scan.step)
    return scan.result()


class ReadScan:
    """A ``read`` run a window of the account's messages per step
    (``service/windows.py``), newest first unless ``oldest_first``, until it has
    ``limit`` messages and one more (to say ``more``) or has passed every window.

    A message that changes while the scan runs is shown as it was when its window
    was read; one that arrives meanwhile is shown if the scan has not passed its
    id yet, as a read a moment earlier or later would."""

    def __init__(self, token_hash: str | None, now: float, args: Args) -> None:
        self._token_hash, self._now, self._args = token_hash, now, args
        self._filter: _ReadFilter | None = None  # made in the first step
        self._found: list[Result] = []

    def step(self, db: Db) -> bool:
        """Read the next window; True once the read has its answer."""
        if self._filter is None:
            args = self._args
            if not isinstance(args, dict):
                raise InvalidInput("the arguments must be an object")
            unknown = sorted(set(args) - READ_FIELDS)
            if unknown:
                raise InvalidInput(f"unknown field '{unknown[0]}' for read")
            user_id, _ = session_user(db, self._token_hash, self._now)
            self._filter = _read_filter(db, args, user_id)
        else:
            session_user(db, self._token_hash, self._now)
        scan = self._filter
        windows = scan.windows
        if not windows.done:
            self._found += _window_messages(
                db, scan.terms, scan.where, windows, scan.limit + 1 - len(self._found)
            )
        return len(self._found) > scan.limit or windows.done

    def result(self) -> tuple[Result, list[int]]:
        """The reply, and the ids of the inbox messages it shows that were unread."""
        assert self._filter is not None, "the read has not run"
        found = self._found
        shown = _within_reply_budget(found[: self._filter.limit])
        to_mark = [m["id"] for m in shown if not m["read"]] if self._filter.marks else []
        return {"messages": shown, "more": len(found) > len(shown)}, to_mark


def _within_reply_budget(messages: list[Result]) -> list[Result]:
    """The first messages whose bodies fit READ_REPLY_BYTES (at least one): a reply
    must fit a frame a client takes, so a page of long messages ends early and says
    ``more``; the client pages on with ``before``/``after``."""
    size = 0
    for count, message in enumerate(messages):
        size += len(message["body"].encode("utf-8", "surrogatepass"))
        if size > READ_REPLY_BYTES and count:
            return messages[:count]
    return messages


@dataclasses.dataclass
class _ReadFilter:
    """What a read selects: its terms (``TermColumns``), ``where`` on ``m`` besides
    them and the ids, whether the inbox messages shown become read, how many it
    shows at most, and its scan's windows."""

    terms: list[TermColumns]
    where: str
    marks: bool
    limit: int
    windows: Windows


def _read_filter(db: Db, args: Args, user_id: int) -> _ReadFilter:
    box = _optional(args, "box", "inbox")
    if box not in ("inbox", "sent"):
        raise InvalidInput("the field 'box' must be 'inbox' or 'sent'")
    with_name, from_name = _optional_str(args, "with"), _optional_str(args, "from")
    if box == "sent" and (with_name is not None or from_name is not None):
        raise InvalidInput("'with' and 'from' cannot be combined with the sent box")
    if with_name is not None and from_name is not None:
        raise InvalidInput("use either 'with' or 'from', not both")
    terms: list[TermColumns]
    if with_name is not None:
        other = _find_user(db, with_name, "with")[0]
        terms = [{"recipient_id": user_id, "sender_id": other}]
        if other != user_id:  # notes to self are one term
            terms.append({"sender_id": user_id, "recipient_id": other})
    elif box == "sent":
        terms = [{"sender_id": user_id}]
    elif from_name is not None:
        terms = [{"recipient_id": user_id, "sender_id": _find_user(db, from_name, "from")[0]}]
    else:
        terms = [{"recipient_id": user_id}]
    # A deleted account's inbox is gone for its senders too, even before the purge
    # has tombstoned every message of it (purge_deleted_inboxes).
    conditions = ["m.deleted_at IS NULL", "r.deleted_at IS NULL"]
    if _bool(args, "unread"):
        conditions.append("m.read_at IS NULL")
    before, after = _optional_id(args, "before"), _optional_id(args, "after")
    limit = _int(_optional(args, "limit", DEFAULT_READ_LIMIT), "limit", 1, MAX_LIMIT)
    ranges = [_term_ranges(term) for term in terms]
    if _bool(args, "oldest_first"):
        windows = Windows(ranges, ascending=True, start=after, stop=before)
    else:
        windows = Windows(ranges, ascending=False, start=before, stop=after)
    return _ReadFilter(terms, " AND ".join(conditions), box != "sent", limit, windows)


def _mark_read(db: Db, user_id: int, ids: list[int], now: float) -> int:
    if not ids:
        return 0
    marks = ",".join("?" * len(ids))
    db.execute(
        f"UPDATE messages SET read_at = ? WHERE id IN ({marks}) "
        "AND recipient_id = ? AND read_at IS NULL AND deleted_at IS NULL",
        [now, *ids, user_id],
    )
    return db.changes()


def prune_requests(db: Db, before: float, limit: int) -> int:
    """Forget up to ``limit`` request ids stored before ``before``.

    A request id protects a retry of the same request (after a timeout or a
    failover), which comes within seconds; an id kept for ever would only grow
    the database. The primary runs this inside an ordinary batch, so the
    deletions replicate like any write and every node forgets the same ids.
    """
    db.execute(
        "DELETE FROM requests WHERE request_id IN "
        "(SELECT request_id FROM requests WHERE created_at < ? ORDER BY created_at LIMIT ?)",
        (before, limit),
    )
    return db.changes()


def prune_sessions(db: Db, now: float, limit: int) -> int:
    """Delete up to ``limit`` sessions that ended by ``now``, the longest ended first.

    An ended session is refused anyway (``session_user`` compares with ``now``);
    this only keeps the table small. Like ``prune_requests`` it runs inside the
    primary's batches, with the batch's clock, so every node deletes the same rows."""
    db.execute(
        "DELETE FROM sessions WHERE token_hash IN "
        "(SELECT token_hash FROM sessions WHERE ends_at <= ? ORDER BY ends_at LIMIT ?)",
        (now, limit),
    )
    return db.changes()


def mark_read(
    db: Db,
    now: float,
    args: Args,
    token_hash: str | None,
    request_id: str,
    sessions: Sessions = UNCACHED,
) -> Result:
    user_id, _ = sessions.use(db, token_hash, now)
    return {"marked": _mark_read(db, user_id, _ids(args), now)}


def delete_messages(
    db: Db,
    now: float,
    args: Args,
    token_hash: str | None,
    request_id: str,
    sessions: Sessions = UNCACHED,
) -> Result:
    """Tombstone messages the caller sent or received: all of them, or none."""
    user_id, _ = sessions.use(db, token_hash, now)
    ids = _ids(args, MAX_DELETE_IDS)
    marks = ",".join("?" * len(ids))
    found = {
        int(row[0])
        for row in db.execute(
            f"SELECT id FROM messages WHERE id IN ({marks}) AND deleted_at IS NULL "
            "AND (sender_id = ? OR recipient_id = ?)",
            [*ids, user_id, user_id],
        )
    }
    missing = [i for i in ids if i not in found]
    if missing:
        listed = ", ".join(str(i) for i in missing)
        raise NotFound(f"you have no message with id {listed}", ids=missing)
    db.execute(f"UPDATE messages SET body = '', deleted_at = ? WHERE id IN ({marks})", [now, *ids])
    return {"deleted": ids}


def delete_account(
    db: Db,
    now: float,
    args: Args,
    token_hash: str | None,
    request_id: str,
    sessions: Sessions = UNCACHED,
) -> Result:
    """End every session, empty the inbox; messages already sent stay with their readers."""
    user_id, name = sessions.user(db, token_hash, now)
    db.execute("UPDATE users SET deleted_at = ?, password_hash = '' WHERE id = ?", (now, user_id))
    db.execute("DELETE FROM sessions WHERE user_id = ?", (user_id,))
    # The inbox may be large: it is tombstoned PURGE_CHUNK messages per record (the
    # rest by the primary's purge, ChatApplication.purge), and hidden from every read
    # from now on (_read_filter).
    _tombstone_window(db, user_id, 0, now, PURGE_SCAN, PURGE_CHUNK)
    return {"user": name, "deleted": True}


# A purge looks at this many of an inbox's messages (tombstones included) and
# account ids (in its sweep) together at most in one batch.
PURGE_SCAN = 4096


def _tombstone_window(
    db: Db, user_id: int, after: int, now: float, scan: int, limit: int
) -> tuple[int, int, int | None]:
    """Tombstone up to ``limit`` live messages among the next ``scan`` of the inbox
    after the id ``after``. Returns how many it looked at, how many it tombstoned,
    and the id the inbox is tombstoned up to (None: all of it is)."""
    ids = db.execute(
        "SELECT id FROM messages INDEXED BY messages_by_recipient "
        "WHERE recipient_id = ? AND id > ? ORDER BY id LIMIT ?",
        (user_id, after, scan),
    )
    if not ids:
        return 0, 0, None
    last = int(ids[-1][0])
    changed = db.execute(
        "UPDATE messages SET body = '', deleted_at = ? WHERE id IN (SELECT id FROM messages "
        "INDEXED BY messages_by_recipient WHERE recipient_id = ? AND id > ? AND id <= ? "
        "AND deleted_at IS NULL ORDER BY id LIMIT ?) RETURNING id",
        (now, user_id, after, last, limit),
    )
    if len(changed) == limit:  # perhaps more live ones before `last`
        return len(ids), len(changed), max(int(row[0]) for row in changed)
    return len(ids), len(changed), last if len(ids) == scan else None


@dataclass
class PurgeWork:
    """What the primary has left to tombstone of deleted accounts' inboxes, between
    its batches: each inbox to go on with and the id it is done up to, and how far
    the sweep for those an earlier reign left has looked (None: no sweep due).

    Kept in memory so that a batch goes on where the one before stopped: finding the
    next live message of an inbox from its start walked past every tombstone made
    before it, so purging an inbox took time growing with its square (60,000
    messages: 4.9 s of batches, the last ones 7 ms each; a million: minutes), and
    every batch looked through every deleted account's inbox again."""

    inboxes: dict[int, int] = dataclass_field(default_factory=dict)
    sweep: int | None = 0

    def due(self) -> bool:
        return bool(self.inboxes) or self.sweep is not None

    def restart(self) -> None:
        """Forget what was known; the sweep finds every inbox left."""
        self.inboxes.clear()
        self.sweep = 0


def purge_deleted_inboxes(db: Db, now: float, work: PurgeWork, limit: int = PURGE_CHUNK) -> bool:
    """Tombstone up to ``limit`` messages still in deleted accounts' inboxes, looking
    at ``PURGE_SCAN`` messages, and account ids with what is left of that, at most;
    whether work is left.

    The primary runs this inside an ordinary batch while work is left (after an
    account deletion, and on becoming primary, when the sweep looks through every
    account for inboxes an earlier reign left), so the tombstones replicate like
    any write."""
    budget, left = PURGE_SCAN, limit
    while work.inboxes and budget > 0 and left > 0:
        user_id, after = next(iter(work.inboxes.items()))
        if not db.value("SELECT deleted_at IS NOT NULL FROM users WHERE id = ?", (user_id,)):
            # A delete_account undone after it was noted (its savepoint rolled back
            # when the record was full): the account lives, its inbox stays.
            del work.inboxes[user_id]
            continue
        looked, done, upto = _tombstone_window(db, user_id, after, now, budget, left)
        budget, left = budget - looked - 1, left - done
        if upto is None:
            del work.inboxes[user_id]
        else:
            work.inboxes[user_id] = upto
    if work.sweep is not None and budget > 0:
        start, end = work.sweep, work.sweep + budget
        for (user_id,) in db.execute(
            "SELECT id FROM users WHERE id > ? AND id <= ? AND deleted_at IS NOT NULL",
            (start, end),
        ):
            work.inboxes.setdefault(int(user_id), 0)
        newest = int(db.value("SELECT max(id) FROM users", default=0) or 0)
        work.sweep = None if end >= newest else end
    return work.due()


# ---- dispatch ----------------------------------------------------------------------------

# The handler and the arguments of each of ``protocol.WRITE_OPS`` (a unit test holds
# the two to the same names).
WRITE_HANDLERS: dict[str, tuple[WriteOp, frozenset[str]]] = {
    "register": (register, frozenset({"username", "password_hash"})),
    "login": (
        login,
        frozenset(
            {
                "username",
                "token_hash",
                "password_hash",
                "session_lifetime",
                "session_idle",
                "session_cap",
            }
        ),
    ),
    "logout": (logout, frozenset()),
    "send": (send, frozenset({"to", "body"})),
    "mark_read": (mark_read, frozenset({"ids"})),
    "delete_messages": (delete_messages, frozenset({"ids"})),
    "delete_account": (delete_account, frozenset()),
    "touch": (touch, frozenset()),
}

# Operations without a session: a stored result belongs to the user name they name.
_BY_NAME = frozenset(op for op in WRITE_OPS if not OPS[op].session)
# What a client sends of the operations whose arguments the server completes (hashes,
# session limits): only these count for the fingerprint.
_CLIENT_FIELDS = {"register": frozenset({"username"}), "login": frozenset({"username"})}
# Operations that end their own session; their stored results hold no content.
_ENDS_SESSION = SESSION_ENDING_OPS
# Operations after which a SessionCache starts again: they end sessions, delete an
# account or give a session a new token hash (a retried login).
_CHANGES_SESSIONS = frozenset({"login", *SESSION_ENDING_OPS})


def request_caller(op: str, args: Args, token_hash: str | None) -> str:
    """Who made a request: only the same caller may replay its stored result."""
    if op in _BY_NAME:
        return "user:" + _name_key(_required_str(args, "username"))
    if token_hash is None:
        raise AuthFailed(NOT_LOGGED_IN)
    return "session:" + token_hash


def request_fingerprint(op: str, args: Args) -> str:
    """What a retry under the same request id must repeat: the sha256 of the canonical
    JSON (sorted keys, null members dropped since null means absent) of ``op`` and
    the arguments the client sent.

    The same request gives the same fingerprint on any node, so it holds across a
    failover. A password is never part of it: a fast hash of a password in a
    replicated table is a dictionary attack away from the password itself
    (``register`` and ``login`` are bound to their user name by ``request_caller``)."""
    kept = _CLIENT_FIELDS.get(op)
    fields = {k: v for k, v in args.items() if v is not None and (kept is None or k in kept)}
    text = orjson.dumps({"op": op, "args": fields}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(text).hexdigest()


def apply_write(
    db: Db,
    op: str,
    args: Args,
    token_hash: str | None,
    request_id: str,
    now: float,
    fingerprint: str | None = None,
    sessions: Sessions = UNCACHED,
    retention: float = math.inf,
) -> Result:
    """Run one write operation once per request id (see the module docstring).

    ``fingerprint`` is the request's as the client made it, when the server wrote
    other arguments for it (the marks of a ``read``); by default it is ``op``'s and
    ``args``' own. ``sessions`` finds the caller's session (the writer's cache).
    ``retention``: a send's request id is forgotten once its message is that many
    seconds old (``requests`` rows are forgotten by ``prune_requests``)."""
    request = _Request(request_id, now, fingerprint, retention)
    if op in _CHANGES_SESSIONS:
        try:
            return _apply_write(db, op, args, token_hash, request, sessions)
        finally:
            # Applied, replayed or refused: this op may have changed sessions.
            sessions.forget()
    return _apply_write(db, op, args, token_hash, request, sessions)


@dataclass(frozen=True)
class _Request:
    """What ``apply_write`` knows of a request besides its op and arguments."""

    id: str
    now: float
    fingerprint: str | None
    retention: float


def _apply_write(
    db: Db, op: str, args: Args, token_hash: str | None, request: _Request, sessions: Sessions
) -> Result:
    request_id, now = request.id, request.now
    if op not in WRITE_HANDLERS:
        raise InvalidInput(f"unknown operation {op!r}")
    if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_REQUEST_ID:
        raise InvalidInput(f"a request id has 1 to {MAX_REQUEST_ID} characters")
    if not isinstance(args, dict):
        raise InvalidInput("the arguments must be an object")
    handler, fields = WRITE_HANDLERS[op]
    unknown = sorted(set(args) - fields)
    if unknown:
        raise InvalidInput(f"unknown field '{unknown[0]}' for {op}")
    caller = request_caller(op, args, token_hash)
    fingerprint = request.fingerprint
    if fingerprint is None:
        fingerprint = request_fingerprint(op, args)
    # Every op looks in both places: an id is refused for another op wherever it is.
    # Nearly every write brings a new id: one probe of both indexes says so.
    key = request_key(request_id)
    if db.one(_SEEN, (request_id, key)) is None:
        stored = sent = None
    else:
        stored = db.one(
            "SELECT op, result, caller, fingerprint FROM requests WHERE request_id = ?",
            (request_id,),
        )
        sent = None if stored is not None else _sent(db, key, now - request.retention)
    if stored is not None or sent is not None:
        user = None
        if op not in _BY_NAME and op not in _ENDS_SESSION:
            # A session that has ended replays nothing, not even its own requests;
            # only the request that ended it (its first reply may have been lost).
            user = sessions.user(db, token_hash, now)
        if stored is not None:
            return _replay(db, op, args, request_id, (caller, fingerprint), stored)
        assert sent is not None
        return _replay_sent(op, request_id, user, request_check(caller, fingerprint), sent)
    try:
        if op == "send":
            check = request_check(caller, fingerprint)
            return send(db, now, args, token_hash, request_id, sessions, check, key)
        result = handler(db, now, args, token_hash, request_id, sessions)
    except ConstraintViolation as exc:
        # Every constraint a user can hit is checked first (a taken name is Conflict).
        raise Internal(f"{op} broke a database constraint: {exc}") from None
    db.execute(
        "INSERT INTO requests(request_id, op, result, caller, created_at, fingerprint) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (request_id, op, orjson.dumps(result).decode(), caller, now, fingerprint),
    )
    return result


_HEX_ID = re.compile(r"(?:[0-9a-f]{2})+")
# The bytes of sha256 a message row keeps of its request's caller and fingerprint.
CHECK_BYTES = 8


def request_key(request_id: str) -> bytes | str:
    """How a message row keeps the id of the request that sent it: the bytes of an id
    of lower-case hex digits (an even number of them; clients make 32), any other id
    as it is. Exact both ways: hex decoding is one-to-one on such ids, and SQLite
    never finds a BLOB equal to a TEXT."""
    return bytes.fromhex(request_id) if _HEX_ID.fullmatch(request_id) else request_id


def request_check(caller: str, fingerprint: str) -> bytes:
    """What a message row keeps of its request's caller and fingerprint: the first
    ``CHECK_BYTES`` of their sha256. A retry under the same id from another caller
    or with other arguments matches it by chance once in 2**64 tries: the id alone
    finds the message, so this only tells a mistaken reuse of an id from a retry."""
    digest = hashlib.sha256(f"{caller}\n{fingerprint}".encode("utf-8", "surrogatepass"))
    return digest.digest()[:CHECK_BYTES]


# Whether a request id (then its key) is in ``requests`` or in a message row: the
# indexes alone, no sort, no join, a third of the time of the queries behind it.
_SEEN = (
    "SELECT 1 FROM requests WHERE request_id = ? "
    "UNION ALL SELECT 1 FROM messages WHERE request_key = ? LIMIT 1"
)


def registered_by(db: Db, request_id: str, username: str) -> bool:
    """Whether ``request_id`` already registered ``username``: a retry of it (its
    reply lost) is answered from the stored result and makes no account. The same
    id with another name is a ``conflict`` (see "Requests"), not such a retry."""
    row = db.one(
        "SELECT caller FROM requests WHERE request_id = ? AND op = 'register'", (request_id,)
    )
    return row is not None and row[0] == request_caller("register", {"username": username}, None)


def _sent(db: Db, key: bytes | str, since: float) -> tuple[Any, ...] | None:
    """The newest message sent under the request key ``key`` at ``since`` or later,
    as ``_replay_sent`` takes it; None if there is none."""
    row = db.one(
        "SELECT m.id, s.name, r.name, m.body, m.sent_at, m.recipient_id, m.sender_id, "
        "m.request_check FROM messages m JOIN users s ON s.id = m.sender_id "
        "JOIN users r ON r.id = m.recipient_id WHERE m.request_key = ? "
        "ORDER BY m.id DESC LIMIT 1",
        (key,),
    )
    return None if row is None or float(row[4]) < since else row


def _replay_sent(
    op: str,
    request_id: str,
    user: tuple[int, str] | None,
    check: bytes,
    sent: tuple[Any, ...],
) -> Result:
    """A ``send``'s first result again, from its message row (``_sent``). The row's
    sender, recipient and time never change, and the first reply said ``read:
    false``; a message deleted since replays with its body empty."""
    message_id, sender, recipient, body, sent_at, recipient_id, sender_id, stored = sent
    if op != "send" or user is None or user[0] != int(sender_id):
        raise Conflict(f"request id {request_id} was already used for another operation")
    if not hmac.compare_digest(bytes(stored), check):
        raise Conflict(
            f"request id {request_id} was already used for a request with other arguments "
            "or from another session; use a new id for a new request"
        )
    message = _message_dict(message_id, sender, recipient, body, sent_at, read=False)
    return {"message": message, "recipient_id": int(recipient_id)}


def _replayed_send(db: Db, stored: Result) -> Result:
    """A ``send``'s first result again, for a send stored in ``requests`` before v5 of
    the schema (``_replay_sent`` does it for the sends since). Its result is the
    message id, or, before that, the message without its body."""
    if "message" in stored:
        body = db.value("SELECT body FROM messages WHERE id = ?", (stored["message"]["id"],))
        stored["message"]["body"] = "" if body is None else str(body)
        return stored
    row = db.one(
        "SELECT m.id, s.name, r.name, m.body, m.sent_at, m.recipient_id FROM messages m "
        "JOIN users s ON s.id = m.sender_id JOIN users r ON r.id = m.recipient_id "
        "WHERE m.id = ?",
        (stored["message_id"],),
    )
    if row is None:
        raise Internal(f"the message {stored['message_id']} of a stored send is missing")
    message = _message_dict(row[0], row[1], row[2], row[3], row[4], read=False)
    return {"message": message, "recipient_id": int(row[5])}


def _replay(
    db: Db,
    op: str,
    args: Args,
    request_id: str,
    caller_and_fingerprint: tuple[str, str],
    stored: tuple[Any, ...],
) -> Result:
    caller, fingerprint = caller_and_fingerprint
    stored_op, result_json, stored_caller, stored_fingerprint = stored
    if stored_op != op or not hmac.compare_digest(str(stored_caller), caller):
        raise Conflict(f"request id {request_id} was already used for another operation")
    # '' for a request stored before fingerprints were kept: nothing to compare.
    if stored_fingerprint and stored_fingerprint != fingerprint:
        raise Conflict(
            f"request id {request_id} was already used for a request with other arguments; "
            "use a new id for a new request"
        )
    if op == "login":
        # A retried login: the first token may never have reached the client, and it
        # exists nowhere in clear, so the session now answers to the retry's token.
        db.execute(
            "UPDATE sessions SET token_hash = ? WHERE request_id = ?",
            (_token_hash_arg(args), request_id),
        )
    result: Result = json.loads(result_json)
    if op == "send":
        return _replayed_send(db, result)
    return result


# ---- the chat as the replicator's application -------------------------------------------


@dataclass(frozen=True)
class ChatApplication:
    """The chat rules as ``replication.app.Application``: the composition root
    (``node.py``) hands it to the replicator, which calls it in the primary's batches."""

    request_retention: float  # seconds a request id is remembered (NodeConfig)
    # The sessions the writer has read (its connection is the only one that writes).
    sessions: SessionCache = dataclass_field(default_factory=SessionCache)
    # Deleted accounts' inboxes left to tombstone (``purge``).
    purging: PurgeWork = dataclass_field(default_factory=PurgeWork)

    def apply_write(
        self,
        db: Db,
        op: str,
        args: Args,
        token_hash: str | None,
        request_id: str,
        now: float,
        fingerprint: str | None,
    ) -> Result:
        # The account a delete_account ends, looked up first: its inbox is left to
        # ``purge`` (a retry answered from its request has no session, and no work).
        owner = session_owner(db, token_hash) if op == "delete_account" and token_hash else None
        result = apply_write(
            db,
            op,
            args,
            token_hash,
            request_id,
            now,
            fingerprint,
            self.sessions,
            self.request_retention,
        )
        if isinstance(owner, int):
            self.purging.inboxes.setdefault(owner, 0)
        return result

    def share_key(self, db: Db, token_hash: str | None) -> Hashable:
        # The account, so that one account's sessions share one line. A write without
        # a session (register, login: hashed first, and bounded there) or with a token
        # no session has shares the line of its kind: made-up tokens cost no more room
        # than one account's writes. A disk that fails the query fails the write in
        # its batch, as before.
        if token_hash is None:
            return NO_SESSION
        owner = self.sessions.owner(token_hash)
        if owner is not None:
            return owner
        try:
            return session_owner(db, token_hash)
        except ChatError:
            return UNKNOWN_SESSION

    def rate_kind(self, op: str, key: Hashable) -> RateKind | None:
        # Accounts are ints; NO_SESSION and UNKNOWN_SESSION writes fail in their batch
        # (register and login have no session: their password hashing bounds them).
        # logout and delete_account end a session or an account, each once: bounded
        # by the logins before them, and never to be held up by a flood of touches.
        if not isinstance(key, int) or op in SESSION_ENDING_OPS:
            return None
        return "send" if op == "send" else "write"

    def forget_reads(self) -> None:
        self.sessions.forget()

    def reset(self) -> None:
        self.forget_reads()
        # A new reign, or a batch undone whole: what the work was may have changed
        # under it. The sweep finds every inbox left, whatever wrote it.
        self.purging.restart()

    def unguarded_bound(self, op: str) -> int | None:
        # A send: a session row's new idle clock, then the message row.
        return SEND_RECORD_BOUND if op == "send" else None

    def starts_purge(self, op: str) -> bool:
        # A deleted account's inbox is tombstoned in bounded steps after it.
        return op == "delete_account"

    def purge(self, db: Db, now: float) -> bool:
        return purge_deleted_inboxes(db, now, self.purging)

    def prune(self, db: Db, now: float, limit: int) -> None:
        prune_requests(db, now - self.request_retention, limit)
        if prune_sessions(db, now, limit):
            # Ended sessions are refused from the cache too, but only while the clock
            # does not step back past their end: read the survivors again.
            self.sessions.forget()
