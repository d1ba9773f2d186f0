"""The figures, their baselines, the table on stdout and the JSON on disk.

Every figure is stored in base units (seconds, bytes, per second) and paired
with a baseline figure *of the same run* (``baseline.py``); its ratio is
figure / baseline, computed per run and then summarised like the figure
itself (median, min, max over the runs). So a throughput ratio of 0.5 means
half the rows per second of one plain SQLite file, a latency or failover
ratio of 20 means twenty plain commits' time, whatever the machine.

The JSON holds everything: the environment, the settings, every run's
figures and raw details (per-window latency summaries, CPU per process, each
failover round, each catch-up), and the summaries the table shows.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .stats import across_runs

SCHEMA_VERSION = 1
# Cores used by other processes during a window that make its figures suspect.
DISTURBED = 0.25


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str  # the unit shown in the table
    scale: float  # shown value = stored value * scale
    baseline: str | None  # the key of the same run's baseline figure
    section: str


MIB = 2**-20
Row = tuple[str, str, str, float, str | None]
# key, label, unit shown, scale, baseline key: one row per figure, by section, in table order.
_BASELINE: list[Row] = [
    ("base_tps", "plain SQLite, 1 writer, 1 insert/tx", "rows/s", 1, None),
    ("base_p50", "plain SQLite commit p50", "ms", 1e3, None),
    ("base_p99", "plain SQLite commit p99", "ms", 1e3, None),
    ("base_batched_rate", "plain SQLite, 1000 inserts/tx", "rows/s", 1, None),
    ("base_batched_n", "plain SQLite, catch-up rows batched", "s", 1, None),
    ("base_restart", "plain SQLite: new process -> first commit", "s", 1, None),
]
_FAILOVER: list[Row] = [
    ("failover_median", "SIGKILL primary -> first ack, median", "s", 1, "base_restart"),
    ("failover_max", "SIGKILL primary -> first ack, max", "s", 1, "base_restart"),
    ("failover_elected_median", "SIGKILL -> new primary (log), median", "s", 1, "base_restart"),
    ("freeze_median", "SIGSTOP primary -> first ack, median", "s", 1, "base_restart"),
    ("freeze_max", "SIGSTOP primary -> first ack, max", "s", 1, "base_restart"),
    ("stop_median", "SIGTERM primary -> first ack, median", "s", 1, "base_restart"),
    ("stop_max", "SIGTERM primary -> first ack, max", "s", 1, "base_restart"),
    ("cut_median", "primary cut off (nft) -> first ack, median", "s", 1, "base_restart"),
    ("cut_max", "primary cut off (nft) -> first ack, max", "s", 1, "base_restart"),
    ("rejoin_median", "restarted node back in sync set, median", "s", 1, "base_restart"),
]
_CATCHUP: list[Row] = [
    ("catchup_rate", "log catch-up rate", "msg/s", 1, "base_batched_rate"),
    ("catchup_records_rate", "log catch-up rate (records)", "rec/s", 1, None),
    ("catchup_time", "log catch-up, start -> end (log)", "s", 1, "base_batched_n"),
    ("catchup_in_sync", "restart -> back in sync set", "s", 1, "base_batched_n"),
    ("snap_rate", "snapshot catch-up rate", "msg/s", 1, "base_batched_rate"),
    ("snap_time", "snapshot catch-up, start -> end (log)", "s", 1, "base_batched_n"),
    ("snap_in_sync", "snapshot: restart -> back in sync set", "s", 1, "base_batched_n"),
    ("snapshot_send", "snapshot sent (primary log)", "s", 1, "base_batched_n"),
    ("snapshot_install", "snapshot installed (backup log)", "s", 1, "base_batched_n"),
]
_LARGE: list[Row] = [
    ("big_messages", "messages held by the cluster", "msgs", 1, None),
    ("big_load_rate", "loading: sends/s, 64 clients", "msg/s", 1, "base_tps"),
    ("rss_after_load", "RSS per node after loading (max)", "MiB", MIB, "base_big_rss"),
    ("rss_after_restart", "RSS per node after restart (max)", "MiB", MIB, "base_big_rss"),
    ("disk_per_node", "database + WAL per node (max)", "MiB", MIB, "base_big_disk"),
    ("restart_first_write", "start stopped cluster -> first ack", "s", 1, "base_first_write"),
    ("restart_elected", "start stopped cluster -> primary (log)", "s", 1, "base_first_write"),
    ("base_big_rss", "plain SQLite: peak RSS of the writer", "MiB", MIB, None),
    ("base_big_disk", "plain SQLite: file size", "MiB", MIB, None),
    ("base_first_write", "plain SQLite: new process -> first commit", "s", 1, None),
]


def _send_rows(c: int) -> list[Row]:
    who = f"{c} client" + ("s" if c != 1 else "")
    return [
        (f"tps@{c}", f"{who}: throughput", "tx/s", 1, "base_tps"),
        (f"p50@{c}", f"{who}: latency p50", "ms", 1e3, "base_p50"),
        (f"p99@{c}", f"{who}: latency p99", "ms", 1e3, "base_p99"),
        (f"gen_cpu@{c}", f"{who}: generator CPU (max worker)", "%", 100, None),
        (f"cpu_write@{c}", f"{who}: CPU per ack, all processes", "us", 1e6, None),
        (f"cpu_primary@{c}", f"{who}: CPU per ack, primary", "us", 1e6, None),
        (f"cpu_backup@{c}", f"{who}: CPU per ack, each backup", "us", 1e6, None),
        (f"cpu_gen@{c}", f"{who}: CPU per ack, load generator", "us", 1e6, None),
        (f"other_cpu@{c}", f"{who}: other processes' CPU", "cores", 1, None),
    ]


def catalogue(clients: Sequence[int]) -> list[Figure]:
    """Every figure the benchmark may produce, in table order."""
    sections: list[tuple[str, list[Row]]] = [
        ("baseline", _BASELINE),
        ("send (durable, replicated)", [row for c in clients for row in _send_rows(c)]),
        ("failover", _FAILOVER),
        ("catch-up", _CATCHUP),
        ("large state", _LARGE),
    ]
    return [Figure(*row, section=name) for name, rows in sections for row in rows]


def summarise(figures: list[Figure], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per figure: median/min/max over runs, of the value and of its ratio to the baseline."""
    out: dict[str, Any] = {}
    for f in figures:
        values = [r["figures"].get(f.key) for r in runs]
        summary = across_runs(values)
        if summary is None:
            continue
        entry: dict[str, Any] = {"label": f.label, "summary": summary, "values": values}
        if f.baseline is not None:
            ratios = [_ratio(r["figures"].get(f.key), r["figures"].get(f.baseline)) for r in runs]
            entry["baseline"] = f.baseline
            entry["ratio"] = across_runs(ratios)
        out[f.key] = entry
    return out


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0 or math.isnan(value) or math.isnan(base):
        return None
    return value / base


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def header(args: argparse.Namespace, env: dict[str, Any]) -> list[str]:
    """Two lines: what ran, and on what."""
    ran = [f"{args.runs} run(s)"]
    if "throughput" in args.only:
        ran.append(f"{args.secs:g} s windows after {args.warmup:g} s warm-up")
    if "failover" in args.only:
        rounds = f"{args.kills} kills and {args.freezes} freezes"
        if args.arbiter == "etcd":
            rounds = f"{args.kills} kills, {args.freezes} freezes, {args.stops} stops and "
            rounds += f"{args.cuts} cuts"
        ran.append(rounds + " per run")
    if args.only & {"catchup", "snapshot"}:
        ran.append(f"catch-up of {args.catchup} sends")
    if "big" in args.only:
        cut = f" (or {args.big_secs:g} s of loading)" if args.big_secs else ""
        ran.append(f"large state of {args.big} messages{cut}")
    what = f"target {args.target}" if args.target else "3-node cluster"
    if args.arbiter == "etcd" and not args.target:
        hosts = ",".join(args.hosts)
        what += f" with etcd as the arbiter (nodes on {hosts}, etcd on {args.etcd_host})"
    return [
        f"ops.bench: {what}, " + ", ".join(ran),
        f"machine: {env['cores']} cores, Python {env['python']}, SQLite {env['sqlite']}, "
        f"{env.get('filesystem')} file system, commit {env.get('commit')}, {env['date_utc']}",
    ]


