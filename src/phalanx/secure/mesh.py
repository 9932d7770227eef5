"""Rendezvous and membership without pickle or an open store: every stage meets the others
through the coordinator's address and the roster, and keeps listening while the job runs.

1. Every stage listens; stage 0 (the data owner's coordinator) at ``secure.coordinator``.
2. Stage s > 0 dials the coordinator over TLS (both ends authenticated against the roster, the
   coordinator's key pinned as stage 0's) and says where it listens (hello).
3. The coordinator dials each stage back; once every admitted stage has joined it sends each
   the address book, the run's session id and its roster, signed with its key (book).
4. Every stage dials every other one; each connection carries one direction of a link.

Every dialled connection starts with one message: a hello (a stage joining) or a resumption
(a link whose connection broke, :mod:`phalanx.secure.link`). While the job runs:

- a broken connection is redialled and the link resumes where it stopped;
- a peer that does not come back within ``reconnect_s`` is dropped (``on_drop``), and its place
  is free: a process with the stage's key (restarted) or with a key bound by a join token
  (:mod:`phalanx.secure.join`) dials the coordinator as in step 2; the coordinator sends it the
  book and tells every other stage (a signed notice on its link to them); they dial it and
  accept its call, and each side hands the new link to ``on_member`` (failover builds on this).

The accepting side learns who called from the pinned key of the TLS handshake, never from what
the caller says. A key that is not in the roster is refused: at the handshake when its
certificate chains to no roster certificate, or right after it, when it does (a roster member
could sign one) but its key is pinned for no stage. A hello for a stage that is connected is
refused; every refusal is logged. At most 64 handshakes run at once, 16 from one address (more
callers are turned away, logged); each has a total deadline (``HANDSHAKE_S``) however its bytes
are paced, and every read is bounded by what is left of the timeout. Not covered: a flood from
the honest peer's own address (the same host, or one NAT) can hold its 16 places and delay its
reconnection; from other addresses it cannot.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from phalanx.comm.channel import ChannelError, ChannelTimeout
from phalanx.errors import PhalanxError
from phalanx.secure.identity import Identity, Member, Roster, member_of, parse_roster
from phalanx.secure.join import admit
from phalanx.secure.link import TlsChannel
from phalanx.secure.signing import Signer
from phalanx.secure.tls import context, peer_fingerprint, read_message, send_message, trust
from phalanx.wire import DEFAULT_LIMITS, FrameError, Limits

log = logging.getLogger(__name__)

HANDSHAKE_S = 10.0  # the whole handshake of one caller, from accept to its first message
MAX_HANDSHAKES = 64  # unauthenticated connections being checked at once; more are refused
PER_SOURCE = 16  # of which from one address (a one-host run has every stage on loopback)
SESSION_BYTES = 32
REFUSED_RETRY_S = 5.0  # a peer may refuse our key until it has read the coordinator's roster
RECONNECT_S = 30.0


def parse_address(text: str, what: str) -> tuple[str, int]:
    """``host:port`` (port 0 = any free port when listening)."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise PhalanxError(f"{what}={text!r} is not an address: use host:port, e.g. "
                           "127.0.0.1:29600")
    return host.strip("[]"), int(port)


class _Refused(Exception):
    """The peer did not take our call (its TLS alert, or its refusal); ``retry``: it said to
    call again (a replacement that came before the old link was dropped)."""

    def __init__(self, why: str, retry: bool = False) -> None:
        super().__init__(why)
        self.retry = retry


