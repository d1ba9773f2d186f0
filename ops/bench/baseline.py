"""The baseline: the same rows in one plain SQLite file, with the same durability.

Every figure of the cluster is also reported as a ratio to what one plain
SQLite database does on the same disk, in the same run: a ratio holds on
any machine, a raw number only on this one.

The row is the chat message as the nodes store it (the ``messages`` table
of ``service/storage.py``: sender id, recipient id, a 100-byte body, a
timestamp, indexed by recipient and by sender), in a file opened like the
nodes open theirs: WAL, ``synchronous=FULL`` (fsync at every commit), through
``apsw`` so that it is the same SQLite library as the nodes'. What the
nodes do beyond this row (the request record that makes retries idempotent,
the replication log, the network, the replicas' fsyncs) is what the ratio
measures.

Measurements, each in a fresh Python process so that its CPU and memory are
its own (``python -m ops.bench.baseline COMMAND PATH ...`` prints one JSON
line; the functions at the bottom run it and read that line):

* ``per-op``: one writer, one transaction per insert, for ``secs`` seconds
  after a warm-up: rows/s and the latency of each commit. The per-operation
  counterpart of a replicated ``send``.
* ``batched``: ``rows`` inserts, ``batch`` per transaction: rows/s. The
  counterpart of catch-up, where a backup applies many records per fsync.
  With ``--keep`` it builds the plain database of the large-state figures,
  and reports the peak RSS of a process that wrote those rows.
* ``first-write``: open an existing file and commit one insert; the caller
  times it from process start, as the cluster's restart is timed. A crashed
  single-file service recovers this way, so it is also the baseline of a
  failover.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import stats

USERS = 16
BODY = "b" * 100
SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    sender_id INTEGER NOT NULL,
    recipient_id INTEGER NOT NULL,
    body TEXT NOT NULL,
    sent_at REAL NOT NULL,
    read_at REAL,
    deleted_at REAL
);
CREATE INDEX IF NOT EXISTS messages_by_recipient ON messages (recipient_id, id);
CREATE INDEX IF NOT EXISTS messages_by_sender ON messages (sender_id, id);
"""
INSERT = "INSERT INTO messages(sender_id, recipient_id, body, sent_at) VALUES (?, ?, ?, ?)"


def _open(path: Path) -> Any:
    import apsw

    conn = apsw.Connection(str(path))
    conn.execute("PRAGMA journal_mode=WAL").fetchall()
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(SCHEMA)
    return conn


def _row(rng: random.Random) -> tuple[int, int, str, float]:
    return rng.randrange(USERS), rng.randrange(USERS), BODY, time.time()


def _rss_peak_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def per_op_main(path: Path, secs: float, warmup: float) -> dict[str, Any]:
    conn, rng = _open(path), random.Random(1)
    samples: list[float] = []
    start = time.perf_counter()
    window_start, window_end = start + warmup, start + warmup + secs
    usage0 = None
    while (t0 := time.perf_counter()) < window_end:
        if usage0 is None and t0 >= window_start:
            usage0 = resource.getrusage(resource.RUSAGE_SELF)
        conn.execute(INSERT, _row(rng))  # autocommit: one transaction, one WAL fsync
        t1 = time.perf_counter()
        if t1 >= window_start:
            samples.append(t1 - t0)
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = 0.0
    if usage0 is not None:
        cpu = (usage1.ru_utime + usage1.ru_stime - usage0.ru_utime - usage0.ru_stime) / secs
    conn.close()
    return {
        "rows": len(samples),
        "tps": len(samples) / secs,
        "latency": stats.latency_summary(samples),
        "cpu": cpu,
    }


def batched_main(path: Path, rows: int, batch: int) -> dict[str, Any]:
    conn, rng = _open(path), random.Random(2)
    t0 = time.perf_counter()
    done = 0
    while done < rows:
        n = min(batch, rows - done)
        with conn:  # one transaction, one fsync
            conn.executemany(INSERT, [_row(rng) for _ in range(n)])
        done += n
    seconds = time.perf_counter() - t0
    conn.close()
    return {
        "rows": rows,
        "batch": batch,
        "seconds": seconds,
        "rows_s": rows / seconds,
        "peak_rss_kb": _rss_peak_kb(),
        "bytes": path.stat().st_size,
    }


def first_write_main(path: Path) -> dict[str, Any]:
    conn = _open(path)
    conn.execute(INSERT, _row(random.Random(3)))
    conn.close()
    return {"ok": True, "peak_rss_kb": _rss_peak_kb()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.bench.baseline")
    parser.add_argument("command", choices=["per-op", "batched", "first-write"])
    parser.add_argument("path", type=Path)
    parser.add_argument("--secs", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.command == "per-op":
        result = per_op_main(args.path, args.secs, args.warmup)
    elif args.command == "batched":
        result = batched_main(args.path, args.rows, args.batch)
    else:
        result = first_write_main(args.path)
    print(json.dumps(result), flush=True)
    return 0


# ---- the parent side: run a measurement in its own process ------------------------------------


def _run(args: list[str], timeout: float) -> tuple[dict[str, Any], float]:
    """Run one measurement process; its JSON line and the seconds from spawn to that line."""
    command = [sys.executable, "-m", "ops.bench.baseline", *args]
    t0 = time.perf_counter()
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        elapsed = time.perf_counter() - t0
        proc.wait(timeout)
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"baseline {args[0]} failed with status {proc.returncode}")
    result: dict[str, Any] = json.loads(line)
    return result, elapsed


def _fresh(path: Path) -> Path:
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    return path


def per_op(folder: Path, secs: float, warmup: float) -> dict[str, Any]:
    """Sequential single-row transactions in a fresh file under ``folder``; then, as
    ``restart``, a new process's first commit into that file (the plain counterpart
    of a failover: a single-file service recovers by restarting its process)."""
    path = _fresh(folder / "baseline-per-op.db")
    result, _ = _run(["per-op", str(path), f"--secs={secs}", f"--warmup={warmup}"], secs + 120)
    result["restart"] = first_write(path)
    _fresh(path)
    return result


def batched(folder: Path, rows: int, batch: int = 1000, keep: Path | None = None) -> dict[str, Any]:
    """``rows`` inserts, ``batch`` per transaction, in a fresh file (kept at ``keep``)."""
    path = _fresh(keep or folder / "baseline-batched.db")
    result, _ = _run(["batched", str(path), f"--rows={rows}", f"--batch={batch}"], 3600)
    if keep is None:
        _fresh(path)
    return result


def first_write(path: Path) -> dict[str, Any]:
    """Seconds from starting a process to its first committed insert into ``path``."""
    result, elapsed = _run(["first-write", str(path)], 120)
    return {"seconds": elapsed, **result}


if __name__ == "__main__":
    sys.exit(main())
