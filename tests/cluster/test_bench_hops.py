"""``ops.bench.hops`` against a real cluster, recorded with perf.

Needs perf and root (kernel tracepoints): where they are missing the test says
why and skips (CI runs as root, and ``.ci/run`` installs perf). What it holds:
the recording of a one-client load yields writes whose milestones follow the
write path's order (the primary reads the request before it writes the record,
each backup reads the record before its fsync, which returns before its ack,
and the client reads the reply after the last of them): the parser keeps only
such cycles (a heartbeat taken for a milestone reads out of order and is left
out: ``tests/unit/test_bench_hops.py``), and most of a second's writes must be
among them. Durations are the benchmark's business, not a test's.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ops.bench import hops

pytestmark = pytest.mark.cluster


def test_one_client_writes_are_traced_hop_by_hop(tmp_path: Path) -> None:
    why = hops.unavailable()
    if why is not None:
        pytest.skip(f"cannot trace system calls here: {why}")
    rows = hops.trace_cluster(1.0, tmp_path)
    # About a thousand writes a second at one client; far fewer means the cycles
    # were not recognised, or read out of the write path's order.
    assert len(rows) >= 50, f"only {len(rows)} writes recognised in order in a second"
