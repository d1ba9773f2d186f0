"""The budget of client frames per turn of the event loop (service/turns.py).

``await asyncio.sleep(0)`` here is not a wait for some state: it is exactly one
turn of the loop, the unit the budget counts in (the refill is a ``call_soon``).
"""

from __future__ import annotations

import asyncio

from service.turns import TurnBudget


class Held:
    """A connection holding ``frames`` frames: it takes what the budget gives."""

    def __init__(self, budget: TurnBudget, name: str, frames: int, log: list[str]) -> None:
        self.budget, self.name, self.frames, self.log = budget, name, frames, log

    def hand_on(self) -> None:
        while self.frames:
            if not self.budget.take():
                self.budget.wait(self)
                return
            self.frames -= 1
            self.log.append(self.name)

    def go_on(self) -> None:
        self.hand_on()


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

    # a took the first turn's three and waits; b and c wait behind it. Next turn a
    # finishes, b gets two; then c. Nothing is lost, and the line keeps its order.
    assert asyncio.run(main()) == [["a", "a", "a"], ["a", "b", "b"], ["c"], []]


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
