"""The ``p2pfl`` argument parser, one function per command. Each command's handler is
``p2pfl.cli.commands.COMMANDS[name]`` (``logs`` and ``export`` register their own, so the
parser imports those two modules): it imports no other command, so the harness's poisoning
peer can parse ``run`` arguments without ``cli.commands``."""

from __future__ import annotations

import argparse
from typing import Any

from p2pfl import __version__
from p2pfl.cli.args import (
    TORCH_MOMENTUM,
    parse_harness_topology,
    parse_listen,
    parse_metrics,
    parse_model,
    parse_seeds,
    parse_topology,
    positive_float,
    positive_int,
)
from p2pfl.cli.recipes import recipes_text

Subparsers = Any  # argparse's _SubParsersAction, private in typeshed


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2pfl",
        description="Peer-to-peer federated learning daemon (no coordinator).",
        epilog="Exit codes: 0 success (or a clean stop on SIGINT/SIGTERM), 2 a configuration, "
        "key, data or checkpoint error (the message names the file and the field), 3 a node "
        "that never had training.min_neighbours neighbours (it says whom it waited for "
        "and why).",
    )
    parser.add_argument("--version", action="version", version=f"p2pfl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)

    _add_keys(sub)
    _add_init(sub)
    _add_harness(sub)
    from p2pfl.logs.command import register as register_logs

    register_logs(sub)
    from p2pfl.store.export import register as register_export

    register_export(sub)

    _add_check_and_run(sub)
    _add_status(sub)
    return parser


def _add_keys(sub: Subparsers) -> None:
    """keygen, pubkey."""
    p = sub.add_parser("keygen", help="create an X25519 private key file (mode 0600)")
    p.add_argument(
        "keyfile",
        help="where to write the private key (missing folders are made 0700; an existing "
        "file is never overwritten); the public key is printed",
    )

    p = sub.add_parser("pubkey", help="print the public key of a private key file")
    p.add_argument("keyfile", help="a private key file written by keygen")


def _add_init(sub: Subparsers) -> None:
    """init: peers.yaml and keys for a local run."""
    p = sub.add_parser("init", help="write peers.yaml and keys for a local multi-peer run")
    p.add_argument("--peers", required=True, help="comma-separated peer ids, e.g. alice,bob,carol")
    p.add_argument(
        "--host", default="127.0.0.1", help="every peer's host (default 127.0.0.1; ::1 works)"
    )
    p.add_argument(
        "--base-port", type=int, default=7070, help="first peer's port, then +1 (default 7070)"
    )
    p.add_argument("--out", required=True, help="folder for peers.yaml and keys/<id>.key")
    p.add_argument("--network", default="local", help="network name (default local)")
    p.add_argument("--seed", type=int, default=7, help="initial model and topology (default 7)")
    p.add_argument("--rounds", type=int, default=20, help="gossip rounds (default 20)")
    p.add_argument(
        "--topology",
        type=parse_topology,
        default={"kind": "full"},
        help="full, ring or k-regular:K (default full)",
    )
    p.add_argument(
        "--model",
        type=parse_model,
        default={"kind": "mlp", "hidden": [64]},
        help="softmax, mlp or mlp:64,32 (default mlp with one hidden layer of 64)",
    )
    p.add_argument(
        "--inputs", type=int, default=64, help="features per sample (default 64: digits)"
    )
    p.add_argument("--classes", type=int, default=10, help="classes (default 10: digits)")
    p.add_argument("--learning-rate", type=float, default=0.3, help="SGD step (default 0.3)")
    p.add_argument("--batch-size", type=int, default=32, help="minibatch size (default 32)")
    p.add_argument(
        "--round-timeout", type=float, default=30.0, help="seconds per round at most (default 30)"
    )


def _add_harness(sub: Subparsers) -> None:
    """harness: N real peers on this machine."""
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
        type=parse_harness_topology,
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
        type=parse_model,
        default={"kind": "mlp", "hidden": [64]},
        help="softmax, mlp, mlp:H1,H2 (numpy, default mlp:64), or a PyTorch model: "
        "torch:cnn, torch:mlp (the shipped examples) or torch:MODULE:FUNCTION "
        "(needs pip install 'p2pfl[torch]')",
    )
    _add_harness_training(p)
    _add_harness_faults_and_privacy(p)
    _add_harness_hosts(p)
    _add_harness_scale(p)


