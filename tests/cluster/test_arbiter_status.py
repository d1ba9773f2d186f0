"""``chatctl status`` of a cluster whose arbiter is etcd (SPEC section 10, E5).

Real node processes with ``arbiter = etcd`` against a real etcd member (the
``etcd`` fixture), and real ``chatctl status`` runs: the text and the JSON name
the node holding the leader key, its lease, and the sync set as etcd holds it;
once etcd stops answering (frozen: it keeps its sockets and says nothing) every
node says "arbiter unreachable" and why, and says so no longer once etcd is back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ops.cluster.waiting import wait_for
from ops.etcd import Etcd

_SCRIPT = Path(sys.executable).with_name("chatctl")
CHATCTL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "service.cli"]
COMMAND_TIMEOUT = 60.0
PREFIX = "/chat/status-test"


def status(home: Path, servers: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    """``chatctl status`` with nothing of this environment's chatctl settings."""
    environment = {
        k: v for k, v in os.environ.items() if k not in ("CHAT_SERVERS", "CHAT_CA", "CHATCTL_HOME")
    }
    environment["CHATCTL_HOME"] = str(home)
    return subprocess.run(
        [*CHATCTL, "--servers", ",".join(servers), "status", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=environment,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


def arbiters(home: Path, servers: list[str]) -> list[dict[str, Any]]:
    """Every node's ``arbiter`` object from ``chatctl status --json`` (all must be up)."""
    done = status(home, servers, "--json")
    assert done.stdout, f"exit {done.returncode}: {done.stderr}"
    nodes = json.loads(done.stdout)["nodes"]
    assert all(node["up"] for node in nodes), nodes
    return [node["arbiter"] for node in nodes]


def test_status_shows_the_leader_key_and_the_stored_sync_set_then_etcd_unreachable(
    cluster_factory, etcd: Etcd, tmp_path: Path
) -> None:
    cluster = cluster_factory(arbiter="etcd", etcd_endpoints=etcd.client, etcd_prefix=PREFIX)
    cluster.start()
    primary = cluster.wait_whole_sync_set()
    servers = cluster.servers
    home = tmp_path / "chatctl"

    def leader_and_whole_set_in_etcd() -> list[dict[str, Any]] | None:
        views = arbiters(home, servers)
        wanted = all(
            view["reachable"]
            and view["leader"] == primary.node_id
            and view["sync_set"] is not None
            and view["sync_set"]["members"] == [1, 2, 3]
            for view in views
        )
        return views if wanted else None

    views = wait_for(
        leader_and_whole_set_in_etcd, 20, "every node reading the leader key and [1,2,3] in etcd"
    )
    epoch = cluster[primary.node_id].view()
    assert epoch is not None
    for view in views:
        assert view["mode"] == "etcd"
        assert view["leader_epoch"] == epoch.epoch
        assert 0 < view["leader_ttl"] <= 3
    assert "serving_for" in views[primary.node_id - 1]
    version = views[0]["sync_set"]["version"]
    text = status(home, servers)
    assert text.returncode == 0, text.stderr
    assert (
        f"arbiter: etcd, leader key: node {primary.node_id} (epoch {epoch.epoch}), lease "
    ) in text.stdout
    assert f"sync set in etcd: v{version} [1,2,3] (read by node {primary.node_id})" in text.stdout
    assert "unreachable" not in text.stdout

    etcd.freeze()
    try:
        wait_for(
            lambda: all(not view["reachable"] for view in arbiters(home, servers)),
            20,
            "every node reporting etcd unreachable",
        )
        text = status(home, servers)
        for node_id in (1, 2, 3):
            assert f"node {node_id}: arbiter unreachable: {etcd.client}: " in text.stdout
        assert "arbiter: etcd, leader key" not in text.stdout  # nobody reads etcd now
    finally:
        etcd.thaw()
    wait_for(
        lambda: all(view["reachable"] for view in arbiters(home, servers)),
        20,
        "every node reaching etcd again",
    )
    assert "unreachable" not in status(home, servers).stdout
