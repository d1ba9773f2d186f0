"""A connection to one node as the operator (node 0), proven by the cluster secret.

The operator tools (``ops.promote``, ``ops.backup``) speak the peer handshake of
PROTOCOL.md section 2.3 with node id 0, send one command and read the answer:
one frame, or a stream of frames (a backup). Blocking sockets: each tool does
one thing and waits for it.

On a cluster with TLS (``service/tls.py``) the link is TLS: the tool verifies the
node against the cluster CA (``--ca FILE``, else the ``tls_ca`` of the ``--config``
file) and proves itself with the secret, as over plain TCP; it presents no
certificate. Plain TCP is used only to a loopback address.
"""

from __future__ import annotations

import argparse
import socket
import ssl
from pathlib import Path
from types import TracebackType

from service import config as config_module
from service import protocol, tls
from service.config import NodeConfig
from service.errors import InvalidInput, ProtocolViolation
from service.status import NodeStatus

# The largest frame accepted from the node: a backup chunk is 1 MiB of base64.
MAX_FRAME = 16 * 1024 * 1024


class OperatorLink:
    """``with OperatorLink(address, secret, timeout) as link: link.send(...); link.receive()``"""

    def __init__(
        self,
        address: str,
        secret: bytes,
        timeout: float,
        context: ssl.SSLContext | None = None,
    ) -> None:
        host, port = config_module.parse_address(address)
        if context is None and not config_module.is_loopback(host):
            raise ConnectionError(
                f"{address} is not a loopback address: plain TCP is allowed on loopback "
                "only; give the cluster's CA file (--ca FILE)"
            )
        self._decoder = protocol.FrameDecoder(MAX_FRAME)
        self._ready: list[protocol.Frame] = []
        self._sock = socket.create_connection((host, port), timeout=timeout)
        if context is not None:
            try:
                self._sock = context.wrap_socket(self._sock, server_hostname=host.strip("[]"))
            except ssl.SSLError as exc:
                self._sock.close()
                raise ConnectionError(tls.describe_failure(exc)) from None
            except BaseException:
                self._sock.close()
                raise
        try:
            self._handshake(secret)
        except BaseException:
            self._sock.close()
            raise

    def __enter__(self) -> OperatorLink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._sock.close()

    def _handshake(self, secret: bytes) -> None:
        hello = self.receive()
        version = protocol.choose_version(hello)
        server = int(hello["node"])
        nonce = protocol.new_nonce()
        self.send(protocol.peer_hello(version, secret, str(hello["nonce"]), 0, server, nonce))
        welcome = self.receive()
        if welcome.get("type") == "error":
            raise ConnectionError(str(welcome.get("message")))
        protocol.check_peer_welcome(welcome, secret, nonce, 0, server)

    def send(self, frame: protocol.Frame) -> None:
        self._sock.sendall(protocol.encode_frame(frame))

    def receive(self) -> protocol.Frame:
        """The next frame; ConnectionError if the node closes the connection first."""
        while not self._ready:
            data = self._sock.recv(1 << 20)
            if not data:
                raise ConnectionError("the node closed the connection")
            self._ready.extend(self._decoder.feed(data))
        return self._ready.pop(0)


def exchange(
    address: str,
    secret: bytes,
    frame: protocol.Frame,
    timeout: float,
    context: ssl.SSLContext | None = None,
) -> protocol.Frame:
    """Send one command to the node at ``address``; its one answer."""
    with OperatorLink(address, secret, timeout, context) as link:
        link.send(frame)
        return link.receive()


def status_of(
    address: str, secret: bytes, timeout: float, context: ssl.SSLContext | None = None
) -> NodeStatus:
    """The node's status (its ``status`` op's node object); OSError or
    ProtocolViolation when it cannot be had."""
    reply = exchange(address, secret, {"type": "status"}, timeout, context)
    return NodeStatus.from_wire(reply.get("result"))


def status_if_answering(
    address: str, secret: bytes, timeout: float, context: ssl.SSLContext | None = None
) -> NodeStatus | None:
    """``status_of``, or None when the node is down, frozen or not a node: for the
    tools that ask the other nodes of a cluster what they hold."""
    try:
        return status_of(address, secret, timeout, context)
    except (OSError, ProtocolViolation):
        return None


def add_ca_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ca",
        type=Path,
        metavar="FILE",
        help="the cluster's CA certificate, to verify the node over TLS "
        "(default with --config: its tls_ca)",
    )


def client_tls(ca: Path | None, config: NodeConfig | None) -> ssl.SSLContext | None:
    """The context that verifies the node: from ``--ca``, else the config's ``tls_ca``;
    None for plain TCP. Raises ``InvalidInput`` when the CA file is unusable."""
    if ca is not None:
        return tls.client_context(ca, "--ca")
    if config is not None and config.tls_ca is not None:
        return tls.client_context(config.tls_ca, "tls_ca")
    return None


def ca_or_exit(
    parser: argparse.ArgumentParser, ca: Path | None, config: NodeConfig | None
) -> ssl.SSLContext | None:
    """``client_tls``, or the parser's usage error (exit 2) naming what is wrong."""
    try:
        return client_tls(ca, config)
    except InvalidInput as exc:
        parser.error(exc.message)
