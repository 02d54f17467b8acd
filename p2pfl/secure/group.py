"""One group's secure-aggregation protocol for one round, both roles, pure: no sockets, no
loop, and its randomness (ephemeral keys, self-mask seeds, Shamir coefficients, box
nonces) from the ``rng`` it is given (``secrets`` unless a test passes a seeded one). (The
owner's low-order-point check of a member's key uses a throwaway key of its own.)

This is the protocol of Bonawitz et al. (CCS 2017), run inside each neighbourhood: the
owner i of the group plays the server, its neighbours the members (``arithmetic`` has the
arithmetic). For round r and owner i, with members M (i's neighbours, sorted), n = |M| and
threshold t = floor(f * n) + 1 for ``aggregation.threshold`` f in [0.5, 1) (by default
t = n // 2 + 1, a strict majority):

1. KEYS (member j -> owner): j draws an ephemeral X25519 key e_j and a self-mask seed b_j,
   splits both t-of-n (Shamir) and sends, for every other member k, a *box*: e_j's public
   key and k's shares, AES-GCM-sealed under a key only j and k can derive (HKDF from their
   long-term pairwise secret, bound to r, i and the direction). The owner relays boxes it
   can neither read nor forge; a member that got a box knows the public key is j's.
2. SHARES (owner -> member): once it has the keys of every member (or of all it will get),
   the owner sends each member of that set U1 the boxes addressed to it.
3. The member's vector y_j = encode(w_ij x_j) + sum over k in U1 \\ {j} of +-PRG(K_jk) +
   PRG(b_j), with K_jk from the ephemeral Diffie-Hellman of j and k.
4. PRESENT (owner -> member): the members U2 whose vectors arrived (U1 \\ U2 dropped out).
   CONFIRM (member -> owner): if U2 lies inside the set it masked with, contains it and has
   at least t members, an HMAC tag on U2 for every other member of U2, under a key only
   the two members can derive. Once per round and owner.
5. UNMASK (owner -> member): the other members' tags for it. REVEAL (member -> owner), only
   with t tags (its own included) on the U2 it confirmed: for each k it masked with, a share
   of b_k if k is in U2, else a share of e_k.
6. The owner rebuilds b_k for the present and e_k for the dropped from any t answers,
   removes the self-masks and the masks between the present and the dropped, and decodes.

Why a majority, and why the tags (Bonawitz's consistency round): an honest member tags one
U2 per round and owner, and reveals only under t tags on it, so with t > n/2 everyone who
reveals anything has the same U2, however the owner splits its stories. For every member
the owner then gets shares of one kind only: b_k for k in U2, e_k for k outside. A present
member v keeps its pairwise masks with the other present members (whose keys nobody
reveals), so the owner reads only the sum over U2. A vector that arrives after its sender
was counted as dropped stays under its self-mask for good. The owner cannot shrink the set
a member masks with below t either (a member refuses SHARES with fewer keys, and a U2
outside it). ``docs/threat-model.md`` has the whole argument; tests search every story for
small groups.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import struct
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from p2pfl.errors import SecureAggregationError
from p2pfl.secure.arithmetic import keystream_sum
from p2pfl.secure.shamir import SHARE_BYTES, combine, split

BOX_SALT = b"p2pfl/v1 share box"
PAIR_MASK_SALT = b"p2pfl/v1 pair mask"
VIEW_SALT = b"p2pfl/v1 view tag"
#: An HMAC-SHA256 tag on a member's view of the key exchange.
TAG_BYTES = 32
PUBLIC_BYTES = 32
_NONCE_BYTES = 12
_BOX_PLAIN = PUBLIC_BYTES + 2 * SHARE_BYTES
#: A sealed box on the wire: nonce, ciphertext, GCM tag.
BOX_BYTES = _NONCE_BYTES + _BOX_PLAIN + 16
#: What a revealed share is of.
KIND_SELF_SEED = 1
KIND_KEY = 2
REVEAL_BYTES = 1 + SHARE_BYTES


def threshold(members: int, fraction: float = 0.5) -> int:
    """Shares needed to rebuild a member's secret: floor(fraction * members) + 1, by default
    a strict majority of the group's members (the owner holds none)."""
    if not 0.5 <= fraction < 1.0:
        raise ValueError(f"threshold fraction must be in [0.5, 1), got {fraction}")
    return min(members, math.floor(fraction * members) + 1)


