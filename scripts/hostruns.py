"""Shared by the simulated-host benchmarks (bench_partition.py, bench_wan.py): run
``p2pfl harness --hosts`` as a subprocess and read what its peers logged."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from p2pfl.harness.hosts import unavailable_reason  # noqa: E402


def hosts_unavailable() -> str | None:
    """Why simulated hosts cannot run here (None: they can)."""
    reason = unavailable_reason()
    return None if reason is None else f"simulated hosts: {reason}"


@dataclass
class HostRun:
    """One finished harness run: its summary and every peer's events."""

    out: Path
    summary: dict[str, Any]
    events: list[dict[str, Any]]
    wall_s: float

    def of(self, kind: str, node: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind and node in (None, e["node"])]

    def round_times(self, skip_first: int = 1) -> list[float]:
        """Every peer's round durations, without each peer's first ``skip_first`` rounds
        (start-up: connecting, slow start)."""
        return [
            float(e["duration_s"])
            for e in self.of("round_end")
            if e.get("round") is not None and int(e["round"]) >= skip_first
        ]

    def median_round_s(self, skip_first: int = 1) -> float:
        return statistics.median(self.round_times(skip_first))

    def cpu_per_round_s(self, skip_first: int = 1) -> float:
        cpu = [
            float(e["cpu_s"])
            for e in self.of("round_end")
            if e.get("cpu_s") is not None and int(e["round"]) >= skip_first
        ]
        return statistics.median(cpu) if cpu else float("nan")

    def round_ends(self, node: str) -> list[float]:
        return sorted(float(e["ts"]) for e in self.of("round_end", node))

    @property
    def peers(self) -> list[str]:
        return sorted({e["node"] for e in self.events})


def run_hosts(
    args: list[str], *, timeout: float, keep: Path | None = None, label: str = "run"
) -> HostRun:
    """``p2pfl harness --hosts ARGS`` in a fresh folder (under ``keep``, or a temporary one
    removed afterwards); raises with the harness's output if it fails."""
    import time

    base = Path(tempfile.mkdtemp(prefix="p2pfl-bench-")) if keep is None else keep
    out = base / label
    command = [sys.executable, "-m", "p2pfl", "-q", "harness", "--hosts", "--out", str(out)]
    started = time.monotonic()
    result = subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    wall = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(
            f"harness {' '.join(args)} failed ({result.returncode}):\n"
            f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        )
    summary = json.loads((out / "summary.json").read_text())
    events = []
    for path in sorted((out / "state").glob("*/events.jsonl")):
        events += [json.loads(line) for line in path.read_text().splitlines() if line]
    run = HostRun(out, summary, events, wall)
    if keep is None:
        shutil.rmtree(base, ignore_errors=True)
    return run
