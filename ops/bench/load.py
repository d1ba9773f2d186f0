"""The load generator: simulated users sending messages, in worker processes.

Why processes. The client library is asyncio Python: one event loop drives
a few thousand sends per second before it needs a whole core. The machine
this runs on may have as few cores as the cluster has nodes, so the
generator runs in ``workers`` processes (default 2), each with its own event
loop and an equal share of the clients, and each reports the CPU it used
during the measurement window (``getrusage``). A worker near 100 % of one core
was saturated: the figure then measures the generator, and the report says so.

What one client is. One ``Client`` (its own connection to the primary),
holding the session of one of a few registered users, sending 100-byte
bodies to users picked at random, one send at a time, as fast as replies come
back: the closed loop of pgbench, whose row (sender, recipient, 100-byte body,
timestamp) the peer benchmark inserts.

Two modes:

* ``window``: warm up for ``warmup`` s, then count the sends acknowledged
  during the next ``secs`` s and keep the latency of each (``perf_counter``
  around the ``send`` call, retries included, as a user would see it);
* ``count``: send ``total`` messages between all clients as fast as possible
  (loading data, or the sends a stopped backup will have to catch up on),
  optionally stopping after ``max_seconds``.

Each worker is ``python -m ops.bench.load``; parent and worker exchange one
JSON object per line over its stdin and stdout: the spec, then the worker says it is
ready (every client connected and its session checked), the parent names
the wall-clock start time, the worker answers with its samples. Every worker
thus measures the same window, and setup never counts.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import secrets
import select
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from service import errors
from service.client import Client

from . import machine, stats

BODY_BYTES = 100
CALL_TIMEOUT = 30.0
READY_TIMEOUT = 120.0
START_DELAY = 0.3  # seconds between "go" and the start: every worker gets the message first
MAX_ERRORS = 1000  # a count-mode worker gives up after this many failed sends
SATURATED = 0.9  # a worker using this share of one core is the bottleneck

# Workers running now, so that an interrupted benchmark can stop them (``stop_workers``).
_live: set[subprocess.Popen[str]] = set()


@dataclass(frozen=True)
class Users:
    """Registered users and one session token each."""

    names: list[str]
    tokens: list[str]


async def register_users(servers: Sequence[str], count: int, prefix: str) -> Users:
    """Register ``count`` users and log each in once.

    Sessions are shared by the clients (several devices of one user), so the
    slow password hash runs 2 x ``count`` times, not once per client.
    """
    password = secrets.token_hex(12)
    names = [f"{prefix}{i:03d}" for i in range(count)]
    tokens = []
    async with Client(servers, timeout=60.0) as client:
        for name in names:
            await client.register(name, password)
        for name in names:
            result = await client.call("login", {"username": name, "password": password})
            tokens.append(str(result["token"]))
    return Users(names, tokens)


def body(rng: random.Random) -> str:
    """A 100-byte ASCII body (100 characters, 100 bytes of UTF-8)."""
    return "".join(rng.choices("abcdefghijklmnopqrstuvwxyz ", k=BODY_BYTES))


# ---- the parent side -----------------------------------------------------------------------


def run_window(
    servers: Sequence[str],
    users: Users,
    clients: int,
    workers: int,
    warmup: float,
    secs: float,
    watch: dict[str, int],
) -> dict[str, Any]:
    """Throughput and latency of ``clients`` concurrent senders over one window."""
    spec = {"mode": "window", "warmup": warmup, "secs": secs}
    results, cpu = _run_workers(servers, users, clients, workers, spec, warmup, secs, watch)
    samples = [s for r in results for s in r["samples"]]
    acked = sum(r["acked"] for r in results)
    return {
        "clients": clients,
        "workers": len(results),
        "seconds": secs,
        "acked": acked,
        "tps": acked / secs,
        "latency": stats.latency_summary(samples),
        **_common(results, cpu),
    }


def run_count(
    servers: Sequence[str],
    users: Users,
    total: int,
    clients: int,
    workers: int,
    watch: dict[str, int],
    max_seconds: float | None = None,
) -> dict[str, Any]:
    """Send ``total`` messages with ``clients`` senders (stopping early after
    ``max_seconds``, if given); how many were acknowledged and how long it took."""
    shares = _split(total, min(workers, clients))
    spec = {"mode": "count", "counts": shares, "max_seconds": max_seconds}
    started = time.perf_counter()
    results, cpu = _run_workers(servers, users, clients, workers, spec, 0.0, None, watch)
    seconds = max(r["seconds"] for r in results)
    acked = sum(r["acked"] for r in results)
    return {
        "clients": clients,
        "acked": acked,
        "seconds": seconds,
        "rate": acked / seconds if seconds > 0 else 0.0,
        "wall_with_setup": time.perf_counter() - started,
        **_common(results, cpu),
    }


def _common(results: list[dict[str, Any]], cpu: dict[str, Any]) -> dict[str, Any]:
    errors_seen: Counter[str] = Counter()
    for r in results:
        errors_seen.update(r["errors"])
    worker_cpu = [r["cpu"] / r["seconds"] if r["seconds"] > 0 else 0.0 for r in results]
    return {
        "errors": dict(errors_seen),
        "worker_cpu": worker_cpu,
        "generator_saturated": any(share >= SATURATED for share in worker_cpu),
        "cpu": cpu,
    }


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _run_workers(
    servers: Sequence[str],
    users: Users,
    clients: int,
    workers: int,
    spec: dict[str, Any],
    warmup: float,
    secs: float | None,
    watch: dict[str, int],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Start the workers, wait until all are ready, start them together, collect."""
    per_worker = _split(clients, min(workers, clients))
    procs: list[subprocess.Popen[str]] = []
    first = 0
    try:
        for index, count in enumerate(per_worker):
            mine = {
                **spec,
                "servers": list(servers),
                "names": users.names,
                "tokens": users.tokens,
                "clients": count,
                "first": first,
                "seed": random.randrange(1 << 30),
                "count": spec["counts"][index] if "counts" in spec else 0,
            }
            first += count
            proc = subprocess.Popen(
                [sys.executable, "-m", "ops.bench.load"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append(proc)
            _live.add(proc)
            _send(proc, mine)
        for proc in procs:
            _expect(_receive(proc, READY_TIMEOUT), "ready")
        start = time.time() + START_DELAY
        for proc in procs:
            _send(proc, {"start": start})
        pids = {**watch, **{f"worker{i}": p.pid for i, p in enumerate(procs)}}
        cpu = _watch_cpu(pids, start + warmup, secs, procs)
        results = [_expect(_receive(proc, None), "result") for proc in procs]
    finally:
        for proc in procs:
            _stop(proc)
    return results, cpu


def _watch_cpu(
    pids: dict[str, int], begin_wall: float, secs: float | None, procs: list[subprocess.Popen[str]]
) -> dict[str, Any]:
    """CPU of the nodes, workers and machine over the window (or until the workers answer)."""
    time.sleep(max(0.0, begin_wall - time.time()))
    before = machine.sample_cpu(pids)
    if secs is not None:
        time.sleep(secs)
    else:
        while not all(_readable(proc, 0.05) for proc in procs):
            pass
    return machine.cpu_between(before, machine.sample_cpu(pids))


def _send(proc: subprocess.Popen[str], message: dict[str, Any]) -> None:
    assert proc.stdin is not None
    _write_line(proc.stdin.fileno(), message)


def _write_line(fd: int, message: dict[str, Any]) -> None:
    """Write ``message`` as one JSON line, whole.

    Not through a text stream: a blocking write to a pipe returns early when the
    process is stopped or a profiler attaches while the pipe is full, and
    ``TextIOWrapper`` then drops what was not written (a worker's samples are
    hundreds of KiB, several times a pipe's capacity)."""
    data = memoryview((json.dumps(message) + "\n").encode())
    while data:
        data = data[os.write(fd, data) :]


def _readable(proc: subprocess.Popen[str], timeout: float) -> bool:
    assert proc.stdout is not None
    return bool(select.select([proc.stdout], [], [], timeout)[0])


def _receive(proc: subprocess.Popen[str], timeout: float | None) -> dict[str, Any]:
    """The worker's next line; raises if it dies first or stays silent past ``timeout``.

    A worker writes one line and then waits for the parent, so nothing is
    ever left in the pipe's buffer behind the line read here.
    """
    assert proc.stdout is not None
    if timeout is not None and not _readable(proc, timeout):
        raise TimeoutError(f"a load worker sent nothing for {timeout:g} s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"a load worker exited with status {proc.wait()}")
    message: dict[str, Any] = json.loads(line)
    return message


def stop_workers() -> None:
    """SIGKILL every worker still running: the teardown of an interrupted benchmark.
    The thread waiting for their answers then sees them exit and returns."""
    for proc in list(_live):
        if proc.poll() is None:
            proc.kill()


def _stop(proc: subprocess.Popen[str]) -> None:
    _live.discard(proc)
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _expect(message: dict[str, Any], kind: str) -> dict[str, Any]:
    if "failed" in message:
        raise RuntimeError(f"a load worker failed: {message['failed']}")
    if kind not in message:
        raise RuntimeError(f"a load worker sent {message!r}, expected {kind!r}")
    return message


# ---- the worker side ------------------------------------------------------------------------


def worker_main() -> int:
    """One worker process: its spec on stdin, then the exchange of the module docstring."""
    spec = json.loads(sys.stdin.readline())
    with asyncio.Runner() as runner:
        try:
            clients = runner.run(_connect(spec))
        except (errors.ChatError, OSError) as exc:
            _say({"failed": f"connecting: {exc}"})
            return 1
        _say({"ready": True})
        go = sys.stdin.readline()
        if not go:
            return 1  # the parent gave up
        start = float(json.loads(go)["start"])
        drive = _window if spec["mode"] == "window" else _count
        try:
            result = {"result": True, **runner.run(drive(spec, clients, start))}
        except Exception as exc:  # reported to the parent, which stops the benchmark
            result = {"failed": f"{type(exc).__name__}: {exc}"}
        runner.run(_close(clients))
    _say(result)
    return 0


def _say(message: dict[str, Any]) -> None:
    _write_line(sys.stdout.fileno(), message)


async def _connect(spec: dict[str, Any]) -> list[Client]:
    """One Client per simulated connection, each checked with one ``whoami``."""
    tokens = spec["tokens"]
    clients = [
        Client(spec["servers"], CALL_TIMEOUT, tokens[(spec["first"] + i) % len(tokens)])
        for i in range(spec["clients"])
    ]
    await asyncio.gather(*(c.whoami() for c in clients))
    return clients


async def _close(clients: list[Client]) -> None:
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


def _cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _sleep_until(perf_time: float) -> None:
    await asyncio.sleep(max(0.0, perf_time - time.perf_counter()))


async def _window(spec: dict[str, Any], clients: list[Client], start: float) -> dict[str, Any]:
    begin = time.perf_counter() + (start - time.time())
    window_start = begin + float(spec["warmup"])
    window_end = window_start + float(spec["secs"])
    names: list[str] = spec["names"]
    samples: list[float] = []
    failures: Counter[str] = Counter()
    rng = random.Random(spec["seed"])
    text = body(rng)

    async def sender(client: Client, seed: int) -> None:
        pick = random.Random(seed)
        while (t0 := time.perf_counter()) < window_end:
            try:
                await client.send(pick.choice(names), text)
            except errors.ChatError as exc:
                failures[exc.code] += 1
                await asyncio.sleep(0.01)
                continue
            t1 = time.perf_counter()
            if window_start <= t1 <= window_end:
                samples.append(t1 - t0)

    cpu: list[float] = []

    async def meter() -> None:
        await _sleep_until(window_start)
        cpu.append(_cpu_now())
        await _sleep_until(window_end)
        cpu.append(_cpu_now())

    await _sleep_until(begin)
    await asyncio.gather(meter(), *(sender(c, rng.randrange(1 << 30)) for c in clients))
    return {
        "samples": [round(s, 7) for s in samples],
        "acked": len(samples),
        "errors": dict(failures),
        "cpu": cpu[1] - cpu[0],
        "seconds": window_end - window_start,
    }


async def _count(spec: dict[str, Any], clients: list[Client], start: float) -> dict[str, Any]:
    names: list[str] = spec["names"]
    remaining = int(spec["count"])
    acked = 0
    failures: Counter[str] = Counter()
    rng = random.Random(spec["seed"])
    text = body(rng)

    async def sender(client: Client, seed: int) -> None:
        nonlocal remaining, acked
        pick = random.Random(seed)
        while (
            remaining > 0 and sum(failures.values()) < MAX_ERRORS and time.perf_counter() < deadline
        ):
            remaining -= 1
            try:
                await client.send(pick.choice(names), text)
            except errors.ChatError as exc:
                failures[exc.code] += 1
                remaining += 1  # the count is of acknowledged sends
                await asyncio.sleep(0.01)
                continue
            acked += 1

    await _sleep_until(time.perf_counter() + (start - time.time()))
    t0, cpu0 = time.perf_counter(), _cpu_now()
    deadline = t0 + (spec["max_seconds"] or float("inf"))
    await asyncio.gather(*(sender(c, rng.randrange(1 << 30)) for c in clients))
    seconds = time.perf_counter() - t0
    return {"acked": acked, "errors": dict(failures), "cpu": _cpu_now() - cpu0, "seconds": seconds}


if __name__ == "__main__":
    sys.exit(worker_main())
