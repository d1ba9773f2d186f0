"""``chatctl chat``: the interactive terminal client (SPEC section 11), on Textual.

Screens: log in (skipped when the stored session still works), then the chat
screen: the conversations on the left with their unread counts, the open
conversation on the right (oldest message first, the newest at the bottom), a
notice line for the last error or result, the line to type on, a status line
(user, the node in use or "reconnecting…", unread total) and the footer with the
keys. Two dialogs: find a user, and a yes/no confirmation (deleting a message or
the account).

Theory of operation
-------------------
One ``Client`` for the whole app, in Textual's event loop. Every request runs in
a worker, so the screen never waits on the network; a failure shows as one
sentence on the notice line: the sentence ``chatctl`` prints for the same
request (its ``visible`` escaping included, as for every body shown).

Where conversations come from:

* the inbox: the app's one ``listen`` stream, started with ``after`` = 0, whose
  backlog is the whole inbox with each message's ``read`` flag, and which then
  carries every new message. Paging the inbox with ``read`` would mark every
  message it shows read, and starting the client must mark nothing.
* the sent box: paged with ``read`` (box ``sent``, newest first, ``before`` = the
  smallest id shown), which marks nothing.

A conversation is keyed by the other user's name (case folded; a note to self
is a conversation with oneself). Of a conversation that was never opened only a
summary is kept: its newest id (the list is sorted on it, newest first) and the
ids of the unread messages received in it (its unread count). Opening one loads
its messages with ``read`` ``with`` = the other user, newest first, paging back
until every unread message is covered and at least ``HISTORY`` are shown; that
read marks what it shows read. From then on the conversation stays loaded:
messages of the stream and ``send`` replies are added to it by id.

Invariants:

* A conversation's messages are a dict by id, shown sorted by id: a message
  that both a ``read`` page and the stream deliver is shown once.
* What is shown is read: whenever the open conversation holds messages counted
  unread, they are marked with ``mark_read`` (best effort, like ``chatctl
  listen``: a mark that fails leaves the message unread on the service) and
  leave the unread count. Opening resets the conversation's messages before
  its first ``read`` is sent, so a message committed after that read's snapshot
  comes by the stream into the fresh dict: no gap.
* Live messages and failover: ``Client.listen`` yields inbox messages in
  increasing id order and, when the stream breaks (primary killed, frozen,
  demoted), listens again on the new primary after the last id it yielded: no
  gap, no duplicate. Each message is routed to its conversation by sender. If
  ``listen`` gives up (no primary within the timeout) the app listens again
  after the largest id it has seen. The status line shows the node of the
  stream (``listen``'s ``on_stream`` notice) and "reconnecting…" from a break
  to the next stream.

Messages this user sends from another terminal show the next time their
conversation is opened: ``listen`` carries the inbox only.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, Input, OptionList, Static
from textual.widgets.option_list import Option

from . import errors
from .cli import Options, Session, UsageProblem, load_session, remove_session, save_session
from .cli import visible as _visible
from .client import Client, Result

# Messages shown when a conversation opens (more if more are unread).
HISTORY = 200
READ_PAGE = 200
SENT_PAGE = 1000
MARK_BATCH = 1000  # mark_read takes at most 1000 ids
SEARCH_LIMIT = 50
RECONNECTING = "reconnecting…"


def visible(text: str) -> Content:
    """Plain text as shown: invisible characters escaped, never read as markup."""
    return Content(_visible(text))


# ---- the conversations, derived from messages (no Textual here) ------------------------


def name_key(name: str) -> str:
    return name.casefold()


@dataclass
class Conversation:
    """The messages between this user and ``peer``, or their summary."""

    peer: str  # the other user's name as the service spells it
    last_id: int = 0  # the newest message, either way
    unread: set[int] = field(default_factory=set)  # received, unread, not shown here
    messages: dict[int, Result] | None = None  # by id, once opened

    @property
    def key(self) -> str:
        return name_key(self.peer)

    def ordered(self) -> list[Result]:
        return [self.messages[i] for i in sorted(self.messages)] if self.messages else []


class Conversations:
    """Every conversation of ``me``, fed by the listen stream, the sent box and reads."""

    def __init__(self, me: str) -> None:
        self.me = me
        self._by_key: dict[str, Conversation] = {}

    def __contains__(self, name: str) -> bool:
        return name_key(name) in self._by_key

    def get(self, name: str) -> Conversation | None:
        return self._by_key.get(name_key(name))

    def ensure(self, name: str) -> Conversation:
        key = name_key(name)
        if key not in self._by_key:
            self._by_key[key] = Conversation(name)
        return self._by_key[key]

    def drop(self, name: str) -> None:
        self._by_key.pop(name_key(name), None)

    def peer_of(self, message: Result) -> str:
        sender, recipient = str(message.get("from")), str(message.get("to"))
        return recipient if name_key(sender) == name_key(self.me) else sender

    def add(self, message: Result) -> Conversation | None:
        """File one message (received, sent, or read) under its conversation."""
        message_id = message.get("id")
        if not isinstance(message_id, int):
            return None
        peer = self.peer_of(message)
        conversation = self.ensure(peer)
        conversation.peer = peer  # as the service spells it, whatever was typed
        conversation.last_id = max(conversation.last_id, message_id)
        if conversation.messages is not None:
            conversation.messages[message_id] = message
        to_me = name_key(str(message.get("to"))) == name_key(self.me)
        if to_me and not message.get("read"):
            conversation.unread.add(message_id)
        return conversation

    def shown_by_read(self, conversation: Conversation, messages: Iterable[Result]) -> None:
        """A ``read`` page of this conversation: the service marked its messages read."""
        for message in messages:
            self.add(message)
            if isinstance(message.get("id"), int):
                conversation.unread.discard(message["id"])

    def take_shown_unread(self, conversation: Conversation) -> list[int]:
        """The unread ids the conversation shows, now counted read: to mark."""
        shown = conversation.messages or {}
        ids = sorted(i for i in conversation.unread if i in shown)
        conversation.unread.difference_update(ids)
        return ids

    def forget(self, message_id: int) -> None:
        """A deleted message."""
        for conversation in self._by_key.values():
            conversation.unread.discard(message_id)
            if conversation.messages is not None:
                conversation.messages.pop(message_id, None)

    def ordered(self) -> list[Conversation]:
        """Newest conversation first."""
        return sorted(self._by_key.values(), key=lambda c: (-c.last_id, c.key))

    def unread_total(self) -> int:
        return sum(len(c.unread) for c in self._by_key.values())


# ---- how things look -------------------------------------------------------------------


def clock(sent_at: object) -> str:
    """``HH:MM`` today, else ``YYYY-MM-DD HH:MM``, in local time."""
    if not isinstance(sent_at, int | float) or isinstance(sent_at, bool):
        return "?"
    then = time.localtime(sent_at)
    today = time.localtime()[:3] == then[:3]
    return time.strftime("%H:%M" if today else "%Y-%m-%d %H:%M", then)


def message_line(message: Result) -> Content:
    """``HH:MM sender: body``, the body's further lines indented under its first."""
    when, sender = clock(message.get("sent_at")), _visible(str(message.get("from")))
    indent = "\n" + " " * (len(when) + len(sender) + 3)
    body = _visible(str(message.get("body", ""))).replace("\n", indent)
    return Content.assemble((when, "dim"), " ", (sender, "bold"), ": ", body)


