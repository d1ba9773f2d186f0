"""One chaos run, top to bottom: schedule, cluster, workload, nemesis, heal, check, report.

    schedule (from the seed) ─► cluster up ─► workload ─► nemesis for --duration
        ─► heal (every node started and thawed) ─► workload stops, listeners drain
        ─► wait for convergence ─► read every node ─► checker ─► report, exit status

The seed alone fixes the fault schedule, which is printed before the run and
again, with what the nemesis actually did, after it: a failing run is
replayed with the same ``--seed`` and ``--duration``. Timing on a shared
machine is never exactly the same, so a replay reproduces the faults, not
every interleaving; the history (``history.jsonl``), the fault log and the
node logs in the work folder are what explain a failure.

The work folder (a temp folder unless ``--workdir`` is given) holds the
cluster of a local run and the run's files; it is removed after a clean run
unless ``--keep`` is given, and kept (and named) after a failing one.
"""

from __future__ import annotations

import json
import secrets
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ops.cluster.history import History
from service.errors import ChatError

from . import checker, nodes, schedule, snapshot
from .nemesis import Nemesis
from .workload import Plan, Workload

START_TIMEOUT = 60.0
# The rehearsal of several hosts (SPEC section 10): one address per node, one for etcd.
DEFAULT_HOSTS = ("127.0.0.11", "127.0.0.12", "127.0.0.13")
DEFAULT_ETCD_HOST = "127.0.0.10"
EXIT_OK, EXIT_VIOLATIONS, EXIT_BROKEN = 0, 1, 3


@dataclass(frozen=True)
class Options:
    duration: float
    seed: int
    workdir: Path | None = None
    keep: bool = False
    supervisord: Path | None = None
    writers: int = 4
    listeners: int = 2
    pace: float = 0.02
    op_timeout: float = 5.0
    log_retention: int = 200
    converge_timeout: float = 120.0
    faults: str = schedule.DEFAULT_FAULTS  # --faults: the kinds drawn (schedule.kinds_from_spec)
    # "etcd": the etcd arbiter mode on addresses of its own (nodes.ArbiterCluster).
    arbiter: str = "peers"
    hosts: str = ",".join(DEFAULT_HOSTS)
    etcd_host: str = DEFAULT_ETCD_HOST

    @property
    def kinds(self) -> tuple[str, ...]:
        return schedule.kinds_from_spec(self.faults, arbiter=self.arbiter == "etcd")

    def replay(self) -> str:
        """The command line that runs the same schedule and workload shape again."""
        command = f"python -m ops.chaos --duration {self.duration:g} --seed {self.seed}"
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name in _NOT_REPLAYED or value == item.default:
                continue
            command += f" --{item.name.replace('_', '-')} {value}"
        return command


_NOT_REPLAYED = frozenset({"duration", "seed", "workdir", "keep"})


