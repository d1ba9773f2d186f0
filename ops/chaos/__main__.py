"""``python -m ops.chaos``: fault injection with a history checker (see ``ops/chaos/README.md``).

    python -m ops.chaos --duration 600 --seed 42
    python -m ops.chaos --duration 120 --seed 7 --keep          # keep the work folder
    python -m ops.chaos --duration 300 --seed 9 --supervisord supervisord.conf
    python -m ops.chaos --duration 120 --seed 5 --faults process,disk   # disk faults too
    python -m ops.chaos --duration 600 --arbiter etcd --faults all      # etcd, partitions (root)

Exit status: 0 every check passed; 1 a check found a violation; 2 bad usage;
3 the run could not take place (the cluster or the workload never started).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from ops import netcut

from . import schedule
from .run import Options, run


def parse_args(argv: list[str]) -> Options:
    defaults = Options(duration=0, seed=0)
    parser = argparse.ArgumentParser(
        prog="python -m ops.chaos",
        description="Run a concurrent workload against a 3-node cluster while injecting "
        "random faults, then check the history against every node.",
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of faults (60)")
    parser.add_argument("--seed", type=int, help="fixes the fault schedule (default: random)")
    parser.add_argument(
        "--workdir", type=Path, help="where the cluster and the run's files go (kept)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp work folder")
    parser.add_argument(
        "--supervisord",
        type=Path,
        metavar="CONF",
        help="target the running cluster of this supervisord.conf instead of starting one",
    )
    parser.add_argument("--writers", type=int, default=defaults.writers)
    parser.add_argument("--listeners", type=int, default=defaults.listeners)
    parser.add_argument(
        "--pace", type=float, default=defaults.pace, help="max pause between an actor's ops"
    )
    parser.add_argument(
        "--op-timeout", type=float, default=defaults.op_timeout, help="client deadline per op"
    )
    parser.add_argument(
        "--log-retention",
        type=int,
        default=defaults.log_retention,
        help="records a local node keeps in its log (small: snapshot catch-ups happen)",
    )
    parser.add_argument(
        "--converge-timeout",
        type=float,
        default=defaults.converge_timeout,
        help="how long the healed cluster may take to converge",
    )
    parser.add_argument(
        "--faults",
        default=defaults.faults,
        metavar="KINDS",
        help="comma-separated fault kinds or groups to draw from: process (the default), "
        "disk (disk-full, io-error, corrupt-backup), all, or single kinds",
    )
    parser.add_argument(
        "--arbiter",
        choices=("peers", "etcd"),
        default=defaults.arbiter,
        help="peers (the default: one host) or etcd: the nodes on addresses of their own "
        "(--hosts) with an etcd member (--etcd-host) as the arbiter; --faults all then "
        "adds partitions (root and nft needed) and etcd faults",
    )
    parser.add_argument(
        "--hosts",
        default=defaults.hosts,
        metavar="A,B,C",
        help=f"the nodes' loopback addresses with --arbiter etcd ({defaults.hosts})",
    )
    parser.add_argument(
        "--etcd-host",
        default=defaults.etcd_host,
        metavar="ADDRESS",
        help=f"the etcd member's loopback address with --arbiter etcd ({defaults.etcd_host})",
    )
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.writers < 1 or args.listeners < 0:
        parser.error("--duration and --writers must be positive, --listeners not negative")
    try:
        kinds = schedule.kinds_from_spec(args.faults, arbiter=args.arbiter == "etcd")
    except ValueError as exc:
        parser.error(f"--faults: {exc}")
    if args.supervisord is not None and set(kinds) & set(schedule.DISK_KINDS):
        parser.error("disk faults need a cluster of this tool's own (not --supervisord)")
    if args.supervisord is not None and args.arbiter != "peers":
        parser.error("--arbiter etcd starts a cluster of this tool's own (not --supervisord)")
    if set(kinds) & set(schedule.PARTITION_KINDS):
        why = netcut.unavailable()
        if why is not None:
            parser.error(
                f"partition faults cannot run here: {why}. Run as root with nft, or leave "
                "them out: --faults process,disk,etcd"
            )
    return Options(
        duration=args.duration,
        seed=args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31),
        workdir=args.workdir,
        keep=args.keep,
        supervisord=args.supervisord,
        writers=args.writers,
        listeners=args.listeners,
        pace=args.pace,
        op_timeout=args.op_timeout,
        log_retention=args.log_retention,
        converge_timeout=args.converge_timeout,
        faults=",".join(name.strip() for name in args.faults.split(",") if name.strip()),
        arbiter=args.arbiter,
        hosts=args.hosts,
        etcd_host=args.etcd_host,
    )


def main(argv: list[str] | None = None) -> int:
    options = parse_args(sys.argv[1:] if argv is None else argv)
    return run(options, lambda line: print(line, flush=True))


if __name__ == "__main__":
    sys.exit(main())
