"""The ``p2pfl`` command line: keygen, pubkey, init, check, run."""

from __future__ import annotations

import os

# One BLAS thread per peer process (DESIGN section 6: 8 peers ran 11x slower with one
# thread per core each). Must happen before numpy is imported.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

import yaml  # noqa: E402

from p2pfl import __version__  # noqa: E402
from p2pfl.config.local import build_local_config  # noqa: E402
from p2pfl.errors import P2PFLError  # noqa: E402

if TYPE_CHECKING:
    from p2pfl.daemon.node import Node

log = logging.getLogger("p2pfl")


def _cmd_keygen(args: argparse.Namespace) -> int:
    from p2pfl.proto.keys import generate_key_file

    public = generate_key_file(Path(args.keyfile))
    print(public)
    return 0


def _cmd_pubkey(args: argparse.Namespace) -> int:
    from p2pfl.proto.keys import load_private_key, public_key_b64

    print(public_key_b64(load_private_key(Path(args.keyfile))))
    return 0


def _parse_listen(text: str) -> tuple[str, int]:
    host, _, port_text = text.rpartition(":")
    if not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (e.g. 0.0.0.0:7070), got {text!r}")
    return host.strip("[]"), int(port_text)


def _parse_topology(text: str) -> dict[str, Any]:
    if text in ("full", "ring"):
        return {"kind": text}
    if text.startswith("k-regular:") and text.split(":", 1)[1].isdigit():
        return {"kind": "k-regular", "degree": int(text.split(":", 1)[1])}
    raise argparse.ArgumentTypeError(f"unknown topology {text!r} (full, ring, k-regular:D)")


def _parse_harness_topology(text: str) -> dict[str, Any]:
    """As for init, or a file of explicit edges."""
    if text in ("full", "ring") or text.startswith("k-regular:"):
        return _parse_topology(text)
    if Path(text).is_file():
        return {"kind": "explicit-file", "path": text}
    raise argparse.ArgumentTypeError(
        f"unknown topology {text!r} (full, ring, k-regular:D, or a YAML file with edges:)"
    )


#: The harness's SGD momentum for torch models when --momentum is not given.
TORCH_MOMENTUM = 0.9
#: ``--model torch:NAME`` for the shipped examples (p2pfl/learning/examples/torch_models.py).
TORCH_EXAMPLES = {
    "cnn": "p2pfl.learning.examples.torch_models:cnn",
    "mlp": "p2pfl.learning.examples.torch_models:mlp",
}


def _parse_model(text: str) -> dict[str, Any]:
    if text == "softmax":
        return {"kind": "softmax"}
    if text == "mlp" or text.startswith("mlp:"):
        try:
            hidden = [int(h) for h in text.split(":", 1)[1].split(",")] if ":" in text else [64]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bad layer sizes in {text!r} (e.g. mlp:64,32)"
            ) from None
        return {"kind": "mlp", "hidden": hidden}
    if text.startswith("torch:"):
        name = text.split(":", 1)[1]
        factory = TORCH_EXAMPLES.get(name, name)
        if ":" not in factory:
            raise argparse.ArgumentTypeError(
                f"unknown torch model {name!r}: {', '.join(TORCH_EXAMPLES)} or MODULE:FUNCTION"
            )
        return {"kind": "torch", "factory": factory}
    raise argparse.ArgumentTypeError(
        f"unknown model {text!r} (softmax, mlp, mlp:H1,H2, torch:cnn, torch:mlp, "
        "torch:MODULE:FUNCTION)"
    )


def _model_text(model: dict[str, Any]) -> str:
    """How the harness names a model in its report (``mlp:64``, ``torch:cnn``)."""
    if model["kind"] == "mlp":
        return f"mlp:{','.join(map(str, model['hidden']))}"
    if model["kind"] == "torch":
        short = {v: k for k, v in TORCH_EXAMPLES.items()}
        return f"torch:{short.get(model['factory'], model['factory'])}"
    return str(model["kind"])


def _cmd_init(args: argparse.Namespace) -> int:
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


def _cmd_check(args: argparse.Namespace) -> int:
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
    width = max(len(p) for p in config.peer_ids)
    print(f"{'peer':<{width}}  {'address':<28}  neighbours")
    for peer_id in config.peer_ids:
        peer = config.peers[peer_id]
        print(f"{peer_id:<{width}}  {peer.address:<28}  {', '.join(sorted(graph[peer_id]))}")
    return 0


def build_node(args: argparse.Namespace) -> Node:
    """The ``Node`` that ``p2pfl run ARGS`` runs (config, key and data checked)."""
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
        ),
        key,
        data,
    )
    return node