class Mesh:
    """This stage's TLS links to every other stage of the roster, kept up while the job runs."""

    def __init__(self, me: int, identity: Identity, roster: Roster, coordinator: str,
                 listen: str = "127.0.0.1:0", advertise: str = "", timeout: float = 300.0,
                 sign: bool = True, encrypt: bool = True, limits: Limits = DEFAULT_LIMITS,
                 reconnect_s: float = RECONNECT_S) -> None:
        self.me, self.n = me, roster.size
        if roster.stage_of(identity.fingerprint) != me:
            raise PhalanxError(f"the identity {identity.cert_path.parent} is not the roster's "
                               f"stage {me}: use the key the roster admits for it")
        self.identity, self.roster, self.timeout = identity, roster, timeout
        self.coordinator = parse_address(coordinator, "secure.coordinator")
        self.listen = self.coordinator if me == 0 else parse_address(listen, "secure.listen")
        self.advertise = advertise
        self.sign, self.encrypt, self.limits = sign, encrypt, limits
        self.reconnect_s = reconnect_s
        trusted = roster.trusted_pem()
        self._server_ctx = context(identity, trusted, server=True, anonymous=me == 0)
        self._client_ctx = context(identity, trusted, server=False)
        self._key = serialization.load_pem_private_key(identity.key_path.read_bytes(), None)
        self._incoming: queue.Queue = queue.Queue()
        self._arrived: dict[int, tuple[socket.socket, dict, str]] = {}  # until asked for
        self._arrival = threading.Condition()
        self._accepted: set[int] = set()  # stages whose call this stage has taken
        self._lock = threading.Lock()
        self._handshakes = threading.BoundedSemaphore(MAX_HANDSHAKES)
        self._sources: dict[object, int] = {}
        self._meeting: set[int] = set()  # replacements being met (one at a time per stage)
        self._listener: socket.socket | None = None
        self._listening = False
        self.session = b""  # the coordinator's random run id, covered by every signature
        self.book: list[str] = []
        self.links: dict[int, TlsChannel] = {}
        self.dropped: set[int] = set()
        self.on_drop: Callable[[int], None] | None = None
        self.on_member: Callable[[int, TlsChannel], None] | None = None

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
            source = where[0] if isinstance(where, tuple) else where
            with self._lock:
                busy = self._sources.get(source, 0)
                if busy < PER_SOURCE:
                    self._sources[source] = busy + 1
            if busy >= PER_SOURCE or not self._handshakes.acquire(blocking=False):
                log.warning("stage %d refused %s: %s", self.me, where,
                            f"{PER_SOURCE} handshakes from it already under way"
                            if busy >= PER_SOURCE else
                            f"{MAX_HANDSHAKES} handshakes already under way")
                if busy < PER_SOURCE:
                    self._release_source(source)
                raw.close()
                continue
            threading.Thread(target=self._handshake, args=(raw, where, source),
                             daemon=True).start()

    def _release_source(self, source: object) -> None:
        with self._lock:
            left = self._sources.get(source, 1) - 1
            if left > 0:
                self._sources[source] = left
            else:
                self._sources.pop(source, None)

    def _handshake(self, raw: socket.socket, where: object, source: object) -> None:
        """One caller, with a total deadline: a caller that trickles its bytes is cut off at
        ``HANDSHAKE_S`` however it paces them."""
        timer = threading.Timer(HANDSHAKE_S, _cut, args=(raw,))
        timer.daemon = True
        timer.start()
        try:
            self._authenticate(raw, where)
        finally:
            timer.cancel()
            self._handshakes.release()
            self._release_source(source)

    def _refuse(self, conn: socket.socket, where: object, why: str) -> None:
        log.warning("stage %d refused %s: %s", self.me, where, why)
        conn.close()

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
        fp = peer_fingerprint(tls)
        if fp is None:  # only the coordinator lets a caller without a key in: to join
            admit(tls, self.roster, where, HANDSHAKE_S, self._trust)
            tls.close()
            return
        stage = self.roster.stage_of(fp)
        if stage is None or stage == self.me:
            return self._refuse(tls, where, "its key is admitted for no stage")
        try:
            first = read_message(tls, HANDSHAKE_S)
        except (ChannelError, FrameError, ssl.SSLError, OSError) as exc:
            return self._refuse(tls, where, f"stage {stage} did not finish the handshake ({exc})")
        retry = False  # a refusal that asks the caller to call again
        with self._lock:
            link = self.links.get(stage)
            if "resume" in first:
                why = ("" if link is not None and not link.lost
                       and first["resume"] == self.session.hex()
                       else f"stage {stage} asked to resume a link this stage does not have")
            elif "hello" not in first:
                why = f"stage {stage} said neither hello nor resume"
            elif not self.links and stage in self._accepted:  # the rendezvous: one call each
                why = f"its key is admitted for stage {stage}, which is already connected"
            elif self.links and self.me == 0 and stage not in self.dropped:
                retry = True
                why = (f"stage {stage} is still connected: a replacement is taken once the "
                       f"old link is dropped (after secure.reconnect_s={self.reconnect_s:g})")
            else:
                why = ""
                if not self.links:
                    self._accepted.add(stage)
                elif self.me == 0:
                    self.dropped.discard(stage)  # claimed: a second caller is told to wait
        try:
            if "hello" in first:  # over TLS still, before a clear link drops it
                send_message(tls, {"refused": why, "retry": retry}
                             if why else {"welcome": True})
            if why:
                return self._refuse(tls, where, why)
            conn = self._after_handshake(tls)
        except (ssl.SSLError, OSError) as exc:
            if not why:
                self._unclaim(stage)
            return self._refuse(tls, where, f"stage {stage} left during the handshake ({exc})")
        conn.settimeout(None)
        if "resume" in first:
            assert link is not None
            link.resume_incoming(conn)
            return
        # while the job runs a call is a replacement: the coordinator checks that the stage
        # was dropped; elsewhere it waits for the coordinator's notice (the latest call kept,
        # with the key that made it: only the key the notice names is taken)
        self._incoming.put((stage, conn, first, fp))

    def _unclaim(self, stage: int) -> None:
        """A call taken for ``stage`` failed before it was used: its place is open again."""
        with self._lock:
            if not self.links:
                self._accepted.discard(stage)
            elif self.me == 0:  # it had claimed a dropped place
                self.dropped.add(stage)

    def _collect(self, stages: set[int], deadline: float) -> dict[int, tuple[socket.socket,
                                                                           dict]]:
        """The calls of ``stages`` (connection, hello), as they arrive; early ones wait."""
        while True:
            with self._arrival:
                for s in stages & set(self._arrived):  # a call by a key no longer admitted
                    if self._arrived[s][2] != self.roster.members[s].fingerprint:
                        self._arrived.pop(s)[0].close()
                if stages <= set(self._arrived):
                    return {s: self._arrived.pop(s)[:2] for s in stages}
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChannelTimeout(f"stage {self.me} waited {self.timeout:g} s for stage(s) "
                                     f"{sorted(stages - set(self._arrived))} to connect")
            self._take_arrival(min(left, 1.0))

    def _take_arrival(self, wait: float) -> None:
        try:
            stage, conn, hello, fp = self._incoming.get(timeout=wait)
        except queue.Empty:
            return
        with self._arrival:
            older = self._arrived.get(stage)
            if older is not None:
                older[0].close()
            self._arrived[stage] = (conn, hello, fp)
            self._arrival.notify_all()

    # -- dialling (the other direction) ---------------------------------------------------
    def _dial(self, address: str, stage: int, deadline: float, first: dict) -> socket.socket:
        """Dial until the peer listens (it may start later) and takes our call, or the deadline
        passes; say ``first`` (a hello, answered by a welcome, or a resumption, answered by the
        link). In TLS 1.3 the caller's handshake ends before the peer has checked the caller's
        certificate, so only the welcome shows that the peer took the call; a peer that has not
        yet read the coordinator's roster refuses a key bound since, so refusals are retried
        for a few seconds."""
        host, port = parse_address(address, f"stage {stage}'s address")
        refused_until = None
        while True:
            try:
                return self._call(host, port, stage, deadline, first)
            except _Refused as exc:
                now = time.monotonic()
                refused_until = refused_until or now + REFUSED_RETRY_S
                if now > (deadline if exc.retry else min(deadline, refused_until)):
                    raise PhalanxError(f"stage {stage} at {host}:{port} refused stage {self.me}"
                                       f" ({exc}): check that both use the data owner's roster"
                                       ) from None
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise PhalanxError(f"stage {self.me} cannot reach stage {stage} at "
                                       f"{host}:{port} ({type(exc).__name__}: {exc}): check "
                                       "the address, the roster, and that the stage runs"
                                       ) from None
            time.sleep(0.2)

    def _call(self, host: str, port: int, stage: int, deadline: float, first: dict
              ) -> socket.socket:
        raw = socket.create_connection((host, port), timeout=HANDSHAKE_S)
        try:
            tls = self._client_ctx.wrap_socket(raw)
        except ssl.SSLError as exc:
            raw.close()
            raise _Refused(getattr(exc, "reason", None) or str(exc)) from None
        try:
            if self.roster.stage_of(peer_fingerprint(tls) or "") != stage:
                raise PhalanxError(f"the peer at {host}:{port} is not the roster's stage {stage}")
            tls.settimeout(max(0.1, min(HANDSHAKE_S, deadline - time.monotonic())))
            send_message(tls, first)
            if "hello" in first:
                answer = read_message(tls, max(0.1, min(HANDSHAKE_S,
                                                        deadline - time.monotonic())))
                if answer.get("welcome") is not True:
                    raise _Refused(str(answer.get("refused", "no welcome"))[:300],
                                   answer.get("retry") is True)
            conn = self._after_handshake(tls)  # still bounded: a peer that never answers
        except ssl.SSLError as exc:  # the peer's alert: it does not admit our key
            tls.close()
            raise _Refused(getattr(exc, "reason", None) or str(exc)) from None
        except (ChannelError, FrameError, OSError) as exc:
            tls.close()
            raise PhalanxError(f"stage {stage} at {host}:{port} did not finish the handshake "
                               f"({type(exc).__name__}: {exc})") from None
        except BaseException:
            tls.close()
            raise
        conn.settimeout(None)
        return conn

    def _after_handshake(self, tls: ssl.SSLSocket) -> socket.socket:
        """The authenticated connection, or with ``encrypt=False`` the same TCP connection
        after a clean TLS close (authenticated once; frames then travel in the clear, their
        integrity resting on the signatures: for benchmarks and confidential-anyway links)."""
        return tls if self.encrypt else tls.unwrap()

    # -- what the coordinator says, signed ------------------------------------------------
    def _signed(self, body: dict) -> dict:
        data = json.dumps(body, sort_keys=True)
        assert isinstance(self._key, ed25519.Ed25519PrivateKey)
        return {"signed": data, "sig": self._key.sign(data.encode()).hex()}

    def _verified(self, msg: dict) -> dict:
        """A message of the coordinator's, checked against stage 0's pinned key (frames may
        travel in the clear, so the book must not rest on the connection alone)."""
        cert = x509.load_pem_x509_certificate(self.roster.members[0].cert_pem.encode())
        key = cert.public_key()
        assert isinstance(key, ed25519.Ed25519PublicKey)
        try:
            data = str(msg["signed"])
            key.verify(bytes.fromhex(str(msg["sig"])), data.encode())
            body = json.loads(data)
        except (KeyError, ValueError, InvalidSignature):
            raise FrameError("a message that does not carry the coordinator's signature"
                             ) from None
        if not isinstance(body, dict):
            raise FrameError("the coordinator's message is not a JSON object")
        return body

    def _trust(self, member: Member) -> None:
        """Admit ``member``'s key for its stage in both directions' TLS contexts."""
        with self._lock:
            if self.roster.members.get(member.stage) != member:
                self.roster.admit(member)
            trust(self._server_ctx, member.cert_pem)
            trust(self._client_ctx, member.cert_pem)

    def _learn(self, body: dict) -> None:
        """Take the coordinator's book: addresses, session id, and its roster (keys bound by
        join tokens since this stage read its own copy)."""
        book, session = body.get("book"), body.get("session")
        if not isinstance(book, list) or len(book) != self.n:
            raise FrameError("the coordinator's address book does not list every stage")
        try:
            self.session = bytes.fromhex(str(session))
        except ValueError:
            self.session = b""
        if len(self.session) != SESSION_BYTES:
            raise FrameError("the coordinator's address book has no valid session id")
        roster = parse_roster(body.get("roster"), self.n, "the coordinator's roster")
        if roster.stage_of(self.identity.fingerprint) != self.me:
            raise PhalanxError(f"the coordinator's roster no longer admits this key for stage "
                               f"{self.me}: it was replaced or revoked")
        for m in roster.members.values():
            if self.roster.members.get(m.stage) != m:
                self._trust(m)
        self.book = [str(b) for b in book]

    def _book(self) -> dict:
        return self._signed({"book": self.book, "session": self.session.hex(),
                             "roster": self.roster.public()})

    # -- the rendezvous -------------------------------------------------------------------
    def connect(self) -> dict[int, TlsChannel]:
        """Every link of this stage, once all stages of the roster are connected."""
        deadline = time.monotonic() + self.timeout
        others = set(range(self.n)) - {self.me}
        port = self._listen()
        out: dict[int, socket.socket] = {}
        if self.me == 0:
            calls = self._collect(others, deadline)
            self.session = os.urandom(SESSION_BYTES)
            self.book = [f"{self.coordinator[0]}:{self.coordinator[1]}"] + [""] * (self.n - 1)
            for s in sorted(others):
                self.book[s] = str(calls[s][1].get("hello", ""))
                out[s] = self._dial(self.book[s], s, deadline, {"hello": ""})
            for s in sorted(others):
                send_message(out[s], self._book())
        else:
            here = self.advertise or f"{self.listen[0]}:{port}"
            out[0] = self._dial(f"{self.coordinator[0]}:{self.coordinator[1]}", 0, deadline,
                                {"hello": here})
            calls = self._collect({0}, deadline)
            self._learn(self._verified(read_message(calls[0][0], self._left(deadline))))
            for t in sorted(others - {0}):
                out[t] = self._dial(self.book[t], t, deadline, {"hello": ""})
            calls.update(self._collect(others - {0}, deadline))
        with self._lock:
            self.links = {p: self._link(p, out[p], calls[p][0]) for p in sorted(others)}
        threading.Thread(target=self._serve, daemon=True, name=f"phalanx-members-{self.me}"
                         ).start()
        return dict(self.links)

    def public_key(self, stage: int) -> ed25519.Ed25519PublicKey | None:
        """The key the roster admits for ``stage`` now (what its frames are signed with)."""
        member = self.roster.members.get(stage)
        if member is None:
            return None
        key = x509.load_pem_x509_certificate(member.cert_pem.encode()).public_key()
        return key if isinstance(key, ed25519.Ed25519PublicKey) else None

    def _link(self, peer: int, out: socket.socket, inc: socket.socket) -> TlsChannel:
        signer = None
        if self.sign:
            cert = x509.load_pem_x509_certificate(self.roster.members[peer].cert_pem.encode())
            signer = Signer(self._key, cert.public_key(), self.session,  # type: ignore[arg-type]
                            sign_all=not self.encrypt)
        return TlsChannel(self.me, peer, out, inc, self.limits, signer=signer, stages=self.n,
                          timeout=self.timeout, redial=self._redialler(peer),
                          reconnect_s=self.reconnect_s, on_lost=self._lost,
                          on_notice=self._notice if peer == 0 else None)

    def _redialler(self, peer: int) -> Callable[[float], socket.socket]:
        def redial(deadline: float) -> socket.socket:
            return self._dial(self.book[peer], peer, deadline, {"resume": self.session.hex()})
        return redial

    def _left(self, deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ChannelTimeout(f"stage {self.me}: the rendezvous took over {self.timeout:g} s")
        return left

    # -- membership while the job runs ----------------------------------------------------
    def _lost(self, peer: int) -> None:
        with self._lock:
            self.dropped.add(peer)  # its place is free for a replacement
        log.warning("stage %d dropped stage %d; its place is open for a replacement", self.me,
                    peer)
        if self.on_drop is not None:
            self.on_drop(peer)

    def _serve(self) -> None:
        """Take calls while the job runs: at the coordinator each is a replacement."""
        while self._listening:
            self._take_arrival(1.0)
            if self.me != 0:
                continue
            with self._arrival:
                calls = [(s, self._arrived.pop(s)[:2]) for s in list(self._arrived)]
            for stage, (conn, hello) in calls:
                threading.Thread(target=self._replace, args=(stage, conn, hello),
                                 daemon=True).start()

    def _replace(self, stage: int, inc: socket.socket, hello: dict) -> None:
        """The coordinator takes a stage that called again after being dropped."""
        try:
            address = str(hello.get("hello", ""))
            deadline = time.monotonic() + self.timeout
            out = self._dial(address, stage, deadline, {"hello": ""})
            self.book[stage] = address
            send_message(out, self._book())
            member = self.roster.members[stage]
            notice = self._signed({"member": stage, "listen": address, "cert": member.cert_pem,
                                   "name": member.name, "session": self.session.hex()})
            for p, link in list(self.links.items()):
                if p != stage and not link.lost:
                    link.notice(notice)
        except (PhalanxError, ChannelError, OSError, ssl.SSLError) as exc:
            log.warning("stage 0 could not take stage %d back: %s", stage, exc)
            inc.close()
            with self._lock:
                self.dropped.add(stage)  # open again for the next caller
            return
        self._welcome(stage, out, inc)

    def _notice(self, msg: dict) -> None:
        """The coordinator says a replacement for a stage joined: dial it, take its call."""
        threading.Thread(target=self._meet, args=(msg,), daemon=True).start()

    def _meet(self, msg: dict) -> None:
        stage = None
        try:
            body = self._verified(msg)
            stage = body.get("member")
            if (not isinstance(stage, int) or isinstance(stage, bool)
                    or not 0 < stage < self.n or stage == self.me
                    or body.get("session") != self.session.hex()):
                raise FrameError(f"a notice for stage {stage!r} of another run or no stage")
            with self._lock:
                if stage in self._meeting:
                    stage = None
                    raise FrameError("a notice for a stage being met already")
                self._meeting.add(stage)
            self._trust(member_of(stage, str(body.get("name", "")), str(body.get("cert", ""))))
            old = self.links.get(stage)
            if old is not None and not old.lost:
                old.abandon("the coordinator replaced it")
            deadline = time.monotonic() + self.timeout
            address = str(body.get("listen", ""))
            out = self._dial(address, stage, deadline, {"hello": ""})
            self.book[stage] = address
            inc = self._collect({stage}, deadline)[stage][0]
        except (PhalanxError, ChannelError, FrameError, OSError, ssl.SSLError, ValueError
                ) as exc:
            log.warning("stage %d could not meet a replacement: %s", self.me, exc)
            self._done_meeting(stage)
            return
        self._welcome(stage, out, inc)
        self._done_meeting(stage)

    def _done_meeting(self, stage: int | None) -> None:
        with self._lock:
            self._meeting.discard(stage)  # type: ignore[arg-type]

    def _welcome(self, stage: int, out: socket.socket, inc: socket.socket) -> None:
        with self._lock:
            link = self._link(stage, out, inc)
            self.links[stage] = link
            self.dropped.discard(stage)
        log.warning("stage %d: stage %d is back (a new link)", self.me, stage)
        if self.on_member is not None:
            self.on_member(stage, link)

    def close_listener(self) -> None:
        self._listening = False
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    close = close_listener


def _cut(sock: socket.socket) -> None:
    """End a connection whose handshake ran out of time (the handshake thread then fails)."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass
