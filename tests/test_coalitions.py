"""The topology privacy audit (``p2pfl.core.coalitions``): which coalitions of group owners
learn a peer's vector from their secure-aggregation sums. Its first tests are the three
cases a review of secure aggregation found by attacking real runs (issue 25)."""

from __future__ import annotations

import numpy as np
import pytest

from p2pfl.core.coalitions import audit_graph, determined
from p2pfl.core.topology import TopologyConfig, graph_for_round


def ids(n: int) -> tuple[str, ...]:
    return tuple(f"p{i:02d}" for i in range(n))


def k_regular(n: int, degree: int = 4, seed: int = 7) -> dict[str, frozenset[str]]:
    return graph_for_round(TopologyConfig("k-regular", degree, (), 0), ids(n), seed, 0)


def ring(n: int) -> dict[str, frozenset[str]]:
    return graph_for_round(TopologyConfig("ring", None, (), 0), ids(n), 7, 0)


def test_determined_is_the_row_space_test() -> None:
    # x0 + x1 and x1 + x2 and x0 + x2 pin all three; the first two alone pin none
    rows = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
    assert determined(rows).tolist() == [True, True, True]
    assert determined(rows[:2]).tolist() == [False, False, False]
    assert determined(np.array([[0.2, 0.0, 0.0], [0.0, 0.2, 0.2]])).tolist() == [
        True,
        False,
        False,
    ]
    assert determined(np.zeros((0, 3))).tolist() == [False, False, False]


def test_review_case_1_two_owners_one_lying_about_a_dropout() -> None:
    """Harness default --peers 6 --secure (k-regular:4, seed 7): p00 and p01 are not
    neighbours and both own {p02..p05}. One names p05 dropped (it did send): the
    difference of the two sums is p05's vector. No member colludes."""
    graph = k_regular(6)
    assert graph["p00"] == graph["p01"] == {"p02", "p03", "p04", "p05"}
    audit = audit_graph(graph, 0.5)
    found = audit.lying_owners_only
    assert found is not None and found.coalition == ("p00", "p01")
    assert found.victims == ("p05",) and found.presented == {"p01": ("p02", "p03", "p04")}
    assert audit.lying == found
    # honest, two owners of the same group hold the same sum: they learn nothing more
    assert audit.honest is not None and len(audit.honest.coalition) == 3
    assert audit.honest_owners_only is None


def test_review_case_2_a_ring_of_six_and_three_honest_owners() -> None:
    """A ring of 6: the non-adjacent owners p00, p02, p04, following the protocol, pool
    x01 + x05, x01 + x03, x03 + x05 (times 1/3): three equations, three unknowns."""
    audit = audit_graph(ring(6), 0.5)
    found = audit.honest_owners_only
    assert found is not None and found.coalition == ("p00", "p02", "p04")
    assert found.victims == ("p01", "p03", "p05") and not found.lying
    # with a colluding member, two peers suffice: a group of two minus one known member
    assert audit.honest is not None and audit.honest.coalition == ("p00", "p01")


def test_review_case_3_eight_peers_and_three_honest_owners() -> None:
    """8 peers, k-regular:4 (the README's example): honest p00, p01 and p04 recover p07."""
    audit = audit_graph(k_regular(8), 0.5)
    assert audit.honest is not None
    assert audit.honest.coalition == ("p00", "p01", "p04") and audit.honest.victims == ("p07",)
    # lying about one dropout, two owners are enough
    assert audit.lying is not None and len(audit.lying.coalition) == 2


def test_a_full_graph_of_three_exposes_to_one_neighbour_pair() -> None:
    """Full graph of 3: an owner's group is the other two; knowing one (a colluding member)
    gives the other. No single owner learns anything alone."""
    graph = graph_for_round(TopologyConfig("full", None, (), 0), ids(3), 7, 0)
    audit = audit_graph(graph, 0.5)
    assert audit.honest is not None and len(audit.honest.coalition) == 2
    assert audit.honest_owners_only is None  # (all three are neighbours)


def test_a_higher_threshold_takes_lies_away() -> None:
    """With threshold 0.75, a group of 4 needs all 4 present: no owner can leave anyone
    out, so lying gains nothing over honesty."""
    audit = audit_graph(k_regular(6), 0.75)
    assert audit.lying_owners_only is None
    assert audit.lying is not None and audit.honest is not None
    assert len(audit.lying.coalition) == len(audit.honest.coalition)


def test_the_search_stops_at_its_budget_and_says_so() -> None:
    audit = audit_graph(k_regular(16, degree=6), 0.5, max_coalition=3, budget=50)
    assert not audit.complete
    full = audit_graph(k_regular(8), 0.5, max_coalition=2)
    assert full.complete and full.searched == 2 and full.honest is None


@pytest.mark.parametrize("n", [5, 8, 12])
def test_what_the_audit_finds_really_is_determined(n: int) -> None:
    """Replay the found coalition's sums on random vectors and solve: the victim's vector
    comes out, to rounding."""
    graph = k_regular(n)
    audit = audit_graph(graph, 0.5)
    rng = np.random.default_rng(n)
    x = {p: rng.normal(size=3) for p in graph}
    for found in (audit.honest, audit.lying):
        assert found is not None
        unknown = [p for p in sorted(graph) if p not in found.coalition]
        rows, sums = [], []
        for owner in found.coalition:
            present = found.presented.get(owner, tuple(graph[owner]))
            w = 1.0 / (1 + len(graph[owner]))  # (k-regular: every weight the same)
            rows.append([w if p in present else 0.0 for p in unknown])
            known = sum((w * x[p] for p in present if p in found.coalition), np.zeros(3))
            sums.append(sum(w * x[p] for p in present) - known)
        solution, *_ = np.linalg.lstsq(np.array(rows), np.array(sums), rcond=None)
        for victim in found.victims:
            assert np.allclose(solution[unknown.index(victim)], x[victim], atol=1e-9)
