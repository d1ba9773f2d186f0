"""``chatctl chat`` against a real 3-node cluster, driven headless at 80x24.

The app runs under Textual's pilot (``App.run_test``) in the test's event loop;
the other users are real ``chatctl`` runs with their own CHATCTL_HOME (started
in a thread, so the app keeps running while they do). Every wait polls the
app's widgets with a deadline (``until``); nothing sleeps a fixed time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from textual.css.query import NoMatches
from textual.pilot import Pilot
from textual.screen import Screen
from textual.widgets import Input, OptionList, Static

from service.cli import Options
from service.tui import (
    RECONNECTING,
    ChatApp,
    ChatScreen,
    ConfirmScreen,
    FindUserScreen,
    LoginScreen,
)
from tests.helpers.cluster import Cluster
from tests.integration.test_client_cli import PASSWORD, User

SIZE = (80, 24)
WAIT = 30.0
T = TypeVar("T")


# ---- looking at the app --------------------------------------------------------------


def chat_screen(app: ChatApp) -> ChatScreen:
    screen = app.screen
    assert isinstance(screen, ChatScreen), f"the chat screen is not showing: {screen!r}"
    return screen


def text_of(app: ChatApp, selector: str) -> str:
    return str(app.screen.query_one(selector, Static).content)


def shown(app: ChatApp) -> list[str]:
    """The open conversation as shown, oldest first: ``sender: body`` per message."""
    options = chat_screen(app).query_one("#messages", OptionList).options
    return [str(option.prompt).split(" ", 1)[1] for option in options]


def shown_ids(app: ChatApp) -> list[int]:
    options = chat_screen(app).query_one("#messages", OptionList).options
    return [int(option.id or 0) for option in options]


def conversations(app: ChatApp) -> list[str]:
    options = chat_screen(app).query_one("#conversations", OptionList).options
    return [str(option.prompt).strip(" ▸") for option in options]


def describe(app: Any) -> str:
    screen = app.screen
    if not isinstance(screen, ChatScreen):
        notices = [str(n.content) for n in screen.query("#notice").results(Static)]
        return f"screen {type(screen).__name__}, notice {notices}"
    return (
        f"conversations {conversations(app)}, shown {shown(app)}, "
        f"notice {text_of(app, '#notice')!r}, status {text_of(app, '#status')!r}"
    )


async def until(pilot: Pilot[Any], check: Callable[[], T], what: str, timeout: float = WAIT) -> T:
    """Let the app run until ``check()`` is truthy; fail saying what never happened."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            value = check()
        except (AssertionError, NoMatches):
            value = None  # e.g. the chat screen is not up yet
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}; {describe(pilot.app)}"
            )
        await pilot.pause(0.02)


async def until_true(
    pilot: Pilot[Any], check: Callable[[], Awaitable[bool]], what: str, timeout: float = WAIT
) -> None:
    """``until`` for a check that must run outside the loop (a chatctl run)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await pilot.pause(0.05)


async def run(user: User, *args: str) -> str:
    return await asyncio.to_thread(user.ok, *args)


async def json_of(user: User, *args: str) -> dict[str, Any]:
    return await asyncio.to_thread(user.json, *args)


async def cli_error(user: User, *args: str, input: str | None = None) -> str:
    """The one sentence ``chatctl`` prints for a refused request, without its prefix."""
    line = await asyncio.to_thread(user.fails, 1, *args, input=input)
    assert line.startswith("chatctl: "), line
    return line.removeprefix("chatctl: ")


async def type_line(pilot: Pilot[Any], text: str) -> None:
    await pilot.press(*text)
    await pilot.press("enter")


async def press_for(pilot: Pilot[Any], key: str, dialog: type[Screen[Any]]) -> None:
    """Press ``key`` and wait for the dialog it opens (keys typed before it shows are lost)."""
    await pilot.press(key)
    await until(pilot, lambda: isinstance(pilot.app.screen, dialog), f"{key} to open a dialog")


def node_in_status(app: ChatApp) -> str | None:
    """The node address of the status line, when it shows one."""
    parts = text_of(app, "#status").split(" · ")
    return parts[1] if len(parts) == 3 and parts[1].startswith("127.") else None


# ---- fixtures ------------------------------------------------------------------------


@pytest.fixture
def cluster(cluster_factory: Any) -> Cluster:
    cluster: Cluster = cluster_factory(3)
    cluster.start()
    cluster.wait_in_sync()
    return cluster


def people(tmp_path: Path, cluster: Cluster, *names: str) -> list[User]:
    users = [User(tmp_path, name, cluster.servers) for name in names]
    for user in users:
        user.signup()
    return users


def chat_app(
    cluster: Cluster, user: User, monkeypatch: pytest.MonkeyPatch, timeout: float = 10.0
) -> ChatApp:
    """The app as ``chatctl chat`` builds it, with ``user``'s session folder."""
    monkeypatch.setenv("CHATCTL_HOME", str(user.home))
    return ChatApp(Options(cluster.servers, timeout, False))


