"""A client stage's link to the server's enclave, end to end encrypted through the server's host.

The link wraps a pipeline link (simulated, TLS, or torch.distributed) on both sides. First the
attestation handshake, three ``ATTEST`` frames: the client's fresh nonce, the enclave's report
(bound to the nonce and to a key-exchange key made inside), the client's key-exchange key, sent
only once the report verified against the pinned vendor key and the expected measurement. Then
every frame's tensor travels as one AES-GCM message of the session, numbered per direction,
holding the tensor and the frame's kind, step, micro-batch, flags and addresses: the host sees
the header and the ciphertext's length; a frame it changes, relabels, replays, reorders or
drops fails to decrypt (a dropped frame makes every later one fail) and is refused as a
:class:`~phalanx.wire.FrameError` (logged and counted by the receiving stage).

The handshake is driven without blocking (:meth:`SessionLink.advance`), so one thread can drive
every link of a one-process simulation; :func:`open_links` drives a process's links until each
session is open. Nothing but ``ATTEST`` frames may cross a link before its session is open, and
no ``ATTEST`` frame after.
"""

from __future__ import annotations

import logging
import time
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import replace

import torch
from cryptography.hazmat.primitives.asymmetric import ed25519

from phalanx.comm.channel import Channel, ChannelTimeout
from phalanx.comm.wrap import ChannelWrapper
from phalanx.split.attest import (
    CLIENT_NONCE_SIZE,
    PUBLIC_KEY_SIZE,
    REPORT_SIZE,
    AttestationError,
    new_nonce,
    verify_report,
)
from phalanx.split.enclave import Enclave, EnclaveError
from phalanx.split.envelope import SealError, Session
from phalanx.wire import Frame, FrameError, Kind

log = logging.getLogger(__name__)

ATTEST_PARTS = {"nonce": 0, "report": 1, "key": 2}  # the micro field of the ATTEST frames
NONCE, REPORT, CLIENT_KEY = ATTEST_PARTS.values()
OVERHEAD = 1024  # bytes a session message adds to a tensor (prefix, JSON header, nonce, tag)
_FIELDS = ("kind", "step", "micro", "src", "dst", "flags")


def _bytes_frame(part: int, data: bytes) -> Frame:
    return Frame(kind=Kind.ATTEST, step=0, micro=part, src=0, dst=0,
                 tensor=torch.frombuffer(bytearray(data), dtype=torch.uint8))


def _raw(frame: Frame, size: int, what: str) -> bytes:
    """The bytes of an ``ATTEST`` frame that must hold exactly ``size`` of them."""
    t = frame.tensor
    if t.dtype != torch.uint8 or t.dim() != 1 or t.numel() != size:
        raise AttestationError(f"the peer's {what} must be {size} bytes (uint8), got "
                               f"{tuple(t.shape)} {t.dtype}")
    return t.cpu().numpy().tobytes()


