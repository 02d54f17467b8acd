"""A node's secure aggregation across rounds, sans I/O: the protocol's decisions.

``group`` holds one group's protocol for one round; this session runs those states for a
node that is, in every round r, a *member* of each neighbour's group and the *owner* of
its own. It is fed what happens (a round starts, a link comes or goes, a message arrives,
training is done, a mask is made) and the time, and it answers, like websockets'
``Protocol``, through three queues the shell drains:

- ``data_to_send()``: (peer, message) pairs, lamport stamps included;
- ``events_to_log()``: the events for the node's log (refusals, recoveries);
- ``jobs_to_run()``: work for a thread (``MakeMask``, ``Contribute``).

``daemon.secure_exchange`` pumps it: sends, logs, runs the jobs, writes the journal, and
does the owner's arithmetic (summing, unmasking, the range check of the average). The
session opens no file, socket or thread; its randomness comes from ``rng`` (``secrets``
unless a test passes a seeded one); it logs a few lines through ``logging``.

The rules (each has a unit test in ``tests/test_secure_session.py``):

1. *Joining.* A round is joined (its secrets drawn) once per life, and only once the
   shell has journalled it: a restarted node sits out, as member and as owner, every
   round its journal names, since its last life may have sent keys or vectors for it. The
   next round is joined with the current one when rounds may be buffered: its key
   exchange and masks need no parameters and run during this round.
2. *Keys go ahead only as far as they are kept.* KEYS for round r go out on a link once,
   and only when the neighbour announced a round that keeps r (``announced_keeps``: the
   one buffering window of ``core.rounds``); a new link gets them again.
3. *Owning.* An owner's state for round r exists only within the buffering window; KEYS
   outside it are refused. SHARES go out when every member's KEYS are in, or once our
   training is done and the missing members are unavailable (gone, or silent: suspected
   by the failure detector) or past the round, or half the round timeout after
   collection started. Members left out are not waited for. The same KEYS
   again (a reconnect) get the same SHARES again; KEYS too late get an empty SHARES.
4. *Masks.* An accepted SHARES starts the mask at once (the next round's as low-priority
   work); once trained, every ready mask gets the parameters in one pass, later ones as
   they come; a contribution whose round ended meanwhile is dropped.
5. *Collection* ends when the round core says so and no vector of ours is still due to an
   owner that is available (neither gone nor silent) and not past the round.
6. *Unmasking.* PRESENT to the present members, UNMASK (with the tags) to those who
   confirmed; each step waits for the members asked on the link they are still on, at
   most ``recovery_timeout``, and once the threshold answered, as long again at most.
7. *Refusals* are logged at most a few times per peer and window; an answer to an
   unmasking step that already ended (the owner had enough) is ``late``, not a ``reject``.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from p2pfl.core.rounds import announced_keeps
from p2pfl.core.topology import metropolis_weights
from p2pfl.errors import SecureAggregationError
from p2pfl.proto.guard import Throttle
from p2pfl.proto.wire import Confirm, Keys, Present, Reveal, Shares, Unmask
from p2pfl.secure.group import MemberRound, OwnerRound, Randomness, threshold

if TYPE_CHECKING:
    from p2pfl.config import Config
    from p2pfl.core.clock import LamportClock
    from p2pfl.core.rounds import RoundTracker

log = logging.getLogger("p2pfl.secure")

SecureMessage = Keys | Shares | Present | Confirm | Unmask | Reveal
#: How many past rounds an answer may arrive for and count as ``late`` (not a ``reject``).
UNMASKED_KEPT = 4


@dataclass(frozen=True)
class Settings:
    """What the session reads from peers.yaml."""

    rounds: int
    max_buffered_rounds: int
    #: The fraction behind each group's Shamir threshold.
    threshold: float
    round_timeout: float
    recovery_timeout: float

    @classmethod
    def from_config(cls, config: Config) -> Settings:
        return cls(
            rounds=config.training.rounds,
            max_buffered_rounds=config.limits.max_buffered_rounds,
            threshold=config.aggregation.threshold,
            round_timeout=config.training.round_timeout,
            recovery_timeout=config.aggregation.recovery_timeout,
        )


@dataclass(frozen=True)
class Event:
    """An entry for the node's event log."""

    kind: str
    round: int
    fields: dict[str, Any]


