"""The simulated enclave platform on disk: the vendor's key pair and the machine's sealing secret.

A platform folder holds ``vendor_key.pem`` (Ed25519, PKCS#8, mode 0600: what signs reports),
``vendor_public.pem`` (what a client pins; the only file a client needs) and ``sealing.key``
(32 random bytes, mode 0600). On real hardware the first and last live in the CPU and the
vendor's infrastructure; here they are files on the server's host, which can read them: the
simulation shows the protocol and its cost, not the isolation.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from phalanx.errors import ConfigError
from phalanx.split.enclave import SimulatedPlatform
from phalanx.split.envelope import KEY_SIZE

VENDOR_KEY, VENDOR_PUBLIC, SEALING_KEY = "vendor_key.pem", "vendor_public.pem", "sealing.key"
MAX_FILE = 64 * 1024


def new_platform(folder: Path) -> Path:
    """Create a platform in ``folder`` (which must not exist) atomically; returns it. Several
    processes may race to make the same folder: one wins, the others find it made."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        key = ed25519.Ed25519PrivateKey.generate()
        _write(tmp / VENDOR_KEY, key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()), 0o600)
        _write(tmp / VENDOR_PUBLIC, key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), 0o644)
        _write(tmp / SEALING_KEY, os.urandom(KEY_SIZE), 0o600)
        os.rename(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / VENDOR_PUBLIC).is_file():
            raise
    return folder


def ensure_platform(folder: Path) -> Path:
    """``folder``, made (atomically) if it does not exist yet."""
    return folder if Path(folder).is_dir() else new_platform(folder)


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _read(folder: Path, name: str) -> bytes:
    path = Path(folder) / name
    try:
        if path.stat().st_size > MAX_FILE:
            raise ConfigError(f"{path} is over {MAX_FILE} bytes: not a platform file")
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing: split.platform must name a folder made by "
                          "'phalanx split platform --out DIR'") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


def load_vendor_public(folder: Path) -> ed25519.Ed25519PublicKey:
    """The vendor key a client pins."""
    try:
        key = serialization.load_pem_public_key(_read(folder, VENDOR_PUBLIC))
    except ValueError as exc:
        raise ConfigError(f"{Path(folder) / VENDOR_PUBLIC} is not a PEM public key: "
                          f"{exc}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ConfigError(f"{Path(folder) / VENDOR_PUBLIC} is not an Ed25519 key")
    return key


def load_platform(folder: Path) -> SimulatedPlatform:
    """The server's simulated platform: its vendor key and sealing secret."""
    try:
        key = serialization.load_pem_private_key(_read(folder, VENDOR_KEY), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{Path(folder) / VENDOR_KEY} is not an unencrypted PEM private "
                          f"key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{Path(folder) / VENDOR_KEY} is not an Ed25519 key")
    secret = _read(folder, SEALING_KEY)
    if len(secret) != KEY_SIZE:
        raise ConfigError(f"{Path(folder) / SEALING_KEY} must hold {KEY_SIZE} bytes")
    return SimulatedPlatform(vendor_key=key, secret=secret)
