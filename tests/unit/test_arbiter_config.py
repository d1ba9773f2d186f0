"""The arbiter's settings (``service/config.py``): refused at start when unsafe."""

from __future__ import annotations

from pathlib import Path

import pytest

from service import config, errors
from service.replication.leased import LeaseTiming

NODES = "1=127.0.0.11:7001,2=127.0.0.12:7001,3=127.0.0.13:7001"


def load(tmp_path: Path, text: str) -> config.NodeConfig:
    path = tmp_path / "node.conf"
    path.write_text(f"[node]\nnode_id = 1\ndata_dir = d\nnodes = {NODES}\n{text}")
    return config.load(path, {})


def test_the_default_is_peer_voting_and_needs_no_etcd(tmp_path: Path) -> None:
    assert load(tmp_path, "").arbiter == "peers"


def test_etcd_mode_reads_its_settings(tmp_path: Path) -> None:
    loaded = load(
        tmp_path,
        "arbiter = etcd\netcd_endpoints = 127.0.0.10:2379, 127.0.0.20:2379\n"
        "etcd_prefix = /chat/prod\nlease_ttl = 4\n",
    )
    assert loaded.etcd_addresses == (("127.0.0.10", 2379), ("127.0.0.20", 2379))
    assert loaded.lease_timing.ttl == 4.0
    assert loaded.lease_timing.problems() == []


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("arbiter = zookeeper\n", "arbiter must be peers or etcd"),
        ("arbiter = etcd\n", "needs etcd_endpoints"),
        ("arbiter = etcd\netcd_endpoints = nowhere\n", "etcd_endpoints: not a HOST:PORT"),
        ("arbiter = etcd\netcd_endpoints = h:1\netcd_prefix = chat\n", "absolute key prefix"),
        ("arbiter = etcd\netcd_endpoints = h:1\nlease_ttl = 1\n", "below etcd's minimum"),
        (
            "arbiter = etcd\netcd_endpoints = h:1\nlease_ttl = 2\nlease_renew_interval = 1.5\n",
            "a primary would pass its deadline between two renewals",
        ),
    ],
)
def test_unsafe_or_malformed_arbiter_settings_are_refused(
    tmp_path: Path, text: str, error: str
) -> None:
    with pytest.raises(errors.InvalidInput, match=error):
        load(tmp_path, text)


def test_the_timing_rule_is_patronis() -> None:
    """renew_interval + 2 * request_timeout + margin must stay below ttl * (1 - drift),
    as Patroni refuses loop_wait + 2 * retry_timeout > ttl."""
    fits = LeaseTiming(ttl=3.0, drift=0.01, margin=0.3, renew_interval=0.5, request_timeout=0.5)
    assert fits.problems() == []
    tight = LeaseTiming(ttl=3.0, drift=0.01, margin=0.3, renew_interval=1.5, request_timeout=0.6)
    assert len(tight.problems()) == 1
