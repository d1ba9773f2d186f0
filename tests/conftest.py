"""Fixtures for tests that run real node processes.

``cluster_factory`` builds ``Cluster`` objects in the test's ``tmp_path`` and,
whatever happens, kills every node process at teardown, so a failed test
never leaves a node holding a port. When a test fails while its nodes are
still up, the tail of every node log is attached to the failure report (a
"node logs" section), because the log is where a cluster failure is
explained. Any test using these fixtures gets the ``cluster`` marker, so
``pytest -m 'not cluster'`` is the quick loop.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path

import pytest

from ops.etcd import Etcd
from tests.helpers import disks, loopback
from tests.helpers.cluster import Cluster
from tests.helpers.disks import SmallDisk
from tests.helpers.etcd import running_etcd

ClusterFactory = Callable[..., Cluster]
_CLUSTERS = pytest.StashKey[list[Cluster]]()
LOG_TAIL_LINES = 60


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "cluster_factory" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and report.when in ("setup", "call"):
        for cluster in item.stash.get(_CLUSTERS, []):
            for node in cluster.nodes.values():
                if not node.starts:
                    continue
                header = f"node {node.node_id} log ({node.state}): {node.log_path}"
                report.sections.append((header, node.log_tail(LOG_TAIL_LINES)))
    return report


@pytest.fixture
def cluster_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ClusterFactory]:
    """``cluster_factory(n=3, metrics=False, hosts=None, **settings)`` returns a new, not
    yet started, Cluster (``metrics``: each node serves Prometheus metrics; ``hosts``:
    each node's own address; ``tls`` and ``node_settings``: see ``Cluster``)."""
    clusters: list[Cluster] = []
    request.node.stash[_CLUSTERS] = clusters

    def make(
        n: int = 3,
        *,
        metrics: bool = False,
        hosts: Sequence[str] | None = None,
        tls: ssl.SSLContext | None = None,
        node_settings: dict[int, dict[str, object]] | None = None,
        **settings: object,
    ) -> Cluster:
        cluster = Cluster(
            tmp_path,
            n,
            metrics=metrics,
            hosts=hosts,
            tls=tls,
            node_settings=node_settings,
            **settings,
        )
        clusters.append(cluster)
        return cluster

    yield make
    for cluster in clusters:
        cluster.kill_all()


@pytest.fixture
def single_node(cluster_factory: ClusterFactory) -> Cluster:
    """A one-node cluster, started and primary."""
    cluster = cluster_factory(n=1)
    cluster.start()
    cluster.wait_for_primary()
    return cluster


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[Etcd]:
    """One etcd member (``ops/etcd.py``) on free loopback ports, healthy; stopped at
    teardown."""
    with running_etcd(tmp_path) as member:
        yield member


@pytest.fixture
def cuts() -> Iterator[None]:
    """nft cuts for the test, in this run's own table and on its own loopback addresses
    (``tests/helpers/loopback.py``: cut with ``loopback.cut``); every cut removed at the
    end. Skips, saying why, where nft or root is missing."""
    with loopback.cutting():
        yield


@pytest.fixture
def small_disks() -> Iterator[list[SmallDisk]]:
    """A list the test appends its ``SmallDisk``s (``tests/helpers/disks.py``) to; each
    is unmounted at the end. Skips, saying why, where tmpfs cannot be mounted."""
    why = disks.unavailable()
    if why is not None:
        pytest.skip(f"cannot mount small disks here: {why}")
    mounted: list[SmallDisk] = []
    try:
        yield mounted
    finally:
        for disk in mounted:
            disk.unmount()
