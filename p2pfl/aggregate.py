"""Aggregation rules, pure numpy."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def metropolis_average(
    own_id: str,
    own: np.ndarray,
    received: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
) -> tuple[np.ndarray, dict[str, float]]:
    """Metropolis-Hastings gossip average, renormalised over the members present.

    ``weights`` holds w_ij for the node itself and all its neighbours this round. Neighbours
    missing from ``received`` are left out and the remaining weights rescaled to sum to one.
    Works in place on ``own`` and on the received arrays (which are consumed) so a 100 MB
    model needs no extra model-sized temporaries. Returns the average and the weights used.
    """
    members = [own_id, *sorted(p for p in received if p in weights)]
    total = sum(weights[m] for m in members)
    used = {m: weights[m] / total for m in members}
    own *= np.float32(used[own_id])
    for peer in members[1:]:
        contribution = received[peer]
        contribution *= np.float32(used[peer])
        own += contribution
    return own, used