def conversation_line(conversation: Conversation, is_open: bool) -> Content:
    mark = "▸ " if is_open else "  "
    unread = len(conversation.unread)
    name = _visible(conversation.peer)
    if not unread:
        return Content.assemble(mark, name)
    return Content.assemble(mark, (name, "bold"), (f" ({unread})", "bold $accent"))


# ---- widgets ---------------------------------------------------------------------------


class ConversationList(OptionList):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("enter", "select", "Open")]


class MessageList(OptionList):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("delete", "screen.delete_message", "Delete message")
    ]


class MessageLine(Input):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("enter", "submit", "Send")]


class Notice(Static):
    """One line: the outcome of the last action (errors in the error colour)."""

    def say(self, text: str, *, error: bool = False) -> None:
        self.update(visible(text))
        self.set_class(error, "error")


# ---- the screens -----------------------------------------------------------------------


class ChatScreen(Screen[None]):
    """Conversations, the open one, the line to send on, the status line."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("tab", "app.focus_next", "Next pane"),
        Binding("ctrl+f", "find_user", "Find user", priority=True),
        Binding("f8", "delete_account", "Delete account", priority=True),
    ]

    def __init__(self, client: Client, user: str) -> None:
        super().__init__()
        self.client = client
        self.user = user
        self.model = Conversations(user)
        self.open_key: str | None = None
        self.node: str | None = None  # the node of the listen stream; None: none yet
        self.streamed = False  # a stream has started at least once
        self.last_seen = 0  # the largest inbox id the stream has given
        self._shown: list[int] = []  # the ids in the message list, in order
        self._unmarked: list[int] = []
        self._marking = False
        self._list_pending = False
        self._ended = False

    def compose(self) -> ComposeResult:
        with Horizontal(id="panes"):
            yield ConversationList(id="conversations")
            yield MessageList(id="messages")
        yield Notice(id="notice")
        yield MessageLine(placeholder="a message; enter sends", id="line")
        yield Static(id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(ConversationList).border_title = "Conversations"
        self.query_one(MessageList).border_title = "No conversation open"
        self.notice("enter opens a conversation; ctrl+f finds a user")
        self.show_status()
        self.query_one(ConversationList).focus()
        self.run_worker(self._guarded(self._listen()), name="listen")
        self.run_worker(self._guarded(self._load_sent_box()), name="sent box")

    # ---- the notice and status lines ----------------------------------------------

    def notice(self, text: str, *, error: bool = False) -> None:
        self.query_one(Notice).say(text, error=error)

    def show_status(self) -> None:
        if self.node is not None:
            where = self.node
        else:
            where = RECONNECTING if self.streamed else "connecting…"
        unread = self.model.unread_total()
        text = f"{self.user} · {where} · {unread} unread"
        self.query_one("#status", Static).update(visible(text))

    def _on_stream(self, address: str | None) -> None:
        self.node = address
        self.streamed = self.streamed or address is not None
        self.show_status()

    # ---- background work ----------------------------------------------------------

    def _run(self, work: Coroutine[Any, Any, None], group: str = "default") -> None:
        self.run_worker(self._guarded(work), group=group, exclusive=group != "default")

    async def _guarded(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work``; a failure becomes the sentence ``chatctl`` would print."""
        try:
            await work
        except errors.AuthFailed as exc:
            self.session_ended(exc)
        except errors.ChatError as exc:
            self.notice(exc.message, error=True)
        except Exception as exc:  # the last line of defence, as in chatctl
            self.notice(f"internal error: {type(exc).__name__}: {exc}", error=True)

    def session_ended(self, exc: errors.ChatError) -> None:
        """The session was logged out or the account deleted elsewhere."""
        app = self.app
        if isinstance(app, ChatApp) and not self._ended:
            self._ended = True
            app.log_in_again(exc.message, self.user)

    async def _listen(self) -> None:
        """The one stream of the app: the whole inbox, then every new message."""
        while True:
            try:
                async for message in self.client.listen(self.last_seen, on_stream=self._on_stream):
                    self.last_seen = max(self.last_seen, int(message["id"]))
                    self._arrived(message)
            except errors.Unavailable:
                # Nothing answered within the timeout: keep trying, after the last id.
                self._on_stream(None)
            except errors.AuthFailed as exc:
                self.session_ended(exc)
                return
            except errors.ChatError:
                self._on_stream(None)
                raise  # a refusal that no retry changes: shown on the notice line

    async def _load_sent_box(self) -> None:
        before: int | None = None
        while True:
            page = await self.client.read(sent=True, limit=SENT_PAGE, before=before)
            messages = page.get("messages") or []
            for message in messages:
                self.model.add(message)
            self._list_changed()
            if not page.get("more") or not messages:
                return
            before = min(int(m["id"]) for m in messages)

    # ---- messages arriving ---------------------------------------------------------

    def _arrived(self, message: Result) -> None:
        conversation = self.model.add(message)
        if conversation is not None and conversation.key == self.open_key:
            self._show_new(message)
        self._list_changed()

    def _show_new(self, message: Result) -> None:
        """One new message in the open conversation: append it, or redraw if out of order."""
        message_id = int(message["id"])
        if message_id in self._shown:
            self._mark_shown()
            return
        if self._shown and message_id < self._shown[-1]:
            self._render_messages()
            return
        messages = self.query_one(MessageList)
        following = messages.highlighted is None or messages.highlighted == len(self._shown) - 1
        messages.add_option(Option(message_line(message), id=str(message_id)))
        self._shown.append(message_id)
        if following:
            messages.highlighted = len(self._shown) - 1
        self._mark_shown()

    def _mark_shown(self) -> None:
        conversation = self.open_conversation()
        if conversation is None:
            return
        ids = self.model.take_shown_unread(conversation)
        if ids:
            self._unmarked.extend(ids)
            if not self._marking:
                self._marking = True
                self.run_worker(self._mark(), name="mark read", exit_on_error=False)
        self._list_changed()

    async def _mark(self) -> None:
        try:
            while self._unmarked:
                ids = self._unmarked[:MARK_BATCH]
                del self._unmarked[:MARK_BATCH]
                # Best effort: a message left unread shows again as unread elsewhere.
                with contextlib.suppress(errors.ChatError):
                    await self.client.mark_read(ids)
        finally:
            self._marking = False

    # ---- the conversation list -----------------------------------------------------

    def _list_changed(self) -> None:
        """Redraw the list and status soon: once for a burst (the backlog at start)."""
        if not self._list_pending:
            self._list_pending = True
            self.call_after_refresh(self._render_list)

    def _render_list(self) -> None:
        self._list_pending = False
        widget = self.query_one(ConversationList)
        current = widget.highlighted_option
        keep = current.id if current is not None else self.open_key
        conversations = self.model.ordered()
        widget.set_options(
            Option(conversation_line(c, c.key == self.open_key), id=c.key) for c in conversations
        )
        keys = [c.key for c in conversations]
        if keep in keys:
            widget.highlighted = keys.index(keep)
        elif keys:
            widget.highlighted = 0
        self.show_status()

    @on(OptionList.OptionSelected, "#conversations")
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        conversation = self.model.get(event.option.id or "")
        if conversation is not None:
            self.open(conversation.peer)

    # ---- the open conversation -----------------------------------------------------

    def open_conversation(self) -> Conversation | None:
        return self.model.get(self.open_key) if self.open_key is not None else None

    def open(self, name: str) -> None:
        """Open the conversation with ``name`` (an existing one, or a new one)."""
        previous = self.open_key
        is_new = name not in self.model
        conversation = self.model.ensure(name)
        # From here on the stream adds this conversation's messages to the fresh
        # dict, so whatever the first read misses arrives there.
        conversation.messages = {}
        self.open_key = conversation.key
        self._render_messages()
        self._list_changed()
        self.query_one(MessageLine).focus()
        self._run(self._load(conversation, previous, is_new), group="open")

    async def _load(self, conversation: Conversation, previous: str | None, is_new: bool) -> None:
        before: int | None = None
        try:
            while True:
                page = await self.client.read(
                    with_user=conversation.peer, limit=READ_PAGE, before=before
                )
                messages = page.get("messages") or []
                self.model.shown_by_read(conversation, messages)
                if not page.get("more") or not messages:
                    break
                before = min(int(m["id"]) for m in messages)
                loaded = len(conversation.messages or {})
                if loaded >= HISTORY and not any(i < before for i in conversation.unread):
                    break
        except errors.ChatError:
            if is_new and not conversation.messages:
                # No such user (or none reachable): back to where we were.
                self.model.drop(conversation.peer)
                self.open_key = previous
                self._render_messages()
                self._list_changed()
            raise
        finally:
            if self.open_key == conversation.key:
                self._render_messages()
        self.notice(f"conversation with {conversation.peer}")

    def _render_messages(self) -> None:
        widget = self.query_one(MessageList)
        conversation = self.open_conversation()
        messages = conversation.ordered() if conversation is not None else []
        widget.border_title = (
            _visible(conversation.peer) if conversation is not None else "No conversation open"
        )
        widget.set_options(Option(message_line(m), id=str(m["id"])) for m in messages)
        self._shown = [int(m["id"]) for m in messages]
        if self._shown:
            widget.highlighted = len(self._shown) - 1
        self._mark_shown()

    # ---- sending -------------------------------------------------------------------

    @on(Input.Submitted, "#line")
    def _submitted(self, event: Input.Submitted) -> None:
        conversation = self.open_conversation()
        if conversation is None:
            self.notice("open a conversation first: ctrl+f finds a user", error=True)
            return
        body = event.value
        event.input.value = ""
        self._run(self._send(conversation.peer, body))

    async def _send(self, peer: str, body: str) -> None:
        try:
            result = await self.client.send(peer, body)
        except errors.ChatError:
            line = self.query_one(MessageLine)
            if not line.value:
                line.value = body  # to fix and send again
            raise
        message = result.get("message") or {}
        conversation = self.model.add(message)
        if conversation is not None and conversation.key == self.open_key:
            self._show_new(message)
        self._list_changed()
        self.notice(f"sent message {message.get('id')} to {message.get('to')}")

    # ---- actions -------------------------------------------------------------------

    def action_find_user(self) -> None:
        def found(name: str | None) -> None:
            if name:
                self.open(name)

        self.app.push_screen(FindUserScreen(self.client), found)

    def action_delete_message(self) -> None:
        option = self.query_one(MessageList).highlighted_option
        if option is None or option.id is None:
            self.notice("no message selected", error=True)
            return
        message_id = int(option.id)

        def confirmed(yes: bool | None) -> None:
            if yes:
                self._run(self._delete_message(message_id))
            else:
                self.notice("not confirmed; the message was not deleted")

        question = f"Delete message {message_id} for both sides, forever?"
        self.app.push_screen(ConfirmScreen(question), confirmed)

    async def _delete_message(self, message_id: int) -> None:
        result = await self.client.delete_messages([message_id])
        deleted = [int(i) for i in result.get("deleted", [])]
        for i in deleted:
            self.model.forget(i)
        self._render_messages()
        self._list_changed()
        self.notice(f"deleted message {', '.join(str(i) for i in deleted)}")

    def action_delete_account(self) -> None:
        def confirmed(yes: bool | None) -> None:
            if yes:
                self._run(self._delete_account())
            else:
                self.notice("not confirmed; the account was not deleted")

        question = f"Delete the account {self.user} and every message in its inbox?"
        self.app.push_screen(ConfirmScreen(question), confirmed)

    async def _delete_account(self) -> None:
        # Deleting the account ends its sessions, and so this app's stream, with
        # auth_failed: that is the expected end here, not a reason to log in again.
        self._ended = True
        try:
            result = await self.client.delete_account()
        except BaseException:
            self._ended = False
            raise
        with contextlib.suppress(UsageProblem, OSError):
            remove_session()
        self.app.exit(f"deleted the account {result.get('user', self.user)}")


