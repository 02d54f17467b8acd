"""Defences against unauthenticated traffic, sans I/O.

Anyone can open a TCP connection to a node. Two rules keep that from locking peers out or
filling the disk:

- ``Admission``: connections that have not yet authenticated share a fixed budget. When it
  is full, a pending connection is evicted rather than the newcomer refused: the oldest one
  from the source address holding the most pending connections. An attacker holding idle
  sockets open keeps losing them, a flood from one address evicts only its own connections,
  and a real peer's handshake (milliseconds) completes. Authenticated links leave the budget
  (there is at most one per peer in ``peers.yaml``).
- ``Throttle``: log events about unauthenticated sources are rate-limited per source
  address; the next event that gets through says how many were suppressed.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Generic, TypeVar

T = TypeVar("T")


class Admission(Generic[T]):
    """A budget of pending (unauthenticated) connections; evicts from the busiest source."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._pending: OrderedDict[T, str] = OrderedDict()  # oldest first -> source
        self._protected: set[T] = set()

    def admit(self, conn: T, source: str = "", *, protected: bool = False) -> T | None:
        """Count a new connection; returns the pending connection it evicts, if any.

        ``protected`` connections (from a configured peer's address) are evicted only when
        every pending connection is protected."""
        evicted = None
        if len(self._pending) >= self.capacity:
            pool = {c: s for c, s in self._pending.items() if c not in self._protected}
            if not pool:
                pool = dict(self._pending)
            counts = Counter(pool.values())
            if not protected:
                counts[source] += 1  # the newcomer counts towards its own source
            busiest = max(counts.values())
            evicted = next(c for c, s in pool.items() if counts[s] == busiest)
            del self._pending[evicted]
            self._protected.discard(evicted)
        self._pending[conn] = source
        if protected:
            self._protected.add(conn)
        return evicted

    def authenticated(self, conn: T) -> None:
        """The connection proved who it is: it no longer counts against the budget."""
        self.discard(conn)

    def discard(self, conn: T) -> None:
        self._pending.pop(conn, None)
        self._protected.discard(conn)

    def pending(self) -> list[T]:
        """The connections still unauthenticated, oldest first."""
        return list(self._pending)

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, conn: object) -> bool:
        return conn in self._pending


class Throttle:
    """At most ``burst`` events per key per ``window`` seconds."""

    def __init__(self, *, burst: int = 5, window: float = 10.0, max_keys: int = 4096) -> None:
        self.burst = burst
        self.window = window
        self.max_keys = max_keys
        self._state: dict[str, tuple[float, int, int]] = {}  # key -> (start, used, suppressed)

    def __len__(self) -> int:
        """How many keys are tracked now (bounded by ``max_keys``)."""
        return len(self._state)

    def allow(self, key: str, now: float) -> int | None:
        """None if the event should be dropped; else how many were dropped before it."""
        start, used, suppressed = self._state.get(key, (now, 0, 0))
        if now - start >= self.window:
            start, used = now, 0
        if used >= self.burst:
            self._state[key] = (start, used, suppressed + 1)
            return None
        if key not in self._state and len(self._state) >= self.max_keys:
            self._state.clear()  # bounded memory under address-spraying
        self._state[key] = (start, used + 1, 0)
        return suppressed


def printable(text: str, limit: int = 200) -> str:
    """Text from the other side of a connection, safe for one log line: control characters
    (newlines, terminal escapes) shown as escapes, and at most ``limit`` characters."""
    safe = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return safe if len(safe) <= limit else safe[:limit] + "..."
