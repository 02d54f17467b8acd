"""The ``p2pfl`` command line: keygen, pubkey, init, check, run, status, harness (and the
``logs`` and ``export`` commands their packages register). ``main`` is ``p2pfl.cli:main``."""

from __future__ import annotations

import os

# One BLAS thread per peer process (measured: 8 peers ran 11x slower with one thread per
# core each). Must happen before numpy is imported.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import yaml  # noqa: E402

from p2pfl.cli.harness_cmd import cmd_harness  # noqa: E402
from p2pfl.cli.launch import build_node, setup_logging  # noqa: E402
from p2pfl.cli.parser import make_parser  # noqa: E402
from p2pfl.config.local import build_local_config  # noqa: E402
from p2pfl.errors import P2PFLError  # noqa: E402


def cmd_keygen(args: argparse.Namespace) -> int:
    from p2pfl.proto.keys import generate_key_file

    public = generate_key_file(Path(args.keyfile))
    print(public)
    return 0


def cmd_pubkey(args: argparse.Namespace) -> int:
    from p2pfl.proto.keys import load_private_key, public_key_b64

    print(public_key_b64(load_private_key(Path(args.keyfile))))
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from p2pfl.config import load_config
    from p2pfl.proto.keys import generate_key_file

    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    out = Path(args.out)
    keys_dir = out / "keys"
    keys_dir.mkdir(parents=True, exist_ok=True)
    config_path = out / "peers.yaml"
    if config_path.exists():
        raise P2PFLError(f"{config_path} already exists; choose another --out")
    public = {p: generate_key_file(keys_dir / f"{p}.key") for p in peers}
    ports = {p: args.base_port + i for i, p in enumerate(peers)}
    data = build_local_config(
        peers=peers,
        public_keys=public,
        host=args.host,
        ports=ports,
        network=args.network,
        seed=args.seed,
        rounds=args.rounds,
        topology=args.topology,
        model=args.model,
        inputs=args.inputs,
        classes=args.classes,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        round_timeout=args.round_timeout,
    )
    header = (
        "# Written by `p2pfl init` for a local run. Every peer uses this same file;\n"
        "# private keys are in keys/<id>.key (mode 0600) and never leave their owner.\n"
    )
    config_path.write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    config = load_config(config_path)
    print(f"wrote {config_path} (digest {config.digest_hex}) and {len(peers)} keys in {keys_dir}/")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from p2pfl.config import load_config
    from p2pfl.core.topology import graph_for_round

    config = load_config(Path(args.config))
    graph = graph_for_round(config.topology, config.peer_ids, config.seed, 0)
    print(f"{config.source}: valid (version {config.version}, network {config.network!r})")
    print(f"config digest: {config.digest.hex()}")
    topo = config.topology
    extra = f", degree {topo.degree}" if topo.degree else ""
    if topo.resample_every:
        extra += f", resampled every {topo.resample_every} rounds (neighbours below: round 0)"
    print(f"topology: {topo.kind}{extra}")
    width = max(len("peer"), *(len(p) for p in config.peer_ids))
    print(f"{'peer':<{width}}  {'address':<28}  neighbours")
    for peer_id in config.peer_ids:
        peer = config.peers[peer_id]
        print(f"{peer_id:<{width}}  {peer.address:<28}  {', '.join(sorted(graph[peer_id]))}")
    if args.privacy:
        from p2pfl.cli.privacy_audit import privacy_report

        if args.max_coalition < 1:
            raise P2PFLError(f"--max-coalition: expected 1 or more, got {args.max_coalition}")
        print()
        print(privacy_report(config, args.max_coalition))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from p2pfl.daemon.status import format_status, query_status

    state_dir = Path(args.state_dir)
    try:
        status = query_status(state_dir)
    except P2PFLError as exc:  # no node answers: what its log says of its last run
        if not (state_dir / "events.jsonl").is_file():
            raise
        stopped = stopped_status(state_dir)
        print(json.dumps(stopped, indent=2) if args.json else format_stopped(stopped, str(exc)))
        return 0
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def stopped_status(state_dir: Path) -> dict[str, Any]:
    """A node that is not running, from its event log: its last run's round, progress,
    latest evaluation and how it ended."""
    from p2pfl.logs.read import read_logs
    from p2pfl.logs.summary import summarize

    events = read_logs(state_dir / "events.jsonl").events
    summaries = summarize(events)
    if not summaries:
        raise P2PFLError(f"{state_dir / 'events.jsonl'}: no events")
    s = summaries[-1]
    last = events[-1]
    return {
        "running": False,
        "node": s.peer,
        "round": last.round,
        "rounds_completed": s.rounds,
        "rounds_alone": s.alone,
        "finished": s.finished,
        "ended": s.stop_reason or "killed (no node_stop logged)",
        "last_event_age_s": round(max(time.time() - last.ts, 0.0), 1),
        "last_accuracy": s.last_accuracy,
        "last_r2": s.last_r2,
    }


def format_stopped(status: dict[str, Any], why: str) -> str:
    metric = "r2" if status.get("last_r2") is not None else "accuracy"
    score = status.get(f"last_{metric}")
    age = status["last_event_age_s"]
    return "\n".join(
        [
            f"node {status['node']} is not running ({why})",
            f"its log: ended {status['ended']} at round {status['round']}, "
            f"{age:.0f} s ago; {status['rounds_completed']} rounds in the log "
            f"({status['rounds_alone']} averaged alone)",
            f"last eval: {metric} {'-' if score is None else f'{score:.4f}'}",
        ]
    )


def cmd_run(args: argparse.Namespace) -> int:
    return int(asyncio.run(build_node(args).run()))


#: Each command's handler, by the name the parser gives it.
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "keygen": cmd_keygen,
    "pubkey": cmd_pubkey,
    "init": cmd_init,
    "check": cmd_check,
    "run": cmd_run,
    "status": cmd_status,
    "harness": cmd_harness,
}


def main(argv: list[str] | None = None) -> int:
    from p2pfl.logs.command import normalize_argv

    args = make_parser().parse_args(normalize_argv(sys.argv[1:] if argv is None else argv))
    setup_logging(args)
    try:
        handler = getattr(args, "func", None) or COMMANDS[args.command]
        return int(handler(args))
    except P2PFLError as exc:
        print(f"p2pfl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # SIGTERM in the harness arrives as its subclass
        return 143 if type(exc).__name__ == "Terminated" else 130


if __name__ == "__main__":
    sys.exit(main())
