"""Frames: the one message type that crosses a stage boundary (typed header + raw tensor bytes)."""

from phalanx.wire.frame import (
    DEFAULT_LIMITS,
    HEADER_SIZE,
    Frame,
    FrameError,
    Header,
    Kind,
    Limits,
    decode,
    decode_header,
    decode_payload,
    encode,
    encode_header,
    payload_tensor,
)

__all__ = [
    "DEFAULT_LIMITS",
    "HEADER_SIZE",
    "Frame",
    "FrameError",
    "Header",
    "Kind",
    "Limits",
    "decode",
    "decode_header",
    "decode_payload",
    "encode",
    "encode_header",
    "payload_tensor",
]
