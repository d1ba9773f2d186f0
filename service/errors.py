"""The error tree of the service, with stable wire codes.

Every failure a user or a peer can see is one of these classes. Each has a
stable ``code`` (sent in error frames, documented in ``service/PROTOCOL.md``),
a ``retriable`` flag (a client may send the same request again, with the same
request id, and expect a different outcome) and the ``chatctl`` exit status it
maps to. Exceptions from libraries (apsw, asyncio, json) are translated into
this tree at the boundary where they occur; a traceback never reaches a user.

    ChatError
    ├── Refused                       exit 1: the service said no
    │   ├── InvalidInput   invalid        a field has the wrong type, size or characters
    │   ├── AuthFailed     auth_failed    bad credentials, unknown or ended session
    │   ├── NotFound       not_found      no such user or message
    │   ├── Conflict       conflict       the name is taken, the request id was reused
    │   └── Gone           gone           the account was deleted
    ├── Unavailable        unavailable    retriable: no primary yet, or writes waiting
    │   ├── NotPrimary     not_primary    retriable: ask the primary (``primary`` field)
    │   ├── Busy           busy           retriable after ``retry_after`` seconds: the node
    │   │                                 has all the connections it takes, too many failed
    │   │                                 logins, or the password hashing is full
    │   └── StorageFault   storage_fault  retriable: the node's disk refuses writes (full, I/O)
    ├── ProtocolViolation  protocol       the peer broke the wire protocol
    │   └── FrameTooLarge  too_large      a frame longer than the maximum
    └── Internal           internal       a bug or a storage failure on the node
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
# A Busy answer never asks a client to wait longer than this.
MAX_RETRY_AFTER = 3600.0


class ChatError(Exception):
    """Base of every error the service reports."""

    code: ClassVar[str] = "internal"
    retriable: ClassVar[bool] = False
    exit_code: ClassVar[int] = EXIT_REFUSED

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_wire(self) -> dict[str, Any]:
        """The fields of an error frame (without ``type`` and ``request_id``)."""
        body: dict[str, Any] = {
            "code": self.code,
            "message": self.message,
            "retriable": self.retriable,
        }
        body.update(self.details)
        return body


class Refused(ChatError):
    code = "refused"


class InvalidInput(Refused):
    code = "invalid"


class AuthFailed(Refused):
    code = "auth_failed"


class NotFound(Refused):
    code = "not_found"


class Conflict(Refused):
    code = "conflict"


class Gone(Refused):
    code = "gone"


class Unavailable(ChatError):
    code = "unavailable"
    retriable = True
    exit_code = EXIT_UNAVAILABLE


class NotPrimary(Unavailable):
    """Sent by a backup or an electing node; ``primary`` names the primary if known."""

    code = "not_primary"


class Busy(Unavailable):
    """Try again in ``retry_after`` seconds (a detail of the error frame).

    Sent instead of doing costly work: a connection beyond what the node serves
    (``retry_after`` 0: try another node), a login while its account or client
    address is in a backoff window after failed logins, or a login or register
    while the node's password hashing is at its bound. Nothing was changed."""

    code = "busy"

    def __init__(self, message: str, retry_after: object = 0.0, **details: Any) -> None:
        super().__init__(message, retry_after=_seconds(retry_after), **details)

    @property
    def retry_after(self) -> float:
        return float(self.details["retry_after"])


def _seconds(value: object) -> float:
    """A sane ``retry_after``: from the wire the field may be anything."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0.0
    return round(min(max(float(value), 0.0), MAX_RETRY_AFTER), 2)


class StorageFault(Unavailable):
    """The node's storage refuses to write (disk full, read-only, I/O error). Never a
    sign that the data disagrees with a peer's; it passes when the disk recovers."""

    code = "storage_fault"


class ProtocolViolation(ChatError):
    code = "protocol"


class FrameTooLarge(ProtocolViolation):
    code = "too_large"


class Internal(ChatError):
    code = "internal"


class StorageCorrupt(Internal):
    """The database file is damaged (SQLite found a malformed page). The node must
    neither lead nor ship its pages: it moves the file aside and takes a snapshot."""


_BY_CODE: dict[str, type[ChatError]] = {
    cls.code: cls
    for cls in (
        Refused,
        InvalidInput,
        AuthFailed,
        NotFound,
        Conflict,
        Gone,
        Unavailable,
        NotPrimary,
        Busy,
        StorageFault,
        ProtocolViolation,
        FrameTooLarge,
        Internal,
    )
}


def from_wire(frame: dict[str, Any]) -> ChatError:
    """Rebuild the exception an error frame describes (unknown codes become Internal)."""
    cls = _BY_CODE.get(str(frame.get("code")), Internal)
    details = {
        k: v
        for k, v in frame.items()
        if k not in ("type", "request_id", "code", "message", "retriable")
    }
    return cls(str(frame.get("message", "unknown error")), **details)
