"""``p2pfl harness``: the command's arguments checked and turned into ``HarnessOptions``,
then the run (``cmd_harness``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from p2pfl.cli.args import TORCH_MOMENTUM, model_text
from p2pfl.errors import P2PFLError

if TYPE_CHECKING:
    from p2pfl.harness.runner import HarnessOptions


def cmd_harness(args: argparse.Namespace) -> int:
    from p2pfl.harness.runner import run_harness

    options = harness_options(args)
    if not args.seeds:
        return run_harness(options)
    return run_seeds(options, args.seeds)


def run_seeds(options: HarnessOptions, seeds: list[int]) -> int:
    """One run per seed in OUT/seed-S, then the headline figures' mean and spread (sample
    standard deviation) over the seeds, printed and in OUT/seeds.json."""
    import dataclasses
    import json
    import statistics

    from p2pfl.harness.runner import run_harness

    if options.out.exists() and any(options.out.iterdir()):
        raise P2PFLError(f"{options.out}: the run folder must be new or empty")
    codes, summaries = [], []
    for seed in seeds:
        out = options.out / f"seed-{seed}"
        print(f"\n=== seed {seed}: {out}")
        codes.append(run_harness(dataclasses.replace(options, seed=seed, out=out)))
        summaries.append(json.loads((out / "summary.json").read_text(encoding="utf-8")))
    metric = summaries[0]["metric"]
    figures = {
        f"mean {metric}": [s[metric]["mean"] for s in summaries],
        f"min {metric}": [s[metric]["min"] for s in summaries],
        "ratio to centralised": [s.get("ratio") for s in summaries],
        "round time s": [s.get("round_time_s") for s in summaries],
    }
    table = {}
    print(f"\nover {len(seeds)} seeds ({', '.join(map(str, seeds))}):")
    for name, values in figures.items():
        known = [v for v in values if v is not None]
        if not known:
            continue
        mean = statistics.fmean(known)
        spread = statistics.stdev(known) if len(known) > 1 else 0.0
        table[name] = {"mean": mean, "stdev": spread, "per_seed": values}
        print(f"  {name:22s} {mean:.4f} +- {spread:.4f}")
    record = {"seeds": seeds, "exit_codes": codes, "figures": table}
    (options.out / "seeds.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    print(f"seeds:   {options.out / 'seeds.json'}")
    return max(codes)


def harness_options(args: argparse.Namespace) -> HarnessOptions:
    """Every ``p2pfl harness`` argument checked (P2PFLError naming the flag) and resolved
    (per-dataset recipes, the default topology and run folder)."""
    from p2pfl.cli.recipes import recipe
    from p2pfl.harness.datasets import task_of
    from p2pfl.harness.layout import peer_ids
    from p2pfl.harness.partition import parse_partition
    from p2pfl.harness.runner import HarnessOptions

    if args.peers < 2:
        raise P2PFLError(f"--peers must be at least 2, got {args.peers}")
    try:
        partition = parse_partition(args.partition)
    except ValueError as exc:
        raise P2PFLError(f"--partition: {exc}") from exc
    ids = peer_ids(args.peers)
    topology, topology_text = _topology(args)
    model = _model(args)
    learning_rate, batch_size = recipe(args.dataset, model["kind"])
    return HarnessOptions(
        peers=args.peers,
        topology=topology,
        topology_text=topology_text,
        rounds=args.rounds,
        dataset=_dataset(args.dataset),
        partition=partition,
        model=model,
        model_text=model_text(model),
        task=task_of(args.dataset, args.task),
        seed=args.seed,
        out=_out_dir(args).resolve(),
        learning_rate=learning_rate if args.learning_rate is None else args.learning_rate,
        batch_size=batch_size if args.batch_size is None else args.batch_size,
        local_epochs=args.local_epochs,
        round_timeout=args.round_timeout,
        faults=_faults(args, ids),
        baseline=not args.no_baseline,
        snapshots=not args.no_snapshots,
        standardize=args.standardize,
        secure=args.secure,
        dp=_dp(args),
        progress=not args.quiet,
        rule=_rule(args),
        compression=_compression(args),
        consensus_step=args.consensus_step,
        byzantine=_parse_byzantine(args.byzantine, ids),
        hosts=_hosts(args, ids),
        net_faults=_net_faults(args, ids),
        ipv6=args.ipv6,
        ray=_ray(args),
        nodes_per_process=_nodes_per_process(args),
        eval_samples=args.eval_samples,
    )


def _dataset(text: str) -> str:
    """``--dataset`` with ``~`` expanded now (with ``--ray`` the harness later runs under a
    HOME of Ray's own)."""
    name, colon, folder = text.partition(":")
    if name == "fashion-mnist" and colon:
        return f"{name}:{Path(folder).expanduser()}"
    return str(Path(text).expanduser()) if text.endswith(".npz") else text


def _nodes_per_process(args: argparse.Namespace) -> int:
    """``--nodes-per-process K`` (each simulated host and each Ray actor runs one node)."""
    if args.nodes_per_process > 1 and args.hosts:
        raise P2PFLError("--nodes-per-process and --hosts do not go together (a host per node)")
    return int(args.nodes_per_process)


def _ray(args: argparse.Namespace) -> Any:
    """``--ray [ADDRESS]`` and its resources (refused without --ray, and with --hosts)."""
    from p2pfl.harness.ray_cluster import RayOptions

    if args.ray is None:
        for flag, value in (
            ("--cpus-per-peer", args.cpus_per_peer),
            ("--memory-per-peer", args.memory_per_peer),
        ):
            if value is not None:
                raise P2PFLError(f"{flag} needs --ray")
        return None
    if args.hosts:
        raise P2PFLError("--ray and --hosts do not go together (Ray places the peers itself)")
    return RayOptions(
        address=None if args.ray == "local" else args.ray,
        cpus_per_peer=args.cpus_per_peer,
        memory_per_peer_mb=args.memory_per_peer,
    )


def _net_faults(args: argparse.Namespace, ids: list[str]) -> tuple[Any, ...]:
    """``--split`` and ``--cut``, checked; they need ``--hosts`` (packets to drop)."""
    from p2pfl.harness.netfaults import NetFaultSpecError, parse_cut, parse_split

    if (args.split or args.cut) and not args.hosts:
        raise P2PFLError("--split and --cut drop packets between simulated hosts: add --hosts")
    try:
        return tuple(
            [parse_split(text, ids, args.rounds) for text in args.split]
            + [parse_cut(text, ids, args.rounds) for text in args.cut]
        )
    except NetFaultSpecError as exc:
        raise P2PFLError(str(exc)) from exc


def _hosts(args: argparse.Namespace, ids: list[str]) -> dict[str, Any] | None:
    """``--hosts`` with every peer's link (``--link``, ``--host-link``), checked; None
    without ``--hosts`` (then a link option is an error: there is no link to shape)."""
    from p2pfl.harness.hosts import check_available
    from p2pfl.harness.links import LinkSpecError, host_links, parse_link

    if not args.hosts:
        if args.link != "unlimited" or args.host_link or args.ipv6:
            raise P2PFLError("--link, --host-link and --ipv6 are for simulated hosts: add --hosts")
        return None
    try:
        links = host_links(ids, parse_link(args.link), args.host_link)
    except LinkSpecError as exc:
        message = str(exc)
        raise P2PFLError(message if message.startswith("--") else f"--link {message}") from exc
    check_available(links)
    return links


def _rule(args: argparse.Namespace) -> str:
    from p2pfl.core.aggregate import parse_rule

    try:
        rule = str(parse_rule(args.rule))
    except ValueError as exc:
        raise P2PFLError(f"--rule: {exc}") from exc
    if args.secure and parse_rule(rule).robust:
        raise P2PFLError(f"--rule {rule} cannot be combined with --secure (see peers.yaml)")
    return rule


def _compression(args: argparse.Namespace) -> str:
    from p2pfl.core.compress import parse_compression

    try:
        compression = parse_compression(args.compression)
    except ValueError as exc:
        raise P2PFLError(f"--compression: {exc}") from exc
    if args.secure and compression.enabled:
        raise P2PFLError(
            f"--compression {compression} cannot be combined with --secure (see peers.yaml)"
        )
    return str(compression)


def _faults(args: argparse.Namespace, ids: list[str]) -> tuple[Any, ...]:
    from p2pfl.harness.faults import parse_fault

    try:
        return tuple(
            [parse_fault("kill", text, ids, args.rounds) for text in args.kill]
            + [parse_fault("restart", text, ids, args.rounds) for text in args.restart]
        )
    except ValueError as exc:
        raise P2PFLError(str(exc)) from exc


def _topology(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """The topology section and how the report names it."""
    topology = args.topology or (
        {"kind": "k-regular", "degree": 4} if args.peers > 5 else {"kind": "full"}
    )
    degree = topology.get("degree")
    if degree is not None and not 1 <= degree < args.peers:
        raise P2PFLError(
            f"--topology k-regular:{degree} needs more than {degree} peers (--peers {args.peers})"
        )
    text = {
        "k-regular": f"k-regular:{topology.get('degree')}",
        "explicit-file": str(topology.get("path")),
    }.get(topology["kind"], topology["kind"])
    if topology.get("kind") == "explicit-file":
        topology = _explicit_topology(Path(topology["path"]))
    return topology, text


def _model(args: argparse.Namespace) -> dict[str, Any]:
    """The model section, with the torch optimiser the flags ask for."""
    model = dict(args.model)
    if model["kind"] == "torch":
        model["optimizer"] = {"kind": args.optimizer}
        if args.optimizer == "sgd":
            model["optimizer"]["momentum"] = (
                TORCH_MOMENTUM if args.momentum is None else args.momentum
            )
    elif args.optimizer != "sgd" or args.momentum:
        raise P2PFLError(
            f"--optimizer/--momentum apply to torch models; --model {model_text(model)} "
            "trains with plain SGD"
        )
    return model


def _out_dir(args: argparse.Namespace) -> Path:
    dataset_name = Path(args.dataset).stem if args.dataset.endswith(".npz") else args.dataset
    return Path(
        args.out
        or f"runs/{dataset_name.split(':')[0]}-{args.peers}p-{time.strftime('%Y%m%d-%H%M%S')}"
    )


def _dp(args: argparse.Namespace) -> dict[str, float] | None:
    if args.dp_noise is None:
        if args.dp_correlated is not None:
            raise P2PFLError("--dp-correlated adds to differential privacy: give --dp-noise too")
        return None
    dp = {"clip_norm": args.dp_clip, "noise_multiplier": args.dp_noise, "delta": args.dp_delta}
    if args.dp_correlated is not None:
        dp["correlated_multiplier"] = args.dp_correlated
    return dp


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
