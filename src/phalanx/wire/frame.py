"""Frame encoding: a fixed, validated header followed by raw little-endian tensor bytes.

Layout (little-endian), padded to ``HEADER_SIZE`` bytes::

    magic 'PHLX' | version u8 | kind u8 | dtype u8 | ndim u8 | flags u8 | step u64 | micro u32
    | src u16 | dst u16 | seq u64 | nbytes u64 | shape: ndim x u64

Decoding checks every field and raises :class:`FrameError` with a message naming the problem.
Nothing is ever unpickled: the payload is interpreted only as a tensor of a whitelisted dtype.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum

import torch

MAGIC = b"PHLX"
VERSION = 2
MAX_NDIM = 8
_FIXED = struct.Struct("<4sBBBBBQIHHQQ")
HEADER_SIZE = 128  # _FIXED.size (41) + MAX_NDIM * 8 (64), padded


if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("phalanx frames assume a little-endian host")


class Kind(IntEnum):
    """What a frame carries."""

    ACTIVATION = 1  # stage i -> i+1, forward
    GRADIENT = 2  # stage i+1 -> i, gradient w.r.t. the activation
    LABELS = 3  # data owner -> last stage, target token ids
    TIED_GRAD = 4  # last stage -> stage 0, gradient of a tied parameter
    NORM = 5  # stage -> stage 0, squared gradient norm of the stage's parameters
    NORM_TOTAL = 6  # stage 0 -> stage, global squared gradient norm
    REPORT = 7  # stage -> stage 0, per-step statistics
    CONTROL = 8  # control messages (barriers, shutdown)
    VERDICT = 9  # coordinator decisions
    TIED_WEIGHT = 10  # stage 0 -> last stage, updated tied weights
    JUMP = 11  # stage i -> i+2, jumping connection: a copy of stage i's output
    JUMP_GRAD = 12  # stage i+1 -> i-1: its replica's gradient w.r.t. stage i's input
    ATTEST = 13  # split: a client stage <-> the server's enclave, the attestation handshake
    SHAPE = 14  # stage 0 -> a middle stage that checks: (batch, seq) of a micro-batch


DTYPE_CODES: dict[int, torch.dtype] = {
    1: torch.float32,
    2: torch.float16,
    3: torch.bfloat16,
    4: torch.float64,
    5: torch.int64,
    6: torch.int32,
    7: torch.uint8,
    8: torch.bool,
}
_CODE_OF = {dt: code for code, dt in DTYPE_CODES.items()}


class FrameError(ValueError):
    """A frame that cannot be trusted: malformed, oversized, or out of sequence."""


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Bounds a receiver enforces before allocating anything: a ceiling for every frame, and
    per kind the most a frame of that kind can hold in this run (an activation's size follows
    from the micro-batch, the sequence length and the hidden size)."""

    max_bytes: int = 1 << 30  # 1 GiB per frame
    max_dim: int = 1 << 31
    per_kind: Mapping[Kind, int] = field(default_factory=dict)

    def max_for(self, kind: Kind) -> int:
        return min(self.max_bytes, self.per_kind.get(kind, self.max_bytes))


DEFAULT_LIMITS = Limits()


@dataclass(kw_only=True)
class Frame:
    """One message: what it is, where it belongs in the schedule, and a tensor."""

    kind: Kind
    step: int
    micro: int
    src: int
    dst: int
    tensor: torch.Tensor
    seq: int = 0
    flags: int = 0  # one byte a wrapper may use as it likes (the defense: the attempt number);
    # as untrusted as the rest of the frame, and never read by the engine
    # Accountability (signed links): SHA-256 of the payload and the sender's Ed25519
    # signature over header + digest, both verified on receipt, and the header as received
    # (what the signature covers); empty where nothing signs.
    digest: bytes = b""
    signature: bytes = b""
    header: bytes = b""


@dataclass(frozen=True, kw_only=True)
class Header:
    """A validated header: everything but the payload."""

    kind: Kind
    dtype: torch.dtype
    step: int
    micro: int
    src: int
    dst: int
    seq: int
    nbytes: int
    shape: tuple[int, ...] = field(default=())
    flags: int = 0


def encode_header(frame: Frame, nbytes: int) -> bytes:
    """The fixed-size header of ``frame`` whose payload has ``nbytes`` bytes."""
    t = frame.tensor
    if t.dtype not in _CODE_OF:
        raise FrameError(f"dtype {t.dtype} cannot be sent; allowed: {sorted(map(str, _CODE_OF))}")
    if t.dim() > MAX_NDIM:
        raise FrameError(f"tensor has {t.dim()} dimensions; at most {MAX_NDIM} can be sent")
    fixed = _FIXED.pack(
        MAGIC, VERSION, int(frame.kind), _CODE_OF[t.dtype], t.dim(), frame.flags,
        frame.step, frame.micro, frame.src, frame.dst, frame.seq, nbytes,
    )
    shape = struct.pack(f"<{t.dim()}Q", *t.shape)
    return (fixed + shape).ljust(HEADER_SIZE, b"\0")


