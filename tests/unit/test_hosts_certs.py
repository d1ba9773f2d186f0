"""``ops/hosts/certs.py``: the rehearsal's certificates verify with ``ssl`` as the nodes use them.

Each node's files go through ``service.tls.node_contexts``: an in-memory handshake
of the node's dialing context against its accepting one, each verifying the other
against the CA and the node's address, the checks its peers make."""

from __future__ import annotations

import contextlib
import ssl
import stat

import pytest

from ops.hosts import certs
from service import errors, tls


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("hosts") / "tls"
    written = certs.make_certs(path)
    assert {p.name for p in written} == {
        "ca.pem",
        "ca.key",
        *(f"{name}.{ext}" for name in certs.REHEARSAL for ext in ("pem", "key")),
    }
    return path


@pytest.mark.parametrize(("name", "address"), sorted(certs.REHEARSAL.items()))
def test_each_certificate_verifies_against_the_ca_for_its_address(folder, name, address):
    files = tls.TlsFiles(folder / f"{name}.pem", folder / f"{name}.key", folder / "ca.pem")
    assert tls.node_contexts(files, address) is not None


def test_a_certificate_is_good_for_its_own_address_only(folder):
    files = tls.TlsFiles(folder / "node1.pem", folder / "node1.key", folder / "ca.pem")
    with pytest.raises(errors.InvalidInput, match=r"not valid for '127\.0\.0\.12'"):
        tls.node_contexts(files, "127.0.0.12")


def test_a_client_with_the_ca_verifies_a_node(folder):
    client = ssl.create_default_context(cafile=folder / "ca.pem")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(folder / "node2.pem", folder / "node2.key")
    pipes = [ssl.MemoryBIO() for _ in range(4)]
    dialer = client.wrap_bio(pipes[0], pipes[1], server_hostname="127.0.0.12")
    acceptor = server.wrap_bio(pipes[2], pipes[3], server_side=True)
    for _ in range(5):
        for side in (dialer, acceptor):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        pipes[2].write(pipes[1].read())
        pipes[0].write(pipes[3].read())
    seen = dialer.getpeercert()
    assert seen is not None
    assert seen["subjectAltName"] == (("IP Address", "127.0.0.12"),)


def test_files_are_private_and_kept_unless_forced(folder):
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    before = (folder / "ca.pem").read_bytes()
    assert certs.make_certs(folder) == []
    assert (folder / "ca.pem").read_bytes() == before
    assert certs.main([str(folder), "--force"]) == 0
    assert (folder / "ca.pem").read_bytes() != before
    files = tls.TlsFiles(folder / "node3.pem", folder / "node3.key", folder / "ca.pem")
    assert tls.node_contexts(files, "127.0.0.13") is not None
