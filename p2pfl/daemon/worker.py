"""Blocking work of a node (training, evaluation, checkpoint files, unmasking), run where
it costs least.

A job that takes long (a CNN's epoch) runs in a worker thread, so the event loop keeps
receiving, heartbeating and answering ``p2pfl status`` meanwhile. A job that took less
than ``inline_below`` seconds of CPU in its thread runs on the event loop itself next
time: handing it to a thread and back costs ~0.1 ms of CPU and two thread switches on an
idle machine, and far more when many peers share the cores (32 peers on 2 cores: a round
took 118 ms with every job in a thread, 80 ms with the small ones inline), while blocking
the loop for a few milliseconds delays nothing that matters (heartbeats are seconds apart;
the kernel buffers what arrives).

The measure in a thread is the job's own CPU time (``time.thread_time``), which waiting for
busy cores does not inflate, as it does wall time. A job that is short in CPU but long in
time (it sleeps, or waits for a disk or a device) shows itself inline: an inline run that
held the loop for ``pin_after`` seconds or more *and* blocked (a voluntary context switch;
a run that was only preempted by other processes did not) sends the job back to threads
for good. A job's first run, whose cost is not known yet, always goes to a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

#: Jobs that took less CPU than this in their thread run on the event loop.
INLINE_BELOW_S = 0.005
#: An inline run that held the loop this long sends its job back to threads for good
#: (well above what preemption adds to a 5 ms job on a busy machine).
PIN_AFTER_S = 0.05


class JobCosts:
    """The CPU time each kind of job took last time, and the inline-or-thread rule. Pure."""

    def __init__(
        self, inline_below: float = INLINE_BELOW_S, pin_after: float = PIN_AFTER_S
    ) -> None:
        self.inline_below = inline_below
        self.pin_after = pin_after
        self._cpu: dict[str, float] = {}
        #: Jobs that blocked the loop once: always in a thread from then on.
        self.pinned: set[str] = set()

    def inline(self, job: str) -> bool:
        cpu = self._cpu.get(job)
        return cpu is not None and cpu < self.inline_below and job not in self.pinned

    def ran_in_thread(self, job: str, cpu_s: float) -> None:
        self._cpu[job] = cpu_s

    def ran_inline(self, job: str, wall_s: float, blocked: bool) -> None:
        if wall_s >= self.pin_after and blocked:
            self.pinned.add(job)


class Worker:
    """Runs a node's blocking jobs, one at a time (the node's round is sequential)."""

    def __init__(
        self, inline_below: float = INLINE_BELOW_S, pin_after: float = PIN_AFTER_S
    ) -> None:
        self.costs = JobCosts(inline_below, pin_after)
        #: The job in a thread, if any: a shutdown waits for it (see ``settle``).
        self._running: asyncio.Future[Any] | None = None

    async def run(self, job: str, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)``: inline when ``job`` is known to be short, else in a thread.
        Shielded: a shutdown waits for the thread instead of abandoning one that is still
        writing the model or the checkpoint file."""
        if self.costs.inline(job):
            began, waits = time.perf_counter(), _voluntary_switches()
            try:
                return fn(*args)
            finally:
                blocked = waits is None or _voluntary_switches() != waits
                self.costs.ran_inline(job, time.perf_counter() - began, blocked)
        self._running = asyncio.ensure_future(asyncio.to_thread(self._timed, job, fn, *args))
        return await asyncio.shield(self._running)

    async def settle(self) -> None:
        """Wait for a job still running in a thread (after a cancelled ``run``)."""
        if self._running is not None:
            with contextlib.suppress(Exception):
                await self._running

    def _timed(self, job: str, fn: Callable[..., T], *args: Any) -> T:
        began = time.thread_time()
        try:
            return fn(*args)
        finally:
            self.costs.ran_in_thread(job, time.thread_time() - began)


def _voluntary_switches() -> int | None:
    """How often the calling thread has blocked so far (None where the OS cannot say)."""
    who = getattr(resource, "RUSAGE_THREAD", None)
    if who is None:
        return None
    return resource.getrusage(who).ru_nvcsw
