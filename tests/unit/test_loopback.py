"""Each run of the tests on a loopback block and nft table of its own
(tests/helpers/loopback.py): two runs at once must never share them, and a run
that ends, however it ends, must free its block."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import loopback

ROOT = Path(__file__).resolve().parents[2]
# Another run: claims its block, says which, and holds it until its stdin closes.
OTHER_RUN = (
    "import sys; from tests.helpers import loopback;"
    "print(loopback.block(), loopback.address(30), loopback.table(), flush=True);"
    "sys.stdin.read()"
)


def _other_run() -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", OTHER_RUN],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _claim(run: subprocess.Popen[str]) -> list[str]:
    assert run.stdout is not None
    line = run.stdout.readline()
    assert line, f"the other run claimed no block (exit {run.poll()})"
    return line.split()


def test_runs_at_once_get_blocks_addresses_and_tables_of_their_own() -> None:
    mine = loopback.block()
    first, second = _other_run(), _other_run()
    try:
        claims = [_claim(first), _claim(second)]
    finally:
        for run in (first, second):
            run.communicate("")
    blocks = {mine, *(int(claim[0]) for claim in claims)}
    assert len(blocks) == 3, f"two runs share a block: this one {mine}, the others {claims}"
    for number, address, table in claims:
        assert address == f"127.{number}.0.30"
        assert table == f"chatcut_{number}"
    assert loopback.address(30) not in {claim[1] for claim in claims}


def test_a_run_that_was_killed_frees_its_block() -> None:
    loopback.block()  # this run's, held throughout
    killed = _other_run()
    number = _claim(killed)[0]
    killed.kill()
    killed.communicate()
    after = _other_run()
    try:
        assert _claim(after)[0] == number, "the killed run's block stayed taken"
    finally:
        after.communicate("")
