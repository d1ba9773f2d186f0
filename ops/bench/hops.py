"""Where one write's time goes, hop by hop, as the kernel sees it: ours beside the sketch.

``ops.bench`` gives the latency of a send at one client; this says which hop
it is spent in. It runs the one-client load (``load.run_window``) against a
fresh 3-node cluster and, in the middle of the window, records with ``perf`` the
system calls that mark each hop of the write path in every process of it: the
load generator's write of the request and read of the reply, the primary's read
of the request, its writes to the backups and to the client, each backup's
read of the record, its fsync, its write of the ack, and the primary's own
fsync. Kernel tracepoints cost a few microseconds per call, not a profiler's
slowdown of every Python call, so the hops keep their proportions.

With ``--sketch`` it does the same to ``write_path_sketch.py`` of the peers'
folder (the bare write path of our design: group commit, a changeset to two
backups that apply and fsync, nothing per request) at one client. Both columns
name the same events, so the difference between them, hop by hop, is the work
our request path adds to the design.

Each write is one cycle, from the generator's write of a request to its read of
the reply (one client: one write in flight). Within a cycle a milestone is the
first matching call after the one before it; cycles missing one (a heartbeat
write, the edges of the recording) are left out. The table gives each
milestone's median time from the cycle's start; the backups are ordered by
when they read the record, since on two cores the second waits for a CPU.

Needs root (kernel tracepoints) and ``perf``.

Usage:
    python -m ops.bench.hops [--secs 2] [--sketch ../shared/peers/write_path_sketch.py]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..cluster.nodes import Cluster
from ..cluster.waiting import StopWaiting, wait_for
from . import load
from .load import UNLIMITED
from .machine import children, command_line

TRACEPOINTS = (
    "syscalls:sys_exit_read",
    "syscalls:sys_enter_write",
    "syscalls:sys_enter_fdatasync",
    "syscalls:sys_exit_fdatasync",
    "syscalls:sys_enter_fsync",
    "syscalls:sys_exit_fsync",
)
SYNCS = frozenset({"fdatasync", "fsync"})
# Seconds of load before the recording starts (connections made, caches warm)
# and after it ends (the window outlives the recording).
SETTLE = 2.0
# The sketch first waits for a quiet machine (its perfutil.wait_quiet).
APPEAR_TIMEOUT = 120.0

MILESTONES = (
    ("primary reads the request", "P recv"),
    ("primary writes the record to backup 1", "P send 1"),
    ("primary writes the record to backup 2", "P send 2"),
    ("first backup reads the record", "B1 recv"),
    ("first backup starts its fsync", "B1 fsync in"),
    ("first backup's fsync returns", "B1 fsync out"),
    ("first backup writes its ack", "B1 ack"),
    ("second backup reads the record", "B2 recv"),
    ("second backup starts its fsync", "B2 fsync in"),
    ("second backup's fsync returns", "B2 fsync out"),
    ("second backup writes its ack", "B2 ack"),
    ("primary starts its fsync", "P fsync in"),
    ("primary's fsync returns", "P fsync out"),
    ("primary writes the reply", "P reply"),
    ("the client reads the reply", "C recv"),
)

# The hops between milestones: (what, its end, its beginning).
HOPS = (
    ("primary: request read -> record written", "P send 1", "P recv"),
    ("first backup: record read -> its fsync", "B1 fsync in", "B1 recv"),
    # On two cores the second backup runs once the primary leaves its core.
    ("second backup: primary in its fsync -> record read", "B2 recv", "P fsync in"),
    ("second backup: record read -> its fsync", "B2 fsync in", "B2 recv"),
    ("second backup: its fsync", "B2 fsync out", "B2 fsync in"),
    ("primary: last ack written -> reply written", "P reply", "last ack"),
)


@dataclass(frozen=True)
class Roles:
    """The processes of one write path, by pid."""

    client: int
    primary: int
    backups: tuple[int, int]

    def pids(self) -> list[int]:
        return [self.client, self.primary, *self.backups]


@dataclass(frozen=True)
class Call:
    """One traced system call: its entry or its exit (``value``: what it returned)."""

    time_us: float
    pid: int
    enter: bool
    name: str
    value: int | None = None


_LINE = re.compile(r"\s*\S.*?\s+(\d+)/\d+\s+([\d.]+):\s+syscalls:sys_(enter|exit)_(\w+):\s*(\S*)")


def parse_script(text: str) -> list[Call]:
    """The calls in ``perf script -F comm,pid,tid,time,event,trace`` output, in order."""
    calls = []
    for line in text.splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        pid, seconds, side, name, first = match.groups()
        value = None
        if side == "exit" and first.startswith("0x"):
            value = int(first, 16)
        calls.append(Call(float(seconds) * 1e6, int(pid), side == "enter", name, value))
    return calls


def _first(
    calls: Sequence[Call], start: int, end: int, pid: int, enter: bool, names: Iterable[str]
) -> int:
    wanted = frozenset(names)
    for index in range(start, end):
        call = calls[index]
        # A read counts only when it returned bytes (an empty or failed one is not a hop).
        returned = enter or (call.value or 0) > 0 or call.name in SYNCS
        if call.pid == pid and call.enter == enter and call.name in wanted and returned:
            return index
    raise LookupError


def cycles(calls: Sequence[Call], roles: Roles) -> list[dict[str, float]]:
    """Each write's milestones, in µs from the client's write of its request."""
    starts = [
        i for i, c in enumerate(calls) if c.pid == roles.client and c.enter and c.name == "write"
    ]
    found = []
    for start, after in itertools.pairwise(starts):
        try:
            found.append(_cycle(calls, start, after, roles))
        except LookupError:
            continue  # a milestone fell outside the recording, or a stray write
    return found


def _cycle(calls: Sequence[Call], start: int, after: int, roles: Roles) -> dict[str, float]:
    reply = _first(calls, start, after, roles.client, False, ("read",))
    t0 = calls[start].time_us

    def at(index: int) -> float:
        return calls[index].time_us - t0

    row: dict[str, float] = {}
    request = _first(calls, start, reply, roles.primary, False, ("read",))
    send1 = _first(calls, request, reply, roles.primary, True, ("write",))
    send2 = _first(calls, send1 + 1, reply, roles.primary, True, ("write",))
    sync_in = _first(calls, request, reply, roles.primary, True, SYNCS)
    sync_out = _first(calls, sync_in, reply, roles.primary, False, SYNCS)
    answer = max(
        i
        for i in range(request, reply)
        if calls[i].pid == roles.primary and calls[i].enter and calls[i].name == "write"
    )
    row.update({"P recv": at(request), "P send 1": at(send1), "P send 2": at(send2)})
    row.update({"P fsync in": at(sync_in), "P fsync out": at(sync_out), "P reply": at(answer)})
    backups = []
    for pid in roles.backups:
        received = _first(calls, send1, reply, pid, False, ("read",))
        synced_in = _first(calls, received, reply, pid, True, SYNCS)
        synced_out = _first(calls, synced_in, reply, pid, False, SYNCS)
        ack = _first(calls, synced_out, reply, pid, True, ("write",))
        backups.append((at(received), at(synced_in), at(synced_out), at(ack)))
    for rank, (received_at, in_at, out_at, ack_at) in enumerate(sorted(backups), 1):
        row.update({f"B{rank} recv": received_at, f"B{rank} fsync in": in_at})
        row.update({f"B{rank} fsync out": out_at, f"B{rank} ack": ack_at})
    row["last ack"] = max(row["B1 ack"], row["B2 ack"])
    row["C recv"] = at(reply)
    if not _in_order(row):
        # Calls are matched by process and kind, not by socket: a heartbeat or a
        # write on another connection between two milestones can be taken for
        # one, and the cycle then reads out of the write path's order (a backup's
        # ack after the reply it released). Such a cycle is left out, not guessed.
        raise LookupError("the milestones are out of the write path's order")
    return row


def _in_order(row: dict[str, float]) -> bool:
    """The write path's order (see the module docstring): what each milestone waits for."""
    primary = 0 < row["P recv"] < row["P send 1"] < row["P send 2"] < row["C recv"]
    synced = row["P fsync in"] < row["P fsync out"] < row["C recv"]
    backups = all(
        row["P send 1"] < row[f"B{rank} recv"] < row[f"B{rank} fsync in"]
        and row[f"B{rank} fsync in"] < row[f"B{rank} fsync out"] < row[f"B{rank} ack"]
        and row[f"B{rank} ack"] < row["P reply"] < row["C recv"]
        for rank in (1, 2)
    )
    return primary and synced and backups and row["B1 recv"] <= row["B2 recv"]


