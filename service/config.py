"""Node configuration: one frozen dataclass, defaults in one place.

A node is configured from an INI-style file (``ops/nodes/*.conf``), command
line flags, or both (flags win). Every timeout lives here, and ``validate``
checks that they fit together as SPEC section 6 requires:

* a backup suspects a silent primary after ``suspect_timeout``;
* an election then takes at most about ``election_timeout``;
* a backup counts itself confirmed in the sync set for ``confirm_window`` after
  the last frame from the primary naming it, which is ``sync_timeout`` minus
  ``safety_margin``: the primary drops a silent backup only after
  ``sync_timeout``, so a backup that believes it is a member really is one;
* suspicion plus election must end inside the confirm window, or a frozen
  primary would leave nobody eligible to take over (R5).

Transport (SPEC section 10): ``tls_cert``, ``tls_key`` and ``tls_ca`` go together
(relative paths are relative to the config file). With them, clients reach the
node over TLS and nodes link over mutual TLS (``service/tls.py``); without them the
node speaks plain TCP, which ``validate`` allows only when every node address is
loopback: passwords and tokens never cross a network in clear.
"""

from __future__ import annotations

import configparser
import dataclasses
import ipaddress
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InvalidInput

if TYPE_CHECKING:
    from .replication.leased import LeaseTiming

# Names that are loopback without a lookup (the whole 127/8 and ::1 are, as IP literals).
LOOPBACK_NAMES = frozenset({"localhost"})

# Descriptors a node holds besides its connections (see ``NodeConfig.client_limit``).
RESERVED_FILES = 64
# A client frame limit must hold the largest legal request (see ``max_client_frame``).
MIN_CLIENT_FRAME = 64 * 1024
# scrypt's N: below 2**10 a hash guards nothing; 2**20 already takes 1 GiB per hash.
MIN_SCRYPT_N, MAX_SCRYPT_N = 2**10, 2**20