def _add_harness_scale(p: argparse.ArgumentParser) -> None:
    """harness: beyond one machine (Ray)."""
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run every peer on a Ray cluster (a `p2pfl run` process owned by an actor, "
        "spread over the machines): --ray HOST:PORT (or auto) joins a cluster started with "
        "`ray start`; a bare --ray starts a local Ray instance on 127.0.0.1 (needs pip "
        "install 'p2pfl[ray]')",
    )
    p.add_argument(
        "--eval-samples",
        type=positive_int,
        metavar="N",
        help="the peers evaluate every round on the first N test samples (default: all); "
        "the final evaluation and the table always take the whole test set",
    )
    p.add_argument(
        "--nodes-per-process",
        type=positive_int,
        default=1,
        metavar="K",
        help="run K nodes in each process (default 1): each keeps its own keys, state, event "
        "log and connections, only the interpreter is shared; for many peers on one machine",
    )
    p.add_argument(
        "--cpus-per-peer",
        type=positive_float,
        help="with --ray: Ray CPUs per peer, fractions allowed (default: the cluster's CPUs "
        "shared out, at most 1); the peer trains with as many threads as whole CPUs",
    )
    p.add_argument(
        "--memory-per-peer",
        type=positive_float,
        metavar="MB",
        help="with --ray: Ray memory per peer in MB (Ray places peers by it; it is not a cap)",
    )


def _add_harness_hosts(p: argparse.ArgumentParser) -> None:
    """harness: simulated hosts, their links and network faults."""
    p.add_argument(
        "--hosts",
        action="store_true",
        help="put every peer on a simulated host of its own: a network namespace with its "
        "own address (10.77.0.N) on a bridge, its link shaped by --link (needs root)",
    )
    p.add_argument(
        "--ipv6",
        action="store_true",
        help="with --hosts: IPv6 addresses (fd77::N) for the hosts and in peers.yaml",
    )
    p.add_argument(
        "--link",
        default="unlimited",
        metavar="RATE[,DELAY[,LOSS]]",
        help="with --hosts: every host's link, e.g. 100mbit,20ms,0.01 (rate each way, "
        "one-way delay, packet loss; default unlimited)",
    )
    p.add_argument(
        "--host-link",
        action="append",
        default=[],
        metavar="PEER=RATE[,DELAY[,LOSS]]",
        help="with --hosts: PEER's link instead of --link (repeatable)",
    )
    p.add_argument(
        "--split",
        action="append",
        default=[],
        metavar="GROUP|GROUP@WHEN",
        help="with --hosts: a network partition, e.g. p00,p01|p02,p03@5-10 or half@5-10: "
        "the groups' links to each other drop every packet from when the furthest peer "
        "starts round 5 until every peer has reached round 10 (or seconds: @2s-6s; "
        "repeatable)",
    )
    p.add_argument(
        "--cut",
        action="append",
        default=[],
        metavar="PEER@WHEN",
        help="with --hosts: PEER's host drops every packet from when it starts round FIRST "
        "until all the others have reached LAST (e.g. p03@5-8, or seconds: p03@2s-4s; "
        "repeatable)",
    )


