"""How an unreachable etcd is described (``etcd_io._describe``): one short, stable line.

The line goes to ``chatctl status`` and the node log ("arbiter unreachable"), so it
keeps what went wrong and drops what changes at every attempt.
"""

from __future__ import annotations

import pytest
from etcd3gw.exceptions import ConnectionFailedError, ConnectionTimeoutError

from service.replication.etcd_io import MAX_WHY, _describe

POOL = (
    "HTTPSConnectionPool(host='127.0.0.10', port=2379): Max retries exceeded with url: /v3/kv/range"
)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            ConnectionTimeoutError(
                "HTTPSConnectionPool(host='127.0.0.10', port=2379): Read timed out. "
                "(read timeout=0.5)"
            ),
            "ConnectionTimeoutError: HTTPSConnectionPool(host='127.0.0.10', port=2379): "
            "Read timed out. (read timeout=0.5)",
        ),
        (
            ConnectionTimeoutError(
                f"{POOL} (Caused by ConnectTimeoutError(<HTTPSConnection(host='127.0.0.10', "
                "port=2379) at 0x7f0b26f6b650>, 'Connection to 127.0.0.10 timed out. "
                "(connect timeout=0.5)'))"
            ),
            "ConnectionTimeoutError: ConnectTimeoutError('Connection to 127.0.0.10 timed out. "
            "(connect timeout=0.5)')",
        ),
        (
            ConnectionFailedError(
                f"{POOL} (Caused by NewConnectionError('<urllib3.connection.HTTPSConnection "
                "object at 0x7f12>: Failed to establish a new connection: [Errno 111] "
                "Connection refused'))"
            ),
            "ConnectionFailedError: NewConnectionError('Failed to establish a new connection: "
            "[Errno 111] Connection refused')",
        ),
        (ConnectionFailedError(), "ConnectionFailedError"),
        (OSError("no route"), "OSError: no route"),
    ],
)
def test_an_unreachable_etcd_is_one_stable_line(error: Exception, expected: str) -> None:
    assert _describe(error) == expected


def test_a_long_reason_is_cut() -> None:
    assert len(_describe(ConnectionFailedError("x" * 1000))) == MAX_WHY
