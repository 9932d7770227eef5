"""What crosses an enclave's boundary: tensor dicts as bytes, inside AEAD envelopes.

A tensor dict is packed as a small self-describing layout (little-endian)::

    magic 'PXTD' | version u8 | header_len u32 | header: UTF-8 JSON | raw tensor bytes

The JSON header is ``{"tensors": [{"name": str, "dtype": str, "shape": [int, ...]}, ...]}``;
the raw bytes of the tensors follow in that order, with no gaps. Unpacking validates everything
before it allocates anything (dtype whitelist, dimension and size bounds, unique names, total
length equal to the declared one) and raises :class:`SealError`; nothing is ever unpickled.

Two envelopes carry packed dicts, both AES-256-GCM from ``cryptography`` with a random 96-bit
nonce (``nonce | ciphertext | tag``):

- *sealed storage* (:func:`seal_tensors`): the associated data binds the blob to the enclave's
  measurement and a label, so it opens only under the same sealing key, measurement and label;
- *the session* (:class:`Session`): client and enclave, each message numbered per direction in
  the associated data, so a replayed, reordered or reflected message does not authenticate.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from phalanx.errors import PhalanxError
from phalanx.wire.frame import DTYPE_CODES, MAX_NDIM, payload_of

PACK_MAGIC, PACK_VERSION = b"PXTD", 1
_PREFIX = struct.Struct("<4sBI")
SEAL_MAGIC, SEAL_VERSION = b"PXSL", 1
_SEAL_PREFIX = struct.Struct("<4sB")
KEY_SIZE, NONCE_SIZE, TAG_SIZE = 32, 12, 16
MAX_LABEL = 256  # bytes of UTF-8
DTYPES: dict[str, torch.dtype] = {str(dt).removeprefix("torch."): dt for dt in DTYPE_CODES.values()}
_NAME_OF = {dt: name for name, dt in DTYPES.items()}
_ENTRY_KEYS = {"name", "dtype", "shape"}


class SealError(PhalanxError):
    """A sealed blob or session message that cannot be trusted: tampered, truncated, replayed,
    sealed under another key, measurement or label, or malformed inside."""


@dataclass(frozen=True, kw_only=True)
class PackLimits:
    """Bounds enforced on a packed tensor dict before anything is allocated."""

    max_bytes: int = 1 << 30  # raw tensor bytes in one dict
    max_tensors: int = 4096
    max_header: int = 1 << 20  # bytes of JSON
    max_name: int = 512  # characters of one tensor name
    max_dim: int = 1 << 31


DEFAULT_PACK_LIMITS = PackLimits()


def pack_tensors(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Pack ``tensors`` (any device; copied to CPU) into the layout above, in their order."""
    entries, payloads = [], []
    for name, t in tensors.items():
        if not isinstance(name, str) or not name:
            raise SealError(f"tensor names must be non-empty strings, got {name!r}")
        if t.dtype not in _NAME_OF:
            raise SealError(f"tensor {name!r} has dtype {t.dtype}; allowed: {sorted(DTYPES)}")
        if t.dim() > MAX_NDIM:
            raise SealError(f"tensor {name!r} has {t.dim()} dimensions; at most {MAX_NDIM}")
        entries.append({"name": name, "dtype": _NAME_OF[t.dtype], "shape": list(t.shape)})
        payloads.append(payload_of(t))
    header = json.dumps({"tensors": entries}, separators=(",", ":")).encode()
    return b"".join([_PREFIX.pack(PACK_MAGIC, PACK_VERSION, len(header)), header, *payloads])


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise SealError(f"the tensor header repeats a key among {keys}")
    return dict(pairs)


