"""A node's metrics (``service/metrics.py``): the setting, the counters, the gauges
of a state sample, and serving them over real HTTP from an event loop.

The node process itself, scraped while it works and while its disk is full, is
``tests/cluster/test_metrics.py``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ops.cluster.ports import LOOPBACK, free_port
from ops.cluster.scrape import Scrape, scrape
from service.config import load
from service.errors import InvalidInput
from service.metrics import Metrics, NodeSample, StateCollector
from service.replication.verify import Outcome

NODES = "1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003"


def config_with(tmp_path: Path, **settings: str) -> dict[str, str]:
    return {"node_id": "1", "data_dir": str(tmp_path), "nodes": NODES, **settings}


def test_metrics_are_off_by_default_and_served_where_the_setting_says(tmp_path: Path) -> None:
    assert load(None, config_with(tmp_path)).metrics_endpoint is None
    config = load(None, config_with(tmp_path, metrics_address="127.0.0.1:9101"))
    assert config.metrics_endpoint == ("127.0.0.1", 9101)
    ipv6 = load(None, config_with(tmp_path, metrics_address="[::1]:9101"))
    assert ipv6.metrics_endpoint == ("::1", 9101)
    ini = tmp_path / "node.conf"
    ini.write_text(
        f"[node]\nnode_id = 2\ndata_dir = d\nnodes = {NODES}\nmetrics_address = 0.0.0.0:9102\n"
    )
    assert load(ini, {}).metrics_endpoint == ("0.0.0.0", 9102)


@pytest.mark.parametrize(
    ("address", "complaint"),
    [
        pytest.param("9101", "metrics_address: not a HOST:PORT", id="no-host"),
        pytest.param("127.0.0.1:http", "metrics_address: not a HOST:PORT", id="port-not-a-number"),
        pytest.param("127.0.0.1:70000", "metrics_address: not a HOST:PORT", id="port-too-large"),
        pytest.param("127.0.0.1:7002", "is a node's address", id="a-nodes-port"),
    ],
)
def test_a_bad_metrics_address_is_refused_with_one_clear_error(
    tmp_path: Path, address: str, complaint: str
) -> None:
    with pytest.raises(InvalidInput, match=complaint):
        load(None, config_with(tmp_path, metrics_address=address))


def scraped(metrics: Metrics) -> Scrape:
    text = generate_latest(metrics.registry).decode()
    return Scrape(tuple(s for f in text_string_to_metric_families(text) for s in f.samples))


def test_log_events_of_the_core_count_elections_catch_ups_and_role_changes() -> None:
    metrics = Metrics()
    for event in ("campaign", "became primary", "catch-up start", "catch-up end", "no such"):
        metrics.logged(event)
    metrics.logged("became electing")
    metrics.logged("became backup")
    metrics.logged("became electing")
    seen = scraped(metrics)
    assert seen.value("chat_campaigns_total") == 1
    assert seen.value("chat_elections_won_total") == 1
    assert seen.value("chat_catchups_started_total") == 1
    assert seen.value("chat_catchups_completed_total") == 1
    assert seen.by_label("chat_role_changes_total", "role") == {
        "primary": 1,
        "backup": 1,
        "electing": 2,
    }
    assert not any(name.endswith("_created") for name in seen.names)


def test_acknowledgement_latency_is_timed_per_record_from_its_seal() -> None:
    metrics = Metrics()
    metrics.sealed(5, writes=3)
    metrics.sealed(6, writes=1)
    metrics.sealed(7, writes=0)  # a sync set change alone
    metrics.acknowledged(6)
    seen = scraped(metrics)
    assert seen.value("chat_ack_latency_seconds_count") == 2
    assert seen.value("chat_batch_writes_count") == 3
    assert seen.value("chat_batch_writes_sum") == 4
    assert seen.value("chat_batch_writes_bucket", le="1.0") == 2
    # A new term as primary: what the old one sealed is never timed.
    metrics.forget_sealed()
    metrics.acknowledged(7)
    assert scraped(metrics).value("chat_ack_latency_seconds_count") == 2


def test_a_timed_sync_is_observed_even_when_it_fails() -> None:
    metrics = Metrics()

    def sync(checkpoint: bool = True) -> bool:
        if not checkpoint:
            raise OSError("I/O error")
        return True

    timed = metrics.timed(sync)
    assert timed() is True
    with pytest.raises(OSError, match="I/O error"):
        timed(checkpoint=False)
    assert scraped(metrics).value("chat_fsync_seconds_count") == 2


def sample(**changes: object) -> NodeSample:
    fields: dict[str, object] = {
        "node_id": 1,
        "nodes": (1, 2, 3),
        "role": "primary",
        "epoch": 4,
        "primary": 1,
        "seq": 120,
        "durable_seq": 118,
        "sync_set": (1, 2),
        "sync_set_version": 9,
        "in_sync": (1, 2),
        "acknowledged_seq": 117,
        "lag": {2: 3},
        "links": (2,),
        "writes": 300,
        "reads": 40,
        "batches": 50,
        "clients": 7,
    }
    fields.update(changes)
    return NodeSample(**fields)  # type: ignore[arg-type]


def collected(state: NodeSample | None) -> Scrape:
    metrics = Metrics()
    metrics.registry.register(StateCollector(lambda: state))
    return scraped(metrics)


def test_a_primarys_state_becomes_gauges() -> None:
    seen = collected(sample())
    assert seen.by_label("chat_role", "role") == {"primary": 1, "backup": 0, "electing": 0}
    assert seen.value("chat_seq") == 120
    assert seen.get("chat_confirmed") is None, "a backup's to tell"
    assert seen.value("chat_durable_seq") == 118
    assert seen.value("chat_acknowledged_seq") == 117
    assert seen.value("chat_sync_set_size") == 2
    assert seen.value("chat_sync_set_version") == 9
    assert seen.by_label("chat_sync_set_member", "node") == {"1": 1, "2": 1, "3": 0}
    assert seen.by_label("chat_backup_lag_records", "backup") == {"2": 3}
    assert seen.by_label("chat_peer_link_up", "peer") == {"2": 1, "3": 0}
    assert seen.value("chat_client_writes_total") == 300
    assert seen.value("chat_client_reads_total") == 40
    assert seen.value("chat_batches_total") == 50
    assert seen.value("chat_clients") == 7
    assert seen.value("chat_storage_fault") == 0
    assert seen.get("chat_data_dir_free_bytes") is None, "unknown: not made up"
    assert seen.get("chat_wal_bytes") is None, "unknown: not made up"
    assert seen.value("chat_checkpoint_failures_total") == 0
    assert seen.value("chat_database_unproven") == 0
    assert seen.value("chat_checksum_mismatches_total") == 0
    # No comparison completed yet: no verdict, rather than a made-up one.
    assert seen.get("chat_checksums_agreed") is None


def test_storage_health_and_a_checksum_mismatch_become_gauges() -> None:
    differ = Outcome(seq=300, nodes=(1, 2, 3), agreed=False, damaged=(3,), at=1.7e9)
    seen = collected(
        sample(
            role="electing",
            primary=None,
            in_sync=None,
            acknowledged_seq=None,
            lag={},
            storage_fault=True,
            data_dir_free=5_000_000,
            database_bytes=7_000_000,
            wal_bytes=900_000_000,
            checkpoint_failures=12,
            unproven=True,
            waiting_for=(2, 3),
            checksums=differ,
            checksum_rounds=4,
            checksum_mismatches=1,
        )
    )
    assert seen.value("chat_role", role="electing") == 1
    assert seen.value("chat_primary_id") == 0
    assert seen.get("chat_acknowledged_seq") is None
    assert seen.get("chat_in_sync_size") is None
    assert seen.value("chat_storage_fault") == 1
    assert seen.value("chat_data_dir_free_bytes") == 5_000_000
    # No room for a copy of the database: what an alert compares.
    assert seen.value("chat_database_bytes") == 7_000_000
    # Checkpoints refused: the WAL grows (the commits still go through).
    assert seen.value("chat_wal_bytes") == 900_000_000
    assert seen.value("chat_checkpoint_failures_total") == 12
    assert seen.get("chat_snapshots_waiting") is None, "a primary's to tell"
    assert seen.value("chat_database_unproven") == 1
    assert seen.value("chat_waiting_for_members") == 2
    assert seen.value("chat_checksums_agreed") == 0
    assert seen.value("chat_checksums_damaged_nodes") == 1
    assert seen.value("chat_checksums_seq") == 300
    assert seen.value("chat_checksum_rounds_total") == 4
    assert seen.value("chat_checksum_mismatches_total") == 1


def test_a_state_that_cannot_be_read_is_said_so_and_the_events_remain() -> None:
    seen = collected(None)
    assert seen.value("chat_state_available") == 0
    assert seen.get("chat_role", role="primary") is None
    assert seen.get("chat_fsync_seconds_count") == 0


def test_metrics_are_served_over_http_with_the_state_read_on_the_event_loop() -> None:
    address = (LOOPBACK, free_port())
    threads: list[threading.Thread] = []

    def sampler() -> NodeSample:
        threads.append(threading.current_thread())
        return sample()

    async def scenario() -> tuple[Scrape | None, Scrape | None]:
        metrics = Metrics(state_timeout=0.2)
        metrics.watch(sampler)
        serving = asyncio.get_running_loop().create_task(metrics.serve(address))
        try:
            await serving
            seen = await asyncio.to_thread(scrape, f"{LOOPBACK}:{address[1]}")
            # A scrape while the loop is busy (here: blocked on that very scrape)
            # gets no state after the timeout, instead of hanging.
            busy = scrape(f"{LOOPBACK}:{address[1]}")
        finally:
            await metrics.close()
        return seen, busy

    seen, busy = asyncio.run(scenario())
    assert seen is not None
    assert seen.value("chat_state_available") == 1
    assert seen.value("chat_role", role="primary") == 1
    assert "process_open_fds" in seen.names
    assert set(threads) == {threading.main_thread()}
    assert busy is not None
    assert busy.value("chat_state_available") == 0
    assert scrape(f"{LOOPBACK}:{address[1]}", timeout=0.5) is None, "closed with the node"


def test_a_taken_port_leaves_the_node_without_metrics_until_it_is_free(
    caplog: pytest.LogCaptureFixture,
) -> None:
    holder = socket.socket()
    holder.bind((LOOPBACK, 0))
    holder.listen()
    port = holder.getsockname()[1]

    async def scenario() -> Scrape | None:
        metrics = Metrics()
        metrics.watch(sample)
        serving = asyncio.get_running_loop().create_task(metrics.serve((LOOPBACK, port), 0.05))
        try:
            async with asyncio.timeout(10.0):  # a poll with a deadline
                while "metrics not served" not in caplog.text:
                    await asyncio.sleep(0.01)
            assert not serving.done()
            holder.close()
            await asyncio.wait_for(serving, 10.0)
            return await asyncio.to_thread(scrape, f"{LOOPBACK}:{port}")
        finally:
            serving.cancel()
            await metrics.close()

    with caplog.at_level(logging.INFO, logger="service.metrics"):
        seen = asyncio.run(scenario())
    assert seen is not None
    assert seen.value("chat_role", role="primary") == 1
    warnings = [r for r in caplog.records if "metrics not served" in r.getMessage()]
    assert len(warnings) == 1, "one line, however many retries"
    assert f"address={LOOPBACK}:{port}" in warnings[0].getMessage()
    assert "metrics served" in caplog.text
