"""Rendezvous without pickle or an open store: every stage meets the others through the
coordinator's address and the roster.

1. Every stage listens; stage 0 (the data owner's coordinator) at ``secure.coordinator``.
2. Stage s > 0 dials the coordinator over TLS (both ends authenticated against the roster, the
   coordinator's key pinned as stage 0's) and says where it listens (HELLO).
3. The coordinator dials each stage back; once every admitted stage has joined it sends each
   the address book (BOOK).
4. Every stage dials every other one; each connection carries one direction of a link.

The accepting side learns who called from the pinned key of the TLS handshake, never from what
the caller says. A key that is not in the roster is refused: at the handshake when its
certificate chains to no roster certificate, or right after it, when it does (a roster member
could sign one) but its key is pinned for no stage. A caller admitted for a stage that is
already connected is refused the same way; every refusal is logged. At most 32 handshakes run
at once (more callers are turned away, logged), each bounded in time, and every rendezvous
read is bounded by what is left of the timeout. The
honest process keeps waiting, bounded by the timeout, whose error names the missing stages.
Rendezvous messages are length-prefixed JSON of a few hundred bytes, size-checked before
reading; nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import ssl
import struct
import threading
import time

from phalanx.comm.channel import ChannelTimeout
from phalanx.errors import PhalanxError
from phalanx.secure.identity import Identity, Roster
from phalanx.secure.tls import Signer, TlsChannel, context, peer_fingerprint, recv_exactly
from phalanx.wire import DEFAULT_LIMITS, FrameError, Limits

log = logging.getLogger(__name__)

MAX_MESSAGE = 64 * 1024
HANDSHAKE_S = 30.0
MAX_HANDSHAKES = 32  # unauthenticated connections being checked at once; more are refused
SESSION_BYTES = 32


def parse_address(text: str, what: str) -> tuple[str, int]:
    """``host:port`` (port 0 = any free port when listening)."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise PhalanxError(f"{what}={text!r} is not an address: use host:port, e.g. "
                           "127.0.0.1:29600")
    return host.strip("[]"), int(port)


def send_message(sock: ssl.SSLSocket, msg: dict) -> None:
    data = json.dumps(msg).encode()
    sock.sendall(struct.pack("<I", len(data)) + data)


def read_message(sock: ssl.SSLSocket, timeout: float | None = None) -> dict:
    """One length-prefixed JSON object, within ``timeout`` seconds (a silent peer is a
    :class:`ChannelTimeout`, not a hang)."""
    sock.settimeout(timeout)
    try:
        return _read_message(sock)
    except TimeoutError:
        raise ChannelTimeout(f"no rendezvous message within {timeout:g} s") from None
    finally:
        sock.settimeout(None)


def _read_message(sock: ssl.SSLSocket) -> dict:
    size = bytearray(4)
    recv_exactly(sock, memoryview(size))
    (n,) = struct.unpack("<I", size)
    if n > MAX_MESSAGE:
        raise FrameError(f"a rendezvous message of {n} bytes (at most {MAX_MESSAGE})")
    data = bytearray(n)
    recv_exactly(sock, memoryview(data))
    try:
        msg = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise FrameError("a rendezvous message that is not JSON (or nested too deep)") from None
    if not isinstance(msg, dict):
        raise FrameError("a rendezvous message that is not a JSON object")
    return msg


