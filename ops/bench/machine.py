"""What the machine is and what it is doing: /proc readers and environment facts.

A benchmark on a shared machine measures whatever else runs there too, so
every measurement window also records where the CPU went: each node, each
load-generator worker, and the machine as a whole (``/proc/stat``). The part
of the machine's busy time that none of our processes account for is "other"
load, printed beside the figures it may have disturbed.

Linux only (``/proc``); on other systems the readers return None and the
report says "n/a".
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def rss_kb(pid: int, field: str = "VmRSS") -> int | None:
    """Resident set size of a process in KiB (``VmHWM`` for its peak), or None."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (field 3 on), or None
    once the process is gone. The name may hold spaces: fields count from its ")"."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            text = stat.read()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a process has used so far, or None once it is gone."""
    fields = _stat_fields(pid)
    return None if fields is None else (int(fields[11]) + int(fields[12])) / _TICK


def children(parent: int) -> list[int]:
    """The processes whose parent is ``parent`` now."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and int(fields[1]) == parent:
                found.append(int(entry.name))
    return found


def command_line(pid: int) -> list[str]:
    """A process's arguments (empty once it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")


def machine_ticks() -> tuple[int, int] | None:
    """(total, idle) CPU ticks of the whole machine since boot, or None."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            values = [int(x) for x in stat.readline().split()[1:]]
    except OSError:
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values[:8]), idle


@dataclass
class CpuSample:
    at: float
    procs: dict[str, float | None]
    machine: tuple[int, int] | None


def sample_cpu(pids: Mapping[str, int]) -> CpuSample:
    """CPU used so far by each named process and by the machine."""
    return CpuSample(
        time.perf_counter(), {name: cpu_seconds(pid) for name, pid in pids.items()}, machine_ticks()
    )


def cpu_between(before: CpuSample, after: CpuSample) -> dict[str, Any]:
    """Each process's share of one core between two samples, and the machine's busy
    share of all its cores (1.0 = every core busy)."""
    wall = max(after.at - before.at, 1e-9)
    shares: dict[str, float | None] = {}
    for name, start in before.procs.items():
        end = after.procs.get(name)
        shares[name] = None if start is None or end is None else (end - start) / wall
    busy = None
    if before.machine is not None and after.machine is not None:
        total = max(after.machine[0] - before.machine[0], 1)
        busy = 1.0 - (after.machine[1] - before.machine[1]) / total
    return {"seconds": wall, "procs": shares, "machine_busy": busy}


def other_load(pids: Mapping[str, int], interval: float = 1.0) -> float | None:
    """Cores used over the next ``interval`` seconds by processes not in ``pids``."""
    before = sample_cpu(pids)
    time.sleep(interval)
    return others(cpu_between(before, sample_cpu(pids)))


def others(cpu: Mapping[str, Any]) -> float | None:
    """From a ``cpu_between`` result: the cores used by processes it did not watch."""
    busy: float | None = cpu["machine_busy"]
    if busy is None:
        return None
    ours = sum(float(v) for v in cpu["procs"].values() if v is not None)
    return max(0.0, busy * (os.cpu_count() or 1) - ours)


def cpu_per_write(
    cpu: Mapping[str, Any], acked: int, primary: str | None
) -> dict[str, float | None]:
    """From a ``cpu_between`` result over a window that acknowledged ``acked`` writes:
    CPU seconds per acknowledged write of the whole cluster and load generator
    (``all``), of the primary (``primary``, the node named so), of one backup (the mean
    of the other nodes) and of the load generator (every ``worker*`` together).

    The whole is what the cores must hold: on a machine with as many cores as
    processes, it bounds the throughput at ``cores / all``."""
    seconds = float(cpu["seconds"])
    if acked <= 0:
        return {"all": None, "primary": None, "backup": None, "generator": None}
    shares = {name: v for name, v in cpu["procs"].items() if v is not None}

    def per_write(names: list[str]) -> float | None:
        return sum(shares[n] for n in names) * seconds / acked if names else None

    nodes = [n for n in shares if not n.startswith("worker")]
    backups = [n for n in nodes if n != primary]
    backup = per_write(backups)
    return {
        "all": per_write(list(shares)),
        "primary": per_write([primary]) if primary is not None and primary in shares else None,
        "backup": backup / len(backups) if backup is not None and primary in shares else None,
        "generator": per_write([n for n in shares if n.startswith("worker")]),
    }


def wait_quiet(
    pids: Mapping[str, int], max_wait: float, threshold: float = 0.25
) -> tuple[float | None, float]:
    """Wait (up to ``max_wait`` s) until other processes use at most ``threshold``
    cores: a benchmark beside another measures both. Returns the last other load
    seen and the seconds waited."""
    t0 = time.monotonic()
    while True:
        load = other_load(pids)
        waited = time.monotonic() - t0
        if load is None or load <= threshold or waited >= max_wait:
            return load, waited


def filesystem_of(path: Path) -> str | None:
    """The type of the file system holding ``path`` (fsync costs depend on it)."""
    best, kind = "", None
    try:
        with open("/proc/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                parts = line.split()
                mount = parts[1]
                inside = str(path.resolve()).startswith(mount.rstrip("/") + "/")
                if (inside or str(path.resolve()) == mount) and len(mount) > len(best):
                    best, kind = mount, parts[2]
    except OSError:
        return None
    return kind


def environment(data_dir: Path) -> dict[str, Any]:
    """The facts a reader needs to compare two result files."""
    import apsw

    facts: dict[str, Any] = {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "sqlite": apsw.sqlite_lib_version(),
        "apsw": apsw.apsw_version(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "filesystem": filesystem_of(data_dir),
        "commit": _commit(),
    }
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            facts["mem_total_kb"] = int(meminfo.readline().split()[1])
        with open("/proc/loadavg", encoding="ascii") as loadavg:
            facts["loadavg_at_start"] = [float(x) for x in loadavg.read().split()[:3]]
    except OSError:
        pass
    return facts


def _commit() -> str | None:
    """The source revision measured, when the tree is a git checkout (read only)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