def _entry(raw: object, limits: PackLimits) -> tuple[str, torch.dtype, tuple[int, ...], int]:
    """One validated header entry: name, dtype, shape and its size in bytes."""
    if not isinstance(raw, dict) or set(raw) != _ENTRY_KEYS:
        raise SealError(f"a tensor entry must be an object with exactly {sorted(_ENTRY_KEYS)}")
    name, dtype_name, shape = raw["name"], raw["dtype"], raw["shape"]
    if not isinstance(name, str) or not 0 < len(name) <= limits.max_name:
        raise SealError(f"a tensor name must be a string of 1 to {limits.max_name} characters")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise SealError(f"tensor {name!r}: dtype {dtype_name!r} is not in {sorted(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise SealError(f"tensor {name!r}: the shape must be a list of at most {MAX_NDIM} ints")
    if not all(type(d) is int and 0 <= d <= limits.max_dim for d in shape):
        raise SealError(f"tensor {name!r}: shape {shape} needs ints in [0, {limits.max_dim}]")
    dtype = DTYPES[dtype_name]
    numel = span = 1
    for d in shape:
        numel *= d
        span *= max(d, 1)  # an empty tensor of absurd shape is refused too
    if span * dtype.itemsize > limits.max_bytes:
        raise SealError(f"tensor {name!r}: shape {shape} exceeds {limits.max_bytes} bytes")
    return name, dtype, tuple(shape), numel * dtype.itemsize


def unpack_tensors(
    data: bytes | bytearray | memoryview, limits: PackLimits = DEFAULT_PACK_LIMITS
) -> dict[str, torch.Tensor]:
    """Parse a packed tensor dict, validating every field first; raises :class:`SealError`."""
    view = memoryview(data)
    if len(view) < _PREFIX.size:
        raise SealError(f"a tensor dict of {len(view)} bytes is shorter than its prefix")
    magic, version, header_len = _PREFIX.unpack_from(view, 0)
    if magic != PACK_MAGIC:
        raise SealError(f"bad magic {bytes(magic)!r}: not a packed tensor dict")
    if version != PACK_VERSION:
        raise SealError(f"tensor dict version {version} is not supported ({PACK_VERSION})")
    if header_len > min(limits.max_header, len(view) - _PREFIX.size):
        raise SealError(f"a header of {header_len} bytes exceeds the limit or the data")
    start = _PREFIX.size + header_len
    try:
        header = json.loads(bytes(view[_PREFIX.size:start]).decode(),
                            object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise SealError("the tensor header is not valid UTF-8 JSON") from None
    if not isinstance(header, dict) or set(header) != {"tensors"}:
        raise SealError("the tensor header must be an object with exactly the key 'tensors'")
    raw_entries = header["tensors"]
    if not isinstance(raw_entries, list) or len(raw_entries) > limits.max_tensors:
        raise SealError(f"'tensors' must be a list of at most {limits.max_tensors} entries")
    entries, total = [], 0
    for raw in raw_entries:
        entry = _entry(raw, limits)
        total += entry[3]
        if total > limits.max_bytes:
            raise SealError(f"the tensors declare more than {limits.max_bytes} bytes in all")
        entries.append(entry)
    if len({e[0] for e in entries}) != len(entries):
        raise SealError("the tensor header names a tensor twice")
    if total != len(view) - start:
        raise SealError(f"the tensors declare {total} bytes but {len(view) - start} follow")
    out, offset = {}, start
    for name, dtype, shape, nbytes in entries:
        if nbytes == 0:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        raw_t = torch.frombuffer(bytearray(view[offset:offset + nbytes]), dtype=torch.uint8)
        offset += nbytes
        if dtype == torch.bool:
            if bool((raw_t > 1).any()):
                raise SealError(f"bool tensor {name!r} holds bytes other than 0 and 1")
            out[name] = raw_t.to(torch.bool).reshape(shape)
        else:
            out[name] = raw_t.view(dtype).reshape(shape)
    return out


def _aead(key: bytes) -> AESGCM:
    if len(key) != KEY_SIZE:  # AESGCM would quietly take a 16-byte key as AES-128
        raise SealError(f"an envelope key must be {KEY_SIZE} bytes (AES-256-GCM)")
    return AESGCM(key)


def _encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_SIZE)
    return nonce + _aead(key).encrypt(nonce, plaintext, aad)


def _decrypt(key: bytes, blob: memoryview, aad: bytes, what: str, limits: PackLimits) -> bytes:
    """Open ``nonce | ciphertext | tag``, refusing sizes no packed dict within ``limits`` has."""
    if len(blob) < NONCE_SIZE + TAG_SIZE + _PREFIX.size:
        raise SealError(f"{what} of {len(blob)} bytes is truncated")
    if len(blob) > NONCE_SIZE + TAG_SIZE + _PREFIX.size + limits.max_header + limits.max_bytes:
        raise SealError(f"{what} of {len(blob)} bytes exceeds the limits")
    try:
        return _aead(key).decrypt(bytes(blob[:NONCE_SIZE]), bytes(blob[NONCE_SIZE:]), aad)
    except InvalidTag:
        raise SealError(f"{what} does not authenticate: {_WHY[what]}") from None


_WHY = {
    "a sealed blob": "tampered, truncated, or sealed by another enclave build, platform or "
                     "label",
    "a session message": "tampered, truncated, replayed, out of order, or from another session",
}


def _seal_aad(measurement: bytes, label: str) -> bytes:
    raw = label.encode()
    if not 0 < len(raw) <= MAX_LABEL:
        raise SealError(f"a sealing label must be 1 to {MAX_LABEL} bytes of UTF-8")
    return _SEAL_PREFIX.pack(SEAL_MAGIC, SEAL_VERSION) + measurement + raw


def seal_tensors(
    tensors: Mapping[str, torch.Tensor], *, key: bytes, measurement: bytes, label: str
) -> bytes:
    """``magic | version | nonce | AES-256-GCM(packed tensors)``, bound to measurement + label."""
    prefix = _SEAL_PREFIX.pack(SEAL_MAGIC, SEAL_VERSION)
    return prefix + _encrypt(key, pack_tensors(tensors), _seal_aad(measurement, label))


def unseal_tensors(
    blob: bytes | bytearray | memoryview, *, key: bytes, measurement: bytes, label: str,
    limits: PackLimits = DEFAULT_PACK_LIMITS,
) -> dict[str, torch.Tensor]:
    """Open a blob of :func:`seal_tensors`; raises :class:`SealError` on anything wrong."""
    view = memoryview(blob)
    if len(view) < _SEAL_PREFIX.size:
        raise SealError(f"a sealed blob of {len(view)} bytes is truncated")
    magic, version = _SEAL_PREFIX.unpack_from(view, 0)
    if magic != SEAL_MAGIC or version != SEAL_VERSION:
        raise SealError(f"not a version-{SEAL_VERSION} sealed blob (magic {bytes(magic)!r}, "
                        f"version {version})")
    aad = _seal_aad(measurement, label)
    plain = _decrypt(key, view[_SEAL_PREFIX.size:], aad, "a sealed blob", limits)
    return unpack_tensors(plain, limits)


class Session:
    """One side of the AEAD session between a client and an attested enclave: tensor dicts,
    each message numbered per direction in the associated data."""

    _DIRECTIONS = {"client": (b"c>e", b"e>c"), "enclave": (b"e>c", b"c>e")}

    def __init__(self, key: bytes, *, role: Literal["client", "enclave"],
                 limits: PackLimits = DEFAULT_PACK_LIMITS) -> None:
        self._key, self._limits = key, limits
        self._out, self._in = self._DIRECTIONS[role]
        self.sent = self.received = 0

    def __repr__(self) -> str:  # never print key material
        return f"Session(sent={self.sent}, received={self.received})"

    def _aad(self, direction: bytes, seq: int) -> bytes:
        return b"phalanx-session-1|" + direction + struct.pack("<Q", seq)

    def encrypt(self, tensors: Mapping[str, torch.Tensor]) -> bytes:
        """The next message to the other side."""
        blob = _encrypt(self._key, pack_tensors(tensors), self._aad(self._out, self.sent))
        self.sent += 1
        return blob

    def decrypt(self, blob: bytes | bytearray | memoryview) -> dict[str, torch.Tensor]:
        """The next message from the other side; only the expected one authenticates."""
        aad = self._aad(self._in, self.received)
        plain = _decrypt(self._key, memoryview(blob), aad, "a session message", self._limits)
        self.received += 1
        return unpack_tensors(plain, self._limits)
