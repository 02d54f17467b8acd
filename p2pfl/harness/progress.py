"""Live progress of a harness run, folded from the peers' event logs (pure, no I/O)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from p2pfl.logs.read import Event


@dataclass
class PeerProgress:
    round: int = -1  # latest round started
    rounds_done: int = 0
    last_round_done: int = -1
    #: The latest eval's accuracy (regression: its R^2).
    accuracy: float | None = None
    finished: bool = False
    #: The node logged node_start (its process loaded: torch, data, the model).
    started: bool = False


@dataclass
class RunProgress:
    peers: list[str]
    total_rounds: int
    by_peer: dict[str, PeerProgress] = field(default_factory=dict)
    #: What the evals report: ``accuracy``, or ``r2`` in a regression network.
    metric: str = "accuracy"

    def __post_init__(self) -> None:
        for peer in self.peers:
            self.by_peer.setdefault(peer, PeerProgress())

    def update(self, events: Iterable[Event]) -> None:
        for event in events:
            state = self.by_peer.get(event.node)
            if state is None:
                continue
            kind = event.type
            round_index = event.round
            if kind == "node_start":
                state.started = True
            elif kind == "round_start" and round_index is not None:
                state.round = max(state.round, round_index)
            elif kind == "round_end":
                state.rounds_done += 1
                if round_index is not None:
                    state.last_round_done = max(state.last_round_done, round_index)
            elif kind == "eval":
                for metric in ("accuracy", "r2"):
                    value = event.get(metric)
                    if isinstance(value, int | float) and not isinstance(value, bool):
                        state.accuracy = float(value)
                        self.metric = metric
            elif kind == "node_stop" and event.get("finished") is True:
                state.finished = True

    def is_done(self, peer: str) -> bool:
        """Finished its last round (it may still be lingering or writing its checkpoint)."""
        state = self.by_peer[peer]
        return state.finished or state.last_round_done >= self.total_rounds - 1

    def started_rounds(self) -> dict[str, int]:
        return {p: s.round for p, s in self.by_peer.items() if s.round >= 0}

    def line(self, running: int, elapsed: float) -> str:
        """One status line: rounds (slowest..fastest), mean latest accuracy (or R^2), peers
        running. Before every peer is in a round: how many still load (a torch peer's
        import takes seconds) and how many wait for their neighbours."""
        states = self.by_peer.values()
        if any(s.round < 0 and not s.finished for s in states):
            loading = sum(1 for s in states if not s.started)
            waiting = sum(1 for s in states if s.started and s.round < 0 and not s.finished)
            training = len(self.peers) - loading - waiting
            parts = [f"{loading} loading"] if loading else []
            parts += [f"{waiting} waiting for neighbours"] if waiting else []
            parts += [f"{training} training round 1"] if training else []
            return (
                f"starting: {', '.join(parts)}  {running}/{len(self.peers)} running  "
                f"{elapsed:5.1f}s"
            )
        rounds = [
            s.round + 1 if not s.finished else self.total_rounds for s in self.by_peer.values()
        ]
        accs = [s.accuracy for s in self.by_peer.values() if s.accuracy is not None]
        name = "acc" if self.metric == "accuracy" else "R^2"
        acc = f"{name} {sum(accs) / len(accs):.4f}" if accs else f"{name} -"
        per_peer = f"  [{' '.join(map(str, rounds))}]" if len(rounds) <= 12 else ""
        return (
            f"round {min(rounds)}..{max(rounds)}/{self.total_rounds}{per_peer}  {acc}  "
            f"{running}/{len(self.peers)} running  {elapsed:5.1f}s"
        )
