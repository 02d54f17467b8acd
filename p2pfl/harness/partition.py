"""Splitting a training set among peers: IID, Dirichlet label skew, or label shards.

Federated learning behaves very differently on IID and on label-skewed data, so the
harness must be able to produce both, reproducibly: every function here is pure and
depends only on the labels, the peer count, the spec and the seed. A regression set is
split on the deciles of its target (``target_strata``): a skewed split then gives each
peer a different range of the target, as it gives a classifier's peers different classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from p2pfl.learning.prepare import split_iid

__all__ = [
    "DEFAULT_MIN_SIZE",
    "PartitionSpec",
    "classes_per_peer",
    "describe_heterogeneity",
    "label_histogram",
    "parse_partition",
    "partition",
    "target_strata",
]

#: Quantile bins of a regression target that skewed splits treat as "classes".
TARGET_BINS = 10

#: Fewest samples a Dirichlet draw may give a peer (lowered automatically on tiny datasets).
DEFAULT_MIN_SIZE = 10
# Dirichlet draws tried before giving up; a draw costs microseconds (counts only).
_MAX_ATTEMPTS = 1000
_ACCEPTED = "'iid', 'dirichlet:ALPHA' (ALPHA > 0) or 'shards:K' (integer K >= 1)"

PartitionKind = Literal["iid", "dirichlet", "shards"]


@dataclass(frozen=True)
class PartitionSpec:
    """How to split: ``kind`` plus ``alpha`` (dirichlet only) or ``shards`` (shards only)."""

    kind: PartitionKind
    alpha: float | None = None
    shards: int | None = None

    def __post_init__(self) -> None:
        if self.kind == "dirichlet":
            if self.alpha is None or not (math.isfinite(self.alpha) and self.alpha > 0):
                raise ValueError(f"dirichlet needs a finite alpha > 0, got {self.alpha}")
            if self.shards is not None:
                raise ValueError("dirichlet takes no shards count")
        elif self.kind == "shards":
            if self.shards is None or isinstance(self.shards, bool) or self.shards < 1:
                raise ValueError(f"shards needs an integer count >= 1, got {self.shards}")
            if self.alpha is not None:
                raise ValueError("shards takes no alpha")
        elif self.kind == "iid":
            if self.alpha is not None or self.shards is not None:
                raise ValueError("iid takes neither alpha nor shards")
        else:
            raise ValueError(f"unknown partition kind {self.kind!r}: use {_ACCEPTED}")

    def __str__(self) -> str:
        """The canonical text, which ``parse_partition`` turns back into an equal spec."""
        if self.kind == "dirichlet":
            assert self.alpha is not None  # checked in __post_init__
            text = repr(float(self.alpha))  # shortest text that round-trips
            return f"dirichlet:{text.removesuffix('.0')}"
        if self.kind == "shards":
            return f"shards:{self.shards}"
        return "iid"


def parse_partition(text: str) -> PartitionSpec:
    """Parse ``iid``, ``dirichlet:ALPHA`` or ``shards:K`` (kind case-insensitive)."""
    kind, colon, arg = text.strip().partition(":")
    kind = kind.strip().lower()
    arg = arg.strip()
    if kind == "iid" and not colon:
        return PartitionSpec("iid")
    if kind == "dirichlet" and arg:
        try:
            alpha = float(arg)
        except ValueError:
            alpha = math.nan
        if math.isfinite(alpha) and alpha > 0:
            return PartitionSpec("dirichlet", alpha=alpha)
        raise ValueError(f"partition {text!r}: ALPHA must be a number > 0; use {_ACCEPTED}")
    if kind == "shards" and arg:
        try:
            shards = int(arg)
        except ValueError:
            shards = 0
        if shards >= 1:
            return PartitionSpec("shards", shards=shards)
        raise ValueError(f"partition {text!r}: K must be an integer >= 1; use {_ACCEPTED}")
    raise ValueError(f"unknown partition {text!r}: use {_ACCEPTED}")


def partition(
    y: np.ndarray,
    n_peers: int,
    spec: PartitionSpec,
    seed: int,
    *,
    min_size: int | None = None,
) -> list[np.ndarray]:
    """Split sample indices ``0..len(y)-1`` among ``n_peers`` peers.

    Returns one sorted int64 index array per peer; the arrays are disjoint and together
    cover every sample. ``iid`` is a seeded permutation cut into near-equal parts.
    ``dirichlet:A`` draws, for each class, the peers' shares from Dir(A, ..., A) and splits
    that class's shuffled samples accordingly: small A gives each peer few classes, large A
    approaches IID. ``shards:K`` cuts the label-sorted samples into ``n_peers * K``
    near-equal shards and gives each peer K distinct random shards, as in McMahan et al.

    Every peer gets at least ``min_size`` samples (a Dirichlet draw is repeated until it
    does, a bounded number of times). The default is ``DEFAULT_MIN_SIZE``, lowered to
    ``len(y) // (2 * n_peers)`` on small datasets but never below 1; an explicit value is
    honoured as given.
    """
    labels = np.asarray(y)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"y must be a 1-D integer label vector, got {labels.dtype} {labels.shape}")
    n = int(labels.size)
    if isinstance(n_peers, bool) or not isinstance(n_peers, int | np.integer) or n_peers < 1:
        raise ValueError(f"n_peers must be an integer >= 1, got {n_peers!r}")
    n_peers = int(n_peers)
    if n_peers > n:
        raise ValueError(f"cannot split {n} samples among {n_peers} peers")
    if min_size is None:
        # Never more than half an equal share (so a draw is always possible), never empty.
        floor = max(1, min(DEFAULT_MIN_SIZE, n // (2 * n_peers)))
    elif min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    elif min_size * n_peers > n:
        raise ValueError(
            f"min_size {min_size} is impossible: {n_peers} peers x {min_size} > {n} samples"
        )
    else:
        floor = min_size

    rng = np.random.default_rng(seed)
    if spec.kind == "iid":
        parts = split_iid(n, n_peers, seed)
    elif spec.kind == "dirichlet":
        assert spec.alpha is not None  # guaranteed by PartitionSpec
        parts = _dirichlet(labels, n_peers, spec.alpha, floor, rng, str(spec))
    else:
        assert spec.shards is not None  # guaranteed by PartitionSpec
        parts = _shards(labels, n_peers, spec.shards, rng, str(spec))

    smallest = min(p.size for p in parts)
    if smallest < floor:
        raise ValueError(
            f"{spec}: a peer would get only {smallest} of {n} samples (min_size {floor}); "
            "use fewer peers or fewer shards per peer"
        )
    return parts


def _dirichlet(
    y: np.ndarray, n_peers: int, alpha: float, floor: int, rng: np.random.Generator, name: str
) -> list[np.ndarray]:
    values, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    n_classes = values.size
    # Redraw only the per-class counts until every peer is large enough; the (costlier)
    # shuffles happen once, for the accepted draw.
    for _ in range(_MAX_ATTEMPTS):
        shares = rng.dirichlet(np.full(n_peers, alpha), size=n_classes)
        if not np.isfinite(shares).all():
            continue
        cum = np.cumsum(shares, axis=1)[:, :-1] * counts[:, None]
        cuts = np.minimum(np.floor(cum).astype(np.int64), counts[:, None])
        bounds = np.concatenate(
            [np.zeros((n_classes, 1), np.int64), cuts, counts[:, None].astype(np.int64)], axis=1
        )
        per_peer = np.diff(bounds, axis=1).sum(axis=0)
        if per_peer.min() >= floor:
            break
    else:
        raise ValueError(
            f"{name}: no draw in {_MAX_ATTEMPTS} attempts gave each of {n_peers} peers at "
            f"least {floor} samples; use a larger alpha or fewer peers"
        )
    order = np.argsort(inverse, kind="stable")
    by_class = np.split(order, np.cumsum(counts)[:-1])
    pieces: list[list[np.ndarray]] = [[] for _ in range(n_peers)]
    for c, members in enumerate(by_class):
        shuffled = rng.permutation(members)
        for peer, chunk in enumerate(np.split(shuffled, cuts[c])):
            pieces[peer].append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in pieces]


def _shards(
    y: np.ndarray, n_peers: int, k: int, rng: np.random.Generator, name: str
) -> list[np.ndarray]:
    total = n_peers * k
    if total > y.size:
        raise ValueError(
            f"{name}: {n_peers} peers x {k} shards = {total} shards but only {y.size} samples"
        )
    # Shuffle before the stable sort so a shard is a random sample of its label(s).
    perm = rng.permutation(y.size)
    order = perm[np.argsort(y[perm], kind="stable")]
    shards = np.array_split(order, total)
    owner = rng.permutation(total).reshape(n_peers, k)
    return [np.sort(np.concatenate([shards[s] for s in row])).astype(np.int64) for row in owner]


def target_strata(y: np.ndarray, bins: int = TARGET_BINS) -> np.ndarray:
    """Real targets as int64 quantile-bin indices ``0..bins-1`` (ties share a bin)."""
    values = np.asarray(y, dtype=np.float64).reshape(len(y), -1)[:, 0]
    edges = np.quantile(values, np.linspace(0.0, 1.0, bins + 1)[1:-1])
    return np.searchsorted(edges, values, side="right").astype(np.int64)


def label_histogram(y: np.ndarray, parts: list[np.ndarray], classes: int) -> np.ndarray:
    """Counts of each class held by each peer: int64 array of shape ``(peers, classes)``."""
    labels = np.asarray(y)
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"labels must lie in 0..{classes - 1}")
    return np.array(
        [np.bincount(labels[p], minlength=classes) for p in parts], dtype=np.int64
    ).reshape(len(parts), classes)


def classes_per_peer(histogram: np.ndarray, threshold: float = 0.05) -> np.ndarray:
    """For each peer, how many classes make up at least ``threshold`` of its samples."""
    sizes = histogram.sum(axis=1, keepdims=True)
    shares = histogram / np.maximum(sizes, 1)
    return np.asarray((shares >= threshold).sum(axis=1), dtype=np.int64)


def describe_heterogeneity(
    histogram: np.ndarray, threshold: float = 0.05, unit: str = "classes"
) -> str:
    """One line on how skewed a partition is, e.g. for a run report.

    ``8 peers, 178-181 samples each, 2.1 of 10 classes per peer (each >= 5% of its data)``
    (``unit`` names the columns: ``target deciles`` for a regression set).
    """
    sizes = histogram.sum(axis=1)
    per_peer = classes_per_peer(histogram, threshold)
    return (
        f"{histogram.shape[0]} peers, {int(sizes.min())}-{int(sizes.max())} samples each, "
        f"{per_peer.mean():.1f} of {histogram.shape[1]} {unit} per peer "
        f"(each >= {threshold:.0%} of its data)"
    )
