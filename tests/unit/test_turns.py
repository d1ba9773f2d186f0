"""The budget of client frames per turn of the event loop (service/turns.py).

``await asyncio.sleep(0)`` here is not a wait for some state: it is exactly one
turn of the loop, the unit the budget counts in (the refill is a ``call_soon``).
"""

from __future__ import annotations

import asyncio

from service.turns import TurnBudget


class Held:
    """A connection holding ``frames`` frames: it takes what the budget gives."""

    def __init__(
        self, budget: TurnBudget, name: str, frames: int, log: list[str], size: int = 100
    ) -> None:
        self.budget, self.name, self.frames, self.log = budget, name, frames, log
        self.size = size

    def hand_on(self) -> None:
        while self.frames:
            if not self.budget.take():
                self.budget.wait(self)
                return
            self.budget.spend(self.size)
            self.handed()

    def handed(self) -> None:
        self.frames -= 1
        self.log.append(self.name)

    def go_on(self) -> None:
        # As peer.FrameFeed: one frame from the line, then back into it if more wait.
        if not self.budget.take():
            self.budget.wait(self)
            return
        self.budget.spend(self.size)
        self.handed()
        if self.frames:
            self.budget.wait(self)


def test_a_turn_hands_on_at_most_its_budget_and_the_rest_waits_in_line() -> None:
    async def main() -> list[list[str]]:
        budget = TurnBudget(frames_per_turn=3)
        log: list[str] = []
        turns = []
        for name, frames in (("a", 4), ("b", 2), ("c", 1)):
            Held(budget, name, frames, log).hand_on()
        for _ in range(4):
            turns.append(log[:])
            log.clear()
            await asyncio.sleep(0)
        return turns

    # a took the first turn's three and waits; b and c wait behind it. Next turn the
    # line hands on one frame each, in turns: a its last, b one (and back into the
    # line), c its one; then b's last. Nothing is lost, each one's frames in order.
    assert asyncio.run(main()) == [["a", "a", "a"], ["a", "b", "c"], ["b"], []]


def test_frames_taken_back_count_again_and_a_quiet_budget_schedules_nothing() -> None:
    async def main() -> None:
        budget = TurnBudget(frames_per_turn=2)
        assert budget.take()
        budget.give_back()
        assert budget.left == 2
        assert budget.take()
        assert budget.take()
        assert not budget.take()  # out: the next turn refills
        await asyncio.sleep(0)
        assert budget.left == 2
        await asyncio.sleep(0)
        assert budget._refill is None  # nobody waits, nothing ran out: no callback

    asyncio.run(main())


def test_large_frames_end_a_turn_by_their_bytes_and_one_always_goes() -> None:
    async def main() -> list[list[str]]:
        budget = TurnBudget(frames_per_turn=100, bytes_per_turn=1000)
        log: list[str] = []
        turns = []
        # Frames of 400 bytes: two take 800, a third goes while bytes are left (the
        # turn ends past the budget, by less than a frame); b's frame, larger than a
        # whole turn's bytes, goes while any are left and ends that turn; c's after.
        Held(budget, "a", 4, log, size=400).hand_on()
        Held(budget, "b", 1, log, size=5000).hand_on()
        Held(budget, "c", 3, log, size=10).hand_on()
        for _ in range(4):
            turns.append(log[:])
            log.clear()
            await asyncio.sleep(0)
        return turns

    assert asyncio.run(main()) == [["a", "a", "a"], ["a", "b"], ["c", "c", "c"], []]


class Answering(Held):
    """A connection whose frames each schedule their answer (a request's task)."""

    def handed(self) -> None:
        super().handed()
        asyncio.get_running_loop().call_soon(self.log.append, self.name.upper())


def test_what_a_turns_frames_schedule_runs_before_the_next_turn_takes_more() -> None:
    async def main() -> list[str]:
        budget = TurnBudget(frames_per_turn=2)
        log: list[str] = []
        Answering(budget, "a", 5, log).hand_on()
        for _ in range(6):
            await asyncio.sleep(0)
        return log

    # Each turn's two answers come before the next turn's frames: a connection's
    # requests are answered as fast as they are taken, so one that sends many at
    # once never finds more than a turn's worth unanswered (PROTOCOL.md's limit).
    assert asyncio.run(main()) == ["a", "a", "A", "A", "a", "a", "A", "A", "a", "A"]