def table(figures: list[Figure], summary: dict[str, Any], header: Sequence[str]) -> str:
    """The summary as a fixed-width table (medians, min-max, ratio to the baseline)."""
    lines = [*header, ""]
    lines.append(
        f"{'figure':<44} {'median':>9} {'min':>9} {'max':>9} {'unit':<7} {'n':>2}"
        f"  {'baseline':>9}  {'ratio (min-max)':<20}"
    )
    by_key = {f.key: f for f in figures}
    section = None
    for f in figures:
        entry = summary.get(f.key)
        if entry is None:
            continue
        if f.section != section:
            section = f.section
            lines.append(f"-- {section}")
        s = entry["summary"]
        row = (
            f"  {f.label:<42} {_fmt(s['median'] * f.scale):>9} {_fmt(s['min'] * f.scale):>9} "
            f"{_fmt(s['max'] * f.scale):>9} {f.unit:<7} {s['runs']:>2}"
        )
        ratio = entry.get("ratio")
        base = summary.get(f.baseline or "")
        if ratio is not None and base is not None:
            bf = by_key[f.baseline or ""]
            shown_base = f"{_fmt(base['summary']['median'] * bf.scale)} {bf.unit}"
            row += (
                f"  {shown_base:>9}  {_fmt(ratio['median'])}x "
                f"({_fmt(ratio['min'])}-{_fmt(ratio['max'])})"
            )
        lines.append(row)
    lines.append("")
    lines.append("ratio = figure / baseline figure of the same run (plain SQLite, WAL, FULL sync)")
    others = [v for k, e in summary.items() if k.startswith("other_cpu@") for v in e["values"] if v]
    if others and max(others) > DISTURBED:
        lines.append(
            f"WARNING: other processes used up to {max(others):.2f} cores during the "
            "measurement windows: these figures measure that load too"
        )
    return "\n".join(lines)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({"schema": SCHEMA_VERSION, **payload}, indent=1, sort_keys=True))
    partial.replace(path)