def _parse_metrics(text: str) -> tuple[str, int]:
    """``--metrics PORT`` or ``HOST:PORT`` (a bare port listens on loopback only)."""
    if text.isdigit():
        text = f"127.0.0.1:{text}"
    return _parse_listen(text)


def _cmd_status(args: argparse.Namespace) -> int:
    import json

    from p2pfl.daemon.status import format_status, query_status

    status = query_status(Path(args.state_dir))
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    return int(asyncio.run(build_node(args).run()))


def _cmd_harness(args: argparse.Namespace) -> int:
    import time

    from p2pfl.harness.faults import parse_fault
    from p2pfl.harness.partition import parse_partition
    from p2pfl.harness.runner import HarnessOptions, peer_ids, run_harness

    if args.peers < 2:
        raise P2PFLError(f"--peers must be at least 2, got {args.peers}")
    try:
        partition = parse_partition(args.partition)
    except ValueError as exc:
        raise P2PFLError(f"--partition: {exc}") from exc
    ids = peer_ids(args.peers)
    byzantine = _parse_byzantine(args.byzantine, ids)
    from p2pfl.core.aggregate import parse_rule

    try:
        rule = str(parse_rule(args.rule))
    except ValueError as exc:
        raise P2PFLError(f"--rule: {exc}") from exc
    if args.secure and parse_rule(rule).robust:
        raise P2PFLError(f"--rule {rule} cannot be combined with --secure (see peers.yaml)")
    try:
        faults = tuple(
            [parse_fault("kill", text, ids, args.rounds) for text in args.kill]
            + [parse_fault("restart", text, ids, args.rounds) for text in args.restart]
        )
    except ValueError as exc:
        raise P2PFLError(str(exc)) from exc
    topology = args.topology or (
        {"kind": "k-regular", "degree": 4} if args.peers > 5 else {"kind": "full"}
    )
    degree = topology.get("degree")
    if degree is not None and not 1 <= degree < args.peers:
        raise P2PFLError(
            f"--topology k-regular:{degree} needs more than {degree} peers (--peers {args.peers})"
        )
    topology_text = {
        "k-regular": f"k-regular:{topology.get('degree')}",
        "explicit-file": str(topology.get("path")),
    }.get(topology["kind"], topology["kind"])
    if topology.get("kind") == "explicit-file":
        topology = _explicit_topology(Path(topology["path"]))
    model = dict(args.model)
    if model["kind"] == "torch":
        model["optimizer"] = {"kind": args.optimizer}
        if args.optimizer == "sgd":
            model["optimizer"]["momentum"] = (
                TORCH_MOMENTUM if args.momentum is None else args.momentum
            )
    elif args.optimizer != "sgd" or args.momentum:
        raise P2PFLError(
            f"--optimizer/--momentum apply to torch models; --model {_model_text(model)} "
            "trains with plain SGD"
        )
    model_text = _model_text(model)
    dataset_name = Path(args.dataset).stem if args.dataset.endswith(".npz") else args.dataset
    out = Path(
        args.out
        or f"runs/{dataset_name.split(':')[0]}-{args.peers}p-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    from p2pfl.harness.datasets import recipe, task_of

    task = task_of(args.dataset, args.task)
    learning_rate, batch_size = recipe(args.dataset, model["kind"])
    options = HarnessOptions(
        peers=args.peers,
        topology=topology,
        topology_text=topology_text,
        rounds=args.rounds,
        dataset=args.dataset,
        partition=partition,
        model=model,
        model_text=model_text,
        task=task,
        seed=args.seed,
        out=out.resolve(),
        learning_rate=learning_rate if args.learning_rate is None else args.learning_rate,
        batch_size=batch_size if args.batch_size is None else args.batch_size,
        local_epochs=args.local_epochs,
        round_timeout=args.round_timeout,
        faults=faults,
        baseline=not args.no_baseline,
        snapshots=not args.no_snapshots,
        standardize=args.standardize,
        secure=args.secure,
        dp=(
            None
            if args.dp_noise is None
            else {
                "clip_norm": args.dp_clip,
                "noise_multiplier": args.dp_noise,
                "delta": args.dp_delta,
            }
        ),
        progress=not args.quiet,
        rule=rule,
        byzantine=byzantine,
    )
    return run_harness(options)


def _parse_byzantine(specs: list[str], ids: list[str]) -> dict[str, str]:
    """``--byzantine PEER:KIND`` (repeatable) -> {peer: kind}, each checked."""
    from p2pfl.harness.attacks import KINDS, parse_attack

    attacks: dict[str, str] = {}
    for spec in specs:
        peer, _, kind = spec.partition(":")
        if peer not in ids:
            raise P2PFLError(
                f"--byzantine {spec}: no peer {peer!r} (peers are {ids[0]}..{ids[-1]})"
            )
        try:
            parse_attack(kind)
        except ValueError:
            raise P2PFLError(
                f"--byzantine {spec}: unknown attack {kind!r} (expected {', '.join(KINDS)})"
            ) from None
        if peer in attacks:
            raise P2PFLError(f"--byzantine: {peer} is given twice")
        attacks[peer] = kind
    if len(attacks) >= len(ids):
        raise P2PFLError("--byzantine: at least one peer must stay honest")
    return attacks


def _explicit_topology(path: Path) -> dict[str, Any]:
    """``--topology FILE``: a YAML file with ``edges: [[p00, p01], ...]`` (peer ids p00..)."""
    from p2pfl.errors import ConfigError

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(str(path), "topology", f"cannot read: {exc}") from exc
    if not isinstance(data, dict) or "edges" not in data:
        raise ConfigError(str(path), "edges", "expected a mapping with edges: [[p00, p01], ...]")
    return {"kind": "explicit", "edges": data["edges"]}


def public_key_b64_of(config: Any, peer_id: str) -> str:
    import base64

    return base64.b64encode(config.peers[peer_id].public_key).decode()


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2pfl",
        description="Peer-to-peer federated learning daemon (no coordinator).",
        epilog="Exit codes: 0 success (or a clean stop on SIGINT/SIGTERM), 2 a configuration, "
        "key, data or checkpoint error (the message names the file and the field).",
    )
    parser.add_argument("--version", action="version", version=f"p2pfl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("keygen", help="create an X25519 private key file (mode 0600)")
    p.add_argument("keyfile")
    p.set_defaults(func=_cmd_keygen)

    p = sub.add_parser("pubkey", help="print the public key of a private key file")
    p.add_argument("keyfile")
    p.set_defaults(func=_cmd_pubkey)

    p = sub.add_parser("init", help="write peers.yaml and keys for a local multi-peer run")
    p.add_argument("--peers", required=True, help="comma-separated peer ids, e.g. alice,bob,carol")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--base-port", type=int, default=7070)
    p.add_argument("--out", required=True)
    p.add_argument("--network", default="local")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--topology", type=_parse_topology, default={"kind": "full"})
    p.add_argument("--model", type=_parse_model, default={"kind": "mlp", "hidden": [64]})
    p.add_argument("--inputs", type=int, default=64, help="features per sample (digits: 64)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--learning-rate", type=float, default=0.3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--round-timeout", type=float, default=30.0)
    p.set_defaults(func=_cmd_init)

    p = sub.add_parser(
        "harness",
        help="run N real peers on this machine: data split, training, report",
        description="Start N real `p2pfl run` processes on 127.0.0.1 (free ports), each with "
        "its own data partition, show live progress, then compare every peer's final model "
        "on a held-out test set with the centralised model trained on the pooled data. "
        "Writes OUT/summary.json and OUT/report.png; the peers' event logs are in OUT/state.",
    )
    p.add_argument("--peers", type=int, default=8, help="number of peers (default 8)")
    p.add_argument(
        "--topology",
        type=_parse_harness_topology,
        help="full, ring, k-regular:D, or a YAML file with edges: [[p00, p01], ...]"
        " (default: k-regular:4 with more than 5 peers, else full)",
    )
    p.add_argument("--rounds", type=int, default=30, help="gossip rounds (default 30)")
    p.add_argument(
        "--dataset",
        default="digits",
        help="digits, fashion-mnist[:DIR] (IDX files; default DIR "
        "/usr/share/datasets/fashion-mnist), diabetes (regression), or a .npz with x, y "
        "[x_test, y_test]",
    )
    p.add_argument(
        "--partition", default="iid", help="iid, dirichlet:ALPHA or shards:K (default iid)"
    )
    p.add_argument(
        "--model",
        type=_parse_model,
        default={"kind": "mlp", "hidden": [64]},
        help="softmax, mlp, mlp:H1,H2 (numpy, default mlp:64), or a PyTorch model: "
        "torch:cnn, torch:mlp (the shipped examples) or torch:MODULE:FUNCTION "
        "(needs pip install 'p2pfl[torch]')",
    )
    p.add_argument(
        "--optimizer",
        choices=("sgd", "adam"),
        default="sgd",
        help="torch models: the optimiser (default sgd)",
    )
    p.add_argument(
        "--momentum",
        type=float,
        help=f"torch models with sgd: momentum (default {TORCH_MOMENTUM})",
    )
    p.add_argument(
        "--task",
        choices=("classification", "regression"),
        help="for an .npz dataset: regression trains on real targets y (default "
        "classification; diabetes is always regression)",
    )
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", help="run folder, must be new or empty (default runs/<name>-<time>)")
    p.add_argument(
        "--learning-rate",
        type=float,
        help="SGD step size (default per dataset: digits 0.3, others 0.1)",
    )
    p.add_argument(
        "--batch-size", type=int, help="minibatch size (default per dataset: digits 4, others 32)"
    )
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--round-timeout", type=float, default=30.0)
    p.add_argument(
        "--kill",
        action="append",
        default=[],
        metavar="PEER@ROUND",
        help="SIGKILL PEER once it starts ROUND (repeatable)",
    )
    p.add_argument(
        "--restart",
        action="append",
        default=[],
        metavar="PEER@ROUND",
        help="start PEER again once the others reach ROUND (killing it first if it runs)",
    )
    p.add_argument(
        "--standardize",
        action=argparse.BooleanOptionalAction,
        help="z-score every feature over the pooled training data (default: only for .npz)",
    )
    p.add_argument(
        "--secure",
        action="store_true",
        help="secure aggregation: each peer learns only its neighbourhood's weighted sum",
    )
    p.add_argument(
        "--dp-noise",
        type=float,
        metavar="SIGMA",
        help="differential privacy: Gaussian noise multiplier of every peer's update",
    )
    p.add_argument(
        "--dp-clip", type=float, default=1.0, help="DP: L2 clip of every update (default 1)"
    )
    p.add_argument("--dp-delta", type=float, default=1e-5, help="DP: delta (default 1e-5)")
    p.add_argument(
        "--rule",
        default="metropolis",
        help="aggregation rule: metropolis (default), median, trimmed-mean:BETA or "
        "clipped:TAU (robust rules: plain mode only)",
    )
    p.add_argument(
        "--byzantine",
        action="append",
        default=[],
        metavar="PEER:KIND",
        help="make PEER poison what it sends: random, sign-flip or scaled:K (repeatable; "
        "a harness-only attack, reported apart from the honest peers)",
    )
    p.add_argument("--no-baseline", action="store_true", help="skip the centralised model")
    p.add_argument(
        "--no-snapshots",
        action="store_true",
        help="do not keep per-round models (no consensus distance; saves disk for big models)",
    )
    p.set_defaults(func=_cmd_harness)

    from p2pfl.logs.command import register as register_logs

    register_logs(sub)
    from p2pfl.store.export import register as register_export

    register_export(sub)

    p = sub.add_parser("check", help="validate a peers.yaml; print peers, neighbours and digest")
    p.add_argument("config", help="the shared peers.yaml")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("run", help="run one node")
    p.add_argument("config", help="the shared peers.yaml (identical on every peer)")
    p.add_argument("--id", required=True, help="this node's peer id in the config")
    p.add_argument("--key", required=True, help="this node's private key file")
    p.add_argument("--data", required=True, help=".npz (x, y, optional x_val, y_val) or .csv")
    p.add_argument("--val-data", help="validation data (.npz or .csv), if not inside --data")
    p.add_argument("--state-dir", required=True, help="events.jsonl and checkpoints go here")
    p.add_argument(
        "--listen", type=_parse_listen, help="HOST:PORT to bind instead of the config address"
    )
    p.add_argument(
        "--snapshots",
        action="store_true",
        help="also keep every round's model in STATE_DIR/snapshots/ (for analysis)",
    )
    p.add_argument(
        "--metrics",
        type=_parse_metrics,
        metavar="[HOST:]PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (off by default; a bare "
        "PORT listens on 127.0.0.1 only)",
    )
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "status",
        help="ask a running node (through STATE_DIR/status.sock) for its round and neighbours",
    )
    p.add_argument("state_dir", help="the node's --state-dir")
    p.add_argument("--json", action="store_true", help="the status as JSON")
    p.set_defaults(func=_cmd_status)
    return parser


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


def main(argv: list[str] | None = None) -> int:
    from p2pfl.logs.command import normalize_argv

    args = make_parser().parse_args(normalize_argv(sys.argv[1:] if argv is None else argv))
    setup_logging(args)
    try:
        return int(args.func(args))
    except P2PFLError as exc:
        print(f"p2pfl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # SIGTERM in the harness arrives as its subclass
        return 143 if type(exc).__name__ == "Terminated" else 130


if __name__ == "__main__":
    sys.exit(main())
