"""TLS 1.3 with mutual authentication pinned to the roster, and the length-prefixed JSON that
the rendezvous speaks over it.

A connection belongs to the stage whose pinned key authenticated it, never to the stage it
claims. Only the coordinator's listener lets a caller without a certificate finish the
handshake, and then only to present a one-time join token (``secure.join``); everything else
such a caller says is refused. Rendezvous messages are a 4-byte length and a JSON object of at
most 64 KiB, size-checked before reading and read within a deadline; nothing is unpickled.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import time

from cryptography import x509

from phalanx.comm.channel import ChannelTimeout
from phalanx.secure.identity import Identity, fingerprint
from phalanx.wire import FrameError

MAX_MESSAGE = 64 * 1024


def context(identity: Identity | None, trusted_pem: str, server: bool,
            anonymous: bool = False) -> ssl.SSLContext:
    """TLS 1.3 only; present our certificate (none: a joiner, who pins the coordinator's key
    itself); accept only certificates in ``trusted_pem``. ``anonymous`` (the coordinator's
    listener) also lets a caller without a certificate finish the handshake, to join."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # the identity is the pinned key, not a host name
    if identity is not None:
        ctx.load_cert_chain(identity.cert_path, identity.key_path)
    if trusted_pem:
        ctx.verify_mode = ssl.CERT_OPTIONAL if anonymous else ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=trusted_pem)
    else:
        ctx.verify_mode = ssl.CERT_NONE  # a joiner checks the coordinator's fingerprint itself
    if server:
        ctx.num_tickets = 0  # the dialling side never reads its connection: send it nothing
    return ctx


def trust(ctx: ssl.SSLContext, cert_pem: str) -> None:
    """Add a newly admitted certificate to a context's trust anchors (removal is the
    roster's: a key no longer pinned for a stage is refused right after the handshake)."""
    ctx.load_verify_locations(cadata=cert_pem)


def peer_fingerprint(sock: ssl.SSLSocket) -> str | None:
    """The pinned-key fingerprint of the authenticated peer of a TLS connection."""
    der = sock.getpeercert(binary_form=True)
    return fingerprint(x509.load_der_x509_certificate(der)) if der else None


def recv_exactly(sock: socket.socket, buf: memoryview, deadline: float | None = None) -> None:
    """Fill ``buf``; with ``deadline`` (``time.monotonic()``), all of it by then (a peer that
    trickles one byte at a time gets no more time than one that sends nothing)."""
    got = 0
    while got < len(buf):
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the peer did not send in time")
            sock.settimeout(left)
        n = sock.recv_into(buf[got:])
        if n == 0:
            raise ConnectionError("the peer closed the connection")
        got += n


def send_message(sock: socket.socket, msg: dict) -> None:
    data = json.dumps(msg).encode()
    sock.sendall(struct.pack("<I", len(data)) + data)


def read_message(sock: socket.socket, timeout: float | None = None) -> dict:
    """One length-prefixed JSON object, within ``timeout`` seconds (a silent peer is a
    :class:`ChannelTimeout`, not a hang)."""
    old = sock.gettimeout()
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        return _read_message(sock, deadline)
    except TimeoutError:
        raise ChannelTimeout(f"no rendezvous message within {timeout:g} s") from None
    finally:
        sock.settimeout(old)


def _read_message(sock: socket.socket, deadline: float | None) -> dict:
    size = bytearray(4)
    recv_exactly(sock, memoryview(size), deadline)
    (n,) = struct.unpack("<I", size)
    if n > MAX_MESSAGE:
        raise FrameError(f"a rendezvous message of {n} bytes (at most {MAX_MESSAGE})")
    data = bytearray(n)
    recv_exactly(sock, memoryview(data), deadline)
    try:
        msg = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise FrameError("a rendezvous message that is not JSON (or nested too deep)") from None
    if not isinstance(msg, dict):
        raise FrameError("a rendezvous message that is not a JSON object")
    return msg
