"""``training.standardize: federated`` at one node: the shell around ``core.moments``.

Before round 0 every node floods its masked feature totals (MOMENTS) to its neighbours,
and passes on, once, every peer's it has not seen; a new link gets every share the node
holds (so a node that starts late still gets them all). Once all are in, the node takes
the network's mean and standard deviation, standardises its data and keeps them in
``STATE/standardize.json``: a restart reuses them (the same config digest) instead of
asking the network again.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from p2pfl.core.moments import NetworkMoments, digest, local_moments, mean_std
from p2pfl.errors import MessageError
from p2pfl.proto.keys import pairwise_secret
from p2pfl.proto.wire import Moments, encode_moments
from p2pfl.store.standardization import save

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
        self.moments.add_own(local_moments(raw_x))
        #: The links that got every share we held (then each new one as it came).
        self._offered: weakref.WeakSet[PeerLink] = weakref.WeakSet()

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
            self.events.emit("reject", 0, peer=link.peer_id, reason=str(exc))
            return False
        if new:  # (a link not offered yet gets it with everything else when it is)
            for peer, other in links.items():
                if peer not in (link.peer_id, msg.origin) and other in self._offered:
                    self._send(other, msg.origin, spawn)
        return new

    def _send(self, link: PeerLink, origin: str, spawn: Any) -> None:
        vector, tags = self.moments.shares[origin]
        message = encode_moments(self.clock.tick(), origin, vector, tags)

        async def send() -> None:
            with contextlib.suppress(Exception):  # (a link that died: its peer gets them anew)
                await link.send_message(message)

        spawn(send())

    def result(self, state_dir: Path, config: Config) -> tuple[np.ndarray, np.ndarray]:
        """The network's mean and standard deviation (all shares in), saved for restarts."""
        totals = self.moments.totals()
        mean, std = mean_std(totals)
        save(state_dir, config, mean, std, round(totals[0]), digest(mean, std))
        return mean, std
