"""Remote attestation: measure an enclave, report the measurement signed, verify it, and derive
the session key only then.

*Measurement* = SHA-256 over a domain tag, the digest of the enclave's code identity (source
bytes given explicitly, or the source of modules, classes and functions as :mod:`inspect`
finds it) and the digest of its initial weights (sorted names, dtype, shape, raw bytes).

*Report* (simulated backend), a fixed binary layout of ``REPORT_SIZE`` bytes, little-endian::

    magic 'PXAR' | version u16 | measurement 32 | client nonce 32 | enclave X25519 public 32
    | Ed25519 signature 64 (by the vendor key, over everything before it)

The nonce is fresh and chosen by the client, so an old report is refused; the enclave's
key-exchange public key is signed with it, so a host cannot substitute its own. The client
(:func:`verify_report`) checks the length, the layout, the signature against the pinned vendor
key, the measurement and the nonce, and only then derives the session key: X25519 between a
fresh client key and the enclave's, HKDF-SHA256 with the nonce as salt and the measurement and
both public keys in the info. The enclave derives the same key from the client's public key.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import os
import struct
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from phalanx.errors import PhalanxError
from phalanx.split.envelope import KEY_SIZE, Session
from phalanx.wire.frame import payload_tensor

DIGEST_SIZE = 32
CLIENT_NONCE_SIZE = 32
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
REPORT_MAGIC, REPORT_VERSION = b"PXAR", 1
_BODY = struct.Struct(f"<4sH{DIGEST_SIZE}s{CLIENT_NONCE_SIZE}s{PUBLIC_KEY_SIZE}s")
REPORT_SIZE = _BODY.size + SIGNATURE_SIZE
_MEASUREMENT_TAG = b"phalanx-enclave-measurement-1"
_SESSION_TAG = b"phalanx-enclave-session-1"

CodePart = bytes | types.ModuleType | type | Callable[..., object]


class AttestationError(PhalanxError):
    """An attestation report that must not be trusted; the message names the check that
    failed."""


def _update_framed(h: hashlib._Hash, data: bytes | memoryview) -> None:
    h.update(struct.pack("<Q", len(data)))
    h.update(data)


def code_digest(parts: Sequence[CodePart]) -> bytes:
    """SHA-256 of the enclave's code identity: each part's bytes (a module, class or function
    contributes its source text), length-prefixed, in order."""
    if not parts:
        raise AttestationError("an enclave's code identity needs at least one part")
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, bytes):
            raw = part
        else:
            try:
                raw = inspect.getsource(part).encode()
            except (OSError, TypeError):
                raise AttestationError(f"no source found for {part!r}: pass its bytes "
                                       "explicitly") from None
        _update_framed(h, raw)
    return h.digest()


def weights_digest(state: Mapping[str, torch.Tensor]) -> bytes:
    """SHA-256 of a state dict: by sorted name, the name, dtype, shape and raw bytes (of the
    logical values: a non-contiguous tensor hashes as its contiguous copy)."""
    h = hashlib.sha256()
    h.update(struct.pack("<Q", len(state)))
    for name in sorted(state):
        t = state[name].detach()
        _update_framed(h, name.encode())
        _update_framed(h, str(t.dtype).encode())
        h.update(struct.pack(f"<Q{t.dim()}Q", t.dim(), *t.shape))
        _update_framed(h, payload_tensor(t.cpu()).numpy().data)
    return h.digest()


def measure(code: Sequence[CodePart], state: Mapping[str, torch.Tensor]) -> bytes:
    """The enclave's measurement: SHA-256 over its code identity and its initial weights."""
    return hashlib.sha256(_MEASUREMENT_TAG + code_digest(code) + weights_digest(state)).digest()


def new_nonce() -> bytes:
    """A fresh client nonce for one attestation."""
    return os.urandom(CLIENT_NONCE_SIZE)


def public_bytes(key: x25519.X25519PublicKey | ed25519.Ed25519PublicKey) -> bytes:
    """The raw 32 bytes of a public key."""
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass(frozen=True, kw_only=True)
class Report:
    """The fields of a report: what the vendor's signature vouches for."""

    measurement: bytes
    nonce: bytes
    enclave_public: bytes

    def body(self) -> bytes:
        """The signed part of the report."""
        for name, value, size in (("measurement", self.measurement, DIGEST_SIZE),
                                  ("nonce", self.nonce, CLIENT_NONCE_SIZE),
                                  ("enclave public key", self.enclave_public, PUBLIC_KEY_SIZE)):
            if len(value) != size:
                raise AttestationError(f"the report's {name} must be {size} bytes")
        return _BODY.pack(REPORT_MAGIC, REPORT_VERSION, self.measurement, self.nonce,
                          self.enclave_public)


