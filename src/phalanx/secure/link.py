"""A link between two stages over TLS: two connections, bounded queues, signed frames, and
resumption when a connection breaks.

The link is two TLS connections, one per direction, so that no TLS connection is ever used by
two threads at once (OpenSSL's rule): a sender thread writes the one this stage dialled, a
receiver thread reads the one it accepted. The receiver reads a header, validates it against
the limits before allocating the payload, reads the payload straight into its buffer, checks
the signature and queues the frame; both queues are bounded (a full receive queue stops
reading, so a flooding peer is slowed by TCP, not stored). Confidentiality, integrity and
replay protection within a connection are TLS's; the frames' own sequence numbers catch a frame
replayed or reordered across connections.

Membership may change while a job runs, so a broken connection is not the end of a link:

- Each sender sends a heartbeat when it has had nothing to send for a second; it carries the
  cumulative acknowledgement of what this side has received (``ACK_MICRO``, never delivered).
- A sender keeps what it sent until the peer acknowledges it (bounded in bytes).
- When either connection breaks (an error, an end of stream, or silence past ``SILENT_S``),
  both sides redial their own direction through the mesh (authenticated as at the start); the
  accepting side answers with the next sequence number it expects, and the sender resends from
  there. Nothing is lost or delivered twice.
- A peer that does not come back within ``reconnect_s`` is dropped: the link reports
  :class:`ChannelClosed` naming it, and the mesh frees its place for a replacement.
"""

from __future__ import annotations

import collections
import json
import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable

import torch

from phalanx.comm.channel import Channel, ChannelClosed, ChannelError, queue_get
from phalanx.errors import PhalanxError
from phalanx.secure.signing import SIGNATURE, UNSIGNED, Signer
from phalanx.secure.tls import read_message, recv_exactly, send_message
from phalanx.wire import DEFAULT_LIMITS, HEADER_SIZE, Frame, FrameError, Kind, Limits
from phalanx.wire.frame import decode_header, decode_payload, encode_header, payload_tensor

log = logging.getLogger(__name__)

BYE_MICRO = 0xFFFFFFFF  # a CONTROL frame with this micro-batch ends the link
ACK_MICRO = 0xFFFFFFFE  # a heartbeat carrying the acknowledged sequence number as its step
NOTICE_MICRO = 0xFFFFFFFD  # the coordinator's membership notice (JSON), taken by the link
QUEUE_FRAMES = 64  # frames a direction holds before the writer or the reader waits
HEARTBEAT_S = 1.0
SILENT_S = 15.0  # a resumable connection silent this long (not even a heartbeat) is broken
ACK_FRAMES, ACK_BYTES = 16, 16 << 20  # acknowledge after this much, or with the heartbeat
RESEND_BYTES = 1 << 30  # what a sender holds for resending, at most
MAX_MALFORMED = 3  # malformed frames a link survives (each redialled); then it is closed
_STOP, _ACK = object(), object()
_EMPTY = torch.empty(0, dtype=torch.uint8)  # heartbeats make no tensors (threads at exit)

Redial = Callable[[float], socket.socket]
"""Dials the peer again, authenticated, before the deadline (``time.monotonic()``) or raises."""


class _Sent:
    __slots__ = ("seq", "header", "payload", "signature")

    def __init__(self, seq: int, header: bytes, payload: torch.Tensor, signature: bytes) -> None:
        self.seq, self.header, self.payload, self.signature = seq, header, payload, signature

    @property
    def size(self) -> int:
        return len(self.header) + self.payload.numel() + len(self.signature)


