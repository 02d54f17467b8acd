"""A node's learner and local data: one round's local training (with differential
privacy when configured) and evaluation. No event loop: the node runs these as jobs of
its ``Worker`` and decides what to do with the results. The one file it reads is the event
log, to reconcile the privacy budget with the checkpoint at start-up.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from p2pfl.config import Config
from p2pfl.core.privacy import epsilon_of, privatize
from p2pfl.learning import (
    Dataset,
    Evaluation,
    build_learner,
    check_compatible,
    flatten,
    unflatten,
)
from p2pfl.store.checkpoint import CHECKPOINT_NAME, Checkpoint, CheckpointError

log = logging.getLogger("p2pfl.learning.trainer")


def input_scale_for(data: Dataset, configured: float | None) -> float:
    """The divisor for input features: configured, or the smallest power of two that
    covers the node's training data (identical on peers whose data share a range)."""
    if configured is not None:
        return configured
    largest = float(np.max(np.abs(data.x))) if data.x.size else 0.0
    if largest <= 1.0:
        return 1.0
    return float(2.0 ** math.ceil(math.log2(largest)))


def scale_inputs(data: Dataset, scale: float) -> Dataset:
    if scale == 1.0:
        return data
    factor = np.float32(1.0 / scale)
    return Dataset(
        x=data.x * factor,
        y=data.y,
        x_val=None if data.x_val is None else data.x_val * factor,
        y_val=data.y_val,
        source=data.source,
    )


def count_trained_rounds(path: Path) -> int:
    """How many ``train`` events an existing log holds (0 without a log): every update the
    node released, a redone round being a second release."""
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if b'"type":"train"' in line)
    except OSError:
        return 0


#: How many more releases the log may record than its checkpoint counts. A round's
#: checkpoint is committed in the background while the next round trains, so a crash can
#: leave round r - 1's checkpoint under a log that has trained rounds r and r + 1.
LOG_LEAD = 2


def restore_dp_releases(config: Config, checkpoint: Checkpoint | None, log_path: Path) -> int:
    """The differential-privacy releases a (re)starting node has already made: the budget
    it has spent, which must never silently restart from zero.

    The checkpoint is the authority (the log may have been rotated or deleted); the log
    may run up to ``LOG_LEAD`` releases ahead of it, so the larger count is kept. A
    checkpoint without the count, or one the log outruns by more, is refused. Each
    ``train`` event is fsynced before its update leaves (``EventLog.sync``), so a power
    cut that rolls the checkpoint back leaves the log counting every release. Without a
    checkpoint the log's count is all there is: a warning says so.
    """
    if config.aggregation.dp is None:
        return 0
    logged = count_trained_rounds(log_path)
    if checkpoint is None:
        if logged:
            _warn_log_only(log_path, logged)
        return logged
    saved = checkpoint.dp_releases
    if saved is None:
        raise CheckpointError(_no_budget(log_path, logged))
    if logged > saved + LOG_LEAD:
        raise CheckpointError(_budget_behind_log(log_path, saved, logged))
    return max(saved, logged)


def _warn_log_only(log_path: Path, logged: int) -> None:
    """A log of releases but no checkpoint: the checkpoint was moved away (or never
    committed). The log's count is all there is; if the log was rotated or cut too, the
    budget is undercounted and nothing here can tell, so the operator is told."""
    log.warning(
        "differential privacy is on and %s has no checkpoint, but %s records %d release(s): "
        "the privacy budget spent is counted from the event log alone (an undercount if "
        "the log was rotated or truncated)",
        log_path.parent,
        log_path,
        logged,
    )


def _ways_out(state_dir: Path, logged: int) -> str:
    return (
        f"to restart from the initial model and count the log's {logged}, move "
        f"{state_dir / CHECKPOINT_NAME} away; to start afresh with an unspent budget (only "
        f"if this node's earlier updates need not count), move {state_dir} away"
    )


def _no_budget(log_path: Path, logged: int) -> str:
    state_dir = log_path.parent
    return (
        f"{state_dir / CHECKPOINT_NAME}: has no differential-privacy budget (written by an "
        f"earlier p2pfl, which counted releases only in the event log); {log_path} records "
        f"{logged} release(s) but may have been rotated, so the budget spent is unknown: "
        + _ways_out(state_dir, logged)
    )


def _budget_behind_log(log_path: Path, saved: int, logged: int) -> str:
    state_dir = log_path.parent
    return (
        f"{state_dir / CHECKPOINT_NAME}: counts {saved} differential-privacy release(s) but "
        f"{log_path} records {logged}, more than the {LOG_LEAD} a log may run ahead of its "
        "checkpoint: the checkpoint is older than the log (restored from a backup, from "
        "another state directory, or rolled back by a power cut?) and resuming would undercount "
        "the budget spent; " + _ways_out(state_dir, logged)
    )