class LoginScreen(Screen[None]):
    """User name and password; the session is stored as ``chatctl login`` stores it."""

    def __init__(
        self, client: Client, servers: list[str] | None, user: str = "", reason: str = ""
    ) -> None:
        super().__init__()
        self.client = client
        self.servers = servers
        self.user = user
        self.reason = reason  # why we ask (the stored session has ended)

    def compose(self) -> ComposeResult:
        with Vertical(id="login"):
            yield Static("chatctl chat: log in", id="title")
            yield Input(self.user, placeholder="user name", id="user")
            yield Input(placeholder="password", password=True, id="password")
            yield Notice(id="notice")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#password" if self.user else "#user", Input).focus()
        if self.reason:
            self.notice(self.reason, error=True)

    def notice(self, text: str, *, error: bool = False) -> None:
        self.query_one(Notice).say(text, error=error)

    @on(Input.Submitted, "#user")
    def _user_given(self) -> None:
        self.query_one("#password", Input).focus()

    @on(Input.Submitted, "#password")
    def _password_given(self) -> None:
        user = self.query_one("#user", Input).value
        password = self.query_one("#password", Input).value
        self.notice("logging in…")
        self.run_worker(self._log_in(user, password), exclusive=True, exit_on_error=False)

    async def _log_in(self, user: str, password: str) -> None:
        try:
            result = await self.client.login(user, password)
            token = str(result["token"])
            previous = load_session()
            if previous is not None and previous.token != token:
                # The stored session is being replaced: end it rather than orphan it.
                with contextlib.suppress(errors.ChatError):
                    await self.client.logout(previous.token)
            name = str(result.get("user", user))
            servers = self.servers or (previous.servers if previous is not None else None)
            save_session(Session(name, token, servers))
        except errors.ChatError as exc:
            self.query_one("#password", Input).value = ""
            self.notice(exc.message, error=True)
            return
        except (UsageProblem, OSError) as exc:
            self.notice(str(exc), error=True)
            return
        app = self.app
        if isinstance(app, ChatApp):
            app.chat(name)


class FindUserScreen(ModalScreen[str | None]):
    """A name opens its conversation; a pattern with ``*`` or ``?`` lists users."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, client: Client) -> None:
        super().__init__()
        self.client = client

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static("Find a user: a name, or a pattern with * and ?")
            yield Input(placeholder="name or pattern, e.g. al*", id="pattern")
            yield OptionList(id="found")
            yield Notice(id="notice")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#found", OptionList).display = False
        self.query_one("#pattern", Input).focus()

    def action_cancel(self) -> None:
        self.dismiss(None)

    @on(Input.Submitted, "#pattern")
    def _given(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if text and not any(c in text for c in "*?"):
            self.dismiss(text)
            return
        self.run_worker(self._search(text), exclusive=True, exit_on_error=False)

    async def _search(self, pattern: str) -> None:
        notice = self.query_one(Notice)
        try:
            result = await self.client.search(pattern or None, SEARCH_LIMIT)
        except errors.ChatError as exc:
            notice.say(exc.message, error=True)
            return
        users = [str(name) for name in result.get("users", [])]
        found = self.query_one("#found", OptionList)
        found.set_options(Option(visible(name), id=name) for name in users)
        found.display = bool(users)
        if not users:
            notice.say("no user matches", error=True)
            return
        more = " (more match: narrow the pattern)" if result.get("more") else ""
        notice.say(f"{len(users)} found{more}; enter opens")
        found.highlighted = 0
        found.focus()

    @on(OptionList.OptionSelected, "#found")
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question; anything but y is no."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static(visible(self.question))
            yield Static("y: yes   n: no")
        yield Footer()

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


# ---- the app ---------------------------------------------------------------------------


class ChatApp(App[str]):
    """``chatctl chat``. Its result is a line for the terminal after it closes."""

    TITLE = "chatctl chat"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]
    CSS = """
    #panes { height: 1fr; }
    #conversations { width: 24; height: 100%; border: round $border-blurred; }
    #messages { width: 1fr; height: 100%; border: round $border-blurred; }
    #conversations:focus, #messages:focus { border: round $border; }
    #notice { height: 1; padding: 0 1; }
    Notice.error { color: $text-error; }
    #status { height: 1; padding: 0 1; background: $panel; }
    #login, #dialog { width: 60; height: auto; border: round $border; padding: 0 1; }
    LoginScreen, FindUserScreen, ConfirmScreen { align: center middle; }
    #found { height: auto; max-height: 10; }
    """

    def __init__(self, opts: Options) -> None:
        super().__init__()
        self.opts = opts
        # A bad --ca is a usage error before the screen takes the terminal.
        self.tls = opts.tls()
        self.session = load_session()
        self.client: Client | None = None

    def on_mount(self) -> None:
        session = self.session
        token = session.token if session is not None else None
        self.client = Client(self.opts.addresses(session), self.opts.timeout, token, tls=self.tls)
        if session is not None:
            self.push_screen(ChatScreen(self.client, session.user))
        else:
            self.push_screen(LoginScreen(self.client, self.opts.servers))

    async def on_unmount(self) -> None:
        if self.client is not None:
            await self.client.close()

    def chat(self, user: str) -> None:
        assert self.client is not None
        self.switch_screen(ChatScreen(self.client, user))

    def log_in_again(self, reason: str, user: str) -> None:
        assert self.client is not None
        self.switch_screen(LoginScreen(self.client, self.opts.servers, user, reason))


def main(opts: Options) -> None:
    """Run the app in this terminal; print its closing line."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UsageProblem("chatctl chat needs a terminal")
    line = ChatApp(opts).run()
    if line:
        sys.stdout.write(_visible(line) + "\n")
