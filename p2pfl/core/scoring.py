"""Peer scoring: which neighbours' updates keep being rejected as outliers (pure, no I/O).

The robust aggregation rules flag, per round, the neighbours whose vectors were non-finite,
clipped or far from the aggregate. One flag can be bad luck (a neighbour whose data
differs, early rounds); a neighbour flagged in ``threshold`` of its last ``window``
rounds is a suspect, and the node logs a ``suspect`` event for it (once each time it
becomes one), for the operator to look into. Nothing is done to it automatically: the
robust rule already bounds what it can do.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

__all__ = ["Suspect", "SuspectTracker"]


@dataclass(frozen=True)
class Suspect:
    """A neighbour that just became a suspect: flagged ``flagged`` times in the last
    ``window`` rounds it took part in, most often for ``reason``."""

    peer: str
    reason: str
    flagged: int
    window: int


@dataclass
class SuspectTracker:
    window: int = 5
    threshold: int = 3
    #: Per neighbour, the reason it was flagged (or None) in each of its latest rounds.
    history: dict[str, deque[str | None]] = field(default_factory=dict)
    suspected: set[str] = field(default_factory=set)

    def record(self, members: set[str], flagged: dict[str, str]) -> list[Suspect]:
        """One round's outcome: ``members`` the neighbours whose vectors arrived,
        ``flagged`` those the rule rejected (with the reason). Returns the neighbours that
        became suspects with this round."""
        new: list[Suspect] = []
        for peer in sorted(members | set(flagged)):
            past = self.history.setdefault(peer, deque(maxlen=self.window))
            past.append(flagged.get(peer))
            reasons = Counter(r for r in past if r is not None)
            count = sum(reasons.values())
            if count >= self.threshold and peer not in self.suspected:
                self.suspected.add(peer)
                new.append(Suspect(peer, reasons.most_common(1)[0][0], count, self.window))
            elif count < self.threshold:
                self.suspected.discard(peer)  # well-behaved again: may be reported anew
        return new