# ---- the scenarios -------------------------------------------------------------------


def test_live_messages_unread_counts_replies_and_deletion(
    tmp_path: Path, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob, carol = people(tmp_path, cluster, "alice", "bob", "carol")
    bob.ok("send", "alice", "are you there?")
    alice.ok("send", "bob", "a note from before")

    async def scenario() -> None:
        app = chat_app(cluster, alice, monkeypatch)
        async with app.run_test(size=SIZE) as pilot:
            # The inbox and the sent box make one conversation; nothing is marked read.
            await until(pilot, lambda: conversations(app) == ["bob (1)"], "bob with 1 unread")
            await until(pilot, lambda: "1 unread" in text_of(app, "#status"), "1 unread")
            assert (await json_of(alice, "whoami"))["unread"] == 1

            await pilot.press("enter")  # open the highlighted conversation
            want = ["bob: are you there?", "alice: a note from before"]
            await until(pilot, lambda: shown(app) == want, "the conversation, oldest first")
            await until(pilot, lambda: conversations(app) == ["bob"], "bob read")
            assert (await json_of(alice, "whoami"))["unread"] == 0

            # A message sent by another user appears live, and is marked read.
            await run(bob, "send", "alice", "still here")
            await until(pilot, lambda: shown(app)[-1:] == ["bob: still here"], "the live one")

            async def all_read() -> bool:
                return bool((await json_of(alice, "whoami"))["unread"] == 0)

            await until_true(pilot, all_read, "the live message marked read")

            # A message in another conversation counts as unread there.
            await run(carol, "send", "alice", "psst")
            await until(
                pilot, lambda: conversations(app) == ["carol (1)", "bob"], "carol with 1 unread"
            )
            assert shown(app)[-1] == "bob: still here"

            # A reply typed on the line arrives in bob's read.
            await type_line(pilot, "hello bob")
            await until(pilot, lambda: shown(app)[-1:] == ["alice: hello bob"], "the reply")
            inbox = (await json_of(bob, "read"))["messages"]
            assert [(m["from"], m["body"]) for m in inbox[:1]] == [("alice", "hello bob")]
            reply_id = inbox[0]["id"]

            # Delete it (the newest message is the selected one), behind a confirmation.
            await pilot.press("shift+tab")
            await press_for(pilot, "delete", ConfirmScreen)
            await pilot.press("n")
            await until(pilot, lambda: "not confirmed" in text_of(app, "#notice"), "no")
            await press_for(pilot, "delete", ConfirmScreen)
            await pilot.press("y")
            await until(
                pilot,
                lambda: text_of(app, "#notice") == f"deleted message {reply_id}",
                "the deletion",
            )
            assert "alice: hello bob" not in shown(app)
            inbox = (await json_of(bob, "read"))["messages"]
            assert reply_id not in [m["id"] for m in inbox]

            check_layout(app)

    asyncio.run(scenario())


def check_layout(app: ChatApp) -> None:
    """Every part of the chat screen is on the 80x24 screen, and the keys are in the footer."""
    screen = chat_screen(app)
    for selector in ("#conversations", "#messages", "#notice", "#line", "#status", "Footer"):
        region = screen.query_one(selector).region
        assert region.width > 0, selector
        assert region.height > 0, selector
        assert region.right <= SIZE[0], selector
        assert region.bottom <= SIZE[1], selector
    keys = {key for key, active in screen.active_bindings.items() if active.binding.show}
    assert {"ctrl+f", "f8", "ctrl+q", "tab"} <= keys, keys


def test_the_conversation_goes_on_across_a_failover_without_gap_or_duplicate(
    tmp_path: Path, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob = people(tmp_path, cluster, "alice", "bob")
    primary = cluster.wait_for_primary()

    def bobs() -> list[str]:
        return [line for line in shown(app) if line.startswith("bob: ")]

    # A reply typed while no node answers waits for one up to the timeout.
    app = chat_app(cluster, alice, monkeypatch, timeout=30.0)

    async def scenario() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: node_in_status(app) == primary.address, "the primary")
            await press_for(pilot, "ctrl+f", FindUserScreen)
            await type_line(pilot, "bob")  # a name opens its conversation
            await until(pilot, lambda: "conversation with bob" in text_of(app, "#notice"), "bob")
            await run(bob, "send", "alice", "one")
            await until(pilot, lambda: bobs() == ["bob: one"], "the first message")

            await asyncio.to_thread(primary.kill)
            await run(bob, "send", "alice", "two", "--timeout", "30")
            await run(bob, "send", "alice", "three", "--timeout", "30")
            await until(pilot, lambda: len(bobs()) >= 3, "the messages after the failover")
            assert bobs() == ["bob: one", "bob: two", "bob: three"]
            await until(
                pilot,
                lambda: node_in_status(app) not in (None, primary.address),
                "the new primary in the status line",
            )

            # No node answers: the status line says so, and a reply waits for one.
            survivors = cluster.live()
            for node in survivors:
                await asyncio.to_thread(node.freeze)
            await until(pilot, lambda: RECONNECTING in text_of(app, "#status"), "reconnecting")
            await type_line(pilot, "sent while nobody answered")
            for node in survivors:
                await asyncio.to_thread(node.thaw)
            await until(pilot, lambda: node_in_status(app), "a primary again")
            await run(bob, "send", "alice", "four", "--timeout", "30")
            await until(pilot, lambda: len(bobs()) >= 4, "the message after the thaw")
            assert bobs() == ["bob: one", "bob: two", "bob: three", "bob: four"]
            ids = shown_ids(app)
            assert ids == sorted(set(ids)), ids
            await until(
                pilot, lambda: "alice: sent while nobody answered" in shown(app), "the reply"
            )
            inbox = (await json_of(bob, "read"))["messages"]
            assert [m["body"] for m in inbox] == ["sent while nobody answered"]

    asyncio.run(scenario())


def test_login_and_bad_input_get_the_sentence_chatctl_prints(
    tmp_path: Path, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob = people(tmp_path, cluster, "alice", "bob")
    # A stored session that has ended (logged out elsewhere).
    stored = (alice.home / "session.json").read_bytes()
    alice.ok("logout")
    (alice.home / "session.json").write_bytes(stored)
    ended = alice.fails(1, "whoami").removeprefix("chatctl: ")
    ended = ended.removesuffix("; run chatctl login alice")
    app = chat_app(cluster, alice, monkeypatch)

    async def scenario() -> None:
        wrong_password = await cli_error(
            alice, "login", "alice", "--password-stdin", input="wrong-password"
        )
        async with app.run_test(size=SIZE) as pilot:
            await until(
                pilot,
                lambda: isinstance(app.screen, LoginScreen) and text_of(app, "#notice") == ended,
                "the login screen saying why",
            )
            assert app.screen.query_one("#user", Input).value == "alice"
            await type_line(pilot, "wrong-password")
            await until(pilot, lambda: text_of(app, "#notice") == wrong_password, "refused")
            await type_line(pilot, PASSWORD)
            await until(pilot, lambda: node_in_status(app), "the chat screen")
            assert (alice.home / "session.json").exists()

            # An unknown user.
            unknown = await cli_error(alice, "read", "--with", "nosuch")
            await press_for(pilot, "ctrl+f", FindUserScreen)
            await type_line(pilot, "nosuch")
            await until(pilot, lambda: text_of(app, "#notice") == unknown, "no such user")
            assert conversations(app) == []

            # A pattern finds bob; enter opens his conversation.
            await press_for(pilot, "ctrl+f", FindUserScreen)
            await type_line(pilot, "b*")

            def found() -> list[str]:
                widget = app.screen.query_one("#found", OptionList)
                return [str(o.prompt) for o in widget.options] if widget.has_focus else []

            assert await until(pilot, found, "the users found") == ["bob"]
            await pilot.press("enter")
            await until(pilot, lambda: "conversation with bob" in text_of(app, "#notice"), "bob")

            # An empty line, then a message too long: refused, nothing sent.
            empty = await cli_error(alice, "send", "bob", "")
            await pilot.press("enter")
            await until(pilot, lambda: text_of(app, "#notice") == empty, "the empty line refused")
            long_text = "x" * 5000
            too_long = await cli_error(alice, "send", "bob", long_text)
            line = app.screen.query_one("#line", Input)
            line.value = long_text
            await pilot.press("enter")
            await until(pilot, lambda: text_of(app, "#notice") == too_long, "the long one refused")
            assert line.value == long_text  # kept, to be fixed
            assert (await json_of(bob, "read"))["messages"] == []

            # Deleting the account asks first.
            await press_for(pilot, "f8", ConfirmScreen)
            await pilot.press("n")
            await until(pilot, lambda: "not confirmed" in text_of(app, "#notice"), "kept")
            await press_for(pilot, "f8", ConfirmScreen)
            await pilot.press("y")
            await until(pilot, lambda: app.return_value is not None, "the app to close")
        assert app.return_value == "deleted the account alice"
        assert not (alice.home / "session.json").exists()

    asyncio.run(scenario())
    alice.fails(1, "login", "alice", CHATCTL_PASSWORD=PASSWORD)
