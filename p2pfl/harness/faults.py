"""Faults on demand: ``--kill PEER@ROUND`` and ``--restart PEER@ROUND``.

Pure scheduling, no processes: the runner tells the plan where every peer is and which
are running, and the plan says what to do now.

- ``kill P@R``: SIGKILL peer P as soon as it has started round R (a crash mid-round).
- ``restart P@R``: start P again once the rest of the network has reached round R. If P
  is still running then, it is killed first (a crash followed by an immediate restart).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

Action = Literal["kill", "restart"]


class FaultSpecError(ValueError):
    """A ``--kill``/``--restart`` argument is malformed or names an unknown peer or round."""


@dataclass(frozen=True, order=True)
class Fault:
    round: int
    action: Action
    peer: str

    def __str__(self) -> str:
        return f"{self.action} {self.peer}@{self.round}"


def parse_fault(action: Action, text: str, peers: Iterable[str], rounds: int) -> Fault:
    """``PEER@ROUND`` with a known peer and ROUND in 0..rounds-1."""
    peer, sep, round_text = text.rpartition("@")
    if not sep or not peer or not round_text.isdigit():
        raise FaultSpecError(f"--{action} {text!r}: expected PEER@ROUND, e.g. p03@5")
    known = sorted(peers)
    if peer not in known:
        raise FaultSpecError(f"--{action} {text!r}: no peer {peer!r} (peers: {', '.join(known)})")
    round_index = int(round_text)
    if round_index >= rounds:
        raise FaultSpecError(
            f"--{action} {text!r}: round {round_index} is past the last round ({rounds - 1})"
        )
    return Fault(round_index, action, peer)


class FaultPlan:
    """The faults still to carry out, and those done."""

    def __init__(self, faults: Iterable[Fault]) -> None:
        self.pending: list[Fault] = sorted(faults)
        self.done: list[Fault] = []

    def due(self, peer_rounds: Mapping[str, int], running: Iterable[str]) -> list[Fault]:
        """Faults to carry out now, in order; each is returned once.

        ``peer_rounds`` is the latest round each peer has started (absent: not started yet).
        A restart waits until its own kills (at earlier or equal rounds) have happened, in
        an earlier call.
        """
        alive = set(running)
        fired: list[Fault] = []
        for fault in list(self.pending):
            if fault.action == "kill":
                ready = fault.peer in alive and peer_rounds.get(fault.peer, -1) >= fault.round
            else:
                if any(  # its kill first, and not in the same step: the peer is down a while
                    f.peer == fault.peer and f.action == "kill" and f.round <= fault.round
                    for f in self.pending
                ):
                    continue
                others = [r for p, r in peer_rounds.items() if p != fault.peer and p in alive]
                ready = bool(others) and max(others) >= fault.round
            if ready:
                fired.append(fault)
                if fault.action == "kill":
                    alive.discard(fault.peer)
        for fault in fired:
            self.pending.remove(fault)
            self.done.append(fault)
        return fired

    def restarts_pending(self, peer: str) -> bool:
        return any(f.peer == peer and f.action == "restart" for f in self.pending)
