"""chatctl: the one-shot command-line tool of the chat service (SPEC section 4).

Theory of operation
-------------------
Each command parses its arguments (typer), loads the session if it needs one,
runs one or two operations through ``client.Client`` (which finds the
primary, follows redirects and retries with the same request id), prints the
result and exits. ``command`` registers each one with the common options,
declared once, and ``execute`` wraps every command and is the only place that
turns failures into exit codes and one-sentence messages on stderr:

    0  done
    1  refused by the service (``errors.Refused`` and the other non-retriable
       errors), or an unexpected failure ("internal error: ...")
    2  bad usage (typer's own usage errors, bad --servers/--timeout, no way to
       read a password, mismatched passwords, a non-UTF-8 message on stdin, a
       session folder that another user owns or every user may write to)
    3  no primary reachable within --timeout (``errors.Unavailable``), or the
       service stays busy (``errors.Busy``: too many failed logins, or too many
       logins at once) for longer than --timeout allows; the message says when
       to try again
    130  interrupted by Ctrl-C (except ``listen``, for which Ctrl-C is the normal end: 0)

Choices a user can see
----------------------
* The common options (``--servers``, ``--timeout``, ``--json``) are accepted
  before the command name and after it; after it wins.
* TLS: ``--ca FILE`` (before the command name), else ``CHAT_CA``: the cluster's
  CA certificate; the nodes are then spoken to over TLS and verified against
  it. Without it, plain TCP, which the client allows to loopback addresses only.
* Servers: ``--servers``, else ``CHAT_SERVERS``, else the servers stored in
  the session at login, else the three local nodes of ``supervisord.conf``.
* The session is ``$CHATCTL_HOME/session.json`` (default
  ``$XDG_CONFIG_HOME/chatctl``, else ``~/.config/chatctl``): ``{"user",
  "token", "servers"}``, written atomically with mode 0600 in a 0700 folder
  (missing parents are made 0700 too). A session folder that another user
  owns or every user may write to is refused: it could hold a planted session.
  The token never appears on stdout. ``login`` replaces the session (and
  ends the one it replaces); ``logout`` removes the file even when the service
  says the session had already ended; it keeps it when no primary answers, so
  the logout can be retried.
* Passwords come from ``--password-stdin`` (the first line of stdin), else
  ``CHATCTL_PASSWORD``, else a hidden prompt (twice for ``register``) when
  stdin is a terminal; never from an argument.
* ``--json``: on success exactly one JSON object on stdout (``listen``: one
  message object per line), ASCII-only so any terminal encoding round-trips;
  on failure nothing on stdout. The objects are documented in README.md
  ("chatctl" section); field names there are stable.
* Text output shows message bodies (and every other line) with invisible and
  direction-changing characters escaped (``visible``): what a terminal shows
  is what was sent. ``--json`` carries the exact text.

Invariants
----------
* A traceback never reaches the user; every error is one line on stderr.
* A command that needs a session and has none exits 1 with
  "not logged in; run chatctl login USER" before contacting any node.

Start-up time
-------------
chatctl is one process per command, and shell completion runs it on every
TAB, so what it imports is paid each time. The client library (and with it
asyncio, about a third of the start-up) is imported only when a command
talks to the service; usage errors, ``--help``, completion and commands that
stop before contacting a node never import it. What is left is the
interpreter and typer (whose parameter parsing imports pydantic).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import stat
import sys
import time
import unicodedata
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from . import errors
from .config import parse_address
from .datadir import make_private_dirs

if TYPE_CHECKING:
    # Imported when a command runs (see "Start-up time").
    import ssl

    from .client import Client, Result
    from .status import ArbiterStatus, NodeStatus

T = TypeVar("T")

MESSAGE_FIELDS = ("id", "from", "to", "body", "sent_at", "read")
EXIT_INTERRUPTED = 130
# chatctl status and the unread count it shows must stay quick even when nodes are down.
STATUS_WHOAMI_TIMEOUT = 2.0
# --timeout's default, the client library's too (client.DEFAULT_TIMEOUT).
DEFAULT_TIMEOUT = 10.0


def service_client(
    servers: list[str], timeout: float, token: str | None, tls: ssl.SSLContext | None
) -> Client:
    """A ``client.Client``; the library is imported here, when a command needs it."""
    from .client import Client

    return Client(servers, timeout, token, tls=tls)


# The client class commands use; tests replace it with an in-memory fake.
client_factory: Callable[[list[str], float, str | None, ssl.SSLContext | None], Client] = (
    service_client
)

app = typer.Typer(
    name="chatctl",
    help="Talk to the replicated chat service.",
    add_completion=True,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class UsageProblem(Exception):
    """Bad usage found after parsing (exit 2)."""


# ---- common options --------------------------------------------------------------------

ServersOpt = Annotated[
    str | None,
    typer.Option(
        "--servers",
        envvar="CHAT_SERVERS",
        metavar="HOST:PORT,...",
        help="Nodes to contact (any node; default: the session's, else the 3 local nodes).",
        show_default=False,
    ),
]
TimeoutOpt = Annotated[
    float | None,
    typer.Option(
        "--timeout",
        metavar="SECONDS",
        help=f"Give up when no primary answers within this long [default: {DEFAULT_TIMEOUT:g}].",
        show_default=False,
    ),
]
CaOpt = Annotated[
    Path | None,
    typer.Option(
        "--ca",
        envvar="CHAT_CA",
        metavar="FILE",
        help="The cluster's CA certificate (PEM): speak TLS and verify the nodes against it.",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object (see README).")]
PasswordStdinOpt = Annotated[
    bool, typer.Option("--password-stdin", help="Read the password from the first line of stdin.")
]


@dataclass(frozen=True)
class Options:
    """The common options of one run, after merging global and per-command values."""

    servers: list[str] | None  # from --servers or CHAT_SERVERS; None: not given
    timeout: float
    json: bool
    ca: Path | None = None  # from --ca or CHAT_CA; None: plain TCP

    def tls(self) -> ssl.SSLContext | None:
        """The context that verifies the nodes against ``ca``; None for plain TCP."""
        if self.ca is None:
            return None
        from . import tls

        try:
            return tls.client_context(self.ca, "--ca")
        except errors.InvalidInput as exc:
            raise UsageProblem(exc.message) from None

    def addresses(self, session: Session | None = None) -> list[str]:
        if self.servers:
            return self.servers
        if session is not None and session.servers:
            return list(session.servers)
        from .client import DEFAULT_SERVERS

        return list(DEFAULT_SERVERS)


@dataclass(frozen=True)
class _Given:
    servers: str | None
    timeout: float | None
    json: bool
    ca: Path | None = None


@app.callback()
def _common(
    ctx: typer.Context,
    servers: ServersOpt = None,
    timeout: TimeoutOpt = None,
    json_out: JsonOpt = False,
    ca: CaOpt = None,
) -> None:
    ctx.obj = _Given(servers, timeout, json_out, ca)


def _options(
    ctx: typer.Context, servers: str | None, timeout: float | None, json_out: bool
) -> Options:
    given = ctx.obj if isinstance(ctx.obj, _Given) else _Given(None, None, False)
    text = servers if servers is not None else given.servers
    seconds = timeout if timeout is not None else given.timeout
    seconds = DEFAULT_TIMEOUT if seconds is None else seconds
    if not seconds > 0:
        raise UsageProblem("--timeout must be a positive number of seconds")
    return Options(parse_servers(text), seconds, json_out or given.json, given.ca)


def parse_servers(text: str | None) -> list[str] | None:
    """``HOST:PORT,HOST:PORT`` into a list; None or blank means "not given"."""
    if text is None or not text.strip():
        return None
    addresses = [part.strip() for part in text.split(",") if part.strip()]
    for address in addresses:
        try:
            parse_address(address)
        except errors.InvalidInput:
            raise UsageProblem(f"--servers: {address!r} is not a HOST:PORT address") from None
    return addresses


# ---- the session file ------------------------------------------------------------------


@dataclass(frozen=True)
class Session:
    user: str
    token: str
    servers: list[str] | None = None


def session_dir() -> Path:
    home = os.environ.get("CHATCTL_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".config"
    return base / "chatctl"


def checked_session_dir() -> Path:
    """``session_dir()``, refused (exit 2) when it exists and another user owns it or
    every user may write to it: whoever can write there could plant a session that
    sends the next login's password to their own server, or read the token."""
    folder = session_dir()
    try:
        info = folder.stat()
    except FileNotFoundError:
        return folder
    if info.st_uid != os.geteuid():
        raise UsageProblem(
            f"the session folder {folder} belongs to another user; "
            "set CHATCTL_HOME to a folder of your own"
        )
    if info.st_mode & stat.S_IWOTH:
        raise UsageProblem(
            f"the session folder {folder} is writable by every user; "
            "set CHATCTL_HOME to a folder of your own"
        )
    return folder


def session_path() -> Path:
    return checked_session_dir() / "session.json"


def load_session() -> Session | None:
    """The stored session, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads(session_path().read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    user, token, servers = data.get("user"), data.get("token"), data.get("servers")
    if not isinstance(user, str) or not isinstance(token, str):
        return None
    if not (isinstance(servers, list) and all(isinstance(s, str) for s in servers)):
        servers = None
    return Session(user, token, servers)


def require_session() -> Session:
    session = load_session()
    if session is None:
        raise errors.AuthFailed("not logged in; run chatctl login USER")
    return session


def save_session(session: Session) -> Path:
    """Write the session atomically; the file is 0600 whatever the umask, and any
    folder made for it 0700."""
    folder = checked_session_dir()
    make_private_dirs(folder)
    path = folder / "session.json"
    temporary = folder / f".session.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    data = json.dumps({"user": session.user, "token": session.token, "servers": session.servers})
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data.encode("utf-8") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    return path


def remove_session() -> None:
    with contextlib.suppress(FileNotFoundError):
        session_path().unlink()


# ---- passwords -------------------------------------------------------------------------


def read_password(from_stdin: bool, confirm: bool) -> str:
    """The password from stdin, CHATCTL_PASSWORD, or a hidden prompt (in that order)."""
    if from_stdin:
        line = sys.stdin.readline()
        return line.removesuffix("\n").removesuffix("\r")
    from_env = os.environ.get("CHATCTL_PASSWORD")
    if from_env is not None:
        return from_env
    if not sys.stdin.isatty():
        raise UsageProblem(
            "no password: use --password-stdin or CHATCTL_PASSWORD when stdin is not a terminal"
        )
    password: str = typer.prompt("Password", hide_input=True)
    if confirm:
        again: str = typer.prompt("Password again", hide_input=True)
        if again != password:
            raise UsageProblem("the two passwords do not match")
    return password


# ---- output ----------------------------------------------------------------------------


def emit_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=True, sort_keys=False) + "\n")
    sys.stdout.flush()


def say(text: str) -> None:
    sys.stdout.write(visible(text) + "\n")
    sys.stdout.flush()


def visible(text: str) -> str:
    """``text`` as a terminal should show it: every character that would be invisible
    or would change what the rest looks like is escaped, U+202E as ``\\u202e``.

    Escaped: format characters (bidi overrides and isolates, zero-width spaces and
    joiners, tags), controls other than newline and tab (a terminal escape would
    be one), private-use, unassigned, line and paragraph separators and lone
    surrogates. A zero-width joiner inside an emoji sequence is kept: it draws
    one emoji out of several. ``--json`` shows the exact text instead."""
    if text.isprintable():
        return text
    return "".join(
        char
        if char in _SHOWN_AS_IS
        or unicodedata.category(char) not in _INVISIBLE
        or _joins_emoji(text, index)
        else _escape(char)
        for index, char in enumerate(text)
    )


_SHOWN_AS_IS = frozenset("\n\t")
_INVISIBLE = frozenset({"Cc", "Cf", "Co", "Cn", "Cs", "Zl", "Zp"})
_ZERO_WIDTH_JOINER = "\u200d"
_EMOJI_PRESENTATION = "\ufe0f"


def _joins_emoji(text: str, index: int) -> bool:
    """Whether ``text[index]`` is a zero-width joiner between two emoji."""
    if text[index] != _ZERO_WIDTH_JOINER or not 0 < index < len(text) - 1:
        return False
    before, after = text[index - 1], text[index + 1]
    emoji_before = before == _EMOJI_PRESENTATION or unicodedata.category(before) in ("So", "Sk")
    return emoji_before and unicodedata.category(after) == "So"


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def message_view(message: Result) -> Result:
    """A message with exactly the documented fields."""
    return {field: message.get(field) for field in MESSAGE_FIELDS}


def format_time(value: object) -> str:
    """``sent_at`` (seconds since the Unix epoch) in local time."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    return str(value)


