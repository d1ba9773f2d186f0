"""A client pinned to one node: what that node acknowledges, and when.

The ordinary client (``service.client.Client``) follows the primary: told
``not_primary`` it asks the node named instead, and a slow node makes it ask
the others who leads. A test of self-fencing (SPEC section 10, E2) needs the
opposite: a client that keeps asking *one* node, from an address that can
still reach it while the node is cut from etcd or from its peers, and records
exactly which of its answers were acknowledgements. A node past its fencing
deadline must acknowledge no write and serve no read, so every ``ok`` this
client records after that deadline is a breach.

``Pinned`` runs in a background thread with its own event loop (the test's
thread stays free to cut, freeze and heal), and sends a ``send`` and a ``read``
together on one connection, round after round, each given ``attempt`` seconds
(longer than a freeze, to see what a thawed node does with them). It records every
request in a ``History`` (``ops/cluster/history.py``) as the workload does, so
the same history can be checked against the nodes' databases afterwards
(``check_messages``): an acknowledged send of this client must be on every node
exactly once, a refused one on none. A request that times out or meets a closed
connection is ``unknown``; the connection is opened again for the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

from ops.cluster.history import FAILED, OK, UNKNOWN, History, Op
from ops.cluster.waiting import StopWaiting, wait_for
from service import errors, protocol
from service.client import Connection, ConnectionLost, new_request_id

from .cluster import NodeProcess

# How long one request may wait for its answer: a frozen or cut node answers nothing.
ATTEMPT = 1.0
# Between two requests: the probe must not starve two cores of the cluster it observes.
PACE = 0.02
STOP_TIMEOUT = 10.0


class Pinned:
    """``user`` sending to ``recipient`` and reading its inbox, through ``node`` only.

    with Pinned(node, "prober", "writer0", token, history) as probe:
        probe.wait_acked(5, "before the cut")
        ...
    probe.acknowledged_after(t)   # ok sends and reads completed after history time t
    """

    def __init__(
        self,
        node: NodeProcess,
        user: str,
        recipient: str,
        token: str,
        history: History,
        attempt: float = ATTEMPT,
        *,
        sends: bool = True,
    ) -> None:
        self.node = node
        self.user = user
        self.recipient = recipient
        self.token = token
        self.history = history
        self.attempt = attempt
        # Without sends it only reads: a read waits for every write it saw to be
        # acknowledged (R7), so only on a quiet cluster does it show whether the node
        # would answer at once, and so whether it fences itself.
        self.sends = sends
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main_task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._run, name=f"pinned-{user}", daemon=True)
        self.sent = 0
        # Its own ops: the history may hold other requests of the same user.
        self._ops: list[Op] = []

    def __enter__(self) -> Pinned:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop asking; a request in flight is abandoned (``unknown``)."""
        self._stop.set()
        loop, main = self._loop, self._main_task
        if loop is not None and main is not None:
            loop.call_soon_threadsafe(main.cancel)
        self._thread.join(STOP_TIMEOUT)
        if self._thread.is_alive():
            raise RuntimeError(f"the client pinned to node {self.node.node_id} did not stop")
        if self._error is not None:
            raise RuntimeError("the pinned client failed") from self._error

    # ---- what it saw ---------------------------------------------------------------------

    def ops(self, outcome: str | None = None) -> list[Op]:
        """Its requests (with ``outcome``: only those that ended so), sends and reads."""
        return [op for op in list(self._ops) if outcome is None or op.outcome == outcome]

    def acknowledged_after(self, since: float) -> list[Op]:
        """Its sends acknowledged and reads served after history time ``since``."""
        return sorted(
            (op for op in self.ops(OK) if op.completed is not None and op.completed > since),
            key=lambda op: op.index,
        )

    def wait_answered(self, count: int, what: str, timeout: float = 20.0) -> None:
        """Wait until ``count`` more of its requests are answered ``ok`` than now."""

        def answered() -> int:
            if self._error is not None:
                raise StopWaiting(f"the pinned client failed: {self._error!r}")
            return len(self.ops(OK))

        target = answered() + count
        wait_for(
            lambda: answered() >= target,
            timeout,
            f"{count} more requests answered by node {self.node.node_id} ({what})",
        )

    # ---- the loop ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._guarded())
        except BaseException as exc:
            self._error = exc

    async def _guarded(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._main_task = asyncio.current_task()
        with contextlib.suppress(asyncio.CancelledError):
            await self._main()

    async def _main(self) -> None:
        conn: Connection | None = None
        try:
            while not self._stop.is_set():
                if conn is None or conn.closed:
                    conn = await self._connect()
                if conn is not None:
                    # Both at once, so that a read is waiting too whenever the node
                    # stops answering (a freeze) and is answered, or not, when it resumes.
                    if self.sends:
                        await asyncio.gather(self._send(conn), self._read(conn))
                    else:
                        await self._read(conn)
                await asyncio.sleep(PACE)
        finally:
            if conn is not None:
                await conn.aclose()

    async def _connect(self) -> Connection | None:
        try:
            return await Connection.open(self.node.address, self.attempt)
        except ConnectionLost:
            return None

    async def _send(self, conn: Connection) -> None:
        self.sent += 1
        args = {"to": self.recipient, "body": f"{self.user}-{self.sent}"}
        await self._record("send", args, conn)

    async def _read(self, conn: Connection) -> None:
        args = {"box": "inbox", "limit": 1}
        await self._record("read", args, conn)

    async def _record(self, kind: str, args: dict[str, Any], conn: Connection) -> None:
        """One request, recorded as ``ops.cluster.history.record`` does; the op is kept
        here too, since the history holds other requests of the same user."""
        op = self.history.invoke(self.user, kind, args)
        self._ops.append(op)
        try:
            result = await self._request(conn, kind, args)
        except asyncio.CancelledError:
            self.history.complete(op, UNKNOWN, error="cancelled")
            raise
        except errors.Refused as exc:
            self.history.complete(op, FAILED, error=exc.code)
        except errors.Unavailable as exc:
            self.history.complete(op, UNKNOWN, error=exc.code)
        except errors.ChatError as exc:
            self.history.complete(op, UNKNOWN, error=f"{exc.code}: {exc.message}", unexpected=True)
        else:
            self.history.complete(op, OK, result=result)

    async def _request(self, conn: Connection, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """One attempt, on this node only; no answer is ``Unavailable`` (unknown)."""
        frame = protocol.request(op, new_request_id(), args, self.token)
        try:
            result, _ = await conn.request(frame, self.attempt)
        except ConnectionLost as exc:
            raise errors.Unavailable(f"node {self.node.node_id}: {exc.reason}") from None
        return result
