"""An account's send and write rates (service/writerate.py): the bucket, its refill,
its memory, the settings that size it, and which writes count against which."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from service.chat import NO_SESSION, UNKNOWN_SESSION, ChatApplication
from service.config import load
from service.errors import InvalidInput
from service.protocol import WRITE_OPS
from service.writerate import MAX_WAIT, SWEEP_EVERY, WriteRate
from tests.unit.test_ratelimit import node_conf


class Clock:
    """The limiter's clock, moved by hand: refills are exact, not timed."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_then_one_send_per_refill() -> None:
    clock = Clock()
    rate = WriteRate(rate=2.0, burst=3, clock=clock)
    assert [rate.take("alice") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert rate.take("alice") == pytest.approx(0.5)  # one send every 1/rate s
    assert rate.refused == 1
    clock.now += 0.5  # the one told to wait comes back: its token is there
    assert rate.take("alice") == 0.0
    assert rate.take("alice") == pytest.approx(0.5)
    clock.now += 0.25
    assert rate.take("alice") == pytest.approx(0.75)  # in line behind the one before
    clock.now += 0.25
    assert rate.take("alice") == 0.0  # that one's token: whoever comes first takes it
    clock.now += 3600  # a long pause refills the burst, never more, and ends the line
    assert [rate.take("alice") for _ in range(4)][-1] == pytest.approx(0.5)


def test_writes_refused_together_are_told_a_time_each() -> None:
    """Many writes at once past the burst: each is told the time of its own token,
    in turn, so that coming back as told they get in one by one."""
    clock = Clock()
    rate = WriteRate(rate=4.0, burst=2, clock=clock)
    assert rate.take("bot") == rate.take("bot") == 0.0
    waits = [rate.take("bot") for _ in range(6)]
    assert waits == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.25, 1.5])
    for wait in waits:  # each comes back at its time, and gets in
        clock.now = 1000.0 + wait
        assert rate.take("bot") == 0.0
    assert rate.take("bot") == pytest.approx(0.25)  # the line is empty again


def test_writes_refused_apart_are_told_the_tokens_after_the_line() -> None:
    """Refusals at different times: each is told the first token not promised to one
    refused before it, whenever it came."""
    clock = Clock()
    rate = WriteRate(rate=10.0, burst=1, clock=clock)
    assert rate.take("bot") == 0.0
    told = []
    for at in (0.0, 0.05, 0.09):
        clock.now = 1000.0 + at
        told.append(at + rate.take("bot"))
    assert told == pytest.approx([0.1, 0.2, 0.3])


def test_a_line_reaches_at_most_max_wait_ahead() -> None:
    """A client that never waits is told ever later times, up to ``MAX_WAIT``; once
    the line's time has passed, a refusal is told the next token again."""
    clock = Clock()
    rate = WriteRate(rate=10.0, burst=1, clock=clock)
    assert rate.take("flood") == 0.0
    waits = [rate.take("flood") for _ in range(5_000)]
    assert waits[0] == pytest.approx(0.1)
    assert max(waits) == pytest.approx(MAX_WAIT)
    clock.now += MAX_WAIT  # the whole line has had its time
    assert rate.take("flood") == 0.0
    assert rate.take("flood") == pytest.approx(0.1)


def test_a_slow_rate_is_never_told_to_come_back_before_its_token() -> None:
    """One write a hundred seconds: the wait is the token's, past ``MAX_WAIT``."""
    clock = Clock()
    rate = WriteRate(rate=0.01, burst=1, clock=clock)
    assert rate.take("slow") == 0.0
    assert rate.take("slow") == pytest.approx(100.0)


def test_accounts_have_buckets_of_their_own() -> None:
    clock = Clock()
    rate = WriteRate(rate=1.0, burst=2, clock=clock)
    assert rate.take("mallory") == rate.take("mallory") == 0.0
    assert rate.take("mallory") > 0
    assert rate.take("alice") == rate.take("alice") == 0.0


def test_a_send_given_back_can_be_sent_again() -> None:
    clock = Clock()
    rate = WriteRate(rate=1.0, burst=1, clock=clock)
    assert rate.take(7) == 0.0
    rate.give_back(7)  # its write was refused after all (a full queue)
    assert rate.take(7) == 0.0
    assert rate.take(7) > 0
    rate.give_back(8)  # an account that never sent: nothing to give back
    rate.give_back(7)
    rate.give_back(7)  # never more than the burst
    assert rate.take(7) == 0.0
    assert rate.take(7) > 0


