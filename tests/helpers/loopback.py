"""Loopback addresses and an nft table that belong to this run of the tests alone.

Tests that cut traffic (``ops/netcut.py``: nft rules on ``lo``) put nodes and etcd
on loopback addresses of their own and cut pairs of them. Every process on the
machine shares one network namespace: two runs of the suite at once (a
developer's ``make test`` beside CI's), or a run beside ``make chaos`` or the
rehearsal of hosts (127.0.0.10-13), would otherwise share the addresses and the
table. Then one run's ``netcut.clear`` at the start of its scenario removes the
other's cuts in the middle of its scenario (a node cut off from everything reached
etcd and its primary again 0.8 s later, and the test waiting for it to be dropped
failed), and one run's cut stalls the other's nodes.

So each run claims a block of its own, ``127.N.0.0/24`` with N from 1 to 254
(never 127.0.0.x, where the clients, the rehearsal and the chaos tool live), by
holding an exclusive ``flock`` on a lock file named after the block for as long as
the process lives; the kernel lets go of it when the process ends, however it
ends, so a crashed run frees its block. The run's nft table is named after the
block too, so ``netcut.heal`` and ``netcut.clear`` touch this run's cuts only.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import pytest

from ops import netcut

BLOCKS = range(1, 255)


@cache
def block() -> int:
    """The second octet of this run's block, claimed on first use and held until exit."""
    folder = Path(tempfile.gettempdir())
    for number in BLOCKS:
        fd = os.open(folder / f"chat-tests-loopback-{number}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # another run holds this block
            continue
        return number  # the descriptor stays open: the claim lasts as long as we do
    raise RuntimeError(f"every loopback block 127.N.0.0/24 is held by another run ({folder})")


def address(last: int) -> str:
    """This run's loopback address ending in ``last``: ``127.N.0.last``."""
    return f"127.{block()}.0.{last}"


def table() -> str:
    """This run's nft table (``netcut``'s ``table`` argument)."""
    return f"{netcut.TABLE}_{block()}"


def cut(source: str, dest: str, *, both: bool = False) -> None:
    """``netcut.cut`` in this run's table."""
    netcut.cut(source, dest, both=both, table=table())


def heal() -> None:
    """``netcut.heal`` of this run's table: its cuts go, the tracking stays."""
    netcut.heal(table())


def cuts() -> list[netcut.Cut]:
    """The cuts in this run's table."""
    return netcut.cuts(table())


@contextmanager
def cutting() -> Iterator[None]:
    """This run's table for one test: skipped, with the reason, where nft or root is
    missing; made tracking connections before the test's first one (a one-way cut
    needs to know who dialed); removed, every cut with it, when the test ends."""
    why = netcut.unavailable()
    if why is not None:
        pytest.skip(f"cannot cut loopback traffic here: {why}")
    netcut.clear(table())  # what a run that crashed with this block left behind
    netcut.track(table())
    try:
        yield
    finally:
        netcut.clear(table())