def format_message(message: Result, id_width: int = 0) -> str:
    """``id  time  from → to  body``, continuation lines of the body indented."""
    head = (
        f"{message.get('id')!s:>{id_width}}  {format_time(message.get('sent_at'))}  "
        f"{message.get('from')} → {message.get('to')}  "
    )
    lines = str(message.get("body", "")).split("\n")
    indent = " " * len(head)
    return head + lines[0] + "".join(f"\n{indent}{line}" for line in lines[1:])


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain text table, columns padded to their widest cell."""
    widths = [
        max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)
    ]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (headers, *rows)
    ]
    return "\n".join(lines)


# ---- running a command -----------------------------------------------------------------


def with_client(
    opts: Options,
    action: Callable[[Client], Coroutine[Any, Any, T]],
    session: Session | None = None,
    *,
    servers: list[str] | None = None,
    timeout: float | None = None,
) -> T:
    """Run ``action`` with a client for these options and the session's token."""
    from .client import SyncClient

    token = session.token if session is not None else None
    addresses = servers or opts.addresses(session)
    client = client_factory(addresses, timeout or opts.timeout, token, opts.tls())
    with SyncClient(client) as chat:
        return chat.run(action(client))


def fail(message: str) -> None:
    sys.stderr.write(f"chatctl: {visible(message)}\n")
    sys.stderr.flush()


