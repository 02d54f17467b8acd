"""The worker's inline-or-thread rule (pure) and where jobs actually run."""

from __future__ import annotations

import asyncio
import threading
import time

from p2pfl.daemon.worker import JobCosts, Worker


def test_a_job_runs_inline_only_once_it_is_known_to_be_short() -> None:
    costs = JobCosts(inline_below=0.005, pin_after=0.05)
    assert not costs.inline("train")  # never seen: a thread
    costs.ran_in_thread("train", 0.001)
    assert costs.inline("train")
    costs.ran_in_thread("train", 0.2)  # it grew (a bigger batch, a slower disk)
    assert not costs.inline("train")
    costs.ran_in_thread("evaluate", 0.004)
    assert costs.inline("evaluate") and not costs.inline("train")


def test_only_an_inline_run_that_blocked_for_long_pins_its_job_to_threads() -> None:
    costs = JobCosts(inline_below=0.005, pin_after=0.05)
    costs.ran_in_thread("train", 0.001)
    costs.ran_inline("train", 0.2, blocked=False)  # preempted by other processes: still short
    assert costs.inline("train")
    costs.ran_inline("train", 0.01, blocked=True)  # blocked, but briefly
    assert costs.inline("train")
    costs.ran_inline("train", 0.2, blocked=True)  # it sleeps or waits for a device
    assert not costs.inline("train") and "train" in costs.pinned
    costs.ran_in_thread("train", 0.0001)
    assert not costs.inline("train")  # for good


async def test_short_jobs_move_onto_the_loop_and_sleepers_move_back() -> None:
    worker = Worker(inline_below=0.005, pin_after=0.05)
    loop_thread = threading.get_ident()
    where: list[bool] = []

    def job(sleep: float) -> int:
        where.append(threading.get_ident() == loop_thread)
        time.sleep(sleep)
        return 7

    assert await worker.run("quick", job, 0.0) == 7
    assert await worker.run("quick", job, 0.0) == 7
    assert where == [False, True]  # first in a thread, then inline
    # A job that sleeps uses no CPU in its thread, so it is tried inline once: holding the
    # loop for 0.1 s while blocked sends it back to threads for good.
    where.clear()
    for _ in range(4):
        await worker.run("sleeper", job, 0.1)
    assert where == [False, True, False, False]


async def test_a_cancelled_run_leaves_its_thread_to_settle() -> None:
    worker = Worker()
    release = threading.Event()
    done: list[str] = []

    def job() -> None:
        release.wait(5)
        done.append("written")

    task = asyncio.ensure_future(worker.run("checkpoint", job))
    await asyncio.sleep(0.01)
    task.cancel()
    release.set()
    await worker.settle()  # waits for the thread, not just the cancelled await
    assert done == ["written"]
