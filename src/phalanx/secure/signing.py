"""Accountability: every frame a stage sends is signed, so a receiver can prove what it got.

The signature is Ed25519 over the run's session id, the 128-byte header (kind, step,
micro-batch, source, destination, sequence number, dtype, shape, size, flags) and the payload's
SHA-256. A receiver keeps the digest and the signature with the frame; the coordinator checks
an accusation with :func:`verify_evidence` against the accused stage's pinned key.
"""

from __future__ import annotations

import hashlib
import os

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from phalanx.wire import FrameError, Kind

SIGNATURE = 64
UNSIGNED = frozenset({Kind.TIED_GRAD, Kind.TIED_WEIGHT})
"""Kinds that only ever pass between the data owner's own two stages (0 and N-1): nobody needs
proof of what a trusted party sent, and they are the two 113 MB transfers of each step."""


class Signer:
    """Signs what this stage sends; verifies what the peer sends against its pinned key."""

    def __init__(self, key: ed25519.Ed25519PrivateKey, peer_key: ed25519.Ed25519PublicKey,
                 session: bytes = b"", sign_all: bool = False) -> None:
        self.key, self.peer_key = key, peer_key
        self.session = session  # the run's id: a frame signed in another run proves nothing here
        self.sign_all = sign_all  # in the clear, the tied transfers are signed too

    def signs(self, kind: Kind) -> bool:
        return self.sign_all or kind not in UNSIGNED

    def sign(self, header: bytes, payload: memoryview | bytes) -> bytes:
        return self.key.sign(self.session + header + hashlib.sha256(payload).digest())

    def verify(self, header: bytes, payload: memoryview | bytes, signature: bytes) -> bytes:
        digest = hashlib.sha256(payload).digest()
        try:
            self.peer_key.verify(signature, self.session + header + digest)
        except InvalidSignature:
            raise FrameError("the frame's signature does not verify against the peer's "
                             "pinned key") from None
        return digest


def verify_evidence(public_key: ed25519.Ed25519PublicKey, session: bytes, header: bytes,
                    digest: bytes, signature: bytes) -> bool:
    """Whether ``signature`` proves that the holder of ``public_key`` sent, in the run
    ``session``, this header and a payload with this digest (what the coordinator checks of an
    accusation)."""
    try:
        public_key.verify(signature, session + header + digest)
        return True
    except InvalidSignature:
        return False


class LocalKeys:
    """Throwaway identities for the stages of one process (the simulator): its links sign and
    verify as the secure transport's do, and the coordinator checks receipts with them."""

    def __init__(self, num_stages: int) -> None:
        self.session = os.urandom(16)
        self._keys = [ed25519.Ed25519PrivateKey.generate() for _ in range(num_stages)]

    def sealer(self, me: int, peer: int) -> Signer:
        return Signer(self._keys[me], self._keys[peer].public_key(), self.session)

    def public(self, stage: int) -> ed25519.Ed25519PublicKey | None:
        return self._keys[stage].public_key() if 0 <= stage < len(self._keys) else None
