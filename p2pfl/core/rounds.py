"""The round state machine of one node, sans I/O.

Everything that decides *which* parameters belong to *which* round lives here: what to do
with an incoming stream (keep, buffer for a later round, drop), when collection for the
current round is over, and which round comes next. The asyncio node only feeds it events
and the clock, which makes the rules testable without sockets.

Rules:
- Parameters for the current round, or a later one within ``max_buffered_rounds``, from a
  peer that is a neighbour in that round, are kept. Past rounds, rounds whose members are
  fixed already, rounds past the last, rounds too far ahead, non-neighbours, neighbours
  left out of this round (secure aggregation: no keys in time) and duplicates are dropped
  with a reason. (A peer's own claims never widen the window: otherwise it could make us
  hold one model per remaining round.)
- Collection ends when every neighbour delivered, or each missing one has announced a
  later round (it will never send this one), is gone (disconnected for ``down_grace``),
  was left out, or is connected but suspected by the failure detector (silent for longer
  than its history makes plausible: ``core.liveness``), or the deadline passed. While
  fewer than ``min_models`` models are in, suspected neighbours are still waited for
  (until gone, or the deadline): a node cut off from everyone does not race through the
  remaining rounds alone while its links may come back.
- The next round is ``max(current + 1, lower median of the neighbours' announced rounds)``:
  a node that restarted or was cut off jumps to where most of its neighbours are (averaging
  pulls its model back), while a single lying neighbour cannot make it skip rounds.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from dataclasses import dataclass

import numpy as np

from p2pfl.core.liveness import Liveness


@dataclass(frozen=True)
class Verdict:
    keep: bool
    reason: str = ""


def may_send(
    round_index: int, announced: int | None, sent_round: int | None, max_buffered_rounds: int
) -> bool:
    """Whether round ``round_index``'s parameters go out on a link now: once per link, and
    only when the neighbour announced (on that very link) a round that would keep them,
    its current one or up to ``max_buffered_rounds`` before ours (a restarted neighbour
    still at its checkpoint round gets them when it announces our round)."""
    if sent_round == round_index or announced is None:
        return False
    return announced_keeps(round_index, announced, max_buffered_rounds)


def announced_keeps(round_index: int, announced: int, max_buffered_rounds: int) -> bool:
    """A neighbour at round ``announced`` keeps what we send for ``round_index``: it is
    its current round or within its buffering window. The one copy of that rule, for
    parameter streams and secure aggregation's KEYS alike."""
    return round_index - max_buffered_rounds <= announced <= round_index