@dataclass(frozen=True)
class MakeMask:
    """Make ``member.mask(...)`` off the event loop, then call ``mask_made`` (or
    ``contribution_failed``). ``ahead``: the next round's, so low priority."""

    member: MemberRound
    ahead: bool


@dataclass(frozen=True)
class Contribute:
    """Encode round ``round``'s trained parameters into the masks for these owners (our
    Metropolis weight in each owner's group), then call ``contributed``."""

    round: int
    weights: dict[str, float]


@dataclass
class Ask:
    """One step of unmasking: who was asked on which link, and how long to wait."""

    #: The members asked, and the generation of the link each was asked on.
    asked: dict[str, int]
    answered: Callable[[], frozenset[str]]
    needed: int
    started: float
    deadline: float
    #: The session's live link generations.
    links: Mapping[str, int]
    enough_at: float | None = field(default=None)

    def settled(self) -> bool:
        """Every member asked answered, or left the link it was asked on."""
        got = self.answered()
        return all(p in got or self.links.get(p) != gen for p, gen in self.asked.items())

    def wake_up(self, now: float) -> float:
        """When to stop waiting without news (call before ``settled`` on every wake-up)."""
        if self.enough_at is None and len(self.answered()) >= self.needed:
            self.enough_at = now
        if self.enough_at is not None:
            return min(self.deadline, self.enough_at + max(self.enough_at - self.started, 0.01))
        return self.deadline


