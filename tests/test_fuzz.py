"""Property-based fuzzing (hypothesis) of everything that parses a peer's bytes: the frame
decoder, a TLS link's receive loop, and the rendezvous. Each case: no crash of the honest side,
no allocation above the limit, a clear error. Example counts are bounded for the suite."""

from __future__ import annotations

import socket
import struct
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phalanx.comm import ChannelClosed
from phalanx.secure.link import TlsChannel
from phalanx.secure.tls import read_message
from phalanx.wire import HEADER_SIZE, Frame, FrameError, Kind, Limits, decode, encode

LIMITS = Limits(max_bytes=4096, max_dim=1 << 20)
VALID = encode(Frame(kind=Kind.ACTIVATION, step=3, micro=1, src=0, dst=1,
                     tensor=torch.arange(24, dtype=torch.float32).reshape(2, 3, 4), seq=1))

mutation = st.tuples(st.integers(0, len(VALID) - 1), st.integers(1, 255))


def _decode_or_refuse(data: bytes) -> None:
    try:
        f = decode(data, LIMITS)
    except FrameError:
        return
    assert f.tensor.numel() * f.tensor.element_size() <= LIMITS.max_bytes


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_crash_the_decoder(data):
    _decode_or_refuse(data)


@settings(max_examples=300, deadline=None)
@given(st.lists(mutation, min_size=1, max_size=6), st.integers(0, len(VALID)))
def test_bit_flips_and_truncations_of_a_valid_frame(flips, cut):
    data = bytearray(VALID)
    for pos, x in flips:
        data[pos] ^= x
    _decode_or_refuse(bytes(data[:cut]))
    _decode_or_refuse(bytes(data))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**64 - 1), st.lists(st.integers(0, 2**64 - 1), min_size=0, max_size=8),
       st.integers(0, 255), st.integers(0, 255))
def test_huge_length_and_shape_fields_are_refused_before_allocation(nbytes, dims, kind, dtype):
    """Lie about the payload size and the shape: the decoder must refuse from the header
    alone (a payload of a few bytes follows whatever the header claims)."""
    from phalanx.wire.frame import _FIXED

    values = list(_FIXED.unpack_from(VALID, 0))
    values[2], values[3], values[4], values[-1] = kind, dtype, len(dims), nbytes
    header = (_FIXED.pack(*values) + struct.pack(f"<{len(dims)}Q", *dims)).ljust(HEADER_SIZE,
                                                                                b"\0")
    _decode_or_refuse(header + b"\0" * 16)


def _link() -> tuple[TlsChannel, socket.socket, socket.socket]:
    """A link whose incoming side is a plain socket pair (the receive loop only reads)."""
    inc_ours, inc_theirs = socket.socketpair()
    out_ours, out_theirs = socket.socketpair()
    ch = TlsChannel(1, 0, out_ours, inc_ours, limits=LIMITS)  # type: ignore[arg-type]
    return ch, inc_theirs, out_theirs


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=1, max_size=2000))
def test_a_link_fed_garbage_reports_and_closes_never_crashes(data):
    ch, theirs, _ = _link()
    theirs.sendall(data)
    theirs.close()
    got = []
    while True:
        try:
            got.append(ch.recv(5.0))
        except FrameError:
            continue  # reported; the link closes next
        except ChannelClosed:
            break
    for f in got:  # anything accepted was a well-formed frame within the limits
        assert f.tensor.numel() * f.tensor.element_size() <= LIMITS.max_bytes


def test_a_link_delivers_valid_frames_then_refuses_a_bad_one():
    ch, theirs, _ = _link()
    good = Frame(kind=Kind.GRADIENT, step=0, micro=0, src=0, dst=1, tensor=torch.ones(3), seq=1)
    theirs.sendall(encode(good) + b"\x00" * HEADER_SIZE)
    assert torch.equal(ch.recv(5).tensor, torch.ones(3))
    with pytest.raises(FrameError, match="bad magic"):
        ch.recv(5)
    with pytest.raises(ChannelClosed, match="malformed"):
        ch.recv(5)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_rendezvous_messages_from_random_bytes(data):
    a, b = socket.socketpair()
    a.settimeout(2.0)
    b.sendall(data)
    b.close()
    try:
        msg = read_message(a)  # type: ignore[arg-type]
    except (FrameError, ConnectionError, OSError):
        return
    finally:
        a.close()
    assert isinstance(msg, dict)


