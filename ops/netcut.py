"""Partitions between loopback addresses, with nft: for tests and the rehearsal of hosts.

    python -m ops.netcut cut 127.0.0.11 127.0.0.12          .11 cannot reach .12
    python -m ops.netcut cut 127.0.0.11 127.0.0.12 --both   nothing passes between them
    python -m ops.netcut show                               the cuts in place
    python -m ops.netcut heal                               remove every cut
    python -m ops.netcut track                              track connections (see below)
    python -m ops.netcut clear                              remove the table: cuts, tracking

In the rehearsal of SPEC section 10 each node has its own loopback address
(127.0.0.11, .12, .13) and binds its outgoing connections to it, so a packet
filter can tell the nodes apart. Every cut is a rule in one nft table of its own,
``inet chatcut``, in a chain on the input hook of ``lo`` (dropping on output would
make ``send`` fail with EPERM, which no real network does; dropped on input, open
connections stall and resume when the rule goes, as over a real partition).
``heal`` removes every cut, whatever made them; ``clear`` deletes the table. A tool
that cuts while tests may cut too (the chaos tool, the benchmark) passes a
``table`` of its own, so that each heals and clears only its own cuts; so does
each run of the tests (``tests/helpers/loopback.py``), two of which may run at once.

A one-way cut from A to B drops the packets from A to B of connections A opened
(conntrack's "original" direction): A cannot connect to B, and what A sends on a
connection it had opened is lost, while B can still connect to A (the answers
from A to B belong to B's connection). Dropping every packet from A to B would
break B's connections too, since TCP needs both ways. A cut ``both`` ways drops
every packet between the two addresses.

Who opened a connection is conntrack's knowledge, and conntrack knows it only for
connections it followed from their first packet: one it picks up midway takes
whichever end it hears first for the opener, so a one-way cut made on it may
drop the wrong direction, or nothing. ``track`` makes the table with a rule that
keeps conntrack following every loopback connection (it drops nothing): call it
before the connections to be cut are made (a test, before it starts its nodes).
``cut`` tracks too, for the connections made after it, and ``heal`` keeps the
tracking (connections made while healed are cut one way correctly next time).

Needs nft (Debian: ``apt-get install nftables``) and root (CAP_NET_ADMIN);
``unavailable`` says why not, in one sentence, for a test to skip with.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

FAMILY = "inet"
TABLE = "chatcut"
CHAIN = "input"
# The comment of the rule that keeps conntrack on (see "who opened a connection").
TRACK = "track"
NFT_TIMEOUT = 10.0
# Where Debian puts nft: not on a normal user's PATH.
SBIN = "/usr/sbin:/sbin"


class NetcutError(Exception):
    """nft is missing, we may not use it, or it refused a rule."""


@dataclass(frozen=True)
class Cut:
    """Packets from ``source`` to ``dest`` are dropped (``both``: the other way too)."""

    source: str
    dest: str
    both: bool = False

    @property
    def comment(self) -> str:
        return f"{self.source}>{self.dest}{' both' if self.both else ''}"

    @classmethod
    def from_comment(cls, text: str) -> Cut | None:
        pair, _, kind = text.partition(" ")
        source, sep, dest = pair.partition(">")
        if not sep or kind not in ("", "both"):
            return None
        return cls(source, dest, kind == "both")


def nft_binary() -> str:
    found = shutil.which("nft") or shutil.which("nft", path=SBIN)
    if found is None:
        raise NetcutError("nft is not installed (Debian: apt-get install nftables)")
    return found


def unavailable() -> str | None:
    """Why cuts cannot be made here, or None when they can."""
    try:
        nft_binary()
    except NetcutError as exc:
        return str(exc)
    if os.geteuid() != 0:
        return "nft needs root (CAP_NET_ADMIN) to change the packet filter"
    try:
        _nft("list", "tables")
    except NetcutError as exc:
        return str(exc)
    return None


def _nft(*args: str, script: str | None = None) -> str:
    try:
        done = subprocess.run(
            [nft_binary(), *args],
            input=script,
            capture_output=True,
            text=True,
            timeout=NFT_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetcutError(f"cannot run nft: {exc}") from None
    if done.returncode != 0:
        why = done.stderr.strip().splitlines()
        if os.geteuid() != 0:
            why.insert(0, "not root")
        raise NetcutError(f"nft {' '.join(args)} failed: {'; '.join(why) or done.returncode}")
    return done.stdout


def _loopback(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        raise NetcutError(f"{address!r} is not an IP address") from None
    if not ip.is_loopback:
        raise NetcutError(f"{address} is not a loopback address: only loopback traffic is cut")
    return ip


def _match(source: str, dest: str) -> str:
    a, b = _loopback(source), _loopback(dest)
    if a.version != b.version:
        raise NetcutError(f"{source} and {dest} are not of one IP version")
    family = "ip" if a.version == 4 else "ip6"
    return f'iif "lo" {family} saddr {a} {family} daddr {b}'


def cut(source: str, dest: str, *, both: bool = False, table: str = TABLE) -> Cut:
    """Cut ``source`` from ``dest`` (see the module docstring); a cut already in place
    is not added twice."""
    made = Cut(str(_loopback(source)), str(_loopback(dest)), both)
    comments = _comments(table) or []
    if made.comment in comments:
        return made
    if both:
        rules = [_match(made.source, made.dest), _match(made.dest, made.source)]
    else:
        rules = [f"{_match(made.source, made.dest)} ct direction original"]
    script = [
        *_table(table),
        *([] if TRACK in comments else [_tracking_rule(table)]),
        *(
            f'add rule {FAMILY} {table} {CHAIN} {rule} drop comment "{made.comment}"'
            for rule in rules
        ),
    ]
    _run_script(script)
    return made


def track(table: str = TABLE) -> None:
    """Have conntrack follow every loopback connection made from now on, from its first
    packet, so that a later one-way cut knows who opened it (the module docstring)."""
    if TRACK not in (_comments(table) or []):
        _run_script([*_table(table), _tracking_rule(table)])


def cuts(table: str = TABLE) -> list[Cut]:
    """The cuts in place, in the order they were made."""
    found: list[Cut] = []
    for comment in _comments(table) or []:
        made = Cut.from_comment(comment)
        if made is not None and made not in found:
            found.append(made)
    return found


def heal(table: str = TABLE) -> None:
    """Remove every cut, whatever made it; the tracking stays (``clear`` ends it)."""
    if _comments(table) is None:
        return
    # One transaction: the tracking rule is replaced, never missing for a moment.
    _run_script([f"flush chain {FAMILY} {table} {CHAIN}", _tracking_rule(table)])


def clear(table: str = TABLE) -> None:
    """Remove the table: every cut and the tracking; nothing to do when there is none."""
    try:
        _nft("delete", "table", FAMILY, table)
    except NetcutError as exc:
        if "No such file or directory" not in str(exc):
            raise


def _table(table: str) -> list[str]:
    return [
        f"add table {FAMILY} {table}",
        f"add chain {FAMILY} {table} {CHAIN} "
        "{ type filter hook input priority 0; policy accept; }",
    ]


def _tracking_rule(table: str) -> str:
    # A rule that reads conntrack's state keeps conntrack on; it decides nothing.
    return f'add rule {FAMILY} {table} {CHAIN} iif "lo" ct state new counter comment "{TRACK}"'


def _run_script(lines: list[str]) -> None:
    _nft("-f", "-", script="\n".join(lines) + "\n")


def _comments(table: str) -> list[str] | None:
    """The comments of the table's rules, in order; None when there is no table."""
    try:
        listing = _nft("-j", "list", "table", FAMILY, table)
    except NetcutError as exc:
        if "No such file or directory" in str(exc):
            return None
        raise
    found: list[str] = []
    for item in json.loads(listing).get("nftables", []):
        rule = item.get("rule") if isinstance(item, dict) else None
        if isinstance(rule, dict) and "comment" in rule:
            found.append(str(rule["comment"]))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ops.netcut", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("cut", help="drop packets from SOURCE to DEST on lo")
    make.add_argument("source")
    make.add_argument("dest")
    make.add_argument("--both", action="store_true", help="both ways")
    commands.add_parser("heal", help="remove every cut")
    commands.add_parser("track", help="track every loopback connection from its start")
    commands.add_parser("clear", help="remove the table: every cut and the tracking")
    commands.add_parser("show", help="list the cuts")
    args = parser.parse_args(argv)
    try:
        if args.command == "cut":
            cut(args.source, args.dest, both=args.both)
        elif args.command == "heal":
            heal()
        elif args.command == "track":
            track()
        elif args.command == "clear":
            clear()
        for made in cuts():
            arrow = "<->" if made.both else "->"
            print(f"cut {made.source} {arrow} {made.dest}")
    except NetcutError as exc:
        print(f"netcut: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
