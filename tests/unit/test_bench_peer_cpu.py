"""ops.bench.peer_cpu: the peer's CPU per transaction, against real processes.

A stand-in for the peers' pg_bench.py starts, for each client count, a busy process
named ``pgbench`` and an idle one named ``postgres`` (the names the tool watches, set
with prctl), and prints pg_bench.py's result lines."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from ops.bench import peer_cpu

FAKE_PG_BENCH = textwrap.dedent(
    """
    import argparse, subprocess, sys
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps"); parser.add_argument("--configs")
    parser.add_argument("--no-failover", action="store_true")
    parser.add_argument("--secs", type=float); parser.add_argument("--clients")
    args = parser.parse_args()
    named = (
        "import ctypes, sys, time; ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0);"
        "end = time.monotonic() + float(sys.argv[2]);"
        "busy = sys.argv[1] == 'pgbench'\\n"
        "while time.monotonic() < end:\\n"
        "    busy or time.sleep(0.01)"
    )
    for clients in args.clients.split(","):
        procs = [
            subprocess.Popen([sys.executable, "-c", named, name, str(args.secs)])
            for name in ("postgres", "pgbench")
        ]
        for proc in procs:
            proc.wait()
        print(f"rep 1 sync2_on            clients {int(clients):2d}: tps {1000 * int(clients):8d}"
              " avg   0.81 ms p50   0.77 ms p99   1.60 ms", flush=True)
    """
)


@pytest.fixture
def fake_pg_bench(tmp_path: Path) -> Path:
    path = tmp_path / "pg_bench.py"
    path.write_text(FAKE_PG_BENCH)
    return path


def test_each_run_counts_the_cpu_of_the_peers_processes_in_its_window(
    fake_pg_bench: Path,
) -> None:
    command = [sys.executable, str(fake_pg_bench), "--reps", "1", "--configs", "sync2_on"]
    command += ["--no-failover", "--secs", "2", "--clients", "1,2"]
    # The stand-in's runs follow each other at once (the peer's truncate and checkpoint
    # first): the tool tells them apart by pid, not by a gap between them.
    used, output = peer_cpu.measure(command, [1, 2], secs=2.0, settle=0.5)
    assert peer_cpu.tps_of(output) == {1: 1000.0, 2: 2000.0}
    for clients in (1, 2):
        window = used[clients]
        assert window["seconds"] == pytest.approx(1.0)
        # The busy one ran the whole window on a core of its own or shared one; the
        # idle one hardly ran.
        assert window["pgbench"] > 0.2, window
        assert window["postgres"] < window["pgbench"] / 4, window
    per = peer_cpu.per_transaction(used[2], 2000.0)
    assert per["all"] == pytest.approx(per["postgres"] + per["pgbench"])
    assert per["pgbench"] == pytest.approx(1e6 * used[2]["pgbench"] / 2000.0)


def test_a_peer_that_ends_before_its_runs_says_why(tmp_path: Path) -> None:
    script = tmp_path / "broken.py"
    script.write_text("import sys; print('no PostgreSQL here'); sys.exit(3)")
    with pytest.raises(
        RuntimeError, match=r"ended \(3\) before .*broken.py's run of 1 clients:\nno PostgreSQL"
    ):
        peer_cpu.measure([sys.executable, str(script)], [1], secs=1.0, settle=0.25)


def test_a_peer_that_never_runs_pgbench_is_stopped_as_by_ctrl_c(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    interrupted = tmp_path / "interrupted"
    script = tmp_path / "stuck.py"
    script.write_text(
        "import time\n"
        "try:\n    time.sleep(5)\n"
        f"except KeyboardInterrupt:\n    open({str(interrupted)!r}, 'w').close()\n"
    )
    monkeypatch.setattr(peer_cpu, "APPEAR_TIMEOUT", 1.0)
    with pytest.raises(
        TimeoutError,
        match=r"timed out after 1.0s waiting for a pgbench process for .*stuck.py's run of 1 ",
    ):
        peer_cpu.measure([sys.executable, str(script)], [1], secs=1.0, settle=0.25)
    # Waited for, and ended by the interrupt rather than by its own time.
    assert interrupted.exists()


def test_a_window_needs_seconds_beyond_the_settling() -> None:
    with pytest.raises(ValueError, match="more than twice settle"):
        peer_cpu.measure([sys.executable, "-c", "pass"], [1], secs=1.0, settle=0.5)