def execute(
    ctx: typer.Context,
    common: tuple[str | None, float | None, bool],
    action: Callable[[Options], int | None],
    *,
    interrupt_ok: bool = False,
) -> None:
    """Run a command's ``action`` and exit with the code its outcome maps to."""
    try:
        code = action(_options(ctx, *common)) or errors.EXIT_OK
    except UsageProblem as exc:
        fail(str(exc))
        code = errors.EXIT_USAGE
    except errors.ChatError as exc:
        fail(exc.message)
        code = exc.exit_code
    except KeyboardInterrupt:
        code = errors.EXIT_OK if interrupt_ok else EXIT_INTERRUPTED
        if not interrupt_ok:
            fail("interrupted")
    except BrokenPipeError:
        # The reader went away (``chatctl listen | head``): stop quietly.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = errors.EXIT_REFUSED
    except Exception as exc:  # the last line of defence: never a traceback
        fail(f"internal error: {type(exc).__name__}: {exc}")
        code = errors.EXIT_REFUSED
    raise typer.Exit(code)


def session_error(exc: errors.ChatError, session: Session) -> errors.ChatError:
    """Add the way out to an ended session's message."""
    if isinstance(exc, errors.AuthFailed):
        return errors.AuthFailed(f"{exc.message}; run chatctl login {session.user}")
    return exc


def with_session(
    opts: Options, action: Callable[[Client], Coroutine[Any, Any, T]]
) -> tuple[Session, T]:
    """Run ``action`` as the logged-in user."""
    session = require_session()
    try:
        return session, with_client(opts, action, session)
    except errors.ChatError as exc:
        replaced = session_error(exc, session)
        if replaced is exc:
            raise
        raise replaced from None


# What a command does once its options are merged; its exit code, None for 0.
Action = Callable[[Options], int | None]
_COMMON = (
    inspect.Parameter(
        "servers", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ServersOpt
    ),
    inspect.Parameter(
        "timeout", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=TimeoutOpt
    ),
    inspect.Parameter(
        "json_out", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=JsonOpt
    ),
)
_CONTEXT = inspect.Parameter(
    "ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context
)


def command(
    name: str | None = None, *, with_json: bool = True, interrupt_ok: bool = False
) -> Callable[[Callable[..., Action]], Callable[..., Action]]:
    """Register a command that takes its own arguments and returns its ``Action``.

    The common options are declared here once: typer sees each command with its
    own parameters followed by ``--servers``, ``--timeout`` and (unless
    ``with_json`` is False) ``--json``, as ``--help`` lists them; their values, merged with those
    given before the command name, reach the action as ``Options``, and
    ``execute`` turns its outcome into the exit code."""

    def register(build: Callable[..., Action]) -> Callable[..., Action]:
        own = list(inspect.signature(build, eval_str=True).parameters.values())
        common = _COMMON if with_json else _COMMON[:2]

        def run(ctx: typer.Context, **given: Any) -> None:
            values = (given.pop("servers"), given.pop("timeout"), given.pop("json_out", False))
            execute(ctx, values, lambda opts: build(**given)(opts), interrupt_ok=interrupt_ok)

        # typer reads the parameters from the signature (and the help from the docstring).
        run.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [_CONTEXT, *own, *common], return_annotation=None
        )
        run.__name__, run.__doc__ = build.__name__, build.__doc__
        app.command(name)(run)
        return build

    return register


# ---- commands --------------------------------------------------------------------------


