"""The history of a workload: every client operation it invoked and how it ended.

One type for every checker of client-visible outcomes: the chaos tool's
(``ops/chaos/checker.py``) and the cluster tests' (``tests/helpers/workload.py``).

Theory of operation
-------------------
Each client operation is one ``Op``: it is *invoked* (appended with its
arguments and the time) and later *completed* with one of three outcomes,
the only three a client of a replicated service can know:

* ``ok``: a reply. For a write, it is durable on the sync set (G1) and must be
  found, exactly once, on every node after healing.
* ``failed``: the service refused it (``errors.Refused`` and its kinds). Nothing
  of a refused write may be stored.
* ``unknown``: no answer within the client's deadline (``errors.Unavailable``:
  a failover, every node down), or the run ended while it was in flight. It
  may or may not have been applied, but never twice (G3).

An error outside those (``internal``, ``protocol``, an exception that is not a
``ChatError``) is recorded as ``unknown`` with ``unexpected`` set: the checker
reports it, since no correct service produces one.

``record`` runs one client call and classifies its end this way; a workload
never classifies an error itself.

``listen`` streams are not ops: each ``Stream`` keeps the message ids its
listener received, in order, and when it started and stopped listening.

Invariants
----------
* An op is completed at most once; ``complete`` of a completed op raises.
* Times are ``time.monotonic()`` seconds since the history was created, so
  they line up with the fault log of the nemesis (the same clock).
* Appends take the lock, so a workload may record from several threads, and
  reading from the main thread (progress lines, waits) is safe.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from service import errors

OK = "ok"
FAILED = "failed"
UNKNOWN = "unknown"
OUTCOMES = (OK, FAILED, UNKNOWN)


@dataclass
class Op:
    """One client operation: what was asked, when, and what came of it."""

    index: int
    process: str  # the workload actor that ran it ("writer2", "registrar", ...)
    kind: str  # "send", "delete", "register", "read", "login", "logout", ...
    args: dict[str, Any]
    invoked: float
    completed: float | None = None
    outcome: str | None = None  # one of OUTCOMES once completed
    result: dict[str, Any] | None = None
    error: str | None = None  # the error code (or text) of a failed or unknown op
    unexpected: bool = False

    # What a ``send`` op names (its sender is the process that ran it).
    @property
    def recipient(self) -> str | None:
        to = self.args.get("to")
        return None if to is None else str(to)

    @property
    def body(self) -> str | None:
        body = self.args.get("body")
        return None if body is None else str(body)

    @property
    def message_id(self) -> int | None:
        """The id an ``ok`` send was given."""
        message = (self.result or {}).get("message")
        return int(message["id"]) if isinstance(message, dict) else None

    def __str__(self) -> str:
        end = f"{self.completed:.3f}" if self.completed is not None else ""
        error = f" {self.error}" if self.error else ""
        return (
            f"op {self.index} {self.process} {self.kind} {self.args} "
            f"{self.invoked:.3f}-{end} {self.outcome}{error}"
        )


@dataclass
class Stream:
    """One listener's view: the ids it was pushed, in the order it got them."""

    user: str
    started: float
    stopped: float | None = None
    received: list[int] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)  # when each id came, same order
    bodies: dict[int, str] = field(default_factory=dict)
    restarts: int = 0
    errors: list[str] = field(default_factory=list)


