"""A tiny synchronous ``status`` probe, for the harness's own polling.

The harness must tell "the node is down or frozen" apart from "the node answers
but not as expected", and must not depend on the client library the tests
check (nor on its retries and redirects, which the benchmark measures). So it
speaks the wire protocol directly (``service.protocol``): read the
server's hello (the server speaks first), answer with a client hello, read the
welcome, send one ``status`` request, read the reply.

``None`` means nobody useful is there: the connection is refused, reset or
closed, or the node stays silent past the socket timeout (a SIGSTOPped process
still has its listening socket, so connecting succeeds and reading times out).
A node that answers with garbage or an error frame raises, because that is a
bug to report, and ``wait_for`` keeps the last such error for its message.
"""

from __future__ import annotations

import socket
import ssl
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from service import protocol
from service.config import parse_address
from service.errors import ChatError, ProtocolViolation, from_wire
from service.status import NodeStatus

Status = dict[str, Any]


class _Connection:
    """Blocking frame reader and writer over one socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._decoder = protocol.FrameDecoder()
        self._frames: list[protocol.Frame] = []

    def send(self, frame: protocol.Frame) -> None:
        self._sock.sendall(protocol.encode_frame(frame))

    def receive(self) -> protocol.Frame:
        """The next frame; raises ConnectionError when the server closes first."""
        while not self._frames:
            data = self._sock.recv(65536)
            if not data:
                raise ConnectionError("the node closed the connection")
            self._frames.extend(self._decoder.feed(data))
        return self._frames.pop(0)


def _expect(frame: protocol.Frame, kind: str) -> protocol.Frame:
    if frame.get("type") == "error":
        raise from_wire(frame)
    if frame.get("type") != kind:
        raise ProtocolViolation(f"expected a {kind!r} frame, got {frame!r}")
    return frame


def probe_status(
    address: str, timeout: float = 1.0, tls: ssl.SSLContext | None = None
) -> Status | None:
    """The result of the ``status`` op at ``address``, or None if the node is down or frozen.

    ``tls``: the context that verifies a node of a TLS cluster (None: plain TCP)."""
    host, port = parse_address(address)
    request_id = uuid.uuid4().hex
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            raw if tls is None else tls.wrap_socket(raw, server_hostname=host) as sock,
        ):
            connection = _Connection(sock)
            hello = connection.receive()
            connection.send(protocol.client_hello(protocol.choose_version(hello)))
            _expect(connection.receive(), "welcome")
            connection.send(protocol.request("status", request_id, {}))
            reply = _expect(connection.receive(), "reply")
    except OSError:
        # Refused, reset, closed or timed out (TimeoutError is an OSError).
        return None
    if reply.get("request_id") != request_id or not isinstance(reply.get("result"), dict):
        raise ProtocolViolation(f"status reply does not match the request: {reply!r}")
    result: Status = reply["result"]
    return result


def probe_node(
    address: str, timeout: float = 1.0, tls: ssl.SSLContext | None = None
) -> NodeStatus | None:
    """The node's typed status, or None if it is down or frozen; raises if malformed."""
    result = probe_status(address, timeout, tls)
    return None if result is None else NodeStatus.from_reply(result)


def probe_all(
    addresses: Mapping[int, str],
    timeout: float = 1.0,
    *,
    errors_as_none: bool = False,
    tls: ssl.SSLContext | None = None,
) -> dict[int, NodeStatus | None]:
    """``probe_node`` of every address at once (a frozen node costs ``timeout`` once, not
    once per node), by node id. A malformed answer raises, or with ``errors_as_none``
    counts as no answer (for observers that must go on whatever a node says)."""

    def one(address: str) -> NodeStatus | None:
        try:
            return probe_node(address, timeout, tls)
        except ChatError:
            if errors_as_none:
                return None
            raise

    if not addresses:
        return {}
    with ThreadPoolExecutor(max_workers=len(addresses)) as pool:
        answers = list(pool.map(one, addresses.values()))
    return dict(zip(addresses, answers, strict=True))