@dataclass(frozen=True)
class Peer:
    node_id: int
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput(f"not a HOST:PORT address: {text!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """True for an address that never leaves the machine: 127.0.0.0/8, ::1, localhost."""
    name = host.strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def parse_peers(text: str) -> tuple[Peer, ...]:
    """Parse ``1=127.0.0.1:7001,2=127.0.0.1:7002``."""
    peers = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        node, sep, address = item.partition("=")
        if not sep or not node.strip().isdigit():
            raise InvalidInput(f"not a NODE=HOST:PORT entry: {item!r}")
        host, port = parse_address(address)
        peers.append(Peer(int(node), host, port))
    return tuple(peers)


@dataclass(frozen=True)
class NodeConfig:
    node_id: int
    data_dir: Path
    # Every node of the cluster, this one included: its own entry is its listen address.
    nodes: tuple[Peer, ...]
    secret_file: Path
    # FULL: a commit is on disk before it is acknowledged, even if the power fails.
    # NORMAL keeps WAL consistency but may lose the last commits on power loss.
    synchronous: str = "FULL"
    heartbeat_interval: float = 0.1
    suspect_timeout: float = 0.6
    election_timeout: float = 0.3
    sync_timeout: float = 1.5
    safety_margin: float = 0.3
    # A tick later than this after the previous one means the node was frozen.
    clock_gap: float = 0.5
    # The log keeps at most this many records, and at most this many bytes of them
    # (changesets; the newest record stays whatever its size). Bytes bound the disk;
    # the count bounds the rows when records are small (one write per batch).
    log_retention: int = 100_000
    log_retention_bytes: int = 32 * 1024 * 1024
    # Compare per-table checksums across the nodes at a quiet moment this often
    # (replication/verify.py); 0 turns it off.
    verify_interval: float = 300.0
    # A retry with the same request id returns the first result within this window.
    request_retention: float = 3600.0
    max_batch: int = 512
    # The frame limit of authenticated peer links (catch-up chunks, snapshots).
    max_frame: int = 8 * 1024 * 1024
    # The frame limit of a client after the handshake. The largest legal request is
    # a send of 4000 characters that are each written as a JSON surrogate-pair escape
    # (12 bytes: 48,000 bytes), or a delete of 1000 ids of 19 digits (20,000 bytes);
    # 64 KiB holds either with room for the envelope, and is far below max_frame.
    max_client_frame: int = 64 * 1024
    # Client connections served at once; 0 derives it from the process's file limit
    # (see ``client_limit``). Over the limit a client is refused with ``busy``.
    max_clients: int = 0
    # Connections that have not finished their hello; a new one beyond this closes
    # the oldest (a stranger's stalled handshake must not lock out a peer).
    max_handshakes: int = 256
    idle_client_timeout: float = 300.0
    handshake_timeout: float = 5.0
    # What a rewind removes is kept in rollback files for inspection; the oldest
    # are deleted once there are more than this many or they hold more bytes.
    # The newest file is always kept, even when it alone is larger.
    rollback_max_files: int = 20
    rollback_max_bytes: int = 64 * 1024 * 1024
    # A database found damaged is moved aside into damaged/ for inspection; only the
    # newest this many are kept (a disk that keeps damaging it would otherwise fill
    # up with copies, deleted messages in them).
    damaged_max_files: int = 2
    # How often the primary re-checks the session of every listen stream, so that a
    # session ended any other way than by logout or account deletion ends its stream.
    listen_check_interval: float = 5.0
    # Repeated connection refusals (busy, bad hello, bad peer MAC) are logged at most
    # once per interval per kind, with a count of those left out.
    log_interval: float = 10.0
    # Passwords (see service/ratelimit.py for the bounds and why). scrypt's cost: a
    # power of two; at 2**17 (OWASP) one hash takes ~0.5 s of a core and ~128 MiB.
    scrypt_n: int = 2**17
    # Hashes computed at once (each holds a core and scrypt's memory), and hashes
    # that may wait for one; beyond that, register and login answer busy at once.
    hash_workers: int = 2
    hash_queue: int = 2
    # Failed logins allowed before a backoff window, per account and per client address.
    login_account_failures: int = 5
    login_address_failures: int = 20
    # The first window; each further failure doubles it, up to the cap.
    login_backoff: float = 1.0
    login_backoff_cap: float = 300.0
    # Failures are forgotten after this long without one.
    login_failure_memory: float = 900.0
    # A session ends this long after its login, or after this long unused.
    session_lifetime: float = 30 * 86400.0
    session_idle: float = 7 * 86400.0
    # A login beyond this many live sessions of the user ends the oldest one.
    sessions_per_user: int = 20
    # Bytes of replies and pushes that clients have not read yet, over all
    # connections; beyond, the connection holding the most is dropped.
    max_client_unread: int = 256 * 1024 * 1024
    # A listen beyond this many live streams of the user (on this node) ends the
    # oldest one: each message to a user is pushed to every stream of the user.
    listens_per_user: int = 10
    # Messages an account may send, on average per second and at once
    # (service/writerate.py): beyond, its sends are answered busy until it slows
    # down. 0: no limit.
    send_rate: float = 10.0
    send_burst: int = 50
    # The same for the account's other writes (touch, mark_read, delete_messages),
    # each of which keeps a request row for request_retention. 0: no limit.
    write_rate: float = 20.0
    write_burst: int = 100
    # Accounts one client address (an IPv6 /64) may register, on average per second
    # and at once: each new account brings a send_rate of its own. 0: no limit.
    register_rate: float = 0.1
    register_burst: int = 10
    # HOST:PORT where the node serves Prometheus metrics over HTTP (service/metrics.py);
    # empty: not served.
    metrics_address: str = ""
    # Who decides who leads (SPEC section 10): "peers" (the default: the nodes vote
    # among themselves, safe on one host) or "etcd" (leader key and sync set in etcd,
    # safe across hosts and partitions; the settings below apply).
    arbiter: str = "peers"
    # HOST:PORT of etcd members, comma separated; tried in turn.
    etcd_endpoints: str = ""
    # The key prefix of this cluster in etcd: one cluster per prefix.
    etcd_prefix: str = "/chat/cluster"
    # The leader's lease (etcd's minimum is 2 s). A dead primary is replaced about
    # this long after its last renewal.
    lease_ttl: float = 3.0
    # The most two nodes' clocks may drift apart, as a fraction; and a margin taken
    # off the fencing deadline (E2: sent + ttl * (1 - drift) - margin).
    clock_drift: float = 0.01
    lease_margin: float = 0.3
    lease_renew_interval: float = 0.5
    # The most a request to etcd may take before etcd counts as unreachable.
    etcd_request_timeout: float = 0.5
    # TLS to etcd (a CA file to check it against; a client certificate and key if
    # etcd asks for one). Empty: plain HTTP, for an etcd on loopback.
    etcd_ca: str = ""
    etcd_cert: str = ""
    etcd_key: str = ""
    # TLS (service/tls.py): this node's certificate chain and key (PEM), and the
    # cluster CA that signs every node's certificate. All three, or none.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def confirm_window(self) -> float:
        return self.sync_timeout - self.safety_margin

    @property
    def me(self) -> Peer:
        for peer in self.nodes:
            if peer.node_id == self.node_id:
                return peer
        raise InvalidInput(f"node {self.node_id} is not in the node list")

    @property
    def peers(self) -> tuple[Peer, ...]:
        return tuple(p for p in self.nodes if p.node_id != self.node_id)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "chat.db"

    @property
    def rollback_dir(self) -> Path:
        return self.data_dir / "rollback"

    @property
    def snapshot_in_path(self) -> Path:
        """Where a backup receives a snapshot, chunk by chunk, before installing it."""
        return self.data_dir / "snapshot-in.db"

    def snapshot_out_path(self, peer: int) -> Path:
        """Where a primary copies its database to send it to ``peer``."""
        return self.data_dir / f"snapshot-out-{peer}.db"

    def copies_in_transit(self) -> tuple[Path, ...]:
        """Every snapshot file a node makes, gone once used: one still there at
        start was left by a crash."""
        outgoing = [self.snapshot_out_path(peer.node_id) for peer in self.peers]
        partial = [path.with_name(path.name + ".partial") for path in outgoing]
        # The staging copy an earlier version's install made (it works in place now).
        staging = self.db_path.with_name(self.db_path.name + ".installing")
        return (self.snapshot_in_path, *outgoing, *partial, staging)

    @property
    def metrics_endpoint(self) -> tuple[str, int] | None:
        """Where to serve metrics, or None; an IPv6 host may be written ``[::1]``."""
        if not self.metrics_address:
            return None
        host, port = parse_address(self.metrics_address)
        return host.strip("[]"), port

    def client_limit(self, open_files: int) -> int:
        """How many client connections to serve with ``open_files`` descriptors.

        Clients get what is left once the descriptors a node needs anyway are set
        aside: the database and its WAL, shared memory and snapshot files, logs,
        stdio, the event loop's own, up to two links per peer (an old one and its
        replacement) and every unfinished handshake. A node at its limit thus still
        accepts peers and answers with an error frame instead of failing to accept.
        """
        if self.max_clients > 0:
            return self.max_clients
        reserved = RESERVED_FILES + 2 * len(self.nodes) + self.max_handshakes
        return max(1, open_files - reserved)

    def validate(self) -> NodeConfig:
        ids = [p.node_id for p in self.nodes]
        if len(set(ids)) != len(ids):
            raise InvalidInput("node ids must be unique")
        self.me  # noqa: B018  (raises when this node is missing from the list)
        if self.synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise InvalidInput("synchronous must be FULL, EXTRA or NORMAL")
        if self.confirm_window <= self.suspect_timeout + self.election_timeout:
            raise InvalidInput(
                "timeouts do not fit: suspect_timeout + election_timeout must be less "
                "than sync_timeout - safety_margin"
            )
        if self.heartbeat_interval * 3 > self.suspect_timeout:
            raise InvalidInput("suspect_timeout must be at least three heartbeats")
        if self.log_retention < 1 or self.log_retention_bytes < 1 or self.max_batch < 1:
            raise InvalidInput("log_retention, log_retention_bytes and max_batch must be positive")
        if self.rollback_max_files < 1 or self.rollback_max_bytes < 1:
            raise InvalidInput("rollback_max_files and rollback_max_bytes must be positive")
        if self.damaged_max_files < 1:
            raise InvalidInput("damaged_max_files must be positive")
        if not MIN_CLIENT_FRAME <= self.max_client_frame <= self.max_frame:
            raise InvalidInput(
                f"max_client_frame must be from {MIN_CLIENT_FRAME} to max_frame ({self.max_frame})"
            )
        if self.max_clients < 0 or self.max_handshakes < 1:
            raise InvalidInput("max_clients must be 0 (derived) or more, max_handshakes positive")
        if self.listen_check_interval <= 0 or self.log_interval <= 0:
            raise InvalidInput("listen_check_interval and log_interval must be positive")
        self._validate_logins()
        self._validate_metrics()
        self._validate_transport()
        self._validate_arbiter()
        return self

    def _validate_arbiter(self) -> None:
        if self.arbiter not in ("peers", "etcd"):
            raise InvalidInput(f"arbiter must be peers or etcd, not {self.arbiter!r}")
        if self.arbiter != "etcd":
            return
        try:
            self.etcd_addresses  # noqa: B018  (raises on a malformed address)
        except InvalidInput as exc:
            raise InvalidInput(f"etcd_endpoints: {exc.message}") from None
        if not self.etcd_addresses:
            raise InvalidInput("arbiter = etcd needs etcd_endpoints (HOST:PORT, ...)")
        if not self.etcd_prefix.startswith("/") or self.etcd_prefix.strip("/") == "":
            raise InvalidInput("etcd_prefix must be an absolute key prefix such as /chat/prod")
        if bool(self.etcd_cert) != bool(self.etcd_key) or (self.etcd_cert and not self.etcd_ca):
            raise InvalidInput("etcd_cert and etcd_key go together, and need etcd_ca")
        problems = self.lease_timing.problems()
        if problems:
            raise InvalidInput("lease timing does not fit: " + "; ".join(problems))

    @property
    def etcd_addresses(self) -> tuple[tuple[str, int], ...]:
        return tuple(parse_address(item) for item in self.etcd_endpoints.split(",") if item.strip())

    @property
    def lease_timing(self) -> LeaseTiming:
        # Imported here: ``chatctl`` reads this module for its address parsing, and
        # the replication's modules behind LeaseTiming were a sixth of its start.
        from .replication.leased import LeaseTiming

        return LeaseTiming(
            ttl=self.lease_ttl,
            drift=self.clock_drift,
            margin=self.lease_margin,
            renew_interval=self.lease_renew_interval,
            request_timeout=self.etcd_request_timeout,
        )

    @property
    def tls(self) -> bool:
        """Whether the node speaks TLS (``validate`` checks that all three files are named)."""
        return self.tls_cert is not None

    def _validate_transport(self) -> None:
        named = [self.tls_cert, self.tls_key, self.tls_ca]
        if any(path is not None for path in named) and None in named:
            raise InvalidInput("tls_cert, tls_key and tls_ca go together: set all three or none")
        remote = [p.address for p in self.nodes if not is_loopback(p.host)]
        if remote and not self.tls:
            raise InvalidInput(
                f"node addresses {', '.join(remote)} are not loopback: plain TCP is allowed "
                "on loopback only; set tls_cert, tls_key and tls_ca (README, TLS)"
            )

    def _validate_metrics(self) -> None:
        try:
            endpoint = self.metrics_endpoint
        except InvalidInput as exc:
            raise InvalidInput(f"metrics_address: {exc.message}") from None
        if endpoint is not None and any((p.host, p.port) == endpoint for p in self.nodes):
            raise InvalidInput(
                f"metrics_address {self.metrics_address} is a node's address; "
                "give metrics a port of their own"
            )

    def _validate_logins(self) -> None:
        n = self.scrypt_n
        if n & (n - 1) or not MIN_SCRYPT_N <= n <= MAX_SCRYPT_N:
            raise InvalidInput(
                f"scrypt_n must be a power of two from {MIN_SCRYPT_N} to {MAX_SCRYPT_N}"
            )
        if self.hash_workers < 1 or self.hash_queue < 0:
            raise InvalidInput("hash_workers must be positive and hash_queue not negative")
        if min(self.login_account_failures, self.login_address_failures) < 1:
            raise InvalidInput("login_account_failures and login_address_failures must be positive")
        if not 0 < self.login_backoff <= self.login_backoff_cap <= self.login_failure_memory:
            raise InvalidInput(
                "login_backoff <= login_backoff_cap <= login_failure_memory must hold, all positive"
            )
        if min(self.session_lifetime, self.session_idle) <= 0 or self.sessions_per_user < 1:
            raise InvalidInput(
                "session_lifetime, session_idle and sessions_per_user must be positive"
            )
        if self.listens_per_user < 1:
            raise InvalidInput("listens_per_user must be positive")
        if not (0 <= self.send_rate < math.inf and self.send_burst >= 1):
            raise InvalidInput("send_rate must be 0 (no limit) or more, send_burst positive")
        if not (0 <= self.write_rate < math.inf and self.write_burst >= 1):
            raise InvalidInput("write_rate must be 0 (no limit) or more, write_burst positive")
        if not (0 <= self.register_rate < math.inf and self.register_burst >= 1):
            raise InvalidInput(
                "register_rate must be 0 (no limit) or more, register_burst positive"
            )
        if self.max_client_unread < 1024 * 1024:
            raise InvalidInput("max_client_unread must be at least 1 MiB (1048576)")


_FLOAT_FIELDS = {f.name for f in dataclasses.fields(NodeConfig) if f.type in ("float", float)}
_INT_FIELDS = {f.name for f in dataclasses.fields(NodeConfig) if f.type in ("int", int)}
_PATH_FIELDS = frozenset({"tls_cert", "tls_key", "tls_ca"})


def load(path: Path | None, overrides: dict[str, str]) -> NodeConfig:
    """Build a config from an INI file's ``[node]`` section and flag overrides."""
    values: dict[str, str] = {}
    base = Path.cwd()
    if path is not None:
        parser = configparser.ConfigParser()
        if not parser.read(path):
            raise InvalidInput(f"cannot read config file {path}")
        values.update(parser["node"] if parser.has_section("node") else {})
        base = path.parent
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        kwargs: dict[str, object] = {
            "node_id": int(values.pop("node_id")),
            "data_dir": base / values.pop("data_dir"),
            "nodes": parse_peers(values.pop("nodes")),
        }
    except KeyError as missing:
        raise InvalidInput(f"missing setting {missing}") from None
    except ValueError as bad:
        raise InvalidInput(f"bad setting: {bad}") from None
    kwargs["secret_file"] = base / values.pop("secret_file", "cluster.secret")
    for name, text in values.items():
        try:
            if name in _FLOAT_FIELDS:
                kwargs[name] = float(text)
            elif name in _INT_FIELDS:
                kwargs[name] = int(text)
            elif name == "synchronous":
                kwargs[name] = text.upper()
            elif name in ("metrics_address", "arbiter", "etcd_endpoints", "etcd_prefix"):
                kwargs[name] = text.strip()
            elif name in ("etcd_ca", "etcd_cert", "etcd_key"):
                kwargs[name] = str(base / text.strip()) if text.strip() else ""
            elif name in _PATH_FIELDS:
                kwargs[name] = base / text.strip() if text.strip() else None
            else:
                raise InvalidInput(f"unknown setting {name!r}")
        except ValueError:
            raise InvalidInput(f"bad value for {name}: {text!r}") from None
    return NodeConfig(**kwargs).validate()  # type: ignore[arg-type]