def _add_harness_training(p: argparse.ArgumentParser) -> None:
    """harness: how the peers train."""
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
    p.add_argument(
        "--seed", type=int, default=7, help="data split, initial model and topology (default 7)"
    )
    p.add_argument(
        "--seeds",
        type=parse_seeds,
        metavar="S1,S2,...",
        help="one run per seed (in OUT/seed-S), then their mean and spread in OUT/seeds.json "
        "(default: one run, with --seed)",
    )
    p.add_argument("--out", help="run folder, must be new or empty (default runs/<name>-<time>)")
    p.add_argument(
        "--learning-rate",
        type=float,
        help="SGD step size (default per dataset, learning rate/batch size: "
        f"{recipes_text()}; torch models: {recipes_text('torch')})",
    )
    p.add_argument(
        "--batch-size", type=int, help="minibatch size (default per dataset: see --learning-rate)"
    )
    p.add_argument(
        "--local-epochs", type=int, default=1, help="passes over local data per round (default 1)"
    )
    p.add_argument(
        "--round-timeout", type=float, default=30.0, help="seconds per round at most (default 30)"
    )


def _add_harness_faults_and_privacy(p: argparse.ArgumentParser) -> None:
    """harness: faults, secure aggregation, DP, attacks, outputs."""
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
        "--dp-correlated",
        type=float,
        metavar="C",
        help="DP: pairwise-cancelling noise per neighbour pair, std C x the clip (DECOR; "
        "the network's average keeps only the independent noise)",
    )
    p.add_argument(
        "--rule",
        default="metropolis",
        help="aggregation rule: metropolis (default), median, trimmed-mean:BETA or "
        "clipped:TAU (robust rules: plain mode only)",
    )
    p.add_argument(
        "--compression",
        default="none",
        metavar="KIND",
        help="what peers send each round: none (default), fp16, int8 or topk:FRACTION "
        "(compressed differences of public copies; plain mode only)",
    )
    p.add_argument(
        "--consensus-step",
        type=float,
        metavar="GAMMA",
        help="with --compression: the averaging's step, 0 < GAMMA <= 1 (default 1, top-k "
        "min(1, 6 x FRACTION))",
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


def _add_check_and_run(sub: Subparsers) -> None:
    """check a peers.yaml; run one node."""
    p = sub.add_parser("check", help="validate a peers.yaml; print peers, neighbours and digest")
    p.add_argument("config", help="the shared peers.yaml")
    p.add_argument(
        "--privacy",
        action="store_true",
        help="audit the topology: the smallest coalitions of owners whose secure-aggregation "
        "sums give away a peer's model (honest, and lying about dropouts)",
    )
    p.add_argument(
        "--max-coalition",
        type=int,
        default=4,
        metavar="N",
        help="with --privacy: search coalitions of up to N peers (default 4)",
    )

    p = sub.add_parser("run", help="run one node")
    p.add_argument("config", help="the shared peers.yaml (identical on every peer)")
    p.add_argument("--id", required=True, help="this node's peer id in the config")
    p.add_argument("--key", required=True, help="this node's private key file")
    p.add_argument("--data", required=True, help=".npz (x, y, optional x_val, y_val) or .csv")
    p.add_argument("--val-data", help="validation data (.npz or .csv), if not inside --data")
    p.add_argument(
        "--label-column",
        metavar="NAME|N",
        help="a CSV's label column: a header name or a 1-based number (default: the column "
        "named label or y, else the last)",
    )
    p.add_argument("--state-dir", required=True, help="events.jsonl and checkpoints go here")
    p.add_argument(
        "--listen", type=parse_listen, help="HOST:PORT to bind instead of the config address"
    )
    p.add_argument(
        "--snapshots",
        action="store_true",
        help="also keep every round's model in STATE_DIR/snapshots.f32 (for analysis)",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="threads for training (torch; BLAS takes OMP_NUM_THREADS and the like from "
        "the environment, 1 when unset); default 1: peers usually share a machine",
    )
    p.add_argument(
        "--metrics",
        type=parse_metrics,
        metavar="[HOST:]PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (off by default; a bare "
        "PORT listens on 127.0.0.1 only)",
    )


def _add_status(sub: Subparsers) -> None:
    """status: ask a running node."""
    p = sub.add_parser(
        "status",
        help="ask a running node (through STATE_DIR/status.sock) for its round and neighbours",
    )
    p.add_argument("state_dir", help="the node's --state-dir")
    p.add_argument("--json", action="store_true", help="the status as JSON")
