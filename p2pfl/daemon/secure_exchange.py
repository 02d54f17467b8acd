"""A node's secure-aggregation exchange: the glue between the protocol states of
``p2pfl.secure.group`` (pure) and the node's links, clock, log and round loop.

Per round r a node is a *member* of each neighbour's group and the *owner* of its own:

- round start: as a member, one ``MemberRound`` per neighbour for rounds r and r+1 (keys
  go one round ahead; ``secagg.log`` records each round first); KEYS go out on each link
  as soon as the neighbour can buffer them (``offer_keys``);
- as an owner: KEYS are collected (for the current round or a few ahead); SHARES go out as
  soon as every neighbour's keys are in (often during the round before), or, once our own
  training is done, when those missing are gone, have moved past the round, or half the
  round timeout passed. Members left out are not waited for;
- as a member, a SHARES starts the mask computation at once: the next round's on one
  low-priority thread, this round's in the worker pool; once trained, one pass encodes the
  parameters into every ready mask and each vector is offered to its owner;
- collection ends when the owner's vectors are in *and* our own vectors went out (or their
  owners are gone), or at the deadline;
- aggregation: PRESENT to the members whose vectors arrived, CONFIRM back, UNMASK with
  their tags, REVEAL back, while a worker sums the vectors; rebuild, remove the masks and
  decode in one pass, range check.
- masks, sent vectors and received vectors live in the node's spare arrays (``pool``).
- a restarted node sits out (as member and owner) the rounds its journal names.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

from p2pfl.core.rounds import announced_keeps
from p2pfl.core.topology import metropolis_weights
from p2pfl.errors import SecureAggregationError
from p2pfl.proto.guard import Throttle
from p2pfl.proto.keys import pairwise_secret
from p2pfl.proto.wire import (
    Confirm,
    Keys,
    Present,
    Reveal,
    Shares,
    Unmask,
    encode_confirm,
    encode_keys,
    encode_present,
    encode_reveal,
    encode_shares,
    encode_unmask,
)
from p2pfl.secure.arithmetic import FixedPoint, sum_contributions, unmask_sum, within_clip
from p2pfl.secure.group import MemberRound, OwnerRound

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from p2pfl.config import Config
    from p2pfl.core.clock import LamportClock
    from p2pfl.core.rounds import RoundTracker
    from p2pfl.daemon.events import EventLog
    from p2pfl.daemon.net import Network, PeerLink
    from p2pfl.daemon.pool import ArrayPool

log = logging.getLogger("p2pfl.secure")
T = TypeVar("T")


class ExchangeHost(Protocol):
    """What secure aggregation needs from the node that runs it (``Node`` implements it):
    its state for the round, its links and log, and three services of its round loop."""

    id: str
    config: Config
    tracker: RoundTracker
    net: Network
    clock: LamportClock
    events: EventLog
    #: Spare model-sized arrays (masks and vectors live in them).
    buffers: ArrayPool
    #: The node's model: its own term of the average, replaced by the average.
    params: np.ndarray

    def graph(self, round_index: int) -> dict[str, frozenset[str]]: ...

    def neighbours_of(self, round_index: int) -> frozenset[str]: ...

    def notify(self) -> None:
        """Something changed that a waiting round loop should look at."""

    def sending_round(self) -> int | None:
        """The round whose parameters are being sent (None: none now)."""

    def send_vector(self, owner: str, vector: np.ndarray) -> None:
        """Add ``owner``'s masked vector to this round's outgoing ones, and send it if its
        link is ready."""

    async def run_job(self, job: str, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking work (see ``worker.Worker``)."""

    async def wait_until(
        self, done: Callable[[], bool], deadline: Callable[[], float | None]
    ) -> bool:
        """Wait, woken by network news, until ``done()`` or the ``deadline()``."""


#: Purpose bound into the pairwise secrets behind the share boxes.
SHARE_PURPOSE = b"p2pfl secagg share"
JOURNAL = "secagg.log"


