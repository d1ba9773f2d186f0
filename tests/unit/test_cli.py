"""chatctl without a server: usage, passwords, the session file, output shapes, exit codes.

The commands run in-process (typer's CliRunner) against ``FakeService``, a
small in-memory chat service behind a ``Client`` subclass that answers
``call`` itself; ``cli.client_factory`` is pointed at it. The same commands
run against a real node in ``tests/integration/test_client_cli.py``.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

import click
import pytest
import typer
from click.testing import Result
from typer.testing import CliRunner

from service import cli, errors
from service.client import DEFAULT_SERVERS, Client

MESSAGE_KEYS = {"id", "from", "to", "body", "sent_at", "read"}
PASSWORD = "correct horse"


class FakeService:
    """Just enough of the chat rules to drive every command."""

    def __init__(self) -> None:
        self.users: dict[str, tuple[int, str]] = {}
        self.sessions: dict[str, str] = {}
        self.messages: list[dict[str, Any]] = []
        self.fail_with: errors.ChatError | Exception | None = None
        self.statuses: list[dict[str, Any]] = []
        self.calls: list[tuple[str, dict[str, Any], str | None]] = []
        self.clients: list[FakeClient] = []

    def client(
        self, servers: list[str], timeout: float, token: str | None, tls: object = None
    ) -> Client:
        client = FakeClient(self, servers, timeout, token)
        self.clients.append(client)
        return client

    def handle(self, op: str, args: dict[str, Any], token: str | None) -> dict[str, Any]:
        self.calls.append((op, args, token))
        if self.fail_with is not None:
            raise self.fail_with
        if op == "register":
            if args["username"].lower() in self.users:
                raise errors.Conflict(f"the username {args['username']} is taken")
            self.users[args["username"].lower()] = (len(self.users) + 1, args["password"])
            return {"user": args["username"], "user_id": len(self.users)}
        if op == "login":
            user_id, password = self.users.get(args["username"].lower(), (0, ""))
            if password != args["password"]:
                raise errors.AuthFailed("wrong username or password")
            token = f"token-{len(self.sessions)}"
            self.sessions[token] = args["username"]
            unread = self._unread(token)
            return {"user": args["username"], "user_id": user_id, "unread": unread, "token": token}
        user = self.sessions.get(token or "")
        if user is None:
            raise errors.AuthFailed("your session has ended; log in again")
        if op == "logout":
            del self.sessions[str(token)]
            return {"user": user}
        if op == "whoami":
            return {"user": user, "user_id": self.users[user][0], "unread": self._unread(token)}
        if op == "search":
            return {"users": sorted(self.users)[: args["limit"]], "more": False}
        if op == "send":
            message = {
                "id": len(self.messages) + 1,
                "from": user,
                "to": args["to"],
                "body": args["body"],
                "sent_at": 1_700_000_000.5,
                "read": False,
                "extra": "ignored by chatctl",
            }
            self.messages.append(message)
            return {"message": dict(message)}
        if op == "read":
            shown = [m for m in self.messages if m["to"] == user][::-1][: args["limit"]]
            result = [dict(m) for m in shown]
            for message in shown:
                message["read"] = True
            return {"messages": result, "more": False}
        if op == "mark_read":
            return {"marked": len(args["ids"])}
        if op == "delete_messages":
            return {"deleted": sorted(args["ids"])}
        if op == "delete_account":
            return {"user": user, "deleted": True}
        raise errors.InvalidInput(f"unknown operation {op!r}")

    def _unread(self, token: str | None) -> int:
        user = self.sessions.get(token or "")
        return sum(1 for m in self.messages if m["to"] == user and not m["read"])


class FakeClient(Client):
    def __init__(
        self, service: FakeService, servers: list[str], timeout: float, token: str | None
    ) -> None:
        super().__init__(servers, timeout, token)
        self.service = service

    async def call(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        token: str | None = None,
        *,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        return self.service.handle(op, args or {}, token or self.token)

    async def status_all(self) -> list[dict[str, Any]]:
        return self.service.statuses

    async def listen(
        self,
        after: int | None = None,
        token: str | None = None,
        *,
        on_stream: Callable[[str | None], None] | None = None,
    ) -> AsyncGenerator[dict[str, Any], None]:
        self.service.calls.append(("listen", {"after": after}, token or self.token))
        if self.service.fail_with is not None:
            raise self.service.fail_with
        if on_stream is not None:
            on_stream(self.servers[0])
        for message in list(self.service.messages):
            yield dict(message)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "chatctl-home"
    monkeypatch.setenv("CHATCTL_HOME", str(folder))
    for name in ("CHAT_SERVERS", "CHATCTL_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    return folder


@pytest.fixture
def service(monkeypatch: pytest.MonkeyPatch, home: Path) -> FakeService:
    fake = FakeService()
    monkeypatch.setattr(cli, "client_factory", fake.client)
    return fake


def chatctl(*args: str, input: str | bytes | None = None, **env: str) -> Result:
    return CliRunner().invoke(cli.app, list(args), input=input, env=env or None)


def as_json(result: Result) -> dict[str, Any]:
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    obj = json.loads(lines[0])
    assert isinstance(obj, dict)
    return obj


@pytest.fixture
def alice(service: FakeService) -> FakeService:
    """``alice`` registered and logged in, ``bob`` registered."""
    for name in ("alice", "bob"):
        assert chatctl("register", name, CHATCTL_PASSWORD=PASSWORD).exit_code == 0
    assert chatctl("login", "alice", CHATCTL_PASSWORD=PASSWORD).exit_code == 0
    return service


# ---- bad usage -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["frobnicate"],
        ["send"],
        ["send", "bob"],
        ["read", "--limit", "0"],
        ["read", "--limit", "many"],
        ["delete-message"],
        ["delete-message", "seven"],
        ["listen", "--after", "-1"],
        ["whoami", "--timeout", "0"],
        ["whoami", "--timeout", "-3"],
        ["whoami", "--servers", "no-port-here"],
        ["whoami", "--servers", "127.0.0.1:99999"],
        ["--servers", "127.0.0.1:notaport", "status"],
        ["search", "a*", "b*"],
    ],
)
def test_bad_usage_exits_2(service: FakeService, args: list[str]) -> None:
    result = chatctl(*args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert "Traceback" not in result.output
    assert service.calls == []


@pytest.mark.parametrize(
    "args",
    [
        ["login", "alice", "--password", PASSWORD],
        ["login", "alice", f"--password={PASSWORD}"],
        ["login", "alice", PASSWORD],
        ["register", "alice", "-p", PASSWORD],
        ["register", "alice", PASSWORD, PASSWORD],
    ],
)
def test_a_password_is_never_an_argument(service: FakeService, args: list[str]) -> None:
    result = chatctl(*args)
    assert result.exit_code == 2
    assert service.calls == []


def test_help_offers_no_password_option() -> None:
    for command in ("login", "register"):
        text = chatctl(command, "--help").stdout
        assert "--password-stdin" in text
        assert "--password " not in text
        assert "--password\n" not in text


def test_every_command_ends_with_the_common_options() -> None:
    group = typer.main.get_group(cli.app)
    assert set(group.commands) == {
        "register", "login", "logout", "whoami", "search", "send", "read",
        "delete-message", "delete-account", "listen", "chat", "status",
    }  # fmt: skip
    for name, command in group.commands.items():
        common = ["--servers", "--timeout"] + ([] if name == "chat" else ["--json"])
        options = [p.opts[0] for p in command.params if isinstance(p, click.Option)]
        assert options[-len(common) :] == common, name
        assert next(p for p in command.params if p.name == "servers").envvar == "CHAT_SERVERS"


def test_without_a_terminal_or_another_source_there_is_no_password(service: FakeService) -> None:
    result = chatctl("login", "alice")
    assert result.exit_code == 2
    assert "--password-stdin" in result.stderr
    assert service.calls == []


# ---- passwords and the session file ------------------------------------------------------


def test_password_from_env_and_from_stdin(service: FakeService, home: Path) -> None:
    assert chatctl("register", "alice", CHATCTL_PASSWORD=PASSWORD).exit_code == 0
    assert service.calls[-1] == ("register", {"username": "alice", "password": PASSWORD}, None)
    result = chatctl("login", "alice", "--password-stdin", input=PASSWORD + "\nignored\n")
    assert result.exit_code == 0, result.stderr
    assert service.calls[-1][1] == {"username": "alice", "password": PASSWORD}
    assert "logged in as alice; 0 unread messages" in result.stdout
    # --password-stdin wins over the environment.
    result = chatctl(
        "login", "alice", "--password-stdin", input="wrong\n", CHATCTL_PASSWORD=PASSWORD
    )
    assert result.exit_code == 1
    assert result.stderr.strip() == "chatctl: wrong username or password"


def test_session_file_is_private_and_holds_user_token_servers(
    alice: FakeService, home: Path
) -> None:
    path = home / "session.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    data = json.loads(path.read_text())
    assert data == {"user": "alice", "token": "token-0", "servers": None}
    assert "token-0" not in chatctl("whoami").stdout


def test_session_stays_private_under_a_permissive_umask(service: FakeService, home: Path) -> None:
    old = os.umask(0)
    try:
        chatctl("register", "alice", CHATCTL_PASSWORD=PASSWORD)
        assert chatctl("login", "alice", CHATCTL_PASSWORD=PASSWORD).exit_code == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((home / "session.json").stat().st_mode) == 0o600


def test_login_stores_explicit_servers_and_later_commands_use_them(
    service: FakeService, home: Path
) -> None:
    servers = "127.0.0.1:9001,127.0.0.1:9002"
    chatctl("register", "alice", "--servers", servers, CHATCTL_PASSWORD=PASSWORD)
    assert chatctl("login", "alice", CHATCTL_PASSWORD=PASSWORD, CHAT_SERVERS=servers).exit_code == 0
    assert json.loads((home / "session.json").read_text())["servers"] == servers.split(",")
    chatctl("whoami")
    assert service.clients[-1].servers == servers.split(",")
    chatctl("whoami", CHAT_SERVERS="127.0.0.1:9100")
    assert service.clients[-1].servers == ["127.0.0.1:9100"]
    chatctl("whoami", "--servers", "127.0.0.1:9200", CHAT_SERVERS="127.0.0.1:9100")
    assert service.clients[-1].servers == ["127.0.0.1:9200"]
    # A new login without servers goes to the cluster of the session it replaces.
    assert chatctl("login", "alice", CHATCTL_PASSWORD=PASSWORD).exit_code == 0
    assert service.clients[-1].servers == servers.split(",")
    assert json.loads((home / "session.json").read_text())["servers"] == servers.split(",")


def test_default_servers_and_timeout(alice: FakeService) -> None:
    chatctl("whoami")
    assert alice.clients[-1].servers == list(DEFAULT_SERVERS)
    assert alice.clients[-1].timeout == 10.0
    chatctl("whoami", "--timeout", "2.5")
    assert alice.clients[-1].timeout == 2.5


def test_chatctl_home_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CHATCTL_HOME", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert cli.session_path() == tmp_path / "xdg" / "chatctl" / "session.json"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cli.session_path() == tmp_path / "home" / ".config" / "chatctl" / "session.json"
    monkeypatch.setenv("CHATCTL_HOME", str(tmp_path / "elsewhere"))
    assert cli.session_path() == tmp_path / "elsewhere" / "session.json"


@pytest.mark.parametrize("wide", [0o777, 0o1777, 0o702])
def test_a_session_folder_every_user_may_write_to_is_refused(
    service: FakeService, home: Path, wide: int
) -> None:
    home.mkdir()
    home.chmod(wide)
    # A session someone else could have planted, pointing at their own server.
    planted = {"user": "alice", "token": "t", "servers": ["203.0.113.9:7001"]}
    (home / "session.json").write_text(json.dumps(planted))
    expected = (
        f"chatctl: the session folder {home} is writable by every user; "
        "set CHATCTL_HOME to a folder of your own\n"
    )
    for args in (["login", "alice"], ["whoami"], ["status"], ["logout"]):
        result = chatctl(*args, CHATCTL_PASSWORD=PASSWORD)
        assert (result.exit_code, result.stdout, result.stderr) == (2, "", expected), args
    assert service.calls == []
    assert service.clients == []
    assert json.loads((home / "session.json").read_text()) == planted


def test_a_session_folder_of_another_user_is_refused(service: FakeService, home: Path) -> None:
    home.mkdir(mode=0o700)
    try:
        os.chown(home, os.geteuid() + 4242, -1)
    except PermissionError:
        pytest.skip("only root can give a folder to another user")
    result = chatctl("login", "alice", CHATCTL_PASSWORD=PASSWORD)
    assert result.exit_code == 2
    assert result.stderr == (
        f"chatctl: the session folder {home} belongs to another user; "
        "set CHATCTL_HOME to a folder of your own\n"
    )
    assert service.calls == []


def test_missing_parents_of_the_session_folder_are_made_private(
    service: FakeService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "config" / "chat" / "home"
    monkeypatch.setenv("CHATCTL_HOME", str(home))
    old = os.umask(0o022)
    try:
        chatctl("register", "alice", CHATCTL_PASSWORD=PASSWORD)
        assert chatctl("login", "alice", CHATCTL_PASSWORD=PASSWORD).exit_code == 0
    finally:
        os.umask(old)
    made = [tmp_path / "config", home.parent, home]
    assert [stat.S_IMODE(p.stat().st_mode) for p in made] == [0o700] * 3


@pytest.mark.parametrize(
    "args",
    [
        ["logout"],
        ["whoami"],
        ["search"],
        ["send", "bob", "hi"],
        ["read"],
        ["delete-message", "1"],
        ["delete-account", "--yes"],
        ["listen"],
    ],
)
def test_commands_needing_a_session_without_one_exit_1(
    service: FakeService, args: list[str]
) -> None:
    result = chatctl(*args)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == "chatctl: not logged in; run chatctl login USER\n"
    assert service.calls == []


def test_an_unreadable_session_counts_as_none(service: FakeService, home: Path) -> None:
    home.mkdir()
    (home / "session.json").write_text("{not json")
    assert chatctl("whoami").exit_code == 1


def test_logout_forgets_the_session_even_if_it_had_ended(alice: FakeService, home: Path) -> None:
    alice.sessions.clear()  # ended elsewhere (e.g. the account logged out on another device)
    result = chatctl("logout", "--json")
    assert as_json(result) == {"user": "alice", "ended": False}
    assert not (home / "session.json").exists()


def test_logout_keeps_the_session_when_no_primary_answers(alice: FakeService, home: Path) -> None:
    alice.fail_with = errors.Unavailable("no primary reachable within 10 s")
    result = chatctl("logout")
    assert result.exit_code == 3
    assert (home / "session.json").exists()


def test_login_ends_the_session_it_replaces(alice: FakeService) -> None:
    assert chatctl("login", "bob", CHATCTL_PASSWORD=PASSWORD).exit_code == 0
    assert ("logout", {}, "token-0") in alice.calls
    assert list(alice.sessions.values()) == ["bob"]


def test_an_ended_session_says_how_to_get_a_new_one(alice: FakeService) -> None:
    alice.sessions.clear()
    result = chatctl("whoami")
    assert result.exit_code == 1
    assert result.stderr == (
        "chatctl: your session has ended; log in again; run chatctl login alice\n"
    )


# ---- output shapes ---------------------------------------------------------------------


def test_json_shapes_of_every_command(alice: FakeService, home: Path) -> None:
    assert as_json(chatctl("whoami", "--json")) == {"user": "alice", "user_id": 1, "unread": 0}
    assert as_json(chatctl("search", "--json")) == {"users": ["alice", "bob"], "more": False}
    sent = as_json(chatctl("send", "alice", "note to self", "--json"))
    assert set(sent) == {"message"}
    assert set(sent["message"]) == MESSAGE_KEYS
    assert sent["message"]["body"] == "note to self"
    read = as_json(chatctl("read", "--json"))
    assert set(read) == {"messages", "more"}
    assert [set(m) for m in read["messages"]] == [MESSAGE_KEYS]
    assert as_json(chatctl("delete-message", "3", "1", "--json")) == {"deleted": [1, 3]}
    assert as_json(chatctl("delete-account", "--yes", "--json")) == {
        "user": "alice",
        "deleted": True,
    }
    assert not (home / "session.json").exists()
    assert as_json(chatctl("register", "carol", "--json", CHATCTL_PASSWORD=PASSWORD)) == {
        "user": "carol",
        "user_id": 3,
    }
    login = as_json(chatctl("login", "carol", "--json", CHATCTL_PASSWORD=PASSWORD))
    assert login == {"user": "carol", "user_id": 3, "unread": 0}
    assert as_json(chatctl("logout", "--json")) == {"user": "carol", "ended": True}


def test_json_before_the_command_works_too(alice: FakeService) -> None:
    assert as_json(chatctl("--json", "whoami"))["user"] == "alice"
    assert as_json(chatctl("--timeout", "3", "--json", "search", "b*"))["users"]


def test_text_output(alice: FakeService) -> None:
    assert chatctl("whoami").stdout == "alice (user id 1), 0 unread messages\n"
    search = chatctl("search").stdout.splitlines()
    assert [line.strip() for line in search] == ["USER", "alice", "bob"]
    assert chatctl("send", "alice", "two\nlines").stdout == "sent message 1 to alice\n"
    assert chatctl("whoami").stdout == "alice (user id 1), 1 unread message\n"
    lines = chatctl("read").stdout.splitlines()
    assert lines[0].startswith("1  ")
    assert lines[0].endswith("alice → alice  two")
    assert lines[1].strip() == "lines"
    assert lines[1].startswith(" ")
    assert chatctl("read").stdout.splitlines()[0].endswith("two")
    assert chatctl("delete-message", "1").stdout == "deleted message 1\n"


# What a body may carry, and how text output shows it.
SNEAKY = [
    ("\u202e", "\\u202e"),  # right-to-left override
    ("\u2066", "\\u2066"),  # left-to-right isolate
    ("\u200b", "\\u200b"),  # zero-width space
    ("\ufeff", "\\ufeff"),  # zero-width no-break space
    ("\x1b[2J", "\\u001b[2J"),  # a terminal escape: clear the screen
    ("\r", "\\u000d"),
    ("\x85", "\\u0085"),  # next line (C1 control)
    ("\ue000", "\\ue000"),  # private use
    ("\u2028", "\\u2028"),  # line separator
    ("\U000e0041", "\\U000e0041"),  # tag latin capital A (hides text)
    ("\ud800", "\\ud800"),  # a lone surrogate
    ("\U0010fffe", "\\U0010fffe"),  # a noncharacter, unassigned
]
# Shown as they are: ordinary text, and a joiner that draws one emoji of three.
PLAIN = ["héllo", "שלום", "tab\there", "👨\u200d👩\u200d👧", "❤\ufe0f\u200d🔥", "👍🏽"]


@pytest.mark.parametrize(("char", "shown"), SNEAKY)
def test_text_output_escapes_invisible_and_direction_changing_characters(
    alice: FakeService, char: str, shown: str
) -> None:
    alice.handle("send", {"to": "alice", "body": f"pay {char}100"}, "token-0")
    text = chatctl("read").stdout
    assert text.splitlines()[0].endswith(f"alice → alice  pay {shown}100")
    assert char not in text
    # listen shows messages the same way; --json carries the exact text.
    assert chatctl("listen", "--after", "0").stdout == text
    assert as_json(chatctl("read", "--json"))["messages"][0]["body"] == f"pay {char}100"


def test_text_output_keeps_ordinary_text_newlines_tabs_and_emoji(alice: FakeService) -> None:
    body = "\n".join(PLAIN)
    alice.handle("send", {"to": "alice", "body": body}, "token-0")
    lines = chatctl("read").stdout.splitlines()
    assert lines[0].endswith(f"alice → alice  {PLAIN[0]}")
    assert [line.lstrip(" ") for line in lines[1:]] == PLAIN[1:]


def test_errors_are_escaped_too(alice: FakeService) -> None:
    alice.fail_with = errors.NotFound("no user named \u202eevil")
    assert chatctl("whoami").stderr == "chatctl: no user named \\u202eevil\n"


def test_send_dash_reads_the_message_from_stdin(alice: FakeService) -> None:
    result = chatctl("send", "bob", "-", input="héllo\nfrom stdin\n")
    assert result.exit_code == 0, result.stderr
    assert alice.calls[-1][1] == {"to": "bob", "body": "héllo\nfrom stdin"}


def test_send_refuses_a_message_that_is_not_utf8(alice: FakeService) -> None:
    result = chatctl("send", "bob", "-", input=b"\xff\xfe bad")
    assert result.exit_code == 2
    assert "UTF-8" in result.stderr


def test_json_output_is_ascii_whatever_the_text(alice: FakeService) -> None:
    result = chatctl("send", "bob", "ünïcødé ✓", "--json")
    assert result.stdout.isascii()
    assert json.loads(result.stdout)["message"]["body"] == "ünïcødé ✓"


def test_delete_account_needs_confirmation_without_a_terminal(
    alice: FakeService, home: Path
) -> None:
    result = chatctl("delete-account")
    assert result.exit_code == 2
    assert "--yes" in result.stderr
    assert (home / "session.json").exists()
    assert all(op != "delete_account" for op, _, _ in alice.calls)


def test_listen_prints_one_json_object_per_line_and_marks_them_read(alice: FakeService) -> None:
    chatctl("send", "alice", "first")
    chatctl("send", "bob", "to bob")
    chatctl("send", "alice", "second")
    result = chatctl("listen", "--json", "--after", "0")
    assert result.exit_code == 0, result.stderr
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    assert [m["body"] for m in objects] == ["first", "to bob", "second"]
    assert all(set(m) == MESSAGE_KEYS for m in objects)
    assert ("listen", {"after": 0}, "token-0") in alice.calls
    marked = [args["ids"] for op, args, _ in alice.calls if op == "mark_read"]
    assert sorted(i for ids in marked for i in ids) == [1, 3]


# ---- errors and exit codes ------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.NotFound("no user named zed"), 1),
        (errors.InvalidInput("a message has 1 to 4000 characters"), 1),
        (errors.Gone("the account zed was deleted"), 1),
        (errors.Internal("disk I/O error"), 1),
        (errors.Unavailable("no primary reachable within 10 s"), 3),
        (errors.NotPrimary("no primary reachable within 10 s"), 3),
        (errors.Busy("too many failed logins for this account; try again in 9 seconds", 9), 3),
    ],
)
def test_errors_map_to_exit_codes(alice: FakeService, error: errors.ChatError, code: int) -> None:
    alice.fail_with = error
    for args in (["send", "zed", "hi"], ["send", "zed", "hi", "--json"], ["listen"]):
        result = chatctl(*args)
        assert result.exit_code == code
        assert result.stdout == ""
        assert result.stderr == f"chatctl: {error.message}\n"


def test_an_unexpected_exception_is_one_line_not_a_traceback(alice: FakeService) -> None:
    alice.fail_with = ZeroDivisionError("division by zero")
    result = chatctl("whoami")
    assert result.exit_code == 1
    assert result.stderr == "chatctl: internal error: ZeroDivisionError: division by zero\n"


# ---- status ----------------------------------------------------------------------------


def _status(address: str, node_id: int, role: str, seq: int, **extra: Any) -> dict[str, Any]:
    node = {
        "id": node_id,
        "address": address,
        "role": role,
        "epoch": 4,
        "seq": seq,
        "primary": "127.0.0.1:7001",
        "sync_set": {"version": 7, "members": [1, 2]},
        "waiting_for": None,
        "reason": None,
        **extra,
    }
    return {"address": address, "up": True, "node": node, "nodes": []}


@pytest.fixture
def cluster_view(service: FakeService) -> FakeService:
    service.statuses = [
        _status("127.0.0.1:7001", 1, "primary", 120),
        _status("127.0.0.1:7002", 2, "backup", 117),
        {"address": "127.0.0.1:7003", "up": False, "error": "connection refused"},
    ]
    return service


def test_status_table(cluster_view: FakeService) -> None:
    result = chatctl("status")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "ADDRESS", "NODE", "STATE", "ROLE", "EPOCH", "SEQ", "LAG", "SYNC", "SET", "NOTE"
    ]  # fmt: skip
    assert lines[1].split() == [
        "127.0.0.1:7001",
        "1",
        "up",
        "primary",
        "4",
        "120",
        "0",
        "v7",
        "[1,2]",
    ]
    assert lines[2].split()[:7] == ["127.0.0.1:7002", "2", "up", "backup", "4", "117", "3"]
    assert lines[3].split() == ["127.0.0.1:7003", "-", "down", *["-"] * 5, "connection", "refused"]
    assert "primary: 127.0.0.1:7001" in result.stdout


def test_status_json_and_the_unread_count_of_the_session(
    cluster_view: FakeService, home: Path
) -> None:
    chatctl("register", "alice", CHATCTL_PASSWORD=PASSWORD)
    chatctl("login", "alice", CHATCTL_PASSWORD=PASSWORD)
    summary = as_json(chatctl("status", "--json"))
    assert summary["primary"] == "127.0.0.1:7001"
    assert summary["session"] == {"user": "alice", "unread": 0, "ended": False}
    assert [n["lag"] for n in summary["nodes"]] == [0, 3, None]
    assert set(summary["nodes"][0]) == {
        "address", "up", "id", "role", "epoch", "seq", "lag", "primary", "sync_set",
        "waiting_for", "reason", "snapshot_waits", "checksums", "error",
    }  # fmt: skip
    assert summary["nodes"][2]["up"] is False


def test_status_tells_an_ended_session_from_a_primary_that_did_not_say(
    cluster_view: FakeService, home: Path
) -> None:
    chatctl("register", "alice", CHATCTL_PASSWORD=PASSWORD)
    chatctl("login", "alice", CHATCTL_PASSWORD=PASSWORD)
    cluster_view.fail_with = errors.Unavailable("the primary is busy")
    summary = as_json(chatctl("status", "--json"))
    assert summary["session"] == {"user": "alice", "unread": None, "ended": None}
    assert "logged in as alice: unread count unavailable" in chatctl("status").stdout
    cluster_view.fail_with = None
    cluster_view.sessions.clear()  # ended on the server: a logout elsewhere
    summary = as_json(chatctl("status", "--json"))
    assert summary["session"] == {"user": "alice", "unread": None, "ended": True}
    assert "but that session has ended: chatctl login alice" in chatctl("status").stdout


def test_status_names_the_backups_whose_snapshot_waits_and_why(service: FakeService) -> None:
    why = "no room for a copy of the database: it needs 63.3 MiB free"
    service.statuses = [
        _status("127.0.0.1:7001", 1, "primary", 120, snapshot_waits={"3": why}),
        _status("127.0.0.1:7002", 2, "backup", 120),
    ]
    result = chatctl("status")
    assert result.exit_code == 0, result.stderr
    primary_row = result.stdout.splitlines()[1]
    assert primary_row.endswith(f"snapshot for node 3 waits: {why}"), primary_row
    nodes = as_json(chatctl("status", "--json"))["nodes"]
    assert [n["snapshot_waits"] for n in nodes] == [{"3": why}, {}]


def test_status_exits_3_and_says_why_when_no_primary_is_known(service: FakeService) -> None:
    service.statuses = [
        _status("127.0.0.1:7001", 1, "electing", 50, primary=None, waiting_for=[2], reason="stale"),
        {"address": "127.0.0.1:7002", "up": False, "error": "no answer"},
    ]
    result = chatctl("status")
    assert result.exit_code == 3
    assert "waiting for node 2: stale" in result.stdout
    assert "primary: none known" in result.stdout
    assert chatctl("status", "--json").exit_code == 3


# A node's view of etcd (LeasedArbiter.status), in arbiter mode only.
ETCD_VIEW = {
    "mode": "etcd",
    "reachable": True,
    "unreachable": None,
    "leader": 1,
    "leader_epoch": 4,
    "leader_ttl": 2.0,
    "sync_set": {"version": 7, "members": [1, 2]},
}
CUT_OFF = {
    **ETCD_VIEW,
    "reachable": False,
    "unreachable": "127.0.0.10:2379: ConnectionTimeoutError: read timed out",
}


def test_status_in_arbiter_mode_shows_what_etcd_holds(service: FakeService) -> None:
    service.statuses = [
        _status("127.0.0.1:7001", 1, "primary", 120, arbiter={**ETCD_VIEW, "serving_for": 2.4}),
        _status("127.0.0.1:7002", 2, "backup", 117, arbiter={**ETCD_VIEW, "leader_ttl": 1.0}),
    ]
    result = chatctl("status")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    # Below the table, as the primary reads it.
    assert lines[lines.index("primary: 127.0.0.1:7001") + 1] == (
        "arbiter: etcd, leader key: node 1 (epoch 4), lease 2 s left, "
        "sync set in etcd: v7 [1,2] (read by node 1)"
    )
    assert "unreachable" not in result.stdout
    nodes = as_json(chatctl("status", "--json"))["nodes"]
    assert nodes[0]["arbiter"] == {**ETCD_VIEW, "serving_for": 2.4}
    assert nodes[1]["arbiter"] == {**ETCD_VIEW, "leader_ttl": 1.0}


def test_status_says_which_nodes_find_the_arbiter_unreachable(service: FakeService) -> None:
    service.statuses = [
        _status("127.0.0.1:7001", 1, "primary", 120, arbiter=CUT_OFF),
        _status("127.0.0.1:7002", 2, "backup", 120, arbiter={**ETCD_VIEW, "leader": None}),
        {"address": "127.0.0.1:7003", "up": False, "error": "connection refused"},
    ]
    lines = chatctl("status").stdout.splitlines()
    assert lines[-2:] == [
        "arbiter: etcd, leader key: free, sync set in etcd: v7 [1,2] (read by node 2)",
        "node 1: arbiter unreachable: 127.0.0.10:2379: ConnectionTimeoutError: read timed out",
    ]
    nodes = as_json(chatctl("status", "--json"))["nodes"]
    assert nodes[0]["arbiter"]["reachable"] is False
    assert nodes[0]["arbiter"]["unreachable"] == CUT_OFF["unreachable"]
    assert "arbiter" not in nodes[2]  # down: nothing known


def test_status_when_no_node_reaches_the_arbiter(service: FakeService) -> None:
    service.statuses = [
        _status("127.0.0.1:7001", 1, "electing", 120, primary=None, arbiter=CUT_OFF),
        _status("127.0.0.1:7002", 2, "electing", 120, primary=None, arbiter=CUT_OFF),
    ]
    result = chatctl("status")
    assert result.exit_code == 3
    assert [line for line in result.stdout.splitlines() if "arbiter" in line] == [
        f"node {i}: arbiter unreachable: {CUT_OFF['unreachable']}" for i in (1, 2)
    ]


def test_a_malformed_arbiter_part_counts_as_no_answer(service: FakeService) -> None:
    service.statuses = [
        _status("127.0.0.1:7001", 1, "primary", 120, arbiter={"mode": "etcd", "reachable": "yes"}),
    ]
    result = chatctl("status")
    assert "arbiter.reachable is 'yes', not true or false" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_status_asks_every_configured_server(service: FakeService) -> None:
    chatctl("status", "--servers", "127.0.0.1:1,127.0.0.1:2")
    assert service.clients[-1].servers == ["127.0.0.1:1", "127.0.0.1:2"]