@command()
def register(
    user: Annotated[str, typer.Argument(metavar="USER", help="The new user name.")],
    password_stdin: PasswordStdinOpt = False,
) -> Action:
    """Create an account (then log in with `chatctl login USER`)."""

    def action(opts: Options) -> None:
        password = read_password(password_stdin, confirm=True)
        servers = opts.addresses(load_session())
        result = with_client(opts, lambda c: c.register(user, password), servers=servers)
        if opts.json:
            emit_json({"user": result.get("user"), "user_id": result.get("user_id")})
        else:
            say(f"registered {result.get('user')} (user id {result.get('user_id')})")

    return action


@command()
def login(
    user: Annotated[str, typer.Argument(metavar="USER", help="Your user name.")],
    password_stdin: PasswordStdinOpt = False,
) -> Action:
    """Log in and store the session; reports the unread count."""

    def action(opts: Options) -> None:
        password = read_password(password_stdin, confirm=False)
        previous = load_session()

        async def run(client: Client) -> Result:
            result = await client.login(user, password)
            if previous is not None and previous.token != client.token:
                # The stored session is being replaced: end it rather than orphan it.
                with contextlib.suppress(errors.ChatError):
                    await client.logout(previous.token)
            return result

        result = with_client(opts, run, servers=opts.addresses(previous))
        name = str(result.get("user", user))
        servers = opts.servers or (previous.servers if previous is not None else None)
        save_session(Session(name, str(result["token"]), servers))
        unread = result.get("unread")
        if opts.json:
            emit_json({"user": name, "user_id": result.get("user_id"), "unread": unread})
        else:
            say(f"logged in as {name}; {plural(int(unread or 0), 'unread message')}")

    return action


@command()
def logout() -> Action:
    """End the session on every node and forget it here."""

    def action(opts: Options) -> None:
        session = require_session()
        try:
            with_client(opts, lambda c: c.logout(), session)
            ended = True
        except (errors.AuthFailed, errors.Gone):
            ended = False  # already over on the service: forget it all the same
        remove_session()
        if opts.json:
            emit_json({"user": session.user, "ended": ended})
        elif ended:
            say(f"logged out {session.user}")
        else:
            say(f"logged out {session.user} (the session had already ended)")

    return action


@command()
def whoami() -> Action:
    """Show the logged-in user and the number of unread messages."""

    def action(opts: Options) -> None:
        _, result = with_session(opts, lambda c: c.whoami())
        unread = int(result.get("unread") or 0)
        if opts.json:
            emit_json(
                {"user": result.get("user"), "user_id": result.get("user_id"), "unread": unread}
            )
        else:
            name, user_id = result.get("user"), result.get("user_id")
            say(f"{name} (user id {user_id}), {plural(unread, 'unread message')}")

    return action


@command()
def search(
    pattern: Annotated[
        str | None,
        typer.Argument(metavar="PATTERN", help="Glob with * and ?, any case (default: everyone)."),
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", metavar="N", min=1, help="At most N names.")
    ] = 50,
) -> Action:
    """List users whose name matches PATTERN, sorted."""

    def action(opts: Options) -> None:
        _, result = with_session(opts, lambda c: c.search(pattern, limit))
        users = [str(name) for name in result.get("users", [])]
        more = bool(result.get("more"))
        if opts.json:
            emit_json({"users": users, "more": more})
            return
        if not users:
            say("no user matches")
            return
        say(table(["USER"], [[name] for name in users]))
        if more:
            say(f"(more users match; raise --limit above {limit} to see them)")

    return action


@command()
def send(
    user: Annotated[str, typer.Argument(metavar="USER", help="The recipient.")],
    message: Annotated[
        str, typer.Argument(metavar="MESSAGE", help="The text; - reads it from stdin.")
    ],
) -> Action:
    """Send MESSAGE to USER."""

    def action(opts: Options) -> None:
        body = read_body() if message == "-" else message
        _, result = with_session(opts, lambda c: c.send(user, body))
        sent = message_view(result.get("message") or {})
        if opts.json:
            emit_json({"message": sent})
        else:
            say(f"sent message {sent['id']} to {sent['to']}")

    return action


def read_body() -> str:
    """The whole of stdin as UTF-8, without the one newline that ends a file."""
    data = sys.stdin.buffer.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageProblem("the message on stdin is not UTF-8 text") from None
    return text.removesuffix("\n").removesuffix("\r")