def read_journal(path: Path) -> int:
    """The last round this node took part in before a restart (-1: none)."""
    through = -1
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return through
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and parts[0] == "contributed" and parts[1].isdigit():
            through = max(through, int(parts[1]))
    return through


def _lower_priority() -> None:
    """Make the calling thread yield to the node's other threads (Linux: per-thread nice)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


async def _quietly(coro: Any) -> None:
    with contextlib.suppress(Exception):
        await coro


class SecureExchange:
    """Secure aggregation for one node (see the module docstring)."""

    def __init__(
        self,
        node: ExchangeHost,
        fixed: FixedPoint,
        *,
        private_key: X25519PrivateKey,
        state_dir: Path,
    ) -> None:
        self.node = node
        self.fixed = fixed
        self._private_key = private_key
        self.members: dict[tuple[int, str], MemberRound] = {}
        self.owners: dict[int, OwnerRound] = {}
        self._masks: dict[tuple[int, str], asyncio.Future[np.ndarray]] = {}
        self._secrets: dict[str, bytes] = {}
        self._journal: IO[str] | None = None
        self._journal_path = state_dir / JOURNAL
        #: The last round we took part in before a restart, and the rounds joined since.
        self._restart_through = read_journal(self._journal_path)
        self._joined: set[int] = set()
        self._unjournalled: set[int] = set()
        self._refusals = Throttle(burst=5, window=10.0)
        #: One low-priority thread for work done ahead (the next round's masks): on a busy
        #: machine the current round's work goes first.
        self._background = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="p2pfl-ahead", initializer=_lower_priority
        )
        #: This round's trained parameters, once training is done.
        self._trained: tuple[int, np.ndarray] | None = None
        self._keys_deadline: float | None = None
        #: Entries of this round's parameters clipped by the encoding.
        self.clipped = 0

    def close(self) -> None:
        self._background.shutdown(wait=False, cancel_futures=True)
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    # --- round lifecycle -----------------------------------------------------------------

    def start_round(self, r: int) -> None:
        """Forget old rounds; as a member, draw this round's secrets and offer KEYS."""
        node = self.node
        horizon = r - node.config.limits.max_buffered_rounds - 2
        self.members = {k: v for k, v in self.members.items() if k[0] >= horizon}
        self.owners = {k: v for k, v in self.owners.items() if k >= r}
        for key in [k for k in self._masks if k[0] < r]:  # a round that ended before its mask
            self._masks.pop(key).cancel()
        self._trained = None
        self._keys_deadline = None
        self.clipped = 0
        if self._sits_out(r) or not self._join(r):
            # Before a restart we already sent keys (and maybe vectors) for this round: new
            # secrets would put a second vector under other masks, or contradict the first.
            # Nor can we own it: our members already hold that life's state and refuse a
            # second SHARES. Nobody is waited for; the round keeps our own model.
            log.info("%s round %d: sitting this round out", node.id, r)
            node.tracker.exclude(node.neighbours_of(r))
            return
        if node.config.limits.max_buffered_rounds >= 1 and r + 1 < node.config.training.rounds:
            # The next round's key exchange and masks do not depend on the parameters: they
            # run during this round, in its idle moments, off the next round's path.
            self._join(r + 1)
        for owner in sorted(node.neighbours_of(r) | node.neighbours_of(r + 1)):
            link = node.net.links.get(owner)
            if link is not None:
                self.offer_keys(link)

    def _sits_out(self, r: int) -> bool:
        """Rounds we took part in before a restart (or could not journal): neither member
        nor owner."""
        return r <= self._restart_through or r in self._unjournalled

    def _join(self, r: int) -> bool:
        """Draw our secrets for round r, once per life, journalled first. False if the
        journal cannot be written (then we must not take part: a restart would not know)."""
        if r in self._joined:
            return True
        node = self.node
        try:
            self._write_journal(f"contributed {r}")
        except OSError as exc:
            log.error("%s round %d: secagg.log not written, not taking part: %s", node.id, r, exc)
            self._unjournalled.add(r)
            return False
        self._joined = {j for j in self._joined if j >= r - 1} | {r}
        graph = node.graph(r)
        for owner in sorted(graph[node.id]):
            members = graph[owner]
            secrets = {k: self._secret(k) for k in members if k != node.id}
            self.members[(r, owner)] = MemberRound(
                node.id, owner, members, r, secrets, node.config.aggregation.threshold
            )
        return True

    def offer_keys(self, link: PeerLink) -> None:
        """Send this round's and the next round's KEYS over ``link``, each once, as soon as
        the owner can buffer them."""
        node = self.node
        announced = link.announced
        if announced is None:
            return
        current = node.tracker.current
        for r in (current, current + 1):
            member = self.members.get((r, link.peer_id))
            if member is None or (link.keys_round is not None and link.keys_round >= r):
                continue
            if not announced_keeps(r, announced, node.config.limits.max_buffered_rounds):
                continue
            link.keys_round = r
            message = encode_keys(node.clock.tick(), r, member.public, member.boxes)
            self._send(link, message)

    def trained(self, r: int, params: np.ndarray) -> None:
        """Training for round r is done: encode into every mask that is ready, in one pass
        (usually all: they were made during the last round); the others as they come."""
        self._trained = (r, params)
        ready: list[str] = []
        for (round_index, owner), member in self.members.items():
            if round_index != r or member.keyed is None or member.failure is not None:
                continue
            task = self._masks.get((r, owner))
            if task is not None and task.done() and not task.cancelled() and not task.exception():
                ready.append(owner)
            else:
                self.node.net.spawn(self._contribute(r, owner))
        if ready:
            self.node.net.spawn(self._contribute(r, *ready))

    def start_collecting(self, now: float) -> None:
        self._keys_deadline = now + self.node.config.training.round_timeout / 2

    def collection_done(self, r: int, now: float) -> bool:
        """Also the owner's clock: sends SHARES when waiting for more keys is over."""
        state = self._owner(r)
        if state is not None and state.keyed is None and self._keys_wait_over(state, now):
            self._dispatch(state)
        return self.node.tracker.collection_done(now) and not self._pending(r, now)

    def next_wakeup(self, r: int, now: float) -> float | None:
        """When ``collection_done`` may turn true without news (never a time already past,
        but for the round's deadline: the wait would end there)."""
        tracker = self.node.tracker
        times = [tracker.next_wakeup(now)]
        times += [tracker.grace_ends(owner) for owner in self._pending(r, now)]
        state = self.owners.get(r)
        if state is not None and state.keyed is None:  # a member without keys may go
            if self._keys_deadline is not None and self._keys_deadline > now:
                times.append(self._keys_deadline)
            times += [
                tracker.grace_ends(m)
                for m in state.members
                if m not in state.publics and not tracker.gone(m, now)
            ]
        known = [t for t in times if t is not None]
        return min(known) if known else None

    def _pending(self, r: int, now: float) -> list[str]:
        """Owners we may still send a vector to this round."""
        tracker = self.node.tracker
        return [
            owner
            for (round_index, owner), member in self.members.items()
            if round_index == r
            and not member.contributed
            and member.failure is None
            and not tracker.gone(owner, now)
            and tracker.peer_rounds.get(owner, r) <= r
        ]

    # --- member role ---------------------------------------------------------------------

    def on_shares(self, link: PeerLink, msg: Shares) -> None:
        node = self.node
        key = (msg.round, link.peer_id)
        member = self.members.get(key)
        if member is None or msg.round < node.tracker.current:
            # (a late one would leave a model-sized mask behind that no round ever uses)
            self._refuse(link.peer_id, msg.round, f"unrequested SHARES for round {msg.round}")
            return
        try:
            if not member.accept_shares(msg.boxes):
                return  # the same SHARES again after a reconnect
        except SecureAggregationError as exc:
            self._refuse(link.peer_id, msg.round, f"SHARES refused: {exc}")
            node.notify()
            return
        loop = asyncio.get_running_loop()
        # The next round's mask is made in idle time, on the low-priority thread; this
        # round's at once.
        executor = self._background if msg.round > node.tracker.current else None
        self._masks[key] = loop.run_in_executor(executor, self._make_mask, member)
        if self._trained is not None and self._trained[0] == msg.round:
            node.net.spawn(self._contribute(msg.round, link.peer_id))

    def _make_mask(self, member: MemberRound) -> np.ndarray:
        """(in a worker thread) Our mask for ``member``'s group, in a spare array."""
        buffers = self.node.buffers
        return member.mask(buffers.size, buffers.take())

    async def _contribute(self, r: int, *owners: str) -> None:
        """Encode this round's parameters into the masks for ``owners`` (once they are
        made) and offer each vector to its owner."""
        node = self.node
        tasks = {o: self._masks.pop((r, o), None) for o in owners}
        if self._trained is None or self._trained[0] != r:
            return
        params = self._trained[1]  # (the round may end while we wait for the masks)
        graph = node.graph(r)
        targets: dict[str, tuple[float, np.ndarray]] = {}
        for owner, task in tasks.items():
            if task is None:
                continue
            try:
                targets[owner] = (metropolis_weights(graph, owner)[node.id], await task)
            except ValueError as exc:  # a key that does not agree (e.g. a low-order point)
                self._fail(r, owner, exc)
        if not targets or node.sending_round() != r:
            return
        try:
            self.clipped = await asyncio.to_thread(
                self.fixed.encode_add_many, params, list(targets.values())
            )
        except ValueError as exc:  # non-finite parameters
            for owner in targets:
                self._fail(r, owner, exc)
            return
        if node.sending_round() != r:
            return  # the round ended meanwhile
        for owner, (_, vector) in targets.items():
            member = self.members.get((r, owner))
            if member is None:
                continue
            member.contributed = True
            node.send_vector(owner, vector)
        node.notify()

    def _fail(self, r: int, owner: str, exc: Exception) -> None:
        member = self.members.get((r, owner))
        if member is not None:
            member.failure = str(exc)
        log.error("%s round %d: no contribution to %s: %s", self.node.id, r, owner, exc)
        self.node.notify()

    def on_present(self, link: PeerLink, msg: Present) -> None:
        """The owner's U2: confirm it (tags for the other present members) if we can."""
        owner = link.peer_id
        try:
            member = self._asked(owner, msg.round)
            tags = member.confirm(msg.present)
        except SecureAggregationError as exc:
            self._refuse(owner, msg.round, f"present set refused: {exc}")
            return
        node = self.node
        dropped = sorted((member.keyed or frozenset()) - frozenset(msg.present))
        if dropped:
            node.events.emit("recovery", msg.round, role="member", owner=owner, missing=dropped)
        message = encode_confirm(node.clock.tick(), msg.round, tags)
        self._send(link, message)

    def on_unmask(self, link: PeerLink, msg: Unmask) -> None:
        owner = link.peer_id
        try:
            shares = self._asked(owner, msg.round).reveal(msg.tags)
        except SecureAggregationError as exc:
            self._refuse(owner, msg.round, f"unmask request refused: {exc}")
            return
        node = self.node
        message = encode_reveal(node.clock.tick(), msg.round, shares)
        self._send(link, message)

    # --- owner role ----------------------------------------------------------------------

    def _owner(self, r: int) -> OwnerRound | None:
        """Our group's state for round r (created on first use, within the buffer window)."""
        node = self.node
        state = self.owners.get(r)
        if self._sits_out(r):
            return None
        if state is None and node.tracker.in_window(r) and r < node.config.training.rounds:
            state = OwnerRound(
                node.id, node.graph(r)[node.id], r, node.config.aggregation.threshold
            )
            self.owners[r] = state
        return state

    def on_keys(self, link: PeerLink, msg: Keys) -> None:
        member = link.peer_id
        if self._sits_out(msg.round):
            # An empty SHARES tells the member at once that this group has no round.
            self._refuse(member, msg.round, f"KEYS refused: we sit round {msg.round} out")
            self._send(link, encode_shares(self.node.clock.tick(), msg.round, {}))
            return
        state = self._owner(msg.round)
        try:
            if state is None:
                raise SecureAggregationError(
                    f"KEYS for round {msg.round} outside rounds {self.node.tracker.current}.."
                    f"{self.node.tracker.horizon}"
                )
            again = member in state.publics
            state.add_keys(member, msg.public, msg.boxes)
        except SecureAggregationError as exc:
            self._refuse(member, msg.round, f"KEYS refused: {exc}")
            if state is not None and state.keyed is not None and member in state.members:
                # too late for this round's key exchange: say so, so it stops waiting
                self._send(link, encode_shares(self.node.clock.tick(), msg.round, {}))
            return
        if again and state.keyed is not None and member in state.keyed:
            # The same KEYS on a new connection: the SHARES we sent may have died with the
            # old one. Send them again (a member that has them ignores the copy).
            shares = state.shares_for(member)
            self._send(link, encode_shares(self.node.clock.tick(), msg.round, shares))
        elif state.keyed is None and state.all_keyed():
            self._dispatch(state)

    def _keys_wait_over(self, state: OwnerRound, now: float) -> bool:
        """After our training: stop waiting for keys from those that will not send them."""
        tracker = self.node.tracker
        if self._keys_deadline is not None and now >= self._keys_deadline:
            return True
        return self._trained is not None and all(
            tracker.gone(m, now) or tracker.peer_rounds.get(m, state.round) > state.round
            for m in state.members
            if m not in state.publics
        )

    def _dispatch(self, state: OwnerRound) -> None:
        node = self.node
        per_member = state.dispatch()
        if state.failure is not None:
            log.warning("%s round %d: %s", node.id, state.round, state.failure)
        if state.round == node.tracker.current:
            node.tracker.exclude(frozenset(state.members) - (state.keyed or frozenset()))
        lamport = node.clock.tick()
        for member, boxes in per_member.items():
            link = node.net.links.get(member)
            if link is not None:
                message = encode_shares(lamport, state.round, boxes)
                self._send(link, message)
        node.notify()

    def on_confirm(self, link: PeerLink, msg: Confirm) -> None:
        state = self.owners.get(msg.round)
        try:
            if state is None:
                raise SecureAggregationError(f"no key exchange for round {msg.round}")
            state.add_confirm(link.peer_id, msg.tags)
        except SecureAggregationError as exc:
            self._refuse(link.peer_id, msg.round, f"CONFIRM refused: {exc}")
            return
        self.node.notify()

    def on_reveal(self, link: PeerLink, msg: Reveal) -> None:
        state = self.owners.get(msg.round)
        try:
            if state is None:
                raise SecureAggregationError(f"unrequested reveal for round {msg.round}")
            state.add_reveal(link.peer_id, msg.shares)
        except SecureAggregationError as exc:
            self._refuse(link.peer_id, msg.round, f"reveal refused: {exc}")
            return
        self.node.notify()

    async def aggregate(
        self,
        r: int,
        received: dict[str, np.ndarray],
        weights: dict[str, float],
    ) -> tuple[dict[str, float], dict[str, Any], int]:
        """Unmask our group's weighted average. Returns (weights used, extra event fields,
        own clipped entries); on failure the node keeps its own model and says why. The
        received vectors are consumed (their arrays hold later masks)."""
        # (not in a ``finally``: when a stop cancels us, the summing thread may still be
        # reading them; those are left to the garbage collector)
        result = await self._unmask(r, received, weights)
        for vector in received.values():
            self.node.buffers.give(vector)
        return result

    async def _unmask(
        self,
        r: int,
        received: dict[str, np.ndarray],
        weights: dict[str, float],
    ) -> tuple[dict[str, float], dict[str, Any], int]:
        node = self.node
        state = self.owners.get(r)
        # (not in place: our own model stays intact until the average passed its check)
        spare = node.buffers.take()
        summing: asyncio.Future[tuple[np.ndarray, int]] | None = None
        try:
            if self._sits_out(r):
                raise SecureAggregationError("sat this round out after a restart")
            if state is None or state.keyed is None:
                raise SecureAggregationError("no key exchange took place this round")
            dropped = state.unmask_request(received)
            present = sorted(state.present or ())
            # Summing the vectors (and adding our own term) needs no secret: it runs while
            # the members are asked for their shares.
            summing = asyncio.ensure_future(
                asyncio.to_thread(
                    sum_contributions,
                    [received[p].view(np.uint32) for p in present],
                    node.params,
                    weights[node.id],
                    self.fixed,
                    spare,
                )
            )
            await self._collect_reveals(state, present, sorted(dropped))
            try:
                group_sum, clipped = await summing
            except ValueError as exc:  # (not a SecureAggregationError: our own term)
                log.error("%s round %d: %s", node.id, r, exc)
                raise SecureAggregationError(
                    "own parameters are not finite; nothing can be averaged with them"
                ) from exc
            kept = {p: weights[p] for p in [node.id, *present]}
            total = sum(kept.values())
            average = await node.run_job("unmask", self._remove_masks, state, group_sum, total)
        except SecureAggregationError as exc:
            if summing is not None:  # (it reads the received vectors, and writes ``spare``)
                await asyncio.wait([summing])
                if not summing.cancelled():
                    summing.exception()  # (retrieved: reported above if it failed)
            node.buffers.give(spare)
            log.warning("%s round %d: keeping own model: %s", node.id, r, exc)
            return {node.id: 1.0}, {"kept_own": True, "reason": str(exc)}, 0
        finally:
            self.owners.pop(r, None)  # later reveals are refused
        # An average of values clipped to [-clip, clip] stays inside it (plus rounding). A
        # wrong share nobody could check (exactly t answers) or members that masked with
        # other sets than ours leave ring noise instead: keep our own model then.
        if not within_clip(average, self.fixed, len(kept), total):
            node.buffers.give(spare)
            reason = "the unmasked average is out of range (a wrong share, or key sets differ)"
            log.warning("%s round %d: keeping own model: %s", node.id, r, reason)
            return {node.id: 1.0}, {"kept_own": True, "reason": reason}, 0
        own = node.params
        if own.dtype == np.float32 and own.flags.c_contiguous and own.flags.writeable:
            np.copyto(own, average.reshape(own.shape))  # (like plain averaging: in place)
            node.buffers.give(spare)  # a fresh model-sized array per round costs more
        else:
            node.params = average
        extra: dict[str, Any] = {"recovered": sorted(dropped)} if dropped else {}
        return {p: w / total for p, w in kept.items()}, extra, clipped

    def _remove_masks(self, state: OwnerRound, group_sum: np.ndarray, total: float) -> np.ndarray:
        """(in a worker thread) Rebuild the secrets the reveals allow, remove their masks
        from the group sum and decode: the average, in the sum's memory."""
        return unmask_sum(group_sum, state.correction(), total, self.fixed)

    async def _collect_reveals(
        self, state: OwnerRound, present: list[str], dropped: list[str]
    ) -> None:
        """PRESENT to every present member, then (with their tags) UNMASK to those who
        confirmed. Each step has its own ``recovery_timeout`` and waits only for members
        asked on the link they are still on; once ``threshold`` have answered it waits at
        most as long again for the rest (a silent member costs a little time, not the
        round). Raises SecureAggregationError with fewer than the threshold's answers."""
        node = self.node
        if dropped:
            node.events.emit(
                "recovery", state.round, role="owner", missing=dropped, survivors=present
            )
        present_msg = encode_present(node.clock.tick(), state.round, tuple(present))
        await self._ask(present_msg, present, state.confirmed, state.threshold)
        confirmed = sorted(state.confirmed())
        if len(confirmed) < state.threshold:
            raise SecureAggregationError(
                f"unmasking failed: {len(confirmed)} of {len(present)} confirmed the present "
                f"set ({state.threshold} needed)"
            )
        lamport = node.clock.tick()
        messages = {p: encode_unmask(lamport, state.round, state.tags_for(p)) for p in confirmed}
        await self._ask(messages, confirmed, lambda: frozenset(state.reveals), state.threshold)
        if not state.enough():
            silent = sorted(p for p in confirmed if p not in state.reveals)
            raise SecureAggregationError(
                f"unmasking failed: {len(state.reveals)} of {len(confirmed)} answered "
                f"({state.threshold} needed); no answer from {', '.join(silent)}"
            )

    async def _ask(
        self,
        message: bytes | dict[str, bytes],
        peers: list[str],
        answered: Callable[[], frozenset[str]],
        needed: int,
    ) -> None:
        """Send ``message`` (or each peer's own) to ``peers`` and wait for their answers:
        until every peer asked has answered or left the link it was asked on, or, once
        ``needed`` have answered, for as long again as that took, or ``recovery_timeout``."""
        node = self.node
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + node.config.aggregation.recovery_timeout
        asked: dict[str, PeerLink] = {}
        for p in peers:
            link = node.net.links.get(p)
            if link is not None:
                asked[p] = link
                raw = message[p] if isinstance(message, dict) else message
                self._send(link, raw)
        enough_at: list[float] = []

        def settled() -> bool:
            got = answered()
            return all(p in got or node.net.links.get(p) is not link for p, link in asked.items())

        def wake_up() -> float:  # (asked before settled() on every wake-up)
            if not enough_at and len(answered()) >= needed:
                enough_at.append(loop.time())
            if enough_at:
                return min(deadline, enough_at[0] + max(enough_at[0] - started, 0.01))
            return deadline

        await node.wait_until(settled, wake_up)

    # --- helpers -------------------------------------------------------------------------

    def _send(self, link: PeerLink, message: bytes) -> None:
        """Send a short message in the background (a link that died meanwhile is the
        waiting side's business: every wait is bounded)."""
        self.node.net.spawn(_quietly(link.send_message(message)))

    def _asked(self, owner: str, round_index: int) -> MemberRound:
        """Our state as a member of ``owner``'s group, or why it is not there."""
        member = self.members.get((round_index, owner))
        if member is None:
            raise SecureAggregationError(f"we sent {owner} no vector in round {round_index}")
        return member

    def _refuse(self, peer: str, round_index: int, reason: str) -> None:
        """Log a refused step, at most a few times per peer and window (floods stay quiet)."""
        suppressed = self._refusals.allow(peer, time.monotonic())
        if suppressed is not None:
            self.node.events.emit(
                "reject",
                round_index,
                peer=peer,
                reason=reason,
                **({"suppressed": suppressed} if suppressed else {}),
            )

    def _secret(self, peer: str) -> bytes:
        """The long-term pairwise secret behind our share boxes with ``peer`` (a member of a
        neighbour's group, perhaps two hops away). Derived once from peers.yaml."""
        secret = self._secrets.get(peer)
        if secret is None:
            node = self.node
            secret = pairwise_secret(
                self._private_key,
                node.config.peers[peer].public_key,
                network=node.config.network,
                own_id=node.id,
                their_id=peer,
                purpose=SHARE_PURPOSE,
            )
            self._secrets[peer] = secret
        return secret

    def _write_journal(self, line: str) -> None:
        """Append to state_dir/secagg.log, fsynced before the action it records: the rounds
        we took part in are never joined again after a restart."""
        if self._journal is None:
            fd = os.open(self._journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._journal = os.fdopen(fd, "a", encoding="utf-8")
        self._journal.write(line + "\n")
        self._journal.flush()
        os.fsync(self._journal.fileno())