def test_no_limit_at_rate_zero() -> None:
    rate = WriteRate(rate=0.0, burst=1, clock=Clock())
    assert all(rate.take("bot") == 0.0 for _ in range(10_000))
    assert len(rate) == 0


def test_accounts_whose_bucket_filled_again_are_forgotten() -> None:
    clock = Clock()
    rate = WriteRate(rate=10.0, burst=5, clock=clock)
    for account in range(SWEEP_EVERY - 1):
        rate.take(account)
    assert len(rate) == SWEEP_EVERY - 1
    clock.now += 0.5  # every bucket full again
    rate.take("last")  # the sweep's turn
    assert len(rate) == 1


def test_random_sends_against_a_model() -> None:
    """The bucket against its definition: tokens = min(burst, tokens + elapsed * rate);
    a refusal is told the later of its next token and one token after the time told
    the refusal before (that one at most ``MAX_WAIT`` ahead)."""
    rng = random.Random(7)
    clock = Clock()
    rate = WriteRate(rate=3.0, burst=4, clock=clock)
    tokens = {key: 4.0 for key in "abc"}
    told = {key: float("-inf") for key in "abc"}
    last = {key: clock.now for key in "abc"}
    for _ in range(20_000):
        clock.now += rng.choice([0.0, 0.0, 0.01, 0.1, 0.4, 2.0])
        key = rng.choice("abc")
        have = min(4.0, tokens[key] + (clock.now - last[key]) * 3.0)
        wait = rate.take(key)
        last[key] = clock.now
        if have >= 1.0:
            assert wait == 0.0
            tokens[key] = have - 1.0
        else:
            own = (1.0 - have) / 3.0
            after = min(told[key] + 1 / 3.0 - clock.now, MAX_WAIT)
            assert wait == pytest.approx(max(own, after))
            tokens[key], told[key] = have, clock.now + wait


def test_the_rate_settings(tmp_path: Path) -> None:
    defaults = load(node_conf(tmp_path), {})
    assert (defaults.send_rate, defaults.send_burst) == (10.0, 50)
    assert (defaults.write_rate, defaults.write_burst) == (20.0, 100)
    config = load(node_conf(tmp_path, send_rate=0.5, send_burst=3), {})
    assert (config.send_rate, config.send_burst) == (0.5, 3)
    assert load(node_conf(tmp_path, send_rate=0), {}).send_rate == 0.0
    config = load(node_conf(tmp_path, write_rate=2.5, write_burst=7), {})
    assert (config.write_rate, config.write_burst) == (2.5, 7)
    assert load(node_conf(tmp_path, write_rate=0), {}).write_rate == 0.0


@pytest.mark.parametrize(
    "setting",
    [
        {"send_rate": -1},
        {"send_rate": "nan"},
        {"send_rate": "inf"},
        {"send_rate": "fast"},
        {"send_burst": 0},
        {"send_burst": 1.5},
        {"write_rate": -1},
        {"write_rate": "inf"},
        {"write_burst": 0},
        {"write_burst": 2.5},
    ],
)
def test_bad_rate_settings_are_refused(tmp_path: Path, setting: dict[str, object]) -> None:
    with pytest.raises(InvalidInput):
        load(node_conf(tmp_path, **setting), {})


def test_which_writes_count_against_which_rate() -> None:
    """A session's sends against its send rate, its other writes against its write
    rate, but for those that end it (each once: bounded by the logins before them);
    writes without an account (register, login, a token naming no session) against
    neither: their password hashing, or their batch's refusal, bounds them."""
    app = ChatApplication(request_retention=3600.0)
    assert app.rate_kind("send", 7) == "send"
    for op in ("touch", "mark_read", "delete_messages"):
        assert app.rate_kind(op, 7) == "write", op
    for op in ("logout", "delete_account"):
        assert app.rate_kind(op, 7) is None, op
    assert {"send", "touch", "mark_read", "delete_messages"} | {
        "logout",
        "delete_account",
        "register",
        "login",
    } == WRITE_OPS, "a new write: say which rate it counts against"
    for op in sorted(WRITE_OPS):
        assert app.rate_kind(op, NO_SESSION) is None, op
        assert app.rate_kind(op, UNKNOWN_SESSION) is None, op