def medians(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(row[key] for row in rows) for key in rows[0]} if rows else {}


def record(roles: Roles, secs: float, folder: Path) -> list[Call]:
    """``secs`` of the path's system calls, parsed."""
    data = folder / "perf.data"
    pids = ",".join(map(str, roles.pids()))
    events = ",".join(TRACEPOINTS)
    subprocess.run(
        [
            "perf",
            "record",
            "-q",
            "-m",
            "1024",
            "-e",
            events,
            "-o",
            str(data),
            "-p",
            pids,
            "--",
            "sleep",
            str(secs),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    script = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "comm,pid,tid,time,event,trace"],
        check=True,
        capture_output=True,
        text=True,
    )
    return parse_script(script.stdout)


def trace_cluster(secs: float, folder: Path) -> list[dict[str, float]]:
    """Our cluster at one client: each write's milestones over ``secs`` of its window."""
    cluster = Cluster(folder / "cluster", settings=UNLIMITED, tag="hops")
    cluster.start()
    try:
        cluster.wait_in_sync(timeout=APPEAR_TIMEOUT)
        users = asyncio.run(load.register_users(cluster.servers, 1, "hops"))
        primary = cluster.wait_for_primary()
        pids = cluster.pids()
        backups = tuple(pid for name, pid in pids.items() if name != f"node{primary.node_id}")
        result: dict[str, BaseException] = {}

        def run() -> None:
            try:
                load.run_window(cluster.servers, users, 1, 1, SETTLE, secs + 2 * SETTLE, dict(pids))
            except BaseException as exc:  # reported below, in the caller's thread
                result["error"] = exc

        thread = threading.Thread(target=run, name="hops-load")
        thread.start()
        try:

            def worker() -> int | None:
                if not thread.is_alive():
                    raise StopWaiting(f"the load ended first: {result.get('error')!r}")
                mine = [p for p in children(os.getpid()) if "ops.bench.load" in command_line(p)]
                return mine[0] if mine else None

            client = wait_for(worker, APPEAR_TIMEOUT, "the load generator's worker to start")
            # Part of the measurement, not a wait for state: the recording starts
            # inside the window, after its warm-up.
            time.sleep(2 * SETTLE)
            roles = Roles(client, primary.pid or 0, (backups[0], backups[1]))
            calls = record(roles, secs, folder)
        finally:
            thread.join()
        if "error" in result:
            raise result["error"]
        return cycles(calls, roles)
    finally:
        cluster.stop_all()


