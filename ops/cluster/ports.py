"""Free ports for the nodes a local cluster starts.

Fixed ports make parallel runs and leftover processes collide, so every local
cluster asks the kernel: bind ``HOST:0``, read the port it picked, close. All
the sockets of one call are held open together while picking, so the ports
returned are distinct; none is held afterwards, because the node process must
bind it itself. Another process could take a port in the short window before
the node binds it; the harness then sees the node exit during ``start`` and
raises with its log, rather than hanging.
"""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """Return ``count`` distinct ports that were free on ``host`` a moment ago."""
    if count < 1:
        raise ValueError("count must be at least 1")
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port(host: str = LOOPBACK) -> int:
    """One free port on ``host``."""
    return free_ports(1, host)[0]
