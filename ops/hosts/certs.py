"""Certificates for the rehearsal of several hosts on one machine (SPEC section 10).

    python -m ops.hosts.certs var/hosts/tls          (make certs-hosts)
    python -m ops.hosts.certs var/hosts/tls --force  (new ones, replacing the old)

Writes one cluster CA and, signed by it, a certificate and key for each node and
for the etcd member, each naming its loopback address (subjectAltName IP):

    ca.pem    ca.key                 the cluster CA (tls_ca of every node)
    node1.pem node1.key              127.0.0.11 (tls_cert, tls_key of node 1)
    node2.pem node2.key              127.0.0.12
    node3.pem node3.key              127.0.0.13
    etcd.pem  etcd.key               127.0.0.10, the etcd member of the rehearsal

Every certificate is good for both ends of a connection (serverAuth and
clientAuth): a node accepts and dials with the same one, and may present it to
etcd. Clients need only ``ca.pem`` (``chatctl --ca``). Keys are ECDSA P-256,
unencrypted (a node cannot type a passphrase). The folder is made 0700 and every
file 0600, written under a temporary name and renamed, so a half-written set is
never left under the final names.

A folder that already holds ``ca.pem`` is left as it is (nodes running with the
old certificates keep working); ``--force`` makes a new CA and new certificates.
These are for a rehearsal on one machine: the CA key lies beside the certificates.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from service.datadir import make_private_dirs

# Name of each certificate -> the loopback address it is for (SPEC section 10).
REHEARSAL = {
    "node1": "127.0.0.11",
    "node2": "127.0.0.12",
    "node3": "127.0.0.13",
    "etcd": "127.0.0.10",
}
CA_DAYS = 3650
LEAF_DAYS = 825
# A clock a little behind the machine that signed must still accept a new certificate.
BACKDATE = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class Issuer:
    """The CA: its key and certificate."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_ca(now: datetime.datetime) -> Issuer:
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chat cluster CA")])
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issuer(key, cert)


def issue(
    ca: Issuer, name: str, address: str, now: datetime.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A key and a certificate for ``address`` (an IP address), signed by ``ca``."""
    key = new_key()
    public = key.public_key()
    ca_key_id = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_key_id),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    return key, cert


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_private(path: Path, data: bytes) -> None:
    """``data`` into ``path``, mode 0600, by way of a temporary file and a rename."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an older file of that name kept its mode
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)


def make_certs(
    folder: Path, names: Mapping[str, str] = REHEARSAL, *, force: bool = False
) -> list[Path]:
    """Write the CA and a certificate for each of ``names`` (name -> IP address) into
    ``folder``; return the files written, none when ``ca.pem`` was already there
    (unless ``force``)."""
    if (folder / "ca.pem").exists() and not force:
        return []
    make_private_dirs(folder)
    os.chmod(folder, 0o700)
    now = datetime.datetime.now(datetime.UTC)
    ca = make_ca(now)
    files: dict[Path, bytes] = {
        folder / "ca.key": _pem_key(ca.key),
        folder / "ca.pem": _pem_cert(ca.cert),
    }
    for name, address in names.items():
        key, cert = issue(ca, name, address, now)
        files[folder / f"{name}.key"] = _pem_key(key)
        files[folder / f"{name}.pem"] = _pem_cert(cert)
    # ca.pem last: while it is missing, a rerun starts over.
    for path in sorted(files, key=lambda p: p.name == "ca.pem"):
        _write_private(path, files[path])
    return list(files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ops.hosts.certs", description=__doc__.split("\n")[0]
    )
    parser.add_argument("folder", type=Path, help="where to write the PEM files")
    parser.add_argument("--force", action="store_true", help="replace existing certificates")
    args = parser.parse_args(argv)
    written = make_certs(args.folder, force=args.force)
    if not written:
        print(f"{args.folder}/ca.pem exists: certificates kept (--force makes new ones)")
        return 0
    print(f"wrote {', '.join(p.name for p in written)} to {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
