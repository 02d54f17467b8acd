"""The node's phases: one enum, one table of allowed moves."""

from __future__ import annotations

import pytest

from p2pfl.core.phases import TRANSITIONS, Phase, advance
from p2pfl.errors import LocalProtocolError


def test_rounds_follow_train_collect_aggregate_evaluate_then_finish() -> None:
    phase = Phase.STARTING
    for _ in range(2):
        for step in (Phase.TRAINING, Phase.COLLECTING, Phase.AGGREGATING, Phase.EVALUATING):
            phase = advance(phase, step)
    assert advance(phase, Phase.FINISHED) is Phase.FINISHED


def test_a_node_with_no_rounds_left_finishes_without_training() -> None:
    assert advance(Phase.STARTING, Phase.FINISHED) is Phase.FINISHED


@pytest.mark.parametrize("phase", list(Phase))
def test_stopping_is_allowed_from_anywhere_once(phase: Phase) -> None:
    if phase is Phase.STOPPING:
        with pytest.raises(LocalProtocolError):
            advance(phase, Phase.STOPPING)
    else:
        assert advance(phase, Phase.STOPPING) is Phase.STOPPING


@pytest.mark.parametrize(
    ("current", "new"),
    [
        (Phase.TRAINING, Phase.AGGREGATING),  # skipped collecting
        (Phase.COLLECTING, Phase.TRAINING),
        (Phase.EVALUATING, Phase.COLLECTING),
        (Phase.FINISHED, Phase.TRAINING),
        (Phase.STOPPING, Phase.TRAINING),
        (Phase.STARTING, Phase.EVALUATING),
    ],
)
def test_a_move_the_table_does_not_allow_is_a_local_error(current: Phase, new: Phase) -> None:
    with pytest.raises(LocalProtocolError, match=f"phase {current} cannot move to {new}"):
        advance(current, new)


def test_the_table_names_every_phase_and_status_reads_plain_strings() -> None:
    assert set(TRANSITIONS) == set(Phase)
    assert f"{Phase.COLLECTING}" == "collecting"