def trace_sketch(sketch: Path, secs: float, folder: Path) -> list[dict[str, float]]:
    """The sketch at one client: each write's milestones over ``secs`` of its run."""
    folder.mkdir(parents=True, exist_ok=True)
    run = subprocess.Popen(
        [
            sys.executable,
            str(sketch),
            "--runs",
            "1",
            "--secs",
            str(secs + 2 * SETTLE),
            "--clients",
            "1",
            "--configs",
            "repl2_full",
            "--dir",
            str(folder),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PEER_RESULTS_DIR": str(folder)},
    )
    try:

        def roles() -> Roles | None:
            if run.poll() is not None:
                raise StopWaiting(
                    f"the sketch ended first:\n{run.stdout.read() if run.stdout else ''}"
                )
            found: dict[str, list[int]] = {}
            for pid in children(run.pid):
                line = command_line(pid)
                if "--role" in line:
                    found.setdefault(line[line.index("--role") + 1], []).append(pid)
            if len(found.get("backup", [])) == 2 and found.get("primary") and found.get("client"):
                b1, b2 = found["backup"]
                return Roles(found["client"][0], found["primary"][0], (b1, b2))
            return None

        path = wait_for(roles, APPEAR_TIMEOUT, "the sketch's client, primary and two backups")
        time.sleep(SETTLE)  # into its run, as for ours
        calls = record(path, secs, folder)
        run.wait(timeout=secs + 4 * SETTLE + 60)
        return cycles(calls, path)
    finally:
        if run.poll() is None:
            run.send_signal(signal.SIGINT)
            run.wait(timeout=30)


def table(columns: dict[str, list[dict[str, float]]]) -> str:
    """The milestones' medians, one column per traced path, and the hops they make."""
    meds = {name: medians(rows) for name, rows in columns.items()}
    names = list(columns)
    lines = [
        f"{'µs from the client writing its request (medians)':<54}"
        + "".join(f"{n:>10}" for n in names)
    ]
    lines.append(f"{'writes traced':<54}" + "".join(f"{len(columns[n]):>10}" for n in names))
    for label, key in sorted(MILESTONES, key=lambda m: meds[names[0]].get(m[1], 0.0)):
        lines.append(
            f"{label:<54}" + "".join(f"{meds[n].get(key, float('nan')):>10.0f}" for n in names)
        )
    lines.append("")
    lines.append("hops (differences of the medians above)")
    for label, end, begin in HOPS:
        lines.append(
            f"{label:<54}"
            + "".join(
                f"{meds[n].get(end, float('nan')) - meds[n].get(begin, float('nan')):>10.0f}"
                for n in names
            )
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ops.bench.hops", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--secs", type=float, default=2.0, help="seconds recorded (default 2)")
    parser.add_argument("--sketch", type=Path, help="write_path_sketch.py, traced the same way")
    return parser.parse_args(argv)


def unavailable() -> str | None:
    """Why the system calls cannot be traced here, or None when they can."""
    if shutil.which("perf") is None:
        return "perf is not installed (Debian: linux-perf)"
    if os.geteuid() != 0:
        return "recording kernel tracepoints needs root"
    with tempfile.TemporaryDirectory(prefix="hops-") as folder:
        trial = subprocess.run(
            ["perf", "record", "-q", "-e", TRACEPOINTS[0], "-o", f"{folder}/trial", "--", "true"],
            capture_output=True,
            text=True,
        )
    if trial.returncode != 0:
        return f"perf cannot record {TRACEPOINTS[0]}: {trial.stderr.strip()}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    why = unavailable()
    if why is not None:
        print(f"ops.bench.hops cannot run here: {why}", file=sys.stderr)
        return 2
    columns = {}
    with tempfile.TemporaryDirectory(prefix="hops-") as folder:
        columns["ours"] = trace_cluster(args.secs, Path(folder) / "ours")
        if args.sketch is not None:
            columns["sketch"] = trace_sketch(
                args.sketch.resolve(), args.secs, Path(folder) / "sketch"
            )
    print(table(columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
