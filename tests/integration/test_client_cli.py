"""The client library and ``chatctl`` over real loopback sockets.

Two kinds of tests:

* ``chatctl`` run as a real subprocess (the installed console script) against
  real node processes started by the harness (``single_node``,
  ``cluster_factory``; these get the ``cluster`` marker): every command in text
  and ``--json``, exit codes 1/2/3, passwords from the environment and stdin,
  ``listen`` across a restart and a failover.
* ``Client`` against small fake nodes in this process that speak the wire
  protocol but misbehave on purpose (drop the connection, never answer,
  redirect, resend a message): the retry and redirect rules, with no real node.

Waiting is on observable state (an output line, a process exit, a status)
with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import IO, Any

import pytest

from ops.cluster.ports import free_port
from ops.cluster.waiting import wait_for
from service import errors, protocol
from service.client import Client
from tests.helpers.cluster import Cluster

PASSWORD = "s3cret-password"
COMMAND_TIMEOUT = 60.0
_SCRIPT = Path(sys.executable).with_name("chatctl")
CHATCTL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "service.cli"]
MESSAGE_KEYS = {"id", "from", "to", "body", "sent_at", "read"}


# ---- running chatctl ---------------------------------------------------------------------


class User:
    """One person at a terminal: their own CHATCTL_HOME, talking to ``servers``."""

    def __init__(self, tmp_path: Path, name: str, servers: list[str]) -> None:
        self.name = name
        self.home = tmp_path / f"home-{name}"
        self.servers = servers

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("CHAT_SERVERS", "CHATCTL_PASSWORD", "CHATCTL_HOME")
        }
        env.update(CHATCTL_HOME=str(self.home), CHAT_SERVERS=",".join(self.servers))
        env.update(extra)
        return env

    def run(
        self, *args: str, input: str | bytes | None = None, **env: str
    ) -> subprocess.CompletedProcess[str]:
        data = input.encode() if isinstance(input, str) else input
        done = subprocess.run(
            [*CHATCTL, *args],
            input=data if data is not None else b"",
            capture_output=True,
            env=self.env(**env),
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        result = subprocess.CompletedProcess(
            done.args,
            done.returncode,
            done.stdout.decode("utf-8"),
            done.stderr.decode("utf-8"),
        )
        assert "Traceback" not in result.stderr, result.stderr
        return result

    def ok(self, *args: str, input: str | None = None, **env: str) -> str:
        result = self.run(*args, input=input, **env)
        assert result.returncode == 0, f"chatctl {' '.join(args)}: {result.stderr}"
        return result.stdout

    def json(self, *args: str, **env: str) -> dict[str, Any]:
        lines = self.ok(*args, "--json", **env).splitlines()
        assert len(lines) == 1, lines
        obj = json.loads(lines[0])
        assert isinstance(obj, dict)
        return obj

    def fails(self, code: int, *args: str, input: str | None = None, **env: str) -> str:
        """Run, expect exit ``code`` with nothing on stdout; return the one-line stderr."""
        result = self.run(*args, input=input, **env)
        assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
        assert result.stdout == ""
        return result.stderr.strip()

    def signup(self) -> None:
        self.ok("register", self.name, CHATCTL_PASSWORD=PASSWORD)
        self.ok("login", self.name, CHATCTL_PASSWORD=PASSWORD)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Stream:
    """A running ``chatctl listen``: its stdout lines, each awaited with a deadline."""

    def __init__(self, user: User, *args: str) -> None:
        self.process = subprocess.Popen(
            [*CHATCTL, "listen", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=user.env(),
            text=True,
            # As a shell starts a foreground command: Ctrl-C interrupts it. A test
            # run started in the background (`make test &`, nohup) inherits SIGINT
            # ignored, and Python then keeps it ignored in the child.
            preexec_fn=_default_sigint,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        assert self.process.stdout is not None
        assert self.process.stderr is not None
        threading.Thread(target=self._pump, args=(self.process.stdout,), daemon=True).start()
        threading.Thread(target=self._drain, args=(self.process.stderr,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        with stream:
            for line in stream:
                self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _drain(self, stream: IO[str]) -> None:
        with stream:
            self.stderr.extend(stream)

    def next_line(self, timeout: float = 20.0) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"listen printed nothing for {timeout}s") from None
        if line is None:
            raise AssertionError(f"listen ended: {self.process.wait()} {''.join(self.stderr)}")
        return line

    def next_message(self, timeout: float = 20.0) -> dict[str, Any]:
        message = json.loads(self.next_line(timeout))
        assert isinstance(message, dict)
        return message

    def interrupt(self) -> int:
        """Ctrl-C; returns the exit status."""
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=COMMAND_TIMEOUT)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@contextmanager
def listening(user: User, *args: str) -> Iterator[Stream]:
    stream = Stream(user, *args)
    try:
        yield stream
    finally:
        stream.kill()


@pytest.fixture
def node(single_node: Cluster) -> str:
    return single_node.servers[0]


@pytest.fixture
def alice(tmp_path: Path, node: str) -> User:
    user = User(tmp_path, "alice", [node])
    user.signup()
    return user


@pytest.fixture
def bob(tmp_path: Path, node: str) -> User:
    user = User(tmp_path, "bob", [node])
    user.signup()
    return user


# ---- accounts and sessions ---------------------------------------------------------------


def test_register_login_whoami_logout(tmp_path: Path, node: str) -> None:
    carol = User(tmp_path, "carol", [node])
    assert carol.ok("register", "carol", CHATCTL_PASSWORD=PASSWORD).startswith("registered carol")
    assert "taken" in carol.fails(1, "register", "Carol", CHATCTL_PASSWORD=PASSWORD)
    assert carol.fails(1, "register", "dave", CHATCTL_PASSWORD="short")
    assert carol.json("register", "dave", CHATCTL_PASSWORD=PASSWORD) == {
        "user": "dave",
        "user_id": 2,
    }

    assert carol.fails(1, "whoami") == "chatctl: not logged in; run chatctl login USER"
    wrong = carol.fails(1, "login", "carol", "--password-stdin", input="not-the-password\n")
    assert wrong == carol.fails(1, "login", "nobody", "--password-stdin", input=PASSWORD + "\n")
    login = carol.json("login", "carol", "--password-stdin", input=PASSWORD + "\n")
    assert login == {"user": "carol", "user_id": 1, "unread": 0}

    session = carol.home / "session.json"
    assert stat.S_IMODE(session.stat().st_mode) == 0o600
    assert set(json.loads(session.read_text())) == {"user", "token", "servers"}
    assert carol.ok("whoami") == "carol (user id 1), 0 unread messages\n"
    assert carol.json("whoami") == {"user": "carol", "user_id": 1, "unread": 0}

    assert carol.json("logout") == {"user": "carol", "ended": True}
    assert not session.exists()
    assert carol.fails(1, "logout") == "chatctl: not logged in; run chatctl login USER"


def test_logout_forgets_a_session_that_already_ended(tmp_path: Path, alice: User) -> None:
    other_device = User(tmp_path, "alice-laptop", alice.servers)
    other_device.home.mkdir()
    (other_device.home / "session.json").write_bytes((alice.home / "session.json").read_bytes())
    alice.ok("logout")
    assert other_device.ok("logout") == "logged out alice (the session had already ended)\n"
    assert not (other_device.home / "session.json").exists()


def test_an_ended_session_is_refused_with_the_way_out(tmp_path: Path, alice: User) -> None:
    copy = User(tmp_path, "copy", alice.servers)
    copy.home.mkdir()
    (copy.home / "session.json").write_bytes((alice.home / "session.json").read_bytes())
    alice.ok("logout")
    assert copy.fails(1, "whoami").endswith("run chatctl login alice")


# ---- messages ----------------------------------------------------------------------------


def test_send_read_search_delete(alice: User, bob: User) -> None:
    sent = alice.json("send", "bob", "hello bob")
    assert set(sent) == {"message"}
    assert set(sent["message"]) == MESSAGE_KEYS
    first = sent["message"]["id"]
    assert sent["message"]["from"] == "alice"
    assert sent["message"]["read"] is False
    assert alice.ok("send", "bob", "-", input="from stdin\nsecond line\n") == (
        f"sent message {first + 1} to bob\n"
    )
    alice.ok("send", "alice", "a note to self")
    assert "no user named zed" in alice.fails(1, "send", "zed", "hi")
    assert alice.fails(1, "send", "bob", "")

    assert bob.json("whoami")["unread"] == 2
    unread = bob.json("read", "--unread", "--oldest-first")
    assert [m["body"] for m in unread["messages"]] == ["hello bob", "from stdin\nsecond line"]
    assert unread["more"] is False
    assert bob.json("whoami")["unread"] == 0
    assert bob.json("read", "--unread")["messages"] == []
    text = bob.ok("read").splitlines()
    assert text[0].startswith(f"{first + 1}  ")
    assert text[0].endswith("alice → bob  from stdin")
    assert text[1].strip() == "second line"
    assert text[2].endswith("alice → bob  hello bob")

    page = bob.json("read", "--limit", "1")
    assert [m["id"] for m in page["messages"]] == [first + 1]
    assert page["more"] is True
    assert "--before" in bob.ok("read", "--limit", "1")
    older = bob.json("read", "--before", str(first + 1))
    assert [m["id"] for m in older["messages"]] == [first]
    assert [m["id"] for m in bob.json("read", "--after", str(first))["messages"]] == [first + 1]
    assert len(bob.json("read", "--from", "alice")["messages"]) == 2
    assert len(alice.json("read", "--sent")["messages"]) == 3
    assert len(alice.json("read", "--with", "bob")["messages"]) == 2
    assert alice.json("read")["messages"][0]["body"] == "a note to self"

    assert alice.json("search") == {"users": ["alice", "bob"], "more": False}
    assert alice.json("search", "B*") == {"users": ["bob"], "more": False}
    assert alice.json("search", "--limit", "1") == {"users": ["alice"], "more": True}
    assert alice.ok("search", "?o?").split() == ["USER", "bob"]
    assert alice.ok("search", "nobody*") == "no user matches\n"

    assert bob.json("delete-message", str(first)) == {"deleted": [first]}
    assert "no message" in alice.fails(1, "delete-message", str(first))
    assert [m["id"] for m in bob.json("read")["messages"]] == [first + 1]
    assert alice.ok("delete-message", str(first + 1)) == f"deleted message {first + 1}\n"
    assert bob.json("read")["messages"] == []


def test_delete_account(tmp_path: Path, alice: User, bob: User) -> None:
    bob.ok("send", "alice", "before you go")
    alice.ok("send", "bob", "bye")
    assert alice.fails(2, "delete-account").endswith(
        "--yes to delete an account without a terminal"
    )
    assert alice.json("delete-account", "--yes") == {"user": "alice", "deleted": True}
    assert not (alice.home / "session.json").exists()
    assert alice.fails(1, "login", "alice", CHATCTL_PASSWORD=PASSWORD)
    assert "deleted" in bob.fails(1, "send", "alice", "are you there?")
    assert "taken" in bob.fails(1, "register", "alice", CHATCTL_PASSWORD=PASSWORD)
    kept = bob.json("read")["messages"]
    assert [(m["from"], m["body"]) for m in kept] == [("alice", "bye")]
    assert bob.json("search") == {"users": ["bob"], "more": False}


# ---- listen ------------------------------------------------------------------------------


def test_listen_shows_the_backlog_then_live_messages_and_marks_them_read(
    alice: User, bob: User
) -> None:
    alice.ok("send", "bob", "waiting for you")
    with listening(bob, "--json") as stream:
        backlog = stream.next_message()
        assert backlog["body"] == "waiting for you"
        assert set(backlog) == MESSAGE_KEYS
        alice.ok("send", "bob", "live")
        live = stream.next_message()
        assert (live["from"], live["body"]) == ("alice", "live")
        assert live["id"] > backlog["id"]
        wait_for(lambda: bob.json("whoami")["unread"] == 0, 20, "listen to mark what it showed")
        assert stream.interrupt() == 0
        assert "Traceback" not in "".join(stream.stderr)

    with listening(bob, "--after", str(backlog["id"])) as stream:
        line = stream.next_line()
        assert line.startswith(f"{live['id']}  ")
        assert line.endswith("alice → bob  live")
        assert stream.interrupt() == 0


def test_listen_resumes_after_the_node_restarts(
    single_node: Cluster, alice: User, bob: User
) -> None:
    with listening(bob, "--json", "--timeout", "30") as stream:
        alice.ok("send", "bob", "one")
        assert stream.next_message()["body"] == "one"
        single_node[1].restart()
        single_node.wait_for_primary()
        alice.ok("send", "bob", "two", "--timeout", "30")
        assert stream.next_message()["body"] == "two"
        alice.ok("send", "bob", "three")
        assert stream.next_message()["body"] == "three"
        assert stream.interrupt() == 0
    assert stream.lines.get(timeout=COMMAND_TIMEOUT) is None  # nothing more: no duplicate


def test_listen_and_send_survive_a_failover(tmp_path: Path, cluster_factory: Any) -> None:
    cluster: Cluster = cluster_factory(3)
    cluster.start()
    primary = cluster.wait_for_primary()
    alice = User(tmp_path, "alice", cluster.servers)
    bob = User(tmp_path, "bob", cluster.servers)
    alice.signup()
    bob.signup()
    with listening(bob, "--json", "--timeout", "30") as stream:
        alice.ok("send", "bob", "before")
        before = stream.next_message()
        primary.kill()
        cluster.wait_for_primary()
        alice.ok("send", "bob", "after", "--timeout", "30")
        after = stream.next_message()
        assert after["body"] == "after"
        assert after["id"] > before["id"]
        assert stream.interrupt() == 0
    assert stream.lines.get(timeout=COMMAND_TIMEOUT) is None


# ---- status and exit codes ---------------------------------------------------------------


def test_status(tmp_path: Path, node: str) -> None:
    down = f"127.0.0.1:{free_port()}"
    user = User(tmp_path, "ops", [node, down])
    text = user.ok("status").splitlines()
    assert text[0].split()[:3] == ["ADDRESS", "NODE", "STATE"]
    assert text[1].split()[:4] == [node, "1", "up", "primary"]
    assert text[2].split()[:3] == [down, "-", "down"]
    assert f"primary: {node}" in text
    summary = user.json("status")
    assert summary["primary"] == node
    assert summary["session"] is None
    up, gone = summary["nodes"]
    assert (up["address"], up["up"], up["role"], up["lag"]) == (node, True, "primary", 0)
    assert up["sync_set"]["members"] == [1]
    assert (gone["address"], gone["up"], gone["role"]) == (down, False, None)


def test_status_shows_the_unread_count_of_the_session(alice: User, bob: User) -> None:
    alice.ok("send", "bob", "unread")
    assert bob.json("status")["session"] == {"user": "bob", "unread": 1, "ended": False}
    assert "logged in as bob: 1 unread message" in bob.ok("status")


def test_status_says_when_the_saved_session_has_ended(alice: User) -> None:
    # The session file of a session ended elsewhere (a logout from a copy of it).
    saved = {path: path.read_bytes() for path in alice.home.rglob("*") if path.is_file()}
    alice.ok("logout")
    for path, data in saved.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    assert alice.json("status")["session"] == {"user": "alice", "unread": None, "ended": True}
    assert "logged in as alice, but that session has ended: chatctl login alice" in alice.ok(
        "status"
    )


def test_no_primary_reachable_exits_3(tmp_path: Path) -> None:
    nobody = User(tmp_path, "nobody", [f"127.0.0.1:{free_port()}"])
    started = time.monotonic()
    message = nobody.fails(3, "register", "nobody", "--timeout", "0.5", CHATCTL_PASSWORD=PASSWORD)
    assert message.startswith("chatctl: no primary reachable within 0.5 s")
    assert time.monotonic() - started < 15
    result = nobody.run("status", "--timeout", "0.5")
    assert result.returncode == 3
    assert "down" in result.stdout


def test_a_frozen_node_does_not_hang_the_client(single_node: Cluster, alice: User) -> None:
    single_node[1].freeze()
    try:
        started = time.monotonic()
        assert "no primary reachable" in alice.fails(3, "whoami", "--timeout", "1")
        assert time.monotonic() - started < 15
        assert alice.run("status", "--timeout", "1").returncode == 3
    finally:
        single_node[1].thaw()
    assert alice.json("whoami")["user"] == "alice"


@pytest.mark.parametrize(
    "args",
    [
        ["send"],
        ["login", "alice", "--password", PASSWORD],
        ["login", "alice", PASSWORD],
        ["read", "--limit", "0"],
        ["whoami", "--servers", "nonsense"],
        ["no-such-command"],
    ],
)
def test_bad_usage_exits_2(tmp_path: Path, args: list[str]) -> None:
    user = User(tmp_path, "user", ["127.0.0.1:1"])
    result = user.run(*args)
    assert result.returncode == 2
    assert result.stdout == ""


def test_no_password_source_without_a_terminal_exits_2(tmp_path: Path) -> None:
    user = User(tmp_path, "user", ["127.0.0.1:1"])
    assert "--password-stdin" in user.fails(2, "login", "user")


# ---- the client library against misbehaving fake nodes -----------------------------------

Handler = Callable[[protocol.Frame, asyncio.StreamWriter], Awaitable[None]]


class FakeNode:
    """A loopback server that handshakes like a node and hands each request to ``handler``."""

    def __init__(self, handler: Handler, role: str = "primary") -> None:
        self.handler = handler
        self.role = role
        self.requests: list[protocol.Frame] = []
        self.address = ""
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> FakeNode:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        return self

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        decoder = protocol.FrameDecoder()
        writer.write(protocol.encode_frame(protocol.server_hello(9, protocol.new_nonce())))
        welcome = {"type": "welcome", "version": 1, "node": 9, "role": self.role, "primary": None}
        handshaken = False
        try:
            while data := await reader.read(65536):
                for frame in decoder.feed(data):
                    if not handshaken:
                        handshaken = True
                        writer.write(protocol.encode_frame(welcome))
                        continue
                    self.requests.append(frame)
                    await self.handler(frame, writer)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


def answer(result: dict[str, Any]) -> Handler:
    async def handler(frame: protocol.Frame, writer: asyncio.StreamWriter) -> None:
        writer.write(protocol.encode_frame(protocol.reply(frame["request_id"], result)))

    return handler


async def drop(frame: protocol.Frame, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def ignore(frame: protocol.Frame, writer: asyncio.StreamWriter) -> None:
    """A frozen node: the connection stays open and nothing ever comes back."""


@asynccontextmanager
async def fake_nodes(*handlers: Handler) -> Any:
    nodes = [await FakeNode(handler).start() for handler in handlers]
    try:
        yield nodes
    finally:
        for fake in nodes:
            await fake.close()


def test_retries_after_dropped_connections_reuse_the_request_id() -> None:
    attempts = 0

    async def flaky(frame: protocol.Frame, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        await (drop if attempts < 3 else answer({"ok": True}))(frame, writer)

    async def scenario() -> None:
        async with fake_nodes(flaky) as (fake,), Client([fake.address], timeout=5) as client:
            assert await client.call("send", {"to": "bob", "body": "hi"}) == {"ok": True}
        ids = {frame["request_id"] for frame in fake.requests}
        assert len(fake.requests) == 3
        assert len(ids) == 1

    asyncio.run(scenario())


def test_a_silent_node_is_left_for_the_next_one_with_the_same_request_id() -> None:
    async def scenario() -> None:
        async with fake_nodes(ignore, answer({"ok": True})) as (frozen, healthy):
            client = Client([frozen.address, healthy.address], timeout=5, attempt_timeout=0.3)
            async with client:
                started = time.monotonic()
                assert await client.call("whoami") == {"ok": True}
                assert time.monotonic() - started < 2
            # The healthy node may also have been asked who leads (``status``).
            (retry,) = [r for r in healthy.requests if r["op"] == "whoami"]
            assert frozen.requests[0]["request_id"] == retry["request_id"]

    asyncio.run(scenario())


def test_not_primary_is_followed_to_the_named_primary() -> None:
    async def scenario() -> None:
        async with fake_nodes(answer({"ok": True})) as (primary,):

            async def backup(frame: protocol.Frame, writer: asyncio.StreamWriter) -> None:
                body = errors.NotPrimary("node 9 is a backup", primary=primary.address)
                writer.write(
                    protocol.encode_frame(protocol.error(frame["request_id"], body.to_wire()))
                )

            async with fake_nodes(backup) as (redirecting,):
                async with Client([redirecting.address], timeout=5) as client:
                    assert await client.call("send", {"to": "x", "body": "y"}) == {"ok": True}
                    assert await client.call("whoami") == {"ok": True}
                assert len(redirecting.requests) == 1  # the second call went straight there
                first = primary.requests[0]["request_id"]
                assert redirecting.requests[0]["request_id"] == first

    asyncio.run(scenario())


def test_a_refusal_is_raised_at_once_without_retrying() -> None:
    async def refuse(frame: protocol.Frame, writer: asyncio.StreamWriter) -> None:
        body = errors.AuthFailed("wrong username or password").to_wire()
        writer.write(protocol.encode_frame(protocol.error(frame["request_id"], body)))

    async def scenario() -> None:
        async with fake_nodes(refuse) as (fake,), Client([fake.address]) as client:
            with pytest.raises(errors.AuthFailed, match="wrong username or password"):
                await client.login("alice", "password")
        assert len(fake.requests) == 1

    asyncio.run(scenario())


def busy(retry_after: object, then: Handler | None = None, times: int = 1 << 30) -> Handler:
    """Answer ``busy`` with ``retry_after`` the first ``times`` requests, then ``then``."""
    answered = 0

    async def handler(frame: protocol.Frame, writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        answered += 1
        if then is not None and answered > times:
            await then(frame, writer)
            return
        body = {"code": "busy", "message": "too busy; try again", "retriable": True}
        body["retry_after"] = retry_after
        writer.write(protocol.encode_frame(protocol.error(frame["request_id"], body)))

    return handler


def test_busy_is_retried_after_the_wait_it_names_with_the_same_request_id() -> None:
    async def scenario() -> None:
        handler = busy(0.2, then=answer({"ok": True}), times=2)
        async with fake_nodes(handler) as (fake,), Client([fake.address], timeout=5) as client:
            started = time.monotonic()
            assert await client.call("login", {"username": "a", "password": "b"}) == {"ok": True}
            assert time.monotonic() - started >= 0.4
        assert len(fake.requests) == 3
        assert len({frame["request_id"] for frame in fake.requests}) == 1

    asyncio.run(scenario())


@pytest.mark.parametrize("retry_after", [0, -5, "soon", None, float("nan")])
def test_busy_without_a_sane_wait_is_not_retried_in_a_tight_loop(retry_after: object) -> None:
    async def scenario() -> None:
        async with (
            fake_nodes(busy(retry_after)) as (fake,),
            Client([fake.address], timeout=0.5) as client,
        ):
            with pytest.raises(errors.Busy, match="too busy"):
                await client.call("login", {"username": "a", "password": "b"})
        # A pause of at least 0.1 s between attempts: a handful, not thousands.
        assert 2 <= len(fake.requests) <= 6

    asyncio.run(scenario())


def test_busy_for_longer_than_the_deadline_is_raised_at_once() -> None:
    async def scenario() -> None:
        async with fake_nodes(busy(30)) as (fake,), Client([fake.address], timeout=5) as client:
            started = time.monotonic()
            with pytest.raises(errors.Busy, match="too busy; try again") as raised:
                await client.call("login", {"username": "a", "password": "b"})
            assert time.monotonic() - started < 1
            assert raised.value.retry_after == 30
            assert raised.value.exit_code == errors.EXIT_UNAVAILABLE
        assert len(fake.requests) == 1

    asyncio.run(scenario())


def test_the_deadline_ends_the_retries() -> None:
    async def scenario() -> None:
        async with fake_nodes(drop, ignore) as (dropping, silent):
            client = Client([dropping.address, silent.address], timeout=0.6, attempt_timeout=0.2)
            started = time.monotonic()
            async with client:
                with pytest.raises(errors.Unavailable, match=r"no primary reachable within 0\.6 s"):
                    await client.call("send", {"to": "bob", "body": "hi"})
            assert time.monotonic() - started < 1.5
            # A slow attempt may also have asked the other node who leads (``status``,
            # a request of its own, once ``hedge_after`` passed before the attempt's
            # end: both are 0.2 s here, so which comes first is up to the scheduler).
            ids = {
                f["request_id"] for f in dropping.requests + silent.requests if f["op"] == "send"
            }
            assert len(ids) == 1

    asyncio.run(scenario())


def test_listen_resumes_after_the_last_message_without_gap_or_duplicate() -> None:
    streams = 0

    def message(message_id: int) -> dict[str, Any]:
        return {"id": message_id, "from": "a", "to": "b", "body": str(message_id)}

    async def node(frame: protocol.Frame, writer: asyncio.StreamWriter) -> None:
        nonlocal streams
        if frame["op"] != "listen":
            writer.write(protocol.encode_frame(protocol.reply(frame["request_id"], {})))
            return
        streams += 1
        rid = frame["request_id"]
        writer.write(protocol.encode_frame(protocol.reply(rid, {"listening": True})))
        # The first stream breaks after 2 messages; the second resends 2 (a duplicate).
        ids = [1, 2] if streams == 1 else [2, 3]
        for message_id in ids:
            writer.write(protocol.encode_frame(protocol.event(rid, message(message_id))))
        if streams == 1:
            await writer.drain()
            writer.close()

    async def scenario() -> None:
        async with fake_nodes(node) as (fake,), Client([fake.address], token="t") as client:
            stream = client.listen()
            seen = [(await anext(stream))["id"] for _ in range(3)]
            await stream.aclose()
        assert seen == [1, 2, 3]
        afters = [f["args"]["after"] for f in fake.requests if f["op"] == "listen"]
        assert afters == [None, 2]

    asyncio.run(scenario())


def test_an_idle_listen_probes_its_node_and_moves_on_when_it_is_frozen() -> None:
    frozen = False

    async def node(frame: protocol.Frame, writer: asyncio.StreamWriter) -> None:
        nonlocal frozen
        rid = frame["request_id"]
        if frozen:
            frozen = False  # swallow this one request, as a frozen node would
            return
        if frame["op"] == "listen":
            writer.write(protocol.encode_frame(protocol.reply(rid, {"listening": True})))
            after = frame["args"]["after"] or 0
            event = {"id": after + 1, "from": "a", "to": "b", "body": "x"}
            writer.write(protocol.encode_frame(protocol.event(rid, event)))
            frozen = after == 0  # the first stream's node freezes after one message
        else:
            writer.write(protocol.encode_frame(protocol.reply(rid, {"user": "b"})))

    async def scenario() -> None:
        async with fake_nodes(node) as (fake,):
            client = Client(
                [fake.address], timeout=5, token="t", attempt_timeout=0.2, keepalive=0.1
            )
            async with client:
                stream = client.listen()
                assert (await anext(stream))["id"] == 1
                assert (await anext(stream))["id"] == 2
                await stream.aclose()
        ops = [(f["op"], f["args"].get("after")) for f in fake.requests]
        assert ops[:3] == [("listen", None), ("whoami", None), ("listen", 1)]

    asyncio.run(scenario())


# ---- start-up ------------------------------------------------------------------------------


# What the console script does, as a program named chatctl (completion goes by the name).
_AS_CHATCTL = "import sys; sys.argv[0] = 'chatctl'; from service.cli import main; main()"


def _imported(args: list[str], home: Path, **env: str) -> set[str]:
    """The modules a chatctl run imports (``-X importtime``), the run's output aside."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", _AS_CHATCTL, *args],
        env={**os.environ, "CHATCTL_HOME": str(home), **env},
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    lines = [line for line in done.stderr.splitlines() if line.startswith("import time:")]
    assert lines, f"no import trace: {done.stderr}"
    return {line.rsplit("|", 1)[1].strip() for line in lines}


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--help"], {}),
        (["whoami"], {}),  # no session: refused before any node is contacted
        (["send", "bob", "hi", "--timeout", "-1"], {}),  # a usage error
        ([], {"_CHATCTL_COMPLETE": "complete_bash", "COMP_WORDS": "chatctl se", "COMP_CWORD": "1"}),
    ],
    ids=["help", "no-session", "usage-error", "completion"],
)
def test_a_command_that_talks_to_no_node_does_not_load_the_client(
    tmp_path: Path, args: list[str], env: dict[str, str]
) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    imported = _imported(args, home, **env)
    assert "service.cli" in imported
    assert not {"service.client", "asyncio"} & imported, "start-up pays for the client"


def test_shell_completion_can_be_shown_and_completes_commands(tmp_path: Path) -> None:
    # Typer takes the shell from the processes above chatctl (a shell a user types
    # in), and a test run whose parents hold no shell (started by `timeout`, say) got
    # "Shell  not supported". Typer's switch for its own tests makes the option take
    # the shell named here instead.
    env = {
        **os.environ,
        "CHATCTL_HOME": str(tmp_path),
        "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1",
    }
    shown = subprocess.run(
        [*CHATCTL, "--show-completion", "bash"],
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    assert "complete_bash" in shown.stdout
    completed = subprocess.run(
        [*CHATCTL],
        env={
            **env,
            "_CHATCTL_COMPLETE": "complete_bash",
            "COMP_WORDS": "chatctl se",
            "COMP_CWORD": "1",
        },
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    assert completed.stdout.split() == ["search", "send"], completed.stderr
