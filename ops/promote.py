"""Force a node to become primary when the cluster cannot elect one by itself.

    python -m ops.promote 2 --config ops/nodes/node2.conf
    python -m ops.promote 2 --address 127.0.0.1:7002 --secret-file var/cluster.secret --yes

When every node is back except a member of the newest sync set (G5: writes
wait until it returns), an operator may decide that node is gone for good and
promote another. The promoted node takes a new epoch without the usual proofs:
acknowledged writes that only the missing node holds are lost, and when it
returns it is rewound to the promoted node's history (its removed records go to
a rollback file). The command says so and asks for confirmation.

Before it asks, the tool compares the node's position with those of the other
configured nodes that answer: promoting a node while another holds a newer
position would rewind that one too (the forced election takes every vote), so it
refuses and names the newer node (``--even-if-behind`` to go on all the same).

The tool connects as node 0, the operator, with the cluster secret: a client
without the secret cannot promote anything. On a TLS cluster it verifies the
node against the CA (``--ca FILE``, or the config's ``tls_ca``).
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
from pathlib import Path

from service import config as config_module
from service.errors import ProtocolViolation
from service.status import NodeStatus

from .operator import add_ca_option, ca_or_exit, exchange, status_if_answering, status_of

WARNING = (
    "WARNING: forcing node {node} to become primary skips the checks that protect "
    "acknowledged writes.\nWrites acknowledged while a missing node was the only other "
    "member of the sync set may be lost for good; when that node returns it is rewound "
    "to node {node}'s history (what it removes is kept in its rollback folder)."
)


def newer_nodes(
    target: NodeStatus,
    others: tuple[str, ...],
    secret: bytes,
    timeout: float,
    context: ssl.SSLContext | None,
) -> list[NodeStatus]:
    """The nodes at ``others`` that answer with a position newer than ``target``'s,
    the newest first. Forced, the target's election grants it every vote whatever
    the positions: such a node would then be rewound to the target's history, and
    what it held beyond it (writes acknowledged by it and the missing member, say)
    would be gone."""
    # One that does not answer is covered by the warning, like the missing member.
    answers = [status_if_answering(address, secret, timeout, context) for address in others]
    ahead = [s for s in answers if s is not None and s.position > target.position]
    return sorted(ahead, key=lambda s: s.position, reverse=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ops.promote", description=__doc__.split("\n")[0]
    )
    parser.add_argument("node", type=int, help="id of the node to promote")
    parser.add_argument("--config", type=Path, help="that node's config file")
    parser.add_argument("--address", help="HOST:PORT of the node (instead of --config)")
    parser.add_argument("--secret-file", type=Path, help="the cluster secret (instead of --config)")
    add_ca_option(parser)
    parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    parser.add_argument(
        "--even-if-behind",
        action="store_true",
        help="promote it even though another node that answers holds a newer position",
    )
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    config = None
    if args.config is not None:
        config = config_module.load(args.config, {})
        addresses = {p.node_id: p.address for p in config.nodes}
        if args.node not in addresses:
            parser.error(f"node {args.node} is not one of {args.config}'s nodes")
        address = addresses[args.node]
        others = tuple(a for n, a in sorted(addresses.items()) if n != args.node)
        secret_file = config.secret_file
    elif args.address and args.secret_file:
        address, secret_file, others = args.address, args.secret_file, ()
    else:
        parser.error("give --config, or both --address and --secret-file")
    context = ca_or_exit(parser, args.ca, config)
    secret = secret_file.read_bytes().strip()
    try:
        target = status_of(address, secret, args.timeout, context)
    except (OSError, ProtocolViolation) as exc:
        print(f"could not reach node {args.node} at {address}: {exc}", file=sys.stderr)
        return 3
    ahead = newer_nodes(target, others, secret, args.timeout, context)
    if ahead and not args.even_if_behind:
        best = ahead[0]
        print(
            f"not promoted: node {best.node_id} holds a newer position "
            f"{list(best.position)} than node {args.node} ({list(target.position)}): "
            f"promoting node {args.node} would discard what node {best.node_id} holds "
            f"beyond it, acknowledged writes among them. Promote node {best.node_id}, "
            "or give --even-if-behind",
            file=sys.stderr,
        )
        return 1
    print(WARNING.format(node=args.node), file=sys.stderr)
    if not args.yes:
        answer = input(f"Type 'promote {args.node}' to go on: ")
        if answer.strip() != f"promote {args.node}":
            print("not promoted", file=sys.stderr)
            return 1
    try:
        reply = exchange(address, secret, {"type": "force_promote"}, args.timeout, context)
    except (OSError, ProtocolViolation) as exc:
        print(f"could not reach node {args.node} at {address}: {exc}", file=sys.stderr)
        return 3
    if reply.get("type") != "reply":
        print(f"node {args.node} refused: {reply.get('message')}", file=sys.stderr)
        return 1
    print(json.dumps(reply["result"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
