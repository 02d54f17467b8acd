"""The Noise IK handshake and the record channel, without sockets."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from noise.connection import Keypair, NoiseConnection

from p2pfl.errors import HandshakeError, LocalProtocolError, RecordError
from p2pfl.proto.channel import Channel
from p2pfl.proto.handshake import PROTOCOL_NAME, IKHandshake

PROLOGUE = b"test-prologue"


def pub(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def priv(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


@pytest.fixture
def keys() -> tuple[X25519PrivateKey, X25519PrivateKey]:
    return X25519PrivateKey.generate(), X25519PrivateKey.generate()


def handshake_pair(
    initiator_key: X25519PrivateKey, responder_key: X25519PrivateKey
) -> tuple[IKHandshake, IKHandshake]:
    i = IKHandshake(
        initiator=True, static=initiator_key, prologue=PROLOGUE, remote_static=pub(responder_key)
    )
    r = IKHandshake(initiator=False, static=responder_key, prologue=PROLOGUE)
    assert r.read_message(i.write_message(b"hello")) == b"hello"
    assert i.read_message(r.write_message(b"reply")) == b"reply"
    return i, r


def test_handshake_authenticates_both_and_agrees_on_keys(keys) -> None:
    a, b = keys
    i, r = handshake_pair(a, b)
    assert r.remote_static == pub(a)
    ki, kr = i.session_keys(), r.session_keys()
    assert ki.send_key == kr.recv_key and ki.recv_key == kr.send_key
    assert ki.send_key != ki.recv_key
    assert ki.handshake_hash == kr.handshake_hash


def test_fresh_session_keys_per_connection(keys) -> None:
    a, b = keys
    first, _ = handshake_pair(a, b)
    second, _ = handshake_pair(a, b)
    assert first.session_keys().send_key != second.session_keys().send_key


def test_interop_initiator_with_noiseprotocol_responder(keys) -> None:
    """Our initiator against an independent Noise implementation."""
    a, b = keys
    theirs = NoiseConnection.from_name(PROTOCOL_NAME)
    theirs.set_as_responder()
    theirs.set_prologue(PROLOGUE)
    theirs.set_keypair_from_private_bytes(Keypair.STATIC, priv(b))
    theirs.start_handshake()
    ours = IKHandshake(initiator=True, static=a, prologue=PROLOGUE, remote_static=pub(b))
    assert theirs.read_message(ours.write_message(b"payload one")) == b"payload one"
    assert ours.read_message(theirs.write_message(b"payload two")) == b"payload two"
    assert theirs.handshake_finished
    channel = Channel(ours.session_keys(), max_plaintext=1 << 20)
    # Our records are Noise transport messages: the other implementation reads them.
    assert theirs.decrypt(channel.seal(b"record 0")) == b"record 0"
    assert channel.open(theirs.encrypt(b"back")) == b"back"
    assert channel.open(theirs.encrypt(b"again")) == b"again"


def test_interop_responder_with_noiseprotocol_initiator(keys) -> None:
    a, b = keys
    theirs = NoiseConnection.from_name(PROTOCOL_NAME)
    theirs.set_as_initiator()
    theirs.set_prologue(PROLOGUE)
    theirs.set_keypair_from_private_bytes(Keypair.STATIC, priv(a))
    theirs.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, pub(b))
    theirs.start_handshake()
    ours = IKHandshake(initiator=False, static=b, prologue=PROLOGUE)
    assert ours.read_message(theirs.write_message(b"x")) == b"x"
    assert ours.remote_static == pub(a)
    assert theirs.read_message(ours.write_message(b"y")) == b"y"
    channel = Channel(ours.session_keys(), max_plaintext=1 << 20)
    assert channel.open(theirs.encrypt(b"from initiator")) == b"from initiator"
    assert theirs.decrypt(channel.seal(b"from responder")) == b"from responder"


def test_wrong_responder_key_fails(keys) -> None:
    a, b = keys
    impostor = X25519PrivateKey.generate()
    i = IKHandshake(initiator=True, static=a, prologue=PROLOGUE, remote_static=pub(b))
    r = IKHandshake(initiator=False, static=impostor, prologue=PROLOGUE)
    with pytest.raises(HandshakeError):
        r.read_message(i.write_message(b""))


def test_prologue_mismatch_fails(keys) -> None:
    a, b = keys
    i = IKHandshake(initiator=True, static=a, prologue=b"one", remote_static=pub(b))
    r = IKHandshake(initiator=False, static=b, prologue=b"two")
    with pytest.raises(HandshakeError):
        r.read_message(i.write_message(b""))


@pytest.mark.parametrize("position", [0, 40, 70, 100])
def test_tampered_first_message_fails(keys, position: int) -> None:
    a, b = keys
    i = IKHandshake(initiator=True, static=a, prologue=PROLOGUE, remote_static=pub(b))
    msg = bytearray(i.write_message(b"some payload"))
    msg[position % len(msg)] ^= 1
    r = IKHandshake(initiator=False, static=b, prologue=PROLOGUE)
    with pytest.raises(HandshakeError):
        r.read_message(bytes(msg))


def test_tampered_second_message_fails(keys) -> None:
    a, b = keys
    i = IKHandshake(initiator=True, static=a, prologue=PROLOGUE, remote_static=pub(b))
    r = IKHandshake(initiator=False, static=b, prologue=PROLOGUE)
    r.read_message(i.write_message(b""))
    msg = bytearray(r.write_message(b"ok"))
    msg[-1] ^= 0x80
    with pytest.raises(HandshakeError):
        i.read_message(bytes(msg))


@pytest.mark.parametrize("junk", [b"", b"x" * 10, b"\x00" * 96, b"y" * 5000])
def test_garbage_first_message_fails(keys, junk: bytes) -> None:
    r = IKHandshake(initiator=False, static=keys[1], prologue=PROLOGUE)
    with pytest.raises(HandshakeError):
        r.read_message(junk)


def test_low_order_ephemeral_rejected(keys) -> None:
    r = IKHandshake(initiator=False, static=keys[1], prologue=PROLOGUE)
    with pytest.raises(HandshakeError):
        r.read_message(b"\x00" * 32 + b"\x01" * 64)


def test_out_of_turn_is_local_error(keys) -> None:
    a, b = keys
    r = IKHandshake(initiator=False, static=b, prologue=PROLOGUE)
    with pytest.raises(LocalProtocolError):
        r.write_message(b"")
    with pytest.raises(LocalProtocolError):
        IKHandshake(initiator=True, static=a, prologue=PROLOGUE)


def channels(keys) -> tuple[Channel, Channel]:
    i, r = handshake_pair(*keys)
    return Channel(i.session_keys(), max_plaintext=1024), Channel(
        r.session_keys(), max_plaintext=1024
    )


def test_records_roundtrip_both_directions(keys) -> None:
    ci, cr = channels(keys)
    for n in range(5):
        assert cr.open(ci.seal(b"to responder %d" % n)) == b"to responder %d" % n
        assert ci.open(cr.seal(b"to initiator %d" % n)) == b"to initiator %d" % n


def test_replayed_record_rejected_and_channel_stays_closed(keys) -> None:
    ci, cr = channels(keys)
    record = ci.seal(b"once")
    assert cr.open(record) == b"once"
    with pytest.raises(RecordError):
        cr.open(record)
    with pytest.raises(RecordError):
        cr.open(ci.seal(b"after the failure"))


def test_reordered_records_rejected(keys) -> None:
    ci, cr = channels(keys)
    first, second = ci.seal(b"1"), ci.seal(b"2")
    with pytest.raises(RecordError):
        cr.open(second)
    del first


def test_tampered_record_rejected(keys) -> None:
    ci, cr = channels(keys)
    record = bytearray(ci.seal(b"parameters"))
    record[3] ^= 4
    with pytest.raises(RecordError):
        cr.open(bytes(record))


def test_reflected_record_rejected(keys) -> None:
    """A record sent back to its sender fails: each direction has its own key."""
    ci, _ = channels(keys)
    with pytest.raises(RecordError):
        ci.open(ci.seal(b"mirror"))


def test_record_limits(keys) -> None:
    ci, cr = channels(keys)
    with pytest.raises(LocalProtocolError):
        ci.seal(b"x" * 1025)
    with pytest.raises(RecordError):
        cr.open(b"x" * 2000)
    _, cr2 = channels(keys)
    with pytest.raises(RecordError):
        cr2.open(b"short")
