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
request ids, sync set) as of the position it is tagged with. Before the copy
begins the tool asks the nodes for the primary's watermark (what it had
acknowledged), and it keeps the copy only if its position reaches it: a copy
from a node that is behind (out of the sync set: cut off, its disk full, or
catching up after its data was lost) would lack acknowledged writes, and the
backup taken every night from the same node would silently be no backup at
all. So a backup comes from the primary or a member of its sync set; with
``--allow-behind`` the tool keeps any copy (when no primary answers, say) and
its manifest says ``"complete": false``. ``FILE`` is a plain SQLite database
(mode 0600: it holds password and token hashes); ``FILE.json`` beside it says
where it comes from: ``position`` [epoch, seq], ``node``, ``database`` (the
source's database id), ``bytes``, ``sha256``, ``taken_at``, ``acknowledged``
(the primary's watermark when the backup began, as [the epoch of its newest
record, watermark]; null if none answered), ``complete`` (the copy reaches it)
(``ops/manifest.py``). The tool checks the
file (``PRAGMA integrity_check``) before it puts it in place; an existing FILE
is never overwritten. Restore: ``python -m ops.restore`` (README, Operations).

Exit status: 0 done, 1 the node refused, the copy is damaged or behind the
primary (or no primary answered), 2 bad usage, 3 the node cannot be reached.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apsw

from service import config as config_module
from service.errors import ProtocolViolation
from service.status import NodeStatus, leading

from . import manifest
from .operator import OperatorLink, add_ca_option, ca_or_exit, status_if_answering, status_of

# How long a node has to answer the status asked before a backup.
STATUS_TIMEOUT = 5.0


class BackupFailed(Exception):
    """The node refused, or what arrived is not a whole, sound copy of every
    acknowledged write."""


@dataclass(frozen=True)
class Acknowledged:
    """What the primary had acknowledged when the backup began."""

    primary: int
    # (the epoch of the primary's newest record, its watermark). A copy whose
    # newest record is of that epoch or a later one, at or past the watermark,
    # follows the primary's history through it (a record's epoch and seq name
    # one record). Not the primary's own epoch: a primary just elected has no
    # record of its epoch yet, and its own copy would look behind.
    position: tuple[int, int]


def acknowledged(
    address: str,
    others: tuple[str, ...],
    secret: bytes,
    timeout: float,
    context: ssl.SSLContext | None,
) -> tuple[Acknowledged | None, NodeStatus]:
    """The leading primary's watermark among the node at ``address``, the nodes at
    ``others`` and the primaries they name, those that answer; and the status of
    the node at ``address`` (which must answer: OSError or ProtocolViolation). A
    primary in the highest epoch, as ``chatctl status`` finds it: one deposed but
    not yet told names an older epoch, and a copy is compared with the newest."""
    source = status_of(address, secret, timeout, context)
    answers = [source]
    asked = {address}
    queue = [*others, *([source.primary] if source.primary else [])]
    while queue:
        other = queue.pop(0)
        if other in asked:
            continue
        asked.add(other)
        status = status_if_answering(other, secret, timeout, context)
        if status is None:
            continue  # the others decide
        answers.append(status)
        if status.primary is not None:
            queue.append(status.primary)
    primary = leading(answers)
    if primary is None or primary.watermark is None:
        return None, source
    return Acknowledged(primary.node_id, (primary.position[0], primary.watermark)), source


def _behind(node: object, position: tuple[int, int], ack: Acknowledged) -> str:
    return (
        f"node {node}'s copy is at {list(position)}, behind what the primary (node "
        f"{ack.primary}) had acknowledged when the backup began ({list(ack.position)}): "
        "it lacks acknowledged writes. Take the backup from the primary or a member of its "
        "sync set, or give --allow-behind to keep a copy of this node as it is"
    )


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
    position = header["position"]
    if not (
        isinstance(position, list)
        and len(position) == 2
        and all(type(n) is int and n >= 0 for n in position)
    ):
        raise BackupFailed(f"the copy's position is {position!r}, not [epoch, seq]")
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
    others: tuple[str, ...] = (),
    allow_behind: bool = False,
) -> dict[str, Any]:
    """Stream a backup from the node at ``address`` into ``dest`` (and ``dest.json``),
    kept only if it reaches what the primary had acknowledged (found by asking
    ``address`` and ``others``), unless ``allow_behind``."""
    ack, source = acknowledged(address, others, secret, min(timeout, STATUS_TIMEOUT), context)
    if not allow_behind:
        if ack is None:
            raise BackupFailed(
                "no primary answered, so nothing shows that the copy would hold every "
                "acknowledged write; give --allow-behind to take it all the same"
            )
        if source.node_id != ack.primary:
            # Its position read again, after the watermark: a backup in the sync set
            # had not yet applied what the primary acknowledged meanwhile.
            source = status_of(address, secret, min(timeout, STATUS_TIMEOUT), context)
        if source.position < ack.position:
            raise BackupFailed(_behind(source.node_id, source.position, ack))  # before copying
    partial = dest.with_name(dest.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    received = hashlib.sha256()  # of the bytes the node sent, as they arrive
    try:
        with os.fdopen(fd, "wb") as out, OperatorLink(address, secret, timeout, context) as link:
            link.send({"type": "backup"})
            header = receive(link, out, received)
            out.flush()
            os.fsync(out.fileno())
        epoch, seq = header["position"]
        complete = ack is not None and (epoch, seq) >= ack.position
        if ack is not None and not complete and not allow_behind:
            raise BackupFailed(_behind(header["node"], (epoch, seq), ack))
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
        "acknowledged": None if ack is None else list(ack.position),
        "complete": complete,
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
    parser.add_argument(
        "--allow-behind",
        action="store_true",
        help="keep the copy even if it lacks writes the primary acknowledged, "
        "or no primary answers (the manifest says complete: false)",
    )
    args = parser.parse_args(argv)
    config = None
    if args.config is not None:
        config = config_module.load(args.config, {})
        address = next(p.address for p in config.nodes if p.node_id == config.node_id)
        others = tuple(p.address for p in config.nodes if p.node_id != config.node_id)
        secret_file = config.secret_file
    elif args.address and args.secret_file:
        address, secret_file, others = args.address, args.secret_file, ()
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
        tag = take(address, secret, dest, args.timeout, context, others, args.allow_behind)
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