class RoundTracker:
    """Per-node bookkeeping of rounds, neighbours' progress and received parameters."""

    def __init__(
        self,
        *,
        total_rounds: int,
        neighbours_of: Callable[[int], frozenset[str]],
        max_buffered_rounds: int,
        start_round: int = 0,
        down_grace: float = float("inf"),
        liveness: Liveness | None = None,
        min_models: int = 0,
    ) -> None:
        self.total_rounds = total_rounds
        self.neighbours_of = neighbours_of
        self.max_buffered_rounds = max_buffered_rounds
        self.current = start_round
        self.deadline: float | None = None
        self.peer_rounds: dict[str, int] = {}
        self._received: dict[int, dict[str, np.ndarray]] = {}
        self.down_grace = down_grace
        #: The last round whose parameters were handed over for aggregation.
        self.closed = -1
        #: Neighbours without a connection, and since when (the caller's monotonic clock).
        self.down_since: dict[str, float] = {}
        #: Neighbours left out of the current round (secure aggregation: no keys from them).
        self.excluded: frozenset[str] = frozenset()
        #: Who is silent for too long (None: only connections decide).
        self.liveness = liveness
        #: Below this many models in, suspected neighbours are still waited for.
        self.min_models = min_models

    # --- what neighbours tell us ---------------------------------------------------------

    def note_peer_round(self, peer: str, round_index: int) -> None:
        """A neighbour announced its current round (capped: a peer cannot push us past the end)."""
        self.peer_rounds[peer] = min(round_index, self.total_rounds)

    def forget_peer(self, peer: str) -> None:
        """A neighbour disconnected: its round is unknown until it speaks again, unless it
        had finished (then it will never send again, and nobody should wait for it)."""
        if self.peer_rounds.get(peer, 0) < self.total_rounds:
            self.peer_rounds.pop(peer, None)

    def mark_down(self, peer: str, now: float) -> None:
        """``peer`` has no connection (it dropped, or never came) as of ``now``."""
        self.down_since.setdefault(peer, now)

    def mark_up(self, peer: str) -> None:
        self.down_since.pop(peer, None)

    def gone(self, peer: str, now: float) -> bool:
        """No connection for ``down_grace`` or longer: crashed or left."""
        since = self.down_since.get(peer)
        return since is not None and now >= since + self.down_grace

    def grace_ends(self, peer: str) -> float | None:
        """When a disconnected ``peer`` will count as gone (None: it is connected)."""
        since = self.down_since.get(peer)
        return None if since is None else since + self.down_grace

    def not_ready(
        self,
        neighbours: frozenset[str],
        connected: Container[str],
        *,
        resumed: bool,
        now: float,
    ) -> list[str]:
        """At start-up: the neighbours still waited for, those not connected or whose round
        is unknown. A resuming node (the network is already running) stops waiting for one
        disconnected for ``down_grace``."""
        return sorted(
            p
            for p in neighbours
            if not (p in connected and p in self.peer_rounds)
            and not (resumed and self.gone(p, now))
        )

    def startup_wakeup(self, waiting: list[str], *, resumed: bool, deadline: float) -> float:
        """When the start-up wait must look again without news: the start-up deadline, or
        (resuming) when a waited-for neighbour's grace ends."""
        graces = [self.grace_ends(p) for p in waiting] if resumed else []
        return min([deadline, *(g for g in graces if g is not None)])

    def consensus_round(self, round_index: int | None = None) -> int:
        """The lower median of the rounds announced by this round's neighbours (0 if none)."""
        neighbours = self.neighbours_of(self.current if round_index is None else round_index)
        known = sorted(self.peer_rounds[p] for p in neighbours if p in self.peer_rounds)
        if not known:
            return 0
        return known[(len(known) - 1) // 2]

    @property
    def horizon(self) -> int:
        """The last round we keep anything for now (the buffering window's end)."""
        return self.current + self.max_buffered_rounds

    def in_window(self, round_index: int) -> bool:
        """Round ``round_index`` is the current one or within the buffering window."""
        return self.current <= round_index <= self.horizon

    def judge(self, peer: str, round_index: int) -> Verdict:
        """Decide, before receiving it, whether a parameter stream is worth keeping."""
        if round_index < self.current:
            return Verdict(False, f"past round {round_index} (now at round {self.current})")
        if round_index <= self.closed:
            return Verdict(False, f"round {round_index} arrived after its members were fixed")
        if round_index >= self.total_rounds:
            return Verdict(False, f"round {round_index} is beyond the last round")
        if round_index > self.horizon:
            return Verdict(
                False, f"round {round_index} too far ahead (buffering up to {self.horizon})"
            )
        if peer not in self.neighbours_of(round_index):
            return Verdict(False, f"not a neighbour in round {round_index}")
        if round_index == self.current and peer in self.excluded:
            return Verdict(False, f"left out of round {round_index} (no keys in time)")
        if peer in self._received.get(round_index, {}):
            return Verdict(False, f"duplicate parameters for round {round_index}")
        return Verdict(True)

    def deliver(self, peer: str, round_index: int, params: np.ndarray) -> Verdict:
        """Store a completed stream (judged again: the round may have moved meanwhile)."""
        verdict = self.judge(peer, round_index)
        if verdict.keep:
            self._received.setdefault(round_index, {})[peer] = params
        return verdict

    # --- the current round ---------------------------------------------------------------

    def start_round(self, round_index: int) -> None:
        """Enter a round; buffered parameters of earlier rounds are released."""
        self.current = round_index
        self.deadline = None
        self.excluded = frozenset()
        for old in [r for r in self._received if r < round_index]:
            del self._received[old]

    def start_collecting(self, now: float, timeout: float) -> None:
        self.deadline = now + timeout

    def exclude(self, peers: frozenset[str]) -> None:
        """Stop waiting for, and refuse, these neighbours' parameters this round."""
        self.excluded = self.excluded | peers

    def missing(self) -> frozenset[str]:
        got = self._received.get(self.current, {})
        return frozenset(p for p in self.neighbours_of(self.current) if p not in got)

    def silent(self, peer: str, now: float) -> bool:
        """Connected, but suspected by the failure detector. (A closed connection is
        ``down_since``'s business: it is given ``down_grace`` to come back.)"""
        return (
            self.liveness is not None
            and peer not in self.down_since
            and self.liveness.suspected(peer, now)
        )

    def unavailable(self, peer: str, now: float) -> bool:
        """Gone (no connection for ``down_grace``) or silent (connected, but suspected):
        nothing more is expected from it until it is heard again."""
        return self.gone(peer, now) or self.silent(peer, now)

    def gives_up_at(self, peer: str) -> float | None:
        """When ``peer`` will count as unavailable if nothing is heard: the end of its
        grace if it is disconnected, else when the detector would suspect it."""
        if peer in self.down_since:
            return self.grace_ends(peer)
        return None if self.liveness is None else self.liveness.suspect_at(peer)

    def waiting_for(self, now: float) -> frozenset[str]:
        """Missing neighbours that may still send this round's parameters: not those that
        announced a later round, nor those disconnected for ``down_grace`` or longer, nor
        (once ``min_models`` models are in) silent ones."""
        candidates = frozenset(
            p
            for p in self.missing()
            if self.peer_rounds.get(p, 0) <= self.current
            and not self.gone(p, now)
            and p not in self.excluded
        )
        if len(self._received.get(self.current, {})) < self.min_models:
            return candidates
        return frozenset(p for p in candidates if not self.silent(p, now))

    def collection_done(self, now: float) -> bool:
        if not self.waiting_for(now):
            return True
        return self.deadline is not None and now >= self.deadline

    def next_wakeup(self, now: float) -> float | None:
        """When collection_done may turn true without any news: the deadline, or earlier
        when a waited-for neighbour's grace runs out or it would be suspected."""
        waiting = self.waiting_for(now)
        times = [self.down_since[p] + self.down_grace for p in waiting if p in self.down_since]
        if self.liveness is not None:
            for p in waiting:
                at = self.liveness.suspect_at(p)
                if p not in self.down_since and at is not None and at > now:
                    times.append(at)
        if self.deadline is not None:
            times.append(self.deadline)
        return min(times) if times else None

    def take_received(self) -> dict[str, np.ndarray]:
        """Hand over this round's parameters (the caller aggregates them). Later arrivals
        for this round are refused: its members are fixed now."""
        self.closed = max(self.closed, self.current)
        return self._received.pop(self.current, {})

    def next_round(self) -> int:
        return max(self.current + 1, self.consensus_round())

    def buffered_rounds(self) -> list[int]:
        return sorted(self._received)
