"""TLS contexts for the node's port, its peer links and its clients (SPEC section 10).

A node configured with ``tls_cert``, ``tls_key`` and ``tls_ca`` (``NodeConfig``)
speaks TLS on its one port, to clients and peers alike:

* **clients** verify the node: its certificate must chain to the CA file they
  were given (``chatctl --ca``, ``CHAT_CA``) and name the address they dialed
  (an IP address in the subjectAltName, or a DNS name). Clients present no
  certificate: a user proves who they are with a password or a token, which
  now never crosses the network in clear.
* **nodes** authenticate each other with mutual TLS. The dialer verifies the
  acceptor as a client does and presents its own certificate; the acceptor asks
  every connection for a certificate (``CERT_OPTIONAL``: clients have none),
  verifies any offered against the cluster CA, and lets a ``peer`` hello through
  only on a connection that presented one naming that node's configured host
  (``peer_certificate_problem``). The cluster secret's HMAC handshake still runs
  inside: a link needs both the CA's signature and the secret.
* the **operator** tools (node id 0) verify the node like a client and prove
  themselves with the cluster secret, as over plain TCP.

A node refuses to start, with one sentence, when a file is missing or
unreadable, holds no usable PEM, when the key does not match the certificate,
or when its certificate does not verify against the CA as its peers will check
it: an in-memory handshake between its own two contexts (``node_tls``) catches
an expired or not-yet-valid certificate, a certificate from another CA and one
that does not name the node's address, with OpenSSL's own reason.

Without the three files the node speaks plain TCP, which ``NodeConfig.validate``
allows only on loopback addresses, and ``client.Connection`` likewise refuses to
dial a non-loopback address without a CA.

What is not seen: a TLS handshake that fails on the accepting side (a client or
peer whose certificate the node rejects) ends inside the event loop before the
server's handler runs, and uvloop reports it only in debug mode. The dialing
side sees it: a node's log names the peer it cannot verify, ``chatctl`` says the
certificate does not verify.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import NodeConfig
from .errors import InvalidInput

# OpenSSL's verify codes for "this certificate does not chain to a trusted CA".
_NOT_FROM_CA = frozenset({2, 18, 19, 20, 21})
# The longest a handshake may take when the two contexts of one process talk
# through memory: a few round trips, each a function call.
_SELF_TEST_ROUNDS = 10


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files of one node: its certificate (chain), its key, the cluster CA."""

    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True)
class NodeTls:
    """A node's two contexts: ``server`` for its port, ``dial`` for the links it dials."""

    server: ssl.SSLContext
    dial: ssl.SSLContext


class _Encrypted(Exception):
    """The key file asks for a passphrase: a node cannot type one."""


def _no_passphrase() -> str:
    raise _Encrypted


def files_of(config: NodeConfig) -> TlsFiles | None:
    if config.tls_cert is None or config.tls_key is None or config.tls_ca is None:
        return None
    return TlsFiles(config.tls_cert, config.tls_key, config.tls_ca)