def _info(round_index: int, *names: str) -> bytes:
    out = struct.pack(">Q", round_index)
    for name in names:
        raw = name.encode("utf-8")
        out += struct.pack(">H", len(raw)) + raw
    return out


def _hkdf(material: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(material)


def box_key(pair_secret: bytes, round_index: int, owner: str, sender: str, recipient: str) -> bytes:
    """The key of the box ``sender`` seals for ``recipient`` in ``owner``'s group: one per
    direction, round and group, from their long-term pairwise secret."""
    if len(pair_secret) != 32:
        raise ValueError("a pairwise secret is 32 bytes")
    return _hkdf(pair_secret, BOX_SALT, _info(round_index, owner, sender, recipient))


def _public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def pair_mask_key(
    own: X25519PrivateKey, their_public: bytes, round_index: int, owner: str, a: str, b: str
) -> bytes:
    """K_ab for ``owner``'s group in this round, from a's and b's ephemeral keys (either end,
    or the owner once it has rebuilt a dropped member's key, can compute it)."""
    try:
        shared = own.exchange(X25519PublicKey.from_public_bytes(their_public))
    except ValueError:  # a low-order point: OpenSSL refuses the all-zero result
        raise SecureAggregationError("an ephemeral public key is a low-order point") from None
    low, high = sorted((a, b))
    return _hkdf(shared, PAIR_MASK_SALT, _info(round_index, owner, low, high))


def view_tag(
    pair_secret: bytes,
    round_index: int,
    owner: str,
    sender: str,
    recipient: str,
    present: Collection[str],
) -> bytes:
    """``sender``'s tag, for ``recipient``, on the owner's present set U2: an HMAC under a
    key only the two can derive, so the owner can relay it but not forge it."""
    key = _hkdf(pair_secret, VIEW_SALT, _info(round_index, owner, sender, recipient))
    return hmac.new(key, _info(round_index, owner, *sorted(present)), hashlib.sha256).digest()


@dataclass(frozen=True)
class BoxContent:
    """What member j tells member k through the owner: j's ephemeral public key and k's
    shares of j's ephemeral key seed and self-mask seed."""

    public: bytes
    key_share: bytes
    seed_share: bytes


class Randomness(Protocol):
    """Where a member's secrets come from. The ``secrets`` module is one (the default and
    the only one outside tests); tests pass a seeded stand-in to make a round exact."""

    def token_bytes(self, nbytes: int) -> bytes: ...

    def randbelow(self, exclusive_upper_bound: int) -> int: ...


def seal_box(key: bytes, content: BoxContent, rng: Randomness = secrets) -> bytes:
    # A random nonce: a restarted node may seal again under one key.
    nonce = rng.token_bytes(_NONCE_BYTES)
    plain = content.public + content.key_share + content.seed_share
    return nonce + AESGCM(key).encrypt(nonce, plain, None)


def open_box(key: bytes, box: bytes) -> BoxContent:
    if len(box) != BOX_BYTES:
        raise SecureAggregationError(f"a share box is {BOX_BYTES} bytes, got {len(box)}")
    try:
        plain = AESGCM(key).decrypt(box[:_NONCE_BYTES], box[_NONCE_BYTES:], None)
    except InvalidTag:
        raise SecureAggregationError("a share box does not open (forged or altered)") from None
    return BoxContent(
        plain[:PUBLIC_BYTES],
        plain[PUBLIC_BYTES : PUBLIC_BYTES + SHARE_BYTES],
        plain[PUBLIC_BYTES + SHARE_BYTES :],
    )


def _sign(a: str, b: str) -> int:
    return 1 if a < b else -1


class MemberRound:
    """A member's side for one (round, owner): its secrets, the shares it holds for the
    other members, and whether it has contributed and answered."""

    def __init__(
        self,
        me: str,
        owner: str,
        members: Collection[str],
        round_index: int,
        pair_secrets: Mapping[str, bytes],
        fraction: float = 0.5,
        rng: Randomness = secrets,
    ) -> None:
        self.me, self.owner, self.round = me, owner, round_index
        self.members = tuple(sorted(members))
        if me not in self.members or owner in self.members:
            raise ValueError("the member must be in the group and the owner outside it")
        self.threshold = threshold(len(self.members), fraction)
        key_seed, self._self_seed = rng.token_bytes(32), rng.token_bytes(32)
        self._private = X25519PrivateKey.from_private_bytes(key_seed)
        self.public = _public_bytes(self._private)
        count = len(self.members)
        key_shares = split(key_seed, count, self.threshold, rng.randbelow)
        seed_shares = split(self._self_seed, count, self.threshold, rng.randbelow)
        self._secrets = pair_secrets
        #: The boxes for the owner to relay, one per other member.
        self.boxes: dict[str, bytes] = {}
        #: Shares we hold, per member (ours included): public key, key share, seed share.
        self._held: dict[str, BoxContent] = {}
        for x, k in enumerate(self.members):
            content = BoxContent(self.public, key_shares[x], seed_shares[x])
            if k == me:
                self._held[k] = content
            else:
                key = box_key(pair_secrets[k], round_index, owner, me, k)
                self.boxes[k] = seal_box(key, content, rng)
        #: U1, the members whose keys the owner relayed to us (None until SHARES).
        self.keyed: frozenset[str] | None = None
        #: Why we will not contribute to this group (None: we may).
        self.failure: str | None = None
        self._accepted: dict[str, bytes] = {}
        self.contributed = False
        #: U2 as the owner told us and we confirmed (None until PRESENT).
        self.present: frozenset[str] | None = None
        self.answered = False

    def accept_shares(self, boxes: Mapping[str, bytes]) -> bool:
        """The owner's SHARES: every box must open. Raises SecureAggregationError if not
        (then nothing is kept, and we do not contribute to this group this round). The same
        SHARES again (resent after a reconnect) is ignored: returns False."""
        if self.keyed is not None and dict(boxes) == self._accepted:
            return False
        if self.keyed is not None or self.failure is not None:
            raise SecureAggregationError("a second SHARES for this round")
        try:
            self._accept(boxes)
        except SecureAggregationError as exc:
            self.failure = str(exc)
            raise
        self._accepted = dict(boxes)
        return True

    def _accept(self, boxes: Mapping[str, bytes]) -> None:
        held: dict[str, BoxContent] = {}
        for sender, box in boxes.items():
            if sender not in self.members or sender == self.me:
                raise SecureAggregationError(f"a box from {sender}, not another group member")
            key = box_key(self._secrets[sender], self.round, self.owner, sender, self.me)
            held[sender] = open_box(key, box)
        keyed = frozenset(held) | {self.me}
        if len(keyed) < self.threshold:
            raise SecureAggregationError(
                f"keys from {len(keyed)} of {len(self.members)} members, {self.threshold} needed"
            )
        self._held.update(held)
        self.keyed = keyed

    def mask(self, size: int, out: np.ndarray | None = None) -> np.ndarray:
        """Our pairwise masks with the other keyed members plus our self-mask (written into
        ``out``, whatever it held, if given)."""
        if self.keyed is None:
            raise SecureAggregationError("no SHARES yet")
        streams = [
            (
                pair_mask_key(
                    self._private, self._held[k].public, self.round, self.owner, self.me, k
                ),
                _sign(self.me, k),
            )
            for k in sorted(self.keyed - {self.me})
        ]
        return keystream_sum(size, [*streams, (self._self_seed, 1)], out)

    def confirm(self, present: Collection[str]) -> dict[str, bytes]:
        """Our answer to PRESENT: tags on the owner's present set U2 for each other member
        of it (CONFIRM). Once per round and owner, after we contributed, and only for a U2
        we can stand behind: inside the set we masked with, with us in it, of at least
        ``threshold`` members. The tags are what makes the owner's U2 the same for all who
        reveal: we reveal only under ``threshold`` tags on the U2 we confirmed."""
        present = frozenset(present)
        if self.keyed is None or not self.contributed:
            raise SecureAggregationError(f"we sent {self.owner} no vector in round {self.round}")
        if self.present is not None:
            raise SecureAggregationError(f"already confirmed a present set for round {self.round}")
        if self.me not in present or not present <= self.keyed:
            raise SecureAggregationError(
                "its present set leaves us out or names members we did not mask with"
            )
        if len(present) < self.threshold:
            raise SecureAggregationError(
                f"only {len(present)} members would be present, {self.threshold} needed"
            )
        self.present = present
        return {
            k: view_tag(self._secrets[k], self.round, self.owner, self.me, k, present)
            for k in sorted(present - {self.me})
        }

    def reveal(self, tags: Mapping[str, bytes]) -> dict[str, tuple[int, bytes]]:
        """Our answer to UNMASK: per member we masked with, a share of its self-mask seed if
        present, of its ephemeral key if not; never both kinds for one member, once, and
        only once ``threshold`` members of U2 (us included) tagged the U2 we confirmed."""
        present = self.present
        if present is None:
            raise SecureAggregationError(f"no present set confirmed for round {self.round}")
        if self.answered:
            raise SecureAggregationError(f"already answered for round {self.round}")
        assert self.keyed is not None
        vouching = 1 + sum(
            1
            for k, tag in tags.items()
            if k in present
            and k != self.me
            and hmac.compare_digest(
                tag, view_tag(self._secrets[k], self.round, self.owner, k, self.me, present)
            )
        )
        if vouching < self.threshold:
            raise SecureAggregationError(
                f"only {vouching} members confirm the present set of {len(present)}, "
                f"{self.threshold} needed"
            )
        self.answered = True
        return {
            k: (KIND_KEY, self._held[k].key_share)
            if k not in present
            else (KIND_SELF_SEED, self._held[k].seed_share)
            for k in sorted(self.keyed)
        }


class OwnerRound:
    """The owner's side for one round: the members' keys and boxes, the keyed set U1, the
    dropped members and the reveals."""

    def __init__(
        self, owner: str, members: Collection[str], round_index: int, fraction: float = 0.5
    ) -> None:
        self.owner, self.round = owner, round_index
        self.members = tuple(sorted(members))
        self.threshold = threshold(len(self.members), fraction)
        self.publics: dict[str, bytes] = {}
        self._boxes: dict[str, Mapping[str, bytes]] = {}
        self.keyed: frozenset[str] | None = None
        #: Why this round cannot be unmasked (set when too few members sent keys).
        self.failure: str | None = None
        self.present: frozenset[str] | None = None
        self.reveals: dict[str, dict[str, tuple[int, bytes]]] = {}
        #: Each member's CONFIRM tags, per recipient.
        self._confirms: dict[str, dict[str, bytes]] = {}

    def add_keys(self, member: str, public: bytes, boxes: Mapping[str, bytes]) -> None:
        if member not in self.members:
            raise SecureAggregationError(f"{member} is not in this round's group")
        if member in self.publics:
            if self.publics[member] == public and self._boxes[member] == dict(boxes):
                return  # the same KEYS again, on a new connection after a reconnect
            raise SecureAggregationError(f"second KEYS from {member}")
        if self.keyed is not None:
            raise SecureAggregationError("KEYS after the shares went out")
        if set(boxes) != set(self.members) - {member}:
            raise SecureAggregationError("KEYS must hold one box for every other member")
        if len(public) != PUBLIC_BYTES or any(len(b) != BOX_BYTES for b in boxes.values()):
            raise SecureAggregationError("malformed KEYS")
        try:  # a low-order point would make every other member's mask fail
            X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(public))
        except ValueError:
            raise SecureAggregationError("an ephemeral public key is a low-order point") from None
        self.publics[member] = public
        self._boxes[member] = dict(boxes)

    def shares_for(self, member: str) -> dict[str, bytes]:
        """The SHARES ``member`` was sent (the boxes of the other keyed members)."""
        if self.keyed is None or member not in self.keyed:
            raise SecureAggregationError(f"{member} got no SHARES")
        return {k: self._boxes[k][member] for k in sorted(self.keyed - {member})}

    def all_keyed(self) -> bool:
        return len(self.publics) == len(self.members)

    def dispatch(self) -> dict[str, dict[str, bytes]]:
        """Fix U1 (those whose keys arrived) and the SHARES for each of them. With fewer
        than ``threshold`` keyed, U1 is empty and each keyed member gets an empty SHARES:
        it learns at once that it will not contribute (instead of waiting for the deadline)."""
        if self.keyed is not None:
            raise SecureAggregationError("shares already sent")
        keyed = frozenset(self.publics)
        if len(keyed) < self.threshold:
            self.keyed = frozenset()
            self.failure = (
                f"keys from {len(keyed)} of {len(self.members)} members, {self.threshold} needed"
            )
            return {m: {} for m in sorted(keyed)}
        self.keyed = keyed
        return {m: self.shares_for(m) for m in sorted(keyed)}

    def add_confirm(self, member: str, tags: Mapping[str, bytes]) -> None:
        if self.present is None or member not in self.present:
            raise SecureAggregationError(f"CONFIRM from {member}, not asked")
        if member in self._confirms:
            raise SecureAggregationError(f"second CONFIRM from {member}")
        if not set(tags) <= self.present - {member}:
            raise SecureAggregationError("CONFIRM with tags for members not present")
        self._confirms[member] = dict(tags)

    def confirmed(self) -> frozenset[str]:
        return frozenset(self._confirms)

    def tags_for(self, member: str) -> dict[str, bytes]:
        """The other members' tags for ``member``, to relay in its UNMASK."""
        return {
            sender: tags[member]
            for sender, tags in sorted(self._confirms.items())
            if member in tags and sender != member
        }

    def unmask_request(self, received: Collection[str]) -> frozenset[str]:
        """Fix U2 from the vectors that arrived; returns the dropped (U1 \\ U2)."""
        if self.keyed is None:
            raise SecureAggregationError("no shares were sent")
        if self.failure is not None:
            raise SecureAggregationError(self.failure)
        present = frozenset(received) & self.keyed
        if len(present) < self.threshold:
            raise SecureAggregationError(
                f"vectors from {len(present)} members, {self.threshold} needed"
            )
        self.present = present
        return self.keyed - present

    def add_reveal(self, member: str, shares: Mapping[str, tuple[int, bytes]]) -> None:
        if self.present is None or self.keyed is None or member not in self._confirms:
            raise SecureAggregationError(f"unrequested reveal from {member}")
        if member in self.reveals:
            raise SecureAggregationError(f"second reveal from {member}")
        if set(shares) != self.keyed:
            raise SecureAggregationError("a reveal must cover every keyed member")
        for k, (kind, share) in shares.items():
            expected = KIND_SELF_SEED if k in self.present else KIND_KEY
            if kind != expected or len(share) != SHARE_BYTES:
                raise SecureAggregationError(f"a reveal with the wrong kind of share for {k}")
        self.reveals[member] = dict(shares)

    def complete(self) -> bool:
        return len(self.reveals) == len(self._confirms)

    def enough(self) -> bool:
        return len(self.reveals) >= self.threshold

    def correction(self) -> list[tuple[bytes, int]]:
        """What to subtract from the sum of the present vectors, as keystreams (key, sign):
        their self-masks and their masks with the dropped, rebuilt from ``threshold``
        reveals (or more: then every extra share is checked against the others)."""
        if self.present is None or self.keyed is None or not self.enough():
            raise SecureAggregationError(f"{len(self.reveals)} reveals, {self.threshold} needed")
        xs = {m: x + 1 for x, m in enumerate(self.members)}
        streams: list[tuple[bytes, int]] = []
        for k in sorted(self.keyed):
            shares = {xs[m]: reveal[k][1] for m, reveal in self.reveals.items()}
            secret = combine(shares, self.threshold)
            if k in self.present:
                streams.append((secret, 1))
                continue
            private = X25519PrivateKey.from_private_bytes(secret)
            if _public_bytes(private) != self.publics[k]:
                raise SecureAggregationError(f"the rebuilt key of {k} does not match its KEYS")
            for u in sorted(self.present):
                key = pair_mask_key(private, self.publics[u], self.round, self.owner, u, k)
                streams.append((key, _sign(u, k)))
        return streams