class SessionLink(ChannelWrapper):
    """One side of a client-enclave link; subclasses run their side of the handshake."""

    def __init__(self, inner: Channel, device: torch.device | str = "cpu") -> None:
        super().__init__(inner)
        self.device = torch.device(device)
        self.session: Session | None = None
        self.crypto_s = 0.0  # seconds spent encrypting and decrypting frames

    @abstractmethod
    def _handshake(self, frame: Frame) -> None:
        """Take the next ``ATTEST`` frame of the handshake."""

    def advance(self) -> bool:
        """Take whatever handshake frames have arrived, without waiting; ``True`` once the
        session is open. A frame other than the handshake's is a protocol error."""
        while self.session is None:
            frame = self.inner.poll()
            if frame is None:
                return False
            if frame.kind is not Kind.ATTEST:
                raise AttestationError(f"stage {self.peer} sent a {frame.kind.name} frame before "
                                       "the attestation handshake finished")
            self._handshake(frame)
        return True

    def _ready(self) -> Session:
        if self.session is None:
            raise EnclaveError(f"the link to stage {self.peer} has no session yet: open the "
                               "links (open_links) before the pipeline runs")
        return self.session

    def _header(self, frame: Frame) -> torch.Tensor:
        return torch.tensor([int(getattr(frame, f)) for f in _FIELDS], dtype=torch.int64)

    def outgoing(self, frame: Frame) -> Frame | None:
        session = self._ready()
        start = time.perf_counter()
        frame.src, frame.dst = self.me, self.peer  # what the inner channel will stamp
        blob = session.encrypt({"tensor": frame.tensor.detach().contiguous(),
                                "header": self._header(frame)})
        self.crypto_s += time.perf_counter() - start
        return replace(frame, tensor=torch.frombuffer(bytearray(blob), dtype=torch.uint8))

    def _opened(self, frame: Frame) -> Frame:
        """The frame as its sender made it; raises :class:`FrameError` if it does not decrypt
        or its header was changed on the way."""
        if frame.kind is Kind.ATTEST:
            raise FrameError(f"stage {self.peer} sent an attestation frame after the handshake")
        session = self._ready()
        t = frame.tensor
        if t.dtype != torch.uint8 or t.dim() != 1:
            raise FrameError(f"stage {self.peer} sent a {frame.kind.name} frame that is not a "
                             f"session message ({tuple(t.shape)} {t.dtype})")
        start = time.perf_counter()
        try:
            inside = session.decrypt(t.cpu().numpy().tobytes())
        except SealError as exc:
            raise FrameError(f"a {frame.kind.name} frame from stage {self.peer} does not "
                             f"decrypt: {exc}") from None
        finally:
            self.crypto_s += time.perf_counter() - start
        tensor, header = inside.get("tensor"), inside.get("header")
        if set(inside) != {"tensor", "header"} or header is None or tensor is None:
            raise FrameError(f"stage {self.peer}'s session message holds {sorted(inside)}")
        if not torch.equal(header, self._header(frame)):
            raise FrameError(f"the header of a {frame.kind.name} frame from stage {self.peer} "
                             "was changed on the way (kind, step, micro-batch, flags or address)")
        return replace(frame, tensor=tensor.to(self.device))

    def recv(self, timeout: float | None = None) -> Frame:
        return self._opened(self.inner.recv(timeout))

    def poll(self) -> Frame | None:
        frame = self.inner.poll()
        return None if frame is None else self._opened(frame)


class ClientLink(SessionLink):
    """The client's side: sends a fresh nonce at once, and its key only after the report
    verified (:func:`~phalanx.split.attest.verify_report`)."""

    def __init__(self, inner: Channel, *, vendor_key: ed25519.Ed25519PublicKey | bytes,
                 measurement: bytes, device: torch.device | str = "cpu") -> None:
        super().__init__(inner, device)
        self._vendor_key, self.measurement = vendor_key, measurement
        self._nonce = new_nonce()
        self.inner.send(_bytes_frame(NONCE, self._nonce))

    def _handshake(self, frame: Frame) -> None:
        if frame.micro != REPORT:
            raise AttestationError(f"stage {self.peer} answered the nonce with handshake part "
                                   f"{frame.micro}, not an attestation report")
        attested = verify_report(_raw(frame, REPORT_SIZE, "attestation report"),
                                 vendor_key=self._vendor_key,
                                 expected_measurement=self.measurement, nonce=self._nonce)
        self.inner.send(_bytes_frame(CLIENT_KEY, attested.client_public))
        self.session = attested.session
        log.info("stage %d: the server's enclave (stage %d) attested measurement %s...",
                 self.me, self.peer, self.measurement.hex()[:16])


class EnclaveLink(SessionLink):
    """The enclave's side: answers the client's nonce with a report, then opens the session
    with the client's key."""

    def __init__(self, inner: Channel, enclave: Enclave, device: torch.device | str = "cpu"
                 ) -> None:
        super().__init__(inner, device)
        self.enclave = enclave
        self._nonce: bytes | None = None

    def _handshake(self, frame: Frame) -> None:
        expected = NONCE if self._nonce is None else CLIENT_KEY
        if frame.micro != expected:
            raise AttestationError(f"stage {self.peer} sent handshake part {frame.micro} where "
                                   f"part {expected} belongs")
        if self._nonce is None:
            self._nonce = _raw(frame, CLIENT_NONCE_SIZE, "nonce")
            self.inner.send(_bytes_frame(REPORT, self.enclave.attest(self._nonce)))
            return
        self.session = self.enclave.open_session(_raw(frame, PUBLIC_KEY_SIZE, "key"),
                                                 nonce=self._nonce)


def open_links(links: Sequence[SessionLink], timeout: float | None) -> None:
    """Drive every link's handshake until all sessions are open; raises
    :class:`~phalanx.split.attest.AttestationError` on a report that does not verify (no data
    has left the client then) and :class:`ChannelTimeout` after ``timeout`` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = list(links)
    while pending:
        pending = [link for link in pending if not link.advance()]
        if not pending:
            return
        if deadline is not None and time.monotonic() > deadline:
            raise ChannelTimeout(f"no attestation handshake with stage(s) "
                                 f"{sorted({link.peer for link in pending})} within {timeout:g} s")
        time.sleep(0.002)

