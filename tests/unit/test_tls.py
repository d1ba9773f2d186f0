"""``service/tls.py`` and the transport settings of ``service/config.py``, in process.

Certificates come from ``trustme``; the contexts are checked with real handshakes
(in memory, or through ``client.Connection`` against a refusing address)."""

from __future__ import annotations

import asyncio
import datetime
from pathlib import Path

import pytest
import trustme

from service import config, errors, tls
from service.client import Connection

NODES = "1=127.0.0.11:7001,2=127.0.0.12:7001,3=127.0.0.13:7001"


def write(
    folder: Path, ca: trustme.CA, host: str, not_before: datetime.datetime | None = None
) -> tls.TlsFiles:
    folder.mkdir(parents=True, exist_ok=True)
    leaf = ca.issue_cert(host, not_before=not_before)
    files = tls.TlsFiles(folder / "node.pem", folder / "node.key", folder / "ca.pem")
    files.cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(files.key))
    ca.cert_pem.write_to_path(str(files.ca))
    return files


def load(tmp_path: Path, text: str) -> config.NodeConfig:
    path = tmp_path / "node.conf"
    path.write_text(f"[node]\nnode_id = 1\ndata_dir = d\nnodes = {NODES}\n{text}")
    return config.load(path, {})


def test_tls_paths_are_relative_to_the_config_file(tmp_path):
    loaded = load(tmp_path, "tls_cert = tls/n.pem\ntls_key = tls/n.key\ntls_ca = tls/ca.pem\n")
    assert loaded.tls
    assert loaded.tls_cert == tmp_path / "tls/n.pem"
    assert loaded.tls_ca == tmp_path / "tls/ca.pem"


def test_tls_settings_go_together(tmp_path):
    with pytest.raises(errors.InvalidInput, match="go together"):
        load(tmp_path, "tls_cert = n.pem\ntls_ca = ca.pem\n")


def test_plain_tcp_is_allowed_on_loopback_only(tmp_path):
    assert not load(tmp_path, "").tls
    path = tmp_path / "remote.conf"
    path.write_text("[node]\nnode_id = 1\ndata_dir = d\nnodes = 1=10.1.2.3:7001,2=[::1]:7002\n")
    with pytest.raises(errors.InvalidInput, match=r"10\.1\.2\.3:7001 are not loopback"):
        config.load(path, {})


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.13", True),
        ("[::1]", True),
        ("localhost", True),
        ("10.0.0.1", False),
        ("::2", False),
        ("db.example", False),
    ],
)
def test_is_loopback(host, loopback):
    assert config.is_loopback(host) is loopback


def test_node_tls_accepts_a_certificate_of_its_ca_naming_its_address(tmp_path):
    files = write(tmp_path, trustme.CA(), "127.0.0.11")
    loaded = load(
        tmp_path, f"tls_cert = {files.cert}\ntls_key = {files.key}\ntls_ca = {files.ca}\n"
    )
    contexts = tls.node_tls(loaded)
    assert contexts is not None
    assert tls.node_tls(loaded) is contexts  # the server and the links share one load


@pytest.mark.parametrize(
    ("host", "not_before", "reason"),
    [
        ("127.0.0.12", None, "IP address mismatch, certificate is not valid for '127.0.0.11'"),
        (
            "127.0.0.11",
            datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=30),
            "certificate is not yet valid",
        ),
    ],
)
def test_node_tls_refuses_what_its_peers_would_refuse(tmp_path, host, not_before, reason):
    files = write(tmp_path, trustme.CA(), host, not_before)
    with pytest.raises(errors.InvalidInput, match="would be refused by the other nodes") as caught:
        tls.node_contexts(files, "127.0.0.11")
    assert reason in caught.value.message


def test_an_encrypted_key_is_refused_without_asking_for_a_passphrase(tmp_path):
    files = write(tmp_path, trustme.CA(), "127.0.0.11")
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(files.key.read_bytes(), None)
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pass"),
        )
    )
    with pytest.raises(errors.InvalidInput, match="the key is encrypted"):
        tls.server_context(files)


def test_a_ca_file_without_a_certificate_is_named(tmp_path):
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    with pytest.raises(errors.InvalidInput, match=r"^--ca .*ca\.pem: no PEM certificate in it$"):
        tls.client_context(tmp_path / "ca.pem", "--ca")


def test_the_client_refuses_plain_tcp_to_a_remote_address():
    """Refused before any socket is made: 192.0.2.1 is never dialed."""
    with pytest.raises(errors.InvalidInput, match="not a loopback address"):
        asyncio.run(Connection.open("192.0.2.1:7001", 1.0))


def test_certificate_names_have_one_spelling():
    cert = {"subjectAltName": (("IP Address", "0:0:0:0:0:0:0:1\n"), ("DNS", "Node1.Example"))}
    assert tls.certificate_names(cert) == {"::1", "node1.example"}


ETCD = "arbiter = etcd\netcd_endpoints = 127.0.0.10:2379\n"


def test_etcd_tls_files_are_checked_before_the_node_starts(tmp_path):
    files = write(tmp_path / "tls", trustme.CA(), "127.0.0.10")
    good = f"etcd_ca = {files.ca}\netcd_cert = {files.cert}\netcd_key = {files.key}\n"
    tls.check_etcd_files(load(tmp_path, ETCD + good))
    with pytest.raises(errors.InvalidInput, match=r"etcd_ca .*missing\.pem: no such file"):
        tls.check_etcd_files(load(tmp_path, ETCD + f"etcd_ca = {tmp_path / 'missing.pem'}\n"))
    other = write(tmp_path / "other", trustme.CA(), "127.0.0.10")
    mismatched = f"etcd_ca = {files.ca}\netcd_cert = {files.cert}\netcd_key = {other.key}\n"
    with pytest.raises(errors.InvalidInput, match=r"etcd_cert .* not a usable certificate"):
        tls.check_etcd_files(load(tmp_path, ETCD + mismatched))


def test_etcd_cert_and_key_go_together_and_need_a_ca(tmp_path):
    with pytest.raises(errors.InvalidInput, match="etcd_cert and etcd_key go together"):
        load(tmp_path, ETCD + "etcd_cert = c.pem\n")
