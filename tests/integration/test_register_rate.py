"""How many accounts one client address may register (``register_rate``,
``register_burst``: service/ratelimit.py) on real nodes, and with ``chatctl``.

Each account may send ``send_rate`` messages a second, so an address that could
register accounts as fast as passwords hash (two a second, its share of the
hashing) multiplied its rate by as many accounts as it made. A cluster whose
addresses may register three accounts at once and then one every 5 s: the
fourth registration from 127.0.0.1 is answered ``busy`` with the time to wait,
before any hash, and stores nothing; ``chatctl register`` from the same address
is refused too, waits what it is told (behind the fourth's, in line), and gets
its account; a retry of a registration already made (same request id) is
answered from its stored result, never refused; 127.0.0.2 registers at once (a
bucket of its own). The primary counts the refusals in
``chat_registers_refused_rate_total`` and its log names the address.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ops.cluster.scrape import scrape
from service import protocol
from service.client import Client
from tests.conftest import ClusterFactory
from tests.helpers.workload import run, start_cluster
from tests.integration.test_bad_input import Raw
from tests.integration.test_client_cli import PASSWORD, User

pytestmark = pytest.mark.cluster

RATE = 0.2
BURST = 3


async def register(
    address: str, names: list[str], source: str = "127.0.0.1"
) -> list[protocol.Frame]:
    """Register ``names`` one after the other on one connection from ``source``."""
    raw = await Raw.client(address, source)
    try:
        answers: list[protocol.Frame] = []
        for name in names:
            args = {"username": name, "password": PASSWORD}
            raw.send(protocol.request("register", f"register-{name}", args, None))
            answer = await raw.next_frame(timeout=30.0)
            assert answer is not None, f"the node closed the connection after {answers}"
            answers.append(answer)
        return answers
    finally:
        raw.close()


async def names_like(servers: list[str], user: str, pattern: str) -> list[str]:
    async with Client(servers) as client:
        await client.login(user, PASSWORD)
        found = await client.search(pattern)
    return sorted(str(name) for name in found["users"])


def test_an_address_past_its_register_rate_is_answered_busy_and_nothing_is_stored(
    cluster_factory: ClusterFactory, tmp_path: Path
) -> None:
    cluster = cluster_factory(register_rate=RATE, register_burst=BURST, metrics=True)
    primary = start_cluster(cluster)
    assert primary.metrics_address is not None

    # u1 once more at the end: a retry (same request id) of a registration that was
    # made, its reply lost, made while the bucket is empty.
    started = time.monotonic()
    answers = run(register(primary.address, ["u1", "u2", "u3", "u4", "u1"]))
    took = time.monotonic() - started
    assert [a["type"] for a in answers[:BURST]] == ["reply"] * BURST, answers
    refused = answers[BURST]
    assert refused["type"] == "error", refused
    assert refused["code"] == "busy", refused
    assert "register_rate" in refused["message"], refused
    # The bucket refills from its first token taken (u1's): the next comes 1/RATE s
    # after that, less the time the three registrations took.
    assert 1 / RATE - took - 0.05 <= refused["retry_after"] <= 1 / RATE + 0.01, (took, refused)
    # The retry makes no account: it is answered from the stored result, not refused.
    assert answers[BURST + 1] == answers[0], answers

    # chatctl, from the same address before that token (it starts in about a
    # second), is refused too, told a time behind u4's in line, waits it, and
    # registers.
    out = User(tmp_path, "u5", cluster.servers).ok(
        "register", "u5", "--timeout", "30", CHATCTL_PASSWORD=PASSWORD
    )
    assert out.startswith("registered u5"), out
    scraped = scrape(primary.metrics_address)
    assert scraped is not None, "the primary serves no metrics"
    assert scraped.value("chat_registers_refused_rate_total") >= 2, (
        "chatctl's register was never refused: it came 5 s after u4's, or the limit let it in"
    )
    assert "register refused: address past register_rate" in primary.log_text()
    assert "address=127.0.0.1" in primary.log_text()

    # Another address has a bucket of its own, full.
    (other,) = run(register(primary.address, ["v1"], source="127.0.0.2"))
    assert other["type"] == "reply", other

    # Nothing of the refused registration was stored.
    assert run(names_like(cluster.servers, "v1", "u*")) == ["u1", "u2", "u3", "u5"]


def test_a_registration_the_hashing_refused_gives_its_token_back(
    cluster_factory: ClusterFactory,
) -> None:
    """Two registrations pipelined from one address into a pool of one hashing
    thread and one waiting place, of which an address holds one: the second is
    refused ``busy`` by the hashing, before anything is done, and gives back the
    token it took. So with a burst of two, a third registration after the first
    gets in; had the refused one kept its token, the third would be refused
    ``register_rate``."""
    cluster = cluster_factory(
        register_rate=0.001, register_burst=2, hash_workers=1, hash_queue=1, scrypt_n=2**14
    )
    primary = start_cluster(cluster)
    frames = [
        protocol.request("register", f"r-{name}", {"username": name, "password": PASSWORD}, None)
        for name in ("w1", "w2")
    ]
    answers = run(Raw.pipelined(primary.address, frames))
    by_id = {str(a["request_id"]): a for a in answers}
    assert by_id["r-w1"]["type"] == "reply", answers
    assert by_id["r-w2"]["code"] == "busy", answers
    assert "register_rate" not in by_id["r-w2"]["message"], answers
    (third,) = run(register(primary.address, ["w3"]))
    assert third["type"] == "reply", third
    (fourth,) = run(register(primary.address, ["w4"]))
    assert fourth["code"] == "busy", fourth
    assert "register_rate" in fourth["message"], fourth