@command()
def read(
    sent: Annotated[bool, typer.Option("--sent", help="Messages you sent.")] = False,
    with_user: Annotated[
        str | None, typer.Option("--with", metavar="USER", help="One conversation, both ways.")
    ] = None,
    from_user: Annotated[
        str | None, typer.Option("--from", metavar="USER", help="Only messages from USER.")
    ] = None,
    unread: Annotated[bool, typer.Option("--unread", help="Only unread messages.")] = False,
    limit: Annotated[
        int, typer.Option("--limit", metavar="N", min=1, help="At most N messages.")
    ] = 20,
    before: Annotated[
        int | None, typer.Option("--before", metavar="ID", min=0, help="Ids below ID.")
    ] = None,
    after: Annotated[
        int | None, typer.Option("--after", metavar="ID", min=0, help="Ids above ID.")
    ] = None,
    oldest_first: Annotated[
        bool, typer.Option("--oldest-first", help="Oldest first (default: newest first).")
    ] = False,
) -> Action:
    """Show messages, newest first; inbox messages shown become read."""

    def action(opts: Options) -> None:
        _, result = with_session(
            opts,
            lambda c: c.read(
                sent=sent,
                with_user=with_user,
                from_user=from_user,
                unread=unread,
                limit=limit,
                before=before,
                after=after,
                oldest_first=oldest_first,
            ),
        )
        messages = [message_view(m) for m in result.get("messages", [])]
        more = bool(result.get("more"))
        if opts.json:
            emit_json({"messages": messages, "more": more})
            return
        if not messages:
            say("no messages")
            return
        width = max(len(str(m["id"])) for m in messages)
        for message in messages:
            say(format_message(message, width))
        if more:
            edge = (
                max(m["id"] for m in messages) if oldest_first else min(m["id"] for m in messages)
            )
            flag = "--after" if oldest_first else "--before"
            say(f"(more messages: add {flag} {edge})")

    return action


@command("delete-message")
def delete_message(
    ids: Annotated[list[int], typer.Argument(metavar="ID", help="Message ids.")],
) -> Action:
    """Delete messages you sent or received, for both sides (all of them or none)."""

    def action(opts: Options) -> None:
        _, result = with_session(opts, lambda c: c.delete_messages(ids))
        deleted = [int(i) for i in result.get("deleted", [])]
        if opts.json:
            emit_json({"deleted": deleted})
        else:
            listed = ", ".join(str(i) for i in deleted)
            say(f"deleted {'message' if len(deleted) == 1 else 'messages'} {listed}")

    return action


