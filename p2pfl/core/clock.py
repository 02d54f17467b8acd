"""The Lamport clock every message and event carries, kept safe from a hostile peer.

Logs from several machines merge in causal order by (lamport, node). A roster peer may
send any value, so the clock follows two rules (docs/protocol.md, "Lamport clocks").
"""

from __future__ import annotations

#: The largest Lamport time: our clock stops there (it saturates) and a peer's larger value
#: is a protocol error. Below 2**53 so that jq and JavaScript, which read JSON numbers as
#: doubles, merge logs exactly; far below the wire's u64 and the checkpoint's int64.
MAX_LAMPORT = 2**53 - 1
#: How far one received message may move our clock past its own value. Honest clocks that
#: talk every round stay within a few thousand ticks of each other, and a node that lost
#: its state catches up with a network at 10**8 in a handful of messages; a roster peer
#: sending a value near MAX_LAMPORT moves us by this much per message, not to the limit.
MAX_LAMPORT_STEP = 2**24


class LamportClock:
    """A Lamport logical clock that no peer can wedge.

    Two rules keep a hostile value harmless (docs/protocol.md, "Lamport clocks"): a receive
    moves the clock at most ``MAX_LAMPORT_STEP`` past its own value, and the clock saturates
    at ``MAX_LAMPORT`` instead of passing it, so nothing we send is ever above the limit
    our neighbours enforce. Saturated clocks (reachable only by a peer sending some 2**29
    messages) cost the logs their causal order, never the network a round.
    """

    def __init__(self, start: int = 0) -> None:
        self.value = min(max(start, 0), MAX_LAMPORT)

    def tick(self) -> int:
        """A local event or a send: advance and return the new time."""
        self.value = min(self.value + 1, MAX_LAMPORT)
        return self.value

    def observe(self, remote: int) -> int:
        """A receive: jump past the sender's time, by at most ``MAX_LAMPORT_STEP``."""
        seen = min(remote, self.value + MAX_LAMPORT_STEP)
        self.value = min(max(self.value, seen) + 1, MAX_LAMPORT)
        return self.value

    def restore(self, saved: int) -> None:
        """Continue past a value we wrote ourselves (a checkpoint, the log's last line),
        clamped to the limit so that a wedge written by an older version heals."""
        self.value = min(max(self.value, saved), MAX_LAMPORT)
