"""Links over TLS 1.3 with mutual authentication pinned to the roster.

A link between two stages is two TLS connections, one per direction, so that no TLS connection
is ever used by two threads at once (OpenSSL's rule): this stage writes on the one it dialled,
from a sender thread, and reads the one it accepted, in a receiver thread. The receiver reads a
header, validates it against the limits before allocating the payload, reads the payload
straight into its buffer and queues the frame; both queues are bounded (a full receive queue
stops reading, so a flooding peer is slowed by TCP, not stored). Confidentiality, integrity and
replay protection within a connection are TLS's (AES-256-GCM or ChaCha20-Poly1305 records,
per-direction keys, implicit sequence numbers); the frames' own sequence numbers catch a frame
replayed or reordered across connections.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import ssl
import threading
import time

import torch
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from phalanx.comm.channel import Channel, ChannelClosed, queue_get
from phalanx.secure.identity import Identity, Roster, fingerprint
from phalanx.wire import DEFAULT_LIMITS, HEADER_SIZE, Frame, FrameError, Kind, Limits
from phalanx.wire.frame import decode_header, decode_payload, encode_header, payload_tensor

log = logging.getLogger(__name__)

BYE_MICRO = 0xFFFFFFFF
QUEUE_FRAMES = 64  # frames a direction holds before the writer or the reader waits
_STOP = object()


def context(identity: Identity, roster: Roster, server: bool) -> ssl.SSLContext:
    """TLS 1.3 only; present our certificate; accept only certificates in the roster."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(identity.cert_path, identity.key_path)
    ctx.check_hostname = False  # the identity is the pinned key, not a host name
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=roster.trusted_pem())
    if server:
        ctx.num_tickets = 0  # the dialling side never reads its connection: send it nothing
    return ctx


def peer_fingerprint(sock: ssl.SSLSocket) -> str | None:
    """The pinned-key fingerprint of the authenticated peer of a TLS connection."""
    der = sock.getpeercert(binary_form=True)
    return fingerprint(x509.load_der_x509_certificate(der)) if der else None


def recv_exactly(sock: ssl.SSLSocket, buf: memoryview) -> None:
    got = 0
    while got < len(buf):
        n = sock.recv_into(buf[got:])
        if n == 0:
            raise ConnectionError("the peer closed the connection")
        got += n


SIGNATURE = 64
UNSIGNED = frozenset({Kind.TIED_GRAD, Kind.TIED_WEIGHT})
"""Kinds that only ever pass between the data owner's own two stages (0 and N-1): nobody needs
proof of what a trusted party sent, and they are the two 113 MB transfers of each step."""


class Signer:
    """Signs what this stage sends; verifies what the peer sends against its pinned key.

    The signature covers the 128-byte header (kind, step, micro-batch, source, destination,
    sequence number, dtype, shape, size, flags) and the payload's SHA-256, so a receiver can
    show the coordinator exactly what the peer sent it (:func:`verify_evidence`)."""

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


