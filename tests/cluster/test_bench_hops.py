"""``ops.bench.hops`` against a real cluster, recorded with perf.

Needs perf and root (kernel tracepoints): where they are missing the test says
why and skips (CI runs as root, and ``.ci/run`` installs perf). What it holds:
the recording of a one-client load yields writes whose milestones follow the
write path's order (the primary reads the request before it writes the record,
each backup reads the record before its fsync, which returns before its ack,
and the client reads the reply after the last of them). Durations are the
benchmark's business, not a test's.
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
    # were not recognised.
    assert len(rows) >= 50, f"only {len(rows)} writes recognised in a second"
    for row in rows:
        assert 0 < row["P recv"] < row["P send 1"] < row["P send 2"] < row["C recv"]
        assert row["P fsync in"] < row["P fsync out"] < row["C recv"]
        assert row["B1 recv"] <= row["B2 recv"]
        for rank in (1, 2):
            assert row["P send 1"] < row[f"B{rank} recv"] < row[f"B{rank} fsync in"]
            assert row[f"B{rank} fsync in"] < row[f"B{rank} fsync out"] < row[f"B{rank} ack"]
            assert row[f"B{rank} ack"] < row["P reply"] < row["C recv"]
