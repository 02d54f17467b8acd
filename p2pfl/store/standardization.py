"""The standardisation a node trains with (``training.standardize``), on disk.

``federated`` values are the network's, computed once before round 0; a node keeps them in
``STATE/standardize.json`` (with the config digest they belong to) so that a restart, and
``p2pfl export``, use them instead of asking the network again. Values given in peers.yaml
are read from the config.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from p2pfl.config import Config

STANDARDIZE_FILE = "standardize.json"


def load_saved(state_dir: Path, config: Config) -> tuple[np.ndarray, np.ndarray] | None:
    """The standardisation a node computed with this config, if it kept one that fits."""
    try:
        saved = json.loads((state_dir / STANDARDIZE_FILE).read_text(encoding="utf-8"))
        if saved["config_digest"] != config.digest.hex():
            return None
        mean = np.array(saved["mean"], dtype=np.float64)
        std = np.array(saved["std"], dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    inputs = config.training.model.inputs
    if mean.shape != (inputs,) or std.shape != (inputs,):
        return None
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
        return None
    return mean, std


def save(
    state_dir: Path, config: Config, mean: np.ndarray, std: np.ndarray, rows: int, digest: str
) -> None:
    """Write ``STATE/standardize.json`` atomically (0600, fsynced, then renamed)."""
    path = state_dir / STANDARDIZE_FILE
    record = {
        "config_digest": config.digest.hex(),
        "rows": rows,
        "digest": digest,
        "mean": mean.tolist(),
        "std": std.tolist(),
    }
    _write_json(path, record)


def standardization_for(state_dir: Path, config: Config) -> tuple[np.ndarray, np.ndarray] | None:
    """What the node's model saw: None without ``standardize``; peers.yaml's values; or
    the network's, as the node kept them (None if it never finished computing them)."""
    given = config.training.standardize
    if given is None:
        return None
    if given.mean is not None and given.std is not None:
        return np.array(given.mean), np.array(given.std)
    return load_saved(state_dir, config)


SHARE_FILE = "moments-share.json"


def load_share(state_dir: Path, config: Config) -> dict[str, Any] | None:
    """The masked totals this node already sent under this config (None: none yet)."""
    try:
        saved = json.loads((state_dir / SHARE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("config_digest") != config.digest.hex():
        return None
    return saved


def save_share(state_dir: Path, record: Mapping[str, object]) -> None:
    """Keep the masked totals we are about to send (fsynced first): a restart must send
    these very bytes again, never other totals under the same masks."""
    _write_json(state_dir / SHARE_FILE, record)


def _write_json(path: Path, record: object) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(record, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
