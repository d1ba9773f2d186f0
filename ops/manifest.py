"""A backup's manifest, ``FILE.json``: what ``ops.backup`` took, checked by ``ops.restore``.

Why. SQLite's checks (``PRAGMA integrity_check``) prove that a file's pages are
well formed, not that its rows hold what was written: a bit flipped inside a row
by the disk a backup sits on (a bad sector, a bad copy) leaves a sound database
whose text has changed. Restored, that file would be the new cluster's only
history, copied by snapshot to every other node, and every checksum round would
then agree on it. So the manifest records the SHA-256 and size of the bytes the
node sent, and a restore copies the file and hashes the same bytes in one pass:
it installs only a file that is, byte for byte, the one the manifest describes.

Fields (all written by ``ops.backup``): ``file`` (the name it was taken as),
``position`` [epoch, seq], ``node``, ``database`` (the source's database id),
``bytes``, ``sha256``, ``taken_at``, ``from`` (the node's address),
``acknowledged`` (the primary's watermark when the backup began, as [the epoch
of its newest record, watermark], or null) and ``complete`` (the copy's
position reaches it: it holds every write acknowledged before the backup
began). Manifests written before the last two existed lack them.

Invariant: a manifest is written only after its file is in place and fsync'ed,
and never overwritten (nor is the file).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

SUFFIX = ".json"
_BLOCK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


class Mismatch(Exception):
    """The file is not the one its manifest describes, or the manifest is unreadable."""


@dataclass(frozen=True)
class Manifest:
    path: Path
    position: tuple[int, int]
    size: int
    sha256: str
    complete: bool | None  # None: a manifest from before ops.backup checked it


def path_of(backup: Path) -> Path:
    return backup.with_name(backup.name + SUFFIX)


def write(backup: Path, tag: dict[str, Any]) -> None:
    """``tag`` as ``backup``'s manifest (0600), durable with its folder's entry."""
    fd = os.open(path_of(backup), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(json.dumps(tag, indent=2) + "\n")
        out.flush()
        os.fsync(out.fileno())
    folder = os.open(backup.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def read(backup: Path) -> Manifest | None:
    """``backup``'s manifest, or None when there is none beside it."""
    path = path_of(backup)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise Mismatch(f"{path} cannot be read: {exc}") from None
    try:
        tag = json.loads(text)
        position = tag["position"]
        epoch, seq = position
        size, sha256 = tag["bytes"], tag["sha256"]
        complete = tag.get("complete")
    except (ValueError, TypeError, KeyError, AttributeError):
        raise Mismatch(f"{path} is not a backup's manifest") from None
    numbers = (epoch, seq, size)
    if not all(type(n) is int and n >= 0 for n in numbers) or not (
        isinstance(sha256, str)
        and _SHA256.fullmatch(sha256)
        and (complete is None or isinstance(complete, bool))
    ):
        raise Mismatch(f"{path} is not a backup's manifest")
    return Manifest(path, (epoch, seq), size, sha256, complete)


def sha256_of(path: Path) -> str:
    with path.open("rb") as source:
        return copy_checked(source, None, None)


def copy_checked(source: BinaryIO, out: BinaryIO | None, manifest: Manifest | None) -> str:
    """Copy ``source`` into ``out`` (None: only read it), hashing the bytes; with a
    manifest, raise ``Mismatch`` unless they are the bytes it describes. Returns the
    SHA-256."""
    digest = hashlib.sha256()
    size = 0
    for block in iter(lambda: source.read(_BLOCK), b""):
        digest.update(block)
        if out is not None:
            out.write(block)
        size += len(block)
    sha256 = digest.hexdigest()
    if manifest is not None and (size, sha256) != (manifest.size, manifest.sha256):
        raise Mismatch(
            f"the file is not the backup its manifest {manifest.path.name} describes "
            f"({size} bytes with SHA-256 {sha256[:16]}..., taken as {manifest.size} bytes "
            f"with {manifest.sha256[:16]}...): it changed since it was taken (a damaged "
            "disk or copy), or the manifest is another backup's"
        )
    return sha256