@dataclass
class Trained:
    """One round's local training: the mean loss, the parameters to release and, with
    differential privacy, the fields of the ``train`` event that account for it."""

    loss: float
    params: np.ndarray
    privacy: dict[str, Any] = field(default_factory=dict)


class LocalModel:
    """The learner, the (scaled) local data, and the privacy accounting of one node."""

    def __init__(
        self, config: Config, peer_id: str, data: Dataset, dp_releases: int, threads: int = 1
    ) -> None:
        self.config = config
        self.training = config.training
        standardize = config.training.standardize
        # (standardisation replaces the input scale)
        self.input_scale = 1.0 if standardize else input_scale_for(data, self.training.input_scale)
        self.data = scale_inputs(data, self.input_scale)
        #: The mean and standard deviation the data was standardised with (None: not yet,
        #: or not at all; ``federated``: once the network computed them).
        self.standardization: tuple[np.ndarray, np.ndarray] | None = None
        if standardize is not None and standardize.mean is not None:
            self.standardize(np.array(standardize.mean), np.array(standardize.std))
        model = config.training.model
        check_compatible(data, model.inputs, model.outputs, source=config.source, task=model.task)
        self.learner = build_learner(
            model.as_mapping(), config.seed, source=config.source, torch_threads=threads
        )
        # Only the shapes matter (for unflatten); no copy of a possibly huge model.
        self.template = self.learner.get_weights()
        self.peer_id = peer_id
        self.peer_index = config.peer_ids.index(peer_id)
        self._dp_rng = np.random.default_rng()  # OS entropy
        #: Updates released so far (a restarted node counts its earlier life's too).
        self.dp_releases = dp_releases
        dp = config.aggregation.dp
        #: One release's Renyi DP coefficient (``core.privacy.epsilon_of``): 1 / sigma^2,
        #: or with correlated noise what the node sets from the graphs (``secldp_rho``).
        self.dp_rho = 0.0 if dp is None else 1.0 / dp.noise_multiplier**2

    def standardize(self, mean: np.ndarray, std: np.ndarray) -> None:
        """From now on train and evaluate on ``(x - mean) / std`` (every peer uses the same
        values: from peers.yaml, or the network's, ``core.moments``)."""
        m, s = mean.astype(np.float32), std.astype(np.float32)
        data = self.data
        self.data = Dataset(
            x=(data.x - m) / s,
            y=data.y,
            x_val=None if data.x_val is None else (data.x_val - m) / s,
            y_val=data.y_val,
            source=data.source,
        )
        self.standardization = (mean, std)

    def initial_params(self) -> np.ndarray:
        """The seeded initial model, flat. May be a view of the learner's own storage
        (single-array learners): no extra copy."""
        return flatten(self.learner.get_weights())

    def train(self, params: np.ndarray, round_index: int) -> Trained:
        """Round ``round_index``'s local epochs from ``params``. With differential privacy,
        the update is clipped and noised before anything leaves."""
        dp = self.config.aggregation.dp
        # A copy: a single-array learner may train in the very memory ``params`` views.
        start = params.copy() if dp is not None else None
        self.learner.set_weights(unflatten(params, self.template))
        rng = np.random.default_rng([self.config.seed, self.peer_index, round_index])
        loss = self.learner.fit(
            self.data.x,
            self.data.y,
            epochs=self.training.local_epochs,
            batch_size=self.training.batch_size,
            learning_rate=self.training.learning_rate,
            rng=rng,
        )
        trained = flatten(self.learner.get_weights())
        if dp is None or start is None:
            return Trained(float(loss), trained)
        # Noise from the OS's entropy, never the shared seed (which every peer knows).
        noised, norm, clipped = privatize(start, trained, dp, self._dp_rng)
        self.dp_releases += 1
        return Trained(
            float(loss),
            noised,
            {
                "dp_update_norm": round(norm, 6),
                "dp_clipped": clipped,
                "dp_epsilon": round(epsilon_of(self.dp_releases, self.dp_rho, dp.delta), 6),
                "dp_delta": dp.delta,
                **(
                    {}
                    if dp.correlated_multiplier is None
                    else {"dp_correlated": dp.correlated_multiplier, "dp_curious": dp.curious}
                ),
            },
        )

    def evaluate(self, params: np.ndarray) -> tuple[str, Evaluation]:
        """``params`` on the validation split ("validation"), or on the training data
        ("train") when the node has none."""
        self.learner.set_weights(unflatten(params, self.template))
        if self.data.x_val is not None and self.data.y_val is not None:
            return "validation", self.learner.evaluate(self.data.x_val, self.data.y_val)
        return "train", self.learner.evaluate(self.data.x, self.data.y)
