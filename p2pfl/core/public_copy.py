"""Public copies: compressed gossip that still converges (CHOCO-SGD, Koloskova, Stich and
Jaggi, ICML 2019), pure numpy.

Every node keeps a *public copy* of its model: what its neighbours know of it. Each round
it sends only the compressed difference between its model and that copy, and both sides
add the decoded difference to their copies, so the copies stay equal bit for bit. What the
compression left out stays in the difference and goes out in later rounds (error
feedback). The averaging step mixes the copies, not the models:

    x_i <- x_i + gamma * (mix(x^_i, x^_j for neighbours j) - x^_i)

which keeps the network's average exactly where it was (the weights are doubly
stochastic), whatever the compression dropped; ``gamma`` is the consensus step.

A node's copy has a *version*: the round that last changed it, or ``INITIAL`` (the
shared initial model, which every node derives from the seed; peers compare a digest of
it when they connect). A difference names the version it applies to. A neighbour whose
copy is not at that version cannot use it: the sender knows which versions went out on
each connection (streams on one connection arrive in order), and sends that neighbour a
keyframe, the copy itself, instead (on a new connection, after a skipped round, after
the sender's restart). A receiver keeps its copies per connection.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np

from p2pfl.core.compress import (
    INITIAL,
    Compression,
    decode,
    encode_delta,
    encode_keyframe,
)
from p2pfl.errors import MessageError

__all__ = [
    "INITIAL",
    "NotFinite",
    "Outgoing",
    "OwnCopy",
    "PeerCopies",
    "consensus_step",
]


@dataclass
class Outgoing:
    """What a node sends in one round: the difference (for neighbours whose copy is at
    ``base``), and, made when first needed, the keyframe (for the others)."""

    round: int
    base: int | None
    delta: np.ndarray | None
    own: OwnCopy
    _keyframe: np.ndarray | None = None

    def for_version(self, version: int | None) -> tuple[np.ndarray, bool]:
        """The payload for a connection on which ``version`` went out last: the
        difference if it applies there, else the keyframe. Returns (payload, keyframe)."""
        if self.delta is not None and (self.base == INITIAL or version == self.base):
            return self.delta, False
        if self._keyframe is None:
            if self.own.version != self.round or self.own.copy is None:
                raise RuntimeError(f"round {self.round}'s keyframe asked for after its round")
            self._keyframe = encode_keyframe(self.own.copy)
        return self._keyframe, True


class OwnCopy:
    """A node's own public copy. ``initial`` is the shared initial model (a fresh node's
    neighbours know it already); None after a restart: the copy is then unknown to all,
    and the first round sends keyframes."""

    def __init__(self, compression: Compression, initial: np.ndarray | None) -> None:
        self.compression = compression
        self.copy = None if initial is None else np.array(initial, dtype=np.float32)
        self.version: int | None = None if initial is None else INITIAL
        #: Model-sized scratch arrays, reused every round (a fresh one costs its page
        #: faults: ~10 ms for 10M parameters).
        self._difference: np.ndarray | None = None
        self._spare: np.ndarray | None = None

    def advance(self, params: np.ndarray, round_index: int) -> Outgoing:
        """Round ``round_index``'s payload: the compressed difference to ``params`` (the
        trained model), applied to the copy exactly as the neighbours will apply it."""
        if self.copy is None or self.version is None:
            if not np.isfinite(params).all():
                raise NotFinite(_DIVERGED)
            self.copy = np.array(params, dtype=np.float32)
            self.version = round_index
            return Outgoing(round_index, None, None, self)
        base, copy = self.version, self.copy
        if self._difference is None or self._spare is None:
            self._difference, self._spare = np.empty_like(copy), np.empty_like(copy)
        difference = self._difference
        with np.errstate(over="ignore", invalid="ignore"):
            np.subtract(params, copy, out=difference)
        if not np.isfinite(difference).all():
            if not np.isfinite(params).all():
                raise NotFinite(_DIVERGED)
            np.clip(difference, -_F32_MAX, _F32_MAX, out=difference)  # (past float32)
        payload = encode_delta(difference, self.compression, base, scratch=self._spare)
        decoded = decode(payload, copy.size, self.compression, out=self._spare)
        if decoded.index is None:  # the difference is in the spare array: add the copy
            updated = decoded.values
            with np.errstate(over="ignore"):
                updated += copy  # (a + b is b + a in IEEE: the receivers' copy += values)
            if not np.isfinite(updated).all():
                raise NotFinite(_NOT_FINITE_COPY)
            self._spare, self.copy = copy, updated
        elif not decoded.add_to(copy):  # top-k: only its k values change (or none)
            raise NotFinite(_NOT_FINITE_COPY)
        self.version = round_index
        return Outgoing(round_index, base, payload, self)


_F32_MAX = np.finfo(np.float32).max
_DIVERGED = "the model is not finite (training diverged?): nothing is sent"
#: Rounding near float32's end: nothing changes, nothing is sent.
_NOT_FINITE_COPY = "the model's public copy would not be finite: nothing is sent"


class NotFinite(ValueError):
    """The node's own model is not finite: it sends nothing (its neighbours would refuse
    it, and a copy that is not finite could never be brought back by differences)."""


class PeerCopies:
    """This node's copies of its neighbours' public copies, one per connection.

    A copy belongs to the connection its payloads came on: streams on one connection
    arrive in order, and the sender starts every connection with a keyframe (or a
    difference from the initial model), so a connection's copy can never mix with
    another's: a crossing dial's, or one from before the sender restarted (a restarted
    sender may name a round again with other contents)."""

    def __init__(self, compression: Compression, initial: np.ndarray) -> None:
        self.compression = compression
        self.initial = np.array(initial, dtype=np.float32)
        #: connection -> (peer, version, copy)
        self.copies: dict[Hashable, tuple[str, int, np.ndarray]] = {}
        #: Where dense differences are decoded, reused (see OwnCopy).
        self._scratch: np.ndarray | None = None

    def apply(
        self,
        link: Hashable,
        peer: str,
        round_index: int,
        payload: np.ndarray | bytes | memoryview,
    ) -> np.ndarray:
        """Bring the copy of ``peer``'s model held for ``link`` to version
        ``round_index`` with ``payload``; returns the copy (owned here: take a snapshot
        to keep it). MessageError for a payload that is malformed or cannot apply: the
        sender believes our copy is at a version it is not (the connection is dropped,
        and the sender's next one starts with a keyframe)."""
        held = self.copies.get(link)
        if held is not None and round_index <= held[1]:
            raise MessageError(
                f"round {round_index}'s payload on a connection whose copy is at {held[1]}"
            )
        if self._scratch is None:
            self._scratch = np.empty_like(self.initial)
        decoded = decode(payload, self.initial.size, self.compression, out=self._scratch)
        if decoded.keyframe:
            copy = decoded.values.copy()
        elif decoded.base == INITIAL:
            copy = self.initial.copy()
            if not decoded.add_to(copy):
                raise MessageError(f"{peer}'s model is not finite after its difference")
        elif held is None:
            raise MessageError(
                f"a difference to version {decoded.base} of {peer}'s model on a connection "
                "that brought no copy of it"
            )
        elif held[1] == decoded.base:
            copy = held[2]
            if not decoded.add_to(copy):
                del self.copies[link]  # (half changed: the connection is dropped)
                raise MessageError(f"{peer}'s model is not finite after its difference")
        else:
            raise MessageError(
                f"a difference to version {decoded.base} of {peer}'s model, ours is at {held[1]}"
            )
        self.copies[link] = (peer, round_index, copy)
        return copy

    def forget(self, link: Hashable) -> None:
        """A connection closed: its copy goes with it."""
        self.copies.pop(link, None)

    def keep_only(self, peers: frozenset[str]) -> None:
        """Forget the copies of peers that cannot send us a difference now: a sender
        streams a round only to a neighbour in it that is at most ``max_buffered_rounds``
        behind (``rounds.may_send``), so ``peers`` are the neighbours of rounds r - 1
        (late streams) to r + max_buffered_rounds."""
        for link in [k for k, (peer, _, _) in self.copies.items() if peer not in peers]:
            del self.copies[link]


def consensus_step(
    params: np.ndarray, own_copy: np.ndarray, mixed: np.ndarray, gamma: float
) -> None:
    """CHOCO's averaging step, in place on ``params``: x += gamma * (mixed - x^)."""
    mixed -= own_copy
    mixed *= np.float32(gamma)
    params += mixed
