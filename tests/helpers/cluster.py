"""The local-cluster harness (``ops/cluster``) as the tests use it.

A test's clusters live in its ``tmp_path`` (``cluster-1``, ``cluster-2``, ...:
several may share one test) and hash passwords at the cheapest cost scrypt
allows, so that the suite's many registrations and logins stay quick; a test
of the cost sets ``scrypt_n`` itself. Nor do they limit how fast an account
sends or writes (``send_rate`` and ``write_rate`` 0), or how many accounts an
address registers (``register_rate`` 0): the workloads' few writers send hundreds
of messages a second each, all from one address, and a test of a limit sets it.
Everything else is ``ops.cluster``'s.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path

from ops.cluster import nodes
from ops.cluster.limits import UNLIMITED
from ops.cluster.nodes import NodeExited, NodeProcess

__all__ = ["REPO_ROOT", "Cluster", "NodeExited", "NodeProcess"]

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_SCRYPT_N = 2**10


class Cluster(nodes.Cluster):
    """``ops.cluster.nodes.Cluster`` in a fresh folder of ``tmp_path``, test settings first."""

    def __init__(
        self,
        tmp_path: Path,
        n: int = 3,
        *,
        metrics: bool = False,
        hosts: Sequence[str] | None = None,
        tls: ssl.SSLContext | None = None,
        node_settings: Mapping[int, Mapping[str, object]] | None = None,
        **settings: object,
    ) -> None:
        super().__init__(
            _fresh_dir(tmp_path, "cluster"),
            n,
            hosts=hosts,
            metrics=metrics,
            settings={"scrypt_n": TEST_SCRYPT_N, **UNLIMITED, **settings},
            tls=tls,
            node_settings=node_settings,
        )


def _fresh_dir(parent: Path, stem: str) -> Path:
    """``parent/stem-1``, ``-2``, ...: several clusters may share one test's tmp_path."""
    for k in range(1, 1000):
        path = parent / f"{stem}-{k}"
        try:
            path.mkdir(parents=True)
        except FileExistsError:
            continue
        return path
    raise RuntimeError(f"no free {stem} folder under {parent}")
