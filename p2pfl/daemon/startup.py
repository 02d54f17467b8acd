"""What a starting node says about the neighbours it waits for, and the exit code of a
node that never reached enough of them.

A node that reaches nobody must not train alone in silence: while it waits it says, every
``REPORT_EVERY`` seconds, whom it waits for and why (the network remembers the last reason
a dial failed, see ``Network.unreached``); a node that has fewer than
``training.min_neighbours`` neighbours when ``training.startup_timeout`` ends stops with
``EXIT_ALONE``, and so does a run in which no round averaged that many neighbours' models.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping

from p2pfl.proto.guard import printable

#: The exit code of a node that never had ``training.min_neighbours`` neighbours.
EXIT_ALONE = 3
#: Seconds between two "waiting for ..." lines while a node starts.
REPORT_EVERY = 5.0


def why_missing(
    peer: str, own_id: str, *, linked: Container[str], unreached: Mapping[str, str]
) -> str:
    """Why ``peer`` is not ready yet, in words an operator can act on."""
    if peer in linked:
        return "connected, its round not announced yet"
    if peer in unreached:
        return printable(unreached[peer], 400)  # (parts of it may come from the other end)
    if peer < own_id:  # (the smaller id dials; we only announce ourselves once)
        return "not connected yet: it dials us"
    return "not connected yet"


def waiting_for(
    peers: Iterable[str], own_id: str, *, linked: Container[str], unreached: Mapping[str, str]
) -> str:
    """``bob: connection refused at ws://...; carol: not connected yet``."""
    return "; ".join(
        f"{p}: {why_missing(p, own_id, linked=linked, unreached=unreached)}" for p in sorted(peers)
    )