def sign_report(report: Report, vendor_key: ed25519.Ed25519PrivateKey) -> bytes:
    """The report's bytes, signed by ``vendor_key`` (the simulated vendor's quoting step)."""
    body = report.body()
    return body + vendor_key.sign(body)


def parse_report(data: bytes | bytearray | memoryview,
                 vendor_key: ed25519.Ed25519PublicKey) -> Report:
    """Check a report's length, layout and vendor signature; return its fields."""
    if len(data) != REPORT_SIZE:
        raise AttestationError(f"a report is exactly {REPORT_SIZE} bytes, got {len(data)}")
    raw = bytes(data)
    magic, version, measurement, nonce, enclave_public = _BODY.unpack_from(raw, 0)
    if magic != REPORT_MAGIC:
        raise AttestationError(f"bad magic {magic!r}: not a phalanx attestation report")
    if version != REPORT_VERSION:
        raise AttestationError(f"report version {version} is not supported ({REPORT_VERSION})")
    try:
        vendor_key.verify(raw[_BODY.size:], raw[:_BODY.size])
    except InvalidSignature:
        raise AttestationError("the report's signature does not verify against the pinned "
                               "vendor key") from None
    return Report(measurement=measurement, nonce=nonce, enclave_public=enclave_public)


def derive_session_key(own: x25519.X25519PrivateKey, peer_public: bytes, *, nonce: bytes,
                       measurement: bytes, enclave_public: bytes, client_public: bytes) -> bytes:
    """X25519 + HKDF-SHA256: the key both sides of an attested session derive."""
    if len(peer_public) != PUBLIC_KEY_SIZE:
        raise AttestationError(f"a key-exchange public key must be {PUBLIC_KEY_SIZE} bytes")
    try:
        shared = own.exchange(x25519.X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:  # a low-order point: the shared secret would be all zeros
        raise AttestationError("the peer's key-exchange public key is invalid") from None
    info = _SESSION_TAG + measurement + enclave_public + client_public
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=nonce, info=info).derive(shared)


@dataclass(frozen=True, kw_only=True)
class AttestedEnclave:
    """The client's view of an enclave it has verified: what it attested, the public key to
    send it, and the session to talk to it."""

    measurement: bytes
    enclave_public: bytes
    nonce: bytes
    client_public: bytes  # send this to the enclave (``Enclave.open_session``)
    session: Session = field(repr=False)


def _pinned(key: ed25519.Ed25519PublicKey | bytes) -> ed25519.Ed25519PublicKey:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, bytes) and len(key) == PUBLIC_KEY_SIZE:
        return ed25519.Ed25519PublicKey.from_public_bytes(key)
    raise AttestationError("the pinned vendor key must be an Ed25519 public key or its 32 "
                           "raw bytes")


def verify_report(
    report_bytes: bytes | bytearray | memoryview, *, vendor_key: ed25519.Ed25519PublicKey | bytes,
    expected_measurement: bytes, nonce: bytes,
) -> AttestedEnclave:
    """Verify a report against the pinned vendor key, the expected measurement and the nonce
    just sent; only then derive the session key. Raises :class:`AttestationError`."""
    if len(nonce) != CLIENT_NONCE_SIZE:
        raise AttestationError(f"the client nonce must be {CLIENT_NONCE_SIZE} fresh random bytes")
    if len(expected_measurement) != DIGEST_SIZE:
        raise AttestationError(f"the expected measurement must be {DIGEST_SIZE} bytes")
    report = parse_report(report_bytes, _pinned(vendor_key))
    if not hmac.compare_digest(report.measurement, expected_measurement):
        raise AttestationError(f"the enclave's measurement {report.measurement.hex()[:16]}... "
                               f"is not the expected {expected_measurement.hex()[:16]}...")
    if not hmac.compare_digest(report.nonce, nonce):
        raise AttestationError("the report answers another nonce: a replayed or stale report")
    own = x25519.X25519PrivateKey.generate()
    client_public = public_bytes(own.public_key())
    key = derive_session_key(own, report.enclave_public, nonce=nonce,
                             measurement=report.measurement,
                             enclave_public=report.enclave_public, client_public=client_public)
    return AttestedEnclave(measurement=report.measurement, enclave_public=report.enclave_public,
                           nonce=nonce, client_public=client_public,
                           session=Session(key, role="client"))