class Mesh:
    """Builds this stage's TLS links to every other stage of the roster."""

    def __init__(self, me: int, identity: Identity, roster: Roster, coordinator: str,
                 listen: str = "127.0.0.1:0", advertise: str = "", timeout: float = 300.0,
                 sign: bool = True, encrypt: bool = True, limits: Limits = DEFAULT_LIMITS
                 ) -> None:
        self.me, self.n = me, roster.size
        if roster.stage_of(identity.fingerprint) != me:
            raise PhalanxError(f"the identity {identity.cert_path.parent} is not the roster's "
                               f"stage {me}: use the key the roster admits for it")
        self.identity, self.roster, self.timeout = identity, roster, timeout
        self.coordinator = parse_address(coordinator, "secure.coordinator")
        self.listen = self.coordinator if me == 0 else parse_address(listen, "secure.listen")
        self.advertise = advertise
        self.sign, self.encrypt, self.limits = sign, encrypt, limits
        self._server_ctx = context(identity, roster, server=True)
        self._client_ctx = context(identity, roster, server=False)
        self._incoming: queue.Queue = queue.Queue()
        self._arrived: dict[int, ssl.SSLSocket] = {}  # stages that called, kept until asked for
        self._accepted: set[int] = set()
        self._lock = threading.Lock()
        self._handshakes = threading.BoundedSemaphore(MAX_HANDSHAKES)
        self._listener: socket.socket | None = None
        self._listening = False
        self.session = b""  # the coordinator's random run id, covered by every signature

    # -- accepting (one direction of each link) -------------------------------------------
    def _listen(self) -> int:
        host, port = self.listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise PhalanxError(f"stage {self.me} cannot listen at {host}:{port} ({exc}): pick "
                               "a free address") from None
        sock.listen(64)
        self._listener = sock
        self._listening = True
        threading.Thread(target=self._accept_loop, args=(sock,), daemon=True,
                         name=f"phalanx-accept-{self.me}").start()
        return sock.getsockname()[1]

    def _accept_loop(self, sock: socket.socket) -> None:
        while self._listening:
            try:
                raw, where = sock.accept()
            except OSError as exc:
                if not self._listening:
                    return  # the listener was closed
                log.warning("stage %d: accept failed (%s); retrying", self.me, exc)
                time.sleep(0.5)  # out of file descriptors, say: wait for some to close
                continue
            if not self._handshakes.acquire(blocking=False):
                log.warning("stage %d refused %s: %d handshakes already under way", self.me,
                            where, MAX_HANDSHAKES)
                raw.close()
                continue
            threading.Thread(target=self._handshake, args=(raw, where), daemon=True).start()

    def _handshake(self, raw: socket.socket, where: object) -> None:
        try:
            self._authenticate(raw, where)
        finally:
            self._handshakes.release()

    def _authenticate(self, raw: socket.socket, where: object) -> None:
        raw.settimeout(HANDSHAKE_S)
        try:
            tls = self._server_ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.warning("stage %d refused a connection from %s: TLS handshake failed (%s): an "
                        "unknown or revoked key, or not TLS 1.3", self.me, where,
                        getattr(exc, "reason", None) or type(exc).__name__)
            raw.close()
            return
        stage = self.roster.stage_of(peer_fingerprint(tls) or "")
        with self._lock:
            fresh = stage is not None and stage != self.me and stage not in self._accepted
            if fresh:
                self._accepted.add(stage)
        if not fresh:
            log.warning("stage %d refused %s: %s", self.me, where,
                        "its key is admitted for no stage" if stage is None else
                        f"its key is admitted for stage {stage}, which is already connected")
            tls.close()
            return
        try:
            conn = self._after_handshake(tls)  # still under the handshake timeout
        except (ssl.SSLError, OSError) as exc:
            log.warning("stage %d dropped stage %s: %s", self.me, stage, exc)
            tls.close()
            return
        conn.settimeout(None)
        self._incoming.put((stage, conn))

    def _collect(self, stages: set[int], deadline: float) -> dict[int, ssl.SSLSocket]:
        while not stages <= set(self._arrived):
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChannelTimeout(f"stage {self.me} waited {self.timeout:g} s for stage(s) "
                                     f"{sorted(stages - set(self._arrived))} to connect")
            try:
                stage, tls = self._incoming.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            self._arrived[stage] = tls  # early callers wait here for their turn
        return {s: self._arrived.pop(s) for s in stages}

    # -- dialling (the other direction) ---------------------------------------------------
    def _dial(self, host: str, port: int, stage: int, deadline: float) -> ssl.SSLSocket:
        """Dial until the peer listens (it may start later) or the deadline passes."""
        while True:
            try:
                raw = socket.create_connection((host, port), timeout=HANDSHAKE_S)
                tls = self._client_ctx.wrap_socket(raw)
                break
            except (ConnectionError, OSError) as exc:
                if isinstance(exc, ssl.SSLError) or time.monotonic() > deadline:
                    raise PhalanxError(f"stage {self.me} cannot reach stage {stage} at "
                                       f"{host}:{port} ({type(exc).__name__}: {exc}): check "
                                       "the address, the roster, and that the stage runs"
                                       ) from None
                time.sleep(0.2)
        if self.roster.stage_of(peer_fingerprint(tls) or "") != stage:
            tls.close()
            raise PhalanxError(f"the peer at {host}:{port} is not the roster's stage {stage}")
        try:
            tls.settimeout(max(0.1, min(HANDSHAKE_S, deadline - time.monotonic())))
            conn = self._after_handshake(tls)  # still bounded: a peer that never answers
        except (ssl.SSLError, OSError) as exc:
            tls.close()
            raise PhalanxError(f"stage {stage} at {host}:{port} did not finish the handshake "
                               f"({type(exc).__name__})") from None
        conn.settimeout(None)
        return conn

    def _after_handshake(self, tls: ssl.SSLSocket) -> socket.socket:
        """The authenticated connection, or with ``encrypt=False`` the same TCP connection
        after a clean TLS close (authenticated once; frames then travel in the clear, their
        integrity resting on the signatures: for benchmarks and confidential-anyway links)."""
        return tls if self.encrypt else tls.unwrap()

    def _signer(self, key: object, peer: int) -> Signer | None:
        if key is None:
            return None
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(self.roster.members[peer].cert_pem.encode())
        return Signer(key, cert.public_key(), self.session,  # type: ignore[arg-type]
                      sign_all=not self.encrypt)

    def _signing_key(self) -> object:
        """This stage's private key, read once for all its links (None: signing is off)."""
        if not self.sign:
            return None
        from cryptography.hazmat.primitives import serialization

        return serialization.load_pem_private_key(self.identity.key_path.read_bytes(), None)

    # -- the rendezvous -------------------------------------------------------------------
    def connect(self) -> dict[int, TlsChannel]:
        """Every link of this stage, once all stages of the roster are connected."""
        deadline = time.monotonic() + self.timeout
        others = set(range(self.n)) - {self.me}
        port = self._listen()
        out: dict[int, ssl.SSLSocket] = {}
        if self.me == 0:
            inc = self._collect(others, deadline)
            book = [f"{self.coordinator[0]}:{self.coordinator[1]}"] + [""] * (self.n - 1)
            self.session = os.urandom(SESSION_BYTES)
            for s in sorted(others):
                book[s] = str(read_message(inc[s], self._left(deadline)).get("listen", ""))
                out[s] = self._dial(*parse_address(book[s], f"stage {s}'s address"), s,
                                    deadline)
            for s in sorted(others):
                send_message(out[s], {"book": book, "session": self.session.hex()})
        else:
            out[0] = self._dial(*self.coordinator, 0, deadline)
            here = self.advertise or f"{self.listen[0]}:{port}"
            send_message(out[0], {"listen": here})
            inc = self._collect({0}, deadline)
            msg = read_message(inc[0], self._left(deadline))
            book = msg.get("book")
            if not isinstance(book, list) or len(book) != self.n:
                raise FrameError("the coordinator's address book does not list every stage")
            try:
                self.session = bytes.fromhex(str(msg.get("session", "")))
            except ValueError:
                self.session = b""
            if len(self.session) != SESSION_BYTES:
                raise FrameError("the coordinator's address book has no valid session id")
            for t in sorted(others - {0}):
                out[t] = self._dial(*parse_address(str(book[t]), f"stage {t}'s address"), t,
                                    deadline)
            inc.update(self._collect(others - {0}, deadline))
        self.close_listener()
        key = self._signing_key()
        return {p: TlsChannel(self.me, p, out[p], inc[p], self.limits,
                              signer=self._signer(key, p), stages=self.n, timeout=self.timeout)
                for p in sorted(others)}

    def _left(self, deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ChannelTimeout(f"stage {self.me}: the rendezvous took over {self.timeout:g} s")
        return left

    def close_listener(self) -> None:
        self._listening = False
        if self._listener is not None:
            self._listener.close()
            self._listener = None
