"""Prometheus metrics of one node: what an operator graphs and alerts on.

Why
---
``chatctl status`` answers for one moment; a monitoring system that scrapes every
node keeps the history and raises the alarms (README section Metrics: what to
alert on, first a full disk, differing checksums, no primary, a backup out of
the sync set).

Theory of operation
-------------------
Two kinds of numbers, kept apart so that the write path pays almost nothing:

* State (role, epoch, seq, the sync set, lag per backup, a storage fault, an
  unproven database, the last checksum comparison, connected clients) is read
  when scraped: ``StateCollector`` gets one ``NodeSample``, a snapshot of the
  core, the verifier and the server taken on the event loop between two of its
  steps, and turns it into gauges. Nothing is updated for it while the node works.
* Events are counters and histograms of ``Metrics``, updated where they happen:
  a few per batch (its size, its seal and its acknowledgement), one per group
  fsync, one per catch-up, snapshot, rewind, role change or storage fault. Never
  one per request: client writes and reads are plain integers of the replicator,
  read when scraped.

Every node has a ``CollectorRegistry`` of its own, never the process-global
one, so several nodes can live in one process (unit tests) without clashing.

Serving: prometheus_client's own HTTP server, on its own threads, at
``metrics_address``. A scrape runs there, and reads node state only through the
event loop (``run_coroutine_threadsafe``), since the core is not thread-safe. A
loop that does not answer within ``STATE_TIMEOUT`` (a long batch, a frozen
process) gives a scrape with ``chat_state_available 0`` and the event metrics,
instead of a scrape that hangs.

When the address cannot be bound (the port is taken, the host is not this
machine's) the node runs without metrics: its job is chat. It logs one warning,
tries again every ``BIND_RETRY`` seconds, and logs once more when it serves.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ParamSpec, TypeVar
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .errors import ChatError
from .replication.types import Role
from .replication.verify import Outcome

if TYPE_CHECKING:
    from .replication.runtime import Replicator
    from .server import Server
    from .storage import Storage

log = logging.getLogger("service.metrics")

STATE_TIMEOUT = 2.0
BIND_RETRY = 5.0
# Client writes per record: group commit takes up to max_batch (512 by default).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Changeset bytes per applied transaction: the usual writes' records are a few KB, a
# full batch's some 512 KiB, and a backup applies about that much at most in one
# turn (one record of up to 2 MiB when a single write fills it).
APPLY_BYTES_BUCKETS = tuple(1024 * k for k in (4, 16, 64, 256, 1024, 2048, 4096, 8192, 16384))
FSYNC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# A tick is due every 20 ms: a few ms late is the timer's grain, tenths of a second a
# held loop (heartbeats unsent and unread: elections come at suspect_timeout, 0.6 s).
LOOP_DELAY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ROLES = tuple(role.value for role in Role)

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True)
class NodeSample:
    """What the gauges show, read on the event loop in one go (``sample_node``)."""

    node_id: int
    nodes: tuple[int, ...]
    role: str
    epoch: int
    primary: int | None
    seq: int
    durable_seq: int
    sync_set: tuple[int, ...]
    sync_set_version: int
    # Primary only: the members whose acknowledgements count now, and the seq
    # acknowledged (durable on every one of them).
    in_sync: tuple[int, ...] | None = None
    acknowledged_seq: int | None = None
    # Primary only: records each backup that acknowledged anything is behind.
    lag: dict[int, int] = field(default_factory=dict)
    links: tuple[int, ...] = ()
    # Backup only: confirmed in the sync set, so it may take over (R5).
    confirmed: bool | None = None
    storage_fault: bool = False
    # Free bytes in the data dir (None: unknown); primary only: backups whose
    # snapshot waits (no room for the copy, a disk that refuses it).
    data_dir_free: int | None = None
    database_bytes: int | None = None
    wal_bytes: int | None = None
    checkpoint_failures: int = 0
    snapshots_waiting: int | None = None
    unproven: bool = False
    waiting_for: tuple[int, ...] = ()
    batches: int = 0
    writes: int = 0
    reads: int = 0
    writes_waiting: int | None = None
    writes_refused_busy: int = 0
    reads_waiting: int | None = None
    reads_refused_busy: int = 0
    sends_refused_rate: int = 0
    writes_refused_rate: int = 0
    registers_refused_rate: int = 0
    checksums: Outcome | None = None
    checksum_rounds: int = 0
    checksum_mismatches: int = 0
    clients: int = 0
    client_limit: int = 0
    listen_streams: int = 0
    client_unread: int = 0
    clients_dropped: int = 0


def sample_node(replicator: Replicator, server: Server) -> NodeSample:
    """The node's state now; on the event loop thread only."""
    core = replicator.core
    stats = core.statistics()
    verifier = replicator.verifier
    writer = replicator.writer  # its counters, read where they are kept
    return NodeSample(
        node_id=core.node_id,
        nodes=core.nodes,
        role=core.role.value,
        epoch=core.epoch,
        primary=core.primary,
        seq=core.position.seq,
        durable_seq=core.durable_seq,
        sync_set=tuple(core.sync_set.members),
        sync_set_version=core.sync_set.version,
        in_sync=core.in_sync if core.role is Role.PRIMARY else None,
        acknowledged_seq=stats["watermark"],
        lag=dict(stats["lag"]),
        links=tuple(sorted(core.links)),
        confirmed=bool(stats["confirmed"]) if core.role is Role.BACKUP else None,
        storage_fault=core.fault is not None,
        data_dir_free=_free_bytes(replicator.config.data_dir),
        database_bytes=_database_bytes(replicator.storage),
        wal_bytes=replicator.storage.wal_bytes(),
        checkpoint_failures=replicator.storage.checkpoint_failures,
        snapshots_waiting=len(replicator.streams.snapshot_waits)
        if core.role is Role.PRIMARY
        else None,
        unproven=core.unproven is not None,
        waiting_for=tuple(core.waiting_for),
        batches=replicator.batches,
        writes=replicator.writes,
        reads=replicator.reads,
        writes_waiting=len(writer.queue) if core.role is Role.PRIMARY else None,
        writes_refused_busy=writer.writes_refused_busy,
        reads_waiting=len(writer.read_line) if core.role is Role.PRIMARY else None,
        reads_refused_busy=writer.reads_refused_busy,
        sends_refused_rate=writer.send_rate.refused,
        writes_refused_rate=writer.write_rate.refused,
        registers_refused_rate=server.registrations.refused,
        checksums=verifier.last,
        checksum_rounds=verifier.completed,
        checksum_mismatches=verifier.mismatches,
        clients=len(server.slots),
        client_limit=server.client_limit,
        listen_streams=sum(len(group) for group in server.listeners.values()),
        client_unread=server.unread.total,
        clients_dropped=server.drops,
    )


