"""``p2pfl check --privacy``: the topology privacy audit (``core.coalitions``) of a
peers.yaml, over every graph its rounds use, as text."""

from __future__ import annotations

from p2pfl.config import Config
from p2pfl.core.coalitions import Exposure, GraphAudit, audit_graph
from p2pfl.core.topology import epoch_for_round, graph_for_round

__all__ = ["privacy_report"]


def privacy_report(config: Config, max_coalition: int) -> str:
    """What coalitions of owners learn, for each distinct graph of the run's rounds."""
    aggregation = config.aggregation
    if not aggregation.secure:
        return (
            "privacy: aggregation.secure is false: every neighbour receives each model "
            "itself (encrypted on the wire only), so one neighbour learns it"
        )
    epochs: dict[int, list[int]] = {}
    for r in range(config.training.rounds):
        epochs.setdefault(epoch_for_round(config.topology, r), []).append(r)
    lines = [
        f"privacy audit: secure aggregation, threshold {aggregation.threshold:g}; coalitions "
        f"of up to {max_coalition} peers,",
        "each pooling its own model and the sums it owns",
    ]
    for rounds in epochs.values():
        graph = graph_for_round(config.topology, config.peer_ids, config.seed, rounds[0])
        audit = audit_graph(graph, aggregation.threshold, max_coalition=max_coalition)
        lines.append(_rounds(rounds, len(epochs) == 1))
        lines.extend(f"  {line}" for line in _describe(audit))
    lines += [
        "A coalition's sums are linear equations in the other peers' models, with public",
        "weights: where they pin one model down, the coalition has it exactly. Owners alone:",
        "no two are neighbours (no member colludes). See README, 'What secure aggregation",
        "hides'.",
    ]
    return "\n".join(lines)


def _rounds(rounds: list[int], only: bool) -> str:
    if only:
        return "every round (one graph):"
    if len(rounds) == 1:
        return f"round {rounds[0]}:"
    return f"rounds {rounds[0]}-{rounds[-1]}:"


def _describe(audit: GraphAudit) -> list[str]:
    searched = f"no coalition of up to {audit.searched} peers"
    if not audit.complete:
        searched += " found within the search's budget (the lying search is not exhaustive)"
    return [
        f"honest owners:                 {_exposure(audit.honest, searched)}",
        f"honest owners alone:           {_exposure(audit.honest_owners_only, searched)}",
        f"owners lying about dropouts:   {_exposure(audit.lying, searched)}",
        f"lying owners alone:            {_exposure(audit.lying_owners_only, searched)}",
    ]


def _exposure(found: Exposure | None, searched: str) -> str:
    if found is None:
        return searched
    who = ", ".join(found.coalition)
    victims = ", ".join(found.victims)
    text = f"{len(found.coalition)}: {who} learn the model of {victims}"
    for owner, present in sorted(found.presented.items()):
        text += f" ({owner} names only {', '.join(present)} present)"
    return text