class History:
    """Every op and stream of one run, in invocation order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._origin = time.monotonic()
        self.ops: list[Op] = []
        self.streams: list[Stream] = []

    def now(self) -> float:
        """Seconds since the history began (monotonic)."""
        return time.monotonic() - self._origin

    def invoke(self, process: str, kind: str, args: dict[str, Any]) -> Op:
        with self._lock:
            op = Op(len(self.ops), process, kind, dict(args), self.now())
            self.ops.append(op)
            return op

    def complete(
        self,
        op: Op,
        outcome: str,
        *,
        result: dict[str, Any] | None = None,
        error: str | None = None,
        unexpected: bool = False,
    ) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        with self._lock:
            if op.outcome is not None:
                raise RuntimeError(f"{op} is already completed")
            op.completed = self.now()
            op.outcome = outcome
            op.result = result
            op.error = error
            op.unexpected = unexpected

    def stream(self, user: str) -> Stream:
        with self._lock:
            stream = Stream(user, self.now())
            self.streams.append(stream)
            return stream

    def expected_pushes(self, stream: Stream) -> set[int]:
        """The message ids ``stream`` must receive: every acknowledged send to its user
        invoked after it started listening, except messages some delete names
        (deleted before the push, they are legitimately never shown)."""
        with self._lock:
            named = {
                int(i) for op in self.ops if op.kind == "delete" for i in op.args.get("ids", ())
            }
            expected = set()
            for op in self.ops:
                if op.kind != "send" or op.outcome != OK or op.invoked < stream.started:
                    continue
                if str(op.args.get("to")).lower() != stream.user.lower() or op.result is None:
                    continue
                message_id = int(op.result["message"]["id"])
                if message_id not in named:
                    expected.add(message_id)
            return expected

    def of_kind(self, kind: str, outcome: str | None = None) -> list[Op]:
        """The ops of ``kind`` (with ``outcome``, only those that ended so)."""
        with self._lock:
            return [
                op
                for op in self.ops
                if op.kind == kind and (outcome is None or op.outcome == outcome)
            ]

    def count(self, kind: str, outcome: str) -> int:
        return len(self.of_kind(kind, outcome))

    def counts(self) -> dict[str, Counter[str]]:
        """kind -> outcome -> count ("pending" for ops never completed)."""
        with self._lock:
            counts: dict[str, Counter[str]] = {}
            for op in self.ops:
                counts.setdefault(op.kind, Counter())[op.outcome or "pending"] += 1
            return counts

    def summary(self) -> str:
        parts = []
        for kind, counter in sorted(self.counts().items()):
            names = (*OUTCOMES, "pending")
            detail = " ".join(f"{name} {counter[name]}" for name in names if counter[name])
            parts.append(f"{kind}: {sum(counter.values())} ({detail})")
        return "; ".join(parts)

    def dump(self, path: Path) -> None:
        """Write the history as JSON lines (one op or stream per line), for replay analysis."""
        with self._lock, path.open("w", encoding="utf-8") as out:
            for op in self.ops:
                out.write(json.dumps({"op": asdict(op)}, ensure_ascii=True) + "\n")
            for stream in self.streams:
                line = asdict(stream)
                line["bodies"] = {str(k): v for k, v in stream.bodies.items()}
                out.write(json.dumps({"stream": line}, ensure_ascii=True) + "\n")


async def record(
    history: History, process: str, kind: str, args: dict[str, Any], call: Awaitable[Any]
) -> tuple[Op, Any]:
    """Run one client call, recording it in ``history`` as invoked and then as it ended;
    returns the op and the reply (None unless ``ok``: the caller may need its token).

    A reply is ``ok`` (kept without any ``token``); a refusal ``failed`` with its
    code; no answer (``Unavailable``, or cancelled) ``unknown``; any other error
    ``unknown`` and ``unexpected``. Cancellation is recorded, then re-raised.
    """
    op = history.invoke(process, kind, args)
    result: Any = None
    try:
        result = await call
    except asyncio.CancelledError:
        history.complete(op, UNKNOWN, error="cancelled")
        raise
    except errors.Refused as exc:
        history.complete(op, FAILED, error=exc.code)
    except errors.Unavailable as exc:
        history.complete(op, UNKNOWN, error=exc.code)
    except errors.ChatError as exc:
        history.complete(op, UNKNOWN, error=f"{exc.code}: {exc.message}", unexpected=True)
    except Exception as exc:
        history.complete(op, UNKNOWN, error=f"{type(exc).__name__}: {exc}", unexpected=True)
    else:
        kept = {key: value for key, value in result.items() if key != "token"}
        history.complete(op, OK, result=kept)
        return op, result
    return op, None
