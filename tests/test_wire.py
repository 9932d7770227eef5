"""Frames: round trips, and every kind of malformed input raises a clear FrameError."""

from __future__ import annotations

import struct

import pytest
import torch

from phalanx.comm import LocalFabric
from phalanx.wire import HEADER_SIZE, Frame, FrameError, Kind, Limits, decode, encode


def _frame(t: torch.Tensor, kind: Kind = Kind.ACTIVATION) -> Frame:
    return Frame(kind=kind, step=7, micro=3, src=1, dst=2, tensor=t, seq=5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                   torch.int64, torch.int32, torch.uint8, torch.bool])
def test_round_trip_every_dtype(dtype):
    t = (torch.randn(2, 3, 4) * 10).to(dtype)
    f = decode(encode(_frame(t)))
    assert f.tensor.dtype == dtype and f.tensor.shape == t.shape
    assert torch.equal(f.tensor, t)
    assert (f.kind, f.step, f.micro, f.src, f.dst, f.seq) == (Kind.ACTIVATION, 7, 3, 1, 2, 5)


@pytest.mark.parametrize("flags", [0, 1, 0x80, 255])
def test_the_flags_byte_round_trips_whatever_its_value(flags):
    f = decode(encode(Frame(kind=Kind.JUMP_GRAD, step=1, micro=0, src=3, dst=1,
                            tensor=torch.ones(1), flags=flags)))
    assert f.flags == flags and f.kind is Kind.JUMP_GRAD


def test_empty_and_scalar_tensors():
    for t in (torch.empty(0, 5), torch.tensor(3.5)):
        f = decode(encode(_frame(t)))
        assert f.tensor.shape == t.shape and torch.equal(f.tensor, t)


def _patch(data: bytes, offset: int, fmt: str, value) -> bytes:  # noqa: ANN001
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


GOOD = encode(_frame(torch.ones(2, 3)))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"PHLX" + b"\0" * 10, "truncated header"),
        (b"XXXX" + GOOD[4:], "bad magic"),
        (_patch(GOOD, 4, "<B", 9), "version"),
        (_patch(GOOD, 5, "<B", 200), "unknown frame kind"),
        (_patch(GOOD, 6, "<B", 99), "whitelist"),
        (_patch(GOOD, 7, "<B", 9), "ndim"),
        (_patch(GOOD, 33, "<Q", 999), "does not match shape"),
        (GOOD[:-4], "does not match header"),
        (GOOD + b"\0\0\0\0", "does not match header"),
    ],
)
def test_malformed_frames_raise(data, message):
    with pytest.raises(FrameError, match=message):
        decode(data)


def test_oversized_frame_refused_before_allocation():
    big = _patch(_patch(GOOD, 41, "<Q", 1 << 20), 33, "<Q", (1 << 20) * 3 * 4)
    with pytest.raises(FrameError, match="beyond the limit|exceeds the limit"):
        decode(big, Limits(max_bytes=1 << 20))