def payload_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of ``tensor``'s bytes (contiguous, same device; no copy if possible)."""
    t = tensor.detach().contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t.view(torch.uint8)


def payload_of(tensor: torch.Tensor) -> bytes:
    """Raw little-endian bytes of ``tensor`` (moved to CPU)."""
    return payload_tensor(tensor.to("cpu")).numpy().tobytes()


def encode(frame: Frame) -> bytes:
    """Header and payload as one byte string."""
    payload = payload_of(frame.tensor)
    return encode_header(frame, len(payload)) + payload


def decode_header(
    data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS
) -> Header:
    """Parse and validate a header; raises :class:`FrameError` on anything wrong."""
    if len(data) < HEADER_SIZE:
        raise FrameError(f"truncated header: {len(data)} bytes, expected {HEADER_SIZE}")
    (magic, version, kind, dtype_code, ndim, flags, step, micro, src, dst, seq,
     nbytes) = _FIXED.unpack_from(data, 0)
    if magic != MAGIC:
        raise FrameError(f"bad magic {bytes(magic)!r}: not a phalanx frame")
    if version != VERSION:
        raise FrameError(f"frame version {version} is not supported (expected {VERSION})")
    try:
        kind_v = Kind(kind)
    except ValueError:
        raise FrameError(f"unknown frame kind {kind}") from None
    if dtype_code not in DTYPE_CODES:
        raise FrameError(f"dtype code {dtype_code} is not in the whitelist")
    if ndim > MAX_NDIM:
        raise FrameError(f"ndim {ndim} exceeds the maximum {MAX_NDIM}")
    shape = struct.unpack_from(f"<{ndim}Q", data, _FIXED.size)
    if any(d > limits.max_dim for d in shape):
        raise FrameError(f"shape {shape} has a dimension above {limits.max_dim}")
    dtype = DTYPE_CODES[dtype_code]
    numel = 1
    for d in shape:
        numel *= d
    expected = numel * dtype.itemsize
    if nbytes != expected:
        raise FrameError(
            f"payload size {nbytes} does not match shape {tuple(shape)} of {dtype} "
            f"({expected} bytes)"
        )
    elements = 1
    for d in shape:
        elements *= max(d, 1)
    if elements > limits.max_for(kind_v):  # an empty tensor of absurd shape is no tensor either
        raise FrameError(f"shape {shape} is beyond the limit for {kind_v.name}")
    if nbytes > limits.max_for(kind_v):
        raise FrameError(f"a {kind_v.name} payload of {nbytes} bytes exceeds the limit of "
                         f"{limits.max_for(kind_v)} bytes for {kind_v.name}")
    return Header(
        kind=kind_v, dtype=dtype, step=step, micro=micro, src=src, dst=dst, seq=seq,
        nbytes=nbytes, shape=tuple(shape), flags=flags,
    )


def decode_payload(
    header: Header, payload: bytes | bytearray | memoryview | torch.Tensor
) -> Frame:
    """Build the frame of a validated header from its payload (bytes or a uint8 tensor)."""
    if isinstance(payload, torch.Tensor):
        if payload.dtype != torch.uint8 or payload.dim() != 1:
            raise FrameError("a payload tensor must be one-dimensional uint8")
        raw = payload
    else:
        raw = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if len(payload) else None
    size = 0 if raw is None else raw.numel()
    if size != header.nbytes:
        raise FrameError(f"truncated payload: {size} bytes, header says {header.nbytes}")
    try:
        if raw is None or header.nbytes == 0:
            tensor = torch.empty(header.shape, dtype=header.dtype)
        else:
            tensor = raw.view(header.dtype).reshape(header.shape)
    except RuntimeError as exc:
        raise FrameError(f"payload does not form a tensor of shape {header.shape}: {exc}"
                         ) from None
    if raw is not None and header.dtype == torch.bool and bool((raw > 1).any()):
        raise FrameError("a bool payload holds bytes other than 0 and 1")
    return Frame(
        kind=header.kind, step=header.step, micro=header.micro, src=header.src, dst=header.dst,
        tensor=tensor, seq=header.seq, flags=header.flags,
    )


def decode(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> Frame:
    """Parse a whole frame (header + payload), validating everything."""
    header = decode_header(data, limits)
    payload = memoryview(data)[HEADER_SIZE:]
    if len(payload) != header.nbytes:
        raise FrameError(
            f"frame length {len(data)} does not match header + payload "
            f"({HEADER_SIZE} + {header.nbytes})"
        )
    return decode_payload(header, payload)
