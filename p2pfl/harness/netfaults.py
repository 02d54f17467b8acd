"""Network faults on simulated hosts: ``--split GROUPS@WHEN`` and ``--cut PEER@WHEN``.

Pure scheduling and rules, no namespaces: the runner tells the plan where the peers are
and how long the run has gone, and applies the iptables rules the plan asks for
(``HostNetwork.set_faults``). Unlike a kill, nothing tells the peers: packets just stop.

- ``split A,B|C,D@R1-R2``: from when the furthest peer starts round R1 until every running
  peer has started round R2, the groups cannot reach each other (so each side trains
  apart for at least R2 - R1 rounds); peers in no group still reach everyone. ``half``
  names the first half of the peers against the second.
- ``cut P@R1-R2``: P's host drops every packet from the moment P starts round R1 until
  every other running peer has started round R2.
- WHEN may be seconds since the start instead: ``@5s-12s``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["split", "cut"]
Unit = Literal["round", "s"]


class NetFaultSpecError(ValueError):
    """A ``--split`` or ``--cut`` argument is malformed."""


@dataclass(frozen=True)
class NetFault:
    kind: Kind
    #: split: the groups cut from each other; cut: one group of the one peer.
    groups: tuple[tuple[str, ...], ...]
    start: float
    end: float
    unit: Unit
    text: str = field(default="", compare=False)

    def __str__(self) -> str:
        return self.text or f"{self.kind} {self.groups}@{self.start}-{self.end}"

    def rules(self, addresses: Mapping[str, str]) -> dict[str, set[str]]:
        """The iptables rules per host while this fault lasts (see ``set_faults``)."""
        if self.kind == "cut":
            return {self.groups[0][0]: {"cut"}}
        rules: dict[str, set[str]] = {}
        for i, group in enumerate(self.groups):
            others = [p for j, g in enumerate(self.groups) if j != i for p in g]
            for peer in group:
                rules[peer] = {f"drop {addresses[other]}" for other in others}
        return rules


def parse_when(text: str, rounds: int, flag: str) -> tuple[float, float, Unit]:
    """``R1-R2`` (rounds, R1 < R2 < rounds) or ``T1s-T2s`` (seconds, T1 < T2)."""
    first, sep, second = text.partition("-")
    if not sep:
        raise NetFaultSpecError(f"{flag}: {text!r} is not like 5-10 (rounds) or 2s-6s")
    if first.endswith("s") and second.endswith("s"):
        try:
            start, end = float(first[:-1]), float(second[:-1])
        except ValueError:
            raise NetFaultSpecError(f"{flag}: {text!r} is not like 2s-6s") from None
        if not 0 <= start < end:
            raise NetFaultSpecError(f"{flag}: {text!r} must start before it ends")
        return start, end, "s"
    if not (first.isdigit() and second.isdigit()):
        raise NetFaultSpecError(f"{flag}: {text!r} is not like 5-10 (rounds) or 2s-6s")
    start_round, end_round = int(first), int(second)
    if not start_round < end_round < rounds:
        raise NetFaultSpecError(
            f"{flag}: {text!r} needs FIRST < LAST <= {rounds - 1} (the last round)"
        )
    return start_round, end_round, "round"


def parse_split(text: str, peers: Sequence[str], rounds: int) -> NetFault:
    """``A,B|C,D@WHEN`` or ``half@WHEN``."""
    groups_text, sep, when = text.rpartition("@")
    if not sep:
        raise NetFaultSpecError(f"--split {text!r}: expected GROUP|GROUP@WHEN, e.g. half@5-10")
    groups: tuple[tuple[str, ...], ...]
    if groups_text == "half":
        middle = len(peers) // 2
        groups = (tuple(peers[:middle]), tuple(peers[middle:]))
    else:
        groups = tuple(tuple(p for p in g.split(",") if p) for g in groups_text.split("|"))
    if len(groups) < 2 or not all(groups):
        raise NetFaultSpecError(f"--split {text!r}: needs two or more groups, e.g. p00,p01|p02")
    named = [p for g in groups for p in g]
    for peer in named:
        if peer not in peers:
            raise NetFaultSpecError(f"--split {text!r}: no peer {peer!r}")
    if len(set(named)) != len(named):
        raise NetFaultSpecError(f"--split {text!r}: a peer is in two groups")
    start, end, unit = parse_when(when, rounds, f"--split {text!r}")
    return NetFault("split", groups, start, end, unit, f"split {groups_text}@{when}")


def parse_cut(text: str, peers: Sequence[str], rounds: int) -> NetFault:
    """``PEER@WHEN``."""
    peer, sep, when = text.rpartition("@")
    if not sep or peer not in peers:
        raise NetFaultSpecError(
            f"--cut {text!r}: expected PEER@WHEN with a known peer, e.g. p03@5-8"
        )
    start, end, unit = parse_when(when, rounds, f"--cut {text!r}")
    return NetFault("cut", ((peer,),), start, end, unit, f"cut {peer}@{when}")


class NetFaultPlan:
    """Which network faults hold now. ``step`` is told the peers' rounds and the elapsed
    time, and returns what began and what healed in this call."""

    def __init__(self, faults: Iterable[NetFault]) -> None:
        self.pending: list[NetFault] = list(faults)
        self.active: list[NetFault] = []
        self.healed: list[NetFault] = []

    def step(
        self, peer_rounds: Mapping[str, int], elapsed: float, running: Iterable[str] | None = None
    ) -> tuple[list[NetFault], list[NetFault]]:
        """``peer_rounds``: the round each peer started last; ``running``: the peers whose
        process runs (None: all in ``peer_rounds``)."""
        alive = set(peer_rounds if running is None else running)
        began = [f for f in self.pending if _reached(f, f.start, peer_rounds, elapsed, True)]
        for fault in began:
            self.pending.remove(fault)
            self.active.append(fault)
        live = {p: r for p, r in peer_rounds.items() if p in alive}
        healed = [f for f in self.active if _reached(f, f.end, live, elapsed, False)]
        for fault in healed:
            self.active.remove(fault)
            self.healed.append(fault)
        return began, healed

    def rules(self, addresses: Mapping[str, str]) -> dict[str, set[str]]:
        """Every active fault's rules, per host."""
        merged: dict[str, set[str]] = {}
        for fault in self.active:
            for peer, rules in fault.rules(addresses).items():
                merged.setdefault(peer, set()).update(rules)
        return merged

    @property
    def waiting(self) -> bool:
        """A fault still has to begin or heal."""
        return bool(self.pending or self.active)


def _reached(
    fault: NetFault, at: float, peer_rounds: Mapping[str, int], elapsed: float, begin: bool
) -> bool:
    if fault.unit == "s":
        return elapsed >= at
    if fault.kind == "cut":
        peer = fault.groups[0][0]
        if begin:  # the cut host itself has started that round: a cut mid-round
            return peer_rounds.get(peer, -1) >= at
        rounds = [r for p, r in peer_rounds.items() if p != peer]
    else:
        rounds = list(peer_rounds.values())
    if not rounds:
        return False
    # Begin with the network's front; heal once every (other) running peer got there.
    return (max(rounds) if begin else min(rounds)) >= at
