"""Take a consistent copy of a live node's database: ``python -m ops.backup``.

    python -m ops.backup --to backups/chat-2026-11-21.db --config ops/nodes/node2.conf
    python -m ops.backup --to FILE --address 127.0.0.1:7002 --secret-file var/cluster.secret

The node makes the copy with SQLite's online backup, one committed state of
its database, while it goes on serving, and streams it over the peer protocol
(``service/backup.py``); this tool connects as the operator (node 0) with the
cluster secret, like ``ops.promote``, so it needs no access to the node's files
and only someone who can read the secret can take a backup. On a TLS cluster the
copy travels over TLS, the node verified against the CA (``--ca FILE``, or the
config's ``tls_ca``).

What a backup holds: every replicated table (users, sessions, messages,
request ids, sync set) as of the position it is tagged with, so every write
acknowledged before the backup began when it comes from a member of the sync
set (the primary, or a confirmed backup). ``FILE`` is a plain SQLite database
(mode 0600: it holds password and token hashes); ``FILE.json`` beside it says
where it comes from: ``position`` [epoch, seq], ``node``, ``database`` (the
source's database id), ``bytes``, ``sha256``, ``taken_at``. The tool checks the
file (``PRAGMA integrity_check``) before it puts it in place; an existing FILE
is never overwritten. Restore: ``python -m ops.restore`` (README, Operations).

Exit status: 0 done, 1 the node refused or the copy is damaged, 2 bad usage,
3 the node cannot be reached.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import hashlib
import json
import os
import ssl
import sys
from pathlib import Path
from typing import Any

import apsw

from service import config as config_module
from service.errors import ProtocolViolation

from . import manifest
from .operator import OperatorLink, add_ca_option, ca_or_exit


class BackupFailed(Exception):
    """The node refused, or what arrived is not a whole, sound copy."""


def receive(link: OperatorLink, out: Any, digest: hashlib._Hash) -> dict[str, Any]:
    """Write the streamed copy to ``out`` and into ``digest``; return the first
    chunk's header."""
    header: dict[str, Any] | None = None
    written = 0
    while True:
        frame = link.receive()
        if frame.get("type") == "error":
            raise BackupFailed(f"the node refused: {frame.get('message')}")
        if frame.get("type") != "backup":
            raise BackupFailed(f"unexpected {frame.get('type')!r} frame")
        fields = {k: frame.get(k) for k in ("node", "database", "position", "bytes")}
        if header is None:
            header = fields
        elif fields != header:
            raise BackupFailed("chunks of two different copies")
        if frame.get("offset") != written:
            raise BackupFailed(f"chunk at {frame.get('offset')}, expected {written}")
        try:
            data = base64.b64decode(str(frame.get("data")), validate=True)
        except ValueError:
            raise BackupFailed("a chunk is not base64") from None
        out.write(data)
        digest.update(data)
        written += len(data)
        if frame.get("done") is True:
            break
    if written != header["bytes"]:
        raise BackupFailed(f"{written} bytes arrived of {header['bytes']}")
    return header


def check(path: Path) -> None:
    """SQLite's integrity check on the copy, read-only (nothing else has it open)."""
    uri = f"file:{path}?immutable=1"
    flags = apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI
    try:
        conn = apsw.Connection(uri, flags=flags)
        try:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
        finally:
            conn.close()
    except apsw.Error as exc:
        raise BackupFailed(f"the copy is not a database: {exc}") from None
    result = "\n".join(str(row[0]) for row in rows)
    if result != "ok":
        raise BackupFailed(f"the copy fails its integrity check: {result}")


def take(
    address: str,
    secret: bytes,
    dest: Path,
    timeout: float,
    context: ssl.SSLContext | None = None,
) -> dict[str, Any]:
    """Stream a backup from the node at ``address`` into ``dest`` (and ``dest.json``)."""
    partial = dest.with_name(dest.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    received = hashlib.sha256()  # of the bytes the node sent, as they arrive
    try:
        with os.fdopen(fd, "wb") as out, OperatorLink(address, secret, timeout, context) as link:
            link.send({"type": "backup"})
            header = receive(link, out, received)
            out.flush()
            os.fsync(out.fileno())
        check(partial)
        # Read back: the manifest vouches for the file only if the disk kept what
        # arrived (a restore checks the file against it).
        stored = manifest.sha256_of(partial)
        if stored != received.hexdigest():
            raise BackupFailed("the copy read back from the disk is not what the node sent")
        if dest.exists():  # appeared meanwhile: still never overwritten
            raise BackupFailed(f"{dest} exists")
        os.replace(partial, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        raise
    tag = {
        "file": dest.name,
        "position": header["position"],
        "node": header["node"],
        "database": header["database"],
        "bytes": header["bytes"],
        "sha256": stored,
        "taken_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "from": address,
    }
    manifest.write(dest, tag)
    return tag


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ops.backup", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--to", type=Path, required=True, help="the backup file to create")
    parser.add_argument("--config", type=Path, help="the config file of the node to copy")
    parser.add_argument("--address", help="HOST:PORT of the node (instead of --config)")
    parser.add_argument("--secret-file", type=Path, help="the cluster secret (instead of --config)")
    add_ca_option(parser)
    parser.add_argument("--timeout", type=float, default=30.0, help="socket timeout, seconds")
    args = parser.parse_args(argv)
    config = None
    if args.config is not None:
        config = config_module.load(args.config, {})
        address = next(p.address for p in config.nodes if p.node_id == config.node_id)
        secret_file = config.secret_file
    elif args.address and args.secret_file:
        address, secret_file = args.address, args.secret_file
    else:
        parser.error("give --config, or both --address and --secret-file")
    context = ca_or_exit(parser, args.ca, config)
    dest: Path = args.to
    if dest.exists() or manifest.path_of(dest).exists():
        parser.error(f"{dest} (or {dest.name}.json) exists: a backup never overwrites a file")
    if not dest.parent.is_dir():
        parser.error(f"no folder {dest.parent}")
    secret = secret_file.read_bytes().strip()
    try:
        tag = take(address, secret, dest, args.timeout, context)
    except (OSError, ProtocolViolation) as exc:
        print(f"could not take a backup from {address}: {exc}", file=sys.stderr)
        return 3
    except BackupFailed as exc:
        print(f"no backup made: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(tag, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
