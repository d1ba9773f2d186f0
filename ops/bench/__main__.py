"""``python -m ops.bench``: run the benchmark, print the table, write the JSON.

    python -m ops.bench                 # the full benchmark (40 minutes or more)
    python -m ops.bench --quick         # one short run of every figure (under 3 minutes)
    python -m ops.bench --target 127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003
    python -m ops.bench --only failover --arbiter etcd   # etcd as the arbiter (root: cuts)

This module reads as the benchmark: start a cluster and register users;
``--runs`` times, the per-run sections (baseline, send throughput and
latency, failover, log catch-up, snapshot catch-up); then the large state
(loaded once, restarted once per run); then the report. Progress goes to
stderr, the table to stdout, everything to the JSON file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ops import netcut
from ops.cluster.nodes import Cluster
from ops.cluster.ports import free_ports
from ops.etcd import Etcd, EtcdError
from service.client import status_all
from service.errors import ChatError

from . import baseline, bigstate, catchup, failover, load, machine, report
from .load import UNLIMITED

SECTIONS = ("throughput", "failover", "catchup", "snapshot", "big")
CATCHUP_CLIENTS = 32
IN_SYNC_TIMEOUT = 60.0
BIG_CLIENTS = 64


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ops.bench",
        description="Benchmark a 3-node cluster against one plain SQLite file.",
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="one short run of every figure")
    add("--runs", type=int, help="repetitions of every figure (default 3, quick 1)")
    add("--secs", type=float, help="measurement window per client count (default 10, quick 3)")
    add("--warmup", type=float, help="warm-up before each window (default 2, quick 1)")
    add("--clients", default="1,8,32,64", help="concurrent clients, comma-separated")
    add("--workers", type=int, default=2, help="load-generator processes")
    add("--users", type=int, default=16, help="registered users the clients log in as")
    add("--kills", type=int, help="primary kills per run (default 10, quick 3)")
    add("--freezes", type=int, help="primary freezes (SIGSTOP) per run (default 5, quick 2)")
    add("--arbiter", choices=("peers", "etcd"), default="peers", help="peers (one host, the "
        "default) or etcd: nodes on --hosts, an etcd member on --etcd-host; throughput and "
        "failover only")  # fmt: skip
    add("--hosts", default="127.0.0.11,127.0.0.12,127.0.0.13", help="with --arbiter etcd: "
        "the nodes' loopback addresses")  # fmt: skip
    add("--etcd-host", default="127.0.0.10", help="with --arbiter etcd: etcd's address")
    add("--stops", type=int, help="with --arbiter etcd: clean stops (SIGTERM) of the primary "
        "per run (default 5, quick 2)")  # fmt: skip
    add("--cuts", type=int, help="with --arbiter etcd: the primary cut off with nft (root) "
        "per run (default 5, quick 2)")  # fmt: skip
    add("--catchup", type=int, help="sends a stopped backup misses (default 20000, quick 2000)")
    add("--big", type=int, help="messages of the large state (default 1M, quick 50k; 0: skip)")
    add("--big-secs", type=float, help="stop loading the large state after this long "
        "(default: no limit, quick 90)")  # fmt: skip
    add("--only", help=f"comma-separated sections among {','.join(SECTIONS)}")
    add("--target", help="HOST:PORT,... of a running cluster: throughput and latency only")
    add("--json", type=Path, help="result file (default var/bench/bench-DATE.json)")
    add("--wait-quiet", type=float, help="before each measurement, wait up to this long for "
        "other processes to leave the CPU (default 60, quick 0)")  # fmt: skip
    add("--dir", type=Path, help="where to create the temp folder (default: system temp)")
    add("--keep", action="store_true", help="keep the temp folder (databases and node logs)")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "runs": 1 if quick else 3,
        "secs": 3.0 if quick else 10.0,
        "warmup": 1.0 if quick else 2.0,
        "kills": 3 if quick else 10,
        "freezes": 2 if quick else 5,
        "catchup": 2000 if quick else 20_000,
        "big": 50_000 if quick else 1_000_000,
        "big_secs": 90.0 if quick else 0.0,
        "wait_quiet": 0.0 if quick else 60.0,
        "stops": (2 if quick else 5) if args.arbiter == "etcd" else 0,
        "cuts": (2 if quick else 5) if args.arbiter == "etcd" else 0,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.clients = [int(c) for c in args.clients.split(",") if c.strip()]
    args.only = set(args.only.split(",")) if args.only else set(SECTIONS)
    if args.only - set(SECTIONS):
        parser.error(f"unknown sections: {sorted(args.only - set(SECTIONS))}")
    if args.target:
        args.only &= {"throughput"}
    if args.arbiter == "etcd":
        # Catch-up is node to node, the same in both modes; the large state too.
        args.only &= {"throughput", "failover"}
        args.hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
        if len(args.hosts) != 3 or args.etcd_host in args.hosts:
            parser.error("--hosts takes three addresses, none of them --etcd-host")
    elif args.stops or args.cuts:
        parser.error("--stops and --cuts measure the etcd arbiter mode: add --arbiter etcd")
    why = netcut.unavailable() if args.cuts and "failover" in args.only else None
    if why is not None:
        parser.error(f"--cuts needs nft as root ({why}); or measure without them: --cuts 0")
    if args.big <= 0:
        args.only.discard("big")
    if args.json is None:
        args.json = Path("var/bench") / f"bench-{time.strftime('%Y%m%dT%H%M%S')}.json"
    return args


class Progress:
    """Timestamped progress lines on stderr."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f}s] {text}", file=sys.stderr, flush=True)


