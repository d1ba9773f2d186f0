"""Fixtures of the unit tests that need more than one module of them."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from service.diskfaults import DiskFaults

_names = itertools.count(1)


@pytest.fixture
def faults() -> Iterator[DiskFaults]:
    """A disk fault VFS (``service/diskfaults.py``) of its own name, plan ``off``; not
    the process's default: a Storage uses it when given its name."""
    vfs = DiskFaults(f"test-diskfaults-{next(_names)}")
    yield vfs
    vfs.close()
