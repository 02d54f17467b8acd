"""What ``p2pfl run`` starts: logging, and the ``Node`` built from its arguments (config, key
and data checked). The harness's poisoning peer (``harness/byzantine``) starts the same way,
so this module imports neither the other commands nor the harness."""

from __future__ import annotations

import argparse
import base64
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from p2pfl.daemon.node import Node


def build_node(args: argparse.Namespace, handle_signals: bool = True) -> Node:
    """The ``Node`` that ``p2pfl run ARGS`` runs (config, key and data checked);
    ``handle_signals`` False when the process runs several nodes and handles them itself."""
    from p2pfl.config import load_config
    from p2pfl.daemon.node import Node, NodeOptions
    from p2pfl.errors import ConfigError
    from p2pfl.learning import load_dataset
    from p2pfl.proto.keys import load_private_key, public_key_b64

    config = load_config(Path(args.config))
    if args.id not in config.peers:
        raise ConfigError(
            config.source, "peers", f"no peer {args.id!r} (known: {', '.join(config.peer_ids)})"
        )
    key = load_private_key(Path(args.key))
    if public_key_b64(key) != public_key_b64_of(config, args.id):
        raise ConfigError(
            config.source,
            f"peers.{args.id}.public_key",
            f"does not match the private key in {args.key}",
        )
    data = load_dataset(
        Path(args.data),
        val_path=Path(args.val_data) if args.val_data else None,
        task=config.training.model.task,
        label_column=args.label_column,
    )
    host, port = args.listen if args.listen else (None, None)
    node = Node(
        config,
        NodeOptions(
            node_id=args.id,
            state_dir=Path(args.state_dir),
            listen_host=host or None,
            listen_port=port,
            snapshots=args.snapshots,
            metrics=args.metrics,
            threads=args.threads,
            handle_signals=handle_signals,
        ),
        key,
        data,
    )
    return node


def public_key_b64_of(config: Any, peer_id: str) -> str:
    return base64.b64encode(config.peers[peer_id].public_key).decode()


def setup_logging(args: argparse.Namespace) -> None:
    """Log to stderr at the level -v / -q ask for (the library itself never configures
    logging: this is the application)."""
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr
    )
    if not args.verbose:
        logging.getLogger("websockets").setLevel(logging.WARNING)
        logging.getLogger("matplotlib").setLevel(logging.WARNING)
