"""Reading node logs: one ``event key=value ...`` line per state change.

A node logs the local time to the millisecond, the level, then the event and
its fields (README, section Operations). The harness reads the logs for two
things: the time of an event (the benchmark's server-side figures) and the
rule that at most one node becomes primary in an epoch (R1), which every
scenario and every chaos run checks; a primary also logs ``acknowledging``
once per reign, at its first acknowledgement, so that a chaos run checks that
at most one node acknowledged in an epoch, the one that became its primary.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from itertools import pairwise

_FIELD = re.compile(r'(\w[\w-]*)=("[^"]*"|\S+)')
_BECAME_PRIMARY = re.compile(r"\bbecame primary node=(\d+) epoch=(\d+)")
_ACKNOWLEDGING = re.compile(r"\backnowledging node=(\d+) epoch=(\d+)")


@dataclass(frozen=True)
class Event:
    """One ``event key=value ...`` line of a node log."""

    at: float  # wall-clock time (time.time() scale) of the line
    name: str
    fields: dict[str, str]


def parse_event(line: str) -> Event | None:
    """``2025-01-02T03:04:05.678 INFO catch-up end node=2 backup=1 seq=9`` -> Event."""
    parts = line.split(" ", 2)
    if len(parts) < 3 or len(parts[0]) != 23:
        return None
    try:
        at = datetime.strptime(parts[0], "%Y-%m-%dT%H:%M:%S.%f").timestamp()
    except ValueError:
        return None
    message = parts[2]
    first = _FIELD.search(message)
    name = message[: first.start()].strip() if first else message.strip()
    fields = {key: value.strip('"') for key, value in _FIELD.findall(message)}
    return Event(at, name, fields)


def events(text: str, name: str) -> list[Event]:
    """The ``name`` events of a log text, in order."""
    found = (parse_event(line) for line in text.splitlines())
    return [event for event in found if event is not None and event.name == name]


def primary_epochs(logs: Mapping[int, str]) -> tuple[dict[int, set[int]], list[str]]:
    """Epoch -> the nodes that logged ``became primary`` in it, and the breaches of R1
    seen in the logs: two nodes primary in one epoch, a node whose epochs do not grow."""
    holders: dict[int, set[int]] = {}
    problems: list[str] = []
    for node_id, text in logs.items():
        epochs = []
        for node_field, epoch_field in _BECAME_PRIMARY.findall(text):
            holders.setdefault(int(epoch_field), set()).add(int(node_field))
            epochs.append(int(epoch_field))
        if any(later <= earlier for earlier, later in pairwise(epochs)):
            problems.append(f"node {node_id} became primary in epochs {epochs}")
    for epoch, nodes in sorted(holders.items()):
        if len(nodes) > 1:
            problems.append(f"epoch {epoch}: nodes {sorted(nodes)} all became primary")
    return holders, problems


def acknowledging_epochs(logs: Mapping[int, str]) -> tuple[dict[int, set[int]], list[str]]:
    """Epoch -> the nodes that logged ``acknowledging`` in it, and the breaches: two
    nodes acknowledging in one epoch, or a node acknowledging in an epoch it did not
    become primary in."""
    primaries, _ = primary_epochs(logs)
    holders: dict[int, set[int]] = {}
    for text in logs.values():
        for node_field, epoch_field in _ACKNOWLEDGING.findall(text):
            holders.setdefault(int(epoch_field), set()).add(int(node_field))
    problems: list[str] = []
    for epoch, nodes in sorted(holders.items()):
        if len(nodes) > 1:
            problems.append(f"epoch {epoch}: nodes {sorted(nodes)} all acknowledged writes")
        strangers = sorted(nodes - primaries.get(epoch, set()))
        if strangers:
            problems.append(
                f"epoch {epoch}: node {strangers} acknowledged writes without becoming primary"
            )
    return holders, problems
