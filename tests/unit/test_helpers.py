"""The harness's small parts (ops/cluster): free ports, waiting on state, the status probe."""

from __future__ import annotations

import socket
import threading
from itertools import count

import pytest

from ops.cluster.ports import free_port, free_ports
from ops.cluster.probe import probe_status
from ops.cluster.waiting import StopWaiting, wait_for
from service import protocol


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # nothing of ours still holds it


def test_free_port_is_a_valid_port() -> None:
    assert 0 < free_port() < 65536


def test_free_ports_refuses_a_non_positive_count() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        free_ports(0)


def test_wait_for_returns_the_first_truthy_value() -> None:
    calls = count(1)
    assert wait_for(lambda: next(calls) >= 3 and "ready", 5, "the third call") == "ready"


def test_wait_for_treats_an_exception_as_not_yet() -> None:
    calls = count(1)

    def flaky() -> int:
        n = next(calls)
        if n < 3:
            raise ConnectionError("not up yet")
        return n

    assert wait_for(flaky, 5, "a flaky predicate") == 3


def test_wait_for_timeout_names_what_it_waited_for_and_the_last_value() -> None:
    with pytest.raises(TimeoutError, match=r"after 0\.05s waiting for the moon; last value: 0"):
        wait_for(lambda: 0, 0.05, "the moon", interval=0.01)


def test_wait_for_timeout_reports_and_chains_the_last_error() -> None:
    def broken() -> bool:
        raise KeyError("role")

    with pytest.raises(TimeoutError, match="waiting for a role; last error: KeyError") as info:
        wait_for(broken, 0.05, "a role", interval=0.01)
    assert isinstance(info.value.__cause__, KeyError)


def test_wait_for_calls_the_predicate_once_even_with_no_time() -> None:
    assert wait_for(lambda: 42, 0, "an immediate answer") == 42


def test_wait_for_stops_at_once_when_the_state_cannot_come() -> None:
    calls = count(1)

    def hopeless() -> bool:
        next(calls)
        raise StopWaiting("the node exited")

    with pytest.raises(StopWaiting, match="exited"):
        wait_for(hopeless, 30, "a node that exited")
    assert next(calls) == 2


def test_probe_returns_none_when_nobody_listens() -> None:
    assert probe_status(f"127.0.0.1:{free_port()}", timeout=0.5) is None


def test_probe_returns_none_when_the_node_is_silent() -> None:
    # A frozen node: the kernel accepts the connection, nobody ever speaks.
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert probe_status(f"127.0.0.1:{port}", timeout=0.2) is None


def test_probe_speaks_the_handshake_and_returns_the_result() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        thread = threading.Thread(target=_serve_one_status, args=(server,), daemon=True)
        thread.start()
        status = probe_status(f"127.0.0.1:{port}", timeout=5)
        thread.join(5)
    assert status == {"node": {"id": 1, "role": "primary"}}


def _serve_one_status(server: socket.socket) -> None:
    """A stand-in node: hello, welcome, then one reply echoing the request id."""
    conn, _ = server.accept()
    with conn:
        conn.settimeout(5)
        decoder = protocol.FrameDecoder()
        frames: list[protocol.Frame] = []

        def receive() -> protocol.Frame:
            while not frames:
                frames.extend(decoder.feed(conn.recv(65536)))
            return frames.pop(0)

        conn.sendall(protocol.encode_frame(protocol.server_hello(1, protocol.new_nonce())))
        assert receive()["role"] == "client"
        conn.sendall(protocol.encode_frame({"type": "welcome"}))
        request = receive()
        result = {"node": {"id": 1, "role": "primary"}}
        conn.sendall(protocol.encode_frame(protocol.reply(request["request_id"], result)))
