"""``python -m p2pfl.harness.byzantine KIND run ARGS...``: ``p2pfl run`` with the attack.

The harness starts a ``--byzantine`` peer this way: the same arguments, the same
peers.yaml, but its learner wrapped in ``p2pfl.harness.attacks.ByzantineLearner``. Only
this entry point installs it; no peers.yaml setting can.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from typing import Any

from p2pfl.harness.attacks import ByzantineLearner, parse_attack

__all__ = ["install_attack", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m p2pfl.harness.byzantine KIND run ...``: p2pfl run, with the attack."""
    from p2pfl.cli.launch import build_node, setup_logging
    from p2pfl.cli.parser import make_parser
    from p2pfl.errors import P2PFLError

    args_in = list(sys.argv[1:] if argv is None else argv)
    if len(args_in) < 2 or args_in[1] != "run":
        print("usage: python -m p2pfl.harness.byzantine KIND run ARGS...", file=sys.stderr)
        return 2
    try:
        parse_attack(args_in[0])  # (a bad KIND is refused before anything starts)
        args = make_parser().parse_args(args_in[1:])
        setup_logging(args)
        node = build_node(args)
    except (ValueError, P2PFLError) as exc:
        print(f"p2pfl: error: {exc}", file=sys.stderr)
        return 2
    install_attack(node, args_in[0])
    return int(asyncio.run(node.run()))


def install_attack(node: Any, spec: str) -> None:
    """Wrap ``node``'s learner in the attack ``spec`` (also for a node that shares its
    process: ``harness/multinode.py``)."""
    kind, factor = parse_attack(spec)
    local = node.local
    local.learner = ByzantineLearner(local.learner, kind, factor, seed=local.peer_index)


if __name__ == "__main__":
    sys.exit(main())
