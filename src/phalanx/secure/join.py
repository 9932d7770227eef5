"""One-time join tokens: a participant binds a key it just made to a stage, without the data
owner copying certificates around.

1. The data owner runs ``phalanx keys token --roster R --stage S``: the roster keeps the
   token's SHA-256; the printed token holds the stage, the secret and the coordinator's key
   fingerprint, and is handed to the participant out of band (like a password).
2. The participant makes a key (``phalanx keys new``) and starts its stage with
   ``secure.token``. It dials the coordinator without a certificate, checks that the
   coordinator holds the key the token names (so nobody else learns the secret), receives a
   fresh nonce and answers with the secret, its certificate and its signature over the nonce
   and the secret's hash (proof that it holds the key).
3. The coordinator checks the token (known, for that stage, unused), the certificate and the
   proof, pins the key for the stage (revoking the stage's previous key, if any), marks the
   token used in the roster file, and returns the roster. The stage then meets the others as
   any admitted stage does.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from phalanx.comm.channel import ChannelError
from phalanx.errors import PhalanxError
from phalanx.secure.identity import TOKEN_BYTES, Identity, Member, Roster, member_of, parse_roster
from phalanx.secure.tls import context, peer_fingerprint, read_message, send_message
from phalanx.wire import FrameError

log = logging.getLogger(__name__)

PREFIX = "phalanx-join-1"
NONCE_BYTES = 32


def token_text(stage: int, secret: bytes, coordinator_fp: str) -> str:
    return f"{PREFIX}:{stage}:{secret.hex()}:{coordinator_fp}"


def parse_token(text: str) -> tuple[int, bytes, str]:
    """(stage, secret, coordinator fingerprint) of a token, or of the file that holds one."""
    text = text.strip()
    if not text.startswith(PREFIX + ":") and Path(text).expanduser().is_file():
        text = Path(text).expanduser().read_text().strip()
    parts = text.split(":")
    try:
        if len(parts) != 4 or parts[0] != PREFIX:
            raise ValueError
        stage, secret, fp = int(parts[1]), bytes.fromhex(parts[2]), parts[3]
        if stage < 1 or len(secret) != TOKEN_BYTES or len(bytes.fromhex(fp)) != 32:
            raise ValueError
    except ValueError:
        raise PhalanxError("secure.token is not a join token (nor a file holding one): use "
                           "the line `phalanx keys token` printed") from None
    return stage, secret, fp


def _proof_message(nonce: bytes, secret: bytes) -> bytes:
    return PREFIX.encode() + nonce + hashlib.sha256(secret).digest()


def join(identity: Identity, token: str, coordinator: tuple[str, int], timeout: float
         ) -> tuple[int, Roster]:
    """Bind ``identity`` to the token's stage at the coordinator; (stage, the roster)."""
    stage, secret, coordinator_fp = parse_token(token)
    host, port = coordinator
    deadline = time.monotonic() + timeout
    while True:
        try:
            raw = socket.create_connection((host, port), timeout=min(30.0, timeout))
            break
        except OSError as exc:
            if time.monotonic() > deadline:
                raise PhalanxError(f"cannot reach the coordinator at {host}:{port} to join "
                                   f"({exc}): check secure.coordinator") from None
            time.sleep(0.2)
    try:
        tls = context(None, "", server=False).wrap_socket(raw)
        if peer_fingerprint(tls) != coordinator_fp:
            raise PhalanxError(f"the server at {host}:{port} does not hold the coordinator key "
                               "the join token names: wrong address, or someone in between")
        left = max(0.1, deadline - time.monotonic())
        nonce = bytes.fromhex(str(read_message(tls, left).get("nonce", "")))
        key = serialization.load_pem_private_key(identity.key_path.read_bytes(), None)
        assert isinstance(key, ed25519.Ed25519PrivateKey)
        send_message(tls, {"token": secret.hex(), "stage": stage, "cert": identity.cert_pem,
                           "name": identity.cert_path.parent.name,
                           "proof": key.sign(_proof_message(nonce, secret)).hex()})
        answer = read_message(tls, max(0.1, deadline - time.monotonic()))
    except (OSError, ssl.SSLError, ChannelError, FrameError, ValueError) as exc:
        raise PhalanxError(f"joining at {host}:{port} failed ({type(exc).__name__}: {exc})"
                           ) from None
    finally:
        raw.close()
    if "error" in answer:
        raise PhalanxError(f"the coordinator refused the join: {answer['error']}")
    roster = parse_roster(answer.get("roster"), None, "the coordinator's roster")
    if roster.stage_of(identity.fingerprint) != stage:
        raise PhalanxError("the coordinator's roster does not admit this key after the join")
    return stage, roster


def admit(tls: ssl.SSLSocket, roster: Roster, where: object, timeout: float,
          on_admit: Callable[[Member], None]) -> None:
    """The coordinator's side of a join on an anonymous connection: check and bind, or refuse
    with a reason (logged, and told to the caller)."""
    nonce = os.urandom(NONCE_BYTES)
    try:
        send_message(tls, {"nonce": nonce.hex()})
        msg = read_message(tls, timeout)
        stage = msg.get("stage")
        if not isinstance(stage, int) or isinstance(stage, bool) or not 0 < stage < roster.size:
            raise PhalanxError(f"a join for stage {stage!r}, which is not a middle or last "
                               "stage of this roster")
        secret = bytes.fromhex(str(msg.get("token", "")))
        member = member_of(stage, str(msg.get("name", ""))[:200], str(msg.get("cert", "")))
        cert_key = x509.load_pem_x509_certificate(member.cert_pem.encode()).public_key()
        assert isinstance(cert_key, ed25519.Ed25519PublicKey)
        cert_key.verify(bytes.fromhex(str(msg.get("proof", ""))), _proof_message(nonce, secret))
        if roster.stage_of(member.fingerprint) not in (None, stage):
            raise PhalanxError("this key is already admitted for another stage")
        try:  # what every stage's TLS will load: it must load before anything is spent
            ssl.create_default_context().load_verify_locations(cadata=member.cert_pem)
        except ssl.SSLError:
            raise PhalanxError("the certificate does not load as a TLS trust anchor") from None
        roster.redeem(secret, stage)
        roster.admit(member)
        on_admit(member)
        roster.save()
        send_message(tls, {"roster": roster.public()})
        log.warning("stage 0 admitted a new key for stage %d (fingerprint %s...) by its join "
                    "token", stage, member.fingerprint[:16])
    except (PhalanxError, InvalidSignature, ValueError, TypeError, AssertionError) as exc:
        why = str(exc) or "the proof of the key does not verify"
        log.warning("stage 0 refused a join from %s: %s", where, why)
        try:
            send_message(tls, {"error": why})
        except OSError:
            pass
    except (OSError, ssl.SSLError, ChannelError, FrameError) as exc:
        log.warning("stage 0 refused a join from %s: %s", where, exc)