class SecureSession:
    """Secure aggregation's decisions for one node (see the module docstring)."""

    def __init__(
        self,
        me: str,
        settings: Settings,
        *,
        tracker: RoundTracker,
        graph: Callable[[int], dict[str, frozenset[str]]],
        clock: LamportClock,
        pair_secret: Callable[[str], bytes],
        restart_through: int = -1,
        rng: Randomness = secrets,
    ) -> None:
        self.me = me
        self.settings = settings
        self.tracker = tracker
        #: ``training.min_neighbours``: each round raises the tracker's floor to the
        #: group's threshold too (fewer vectors could not be unmasked anyway).
        self._min_models = tracker.min_models
        self.graph = graph
        self.clock = clock
        self._pair_secret = pair_secret
        self._rng = rng
        self.members: dict[tuple[int, str], MemberRound] = {}
        self.owners: dict[int, OwnerRound] = {}
        #: The last round we took part in before a restart, and the rounds joined since.
        self.restart_through = restart_through
        self._joined: set[int] = set()
        self._unjournalled: set[int] = set()
        #: Masks being made (False) or made (True), per (round, owner).
        self._masks: dict[tuple[int, str], bool] = {}
        #: The round whose parameters are trained (None: not yet this round).
        self._trained: int | None = None
        self._keys_deadline: float | None = None
        #: Per peer with a link: the link's generation (a new link, or none, is a new one).
        self._links: dict[str, int] = {}
        self._linked: set[str] = set()
        #: The latest round whose KEYS went out on the peer's current link.
        self._keys_sent: dict[str, int] = {}
        self.refusals = Throttle(burst=5, window=10.0)
        #: Recent rounds whose unmasking (as owner) is over.
        self._unmasked: set[int] = set()
        self._send: list[tuple[str, SecureMessage]] = []
        self._events: list[Event] = []
        self._jobs: list[MakeMask | Contribute] = []

    # --- what the shell drains -----------------------------------------------------------

    def data_to_send(self) -> list[tuple[str, SecureMessage]]:
        out, self._send = self._send, []
        return out

    def events_to_log(self) -> list[Event]:
        out, self._events = self._events, []
        return out

    def jobs_to_run(self) -> list[MakeMask | Contribute]:
        out, self._jobs = self._jobs, []
        return out

    # --- links ---------------------------------------------------------------------------

    def link_up(self, peer: str) -> None:
        """``peer`` has a new link (what went out on the old one may be lost)."""
        self._links[peer] = self._links.get(peer, 0) + 1
        self._linked.add(peer)
        self._keys_sent.pop(peer, None)

    def link_down(self, peer: str) -> None:
        """``peer`` has no link any more."""
        self._links[peer] = self._links.get(peer, 0) + 1
        self._linked.discard(peer)
        self._keys_sent.pop(peer, None)

    def offer_keys(self, peer: str, announced: int | None) -> None:
        """Queue this round's and the next round's KEYS for ``peer`` (whose current link
        announced round ``announced``), each once per link, once ``peer`` keeps them."""
        if announced is None or peer not in self._linked:
            return
        current = self.tracker.current
        for r in (current, current + 1):
            member = self.members.get((r, peer))
            sent = self._keys_sent.get(peer)
            if member is None or (sent is not None and sent >= r):
                continue
            if not announced_keeps(r, announced, self.settings.max_buffered_rounds):
                continue
            self._keys_sent[peer] = r
            self._send.append((peer, Keys(self.clock.tick(), r, member.public, member.boxes)))

    # --- rounds --------------------------------------------------------------------------

    def sits_out(self, r: int) -> bool:
        """Rounds we took part in before a restart (or could not journal): neither member
        nor owner."""
        return r <= self.restart_through or r in self._unjournalled

    def rounds_to_join(self, r: int) -> list[int]:
        """The rounds ``start_round(r)`` would join: the shell journals them first."""
        if self.sits_out(r):
            return []
        wanted = [r]
        if self.settings.max_buffered_rounds >= 1 and r + 1 < self.settings.rounds:
            wanted.append(r + 1)
        return [j for j in wanted if j not in self._joined]

    def start_round(self, r: int, journalled: Collection[int]) -> None:
        """Forget old rounds; as a member, draw the secrets of the rounds
        ``rounds_to_join(r)`` named, in order, up to the first one not ``journalled``."""
        horizon = r - self.settings.max_buffered_rounds - 2
        self.members = {k: v for k, v in self.members.items() if k[0] >= horizon}
        self.owners = {k: v for k, v in self.owners.items() if k >= r}
        self._masks = {k: v for k, v in self._masks.items() if k[0] >= r}
        self._trained = None
        self._keys_deadline = None
        for j in self.rounds_to_join(r):
            if j not in journalled:  # (nor any round after it: it was never written)
                log.error("%s round %d: not journalled, so not taking part", self.me, j)
                self._unjournalled.add(j)
                break
            self._join(j)
        # Silent members are given up only once the group can still be unmasked.
        group = len(self.graph(r)[self.me])
        self.tracker.min_models = max(self._min_models, threshold(group, self.settings.threshold))
        if self.sits_out(r) or r not in self._joined:
            # Before a restart we already sent keys (and maybe vectors) for this round: new
            # secrets would put a second vector under other masks, or contradict the first.
            # Nor can we own it: our members already hold that life's state and refuse a
            # second SHARES. Nobody is waited for; the round keeps our own model.
            log.info("%s round %d: sitting this round out", self.me, r)
            self.tracker.exclude(self.graph(r)[self.me])

    def _join(self, r: int) -> None:
        self._joined = {j for j in self._joined if j >= r - 1} | {r}
        graph = self.graph(r)
        for owner in sorted(graph[self.me]):
            members = graph[owner]
            pair = {k: self._pair_secret(k) for k in members if k != self.me}
            self.members[(r, owner)] = MemberRound(
                self.me, owner, members, r, pair, self.settings.threshold, self._rng
            )

    def trained(self, r: int) -> None:
        """Training for round r is done: one ``Contribute`` for every mask already made
        (usually all: they were made during the last round); the others as they come."""
        self._trained = r
        ready = [owner for (rr, owner), made in self._masks.items() if rr == r and made]
        self._contribute(r, ready)

    def mask_made(self, r: int, owner: str) -> None:
        if (r, owner) not in self._masks:
            return  # its round ended
        self._masks[(r, owner)] = True
        if self._trained == r:
            self._contribute(r, [owner])

    def _contribute(self, r: int, owners: list[str]) -> None:
        weights: dict[str, float] = {}
        for owner in owners:
            member = self.members.get((r, owner))
            del self._masks[(r, owner)]  # (the shell hands the mask to this job)
            if member is not None and member.failure is None and member.keyed is not None:
                weights[owner] = metropolis_weights(self.graph(r), owner)[self.me]
        if weights:
            self._jobs.append(Contribute(r, weights))

    def contributed(self, r: int, owners: Collection[str]) -> list[str]:
        """The vectors for ``owners`` are encoded: those still wanted (their round is still
        the one trained), now counted as sent."""
        if self._trained != r:
            return []
        wanted = [o for o in owners if (r, o) in self.members]
        for owner in wanted:
            self.members[(r, owner)].contributed = True
        return wanted

    def contribution_failed(self, r: int, owner: str, reason: str) -> None:
        """A mask or an encoding failed (a key that does not agree, non-finite
        parameters): no vector for ``owner`` this round, and nobody waits for one."""
        self._masks.pop((r, owner), None)
        member = self.members.get((r, owner))
        if member is not None:
            member.failure = reason
        log.error("%s round %d: no contribution to %s: %s", self.me, r, owner, reason)

    def start_collecting(self, now: float) -> None:
        self._keys_deadline = now + self.settings.round_timeout / 2

    def collection_done(self, r: int, now: float) -> bool:
        """Also the owner's clock: sends SHARES when waiting for more keys is over."""
        state = self._owner(r)
        if state is not None and state.keyed is None and self._keys_wait_over(state, now):
            self._dispatch(state)
        return self.tracker.collection_done(now) and not self._pending(r, now)

    def next_wakeup(self, r: int, now: float) -> float | None:
        """When ``collection_done`` may turn true without news (never a time already past,
        but for the round's deadline: the wait would end there)."""
        tracker = self.tracker
        times = [tracker.next_wakeup(now)]
        times += [tracker.gives_up_at(owner) for owner in self._pending(r, now)]
        state = self.owners.get(r)
        if state is not None and state.keyed is None:  # a member without keys may go
            if self._keys_deadline is not None and self._keys_deadline > now:
                times.append(self._keys_deadline)
            times += [
                tracker.gives_up_at(m)
                for m in state.members
                if m not in state.publics and not tracker.unavailable(m, now)
                # (silent members given up once enough keys are in: _keys_wait_over)
            ]
        known = [t for t in times if t is not None]
        return min(known) if known else None

    def _pending(self, r: int, now: float) -> list[str]:
        """Owners we may still send a vector to this round."""
        tracker = self.tracker
        return [
            owner
            for (round_index, owner), member in self.members.items()
            if round_index == r
            and not member.contributed
            and member.failure is None
            and not tracker.unavailable(owner, now)
            and tracker.peer_rounds.get(owner, r) <= r
        ]

    # --- messages ------------------------------------------------------------------------

    def receive(self, peer: str, msg: SecureMessage, now: float) -> None:
        """A secure-aggregation message from ``peer``'s current link."""
        if isinstance(msg, Keys):
            self._on_keys(peer, msg, now)
        elif isinstance(msg, Shares):
            self._on_shares(peer, msg, now)
        elif isinstance(msg, Present):
            self._on_present(peer, msg, now)
        elif isinstance(msg, Unmask):
            self._answer(peer, msg.round, now, "unmask request", lambda m: m.reveal(msg.tags))
        else:
            self._on_owner_reply(peer, msg, now)

    def _on_shares(self, owner: str, msg: Shares, now: float) -> None:
        key = (msg.round, owner)
        member = self.members.get(key)
        if member is None or msg.round < self.tracker.current:
            # (a late one would leave a model-sized mask behind that no round ever uses)
            self._refuse(owner, msg.round, f"unrequested SHARES for round {msg.round}", now)
            return
        try:
            if not member.accept_shares(msg.boxes):
                return  # the same SHARES again after a reconnect
        except SecureAggregationError as exc:
            self._refuse(owner, msg.round, f"SHARES refused: {exc}", now)
            return
        self._masks[key] = False
        self._jobs.append(MakeMask(member, ahead=msg.round > self.tracker.current))

    def _on_present(self, owner: str, msg: Present, now: float) -> None:
        """The owner's U2: confirm it (tags for the other present members) if we can."""

        def confirm(member: MemberRound) -> Confirm:
            tags = member.confirm(msg.present)
            dropped = sorted((member.keyed or frozenset()) - frozenset(msg.present))
            if dropped:
                fields = {"role": "member", "owner": owner, "missing": dropped}
                self._events.append(Event("recovery", msg.round, fields))
            return Confirm(self.clock.tick(), msg.round, tags)

        self._answer(owner, msg.round, now, "present set", confirm)

    def _answer(
        self,
        owner: str,
        r: int,
        now: float,
        what: str,
        answer: Callable[[MemberRound], SecureMessage | dict[str, tuple[int, bytes]]],
    ) -> None:
        """A member's reply to its owner's PRESENT or UNMASK, or the refusal."""
        member = self.members.get((r, owner))
        try:
            if member is None:
                raise SecureAggregationError(f"we sent {owner} no vector in round {r}")
            reply = answer(member)
        except SecureAggregationError as exc:
            self._refuse(owner, r, f"{what} refused: {exc}", now)
            return
        if isinstance(reply, dict):
            reply = Reveal(self.clock.tick(), r, reply)
        self._send.append((owner, reply))

    def _owner(self, r: int) -> OwnerRound | None:
        """Our group's state for round r (created on first use, within the buffer window)."""
        if self.sits_out(r):
            return None
        state = self.owners.get(r)
        if state is None and self.tracker.in_window(r) and r < self.settings.rounds:
            members = self.graph(r)[self.me]
            state = OwnerRound(self.me, members, r, self.settings.threshold)
            self.owners[r] = state
        return state

    def _on_keys(self, member: str, msg: Keys, now: float) -> None:
        if self.sits_out(msg.round):
            # An empty SHARES tells the member at once that this group has no round.
            self._refuse(member, msg.round, f"KEYS refused: we sit round {msg.round} out", now)
            self._send.append((member, Shares(self.clock.tick(), msg.round, {})))
            return
        state = self._owner(msg.round)
        try:
            if state is None:
                raise SecureAggregationError(
                    f"KEYS for round {msg.round} outside rounds {self.tracker.current}.."
                    f"{self.tracker.horizon}"
                )
            again = member in state.publics
            state.add_keys(member, msg.public, msg.boxes)
        except SecureAggregationError as exc:
            self._refuse(member, msg.round, f"KEYS refused: {exc}", now)
            if state is not None and state.keyed is not None and member in state.members:
                # too late for this round's key exchange: say so, so it stops waiting
                self._send.append((member, Shares(self.clock.tick(), msg.round, {})))
            return
        if again and state.keyed is not None and member in state.keyed:
            # The same KEYS on a new connection: the SHARES we sent may have died with the
            # old one. Send them again (a member that has them ignores the copy).
            shares = state.shares_for(member)
            self._send.append((member, Shares(self.clock.tick(), msg.round, shares)))
        elif state.keyed is None and state.all_keyed():
            self._dispatch(state)

    def _keys_wait_over(self, state: OwnerRound, now: float) -> bool:
        """After our training: stop waiting for keys from those that will not send them."""
        tracker = self.tracker
        if self._keys_deadline is not None and now >= self._keys_deadline:
            return True
        # Silent members are given up only once enough others sent keys for the group to
        # be unmasked: otherwise a short delay on one link would fail the whole group, and
        # a node cut off from everyone waits for its links (as plain rounds do).
        enough = len(state.publics) >= max(self._min_models, state.threshold)
        return self._trained is not None and all(
            tracker.gone(m, now)
            or (enough and tracker.silent(m, now))
            or tracker.peer_rounds.get(m, state.round) > state.round
            for m in state.members
            if m not in state.publics
        )

    def _dispatch(self, state: OwnerRound) -> None:
        per_member = state.dispatch()
        if state.failure is not None:
            log.warning("%s round %d: %s", self.me, state.round, state.failure)
        if state.round == self.tracker.current:
            self.tracker.exclude(frozenset(state.members) - (state.keyed or frozenset()))
        lamport = self.clock.tick()
        for member, boxes in per_member.items():
            if member in self._linked:
                self._send.append((member, Shares(lamport, state.round, boxes)))

    def _on_owner_reply(self, member: str, msg: Confirm | Reveal, now: float) -> None:
        state = self.owners.get(msg.round)
        what = "CONFIRM" if isinstance(msg, Confirm) else "REVEAL"
        if state is None and msg.round in self._unmasked:
            # Expected traffic, not a fault: a member answered after we had enough answers
            # and stopped waiting (a debug event, so a clean run logs no reject).
            reason = f"{what} after the unmasking of round {msg.round} ended"
            self._refuse(member, msg.round, reason, now, kind="late")
            return
        try:
            if isinstance(msg, Confirm):
                if state is None:
                    raise SecureAggregationError(f"no key exchange for round {msg.round}")
                state.add_confirm(member, msg.tags)
            else:
                if state is None:
                    raise SecureAggregationError(f"unrequested reveal for round {msg.round}")
                state.add_reveal(member, msg.shares)
        except SecureAggregationError as exc:
            self._refuse(member, msg.round, f"{what} refused: {exc}", now)

    # --- unmasking (owner) ---------------------------------------------------------------

    def ask_present(self, r: int, received: Collection[str], now: float) -> Ask:
        """Fix U2 from the vectors that arrived and send PRESENT. Raises
        SecureAggregationError if this round cannot be unmasked."""
        state = self.owners.get(r)
        if self.sits_out(r):
            raise SecureAggregationError("sat this round out after a restart")
        if state is None or state.keyed is None:
            raise SecureAggregationError("no key exchange took place this round")
        dropped = sorted(state.unmask_request(received))
        present = sorted(state.present or ())
        if dropped:
            fields = {"role": "owner", "missing": dropped, "survivors": present}
            self._events.append(Event("recovery", r, fields))
        message = Present(self.clock.tick(), r, tuple(present))
        return self._ask(dict.fromkeys(present, message), state.confirmed, state.threshold, now)

    def ask_unmask(self, r: int, now: float) -> Ask:
        """Once the confirmations are in: UNMASK, with their tags, to those who confirmed."""
        state = self._unmasking(r)
        confirmed = sorted(state.confirmed())
        if len(confirmed) < state.threshold:
            raise SecureAggregationError(
                f"unmasking failed: {len(confirmed)} of {len(state.present or ())} confirmed "
                f"the present set ({state.threshold} needed)"
            )
        lamport = self.clock.tick()
        messages = {p: Unmask(lamport, r, state.tags_for(p)) for p in confirmed}
        return self._ask(messages, lambda: frozenset(state.reveals), state.threshold, now)

    def revealed(self, r: int) -> OwnerRound:
        """Once the reveals are in: the group's state, ready for ``correction()``."""
        state = self._unmasking(r)
        if not state.enough():
            confirmed = state.confirmed()
            silent = sorted(p for p in confirmed if p not in state.reveals)
            raise SecureAggregationError(
                f"unmasking failed: {len(state.reveals)} of {len(confirmed)} answered "
                f"({state.threshold} needed); no answer from {', '.join(silent)}"
            )
        return state

    def end_unmasking(self, r: int) -> None:
        """The round's unmasking is over: later answers are dropped (logged as ``late``)."""
        self.owners.pop(r, None)
        self._unmasked = {u for u in self._unmasked if u > r - UNMASKED_KEPT} | {r}

    def _unmasking(self, r: int) -> OwnerRound:
        state = self.owners.get(r)
        if state is None or state.present is None:
            raise SecureAggregationError(f"no unmasking under way for round {r}")
        return state

    def _ask(
        self,
        messages: Mapping[str, SecureMessage],
        answered: Callable[[], frozenset[str]],
        needed: int,
        now: float,
    ) -> Ask:
        asked: dict[str, int] = {}
        for peer, message in messages.items():
            if peer in self._linked:
                asked[peer] = self._links[peer]
                self._send.append((peer, message))
        deadline = now + self.settings.recovery_timeout
        return Ask(asked, answered, needed, now, deadline, self._links)

    # --- helpers -------------------------------------------------------------------------

    def _refuse(
        self, peer: str, round_index: int, reason: str, now: float, kind: str = "reject"
    ) -> None:
        """Log a refused (or ``late``) step, at most a few times per peer and window
        (floods stay quiet)."""
        suppressed = self.refusals.allow(peer, now)
        if suppressed is not None:
            fields: dict[str, Any] = {"peer": peer, "reason": reason}
            if suppressed:
                fields["suppressed"] = suppressed
            self._events.append(Event(kind, round_index, fields))
