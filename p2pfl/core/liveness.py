"""Which neighbours have gone silent for longer than their own history makes plausible.

A phi accrual failure detector (Hayashibara et al. 2004; as in Akka and Cassandra): per
neighbour, the gaps between arrivals of anything it sends (parameter chunks, STATUS,
keepalives, the secure exchange) form a distribution; the longer the current silence, the
less likely it is under that distribution, and ``phi = -log10(P(a gap this long))`` grows
continuously. A neighbour is *suspected* once phi reaches the threshold. On a loopback
network with 25 ms rounds that is well under a second of silence; on a link whose gaps
are long and irregular it is correspondingly later. Every node keeps each link from
staying silent longer than ``net.keepalive`` (a STATUS), so a live neighbour's gaps are
short whatever its rounds take.

The gaps are modelled as normal with mean ``mu`` and deviation ``sigma`` (at least
``MIN_STD``), plus a silence always accepted on top (``pause``: scheduling hiccups,
garbage collection, a busy core), as Akka's acceptable-heartbeat-pause does. Pure: the
caller passes the time.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from dataclasses import dataclass
from statistics import NormalDist

#: Floor of the gaps' deviation: a perfectly regular history must not turn a few
#: milliseconds of lateness into suspicion.
MIN_STD = 0.05
#: A young link knows little of its own rhythm (TCP's slow start, a first retransmission
#: timeout on a thin link): over its first YOUNG_GAPS gaps the deviation's floor falls from
#: YOUNG_STD to MIN_STD, so a new link is suspected after ~1.8 s of silence at first and
#: ~0.6 s (on a LAN) once it has shown its rhythm.
YOUNG_STD = 0.25
YOUNG_GAPS = 20
#: Arrivals closer than this to the previous one are one burst (the chunks of one model):
#: they refresh the time last heard but add no gap to the history.
BURST_GAP = 0.001
#: Gaps remembered per neighbour.
WINDOW = 200
#: phi is capped here (a silence of many sigmas is simply "gone").
MAX_PHI = 300.0


@dataclass(frozen=True)
class DetectorSettings:
    """``threshold``: phi at which a neighbour is suspected; ``pause``: silence always
    accepted on top of the usual gaps (seconds); ``expected_gap``: the gap assumed before
    any was seen (the keepalive)."""

    threshold: float = 8.0
    pause: float = 0.3
    expected_gap: float = 0.1

    @functools.cached_property
    def threshold_sigmas(self) -> float:
        """How many sigmas past the mean a silence reaches the threshold."""
        return NormalDist().inv_cdf(1.0 - 10.0 ** (-self.threshold))


class ArrivalHistory:
    """One neighbour's arrivals: the recent gaps and when it was last heard."""

    def __init__(self, settings: DetectorSettings, now: float) -> None:
        self.settings = settings
        self.last = now
        #: Real gaps seen so far (not the made-up first two).
        self.seen = 0
        self._gaps: deque[float] = deque(maxlen=WINDOW)
        self._sum = 0.0
        self._squares = 0.0
        # Two made-up gaps around the expected one, so that the first real silence is
        # judged against something (Akka's first-heartbeat estimate).
        guess = settings.expected_gap
        for gap in (guess * 0.75, guess * 1.25):
            self._add(gap)

    def _add(self, gap: float) -> None:
        if len(self._gaps) == self._gaps.maxlen:
            old = self._gaps[0]
            self._sum -= old
            self._squares -= old * old
        self._gaps.append(gap)
        self._sum += gap
        self._squares += gap * gap

    def heard(self, now: float, capped: bool = False) -> None:
        """An arrival; the gap since the last one joins the history (``capped``: at most
        the silence that reached the threshold)."""
        gap = now - self.last
        if gap >= BURST_GAP:  # (most reads are a burst's: nothing to compute)
            if capped:
                gap = min(gap, self.suspect_at() - self.last)
            self._add(gap)
            self.seen += 1
        self.last = max(self.last, now)

    @property
    def mean(self) -> float:
        return self._sum / len(self._gaps)

    @property
    def std(self) -> float:
        n = len(self._gaps)
        variance = max(0.0, self._squares / n - self.mean**2)
        young = max(0.0, 1.0 - self.seen / YOUNG_GAPS)
        return max(MIN_STD + young * (YOUNG_STD - MIN_STD), math.sqrt(variance))

    def phi(self, now: float) -> float:
        """The suspicion level of the silence since ``last`` (0 right after an arrival)."""
        silence = now - self.last
        y = (silence - self.mean - self.settings.pause) / self.std
        p_later = 0.5 * math.erfc(y / math.sqrt(2.0))
        if p_later <= 0.0:
            return MAX_PHI
        return min(MAX_PHI, max(0.0, -math.log10(p_later)))

    def suspect_at(self) -> float:
        """When phi reaches the threshold if nothing arrives before."""
        sigmas = self.settings.threshold_sigmas
        return self.last + self.mean + self.settings.pause + sigmas * self.std


class Liveness:
    """Every neighbour's arrival history, and which are suspected now (for events)."""

    def __init__(self, settings: DetectorSettings) -> None:
        self.settings = settings
        self.histories: dict[str, ArrivalHistory] = {}
        #: Suspicions reported (``newly_suspected``) and not yet cleared by an arrival.
        self.reported: dict[str, float] = {}

    def heard(self, peer: str, now: float, *, reconnected: bool = False) -> float | None:
        """Something arrived from ``peer`` (``reconnected``: a new connection came up).
        Returns how long it had been silent if it was reported suspected (the suspicion
        ends here), else None.

        An outage is not a sample of the link's normal gaps: a silence past the threshold
        joins the history only up to the threshold (so a link that really stalls that
        long now and then is learned, gradually, while a 30 s cut does not make the next
        one take 12 s to notice), and one that spans a reconnection not at all.
        """
        history = self.histories.get(peer)
        was_reported = self.reported.pop(peer, None) is not None
        if history is None:
            self.histories[peer] = ArrivalHistory(self.settings, now)
            return None
        silence = now - history.last
        if reconnected:
            history.last = max(history.last, now)
        else:
            history.heard(now, capped=True)
        return silence if was_reported else None

    def suspected(self, peer: str, now: float) -> bool:
        """Silent past the threshold. A peer never heard from is not suspected (whether it
        is there at all is the connection's business)."""
        history = self.histories.get(peer)
        return history is not None and now >= history.suspect_at()

    def phi(self, peer: str, now: float) -> float:
        history = self.histories.get(peer)
        return 0.0 if history is None else history.phi(now)

    def suspect_at(self, peer: str) -> float | None:
        history = self.histories.get(peer)
        return None if history is None else history.suspect_at()

    def newly_suspected(self, peers: frozenset[str], now: float) -> list[tuple[str, float]]:
        """Those of ``peers`` suspected now and not reported before, with their phi; they
        count as reported from here on."""
        fresh = []
        for peer in sorted(peers):
            if peer not in self.reported and self.suspected(peer, now):
                self.reported[peer] = now
                fresh.append((peer, self.phi(peer, now)))
        return fresh
