"""A node's secure aggregation, the shell around ``p2pfl.secure.session`` (which makes the
protocol's decisions): it feeds the session the node's news and pumps what comes out.

- in: round starts (after journalling the rounds joined in ``secagg.log``, fsynced), the
  peers' current links as the network holds them (``_sync_links``), the messages the inbox
  hands over, training done, masks made, and the event loop's time;
- out: the session's messages go to each peer's current link (a reply to the link the
  request came on; a peer without one gets nothing: every wait is bounded), its events to
  the node's log, its jobs to threads: the next round's masks on one low-priority thread,
  this round's in the default pool, the encoding of the parameters into the masks in one
  pass per batch;
- owner's unmasking: the PRESENT and UNMASK steps, each waited for as the session's
  ``Ask`` says, while a thread sums the vectors; then the masks are removed and the
  average decoded in one pass and range-checked.

Masks, sent vectors and received vectors live in the node's spare arrays (``pool``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

from p2pfl.daemon.net import quietly
from p2pfl.errors import SecureAggregationError
from p2pfl.proto.keys import pairwise_secret
from p2pfl.proto.wire import encode_secure
from p2pfl.secure.arithmetic import FixedPoint, sum_contributions, unmask_sum, within_clip
from p2pfl.secure.group import OwnerRound
from p2pfl.secure.session import (
    Ask,
    Contribute,
    MakeMask,
    SecureMessage,
    SecureSession,
    Settings,
)

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
    its state for the round, its links and log, and the services of its round loop."""

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
        self._secrets: dict[str, bytes] = {}
        #: The link the session was last told of, per peer (``_sync_links``).
        self._told: dict[str, PeerLink] = {}
        self._journal: IO[str] | None = None
        self._journal_path = state_dir / JOURNAL
        #: Every decision: what to send, when collection ends, what to refuse.
        self.session = SecureSession(
            node.id,
            Settings.from_config(node.config),
            tracker=node.tracker,
            graph=node.graph,
            clock=node.clock,
            pair_secret=self._secret,
            restart_through=read_journal(self._journal_path),
        )
        #: The masks being made or made, per (round, owner).
        self._masks: dict[tuple[int, str], asyncio.Future[np.ndarray]] = {}
        #: One low-priority thread for work done ahead (the next round's masks): on a busy
        #: machine the current round's work goes first.
        self._background = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="p2pfl-ahead", initializer=_lower_priority
        )
        #: This round's trained parameters, once training is done.
        self._trained: np.ndarray | None = None
        #: Entries of this round's parameters clipped by the encoding.
        self.clipped = 0

    def close(self) -> None:
        self._background.shutdown(wait=False, cancel_futures=True)
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    # --- feeding the session -------------------------------------------------------------

    def start_round(self, r: int) -> None:
        """Journal the rounds joined, start round r, offer KEYS on every link."""
        for key in [k for k in self._masks if k[0] < r]:  # a round that ended before its mask
            self._masks.pop(key).cancel()
        self._trained = None
        self.clipped = 0
        journalled: list[int] = []
        for j in self.session.rounds_to_join(r):
            if not self._journal_round(j):
                break  # (a later round must not be joined before this one)
            journalled.append(j)
        self._sync_links()
        self.session.start_round(r, journalled)
        for link in list(self.node.net.links.values()):
            self.session.offer_keys(link.peer_id, link.announced)
        self._pump()

    def links_changed(self) -> None:
        """A link came up or went down."""
        self._sync_links()
        self._pump()

    def offer_keys(self, link: PeerLink) -> None:
        self._sync_links()
        if self.node.net.links.get(link.peer_id) is link:
            self.session.offer_keys(link.peer_id, link.announced)
            self._pump()

    def receive(self, link: PeerLink, msg: SecureMessage) -> None:
        """A message from ``link``: replies to its peer go back on that very link (a
        replaced link still finishes what is under way on it)."""
        self._sync_links()
        self.session.receive(link.peer_id, msg, asyncio.get_running_loop().time())
        self._pump(reply_link=link)

    def trained(self, r: int, params: np.ndarray) -> None:
        self._trained = params
        self.session.trained(r)
        self._pump()

    def start_collecting(self, now: float) -> None:
        self.session.start_collecting(now)

    def collection_done(self, r: int, now: float) -> bool:
        done = self.session.collection_done(r, now)
        self._pump()
        return done

    def next_wakeup(self, r: int, now: float) -> float | None:
        return self.session.next_wakeup(r, now)

    # --- pumping what comes out ----------------------------------------------------------

    def _sync_links(self) -> None:
        """Tell the session of every peer whose current link is not the one it was last
        told of: the network takes a link up (``links``) a moment before the node hears
        of it, and what the session sends or waits for must match what ``links`` holds."""
        links = self.node.net.links
        for peer in [*links, *self._told]:
            link = links.get(peer)
            if self._told.get(peer) is link:
                continue
            if link is None:
                del self._told[peer]
                self.session.link_down(peer)
            else:
                self._told[peer] = link
                self.session.link_up(peer)

    def _pump(self, reply_link: PeerLink | None = None) -> None:
        node = self.node
        for peer, message in self.session.data_to_send():
            if reply_link is not None and peer == reply_link.peer_id:
                link: PeerLink | None = reply_link
            else:
                link = node.net.links.get(peer)
            if link is not None:
                self._send(link, message)
        for event in self.session.events_to_log():
            node.events.emit(event.kind, event.round, **event.fields)
        for job in self.session.jobs_to_run():
            if isinstance(job, MakeMask):
                self._make_mask(job)
            else:
                node.net.spawn(self._contribute(job))
        node.notify()

    def _send(self, link: PeerLink, message: SecureMessage) -> None:
        """Send a short message in the background (a link that died meanwhile is the
        waiting side's business: every wait is bounded)."""
        self.node.net.spawn(quietly(link.send_message(encode_secure(message))))

    def _make_mask(self, job: MakeMask) -> None:
        member = job.member
        key = (member.round, member.owner)
        buffers = self.node.buffers
        executor = self._background if job.ahead else None
        loop = asyncio.get_running_loop()
        task = loop.run_in_executor(executor, member.mask, buffers.size, buffers.take())
        self._masks[key] = task

        def made(task: asyncio.Future[np.ndarray]) -> None:
            if task.cancelled() or self._masks.get(key) is not task:
                return
            if task.exception() is not None:  # a key that does not agree
                self._masks.pop(key)
                self.session.contribution_failed(*key, str(task.exception()))
            else:
                self.session.mask_made(*key)
            self._pump()

        task.add_done_callback(made)

    async def _contribute(self, job: Contribute) -> None:
        """Encode this round's parameters into the masks of ``job``'s owners and offer
        each vector to its owner."""
        node, r = self.node, job.round
        params = self._trained  # (the round may end while we encode)
        masks = {o: self._masks.pop((r, o), None) for o in job.weights}
        vectors = {o: m.result() for o, m in masks.items() if m is not None and m.done()}
        if params is None or not vectors or node.sending_round() != r:
            return
        targets = [(job.weights[o], vector) for o, vector in vectors.items()]
        try:
            self.clipped = await asyncio.to_thread(self.fixed.encode_add_many, params, targets)
        except ValueError as exc:  # non-finite parameters
            for owner in vectors:
                self.session.contribution_failed(r, owner, str(exc))
            self._pump()
            return
        if node.sending_round() != r:
            return  # the round ended meanwhile
        for owner in self.session.contributed(r, vectors):
            node.send_vector(owner, vectors[owner])
        node.notify()

    # --- owner role: unmasking -----------------------------------------------------------

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
        node, session = self.node, self.session
        loop = asyncio.get_running_loop()
        # (not in place: our own model stays intact until the average passed its check)
        spare = node.buffers.take()
        summing: asyncio.Future[tuple[np.ndarray, int]] | None = None
        try:
            self._sync_links()
            ask = session.ask_present(r, received, loop.time())
            self._pump()
            state = session.owners[r]
            present = sorted(state.present or ())
            dropped = sorted((state.keyed or frozenset()) - frozenset(present))
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
            await self._wait(ask)
            self._sync_links()
            ask = session.ask_unmask(r, loop.time())
            self._pump()
            await self._wait(ask)
            state = session.revealed(r)
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
            session.end_unmasking(r)
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
        extra: dict[str, Any] = {"recovered": dropped} if dropped else {}
        return {p: w / total for p, w in kept.items()}, extra, clipped

    async def _wait(self, ask: Ask) -> None:
        """Wait for one unmasking step's answers, as long as the session's ``Ask`` says."""
        loop = asyncio.get_running_loop()

        def settled() -> bool:
            self._sync_links()  # (a member that reconnected was not asked on its new link)
            return ask.settled()

        await self.node.wait_until(settled, lambda: ask.wake_up(loop.time()))

    def _remove_masks(self, state: OwnerRound, group_sum: np.ndarray, total: float) -> np.ndarray:
        """(a worker job) Rebuild the secrets the reveals allow, remove their masks
        from the group sum and decode: the average, in the sum's memory."""
        return unmask_sum(group_sum, state.correction(), total, self.fixed)

    # --- the node's own secrets and journal ----------------------------------------------

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

    def _journal_round(self, r: int) -> bool:
        """Append ``contributed r`` to state_dir/secagg.log, fsynced before any secret of
        round r is drawn: the rounds we took part in are never joined again after a
        restart. False if it cannot be written (then we must not take part)."""
        try:
            if self._journal is None:
                fd = os.open(self._journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                self._journal = os.fdopen(fd, "a", encoding="utf-8")
            self._journal.write(f"contributed {r}\n")
            self._journal.flush()
            os.fsync(self._journal.fileno())
        except OSError as exc:
            log.error("%s round %d: secagg.log not written: %s", self.node.id, r, exc)
            return False
        return True
