"""The chat's tables: their schema and its migrations, as ``storage.Storage`` takes them.

The chat rules (``chat.py``) own these tables; storage owns the replication
machinery (the log, the epochs, the node state, the sync set record in
``cluster``) and creates its own tables together with the first migration here,
so a database made by this code is the same, byte for byte, as one made before
the two were apart. The composition root (``node.py``) hands ``MIGRATIONS`` to
``Storage``; storage applies the ones a database has not run yet and records
how many ran in ``PRAGMA user_version``.

Every table here is replicated: its rows change only inside the primary's
batches and reach the backups as changesets. So every table needs an explicit
PRIMARY KEY (the session extension ignores a table without one; storage
refuses to open such a schema), and none uses AUTOINCREMENT (ids are ``max + 1``
of replicated rows, and tombstones keep them from being reused).

Kept apart from ``chat.py`` because it is data, not rules (and ``chat.py`` is
long): a migration is reviewed against the ones before it, and the storage
tests take the schema without the chat rules.
"""

from __future__ import annotations

_SCHEMA_V1 = """
CREATE TABLE users (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    name_key TEXT NOT NULL UNIQUE,          -- lower(name): names are unique without case
    password_hash TEXT NOT NULL,            -- '' once the account is deleted
    created_at REAL NOT NULL,
    deleted_at REAL
);
CREATE TABLE sessions (
    token_hash TEXT NOT NULL PRIMARY KEY,   -- sha256 of the token; the token is never stored
    user_id INTEGER NOT NULL,
    request_id TEXT NOT NULL,               -- the login request, to rotate the token on retry
    created_at REAL NOT NULL
);
CREATE INDEX sessions_by_user ON sessions (user_id);
CREATE INDEX sessions_by_request ON sessions (request_id);
CREATE TABLE messages (
    id INTEGER PRIMARY KEY,
    sender_id INTEGER NOT NULL,
    recipient_id INTEGER NOT NULL,
    body TEXT NOT NULL,                     -- '' for a tombstone
    sent_at REAL NOT NULL,
    read_at REAL,
    deleted_at REAL                         -- set: a tombstone, kept forever
);
CREATE INDEX messages_by_recipient ON messages (recipient_id, id);
CREATE INDEX messages_by_sender ON messages (sender_id, id);
CREATE TABLE requests (
    request_id TEXT NOT NULL PRIMARY KEY,
    op TEXT NOT NULL,
    result TEXT NOT NULL,                   -- JSON of the first result
    caller TEXT NOT NULL,                   -- who may replay it (chat.py: request_caller)
    created_at REAL NOT NULL
);
"""

# v2: request ids are forgotten after a retention period (see chat.prune_requests).
_SCHEMA_V2 = """
CREATE INDEX requests_by_age ON requests (created_at);
"""

# v3: sessions end (see chat.login): ``expires_at`` is the absolute end, ``ends_at``
# the end the session has now (its idle clock, never past ``expires_at``). Sessions
# from before get the defaults of 30 days' lifetime and 7 days' idle timeout, counted
# from their login (nothing else is known that every node agrees on).
_SCHEMA_V3 = """
ALTER TABLE sessions ADD COLUMN expires_at REAL NOT NULL DEFAULT 0;
ALTER TABLE sessions ADD COLUMN idle_timeout REAL NOT NULL DEFAULT 0;
ALTER TABLE sessions ADD COLUMN ends_at REAL NOT NULL DEFAULT 0;
UPDATE sessions SET expires_at = created_at + 2592000, idle_timeout = 604800,
    ends_at = created_at + 2592000;
CREATE INDEX sessions_by_end ON sessions (ends_at);
"""

# v4: a stored request keeps the fingerprint of its arguments (chat.request_fingerprint),
# so a request id reused for other arguments is refused. Older rows get '' (unknown:
# not compared); every node runs the same migration, so the rows stay identical.
_SCHEMA_V4 = """
ALTER TABLE requests ADD COLUMN fingerprint TEXT NOT NULL DEFAULT '';
"""

# v5: a send's request is remembered in its message row, not in ``requests``: one
# replicated row per message (chat.py, "Requests"). ``request_key`` is the request
# id (chat.request_key: 16 bytes for the 32 hex digits clients send) and
# ``request_check`` 8 bytes of a hash of the caller and the fingerprint. The index is
# partial: messages sent before have no key (their requests rows replay them until
# they are pruned) and cost no index entry. Not UNIQUE: an id may be used afresh once
# its request_retention has passed, and the newest message of a key is the one that
# counts.
_SCHEMA_V5 = """
ALTER TABLE messages ADD COLUMN request_key BLOB;
ALTER TABLE messages ADD COLUMN request_check BLOB;
CREATE INDEX messages_by_request ON messages (request_key) WHERE request_key IS NOT NULL;
"""

# Migration i (0-based) takes the schema from user_version i to i + 1. Append only:
# a database in service has run the ones before, and every node must end with the
# same rows, so a migration never changes once released.
MIGRATIONS: tuple[str, ...] = (_SCHEMA_V1, _SCHEMA_V2, _SCHEMA_V3, _SCHEMA_V4, _SCHEMA_V5)

# The chat's tables, each with its primary key, in the order v1 creates them. All of
# them are replicated: storage replicates every table but its node-local ones, and
# reports checksums in this order (tests/unit/test_chat_schema.py holds it to that).
TABLES: dict[str, str] = {
    "users": "id",
    "sessions": "token_hash",
    "messages": "id",
    "requests": "request_id",
}