def _database_bytes(storage: Storage) -> int | None:
    try:
        return storage.database_bytes()
    except ChatError:  # a disk that fails reads: the storage fault says so
        return None


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _per_node(name: str, doc: str, label: str, values: dict[int, float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=[label])
    for node, value in sorted(values.items()):
        family.add_metric([str(node)], value)
    return family


def _plain(sample: NodeSample) -> list[tuple[str, str, float | None]]:
    """(name, help, value) of the unlabelled gauges; None: not on this role."""
    last = sample.checksums
    return [
        ("chat_primary_id", "The primary this node knows of; 0: none", sample.primary or 0),
        ("chat_epoch", "The epoch this node is in", sample.epoch),
        ("chat_seq", "Seq of the last record this node committed", sample.seq),
        ("chat_durable_seq", "Seq of the last record on this node's disk", sample.durable_seq),
        (
            "chat_acknowledged_seq",
            "Primary: the last seq durable on every member (writes up to it are answered)",
            sample.acknowledged_seq,
        ),
        ("chat_confirmed", "Backup: 1 if confirmed in the sync set (may lead)", sample.confirmed),
        ("chat_sync_set_size", "Members of the sync set this node holds", len(sample.sync_set)),
        ("chat_sync_set_version", "Version of that sync set", sample.sync_set_version),
        (
            "chat_in_sync_size",
            "Primary: members whose acknowledgements count now (the sync set in effect)",
            None if sample.in_sync is None else len(sample.in_sync),
        ),
        # The storage health an operator alerts on first.
        ("chat_storage_fault", "1 while this node's disk refuses writes", sample.storage_fault),
        (
            "chat_data_dir_free_bytes",
            "Bytes free in the data dir's file system (a snapshot or a backup copies the database)",
            sample.data_dir_free,
        ),
        (
            "chat_database_bytes",
            "Bytes of this node's database, every page: what a snapshot or a backup copies",
            sample.database_bytes,
        ),
        (
            "chat_wal_bytes",
            "Bytes of this node's WAL: up to about 32 MiB while checkpoints keep up (one "
            "each 8,000 pages); more while a long read holds them back, or the disk "
            "refuses them",
            sample.wal_bytes,
        ),
        (
            "chat_snapshots_waiting",
            "Primary: backups whose snapshot cannot be made yet (no room, or the disk refused it)",
            sample.snapshots_waiting,
        ),
        (
            "chat_database_unproven",
            "1 while this node's database may lack commits it made (it counts in no election)",
            sample.unproven,
        ),
        (
            "chat_waiting_for_members",
            "Electing: sync set members this node waits for before anyone may lead",
            len(sample.waiting_for),
        ),
        (
            "chat_checksums_agreed",
            "Primary: 1 if the last cross-node checksum comparison agreed",
            None if last is None else last.agreed,
        ),
        ("chat_checksums_seq", "Primary: its seq", None if last is None else last.seq),
        (
            "chat_checksums_timestamp_seconds",
            "Primary: when that comparison completed (Unix time)",
            None if last is None else last.at,
        ),
        (
            "chat_checksums_damaged_nodes",
            "Primary: nodes that comparison found outside a majority",
            None if last is None else len(last.damaged),
        ),
        ("chat_clients", "Client connections open", sample.clients),
        ("chat_client_limit", "Client connections this node serves at most", sample.client_limit),
        ("chat_listen_streams", "Live listen streams", sample.listen_streams),
        (
            "chat_writes_waiting",
            "Primary: client writes queued for a batch (at most eight batches' worth)",
            sample.writes_waiting,
        ),
        (
            "chat_reads_waiting",
            "Primary: client reads waiting for their turn (one query per turn of the loop)",
            sample.reads_waiting,
        ),
        (
            "chat_client_unread_bytes",
            "Bytes clients have not read, over connections holding more than 1 MiB",
            sample.client_unread,
        ),
    ]


def _counted(sample: NodeSample) -> list[tuple[str, str, float]]:
    """(name without _total, help, value) of the counters read when scraped."""
    return [
        ("chat_batches", "Primary: records sealed (one transaction each)", sample.batches),
        ("chat_client_writes", "Primary: client writes executed in records", sample.writes),
        ("chat_client_reads", "Primary: client reads served", sample.reads),
        (
            "chat_checkpoint_failures",
            "Checkpoints this node's disk refused: the WAL keeps every commit and grows "
            "until one succeeds",
            sample.checkpoint_failures,
        ),
        (
            "chat_writes_refused_busy",
            "Primary: client writes refused busy, the queue full and their account's "
            "writes among the most waiting",
            sample.writes_refused_busy,
        ),
        (
            "chat_reads_refused_busy",
            "Primary: client reads refused busy, 4,096 waiting and their account's reads "
            "among the most of them",
            sample.reads_refused_busy,
        ),
        (
            "chat_sends_refused_rate",
            "Primary: sends refused busy, their account past send_rate and send_burst",
            sample.sends_refused_rate,
        ),
        (
            "chat_writes_refused_rate",
            "Primary: writes other than sends refused busy, their account past write_rate "
            "and write_burst",
            sample.writes_refused_rate,
        ),
        (
            "chat_registers_refused_rate",
            "Primary: registrations refused busy, their client address past register_rate "
            "and register_burst",
            sample.registers_refused_rate,
        ),
        (
            "chat_clients_dropped",
            "Client connections dropped for what they did not read (16 MiB, max_client_unread)",
            sample.clients_dropped,
        ),
        (
            "chat_checksum_rounds",
            "Primary: cross-node checksum comparisons completed",
            sample.checksum_rounds,
        ),
        (
            "chat_checksum_mismatches",
            "Primary: comparisons in which some node's checksums differed",
            sample.checksum_mismatches,
        ),
    ]


def state_families(sample: NodeSample) -> Iterator[Metric]:
    """The gauges (and counters kept as plain integers) of one sample."""
    role = GaugeMetricFamily("chat_role", "1 for this node's role, 0 for others", labels=["role"])
    for name in ROLES:
        role.add_metric([name], float(sample.role == name))
    yield role
    for name, doc, value in _plain(sample):
        if value is not None:
            yield GaugeMetricFamily(name, doc, value=float(value))
    for name, doc, total in _counted(sample):
        yield CounterMetricFamily(name, doc, value=total)
    yield _per_node(
        "chat_sync_set_member",
        "1 for each node in the sync set this node holds, 0 for the others",
        "node",
        {node: float(node in sample.sync_set) for node in sample.nodes},
    )
    yield _per_node(
        "chat_peer_link_up",
        "1 while this node has a live link to the peer",
        "peer",
        {node: float(node in sample.links) for node in sample.nodes if node != sample.node_id},
    )
    yield _per_node(
        "chat_backup_lag_records",
        "Primary: records each backup is behind this node's seq, on its disk",
        "backup",
        {node: float(lag) for node, lag in sample.lag.items()},
    )


class StateCollector(Collector):
    """Gauges read when scraped; ``read`` gives None when the state cannot be had."""

    def __init__(self, read: Callable[[], NodeSample | None]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        sample = self._read()
        yield GaugeMetricFamily(
            "chat_state_available",
            "1 if the node's state was read for this scrape; 0: its event loop did not answer",
            value=float(sample is not None),
        )
        if sample is not None:
            yield from state_families(sample)


class Metrics:
    """One node's registry: the event counters and histograms, and the state collector."""

    def __init__(self, state_timeout: float = STATE_TIMEOUT) -> None:
        self.state_timeout = state_timeout
        # ``*_created`` series (when each counter was made) only clutter the text
        # format. A switch of the whole process: the node's, whose metrics these are.
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        registry = self.registry
        ProcessCollector(registry=registry)
        self.batch_writes = Histogram(
            "chat_batch_writes",
            "Primary: client writes per sealed record (group commit)",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.applied_records = Histogram(
            "chat_applied_records",
            "Backup: records applied in one transaction",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.applied_bytes = Histogram(
            "chat_applied_bytes",
            "Backup: changeset bytes applied in one transaction (one turn of its loop)",
            buckets=APPLY_BYTES_BUCKETS,
            registry=registry,
        )
        self.fsync_seconds = Histogram(
            "chat_fsync_seconds",
            "One fsync of the WAL (with, now and then, a checkpoint)",
            buckets=FSYNC_BUCKETS,
            registry=registry,
        )
        self.ack_seconds = Histogram(
            "chat_ack_latency_seconds",
            "Primary: from sealing a record to its acknowledgement (durable on every member)",
            buckets=ACK_BUCKETS,
            registry=registry,
        )
        self.loop_delay = Histogram(
            "chat_loop_delay_seconds",
            "How much later than due the node's periodic tick ran, counted from the "
            "previous tick's start: its event loop was held (a long batch, apply, read or "
            "prune; a busy machine)",
            buckets=LOOP_DELAY_BUCKETS,
            registry=registry,
        )
        self.catchups_started = self._counter("catchups_started", "Primary: backups joined behind")
        self.catchups_completed = self._counter(
            "catchups_completed", "Primary: backups caught up and proposed for the sync set"
        )
        self.snapshots_sent = self._counter("snapshots_sent", "Primary: snapshots sent")
        self.damaged_log_records = self._counter(
            "damaged_log_records",
            "Primary: records of its log that failed their checksum when read for a backup "
            "(the disk changed them): dropped from the log, the backup gets a snapshot",
        )
        self.snapshots_installed = self._counter(
            "snapshots_installed", "Backup: snapshots installed"
        )
        self.rewinds = self._counter("rewinds", "Backup: rewinds of its log")
        self.rewound_records = self._counter(
            "rewound_records", "Backup: records removed by rewinds (kept in rollback files)"
        )
        self.campaigns = self._counter("campaigns", "Elections this node stood in")
        self.elections_won = self._counter("elections_won", "Elections this node won")
        self.sync_set_changes = self._counter(
            "sync_set_changes", "Primary: sync set changes sealed"
        )
        self.storage_faults = self._counter(
            "storage_faults", "Times this node's disk began to refuse writes"
        )
        self.role_changes = Counter(
            "chat_role_changes",
            "Times this node took a role",
            ["role"],
            registry=registry,
        )
        for role in ROLES:
            self.role_changes.labels(role)
        # The core's log events that are also counted (state.py emits them as ``Log``).
        self._events: dict[str, tuple[Counter, ...]] = {
            "catch-up start": (self.catchups_started,),
            "catch-up end": (self.catchups_completed,),
            "campaign": (self.campaigns,),
            "became primary": (self.elections_won, self.role_changes.labels("primary")),
            "became backup": (self.role_changes.labels("backup"),),
            "became electing": (self.role_changes.labels("electing"),),
            "sync set changed": (self.sync_set_changes,),
        }
        # (seq, when sealed) of records not yet acknowledged, oldest first.
        self._sealed: deque[tuple[int, float]] = deque()
        self._sampler: Callable[[], NodeSample] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        registry.register(StateCollector(self.read_state))

    def _counter(self, name: str, doc: str) -> Counter:
        return Counter(f"chat_{name}", doc, registry=self.registry)

    # ---- events (the event loop, except fsyncs) ---------------------------------------

    def logged(self, event: str) -> None:
        for counter in self._events.get(event, ()):
            counter.inc()

    def timed(self, sync: Callable[P, T]) -> Callable[P, T]:
        """``sync``, observed in ``chat_fsync_seconds`` (thread-safe: the group sync
        thread calls it)."""

        def timed_sync(*args: P.args, **kwargs: P.kwargs) -> T:
            started = time.perf_counter()
            try:
                return sync(*args, **kwargs)
            finally:
                self.fsync_seconds.observe(time.perf_counter() - started)

        return timed_sync

    def sealed(self, seq: int, writes: int) -> None:
        """The primary sealed a record of ``writes`` client writes at ``seq``."""
        self.batch_writes.observe(writes)
        self._sealed.append((seq, time.monotonic()))

    def acknowledged(self, seq: int) -> None:
        """Every record up to ``seq`` is durable on every member."""
        now = time.monotonic()
        while self._sealed and self._sealed[0][0] <= seq:
            self.ack_seconds.observe(now - self._sealed.popleft()[1])

    def forget_sealed(self) -> None:
        """A new term as primary: records sealed in an earlier one are not timed."""
        self._sealed.clear()

    def rewound(self, removed: int) -> None:
        self.rewinds.inc()
        self.rewound_records.inc(removed)

    # ---- state --------------------------------------------------------------------------

    def watch(self, sampler: Callable[[], NodeSample]) -> None:
        """Read the gauges with ``sampler``, on the event loop that ``serve`` runs on."""
        self._sampler = sampler

    def read_state(self) -> NodeSample | None:
        """A sample taken on the event loop, from a scrape's thread; None if it
        does not answer in time (or nothing is watched)."""
        loop, sampler = self._loop, self._sampler
        if loop is None or sampler is None:
            return None

        async def take() -> NodeSample:
            return sampler()

        try:
            future = asyncio.run_coroutine_threadsafe(take(), loop)
        except RuntimeError:
            return None  # the loop closed: the node is stopping
        try:
            return future.result(self.state_timeout)
        except TimeoutError:
            future.cancel()
        except Exception:
            log.exception("metrics state not read")
        return None

    # ---- serving ------------------------------------------------------------------------

    async def serve(self, endpoint: tuple[str, int], retry: float = BIND_RETRY) -> None:
        """Serve ``/metrics`` at ``endpoint``; until it can be bound, try again
        every ``retry`` seconds."""
        self._loop = asyncio.get_running_loop()
        host, port = endpoint
        address = f"{host}:{port}"
        refused = False
        while self._httpd is None:
            try:
                self._httpd, self._thread = prometheus_client.start_http_server(
                    port, host, self.registry
                )
            except OSError as exc:
                if not refused:
                    log.warning(
                        'metrics not served address=%s why="%s" retry_every=%s',
                        address,
                        exc.strerror or exc,
                        retry,
                    )
                refused = True
                await asyncio.sleep(retry)
        log.info("metrics served address=%s", address)

    async def close(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            await asyncio.to_thread(httpd.shutdown)  # waits for its poll loop (0.5 s)
            httpd.server_close()