def run(options: Options, out: Callable[[str], None] = print) -> int:
    """Run the whole thing; returns the exit status (0 clean, 1 violations, 3 broken)."""
    kinds = options.kinds
    faults = schedule.generate(options.seed, options.duration, kinds=kinds)
    root = options.workdir or Path(tempfile.mkdtemp(prefix="chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    # Names and bodies of this run; the random part keeps runs on one cluster apart.
    prefix = f"c{options.seed % 100000}x{secrets.token_hex(2)}"
    out(f"chaos: seed={options.seed} duration={options.duration:g}s prefix={prefix}")
    if options.arbiter == "etcd":
        out(f"chaos: etcd arbiter mode: nodes on {options.hosts}, etcd on {options.etcd_host}")
    out(f"chaos: fault kinds: {', '.join(kinds)}")
    out(f"chaos: replay with: {options.replay()}")
    out(f"chaos: work folder {root}")
    out(f"chaos: fault schedule ({len(faults)} faults):")
    for fault in faults:
        out(f"  {fault.describe()}")
    try:
        cluster = _cluster(options, root, kinds)
    except (OSError, ValueError, RuntimeError, ChatError) as exc:
        out(f"chaos: BROKEN: no cluster to run against: {exc}")
        return EXIT_BROKEN
    if isinstance(cluster, nodes.SupervisedCluster) and cluster.rate_limits():
        # Its few writers and its registrar all write from one address, faster than
        # the defaults let an account or an address: refusals past a client's
        # deadline are reported as findings, though they did nothing.
        out(
            "chaos: WARNING: the cluster limits rates "
            f"({', '.join(cluster.rate_limits())}); set them to 0 in its node configs, "
            "or the workload is refused busy past its deadline and the checker says so"
        )
    history = History()
    try:
        status, checks, nemesis = _drive(options, cluster, history, faults, prefix, out)
    finally:
        cluster.kill_all()
    history.dump(root / "history.jsonl")
    events = [str(event) for event in (nemesis.events if nemesis else [])]
    (root / "faults.log").write_text("\n".join(events) + "\n", encoding="utf-8")
    report = checker.format_report(checks) if checks else "no checks ran"
    (root / "report.txt").write_text(report + "\n", encoding="utf-8")
    _write_json(root / "report.json", options, faults, events, checks, status)
    out("")
    out(f"chaos: operations: {history.summary()}")
    out(f"chaos: faults carried out ({len(events)} actions):")
    for line in events:
        out(f"  {line}")
    out("")
    out(report)
    out("")
    verdict = {EXIT_OK: "PASS", EXIT_VIOLATIONS: "FAIL", EXIT_BROKEN: "BROKEN"}[status]
    out(f"chaos: {verdict} seed={options.seed} duration={options.duration:g}s")
    out(f"chaos: replay with: {options.replay()}")
    if status == EXIT_OK and options.workdir is None and not options.keep:
        shutil.rmtree(root, ignore_errors=True)
    else:
        out(f"chaos: history, fault log, report and node logs kept in {root}")
    return status


def _cluster(options: Options, root: Path, kinds: tuple[str, ...]) -> nodes.Nodes:
    if options.supervisord is not None:
        return nodes.SupervisedCluster(options.supervisord)
    # The workload's few writers write as fast as the cluster takes them: no send_rate,
    # no write_rate; its registrar registers fresh names all the run long, from one
    # address: no register_rate.
    settings = {
        "log_retention": str(options.log_retention),
        "send_rate": "0",
        "write_rate": "0",
        "register_rate": "0",
    }
    # Nodes run on the disk fault VFS only when a fault needs it.
    disk = bool({"disk-full", "io-error"} & set(kinds))
    if options.arbiter == "etcd":
        hosts = [host.strip() for host in options.hosts.split(",") if host.strip()]
        return nodes.ArbiterCluster(root / "cluster", settings, disk, hosts, options.etcd_host)
    return nodes.LocalCluster(root / "cluster", settings, disk_faults=disk)


def _drive(
    options: Options,
    cluster: nodes.Nodes,
    history: History,
    faults: list[schedule.Fault],
    prefix: str,
    out: Callable[[str], None],
) -> tuple[int, list[checker.Check], Nemesis | None]:
    if isinstance(cluster, nodes.LocalCluster):
        try:
            cluster.start_all()
        except OSError as exc:
            out(f"chaos: the cluster did not come up: {exc}")
            return EXIT_BROKEN, [], None
    try:
        nodes.wait_converged(cluster, START_TIMEOUT)
    except TimeoutError as exc:
        out(f"chaos: the cluster did not come up: {exc}")
        return EXIT_BROKEN, [], None
    plan = Plan(prefix, options.writers, options.listeners, options.pace, options.op_timeout)
    workload = Workload(cluster.servers, history, plan, options.seed)
    try:
        workload.start()
    except (RuntimeError, TimeoutError) as exc:
        out(f"chaos: the workload did not start: {exc}")
        return EXIT_BROKEN, [], None
    nemesis = Nemesis(cluster, faults, history.now, out)
    out(f"chaos: workload running ({len(workload.users)} users); faults begin")
    try:
        nemesis.run(options.duration)
    except KeyboardInterrupt:
        out("chaos: interrupted; healing and checking what ran")
    out(f"[{history.now():8.3f}] heal: every node started and thawed; the workload stops")
    cluster.heal()
    facts = checker.Facts(process_problems=workload.stop())
    out(f"[{history.now():8.3f}] waiting for the cluster to converge")
    data = _converged_data(cluster, facts, options.converge_timeout, prefix)
    statuses = cluster.close()
    facts.process_problems += cluster.unexpected_exits()
    facts.process_problems += [
        f"node {node_id} exited with status {code} on SIGTERM"
        for node_id, code in statuses.items()
        if code != 0
    ]
    checks = checker.check_all(history, data, facts)
    return (EXIT_OK if all(c.ok for c in checks) else EXIT_VIOLATIONS), checks, nemesis


def _converged_data(
    cluster: nodes.Nodes, facts: checker.Facts, timeout: float, prefix: str
) -> dict[int, snapshot.NodeData]:
    """Wait for convergence, then read every node; re-read if the position moved meanwhile."""
    for _ in range(3):
        try:
            _, facts.position = nodes.wait_converged(cluster, timeout)
        except TimeoutError as exc:
            facts.converge_error = str(exc)
        data = {
            node_id: snapshot.read_node(
                node_id,
                cluster.db_path(node_id),
                cluster.rollback_dir(node_id),
                cluster.log_text(node_id),
                prefix,
            )
            for node_id in cluster.node_ids
        }
        if facts.converge_error is not None:
            return data
        try:
            _, again = nodes.wait_converged(cluster, timeout)
        except TimeoutError as exc:
            facts.converge_error = f"after reading the databases: {exc}"
            return data
        if again == facts.position:
            return data
        # The cluster wrote while we read (a sync set change): read again.
    return data


def _write_json(
    path: Path,
    options: Options,
    faults: list[schedule.Fault],
    events: list[str],
    checks: list[checker.Check],
    status: int,
) -> None:
    document = {
        "seed": options.seed,
        "duration": options.duration,
        "replay": options.replay(),
        "status": status,
        "schedule": [asdict(fault) for fault in faults],
        "events": events,
        "checks": [
            {
                "name": c.name,
                "ok": c.ok,
                "checked": c.checked,
                "violations": c.violations,
                "note": c.note,
            }
            for c in checks
        ],
    }
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