class TlsChannel(Channel):
    """A link to ``peer``: ``out`` (dialled by us, we write) and ``inc`` (accepted, we read);
    with a :class:`Signer`, every frame but the tied transfers is signed and verified."""

    def __init__(self, me: int, peer: int, out: ssl.SSLSocket, inc: ssl.SSLSocket,
                 limits: Limits = DEFAULT_LIMITS, signer: Signer | None = None,
                 stages: int | None = None, timeout: float = 300.0) -> None:
        super().__init__(me, peer, limits)
        self._out, self._inc = out, inc
        self.signer = signer
        self.timeout = timeout  # the longest a send may wait for a peer that stops reading
        # the tied transfers pass only between the data owner's two stages
        self.owner_link = stages is None or {me, peer} == {0, stages - 1}
        self._inbox: queue.Queue = queue.Queue(maxsize=QUEUE_FRAMES + 1)
        self._outbox: queue.Queue = queue.Queue(maxsize=QUEUE_FRAMES)
        self._send_error: Exception | None = None
        self._closed = False
        self._receiver = threading.Thread(target=self._receive_loop, daemon=True,
                                          name=f"phalanx-tls-recv-{peer}->{me}")
        self._sender = threading.Thread(target=self._send_loop, daemon=True,
                                        name=f"phalanx-tls-send-{me}->{peer}")
        self._receiver.start()
        self._sender.start()

    # -- sending -------------------------------------------------------------------------
    def _transmit(self, frame: Frame) -> int:
        if self._send_error is not None:
            raise ChannelClosed(f"send to stage {self.peer} failed: {self._send_error}")
        payload = payload_tensor(frame.tensor.detach().to("cpu"))
        try:
            self._outbox.put((encode_header(frame, payload.numel()), payload, frame.kind),
                             timeout=self.timeout)
        except queue.Full:
            raise ChannelClosed(f"stage {self.peer} has not read for {self.timeout:g} s") from None
        return HEADER_SIZE + payload.numel()

    def _send_loop(self) -> None:
        self._out.settimeout(self.timeout)  # a peer that stops reading fails the send
        while True:
            item = self._outbox.get()
            try:
                if item is _STOP:
                    return
                header, payload, kind = item
                if self._send_error is None:
                    data = memoryview(payload.numpy()) if payload.numel() else b""
                    self._out.sendall(header)
                    if payload.numel():
                        self._out.sendall(data)
                    if self.signer is not None and self.signer.signs(kind):
                        self._out.sendall(self.signer.sign(header, data))
            except (OSError, ssl.SSLError) as exc:
                self._send_error = exc
            finally:
                self._outbox.task_done()

    def flush(self) -> None:
        q = self._outbox
        deadline = time.monotonic() + self.timeout
        with q.all_tasks_done:
            while q.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ChannelClosed(f"sends to stage {self.peer} did not finish within "
                                        f"{self.timeout:g} s")
                q.all_tasks_done.wait(left)
        if self._send_error is not None:
            raise ChannelClosed(f"send to stage {self.peer} failed: {self._send_error}")

    # -- receiving -----------------------------------------------------------------------
    def _receive_loop(self) -> None:
        try:
            while True:
                hdr = bytearray(HEADER_SIZE)
                recv_exactly(self._inc, memoryview(hdr))
                header = decode_header(hdr, self.limits)  # before any payload is allocated
                self._check_header(header)
                if header.kind in UNSIGNED and not self.owner_link:
                    raise FrameError(f"a {header.kind.name} frame from stage {self.peer}: tied "
                                     "transfers pass only between stages 0 and N-1")
                payload = torch.empty(header.nbytes, dtype=torch.uint8)
                if header.nbytes:
                    recv_exactly(self._inc, memoryview(payload.numpy()))
                frame = decode_payload(header, payload)
                if self.signer is not None and self.signer.signs(header.kind):
                    sig = bytearray(SIGNATURE)
                    recv_exactly(self._inc, memoryview(sig))
                    frame.digest = self.signer.verify(
                        bytes(hdr), memoryview(payload.numpy()) if header.nbytes else b"",
                        bytes(sig))
                    frame.signature = bytes(sig)
                if frame.kind is Kind.CONTROL and frame.micro == BYE_MICRO:
                    self._inbox.put(ChannelClosed(f"stage {self.peer} closed the link"))
                    return
                self.bytes_received += HEADER_SIZE + header.nbytes
                self._inbox.put(frame)  # blocks while full: the peer is then slowed by TCP
        except FrameError as exc:
            log.warning("stage %d: malformed frame from stage %d (%s): link closed", self.me,
                        self.peer, exc)
            self._inbox.put(exc)
            self._inbox.put(ChannelClosed(f"link from stage {self.peer} closed after a "
                                          "malformed frame"))
        except (OSError, ssl.SSLError, ConnectionError, ValueError) as exc:
            self._inbox.put(ChannelClosed(f"link to stage {self.peer} failed: "
                                          f"{type(exc).__name__}: {exc}"))

    def _receive(self, timeout: float | None) -> Frame:
        item = queue_get(self._inbox, timeout, self.peer)
        if isinstance(item, Exception):
            if isinstance(item, ChannelClosed):
                self._inbox.put(item)  # a closed link stays closed
            raise item
        return item

    def close(self, timeout: float = 30.0) -> None:
        """Say goodbye, wait (bounded) for the peer's goodbye, close both connections."""
        if self._closed:
            return
        self._closed = True
        try:
            self.send(Frame(kind=Kind.CONTROL, step=0, micro=BYE_MICRO, src=self.me,
                            dst=self.peer, tensor=torch.empty(0, dtype=torch.uint8)))
            self.flush()
        except ChannelClosed:
            pass
        self._outbox.put(_STOP)
        self._receiver.join(timeout)
        for s in (self._out, self._inc):
            try:
                s.close()
            except OSError:
                pass

