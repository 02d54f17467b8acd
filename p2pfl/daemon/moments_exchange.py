"""``training.standardize: federated`` at one node: the shell around ``core.moments``.

Before round 0 every node floods its masked feature totals (MOMENTS) to its neighbours,
and passes on, once, every peer's it has not seen; a new link gets every share the node
holds (so a node that starts late still gets them all). Once all are in, the node takes
the network's mean and standard deviation, standardises its data and keeps them in
``STATE/standardize.json``: a restart reuses them (the same config digest) instead of
asking the network again.
"""

from __future__ import annotations

import hashlib
import logging
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from p2pfl.core.moments import Equivocation, NetworkMoments, digest, local_moments, mean_std
from p2pfl.daemon.net import quietly
from p2pfl.errors import DataError, MessageError
from p2pfl.proto.guard import Throttle
from p2pfl.proto.keys import pairwise_secret
from p2pfl.proto.wire import Moments, encode_moments, encode_standardized
from p2pfl.store.standardization import SHARE_FILE, load_share, save, save_share

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from p2pfl.config import Config
    from p2pfl.core.clock import LamportClock
    from p2pfl.daemon.events import EventLog
    from p2pfl.daemon.net import PeerLink

log = logging.getLogger(__name__)

#: Purpose bound into the pairwise secrets behind the moments' masks and tags.
MOMENTS_PURPOSE = b"p2pfl moments"


class MomentsExchange:
    """Flooding the masked totals, and the standardisation they give."""

    def __init__(
        self,
        config: Config,
        own_id: str,
        private_key: X25519PrivateKey,
        raw_x: np.ndarray,
        clock: LamportClock,
        events: EventLog,
        state_dir: Path,
    ) -> None:
        self.own_id = own_id
        self.clock = clock
        self.events = events
        secrets = {
            p: pairwise_secret(
                private_key,
                config.peers[p].public_key,
                network=config.network,
                own_id=own_id,
                their_id=p,
                purpose=MOMENTS_PURPOSE,
            )
            for p in config.peer_ids
            if p != own_id
        }
        self.moments = NetworkMoments(
            own_id, config.peer_ids, config.training.model.inputs, secrets, config.digest
        )
        self._own_share(config, state_dir, local_moments(raw_x))
        #: Origins that sent two different shares (the run cannot standardise).
        self.equivocated: set[str] = set()
        self._rejects = Throttle(burst=5, window=10.0)
        #: The links that got every share we held (then each new one as it came).
        self._offered: weakref.WeakSet[PeerLink] = weakref.WeakSet()

    def _own_share(self, config: Config, state_dir: Path, values: np.ndarray) -> None:
        """Our masked totals: the very bytes an earlier life sent, if it sent some under
        this config (new totals under the same masks would show the difference), else new
        ones, kept before anything is sent."""
        fingerprint = hashlib.sha256(values.tobytes()).hexdigest()
        saved = load_share(state_dir, config)
        if saved is not None:
            if saved.get("totals") != fingerprint:
                raise DataError(
                    f"{state_dir / SHARE_FILE}: this node already sent masked feature totals "
                    "for this config, from other data; new ones under the same masks would "
                    "reveal the difference. Change the config (e.g. its seed) to start afresh"
                )
            try:
                tags = {str(p): bytes.fromhex(t) for p, t in saved["tags"].items()}
                self.moments.add_own_share(bytes.fromhex(saved["vector"]), tags)
            except (KeyError, TypeError, AttributeError, ValueError) as exc:
                raise DataError(f"{state_dir / SHARE_FILE}: unreadable ({exc!r})") from exc
            return
        try:
            self.moments.add_own(values)
        except ValueError as exc:
            raise DataError(f"{config.source}: training.standardize: {exc}") from exc
        vector, tags = self.moments.shares[self.own_id]
        record = {
            "config_digest": config.digest.hex(),
            "totals": fingerprint,
            "vector": vector.hex(),
            "tags": {p: t.hex() for p, t in tags.items()},
        }
        save_share(state_dir, record)

    def offer_all(self, link: PeerLink, spawn: Any) -> None:
        """Every share we hold, once per link, once its peer announced its round on it
        (before that, it may not have read our first record yet, and still refuses a
        message this big)."""
        if link.announced is None or link in self._offered:
            return
        self._offered.add(link)
        for origin in sorted(self.moments.shares):
            if origin != link.peer_id:
                self._send(link, origin, spawn)

    def receive(self, link: PeerLink, msg: Moments, links: dict[str, PeerLink], spawn: Any) -> bool:
        """A share from ``link``; passed on to the other links if new. True if new."""
        try:
            new = self.moments.add(msg.origin, msg.vector, msg.tags)
        except MessageError as exc:
            if isinstance(exc, Equivocation):
                self.equivocated.add(msg.origin)
            suppressed = self._rejects.allow(link.peer_id, time.monotonic())
            if suppressed is not None:  # (a flood of bad shares stays a few lines)
                extra = {"suppressed": suppressed} if suppressed else {}
                self.events.emit("reject", 0, peer=link.peer_id, reason=str(exc), **extra)
            return False
        if new:  # (a link not offered yet gets it with everything else when it is)
            for peer, other in links.items():
                if peer not in (link.peer_id, msg.origin) and other in self._offered:
                    self._send(other, msg.origin, spawn)
        return new

    def _send(self, link: PeerLink, origin: str, spawn: Any) -> None:
        vector, tags = self.moments.shares[origin]
        message = encode_moments(self.clock.tick(), origin, vector, tags)

        spawn(quietly(link.send_message(message)))  # (a dead link: its peer gets it anew)

    def result(self, state_dir: Path, config: Config) -> tuple[np.ndarray, np.ndarray]:
        """The network's mean and standard deviation (all shares in), saved for restarts."""
        totals = self.moments.totals()
        mean, std = mean_std(totals)
        save(state_dir, config, mean, std, round(totals[0]), digest(mean, std))
        return mean, std


class Agreement:
    """Neighbours compare the standardisation they ended with (STANDARDIZED, the digest of
    mean and deviation): honest peers always agree, so a difference means a peer told
    different peers different totals, and the two refuse each other instead of mixing
    differently standardised models."""

    def __init__(self, clock: LamportClock) -> None:
        self.clock = clock
        self.own: bytes | None = None
        #: What each neighbour said it ended with.
        self.heard: dict[str, bytes] = {}
        self._told: weakref.WeakSet[PeerLink] = weakref.WeakSet()

    def set_own(self, digest_hex: str) -> None:
        self.own = bytes.fromhex(digest_hex)

    def tell(self, link: PeerLink, spawn: Any) -> None:
        """Our digest, once per link, once we have one and the peer announced its round."""
        if self.own is None or link.announced is None or link in self._told:
            return
        self._told.add(link)
        message = encode_standardized(self.clock.tick(), self.own)

        spawn(quietly(link.send_message(message)))  # (a dead link: its peer gets it anew)

    def conflict(self, peer: str) -> str | None:
        """Why ``peer`` must be refused (None: it agrees, or one side is not done)."""
        theirs = self.heard.get(peer)
        if self.own is None or theirs is None or theirs == self.own:
            return None
        return (
            f"{peer} standardised with {theirs.hex()}, we with {self.own.hex()}: a peer told "
            "different peers different totals"
        )