def test_rendezvous_message_size_is_checked_before_reading():
    a, b = socket.socketpair()
    b.sendall(struct.pack("<I", 2**31))  # claims 2 GiB and sends nothing more
    with pytest.raises(FrameError, match="at most"):
        read_message(a)  # type: ignore[arg-type]
    a.close()
    b.close()


def test_garbage_at_a_listener_is_logged_and_the_mesh_still_forms(tmp_path, caplog):
    """Random bytes, a plain-TCP client and a half-open connection at the coordinator's port:
    each is refused with a logged reason while the admitted stages still connect."""
    import logging
    import time

    from phalanx.launch.supervisor import free_port
    from phalanx.secure.identity import new_identity, roster_of
    from phalanx.secure.mesh import Mesh

    ids = [new_identity(tmp_path / f"s{i}", f"s{i}") for i in range(2)]
    roster = roster_of([(f"s{i}", x.cert_pem) for i, x in enumerate(ids)])
    port = free_port()
    links = {}

    def run(i: int) -> None:
        links[i] = Mesh(i, ids[i], roster, f"127.0.0.1:{port}", timeout=20).connect()

    with caplog.at_level(logging.WARNING):
        t0 = threading.Thread(target=run, args=(0,), daemon=True)
        t0.start()
        time.sleep(0.3)
        junk = []
        for payload in (b"\x16\x03\x01\x02\x00" + bytes(range(256)) * 2, b"GET / HTTP/1.0\r\n\r\n"):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(payload)
            junk.append(s)
        time.sleep(0.5)
        t1 = threading.Thread(target=run, args=(1,), daemon=True)
        t1.start()
        t0.join(30)
        t1.join(30)
    assert sorted(links) == [0, 1] and 1 in links[0] and 0 in links[1]
    assert caplog.text.count("TLS handshake failed") >= 2
    for s in junk:
        s.close()
    for per in links.values():
        for ch in per.values():
            threading.Thread(target=ch.close, daemon=True).start()


_json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)


@pytest.fixture(scope="module")
def join_roster(tmp_path_factory):
    from phalanx.secure.identity import new_identity, roster_of

    d = tmp_path_factory.mktemp("join")
    ids = [new_identity(d / f"s{i}", f"s{i}") for i in range(3)]
    roster = roster_of([(f"s{i}", x.cert_pem) for i, x in enumerate(ids)])
    roster.path = d / "roster.json"
    secret = roster.new_token(2)
    roster.save()
    return roster, secret, ids


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.fixed_dictionaries({}, optional={"token": _json_value | st.just("ab" * 32),
                                            "stage": _json_value | st.integers(-3, 5),
                                            "cert": _json_value, "proof": _json_value,
                                            "name": _json_value}))
def test_a_join_request_made_of_anything_is_refused_and_spends_nothing(join_roster, msg):
    """What an anonymous caller says to the coordinator's join: whatever the fields and their
    types, a refusal with a reason, the roster and its token untouched, no exception."""
    from phalanx.secure.join import admit
    from phalanx.secure.tls import send_message

    roster, secret, ids = join_roster
    before = {s: m.fingerprint for s, m in roster.members.items()}
    a, b = socket.socketpair()
    admitted = []
    b.settimeout(5)
    t = threading.Thread(target=admit, args=(a, roster, "fuzz", 5.0, admitted.append))
    t.start()
    assert "nonce" in read_message(b, 5)  # type: ignore[arg-type]
    try:
        send_message(b, msg)  # type: ignore[arg-type]
        answer = read_message(b, 5)  # type: ignore[arg-type]
    except (OSError, FrameError):
        answer = {"error": "refused (connection)"}
    t.join(10)
    a.close()
    b.close()
    assert not t.is_alive() and "error" in answer and not admitted
    assert {s: m.fingerprint for s, m in roster.members.items()} == before
    assert not any(tok.used for tok in roster.tokens)
