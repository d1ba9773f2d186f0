"""The bound on what clients have not read, over all connections (service/unread.py)."""

from __future__ import annotations

from service.unread import HEAVY, REFILL, UnreadBudget

MIB = 1024 * 1024


class Conn:
    """A connection as the budget sees it: what its client has not read, and its end."""

    def __init__(self, name: str, unread: int = 0) -> None:
        self.name = name
        self.held = unread
        self.aborted: str | None = None

    def unread(self) -> int:
        return self.held

    def abort(self, why: str) -> None:
        self.aborted = why


def wrote(budget: UnreadBudget, conn: Conn, size: int) -> None:
    conn.held = size
    budget.wrote(conn, size)


def test_only_connections_holding_more_than_heavy_are_counted() -> None:
    budget = UnreadBudget(16 * MIB)
    light, heavy = Conn("light"), Conn("heavy")
    wrote(budget, light, HEAVY)
    wrote(budget, heavy, 3 * MIB)
    assert (budget.total, list(budget.sizes)) == (3 * MIB, [heavy])
    wrote(budget, heavy, 2 * MIB)  # it read some
    assert budget.total == 2 * MIB
    wrote(budget, heavy, 10)  # it read nearly all: no longer counted
    assert (budget.total, budget.sizes) == (0, {})


def test_past_the_budget_the_largest_holders_are_dropped_down_to_the_refill_mark() -> None:
    budget = UnreadBudget(10 * MIB)
    conns = [Conn(f"c{n}") for n in range(4)]
    for conn, size in zip(conns, (2, 3, 4, 1.5), strict=True):
        wrote(budget, conn, int(size * MIB))
    # 10.5 MiB > 10 on the last write: the largest goes, leaving 6.5 (at most 7.5).
    assert [c.name for c in conns if c.aborted] == ["c2"]
    assert budget.total == int(6.5 * MIB) <= budget.budget * REFILL
    assert conns[2] not in budget.sizes
    assert "max_client_unread" in (conns[2].aborted or "")


def test_sizes_are_read_again_before_anyone_is_dropped() -> None:
    """A client that read since its last write is not dropped for what it held then."""
    budget = UnreadBudget(10 * MIB)
    reader, hog = Conn("reader"), Conn("hog")
    wrote(budget, reader, 6 * MIB)
    reader.held = 0  # it read everything; no write since told the budget
    wrote(budget, hog, 5 * MIB)
    assert (reader.aborted, hog.aborted) == (None, None)
    assert budget.total == 5 * MIB
    assert budget.sizes == {hog: 5 * MIB}


def test_a_connection_that_ends_is_forgotten() -> None:
    budget = UnreadBudget(10 * MIB)
    conn = Conn("gone")
    wrote(budget, conn, 4 * MIB)
    budget.forget(conn)
    budget.forget(conn)  # twice: its end, after a drop
    assert (budget.total, budget.sizes) == (0, {})
