"""The rehearsal of several hosts (``ops/hosts/``, ``make run-hosts``) is configured as
SPEC section 10 describes it.

Each node config is loaded by the node's own loader, and supervisord's config by
supervisor's own parser, so the files cannot drift from what the node and
supervisord accept: one etcd member on 127.0.0.10:2379, the nodes on
127.0.0.11-13:7001, TLS on with the certificates of ``make certs-hosts``, the
arbiter in etcd over HTTPS with each node's own certificate, everything under
``var/hosts/``.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest
from supervisor.options import ServerOptions

from ops.hosts.certs import REHEARSAL
from service import config

ROOT = Path(__file__).resolve().parents[2]
HOSTS = ROOT / "ops" / "hosts"
VAR = ROOT / "var" / "hosts"


@pytest.mark.parametrize("node_id", [1, 2, 3])
def test_each_node_has_its_own_address_tls_and_the_etcd_arbiter(node_id: int) -> None:
    loaded = config.load(HOSTS / f"node{node_id}.conf", {})
    assert loaded.node_id == node_id
    assert [peer.address for peer in loaded.nodes] == [
        "127.0.0.11:7001",
        "127.0.0.12:7001",
        "127.0.0.13:7001",
    ]
    assert loaded.me.host == REHEARSAL[f"node{node_id}"]  # the address of its certificate
    assert loaded.data_dir.resolve() == VAR / f"node{node_id}"
    assert loaded.secret_file.resolve() == VAR / "cluster.secret"
    tls = VAR / "tls"
    assert loaded.tls_cert is not None
    assert loaded.tls_key is not None
    assert (loaded.tls_cert.resolve(), loaded.tls_key.resolve()) == (
        tls / f"node{node_id}.pem",
        tls / f"node{node_id}.key",
    )
    assert loaded.tls_ca is not None
    assert loaded.tls_ca.resolve() == tls / "ca.pem"
    assert loaded.arbiter == "etcd"
    assert loaded.etcd_addresses == ((REHEARSAL["etcd"], 2379),)
    assert Path(loaded.etcd_ca).resolve() == tls / "ca.pem"
    assert Path(loaded.etcd_cert).resolve() == tls / f"node{node_id}.pem"
    assert Path(loaded.etcd_key).resolve() == tls / f"node{node_id}.key"
    assert loaded.metrics_address == f"127.0.0.1:911{node_id}"


def test_supervisord_runs_etcd_with_tls_first_then_the_three_nodes(tmp_path: Path) -> None:
    # supervisor's parser wants the log folders to exist: parse a copy of ops/hosts
    # in a tree of its own, as a fresh clone has no var/hosts yet.
    hosts = tmp_path / "ops" / "hosts"
    shutil.copytree(HOSTS, hosts)
    var = tmp_path / "var" / "hosts"
    (var / "log").mkdir(parents=True)
    options = ServerOptions()
    options.configfile = str(hosts / "supervisord.conf")
    options.process_config(do_usage=False)
    programs = {
        process.name: (group.priority, process)
        for group in options.process_group_configs
        for process in group.process_configs
    }
    assert set(programs) == {"etcd", "node1", "node2", "node3"}
    priority, etcd = programs["etcd"]
    assert priority < min(programs[f"node{n}"][0] for n in (1, 2, 3))
    argv = shlex.split(etcd.command)
    assert argv[1:3] == ["-m", "ops.etcd"]
    assert Path(argv[3]).resolve() == var / "etcd"
    flags = dict(zip(argv[4::2], argv[5::2], strict=True))
    assert flags["--client"] == f"{REHEARSAL['etcd']}:2379"
    assert Path(flags["--cert-file"]).resolve() == var / "tls" / "etcd.pem"
    assert Path(flags["--key-file"]).resolve() == var / "tls" / "etcd.key"
    assert Path(flags["--trusted-ca-file"]).resolve() == var / "tls" / "ca.pem"
    for n in (1, 2, 3):
        _, node = programs[f"node{n}"]
        command = shlex.split(node.command)
        assert Path(command[-1]).resolve() == hosts / f"node{n}.conf"
        assert Path(node.stdout_logfile).resolve() == var / "log" / f"node{n}.log"
    assert Path(options.logfile).resolve() == var / "supervisord.log"
