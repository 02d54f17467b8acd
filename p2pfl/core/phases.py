"""What a node is doing, as one enum and one table of the moves allowed between phases.

``p2pfl status`` reports the phase; the node moves through it with :func:`advance`, so a
move the table does not allow is a bug that shows at once (a ``LocalProtocolError``)
instead of a status that lies.
"""

from __future__ import annotations

import enum

from p2pfl.errors import LocalProtocolError


class Phase(enum.StrEnum):
    STARTING = "starting"
    TRAINING = "training"
    COLLECTING = "collecting"
    AGGREGATING = "aggregating"
    EVALUATING = "evaluating"
    FINISHED = "finished"
    STOPPING = "stopping"


#: Every allowed move. A round is train -> collect -> aggregate -> evaluate; a node that
#: resumes at the last round (or has no rounds left) finishes without training; it may be
#: stopped (a signal, an error) at any point, and stopping is the end.
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.STARTING: frozenset({Phase.TRAINING, Phase.FINISHED}),
    Phase.TRAINING: frozenset({Phase.COLLECTING}),
    Phase.COLLECTING: frozenset({Phase.AGGREGATING}),
    Phase.AGGREGATING: frozenset({Phase.EVALUATING}),
    Phase.EVALUATING: frozenset({Phase.TRAINING, Phase.FINISHED}),
    Phase.FINISHED: frozenset(),
    Phase.STOPPING: frozenset(),
}


def advance(current: Phase, new: Phase) -> Phase:
    """``new`` if the table allows the move from ``current`` (stopping is always allowed,
    once); raises LocalProtocolError otherwise."""
    if new is Phase.STOPPING and current is not Phase.STOPPING:
        return new
    if new not in TRANSITIONS[current]:
        raise LocalProtocolError(f"phase {current} cannot move to {new}")
    return new