@command("delete-account")
def delete_account(
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> Action:
    """Delete your account and your inbox, and end all its sessions."""

    def action(opts: Options) -> None:
        session = require_session()
        if not yes:
            if not sys.stdin.isatty():
                raise UsageProblem("confirm with --yes to delete an account without a terminal")
            question = f"Delete the account {session.user} and every message in its inbox?"
            if not typer.confirm(question, default=False):
                raise errors.Refused("not confirmed; the account was not deleted")
        _, result = with_session(opts, lambda c: c.delete_account())
        remove_session()
        name = result.get("user", session.user)
        if opts.json:
            emit_json({"user": name, "deleted": True})
        else:
            say(f"deleted the account {name}")

    return action


@command(interrupt_ok=True)
def listen(
    after: Annotated[
        int | None,
        typer.Option(
            "--after", metavar="ID", min=0, help="Start after message ID (default: unread)."
        ),
    ] = None,
) -> Action:
    """Print messages as they arrive, until Ctrl-C; survives a failover."""

    def action(opts: Options) -> None:
        session = require_session()
        if not opts.json and sys.stderr.isatty():
            note(f"listening as {session.user}; Ctrl-C to stop")
        try:
            with_client(opts, lambda c: follow(c, session.user, after, opts.json), session)
        except errors.ChatError as exc:
            raise session_error(exc, session) from None

    return action


def note(text: str) -> None:
    """An informational line on stderr (stdout carries only messages)."""
    sys.stderr.write(visible(text) + "\n")
    sys.stderr.flush()


async def follow(client: Client, user: str, after: int | None, as_json: bool) -> None:
    """Print every message of ``client.listen`` and mark the shown ones read."""
    import asyncio

    unmarked: list[int] = []
    marker: asyncio.Task[None] | None = None

    async def mark() -> None:
        # Best effort: a message left unread shows again in the next backlog.
        while unmarked:
            ids = unmarked[:]
            unmarked.clear()
            with contextlib.suppress(errors.ChatError):
                await client.mark_read(ids)

    async for message in client.listen(after):
        view = message_view(message)
        if as_json:
            emit_json(view)
        else:
            say(format_message(view))
        if view["to"] == user and not view["read"] and isinstance(view["id"], int):
            unmarked.append(view["id"])
            if marker is None or marker.done():
                marker = asyncio.create_task(mark())


@command(with_json=False)
def chat() -> Action:
    """Chat interactively: conversations, live messages, a line to send (see README)."""

    def action(opts: Options) -> None:
        from . import tui  # Textual takes a while to import: only this command pays

        tui.main(opts)

    return action


@command()
def status() -> Action:
    """Show every configured node; exit 3 when no primary is known."""

    def action(opts: Options) -> int:
        session = load_session()
        addresses = opts.addresses(session)
        reports = with_client(opts, lambda c: c.status_all(), servers=addresses)
        view = ClusterView.of(reports)
        summary = view.summary()
        summary["session"] = session_summary(opts, session, view.primary) if session else None
        if opts.json:
            emit_json(summary)
        else:
            say(render_status(view, summary["session"]))
        return errors.EXIT_OK if view.primary is not None else errors.EXIT_UNAVAILABLE

    return action


def session_summary(opts: Options, session: Session, primary: str | None) -> Result:
    """The logged-in user's unread count, if the primary tells it quickly; ``ended``
    true when the primary says the saved session is over (logged out elsewhere,
    expired, its account deleted, or a cluster made anew), so that status says to
    log in rather than that the count is unavailable; None when nobody said."""
    unread: int | None = None
    ended: bool | None = None
    if primary is not None:
        try:
            result = with_client(
                opts,
                lambda c: c.whoami(),
                session,
                servers=[primary],
                timeout=min(opts.timeout, STATUS_WHOAMI_TIMEOUT),
            )
        except errors.AuthFailed:
            ended = True
        except errors.ChatError:
            pass
        else:
            unread = int(result.get("unread") or 0)
            ended = False
    return {"user": session.user, "unread": unread, "ended": ended}


@dataclass(frozen=True)
class NodeReport:
    """One configured node: its typed status, or why there is none."""

    address: str
    status: NodeStatus | None
    error: str | None

    @classmethod
    def of(cls, report: Result) -> NodeReport:
        """From a ``status_all`` report; a malformed status counts as no answer."""
        from .status import NodeStatus

        address = str(report.get("address"))
        if not report.get("up"):
            return cls(address, None, report.get("error"))
        try:
            return cls(address, NodeStatus.from_wire(report.get("node")), None)
        except errors.ProtocolViolation as exc:
            return cls(address, None, exc.message)


@dataclass(frozen=True)
class ClusterView:
    """What ``chatctl status`` shows: every node, and the primary they point at."""

    nodes: tuple[NodeReport, ...]
    primary: str | None  # the leading node's address, else the primary some node names
    primary_seq: int | None  # the leading node's seq, for the lag of the others

    @classmethod
    def of(cls, reports: Sequence[Result]) -> ClusterView:
        from .status import leading

        nodes = tuple(NodeReport.of(report) for report in reports)
        statuses = [node.status for node in nodes if node.status is not None]
        leader = leading(statuses)
        if leader is not None:
            primary = next(node.address for node in nodes if node.status is leader)
            return cls(nodes, primary, leader.seq)
        named = next((status.primary for status in statuses if status.primary is not None), None)
        return cls(nodes, named, None)

    def lag(self, status: NodeStatus) -> int | None:
        """How many transactions the node is behind the leading primary."""
        return None if self.primary_seq is None else max(0, self.primary_seq - status.seq)

    def summary(self) -> Result:
        """The ``status --json`` object, without ``session``."""
        return {"primary": self.primary, "nodes": [self._row(node) for node in self.nodes]}

    def _row(self, node: NodeReport) -> Result:
        status = node.status
        row: Result = dict.fromkeys(STATUS_FIELDS)
        row.update(address=node.address, up=status is not None, error=node.error)
        if status is not None:
            row.update(
                id=status.node_id,
                role=status.role,
                epoch=status.epoch,
                seq=status.seq,
                lag=self.lag(status),
                primary=status.primary,
                sync_set=status.sync_set_wire(),
                waiting_for=None if status.waiting_for is None else list(status.waiting_for),
                reason=status.reason,
                snapshot_waits={str(k): v for k, v in sorted(status.snapshot_waits.items())},
                checksums=None if status.checksums is None else status.checksums.to_status(),
            )
            if status.arbiter is not None:  # only with an arbiter: default output unchanged
                row["arbiter"] = status.arbiter.to_status()
        return row


# The fields of a node in ``status --json``, in their order.
STATUS_FIELDS = (
    "address", "up", "id", "role", "epoch", "seq", "lag", "primary", "sync_set",
    "waiting_for", "reason", "snapshot_waits", "checksums", "error",
)  # fmt: skip


def render_status(view: ClusterView, session: Result | None) -> str:
    headers = ["ADDRESS", "NODE", "STATE", "ROLE", "EPOCH", "SEQ", "LAG", "SYNC SET", "NOTE"]
    rows = []
    for node in view.nodes:
        status = node.status
        if status is None:
            rows.append([node.address, "-", "down", "-", "-", "-", "-", "-", node.error or ""])
            continue
        members = ",".join(str(m) for m in status.members)
        rows.append(
            [
                node.address,
                str(status.node_id),
                "up",
                status.role,
                str(status.epoch),
                str(status.seq),
                _cell(view.lag(status)),
                f"v{status.sync_set.version} [{members}]",
                _note(status),
            ]
        )
    lines = [table(headers, rows), ""]
    lines.append(f"primary: {view.primary or 'none known'}")
    lines.extend(_arbiter_lines(view))
    if session and session.get("ended"):
        user = session["user"]
        lines.append(f"logged in as {user}, but that session has ended: chatctl login {user}")
    elif session:
        unread = session.get("unread")
        count = "unread count unavailable" if unread is None else plural(unread, "unread message")
        lines.append(f"logged in as {session['user']}: {count}")
    return "\n".join(lines)


def _arbiter_lines(view: ClusterView) -> list[str]:
    """With an arbiter (SPEC section 10): what it holds, as read by the node best placed
    to know (the primary, else the first node that reaches it), then every node that
    cannot reach it. Nothing in the default mode."""
    views = [
        (node.address, node.status.node_id, node.status.arbiter)
        for node in view.nodes
        if node.status is not None and node.status.arbiter is not None
    ]
    reached = [item for item in views if item[2].reachable]
    lines = []
    if reached:
        _, node_id, arbiter = min(reached, key=lambda item: (item[0] != view.primary, item[1]))
        lines.append(_arbiter_line(node_id, arbiter))
    lines.extend(
        f"node {node_id}: arbiter unreachable: {arbiter.unreachable or 'no answer'}"
        for _, node_id, arbiter in views
        if not arbiter.reachable
    )
    return lines


def _arbiter_line(reader: int, arbiter: ArbiterStatus) -> str:
    """``arbiter: etcd, leader key: node 2 (epoch 4), lease 2 s left, sync set in etcd:
    v7 [1,2,3] (read by node 2)``."""
    parts = [f"arbiter: {arbiter.mode}"]
    if arbiter.leader is None:
        parts.append("leader key: free")
    else:
        parts.append(f"leader key: node {arbiter.leader} (epoch {arbiter.leader_epoch})")
        if arbiter.leader_ttl is not None:
            parts.append(f"lease {arbiter.leader_ttl:g} s left")
    stored = arbiter.sync_set
    members = "none" if stored is None else f"v{stored.version} [{_ids(stored.members)}]"
    parts.append(f"sync set in {arbiter.mode}: {members}")
    return ", ".join(parts) + f" (read by node {reader})"


def _ids(ids: Sequence[int]) -> str:
    return ",".join(str(i) for i in ids)


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


def _note(status: NodeStatus) -> str:
    """Why a node waits, and (on a primary) which backups' snapshots wait, and why."""
    notes = [_waiting(status)] if status.reason or status.waiting_for else []
    notes.extend(
        f"snapshot for node {peer} waits: {why}"
        for peer, why in sorted(status.snapshot_waits.items())
    )
    return "; ".join(notes)


def _waiting(status: NodeStatus) -> str:
    """Why a node waits: ``waiting for node 2,3: <reason>``."""
    reason, waiting_for = status.reason, status.waiting_for
    if waiting_for:
        ids = ",".join(str(i) for i in waiting_for)
        return f"waiting for node {ids}: {reason}" if reason else f"waiting for node {ids}"
    return f"waiting: {reason}" if reason else ""


def main() -> None:
    """The ``chatctl`` console script."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(Exception):
                reconfigure(errors="replace")
    try:
        app()
    except KeyboardInterrupt:  # Ctrl-C while typer was still parsing
        fail("interrupted")
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
