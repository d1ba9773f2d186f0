"""``ops.bench.hops``: a write's milestones found in ``perf script`` output.

The lines are perf's own format (``-F comm,pid,tid,time,event,trace``); the
recording of a real cluster is in ``tests/cluster/test_bench_hops.py``. Held here:

* each milestone is the first matching call after the one before it, and a read
  counts only when it returned bytes;
* the backups are ranked by when they read the record, whichever pid that is;
* a cycle missing a milestone (the recording cut it) is left out, not guessed.
"""

from __future__ import annotations

from ops.bench import hops

CLIENT, PRIMARY, BACKUP_A, BACKUP_B = 100, 200, 300, 400
ROLES = hops.Roles(CLIENT, PRIMARY, (BACKUP_A, BACKUP_B))


def line(pid: int, at_us: float, event: str, rest: str) -> str:
    tid = pid + 1 if event.endswith("fdatasync") else pid  # a sync thread of its own
    return f"          python {pid}/{tid} {1000 + at_us / 1e6:.6f}: {event}: {rest}"


def write(pid: int, at_us: float) -> str:
    return line(pid, at_us, "syscalls:sys_enter_write", "fd: 0x00000017, buf: 0x5600, count: 0x202")


def read(pid: int, at_us: float, returned: int = 0x202) -> str:
    return line(pid, at_us, "syscalls:sys_exit_read", hex(returned))


def sync(pid: int, begin: float, end: float) -> list[str]:
    return [
        line(pid, begin, "syscalls:sys_enter_fdatasync", "fd: 0x0000001a"),
        line(pid, end, "syscalls:sys_exit_fdatasync", "0x0"),
    ]


def one_write(t: float, first: int = BACKUP_B, second: int = BACKUP_A) -> list[str]:
    """One write at 1 client, ``t`` µs into the recording: ``first`` reads the record first."""
    return [
        write(CLIENT, t),
        read(PRIMARY, t + 10, returned=0),  # woke for nothing: not the request
        read(PRIMARY, t + 40),
        write(PRIMARY, t + 200),
        write(PRIMARY, t + 250),
        read(first, t + 260),
        *sync(PRIMARY, t + 280, t + 600),
        read(second, t + 400),
        *sync(first, t + 450, t + 700),
        write(first, t + 720),
        *sync(second, t + 560, t + 800),
        write(second, t + 820),
        write(PRIMARY, t + 900),
        read(CLIENT, t + 950),
    ]


def test_a_write_s_milestones_are_its_calls_in_order() -> None:
    text = "\n".join([*one_write(0), *one_write(2000), write(CLIENT, 4000)])
    rows = hops.cycles(hops.parse_script(text), ROLES)
    expected = {
        "P recv": 40,
        "P send 1": 200,
        "P send 2": 250,
        "P fsync in": 280,
        "P fsync out": 600,
        "B1 recv": 260,
        "B1 fsync in": 450,
        "B1 fsync out": 700,
        "B1 ack": 720,
        "B2 recv": 400,
        "B2 fsync in": 560,
        "B2 fsync out": 800,
        "B2 ack": 820,
        "last ack": 820,
        "P reply": 900,
        "C recv": 950,
    }
    assert len(rows) == 2
    for row in rows:
        assert row.keys() == expected.keys()
        for key, value in expected.items():
            assert abs(row[key] - value) < 0.01, key


def test_backups_are_ranked_by_when_they_read_the_record() -> None:
    text = "\n".join([*one_write(0, first=BACKUP_A, second=BACKUP_B), write(CLIENT, 2000)])
    (row,) = hops.cycles(hops.parse_script(text), ROLES)
    assert round(row["B1 recv"]) == 260
    assert round(row["B1 ack"]) == 720
    assert round(row["B2 recv"]) == 400


def test_a_write_missing_a_milestone_is_left_out() -> None:
    cut = [entry for entry in one_write(2000) if f"python {BACKUP_A}/" not in entry]
    text = "\n".join([*one_write(0), *cut, *one_write(4000), write(CLIENT, 6000)])
    rows = hops.cycles(hops.parse_script(text), ROLES)
    assert len(rows) == 2
    medians = hops.medians(rows)
    assert round(medians["C recv"]) == 950
    lines = hops.table({"ours": rows}).splitlines()

    def shown(label: str) -> list[str]:
        return [entry.split()[-1] for entry in lines if entry.startswith(label)]

    assert shown("primary writes the reply") == ["900"]
    # A hop is the difference of its two milestones' medians: 900 - 820.
    assert shown("primary: last ack written -> reply written") == ["80"]


def test_a_write_whose_milestones_are_out_of_order_is_left_out() -> None:
    """A primary's write matched as the reply before a backup's ack (the reply went
    out on the other backup's ack, seen as this one's: a heartbeat read taken for
    the record) is a cycle misread, left out rather than shown."""
    stray = one_write(2000)
    stray.insert(stray.index(write(PRIMARY, 2900)), write(PRIMARY, 2700))
    misread = [e for e in stray if e != write(PRIMARY, 2900) and e != write(BACKUP_A, 2820)]
    misread.append(write(BACKUP_A, 2930))
    text = "\n".join(
        [*one_write(0), *sorted_by_time(misread), *one_write(4000), write(CLIENT, 6000)]
    )
    rows = hops.cycles(hops.parse_script(text), ROLES)
    assert [round(row["P reply"]) for row in rows] == [900, 900]


def sorted_by_time(lines: list[str]) -> list[str]:
    return sorted(lines, key=lambda entry: float(entry.split()[2].rstrip(":")))


def test_lines_of_other_events_and_processes_are_skipped() -> None:
    text = "\n".join(
        [
            " kworker/0:1H-kb    46/46    1000.000100: sched:sched_switch: prev_comm=kworker",
            "garbage",
            read(PRIMARY, 5),
        ]
    )
    (call,) = hops.parse_script(text)
    assert (call.pid, call.enter, call.name, call.value) == (PRIMARY, False, "read", 0x202)
    assert abs(call.time_us - (1000e6 + 5)) < 0.01
