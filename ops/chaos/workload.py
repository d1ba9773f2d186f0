"""The concurrent workload of a chaos run, through the client library.

Theory of operation
-------------------
The workload runs in a thread of its own with its own event loop, so the
main thread stays free for the nemesis, which signals processes and sleeps.
Every client operation is recorded in the ``History`` (invoked, then ok,
failed or unknown: ``ops/cluster/history.py``). The actors, all at once:

* **writers** (``<prefix>w0``, ``w1``, ...): each logged in with its own
  ``Client``; in a loop they send uniquely numbered messages
  (``<prefix>:<sender>:<n>``) to any workload user (themselves included),
  read their inbox (which marks messages read), delete one or two messages
  they sent or received, search, ask ``whoami``, and now and then open a
  second session, use it, log it out and check that its token no longer works;
* **listeners** (``<prefix>l0``, ...): users that only run a ``listen`` stream
  and record every id pushed to them, in order. They never read, so every
  message to them stays unread and the stream's backlog covers everything
  sent to them. When the client library gives up (no primary within its
  deadline) the listener listens again after the last id it got, exactly as
  the library itself resumes after a failover;
* the **registrar**: registers fresh names, each from two or three clients at
  once (different request ids, sometimes different letter case), so that at
  most one of them may succeed.

Every write carries the client library's request id, reused on its retries,
so the service may execute it at most once. Bodies and user names carry the
run's prefix, so the checker can tell this run's rows from older ones on a
long-lived cluster.

Stopping: the writers and the registrar finish the operation in flight
(bounded by the client deadline) and stop; the listeners then get time to
receive every message they are owed (``History.expected_pushes``) before
they are cancelled: a stream is judged on what it had the chance to see.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import threading
import time
from collections.abc import Awaitable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from ops.cluster.history import OK, History, record
from service import errors
from service.client import Client, Result, new_request_id

SETUP_TIMEOUT = 60.0
DRAIN_TIMEOUT = 60.0
# What a writer does, and how often.
ACTIONS = ("send", "read", "delete", "search", "whoami", "session")
WEIGHTS = (62, 12, 10, 5, 6, 5)


@dataclass(frozen=True)
class Plan:
    """The shape of the workload."""

    prefix: str
    writers: int = 4
    listeners: int = 2
    pace: float = 0.02  # at most this long a pause between two operations of an actor
    op_timeout: float = 5.0  # the client's overall deadline per operation


class Workload:
    """``start``, let it run, ``stop``; the ``history`` holds everything it did."""

    def __init__(self, servers: list[str], history: History, plan: Plan, seed: int) -> None:
        self.servers = list(servers)
        self.history = history
        self.plan = plan
        self.seed = seed
        self.writers = [f"{plan.prefix}w{i}" for i in range(plan.writers)]
        self.listeners = [f"{plan.prefix}l{i}" for i in range(plan.listeners)]
        self.users = [*self.writers, *self.listeners]
        self.passwords = {user: secrets.token_hex(12) for user in self.users}
        self._clients: dict[str, Client] = {}
        self._ready = threading.Event()
        self._writers_done = threading.Event()
        self._finished = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_writers: asyncio.Event | None = None
        self._stop_listeners: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="chaos-workload", daemon=True)

    # ---- control (main thread) ---------------------------------------------------------

    def start(self) -> None:
        """Register and log in every user, start the actors; return once they run."""
        self._thread.start()
        deadline = time.monotonic() + SETUP_TIMEOUT + 5
        while not self._ready.wait(0.05):
            if self._error is not None or self._finished.is_set():
                raise RuntimeError(f"the workload did not start: {self._error!r}")
            if time.monotonic() > deadline:
                raise TimeoutError("the workload's users did not register and log in")

    def stop(self) -> list[str]:
        """Stop the writers, let the listeners catch up, stop them; returns problems."""
        problems: list[str] = []
        self._signal(self._stop_writers)
        if not self._writers_done.wait(self.plan.op_timeout * 3 + 10):
            problems.append("the writers did not stop within their deadline")
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while self.missing_pushes() and time.monotonic() < deadline:
            time.sleep(0.1)
        self._signal(self._stop_listeners)
        self._thread.join(DRAIN_TIMEOUT)
        if self._thread.is_alive():
            problems.append("the workload thread did not end")
        if self._error is not None:
            problems.append(f"the workload failed: {self._error!r}")
        return problems

    def missing_pushes(self) -> dict[str, int]:
        """Listener -> how many messages it is still owed."""
        missing = {}
        for stream in list(self.history.streams):
            owed = self.history.expected_pushes(stream) - set(stream.received)
            if owed and not stream.errors:
                missing[stream.user] = len(owed)
        return missing

    def _signal(self, event: asyncio.Event | None) -> None:
        if self._loop is not None and event is not None and not self._loop.is_closed():
            with suppress(RuntimeError):
                self._loop.call_soon_threadsafe(event.set)

    # ---- the workload thread -----------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self._error = exc
        finally:
            self._finished.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_writers = asyncio.Event()
        self._stop_listeners = asyncio.Event()
        plan = self.plan
        self._clients = {user: Client(self.servers, timeout=plan.op_timeout) for user in self.users}
        try:
            for user in self.users:
                await self._setup(user)
            listeners = [asyncio.create_task(self._listener(u)) for u in self.listeners]
            actors = [asyncio.create_task(self._writer(i, u)) for i, u in enumerate(self.writers)]
            actors.append(asyncio.create_task(self._registrar()))
            self._ready.set()
            await asyncio.gather(*actors)
            self._writers_done.set()
            await self._stop_listeners.wait()
            for task in listeners:
                task.cancel()
            await asyncio.gather(*listeners, return_exceptions=True)
            now = self.history.now()
            for stream in self.history.streams:
                stream.stopped = now
        finally:
            self._writers_done.set()
            for client in self._clients.values():
                with suppress(Exception):
                    await client.close()

    async def _setup(self, user: str) -> None:
        """Register and log in ``user``, retrying with the same request ids until done."""
        client = self._clients[user]
        password = self.passwords[user]
        deadline = time.monotonic() + SETUP_TIMEOUT
        for op in ("register", "login"):
            request_id = new_request_id()
            args = {"username": user, "password": password}
            while True:
                call = client.call(op, args, request_id=request_id)
                result = await self._record("setup", op, {"username": user}, call)
                if result is not None:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"could not {op} {user}")
            if op == "login":
                client.token = str(result["token"])

    async def _record(
        self, process: str, kind: str, args: dict[str, Any], call: Awaitable[Result]
    ) -> Result | None:
        """Run one client call and record it; returns the result when it is ``ok``."""
        op, result = await record(self.history, process, kind, args, call)
        return result if op.outcome == OK else None

    # ---- actors ------------------------------------------------------------------------

    def _stopping(self) -> bool:
        return self._stop_writers is None or self._stop_writers.is_set()

    async def _writer(self, index: int, user: str) -> None:
        client = self._clients[user]
        rng = random.Random(f"{self.seed}:writer:{index}")
        known: list[int] = []  # messages this user sent or was shown: candidates to delete
        sent = 0
        while not self._stopping():
            action = rng.choices(ACTIONS, WEIGHTS)[0]
            if action == "send":
                sent += 1
                to = rng.choice(self.users)
                body = f"{self.plan.prefix}:{user}:{sent}"
                result = await self._record(
                    user, "send", {"to": to, "body": body}, client.send(to, body)
                )
                if result is not None:
                    known.append(int(result["message"]["id"]))
            elif action == "read":
                args: dict[str, Any] = {
                    "unread": rng.random() < 0.3,
                    "oldest_first": rng.random() < 0.5,
                    "limit": rng.randint(1, 30),
                }
                if rng.random() < 0.2:
                    args["with_user"] = rng.choice(self.users)
                result = await self._record(user, "read", args, client.read(**args))
                if result is not None:
                    known += [int(m["id"]) for m in result["messages"] if m["to"] == user]
            elif action == "delete" and known:
                ids = [known.pop(rng.randrange(len(known))) for _ in range(min(len(known), 2))]
                if rng.random() < 0.6:
                    ids = ids[:1]
                await self._record(user, "delete", {"ids": ids}, client.delete_messages(ids))
            elif action == "search":
                pattern = f"{self.plan.prefix}*"
                await self._record(
                    user, "search", {"pattern": pattern}, client.search(pattern, limit=100)
                )
            elif action == "whoami":
                await self._record(user, "whoami", {}, client.whoami())
            elif action == "session":
                await self._session(user)
            await asyncio.sleep(rng.uniform(0, self.plan.pace))

    async def _session(self, user: str) -> None:
        """A second device: log in, use it, log out; its token must then be refused."""
        client = Client(self.servers, timeout=self.plan.op_timeout)
        try:
            args = {"username": user}
            if await self._record(user, "login", args, client.login(user, self.passwords[user])):
                token = client.token
                await self._record(user, "whoami", {}, client.whoami())
                if await self._record(user, "logout", {}, client.logout()) is not None:
                    stale = client.call("whoami", token=token)
                    await self._record(user, "stale-token", {}, stale)
        finally:
            await client.close()

    async def _registrar(self) -> None:
        rng = random.Random(f"{self.seed}:registrar")
        clients = [Client(self.servers, timeout=self.plan.op_timeout) for _ in range(3)]
        try:
            k = 0
            while not self._stopping():
                await asyncio.sleep(rng.uniform(0.3, 1.5))
                k += 1
                name = f"{self.plan.prefix}r{k}"
                spellings = [name if rng.random() < 0.5 else name.swapcase() for _ in range(3)]
                count = rng.choice((2, 2, 3))
                await asyncio.gather(
                    *(
                        self._record(
                            "registrar",
                            "register",
                            {"username": spelled},
                            client.register(spelled, secrets.token_hex(10)),
                        )
                        for client, spelled in zip(clients[:count], spellings, strict=False)
                    )
                )
        finally:
            for client in clients:
                await client.close()

    async def _listener(self, user: str) -> None:
        client = self._clients[user]
        stream = self.history.stream(user)
        last: int | None = None
        while True:
            try:
                async for message in client.listen(after=last):
                    message_id = int(message["id"])
                    stream.received.append(message_id)
                    stream.arrived.append(self.history.now())
                    stream.bodies[message_id] = str(message["body"])
                    if str(message["to"]).lower() != user.lower():
                        stream.errors.append(f"message {message_id} to {message['to']} was pushed")
                    last = message_id
            except errors.Unavailable:
                stream.restarts += 1  # no primary within the deadline: listen again
            except errors.ChatError as exc:
                stream.errors.append(f"listen ended: {exc.code}: {exc.message}")
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                stream.errors.append(f"listen ended: {type(exc).__name__}: {exc}")
                return
