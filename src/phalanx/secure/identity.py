"""Identities and the roster: who may take part in a run, pinned by public key.

Every participant (the data owner's stages 0 and N-1, each compute provider's stage) has an
Ed25519 key and a self-signed X.509 certificate for it (``phalanx keys new``). The data owner's
roster (``phalanx keys roster``) lists, per stage, the one certificate admitted for it. A TLS
1.3 handshake then authenticates both ends against the roster before any frame byte is read,
and the connection is bound to the stage whose pinned key signed it. A key that is not in the
roster fails the handshake; removing a stage's entry revokes it. Private keys are written
``0600`` and never logged, put in configs, metrics or checkpoints: configs name their files.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from phalanx.errors import PhalanxError

KEY_FILE, CERT_FILE = "key.pem", "cert.pem"
VALID_DAYS = 365
ROSTER_FORMAT = "phalanx-roster-1"
TOKEN_BYTES = 32


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's raw Ed25519 public key: what the roster pins."""
    key = cert.public_key()
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise PhalanxError("a phalanx certificate must hold an Ed25519 key")
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class Identity:
    """A participant's key pair: the private key's file and the certificate."""

    key_path: Path
    cert_path: Path
    cert_pem: str
    fingerprint: str

    def __repr__(self) -> str:  # never print key material
        return f"Identity({self.cert_path}, fingerprint={self.fingerprint[:16]}...)"


def new_identity(directory: Path, name: str) -> Identity:
    """Create a key and its self-signed certificate in ``directory`` (refuses to overwrite)."""
    directory.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = directory / KEY_FILE, directory / CERT_FILE
    if key_path.exists():
        raise PhalanxError(f"{key_path} already exists: an identity is never overwritten; "
                           "choose another folder or remove it yourself")
    key = ed25519.Ed25519PrivateKey.generate()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, None))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    cert_path.write_text(pem)
    return Identity(key_path, cert_path, pem, fingerprint(cert))


def load_identity(directory: str | Path) -> Identity:
    """The identity in ``directory``; a one-line error naming the fix if it is unusable."""
    d = Path(directory).expanduser()
    key_path, cert_path = d / KEY_FILE, d / CERT_FILE
    for p in (key_path, cert_path):
        if not p.is_file():
            raise PhalanxError(f"{p} is missing: create an identity with `phalanx keys new "
                               f"--out {d}` (or point secure.key at the folder that has one)")
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise PhalanxError(f"the identity in {d} is unreadable ({type(exc).__name__}): create "
                           "a new one with `phalanx keys new`") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise PhalanxError(f"{key_path} is not an Ed25519 key")
    mine = key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)
    if hashlib.sha256(mine).hexdigest() != fingerprint(cert):
        raise PhalanxError(f"{cert_path} does not belong to the key {key_path}")
    return Identity(key_path, cert_path, cert.public_bytes(serialization.Encoding.PEM).decode(),
                    fingerprint(cert))


@dataclass(frozen=True)
class Member:
    """One admitted participant."""

    stage: int
    name: str
    cert_pem: str
    fingerprint: str


@dataclass
class Token:
    """A one-time join token for ``stage``: only its SHA-256 is kept (``phalanx keys token``)."""

    stage: int
    sha256: str
    used: bool = False


def member_of(stage: int, name: str, cert_pem: str) -> Member:
    """The member admitted by ``cert_pem``; only its first certificate, as written anew
    (anything else in the text, another PEM block say, never reaches a trust store)."""
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    clean = cert.public_bytes(serialization.Encoding.PEM).decode()
    return Member(stage, name, clean, fingerprint(cert))


