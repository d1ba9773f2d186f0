"""The chaos tool in the etcd arbiter mode: a minute of partitions and etcd faults.

Three nodes on loopback addresses of their own and an etcd member on a fourth
(``--arbiter etcd``, SPEC section 10's rehearsal of several hosts), a
concurrent workload, and a minute of faults drawn only from the arbiter
mode's kinds: a node cut from everything, the primary cut from its backups,
one-way cuts, a node cut from etcd, etcd frozen, killed or stopped and
restarted. Then the checker's verdict on every check, at most one node
acknowledging per epoch included, with etcd's leader key and sync set in
agreement with the converged cluster.

The cuts are nft rules (``ops/netcut.py``): root and nft are needed; CI runs
as root, elsewhere the test is skipped with the reason. The addresses are this
run's own (127.N.0.40-43, ``tests/helpers/loopback.py``), not the rehearsal's
(127.0.0.10-13) nor another run's, and the chaos tool names its nft table after
its etcd address: no other test's or run's cuts touch this cluster, nor this
run's theirs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ops import netcut
from tests.helpers import loopback

pytestmark = pytest.mark.cluster

# Seed 40 draws every arbiter fault kind in the first 60 s, among them the
# primary isolated for 7.7 s and cut from etcd for 4.4 s: past the 3 s lease.
SEED = 40
DURATION = 60
DEADLINE = DURATION + 240
HOSTS = ",".join(loopback.address(last) for last in (41, 42, 43))
ETCD_HOST = loopback.address(40)


@pytest.mark.timeout(DEADLINE + 60)
def test_partitions_and_etcd_faults_lose_no_acknowledged_write(tmp_path: Path) -> None:
    why = netcut.unavailable()
    if why is not None:
        pytest.skip(f"partition faults need nft as root: {why}")
    workdir = tmp_path / "chaos"
    command = [sys.executable, "-m", "ops.chaos", "--duration", str(DURATION)]
    command += ["--seed", str(SEED), "--workdir", str(workdir), "--arbiter", "etcd"]
    command += ["--faults", "partition,etcd", "--hosts", HOSTS, "--etcd-host", ETCD_HOST]
    done = subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE, check=False)
    print(done.stdout)
    print(done.stderr, file=sys.stderr)
    assert done.returncode in (0, 1), f"the chaos run did not take place (exit {done.returncode})"
    assert done.returncode == 0, f"the chaos run found violations:\n{done.stdout[-3000:]}"
    report = json.loads((workdir / "report.json").read_text())
    events = "\n".join(report["events"])
    for action in ("cut node", "heal cuts", "SIGSTOP etcd", "start etcd", "etcd healthy"):
        assert action in events, f"the nemesis never did {action!r}"
    checks = {check["name"]: check for check in report["checks"]}
    assert checks["at most one node acknowledging per epoch"]["checked"] >= 2

    # A cut from etcd must bite: the node it names no longer reaches etcd.
    cut_off = {int(n) for n in re.findall(r"\] #\d+ +cut node (\d) \(.*; <-> etcd ", events)}
    assert cut_off, "no node was cut from etcd"
    logs = {n: (workdir / "cluster" / f"node{n}" / "node.log").read_text() for n in cut_off}
    blind = [n for n, text in logs.items() if "arbiter unreachable" not in text]
    assert not blind, f"nodes {blind} were cut from etcd but never found it unreachable"
