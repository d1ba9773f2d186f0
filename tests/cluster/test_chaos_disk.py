"""The chaos tool's disk faults (``--faults disk``) reach the nodes, and the
cluster passes every check of the history checker through them.

Each disk fault must be carried out and seen by a node's SQLite (the node log's
``disk faults failing`` lines, the damaged page named in the fault log); then
the verdict: no acknowledged write lost, converged, identical checksums,
integrity ok, no traceback. A full disk, I/O errors and a corrupted page in a
stopped backup are all faults the nodes handle (README, Storage faults).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

# Seed 3 draws an io-error, a disk-full and a corrupt-backup in the first 25 s.
SEED = 3
DURATION = 25
DEADLINE = DURATION + 240


@pytest.mark.timeout(DEADLINE + 60)
def test_disk_faults_are_carried_out_against_the_nodes(tmp_path: Path) -> None:
    workdir = tmp_path / "chaos"
    command = [sys.executable, "-m", "ops.chaos", "--duration", str(DURATION)]
    command += ["--seed", str(SEED), "--workdir", str(workdir), "--faults", "disk"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE, check=False)
    print(done.stdout)
    print(done.stderr, file=sys.stderr)
    assert done.returncode in (0, 1), f"the chaos run did not take place (exit {done.returncode})"
    assert done.returncode == 0, f"the chaos run found violations:\n{done.stdout[-3000:]}"
    events = "\n".join(json.loads((workdir / "report.json").read_text())["events"])
    for action in ("I/O errors node", "disk full node", "disk space back", "corrupt node"):
        assert action in events, f"the nemesis never did {action!r}"
    assert re.search(r"corrupt node \d \(page \d+ of \d+ \((leaf|internal) of", events)

    hit = {
        int(match) for match in re.findall(r"\] #\d+ +(?:I/O errors|disk full) node (\d)", events)
    }
    logs = {n: (workdir / "cluster" / f"node{n}" / "node.log").read_text() for n in hit}
    quiet = [n for n, text in logs.items() if "disk faults failing" not in text]
    assert not quiet, f"nodes {quiet} were given disk faults but their SQLite never saw one"
