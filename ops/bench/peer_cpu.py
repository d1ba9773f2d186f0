"""CPU per transaction of the PostgreSQL peer, measured as ``ops.bench`` measures ours.

``ops.bench`` reports the CPU that every process of our cluster and of its load
generator spends per acknowledged write. To set that beside the peer's, this runs
the peer's benchmark (``pg_bench.py`` of the peers' folder: a primary with two
synchronous standbys, pgbench inserting one row per transaction; one
configuration, ``sync2_on``) and, in the middle of each of its pgbench runs, adds
up the CPU of every PostgreSQL process (``postgres``: postmasters, backends, WAL
senders and receivers, the standbys' startup and writer processes) and of pgbench.
Divided by the transactions of that window (pgbench's tps), that is the peer's
CPU per transaction, the figure ``cpu_write`` is for ours.

A window starts ``settle`` seconds after pgbench appears, once its connections
are made, and ends ``settle`` seconds before its run does; a process that starts
or ends inside the window is not counted (there is none in a steady run).

Usage:
    python -m ops.bench.peer_cpu ../shared/peers/pg_bench.py [--clients 1,8,32,64] [--secs 10]
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..cluster.waiting import StopWaiting, wait_for
from .machine import cpu_seconds

PEER_PROCESSES = frozenset({"postgres", "pgbench"})
# How long pgbench may take to appear once the previous run ended (a run's set-up
# truncates the table and checkpoints), and to end once its seconds are over.
APPEAR_TIMEOUT = 120.0


def pids_named(names: Iterable[str]) -> dict[int, str]:
    """Every process whose command name (``/proc/PID/comm``) is one of ``names``."""
    wanted = frozenset(names)
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            name = (entry / "comm").read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            continue  # gone meanwhile
        if name in wanted:
            found[int(entry.name)] = name
    return found


@dataclass(frozen=True)
class Sample:
    """CPU seconds used so far by each watched process, by pid (with its name)."""

    cpu: Mapping[int, tuple[str, float]]


def sample(names: Iterable[str]) -> Sample:
    cpu = {}
    for pid, name in pids_named(names).items():
        used = cpu_seconds(pid)
        if used is not None:
            cpu[pid] = (name, used)
    return Sample(cpu)


def used_between(before: Sample, after: Sample) -> dict[str, float]:
    """CPU seconds used between two samples, by process name, over the processes
    present in both."""
    used: dict[str, float] = {}
    for pid, (name, end) in after.cpu.items():
        if pid in before.cpu:
            used[name] = used.get(name, 0.0) + end - before.cpu[pid][1]
    return used


def tps_of(output: str) -> dict[int, float]:
    """pgbench's transactions per second by client count, from pg_bench.py's output
    (lines such as ``rep 1 sync2_on  clients  8: tps  5334 avg ...``)."""
    return {
        int(clients): float(tps)
        for clients, tps in re.findall(r"clients\s+(\d+): tps\s+([\d.]+)", output)
    }


def new_pgbench(measured: set[int]) -> set[int]:
    """The pgbench processes running that are not among ``measured``: each run of the
    peer is a pgbench process of its own, so a run is told from the one before by its
    pid, however close behind it starts."""
    return set(pids_named({"pgbench"})) - measured


def _start(command: list[str]) -> subprocess.Popen[str]:
    """Start the peer so that it can be interrupted, even when this process ignores
    SIGINT (a shell starts background jobs so): a program inherits an ignored SIGINT,
    and a Python started with it ignored never raises KeyboardInterrupt, on which
    pg_bench.py stops its PostgreSQL. A handler, unlike an ignored signal, is reset
    to the default by exec. Main thread only, as the tool runs."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)


def _next_run(peer: subprocess.Popen[str], measured: set[int], what: str) -> set[int]:
    """Wait for the pids of the peer's next pgbench run; raise if the peer ends first."""

    def started() -> set[int]:
        run = new_pgbench(measured)
        if not run and peer.poll() is not None:
            raise StopWaiting
        return run

    try:
        return wait_for(started, APPEAR_TIMEOUT, f"a pgbench process for {what}")
    except StopWaiting:
        output, _ = peer.communicate()
        raise RuntimeError(f"the peer ended ({peer.returncode}) before {what}:\n{output}") from None


def measure(
    command: list[str], clients: list[int], secs: float, settle: float
) -> tuple[dict[int, dict[str, float]], str]:
    """Run ``command`` (the peer's benchmark, one pgbench run per entry of
    ``clients``, each ``secs`` long); the CPU seconds used by name in the middle
    window of each run, and the command's output."""
    window = secs - 2 * settle
    if window <= 0:
        raise ValueError("secs must be more than twice settle")
    used: dict[int, dict[str, float]] = {}
    measured: set[int] = set()
    with _start(command) as peer:
        try:
            for count in clients:
                run = _next_run(peer, measured, f"{command[1]}'s run of {count} clients")
                measured |= run
                time.sleep(settle)
                before = sample(PEER_PROCESSES)
                time.sleep(window)
                used[count] = {"seconds": window, **used_between(before, sample(PEER_PROCESSES))}
        except BaseException:
            # As Ctrl-C would: pg_bench.py stops and deletes its PostgreSQL on it.
            peer.send_signal(signal.SIGINT)
            raise
        output, _ = peer.communicate()
    if peer.returncode != 0:
        raise RuntimeError(f"{command[1]} failed ({peer.returncode}):\n{output}")
    return used, output


def per_transaction(used: Mapping[str, float], tps: float) -> dict[str, float]:
    """µs of CPU per transaction: of every peer process (``all``) and of each name."""
    transactions = tps * used["seconds"]
    per = {name: 1e6 * v / transactions for name, v in used.items() if name != "seconds"}
    per["all"] = sum(per.values())
    return per


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.bench.peer_cpu", description=__doc__)
    parser.add_argument("pg_bench", type=Path, help="the peers' pg_bench.py")
    parser.add_argument("--clients", default="1,8,32,64")
    parser.add_argument("--secs", type=float, default=10.0)
    parser.add_argument("--settle", type=float, default=2.0)
    args = parser.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    command = [
        sys.executable,
        str(args.pg_bench),
        "--reps",
        "1",
        "--secs",
        f"{args.secs:g}",
        "--configs",
        "sync2_on",
        "--no-failover",
        "--clients",
        ",".join(map(str, clients)),
    ]
    used, output = measure(command, clients, args.secs, args.settle)
    tps = tps_of(output)
    print("clients      tps  CPU per transaction, all processes  (postgres, pgbench)")
    for count in clients:
        if count not in tps:
            print(f"{count:7d}  no tps in the peer's output")
            continue
        per = per_transaction(used[count], tps[count])
        print(
            f"{count:7d} {tps[count]:8,.0f}  {per['all']:8,.0f} us"
            f"  ({per.get('postgres', 0.0):,.0f}, {per.get('pgbench', 0.0):,.0f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
