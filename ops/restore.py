"""Make a backup the database of the first node of a new cluster: ``python -m ops.restore``.

    python -m ops.restore --from backups/chat.db --config ops/nodes/node1.conf
    python -m ops.restore --from backups/chat.db --data-dir var/node1 --node-id 1

Then start the cluster with the other nodes' data dirs empty: the restored
node starts alone as primary, at the backup's position, and the others catch
up from it by snapshot (README, Operations, "Backups").

The backup must be the file its manifest (``FILE.json``, written by
``ops.backup``) describes: it is copied and hashed in one pass, and a copy whose
size or SHA-256 differs is not installed (``ops/manifest.py``: SQLite's checks
cannot see a row changed on the backup's disk, and the restored node would hand
it to every other node). A file without a manifest is restored only with
``--unverified``, with SQLite's checks alone. A backup taken with
``--allow-behind`` (its manifest says ``"complete": false``) is restored with a
warning: it lacks writes that were acknowledged.

The data dir must hold no database (move an old one aside first); it is made
private (0700) if missing. With ``--config``, no other node of the cluster may be
running (one that accepts a connection at its address): a restore makes a new
cluster, and a node restored beside running ones would not lead anyway
(``election.py``), but give way to their data. The backup is copied, never changed in place. The
copy keeps every replicated table as it was and loses what described the
node it came from (``storage.prepare_restore``): it gets a new database id,
no votes, an empty log, and a sync set of this node alone. It is checked
(``PRAGMA integrity_check``), prepared beside the data dir's ``chat.db``
and renamed into place, so a failure leaves no database behind.

Exit status: 0 done, 1 the backup is unusable (damaged, not its manifest's file,
or without one), 2 bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
from pathlib import Path

from ops import manifest
from service import config as config_module
from service import identity
from service.config import NodeConfig
from service.datadir import make_private_dirs
from service.errors import ChatError
from service.storage import prepare_restore

DB_NAME = "chat.db"  # what a node opens in its data dir


def occupied(data_dir: Path) -> str | None:
    """Why ``data_dir`` cannot take a restored database, or None."""
    for name in (DB_NAME, f"{DB_NAME}-wal", identity.FILE_NAME):
        if (data_dir / name).exists():
            return f"{data_dir / name} exists"
    return None


def running_peers(config: NodeConfig, timeout: float = 1.0) -> list[str]:
    """The other nodes of ``config`` that accept a connection: they are running."""
    running = []
    for peer in config.nodes:
        if peer.node_id == config.node_id:
            continue
        host, port = config_module.parse_address(peer.address)
        try:
            with socket.create_connection((host.strip("[]"), port), timeout=timeout):
                running.append(f"node {peer.node_id} at {peer.address}")
        except OSError:
            continue
    return running


def restore(
    source: Path, data_dir: Path, node_id: int, expected: manifest.Manifest | None
) -> dict[str, object]:
    """Install ``source`` as ``data_dir``'s database; with ``expected``, only if it
    is the file that manifest describes (else ``manifest.Mismatch``)."""
    make_private_dirs(data_dir)
    staging = data_dir / f"{DB_NAME}.restoring"
    try:
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            sha256 = manifest.copy_checked(src, out, expected)
            out.flush()
            os.fsync(out.fileno())
        position, database_id = prepare_restore(staging, node_id)
        if expected is not None and (position.epoch, position.seq) != expected.position:
            raise manifest.Mismatch(
                f"the file holds position {[position.epoch, position.seq]}, "
                f"its manifest says {list(expected.position)}"
            )
        os.replace(staging, data_dir / DB_NAME)
    finally:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                Path(f"{staging}{suffix}").unlink()
    folder = os.open(data_dir, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return {
        "restored": str(data_dir / DB_NAME),
        "node": node_id,
        "position": [position.epoch, position.seq],
        "database": database_id,
        "sha256": sha256,
        "verified": expected is not None,
        "complete": None if expected is None else expected.complete,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ops.restore", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--from", dest="source", type=Path, required=True, help="a backup file")
    parser.add_argument("--config", type=Path, help="the config file of the node to restore")
    parser.add_argument("--data-dir", type=Path, help="its data dir (instead of --config)")
    parser.add_argument("--node-id", type=int, help="its node id (instead of --config)")
    parser.add_argument(
        "--unverified",
        action="store_true",
        help="restore a file that has no manifest (FILE.json), with SQLite's checks alone",
    )
    args = parser.parse_args(argv)
    config: NodeConfig | None = None
    if args.config is not None:
        config = config_module.load(args.config, {})
        data_dir, node_id = config.data_dir, config.node_id
    elif args.data_dir is not None and args.node_id is not None:
        data_dir, node_id = args.data_dir, args.node_id
    else:
        parser.error("give --config, or both --data-dir and --node-id")
    if node_id < 1:
        parser.error("node ids start at 1")
    if not args.source.is_file():
        parser.error(f"no backup file {args.source}")
    problem = occupied(data_dir)
    if problem is not None:
        parser.error(f"{problem}: restore into an empty data dir (move the old one aside)")
    running = running_peers(config) if config is not None else []
    if running:
        parser.error(
            f"{', '.join(running)} is running: a restore makes a new cluster; stop every "
            "node first and empty the other nodes' data dirs (to replace only this node's "
            "lost data, start it with an empty data dir instead: it catches up)"
        )
    try:
        expected = manifest.read(args.source)
        if expected is None and not args.unverified:
            print(
                f"not restored: {manifest.path_of(args.source).name} is missing, so nothing can "
                "tell whether the file is still the backup that was taken (SQLite's checks "
                "cannot see a changed row); put the manifest beside it, or give --unverified "
                "to restore it all the same",
                file=sys.stderr,
            )
            return 1
        result = restore(args.source, data_dir, node_id, expected)
    except (manifest.Mismatch, OSError) as exc:
        print(f"not restored: {exc}", file=sys.stderr)
        return 1
    except ChatError as exc:
        print(f"not restored: {exc.message}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    if result["complete"] is False:
        print(
            "WARNING: this backup was taken with --allow-behind from a node that lacked "
            "writes the primary had acknowledged; they are not in the restored database.",
            file=sys.stderr,
        )
    print(
        f"Start node {node_id} with the other nodes' data dirs empty: they catch up from it.",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