class Roster:
    """The data owner's list of admitted stages, one pinned certificate each, and the
    one-time tokens that let a new key bind itself to a stage (an open slot, or a stage whose
    old key it then replaces)."""

    def __init__(self, members: list[Member], tokens: list[Token] | None = None,
                 path: Path | None = None) -> None:
        self.members = {m.stage: m for m in members}
        self.tokens = list(tokens or [])
        self.path = path  # where it is kept: a bound token is written back at once
        self._index()

    def _index(self) -> None:
        self.by_fingerprint = {m.fingerprint: m for m in self.members.values()}

    @property
    def size(self) -> int:
        return len(set(self.members) | {t.stage for t in self.tokens})

    def trusted_pem(self) -> str:
        """Every admitted certificate: the TLS trust anchors."""
        return "".join(m.cert_pem for m in self.members.values())

    def stage_of(self, fp: str) -> int | None:
        m = self.by_fingerprint.get(fp)
        return None if m is None else m.stage

    def admit(self, member: Member) -> None:
        """Pin ``member`` for its stage (the stage's previous key, if any, is revoked)."""
        if self.by_fingerprint.get(member.fingerprint, member).stage != member.stage:
            raise PhalanxError("this key is already admitted for another stage: a key serves "
                               "one stage")
        self.members[member.stage] = member
        self._index()

    def redeem(self, secret: bytes, stage: int) -> Token:
        """Mark the token whose secret is ``secret`` used, if it is for ``stage`` and unused."""
        digest = hashlib.sha256(secret).hexdigest()
        for t in self.tokens:
            if hmac.compare_digest(t.sha256, digest):
                if t.stage != stage:
                    raise PhalanxError(f"this join token is for stage {t.stage}, not {stage}")
                if t.used:
                    raise PhalanxError(f"the join token for stage {stage} was already used: "
                                       "ask the data owner for a new one (phalanx keys token)")
                t.used = True
                return t
        raise PhalanxError("the join token is not in the coordinator's roster: ask the data "
                           "owner for a token (phalanx keys token)")

    def new_token(self, stage: int) -> bytes:
        """A fresh one-time secret for ``stage`` (only its hash is kept)."""
        secret = os.urandom(TOKEN_BYTES)
        self.tokens.append(Token(stage, hashlib.sha256(secret).hexdigest()))
        return secret

    def public(self) -> dict:
        """The roster without its tokens: what the coordinator tells the stages."""
        return {"format": ROSTER_FORMAT, "stages": [
            {"stage": m.stage, "name": m.name, "cert": m.cert_pem}
            for m in sorted(self.members.values(), key=lambda m: m.stage)]}

    def save(self, path: Path | None = None) -> None:
        path = path or self.path
        if path is None:
            return
        data = self.public()
        data["tokens"] = [{"stage": t.stage, "sha256": t.sha256, "used": t.used}
                          for t in self.tokens]
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)


def roster_of(identities: list[tuple[str, str]]) -> Roster:
    """A roster admitting, for stage i, the certificate ``identities[i] = (name, cert_pem)``."""
    return Roster([member_of(i, name, pem) for i, (name, pem) in enumerate(identities)])


def parse_roster(data: object, stages: int | None = None, where: str = "the roster",
                 path: Path | None = None) -> Roster:
    """Check a roster's JSON: stages 0..N-1 each with a certificate or an unused join token,
    stage 0's certificate given (it is the coordinator), Ed25519 keys, none admitted twice."""
    try:
        if not isinstance(data, dict) or data.get("format") != ROSTER_FORMAT:
            raise ValueError("not a phalanx roster")
        entries, raw_tokens = data["stages"], data.get("tokens", [])
        if not isinstance(entries, list) or not isinstance(raw_tokens, list):
            raise ValueError("stages and tokens must be lists")
        members = [member_of(int(e["stage"]), str(e.get("name", "")), str(e["cert"]))
                   for e in entries]
        tokens = [Token(int(t["stage"]), str(t["sha256"]), bool(t.get("used", False)))
                  for t in raw_tokens]
    except (ValueError, KeyError, TypeError, AttributeError, PhalanxError) as exc:
        raise PhalanxError(f"{where} does not parse ({type(exc).__name__}: {exc}): write it "
                           "with `phalanx keys roster`") from None
    roster = Roster(members, tokens, path)
    if len(members) != len(roster.members):
        raise PhalanxError(f"{where} admits a stage twice: one key per stage")
    open_slots = {t.stage for t in tokens if not t.used}
    indices = sorted(set(roster.members) | open_slots)
    if indices != list(range(len(indices))) or 0 not in roster.members:
        raise PhalanxError(f"{where} must admit stages 0..N-1, each by a certificate or an "
                           f"unused join token, and stage 0 by its certificate; got {indices}")
    if len(roster.by_fingerprint) != len(members):
        raise PhalanxError(f"{where} admits one key for two stages: give each its own key")
    if stages is not None and len(indices) != stages:
        raise PhalanxError(f"{where} admits {len(indices)} stages but pipeline.stages={stages}")
    return roster


def load_roster(path: str | Path, stages: int | None = None) -> Roster:
    """Read and check a roster file (:func:`parse_roster`)."""
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise PhalanxError(f"roster {p} does not exist: write one with `phalanx keys roster`"
                           ) from None
    except (OSError, ValueError) as exc:
        raise PhalanxError(f"roster {p} does not parse ({type(exc).__name__}: {exc}): write it "
                           "with `phalanx keys roster`") from None
    return parse_roster(data, stages, f"roster {p}", p)
