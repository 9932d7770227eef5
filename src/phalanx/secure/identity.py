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


class Roster:
    """The data owner's list of admitted stages, one pinned certificate each."""

    def __init__(self, members: list[Member]) -> None:
        self.members = {m.stage: m for m in members}
        self.by_fingerprint = {m.fingerprint: m for m in members}

    @property
    def size(self) -> int:
        return len(self.members)

    def trusted_pem(self) -> str:
        """Every admitted certificate: the TLS trust anchors."""
        return "".join(m.cert_pem for m in self.members.values())

    def stage_of(self, fp: str) -> int | None:
        m = self.by_fingerprint.get(fp)
        return None if m is None else m.stage

    def save(self, path: Path) -> None:
        data = {"format": "phalanx-roster-1", "stages": [
            {"stage": m.stage, "name": m.name, "cert": m.cert_pem}
            for m in sorted(self.members.values(), key=lambda m: m.stage)]}
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)


def roster_of(identities: list[tuple[str, str]]) -> Roster:
    """A roster admitting, for stage i, the certificate ``identities[i] = (name, cert_pem)``."""
    members = []
    for i, (name, pem) in enumerate(identities):
        cert = x509.load_pem_x509_certificate(pem.encode())
        members.append(Member(i, name, pem, fingerprint(cert)))
    return Roster(members)


def load_roster(path: str | Path, stages: int | None = None) -> Roster:
    """Parse and check a roster file: stages 0..N-1 once each, Ed25519 certificates, no key
    admitted twice."""
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text())
        entries = data["stages"]
        if data.get("format") != "phalanx-roster-1" or not isinstance(entries, list):
            raise ValueError("not a phalanx roster")
        members = []
        for e in entries:
            cert = x509.load_pem_x509_certificate(str(e["cert"]).encode())
            members.append(Member(int(e["stage"]), str(e.get("name", "")), str(e["cert"]),
                                  fingerprint(cert)))
    except FileNotFoundError:
        raise PhalanxError(f"roster {p} does not exist: write one with `phalanx keys roster`"
                           ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PhalanxError(f"roster {p} does not parse ({type(exc).__name__}: {exc}): write it "
                           "with `phalanx keys roster`") from None
    indices = sorted(m.stage for m in members)
    if indices != list(range(len(members))):
        raise PhalanxError(f"roster {p} must admit stages 0..N-1 once each, got {indices}")
    if len({m.fingerprint for m in members}) != len(members):
        raise PhalanxError(f"roster {p} admits one key for two stages: give each its own key")
    if stages is not None and len(members) != stages:
        raise PhalanxError(f"roster {p} admits {len(members)} stages but pipeline.stages="
                           f"{stages}")
    return Roster(members)