@dataclass
class Run:
    """One repetition: its figures (base units, see report.py) and raw details."""

    figures: dict[str, float | None] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=lambda: {"quiet": []})


class Bench:
    """The options, the temp folder, the cluster (None with ``--target``) and its users."""

    def __init__(self, args: argparse.Namespace, root: Path, say: Progress) -> None:
        self.args = args
        self.root = root
        self.say = say
        self.cluster: Cluster | None = None
        self.etcd: Etcd | None = None
        self.servers: list[str] = []
        self.users = load.Users([], [])
        self.prefix = f"bench_{secrets.token_hex(3)}_"

    @property
    def watch(self) -> dict[str, int]:
        return self.cluster.pids() if self.cluster is not None else {}

    async def setup(self) -> None:
        if self.args.target:
            self.servers = [s.strip() for s in self.args.target.split(",") if s.strip()]
            reports = await status_all(self.servers, 2.0)
            if not any(r["up"] for r in reports):
                raise RuntimeError(f"no node of {self.args.target} answers status")
        else:
            self.cluster = self.new_cluster()
            self.cluster.start(wait=False)
            await asyncio.to_thread(self.cluster.wait_in_sync, IN_SYNC_TIMEOUT)
            self.servers = self.cluster.servers
            self.say(f"cluster of 3 nodes in sync ({self.root})")
        self.users = await load.register_users(self.servers, self.args.users, self.prefix)
        self.say(f"registered {self.args.users} users")

    def new_cluster(self) -> Cluster:
        """The cluster to measure; with ``--arbiter etcd``, on addresses of its own, with
        an etcd member started first (SPEC section 10)."""
        if self.args.arbiter != "etcd":
            return Cluster(self.root / "cluster", settings=UNLIMITED, tag="bench")
        host = self.args.etcd_host
        client, peer = free_ports(2, host)
        self.etcd = Etcd(self.root / "etcd", f"{host}:{client}", f"{host}:{peer}")
        try:
            self.etcd.start()
        except EtcdError as exc:
            raise RuntimeError(f"etcd did not start: {exc}") from None
        settings = {**UNLIMITED, "arbiter": "etcd", "etcd_endpoints": self.etcd.client}
        return Cluster(self.root / "cluster", hosts=self.args.hosts, settings=settings, tag="bench")

    async def run_once(self) -> Run:
        run = Run()
        await self.baseline(run)
        only, owned = self.args.only, self.cluster is not None
        if "throughput" in only:
            await self.throughput(run)
        a = self.args
        if owned and "failover" in only and a.kills + a.freezes + a.stops + a.cuts > 0:
            await self.failover(run)
        if owned and "catchup" in only:
            await self.catchup(run)
        if owned and "snapshot" in only:
            await self.snapshot(run)
        return run

    async def quiet(self, run: Run) -> None:
        """Before a measurement: wait a while for other processes to leave the CPU alone."""
        limit = self.args.wait_quiet
        if limit <= 0:
            return
        other, waited = await asyncio.to_thread(machine.wait_quiet, self.watch, limit)
        run.details["quiet"].append({"other_cores": other, "waited": waited})
        if other is not None and waited >= limit:
            self.say(f"other processes still use {other:.2f} cores after {waited:.0f} s")

    async def baseline(self, run: Run) -> None:
        await self.quiet(run)
        a = self.args
        per_op = await asyncio.to_thread(baseline.per_op, self.root, a.secs, a.warmup)
        batched = await asyncio.to_thread(baseline.batched, self.root, a.catchup)
        run.figures.update(
            base_tps=per_op["tps"],
            base_p50=per_op["latency"]["p50_ms"] / 1e3,
            base_p99=per_op["latency"]["p99_ms"] / 1e3,
            base_batched_rate=batched["rows_s"],
            base_batched_n=batched["seconds"],
            base_restart=per_op["restart"]["seconds"],
        )
        run.details["baseline"] = {"per_op": per_op, "batched": batched}
        self.say(
            f"baseline: {per_op['tps']:.0f} rows/s one per tx (p50 "
            f"{per_op['latency']['p50_ms']:.2f} ms), {batched['rows_s']:.0f} rows/s in batches"
        )

    async def throughput(self, run: Run) -> None:
        a, windows = self.args, []
        for c in a.clients:
            await self.quiet(run)
            primary = await self.primary_name()
            r = await asyncio.to_thread(
                load.run_window,
                self.servers,
                self.users,
                c,
                a.workers,
                a.warmup,
                a.secs,
                self.watch,
            )
            windows.append(r)
            # With --target the nodes are not ours: they would count as "other" load.
            other = machine.others(r["cpu"]) if self.cluster is not None else None
            per_write = machine.cpu_per_write(r["cpu"], r["acked"], primary)
            r["cpu_per_write"] = per_write
            lat = r["latency"]
            run.figures.update(
                {
                    f"tps@{c}": r["tps"],
                    f"p50@{c}": lat["p50_ms"] / 1e3 if lat["n"] else None,
                    f"p99@{c}": lat["p99_ms"] / 1e3 if lat["n"] else None,
                    f"gen_cpu@{c}": max(r["worker_cpu"]),
                    f"other_cpu@{c}": other,
                    **{f"cpu_{k}@{c}": v for k, v in _cpu_figures(per_write).items()},
                }
            )
            who = f"{c:>3} client{'s' if c != 1 else ' '}"
            self.say(
                f"{who}: {r['tps']:.0f} tx/s, p50 {lat.get('p50_ms', 0):.1f} ms, "
                f"p99 {lat.get('p99_ms', 0):.1f} ms, busiest generator "
                f"{100 * max(r['worker_cpu']):.0f}% of a core, errors {r['errors'] or 0}; "
                f"CPU per ack {_us(per_write)}"
            )
        run.details["throughput"] = windows

    async def primary_name(self) -> str | None:
        """The watched name (``nodeN``) of the node that says it is primary, if any."""
        if self.cluster is None:
            return None
        for answer in await status_all(self.servers, 2.0):
            node = answer.get("node") if answer["up"] else None
            if isinstance(node, dict) and node.get("role") == "primary":
                return f"node{node.get('id')}"
        return None

    async def failover(self, run: Run) -> None:
        assert self.cluster is not None
        a = self.args
        partition = failover.Partition(a.etcd_host) if a.cuts else None
        f = await failover.measure(
            self.cluster, self.users, a.kills, a.freezes, a.stops, a.cuts, partition
        )
        run.figures.update(f["figures"])
        run.details["failover"] = f
        rounds = (
            ("kill", "failover", a.kills),
            ("freeze", "freeze", a.freezes),
            ("stop", "stop", a.stops),
            ("cut", "cut", a.cuts),
        )
        for word, key, count in rounds:
            if count > 0:
                self.say(
                    f"{word} of the primary -> first ack: median "
                    f"{f['figures'][f'{key}_median']:.3f} s, max "
                    f"{f['figures'][f'{key}_max']:.3f} s over {count} {word}s"
                )

    async def catchup(self, run: Run) -> None:
        assert self.cluster is not None
        n, workers = self.args.catchup, self.args.workers
        c = await catchup.measure(self.cluster, self.users, n, CATCHUP_CLIENTS, workers, False)
        run.figures.update(
            catchup_rate=c.get("rate"),
            catchup_records_rate=c.get("records_rate"),
            catchup_time=c.get("catchup"),
            catchup_in_sync=c["in_sync"],
        )
        run.details["catchup"] = c
        self.say(f"log catch-up of {n} sends ({c['records']} records): {_catchup_text(c)}")

    async def snapshot(self, run: Run) -> None:
        """On a fresh cluster whose log keeps few records, so that the snapshot's size
        depends on this run only, not on everything the earlier runs sent."""
        n = self.args.catchup
        retention = max(10, n // 100)
        folder = Path(tempfile.mkdtemp(prefix="snapshot-cluster-", dir=self.root))
        side = Cluster(folder, settings={**UNLIMITED, "log_retention": retention}, tag="bench")
        try:
            side.start(wait=False)
            await asyncio.to_thread(side.wait_in_sync, IN_SYNC_TIMEOUT)
            users = await load.register_users(side.servers, self.args.users, self.prefix)
            c = await catchup.measure(side, users, n, CATCHUP_CLIENTS, self.args.workers, True)
        finally:
            side.kill_all()
            shutil.rmtree(folder, ignore_errors=True)
        run.figures.update(
            snap_rate=c.get("rate"),
            snap_time=c.get("catchup"),
            snap_in_sync=c["in_sync"],
            snapshot_send=c.get("snapshot_send"),
            snapshot_install=c.get("snapshot_install"),
        )
        run.details["snapshot"] = {**c, "log_retention": retention}
        self.say(f"snapshot catch-up of {n} sends: {_catchup_text(c)}")

    async def large_state(self, runs: list[Run]) -> dict[str, Any]:
        """Load ``--big`` messages once; then, once per run, restart the whole cluster."""
        assert self.cluster is not None
        n, cluster, limit = self.args.big, self.cluster, self.args.big_secs or None
        self.say(f"loading {n} messages with {BIG_CLIENTS} clients")
        filled = await bigstate.fill(cluster, self.users, n, BIG_CLIENTS, self.args.workers, limit)
        base_path = self.root / "baseline-big.db"
        held = filled["messages"]
        base = await asyncio.to_thread(baseline.batched, self.root, held, 1000, base_path)
        nodes = filled["nodes"].values()
        self.say(
            f"loaded at {filled['load']['rate']:.0f} msg/s, {held} messages held; RSS per node "
            + ", ".join(_mib(node["rss"]) for node in nodes)
        )
        runs[0].figures.update(
            big_messages=held,
            big_load_rate=filled["load"]["rate"],
            rss_after_load=_max(node["rss"] for node in nodes),
            disk_per_node=_max(node["disk"] for node in nodes),
        )
        restarts = []
        for run in runs:
            r = await bigstate.restart(cluster, self.users)
            first = await asyncio.to_thread(baseline.first_write, base_path)
            restarts.append({"cluster": r, "baseline_first_write": first})
            run.figures.update(
                restart_first_write=r["first_write"],
                restart_elected=r["elected"],
                rss_after_restart=_max(node["rss"] for node in r["nodes"].values()),
                base_big_rss=base["peak_rss_kb"] * 1024,
                base_big_disk=base["bytes"],
                base_first_write=first["seconds"],
            )
            self.say(
                f"restart holding {held} messages: first ack after {r['first_write']:.2f} s "
                f"(plain SQLite: first commit after {first['seconds']:.2f} s)"
            )
        return {
            "requested": n,
            "messages": held,
            "fill": filled,
            "baseline": base,
            "restarts": restarts,
        }


def _catchup_text(c: dict[str, Any]) -> str:
    text = f"back in the sync set {c['in_sync']:.2f} s after its restart"
    if "rate" in c:
        text += f"; catch-up {c['catchup']:.3f} s = {c['rate']:.0f} msg/s"
    if "snapshot_send" in c:
        text += f"; snapshot {'used' if c['snapshot_used'] else 'NOT used'}"
    return text


def _cpu_figures(per_write: dict[str, float | None]) -> dict[str, float | None]:
    """``machine.cpu_per_write``'s parts under their figure names (``cpu_write@c``...)."""
    return {
        "write": per_write["all"],
        "primary": per_write["primary"],
        "backup": per_write["backup"],
        "gen": per_write["generator"],
    }


def _us(per_write: dict[str, float | None]) -> str:
    parts = [(k, v) for k, v in per_write.items() if v is not None]
    return ", ".join(f"{k} {v * 1e6:.0f} us" for k, v in parts) or "n/a"


def _max(values: Any) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f} MiB"


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    say = Progress()
    root = Path(tempfile.mkdtemp(prefix="chat-bench-", dir=args.dir))
    bench = Bench(args, root, say)
    failed = True
    try:
        environment = machine.environment(root)
        await bench.setup()
        runs = []
        for k in range(args.runs):
            say(f"run {k + 1} of {args.runs}")
            runs.append(await bench.run_once())
        big = await bench.large_state(runs) if bench.cluster and "big" in args.only else None
        failed = False
    except (KeyboardInterrupt, asyncio.CancelledError):
        failed = False  # interrupted: nothing to diagnose
        raise
    finally:
        # Every process we started: the load workers, then the nodes (by their PIDs).
        load.stop_workers()
        if bench.cluster is not None:
            bench.cluster.kill_all()
        if bench.etcd is not None and bench.etcd.pid is not None:
            bench.etcd.kill()
        if args.cuts:
            with contextlib.suppress(netcut.NetcutError):
                failover.Partition.heal_all()
        if (failed and bench.cluster is not None) or args.keep:
            say(f"kept {root} (node logs and databases)")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return {
        "environment": environment,
        "servers": bench.servers,
        "users": bench.prefix,
        "runs": [{"figures": r.figures, "details": r.details} for r in runs],
        "big": big,
    }


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C: no node outlives the benchmark


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = asyncio.run(main_async(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError, OSError, ChatError) as exc:
        # The node logs in the kept folder (printed above) say what the cluster did.
        print(f"benchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    figures = report.catalogue(args.clients)
    summary = report.summarise(figures, result["runs"])
    print(report.table(figures, summary, report.header(args, result["environment"])))
    settings = {k: sorted(v) if isinstance(v, set) else v for k, v in vars(args).items()}
    settings.update(json=str(args.json), dir=str(args.dir) if args.dir else None)
    payload = {**result, "settings": settings, "summary": summary}
    report.write_json(args.json, {**payload, "seconds": time.time() - started})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