def _read(setting: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InvalidInput(f"{setting} {path}: no such file") from None
    except IsADirectoryError:
        raise InvalidInput(f"{setting} {path}: is a folder, not a PEM file") from None
    except OSError as exc:
        why = (exc.strerror or str(exc)).lower()
        raise InvalidInput(f"{setting} {path}: cannot read it ({why})") from None


def _expect_pem(setting: str, path: Path, what: str, marker: bytes) -> None:
    """A file that is there and readable, with at least one PEM block of the kind."""
    if marker not in _read(setting, path):
        raise InvalidInput(f"{setting} {path}: no PEM {what} in it")


def _load_ca(context: ssl.SSLContext, setting: str, ca: Path) -> None:
    _expect_pem(setting, ca, "certificate", b"-----BEGIN CERTIFICATE-----")
    try:
        context.load_verify_locations(cafile=ca)
    except ssl.SSLError as exc:
        raise InvalidInput(
            f"{setting} {ca}: not a usable CA certificate ({_reason(exc)})"
        ) from None


def _load_identity(context: ssl.SSLContext, files: TlsFiles) -> None:
    _expect_pem("tls_cert", files.cert, "certificate", b"-----BEGIN CERTIFICATE-----")
    _expect_pem("tls_key", files.key, "private key", b"PRIVATE KEY-----")
    try:
        context.load_cert_chain(files.cert, files.key, password=_no_passphrase)
    except _Encrypted:
        raise InvalidInput(
            f"tls_key {files.key}: the key is encrypted; give the node an unencrypted key"
        ) from None
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise InvalidInput(
                f"tls_key {files.key} does not belong to the certificate in tls_cert {files.cert}"
            ) from None
        raise InvalidInput(
            f"tls_cert {files.cert} and tls_key {files.key}: not a usable certificate and "
            f"key ({_reason(exc)})"
        ) from None


def client_context(ca: Path, setting: str = "CA file") -> ssl.SSLContext:
    """For a client of the service: verify the node against ``ca`` and its address.

    Raises ``InvalidInput`` naming ``setting`` (how the user gave the file) when the
    file cannot be read or holds no CA certificate."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_ca(context, setting, ca)
    return context


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """For the node's port: present the node's certificate; verify any offered one."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_ca(context, "tls_ca", files.ca)
    _load_identity(context, files)
    # Clients offer no certificate; peers must (checked at their hello). A certificate
    # offered that does not verify against the CA fails the handshake itself.
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


def dial_context(files: TlsFiles) -> ssl.SSLContext:
    """For a link this node dials: verify the peer as a client does, and present our own."""
    context = client_context(files.ca, "tls_ca")
    _load_identity(context, files)
    return context


def node_tls(config: NodeConfig) -> NodeTls | None:
    """The node's contexts, or None when it speaks plain TCP. Raises ``InvalidInput``
    with one sentence when the files are unusable or the certificate would not pass
    its peers' checks (see the module docstring). The same config always yields the
    same contexts: the server and the peer links share one load."""
    files = files_of(config)
    if files is None:
        return None
    return node_contexts(files, config.me.host)


def check_etcd_files(config: NodeConfig) -> None:
    """In arbiter mode with TLS to etcd: the CA (and the client certificate and key,
    if given) load, or ``InvalidInput`` says which file and why, before the node
    starts (rather than every request to etcd failing later)."""
    if config.arbiter != "etcd" or not config.etcd_ca:
        return
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    _load_ca(context, "etcd_ca", Path(config.etcd_ca))
    if config.etcd_cert:
        cert, key = Path(config.etcd_cert), Path(config.etcd_key)
        _expect_pem("etcd_cert", cert, "certificate", b"-----BEGIN CERTIFICATE-----")
        _expect_pem("etcd_key", key, "private key", b"PRIVATE KEY-----")
        try:
            context.load_cert_chain(cert, key, password=_no_passphrase)
        except (_Encrypted, ssl.SSLError) as exc:
            why = "the key is encrypted" if isinstance(exc, _Encrypted) else _reason(exc)
            raise InvalidInput(
                f"etcd_cert {cert} and etcd_key {key}: not a usable certificate and key ({why})"
            ) from None


@functools.cache
def node_contexts(files: TlsFiles, host: str) -> NodeTls:
    """``node_tls`` for the files of a node at ``host`` (its address's host part)."""
    contexts = NodeTls(server_context(files), dial_context(files))
    problem = _self_test(contexts, host.strip("[]"))
    if problem is not None:
        raise InvalidInput(f"tls_cert {files.cert} would be refused by the other nodes: {problem}")
    return contexts


def _self_test(contexts: NodeTls, host: str) -> str | None:
    """Handshake the node's dial context (verifying, as a peer would, against the CA
    and ``host``) with its server context (verifying the same certificate offered as
    a client's), in memory. The reason it fails, or None."""
    pipes = [ssl.MemoryBIO() for _ in range(4)]
    dialer = contexts.dial.wrap_bio(pipes[0], pipes[1], server_side=False, server_hostname=host)
    acceptor = contexts.server.wrap_bio(pipes[2], pipes[3], server_side=True)
    done = {"dialer": False, "acceptor": False}
    for _ in range(_SELF_TEST_ROUNDS):
        for name, side in (("dialer", dialer), ("acceptor", acceptor)):
            if done[name]:
                continue
            try:
                side.do_handshake()
                done[name] = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                return _verify_reason(exc)
        pipes[2].write(pipes[1].read())
        pipes[0].write(pipes[3].read())
        if all(done.values()):
            # TLS 1.3: the acceptor checks the dialer's certificate on its first read.
            try:
                acceptor.read(1)
            except ssl.SSLWantReadError:
                return None
            except ssl.SSLError as exc:
                return _verify_reason(exc)
    return "the handshake did not finish"


def _verify_reason(exc: ssl.SSLError, ca: str = "the CA in tls_ca") -> str:
    if not isinstance(exc, ssl.SSLCertVerificationError) or not exc.verify_message:
        return _reason(exc)
    message = str(exc.verify_message).rstrip(".")
    if exc.verify_code in _NOT_FROM_CA:
        return f"it is not signed by {ca} ({message})"
    return message


def _reason(exc: ssl.SSLError) -> str:
    """OpenSSL's reason code in words (``KEY_VALUES_MISMATCH``: "key values mismatch")."""
    return str(exc.reason or exc).replace("_", " ").lower()


def describe_failure(exc: ssl.SSLError) -> str:
    """One sentence on a handshake a client or dialing node saw fail."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the node's TLS certificate does not verify: {_verify_reason(exc, 'the CA file')}"
    if exc.reason == "WRONG_VERSION_NUMBER":
        return "the node does not speak TLS (plain TCP there? then give no CA file)"
    return f"TLS handshake failed ({_reason(exc)})"


def certificate_names(cert: dict[str, Any]) -> set[str]:
    """The DNS names and IP addresses a peer certificate (``getpeercert()``) is for."""
    return {
        _normal(str(value))
        for kind, value in cert.get("subjectAltName", ())
        if kind in ("DNS", "IP Address")
    }


def _normal(name: str) -> str:
    """One spelling per address (``::1`` and ``0:0:0:0:0:0:0:1`` alike), names lowercased."""
    name = name.strip().strip("[]").lower()
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


def peer_certificate_problem(writer: asyncio.StreamWriter, host: str) -> str | None:
    """Why a connection may not carry a peer link, or None: on a TLS port a peer must
    have presented a certificate of the cluster CA (the handshake verified it) that
    names ``host``, the peer's address in the node list."""
    cert = writer.get_extra_info("peercert")
    if not cert:
        return "a node must present a certificate of the cluster CA (mutual TLS)"
    names = certificate_names(cert)
    if _normal(host) not in names:
        shown = ", ".join(sorted(names)) or "nothing"
        return f"its certificate is for {shown}, not for its address {host}"
    return None
