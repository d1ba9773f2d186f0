"""Small real disks for nodes: a tmpfs of a given size mounted on a data dir.

The fault VFS (``service/diskfaults.py``) fails SQLite's writes on demand, but
a node also asks the file system how much room it has (before copying its
database for a snapshot or a backup) and writes files of its own: only a file
system that really fills tests those. A tmpfs is one, of any size, resized in
place (``mount -o remount,size=``) as an operator frees or adds space.

Mounting needs root (CAP_SYS_ADMIN), as the partition tests' packet filter
does: CI runs as root; elsewhere the tests that use this skip, saying why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

MIB = 1024 * 1024


def unavailable() -> str | None:
    """Why small disks cannot be mounted here, or None when they can."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root (CAP_SYS_ADMIN)"
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "mount and umount are not installed"
    return None


class SmallDisk:
    """A tmpfs on ``folder`` (created if missing, mode 0700 like a data dir)."""

    def __init__(self, folder: Path, size: int) -> None:
        self.folder = folder
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=700", "tmpfs", str(folder))

    @property
    def free(self) -> int:
        return shutil.disk_usage(self.folder).free

    @property
    def used(self) -> int:
        return shutil.disk_usage(self.folder).used

    def resize(self, size: int) -> None:
        """Make the disk ``size`` bytes in all, whatever it holds (never below that)."""
        _run("mount", "-o", f"remount,size={size}", str(self.folder))

    def leave_free(self, free: int) -> None:
        """Resize so that ``free`` bytes (about: tmpfs counts in pages) are left."""
        self.resize(self.used + free)

    def wipe(self) -> None:
        """Remove everything on it (a node's data dir lost), keeping the mount."""
        for path in self.folder.iterdir():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()

    def unmount(self) -> None:
        # Lazy: a node still running keeps its files open until it is killed.
        subprocess.run(["umount", "-l", str(self.folder)], capture_output=True, check=False)


def _run(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip() or done.returncode}")