def test_the_runs_own_limits_refuse_one_activation_element_too_many_from_the_header():
    """SmolLM2's real limits for 8 x 128 batches in 4 micro-batches (a 576-wide float32
    hidden state): an activation header of exactly that size passes, one of a single element
    more is refused from the 128 header bytes, before anything is allocated."""
    import struct

    from phalanx.pipeline.limits import run_limits
    from phalanx.wire.frame import decode_header

    limits = run_limits(micro_rows=2, seq_len=128, hidden=576, itemsize=4,
                        tied_bytes=49152 * 576 * 4)

    def header(rows: int, kind: Kind = Kind.ACTIVATION) -> bytes:
        t = torch.empty(0)  # only the header is built: nothing of this size ever exists
        h = bytearray(encode(Frame(kind=kind, step=0, micro=0, src=0, dst=1,
                                   tensor=t.reshape(0, 128, 576), seq=1))[:HEADER_SIZE])
        struct.pack_into("<Q", h, 33, rows * 128 * 576 * 4)  # payload bytes
        struct.pack_into("<Q", h, 41, rows)  # first dimension
        return bytes(h)

    assert decode_header(header(2), limits).nbytes == 2 * 128 * 576 * 4
    with pytest.raises(FrameError, match="limit"):
        decode_header(header(3), limits)
    with pytest.raises(FrameError, match="limit"):  # a hidden state sized as a tied matrix
        decode_header(header(49152 * 576 // (128 * 576)), limits)
    assert decode_header(header(2, Kind.GRADIENT), limits).nbytes == 2 * 128 * 576 * 4


def test_bool_payload_must_be_0_or_1():
    data = bytearray(encode(_frame(torch.tensor([True, False]))))
    data[HEADER_SIZE] = 7
    with pytest.raises(FrameError, match="bool payload"):
        decode(bytes(data))


UNPICKLED: list[int] = []


def _mark() -> None:
    UNPICKLED.append(1)


class _Payload:
    def __reduce__(self):  # noqa: ANN204 - what an attacker's pickle would do when loaded
        return (_mark, ())


def test_pickle_is_never_an_option():
    """A pickle long enough to be read as a whole frame (not refused as a short header), whose
    loading would run code: refused as not a frame, and never loaded."""
    import pickle

    data = pickle.dumps([_Payload(), "x" * 400])
    assert len(data) > HEADER_SIZE
    with pytest.raises(FrameError, match="bad magic"):
        decode(data)
    assert not UNPICKLED


def test_channel_refuses_replayed_and_misaddressed_frames():
    fabric = LocalFabric(3)
    a, b = fabric.channel(0, 1), fabric.channel(1, 0)
    a.send(Frame(kind=Kind.CONTROL, step=0, micro=0, src=0, dst=1, tensor=torch.ones(1)))
    first = b.recv(timeout=1)
    assert first.seq == 1
    replay = encode(first)
    b.inject(replay)  # the network replays frame 1
    with pytest.raises(FrameError, match="sequence number"):
        b.recv(timeout=1)
    forged = Frame(kind=Kind.CONTROL, step=0, micro=0, src=2, dst=1, tensor=torch.ones(1), seq=2)
    b.inject(encode(forged))  # stage 2 pretends to be on the 0->1 link
    with pytest.raises(FrameError, match="arrived on link"):
        b.recv(timeout=1)


def test_recv_times_out_with_a_bound():
    from phalanx.comm import ChannelTimeout

    ch = LocalFabric(2).channel(0, 1)
    with pytest.raises(ChannelTimeout):
        ch.recv(timeout=0.05)
    assert ch.poll() is None


def test_the_runs_own_limits_refuse_an_oversized_frame_of_each_kind_from_the_header():
    """Limits derived from the run (micro-batch x sequence x hidden): a peer cannot make a
    stage allocate more than the largest legitimate frame of that kind, whatever the 1 GiB
    ceiling says."""
    from phalanx.config import load_config
    from phalanx.train import Config
    from phalanx.train.setup import build_pipeline

    cfg = load_config(Config, None, ['model.name="tiny"', "pipeline.stages=3",
                                     "pipeline.micro_batches=2", "train.batch_size=4",
                                     "data.seq_len=32"])
    pipe = build_pipeline(cfg, 1)
    limits = pipe.runtime.workers[1].channels[0].limits
    assert limits.max_for(Kind.ACTIVATION) == 2 * 32 * 64 * 4  # (B/M) x T x C x float32
    assert limits.max_for(Kind.LABELS) == 2 * 32 * 8
    assert limits.max_for(Kind.TIED_WEIGHT) == 257 * 64 * 4
    assert limits.max_for(Kind.NORM) == 64 * 1024
    ok = encode(Frame(kind=Kind.ACTIVATION, step=0, micro=0, src=0, dst=1,
                      tensor=torch.zeros(2, 32, 64), seq=1))
    assert decode(ok, limits).tensor.shape == (2, 32, 64)
    for kind, t in [(Kind.ACTIVATION, torch.zeros(2, 33, 64)),
                    (Kind.ACTIVATION, torch.zeros(2, 32, 64, dtype=torch.float64)),
                    (Kind.NORM, torch.zeros(10_000, dtype=torch.float64)),
                    (Kind.TIED_WEIGHT, torch.zeros(257 * 64 + 1))]:
        header = encode(Frame(kind=kind, step=0, micro=0, src=0, dst=1, tensor=t,
                              seq=1))[:HEADER_SIZE]
        with pytest.raises(FrameError, match=f"exceeds the limit of .* for {kind.name}"):
            decode(header, limits)  # refused from the header: no payload was needed
