"""A connection to one node as the operator (node 0), proven by the cluster secret.

The operator tools (``ops.promote``, ``ops.backup``) speak the peer handshake of
PROTOCOL.md section 2.3 with node id 0, send one command and read the answer:
one frame, or a stream of frames (a backup). Blocking sockets: each tool does
one thing and waits for it.
"""

from __future__ import annotations

import socket
from types import TracebackType

from service import config as config_module
from service import protocol

# The largest frame accepted from the node: a backup chunk is 1 MiB of base64.
MAX_FRAME = 16 * 1024 * 1024


class OperatorLink:
    """``with OperatorLink(address, secret, timeout) as link: link.send(...); link.receive()``"""

    def __init__(self, address: str, secret: bytes, timeout: float) -> None:
        host, port = config_module.parse_address(address)
        self._decoder = protocol.FrameDecoder(MAX_FRAME)
        self._ready: list[protocol.Frame] = []
        self._sock = socket.create_connection((host, port), timeout=timeout)
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