class TlsChannel(Channel):
    """A link to ``peer``: ``out`` (dialled by us, we write) and ``inc`` (accepted, we read);
    with a :class:`Signer`, every frame but the tied transfers is signed and verified. With
    ``redial`` and ``reconnect_s > 0`` a broken connection is resumed (module docstring)."""

    def __init__(self, me: int, peer: int, out: socket.socket, inc: socket.socket,
                 limits: Limits = DEFAULT_LIMITS, signer: Signer | None = None,
                 stages: int | None = None, timeout: float = 300.0, *,
                 redial: Redial | None = None, reconnect_s: float = 0.0,
                 on_lost: Callable[[int], None] | None = None,
                 on_notice: Callable[[dict], None] | None = None) -> None:
        super().__init__(me, peer, limits)
        self._out, self._inc = out, inc
        self.signer = signer
        self.timeout = timeout  # the longest a send may wait for a peer that stops reading
        self._redial, self.reconnect_s = redial, reconnect_s
        self.resumable = redial is not None and reconnect_s > 0
        self._on_lost = on_lost
        self._on_notice = on_notice  # membership notices (only on the link from stage 0)
        # the tied transfers pass only between the data owner's two stages
        self.owner_link = stages is None or {me, peer} == {0, stages - 1}
        self._inbox: queue.Queue = queue.Queue(maxsize=QUEUE_FRAMES + 1)
        self._outbox: queue.Queue = queue.Queue(maxsize=QUEUE_FRAMES)
        self._resumes: queue.Queue = queue.Queue(maxsize=4)  # new incoming connections
        self._send_error: Exception | None = None
        self._closed = False
        self._peer_gone = False
        self._stopping = False
        self._malformed = 0
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._unacked: collections.deque[_Sent] = collections.deque()
        self._unacked_bytes = 0
        self._floor = 1  # the oldest sequence number still held for resending
        self._sent = 0  # the last sequence number written
        self._peer_acked = 0  # what the peer says it has received
        self._got = 0  # the last sequence number received and queued
        self._unacked_in = (0, 0)  # frames, bytes received since our last acknowledgement
        self.resumed = 0  # connections re-established (both directions)
        self.lost = False
        self._receiver = threading.Thread(target=self._receive_loop, daemon=True,
                                          name=f"phalanx-tls-recv-{peer}->{me}")
        self._sender = threading.Thread(target=self._send_loop, daemon=True,
                                        name=f"phalanx-tls-send-{me}->{peer}")
        self._receiver.start()
        self._sender.start()

    # -- sending -------------------------------------------------------------------------
    def send(self, frame: Frame) -> None:
        """As :meth:`Channel.send`; the stage and the mesh (notices) may both send on a link,
        so numbering and queueing happen as one step, in order."""
        with self._send_lock:
            super().send(frame)

    def _transmit(self, frame: Frame) -> int:
        if self._send_error is not None:
            raise ChannelClosed(f"send to stage {self.peer} failed: {self._send_error}")
        payload = payload_tensor(frame.tensor.detach().to("cpu"))
        try:
            self._outbox.put((frame.seq, encode_header(frame, payload.numel()), payload,
                              frame.kind), timeout=self.timeout)
        except queue.Full:
            raise ChannelClosed(f"stage {self.peer} has not read for {self.timeout:g} s") from None
        return HEADER_SIZE + payload.numel()

    def notice(self, msg: dict) -> None:
        """Send a membership notice (the coordinator's): in the frame sequence, so it is held,
        resent after a break and never accepted twice; the receiver's link takes it."""
        data = torch.frombuffer(bytearray(json.dumps(msg).encode()), dtype=torch.uint8)
        self.send(Frame(kind=Kind.CONTROL, step=0, micro=NOTICE_MICRO, src=self.me,
                        dst=self.peer, tensor=data))

    def _check(self, frame: Frame) -> None:
        """Addresses only: the receiver thread already checked the order of every frame
        (including those the stage never sees: notices)."""
        self._check_header(frame)

    def _record(self, seq: int, header: bytes, payload: torch.Tensor, kind: Kind) -> _Sent:
        sig = b""
        if self.signer is not None and self.signer.signs(kind):
            sig = self.signer.sign(header, _view(payload))
        return _Sent(seq, header, payload, sig)

    def _ack_record(self) -> _Sent:
        with self._lock:
            got, self._unacked_in = self._got, (0, 0)
        frame = Frame(kind=Kind.CONTROL, step=got, micro=ACK_MICRO, src=self.me, dst=self.peer,
                      tensor=_EMPTY)
        return self._record(0, encode_header(frame, 0), _EMPTY, Kind.CONTROL)

    def _send_loop(self) -> None:
        self._out.settimeout(self.timeout)  # a peer that stops reading fails the send
        while True:
            queued = True
            try:
                item = self._outbox.get(timeout=HEARTBEAT_S)
            except queue.Empty:
                item, queued = _ACK, False  # idle: a heartbeat
            try:
                if item is _STOP or self._stopping:
                    return
                if self._send_error is not None:
                    continue
                if item is _ACK:
                    rec = self._ack_record()
                else:
                    rec = self._record(*item)
                    self._hold(rec)
                self._write_or_resume(rec)
            finally:
                if queued:
                    self._outbox.task_done()

    def _hold(self, rec: _Sent) -> None:
        with self._lock:
            self._trim()
            self._unacked.append(rec)
            self._unacked_bytes += rec.size
            while self._unacked_bytes > RESEND_BYTES and len(self._unacked) > 1:
                old = self._unacked.popleft()
                self._unacked_bytes -= old.size
                self._floor = old.seq + 1

    def _trim(self) -> None:
        while self._unacked and self._unacked[0].seq <= self._peer_acked:
            self._unacked_bytes -= self._unacked.popleft().size
        self._floor = max(self._floor, self._peer_acked + 1)

    def _write(self, rec: _Sent) -> None:
        self._out.sendall(rec.header)
        if rec.payload.numel():
            self._out.sendall(_view(rec.payload))
        if rec.signature:
            self._out.sendall(rec.signature)
        self._sent = max(self._sent, rec.seq)

    def _write_or_resume(self, rec: _Sent) -> None:
        try:
            self._write(rec)
            return
        except (OSError, ssl.SSLError) as exc:
            if not self._may_resume():
                self._send_error = exc
                return
            why = exc
        try:
            self._resume_out(why)  # resends ``rec`` too if it is not acknowledged
        except ChannelError as exc:
            self._send_error = exc
            self._drop(str(exc))

    def _resume_out(self, why: BaseException) -> None:
        log.warning("stage %d: the connection to stage %d broke (%s); redialling for up to "
                    "%g s", self.me, self.peer, _reason(why), self.reconnect_s)
        _close_quietly(self._out)
        deadline = time.monotonic() + self.reconnect_s
        assert self._redial is not None
        while not self._closed:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:  # one attempt at a time, so that a close is seen between them
                conn = self._redial(min(deadline, time.monotonic() + 2.0))
                msg = read_message(conn, left)
            except (PhalanxError, ChannelError, FrameError, OSError, ssl.SSLError) as exc:
                why = exc
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
                continue
            nxt = msg.get("next")
            with self._lock:
                self._trim()
                if (not isinstance(nxt, int) or isinstance(nxt, bool)
                        or not self._floor <= nxt <= self._sent + 1):
                    _close_quietly(conn)
                    raise ChannelClosed(
                        f"stage {self.peer} asked to resume from frame {nxt!r}, but frames "
                        f"{self._floor}..{self._sent} are what this stage can resend")
                self._peer_acked = max(self._peer_acked, nxt - 1)
                self._trim()
                pending = list(self._unacked)
            conn.settimeout(self.timeout)
            self._out = conn
            try:
                for rec in pending:
                    self._write(rec)
            except (OSError, ssl.SSLError) as exc:
                why = exc
                _close_quietly(conn)
                continue
            self.resumed += 1
            log.warning("stage %d: link to stage %d resumed from frame %d (%d resent)",
                        self.me, self.peer, nxt, len(pending))
            return
        raise ChannelClosed(f"stage {self.peer} did not come back within "
                            f"{self.reconnect_s:g} s ({_reason(why)}): dropped")

    def flush(self) -> None:
        if self._send_error is not None and self.lost:
            raise ChannelClosed(f"send to stage {self.peer} failed: {self._send_error}")
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
        while True:
            try:
                self._read_frames(self._inc)
                return  # the peer said goodbye
            except FrameError as exc:
                # evidence for the stage above; the stream's framing is lost, so the connection
                # is redialled and the sender resends from the frame we still expect (intact,
                # if the network, not the peer, spoilt it: frames in the clear, say)
                self._inbox.put(exc)
                self._malformed += 1
                if not self._may_resume() or self._malformed > MAX_MALFORMED:
                    log.warning("stage %d: malformed frame from stage %d (%s): link closed",
                                self.me, self.peer, exc)
                    self._inbox.put(ChannelClosed(f"link from stage {self.peer} closed after "
                                                  f"{self._malformed} malformed frame(s)"))
                    return
                log.warning("stage %d: malformed frame from stage %d (%s): connection "
                            "redialled", self.me, self.peer, exc)
                why: BaseException = exc
            except (OSError, ssl.SSLError, ConnectionError, ValueError) as exc:
                if not self._may_resume():
                    self._inbox.put(ChannelClosed(f"link to stage {self.peer} failed: "
                                                  f"{_reason(exc)}"))
                    return
                why = exc
            conn = self._resume_in(why)
            if conn is None:
                lost = (f"stage {self.peer} did not come back within {self.reconnect_s:g} s "
                        f"({_reason(why)}): dropped")
                self._drop(lost)
                self._inbox.put(ChannelClosed(lost))
                return
            self._inc = conn

    def _may_resume(self) -> bool:
        return self.resumable and not self._closed and not self._peer_gone

    def _read_frames(self, inc: socket.socket) -> None:
        if self.resumable:
            inc.settimeout(SILENT_S)  # heartbeats arrive every second from a live peer
        while True:
            hdr = bytearray(HEADER_SIZE)
            recv_exactly(inc, memoryview(hdr))
            header = decode_header(hdr, self.limits)  # before any payload is allocated
            self._check_header(header)
            if header.kind in UNSIGNED and not self.owner_link:
                raise FrameError(f"a {header.kind.name} frame from stage {self.peer}: tied "
                                 "transfers pass only between stages 0 and N-1")
            payload = torch.empty(header.nbytes, dtype=torch.uint8)
            if header.nbytes:
                recv_exactly(inc, memoryview(payload.numpy()))
            frame = decode_payload(header, payload)
            if self.signer is not None and self.signer.signs(header.kind):
                sig = bytearray(SIGNATURE)
                recv_exactly(inc, memoryview(sig))
                frame.digest = self.signer.verify(bytes(hdr), _view(payload), bytes(sig))
                frame.signature, frame.header = bytes(sig), bytes(hdr)
            if frame.kind is Kind.CONTROL and frame.micro == ACK_MICRO:
                with self._lock:  # an acknowledgement only ever frees what we hold
                    self._peer_acked = max(self._peer_acked, min(frame.step, self._sent))
                continue
            if frame.seq <= self._got:  # a replay: refused, reported, the stream goes on
                self._inbox.put(FrameError(
                    f"frame from stage {self.peer} has sequence number {frame.seq}, expected "
                    f"{self._got + 1} (replayed, reordered or lost)"))
                continue
            if frame.seq != self._got + 1:  # frames are missing: have them resent
                raise FrameError(f"frame from stage {self.peer} has sequence number "
                                 f"{frame.seq}, expected {self._got + 1}: frames were lost")
            if frame.kind is Kind.CONTROL and frame.micro == NOTICE_MICRO:
                self._received(frame.seq, header.nbytes)
                self._take_notice(payload)
                continue
            if frame.kind is Kind.CONTROL and frame.micro == BYE_MICRO:
                self._peer_gone = True  # nothing is resumed after a goodbye
                self._inbox.put(ChannelClosed(f"stage {self.peer} closed the link"))
                return
            self.bytes_received += HEADER_SIZE + header.nbytes
            self._inbox.put(frame)  # blocks while full: the peer is then slowed by TCP
            self._received(frame.seq, header.nbytes)

    def _take_notice(self, payload: torch.Tensor) -> None:
        if self._on_notice is None:
            log.warning("stage %d ignored a membership notice from stage %d: only the "
                        "coordinator sends them", self.me, self.peer)
            return
        try:
            msg = json.loads(bytes(payload.numpy()).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            msg = None
        if not isinstance(msg, dict):
            log.warning("stage %d ignored a membership notice that is not a JSON object",
                        self.me)
            return
        self._on_notice(msg)

    def _received(self, seq: int, nbytes: int) -> None:
        with self._lock:
            self._got = max(self._got, seq)
            frames, size = self._unacked_in
            self._unacked_in = (frames + 1, size + nbytes)
            due = frames + 1 >= ACK_FRAMES or size + nbytes >= ACK_BYTES
        if due:
            try:
                self._outbox.put_nowait(_ACK)
            except queue.Full:
                pass  # acknowledgements are cumulative: the next one covers this

    def _resume_in(self, why: BaseException) -> socket.socket | None:
        """Wait for the peer to dial this direction again; answer with the next frame we
        expect. Our own direction is redialled too, since a break is rarely one-sided."""
        _close_quietly(self._inc)
        if self._resumes.empty():  # not replaced by a redial we already have: a real break
            log.warning("stage %d: the connection from stage %d broke (%s); waiting up to "
                        "%g s for it to come back", self.me, self.peer, _reason(why),
                        self.reconnect_s)
            _shutdown(self._out)  # our sender fails its next write (a heartbeat) and redials
        deadline = time.monotonic() + self.reconnect_s
        while not self._closed:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                conn = self._resumes.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            try:
                conn.settimeout(min(left, 30.0))
                with self._lock:
                    nxt = self._got + 1
                send_message(conn, {"next": nxt})
                conn.settimeout(None)
            except (OSError, ssl.SSLError):
                _close_quietly(conn)
                continue
            self.resumed += 1
            return conn
        return None

    def resume_incoming(self, conn: socket.socket) -> None:
        """The peer dialled its direction again (called by the mesh after authenticating it):
        take the new connection in place of the old one."""
        if self.lost or self._closed or not self.resumable:
            _close_quietly(conn)
            return
        try:
            self._resumes.put_nowait(conn)
        except queue.Full:
            _close_quietly(conn)
            return
        _shutdown(self._inc)  # wakes a receiver still blocked on the old connection

    def abandon(self, why: str) -> None:
        """Give the link up (its peer was replaced): it reports closed from now on."""
        self._closed = True
        self._send_error = ChannelClosed(f"link to stage {self.peer} abandoned: {why}")
        self.lost = True  # the receiver, woken below, reports the link closed
        for sock in (self._out, self._inc):
            _shutdown(sock)
        self._stop_sender()

    def _stop_sender(self) -> None:
        self._stopping = True  # seen by the sender between items, even if the queue is full
        try:
            self._outbox.put_nowait(_STOP)
        except queue.Full:
            pass

    def _drop(self, why: str) -> None:
        if self.lost:
            return
        self.lost = True
        log.warning("stage %d: %s", self.me, why)
        if self._on_lost is not None:
            self._on_lost(self.peer)

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
        self._closed = True  # from here a broken connection is not resumed
        try:
            self.send(Frame(kind=Kind.CONTROL, step=0, micro=BYE_MICRO, src=self.me,
                            dst=self.peer, tensor=torch.empty(0, dtype=torch.uint8)))
            self.flush()
        except ChannelClosed:
            pass
        self._stop_sender()
        self._receiver.join(timeout)
        for s in (self._out, self._inc):
            _close_quietly(s)
        while not self._resumes.empty():
            _close_quietly(self._resumes.get_nowait())


def _view(payload: torch.Tensor) -> memoryview | bytes:
    return memoryview(payload.numpy()) if payload.numel() else b""


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _shutdown(sock: socket.socket) -> None:
    """End a connection under a thread that may be blocked on it (at the socket level: the
    TLS object belongs to that thread)."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


def _close_quietly(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
