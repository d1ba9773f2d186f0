"""``python -m service``: run one node.

    python -m service --config ops/nodes/node1.conf
    python -m service --node-id 1 --data-dir var/node1 \\
        --nodes 1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003 --secret-file var/cluster.secret
    python -m service --config FILE --set sync_timeout=2.0 --set synchronous=NORMAL

Flags override the file. Logs go to stderr, one ``event key=value ...`` line each.

Every file the node creates is private to its user (umask 077; see ``datadir``),
and it starts only on a data dir that is.

A stop asked for while the node starts ends it with status 0, as one asked for
later does. SIGTERM's default action would kill it (status -15, which a supervisor
or a harness takes for a crash): during the imports (0.4 s), or when a stop that
arrived while the database was being opened and checked is let through. So the
first thing ``main`` does is handle it, and only then imports the service; the
event loop's own handlers take over once it runs (``Node.run``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType


def parse_args(argv: list[str]) -> tuple[Path | None, dict[str, str]]:
    parser = argparse.ArgumentParser(prog="python -m service", description="Run one chat node.")
    parser.add_argument("--config", type=Path, help="INI file with a [node] section")
    parser.add_argument("--node-id")
    parser.add_argument("--data-dir")
    parser.add_argument("--nodes", help="1=HOST:PORT,2=HOST:PORT,...")
    parser.add_argument("--secret-file")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other setting of the [node] section",
    )
    args = parser.parse_args(argv)
    overrides = {
        "node_id": args.node_id,
        "data_dir": args.data_dir,
        "nodes": args.nodes,
        "secret_file": args.secret_file,
    }
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set needs KEY=VALUE, got {item!r}")
        overrides[key.strip()] = value.strip()
    return args.config, {k: v for k, v in overrides.items() if v is not None}


def _stop_while_starting(signum: int, frame: FrameType | None) -> None:
    # Nothing runs yet that a stop must wait for: the database, if open, is as a
    # crash would leave it, which it is made to survive. An exit at once, not a
    # SystemExit: raised between two bytecodes, that can land where it is ignored
    # (a weakref callback of the import system), and the node would run on.
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now))
    os.write(2, f"{stamp}.{int(now % 1 * 1000):03d} INFO stopped while starting\n".encode())
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _stop_while_starting)
    # Imported only now, so that a stop during the imports is one too (module docstring).
    import uvloop

    from . import config as config_module
    from . import datadir, tls
    from .errors import ChatError
    from .node import Node, remove_copies_in_transit

    # First: whatever this process creates (the database, its WAL, snapshots,
    # rollback files, the secret) is 0600, folders 0700.
    os.umask(datadir.PRIVATE_UMASK)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s.%(msecs)03d %(levelname)s %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )
    path, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = config_module.load(path, overrides)
    except ChatError as exc:
        print(f"bad configuration: {exc.message}", file=sys.stderr)
        return 2
    try:
        # Loaded and checked once, here: the server and the peer links reuse it.
        tls.node_tls(config)
        tls.check_etcd_files(config)
    except ChatError as exc:
        print(f"bad TLS configuration: {exc.message}", file=sys.stderr)
        return 2
    if "CHAT_DISK_FAULTS" in os.environ:
        # Fault injection for tests and ops/chaos only: without the variable
        # nothing of it is imported (service/diskfaults.py).
        from . import diskfaults

        diskfaults.install_from_environment()
    if not datadir.wait_until_private(config.data_dir):
        return 0
    # Held until the process exits: nothing below may touch a data dir another
    # node process is using.
    if not datadir.wait_until_locked(config.data_dir):
        return 0
    remove_copies_in_transit(config)
    # uvloop: the same asyncio API over libuv, with a cheaper loop iteration and
    # socket path; the node's hot path is many small reads and writes.
    # A read-only file system or an unopenable database: one log line per new
    # reason and a backoff, never an exit a second under supervisord.
    node = datadir.retry_until_open(lambda: Node(config), f"the database {config.db_path}")
    if node is None:
        return 0
    uvloop.run(node.run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
