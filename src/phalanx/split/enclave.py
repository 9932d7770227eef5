"""The enclave of secure split fine-tuning: an interface and a simulated backend.

An :class:`Enclave` holds the trusted part of a split model (an ``nn.Module``: the server's
latter layers and their trainable parameters). Its calls:

- :meth:`~Enclave.load` takes the module and its code identity and measures them
  (:func:`phalanx.split.attest.measure`);
- :meth:`~Enclave.attest` answers a client's fresh nonce with a signed report binding the
  measurement, the nonce and a key-exchange key generated inside; the client verifies it
  (:func:`phalanx.split.attest.verify_report`) and sends back its own public key
  (:meth:`~Enclave.open_session`): both sides now hold the same session key;
- :meth:`~Enclave.run` calls the module; :meth:`~Enclave.run_encrypted` does so on a request
  encrypted under the session key and encrypts the reply, so the host sees only ciphertext;
- :meth:`~Enclave.seal` / :meth:`~Enclave.unseal`: parameters leave the enclave only sealed,
  under a key derived inside from the platform's secret and the measurement
  (:mod:`phalanx.split.envelope`), so another enclave build or machine cannot open them;
- :attr:`~Enclave.cost` counts attestations, bytes sealed and seconds spent on each.

A backend supplies three hooks: ``_measure`` (the measurement), ``_quote`` (the signed report)
and ``_sealing_key``. :class:`SimulatedEnclave` runs in-process for correctness and cost
measurement; it protects nothing.

Real backends (described, not implemented) plug in behind the same calls:

- **SGX via Gramine.** The whole Python process runs in the enclave. The manifest lists the
  interpreter, phalanx's sources and the initial weights as ``sgx.trusted_files`` with their
  SHA-256; ``gramine-sgx-sign`` folds them into MRENCLAVE, the hardware measurement the client
  pins (with MRSIGNER, the product id and SVN, and debug off). ``_quote`` writes 64 bytes of
  report data to ``/dev/attestation/user_report_data`` (here SHA-512 of the report body:
  software measurement, nonce and the enclave's X25519 key) and reads the DCAP quote from
  ``/dev/attestation/quote``; the client verifies it against Intel's collateral (not a pinned
  Ed25519 key), checks MRENCLAVE and the TCB status, then the report data, and calls
  :func:`~phalanx.split.attest.derive_session_key` as here. ``_sealing_key`` derives from
  ``/dev/attestation/keys/_sgx_mrenclave`` (a key only this MRENCLAVE on this CPU obtains).
- **Intel TDX.** A whole confidential VM: MRTD measures the initial TD image and RTMR0-3 the
  firmware, kernel, command line and what the guest extends (phalanx's code and weights: extend
  an RTMR with :func:`~phalanx.split.attest.measure`). ``_quote`` asks for a TD quote with the
  same 64-byte REPORTDATA (configfs-tsm ``/sys/kernel/config/tsm/report`` or the
  ``/dev/tdx_guest`` ioctl); the client verifies it with Intel's quote verification and pins
  MRTD and the RTMRs. TDX has no hardware sealing key: ``_sealing_key`` comes from a key broker
  that releases it only to a TD whose quote it verified.
- **Confidential GPUs (NVIDIA H100 in CC mode).** The GPU works for a CPU confidential VM (TDX
  or SEV-SNP) through encrypted bounce buffers. The GPU's attestation report, signed by a
  device key chaining to NVIDIA's root and taking the client's nonce, is verified with the
  NVIDIA attestation SDK (local verifier) or NVIDIA's remote attestation service (NRAS)
  against NVIDIA's reference measurements; the client checks both the VM's quote and the GPU's
  report, bound to the same nonce, before it derives the session key.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from torch import nn

from phalanx.errors import PhalanxError
from phalanx.split.attest import (
    CLIENT_NONCE_SIZE,
    CodePart,
    Report,
    derive_session_key,
    measure,
    public_bytes,
    sign_report,
)
from phalanx.split.envelope import (
    DEFAULT_PACK_LIMITS,
    KEY_SIZE,
    PackLimits,
    Session,
    seal_tensors,
    unseal_tensors,
)

_SEALING_TAG = b"phalanx-sealing-key-1"


MAX_PENDING = 16  # attestations awaiting their session at once


class EnclaveError(PhalanxError):
    """An enclave call made out of order: nothing loaded, no attestation, no session."""


@dataclass(kw_only=True)
class EnclaveCost:
    """What the enclave's protections cost: counts, bytes, and seconds of wall-clock time."""

    attestations: int = 0
    attest_s: float = 0.0
    seals: int = 0
    sealed_bytes: int = 0  # bytes of the sealed blobs produced
    seal_s: float = 0.0
    unseals: int = 0
    unsealed_bytes: int = 0  # bytes of the sealed blobs opened
    unseal_s: float = 0.0
    runs: int = 0  # plain and encrypted calls
    run_s: float = 0.0  # in the module
    session_bytes: int = 0  # encrypted requests and replies
    session_s: float = 0.0  # decrypting requests and encrypting replies


class Enclave(ABC):
    """A trusted execution environment holding the trusted part of a split model; a backend
    implements the hooks ``_measure``, ``_quote`` and ``_sealing_key``."""

    def __init__(self, *, limits: PackLimits = DEFAULT_PACK_LIMITS) -> None:
        self.cost = EnclaveCost()
        self._limits = limits
        self._module: nn.Module | None = None
        self._measurement: bytes | None = None
        self._pending: dict[bytes, tuple[x25519.X25519PrivateKey, bytes]] = {}
        self._session: Session | None = None

    def __repr__(self) -> str:  # never print keys or weights
        m = self._measurement.hex()[:16] + "..." if self._measurement else None
        return f"{type(self).__name__}(measurement={m})"

    @abstractmethod
    def _measure(self, module: nn.Module, code: Sequence[CodePart]) -> bytes:
        """The measurement of ``module`` (initial weights) and ``code``."""

    @abstractmethod
    def _quote(self, report: Report) -> bytes:
        """The report's bytes as the platform vouches for them."""

    @abstractmethod
    def _sealing_key(self) -> bytes:
        """A 32-byte key only this measurement on this platform obtains."""

    def load(self, module: nn.Module, *, code: Sequence[CodePart]) -> bytes:
        """Take the trusted module (with its initial weights) and its code identity; return
        the measurement. Ends any attestation or session of a previous load."""
        self._measurement = self._measure(module, code)
        self._module = module
        self._pending, self._session = {}, None
        return self._measurement

    @property
    def measurement(self) -> bytes:
        """The measurement of what :meth:`load` took."""
        if self._measurement is None:
            raise EnclaveError("nothing is loaded in the enclave: call load first")
        return self._measurement

    def _loaded(self) -> nn.Module:
        if self._module is None:
            raise EnclaveError("nothing is loaded in the enclave: call load first")
        return self._module

    def attest(self, nonce: bytes) -> bytes:
        """A report bound to the client's fresh ``nonce`` and to a key-exchange key generated
        inside for this attestation. At most :data:`MAX_PENDING` attestations await their
        session at once (one per client link); a nonce seen before is refused."""
        if not isinstance(nonce, bytes) or len(nonce) != CLIENT_NONCE_SIZE:
            raise EnclaveError(f"a client nonce is {CLIENT_NONCE_SIZE} random bytes")
        if nonce in self._pending or len(self._pending) >= MAX_PENDING:
            raise EnclaveError("this nonce already awaits a session, or too many attestations "
                               f"do (at most {MAX_PENDING})")
        start = time.perf_counter()
        key = x25519.X25519PrivateKey.generate()
        enclave_public = public_bytes(key.public_key())
        report = self._quote(Report(measurement=self.measurement, nonce=nonce,
                                    enclave_public=enclave_public))
        self._pending[nonce] = (key, enclave_public)
        self.cost.attestations += 1
        self.cost.attest_s += time.perf_counter() - start
        return report

    def open_session(self, client_public: bytes, *, nonce: bytes | None = None) -> Session:
        """Derive the session of the attestation that answered ``nonce`` (default: the only
        one pending) with the client's public key; each attestation opens at most one session.
        The session is returned and kept for :meth:`run_encrypted`."""
        if nonce is None and len(self._pending) == 1:
            nonce = next(iter(self._pending))
        if nonce is None or nonce not in self._pending:
            raise EnclaveError("no attestation awaits this session: call attest first")
        key, enclave_public = self._pending.pop(nonce)
        start = time.perf_counter()
        session_key = derive_session_key(key, client_public, nonce=nonce,
                                         measurement=self.measurement,
                                         enclave_public=enclave_public,
                                         client_public=client_public)
        self._session = Session(session_key, role="enclave", limits=self._limits)
        self.cost.attest_s += time.perf_counter() - start
        return self._session

    def seal(self, *, label: str, state: Mapping[str, torch.Tensor] | None = None) -> bytes:
        """Seal ``state`` (default: the module's state dict) under the sealing key, bound to
        the measurement and ``label``."""
        tensors = self._loaded().state_dict() if state is None else state
        start = time.perf_counter()
        blob = seal_tensors(tensors, key=self._sealing_key(), measurement=self.measurement,
                            label=label)
        self.cost.seals += 1
        self.cost.sealed_bytes += len(blob)
        self.cost.seal_s += time.perf_counter() - start
        return blob

    def unseal(self, blob: bytes | bytearray | memoryview, *, label: str
               ) -> dict[str, torch.Tensor]:
        """Open a blob sealed by an enclave of the same measurement on this platform under
        ``label``; raises :class:`~phalanx.split.envelope.SealError` otherwise."""
        start = time.perf_counter()
        tensors = unseal_tensors(blob, key=self._sealing_key(), measurement=self.measurement,
                                 label=label, limits=self._limits)
        self.cost.unseals += 1
        self.cost.unsealed_bytes += len(blob)
        self.cost.unseal_s += time.perf_counter() - start
        return tensors

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Call the trusted module; the host gets what it returns (use this only for inputs
        and outputs the host may see, e.g. masked ones)."""
        module = self._loaded()
        start = time.perf_counter()
        out = module(*args, **kwargs)
        self.cost.runs += 1
        self.cost.run_s += time.perf_counter() - start
        return out

    def run_encrypted(self, request: bytes | bytearray | memoryview) -> bytes:
        """Decrypt a session request (a tensor dict: the module's keyword arguments), run the
        module without autograd, and return its output (a tensor, as ``"output"``, or a dict of
        tensors) encrypted for the client."""
        if self._session is None:
            raise EnclaveError("no session is open: attest, verify, then open_session")
        start = time.perf_counter()
        inputs = self._session.decrypt(request)
        spent = time.perf_counter() - start
        with torch.no_grad():
            out = self.run(**inputs)
        outputs = {"output": out} if isinstance(out, torch.Tensor) else out
        if not isinstance(outputs, Mapping) or not all(
                isinstance(t, torch.Tensor) for t in outputs.values()):
            raise EnclaveError("an encrypted call's module must return a tensor or a dict of "
                               f"tensors, not {type(out).__name__}")
        start = time.perf_counter()
        reply = self._session.encrypt(outputs)
        self.cost.session_s += spent + time.perf_counter() - start
        self.cost.session_bytes += len(request) + len(reply)
        return reply


class SimulatedPlatform:
    """A simulated TEE vendor and machine: the vendor's signing key (clients pin its public
    half) and the machine's sealing secret. Both live in this process, in the clear."""

    def __init__(self, *, vendor_key: ed25519.Ed25519PrivateKey | None = None,
                 secret: bytes | None = None) -> None:
        self._vendor_key = vendor_key or ed25519.Ed25519PrivateKey.generate()
        self._secret = os.urandom(KEY_SIZE) if secret is None else secret
        if len(self._secret) < KEY_SIZE:
            raise EnclaveError(f"a platform secret has at least {KEY_SIZE} bytes")

    def __repr__(self) -> str:  # never print key material
        return f"SimulatedPlatform(vendor={public_bytes(self.vendor_public).hex()[:16]}...)"

    @property
    def vendor_public(self) -> ed25519.Ed25519PublicKey:
        """The key a client pins to verify this vendor's reports."""
        return self._vendor_key.public_key()

    def quote(self, report: Report) -> bytes:
        """The report signed by the vendor key."""
        return sign_report(report, self._vendor_key)

    def sealing_key(self, measurement: bytes) -> bytes:
        """HKDF-SHA256 of the platform secret for ``measurement``."""
        hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None,
                    info=_SEALING_TAG + measurement)
        return hkdf.derive(self._secret)


class SimulatedEnclave(Enclave):
    """An enclave simulated in-process, for correctness and cost measurement.

    It protects nothing: the module, its weights, the session and sealing keys and the
    platform's vendor key all live in the host's process, which can read or change them. The
    protocol (measurement, signed reports bound to nonce and key, the session, sealed blobs)
    and its costs are real; the isolation is not.
    """

    def __init__(self, platform: SimulatedPlatform, *,
                 limits: PackLimits = DEFAULT_PACK_LIMITS) -> None:
        super().__init__(limits=limits)
        self.platform = platform

    def _measure(self, module: nn.Module, code: Sequence[CodePart]) -> bytes:
        return measure(code, module.state_dict())

    def _quote(self, report: Report) -> bytes:
        return self.platform.quote(report)

    def _sealing_key(self) -> bytes:
        return self.platform.sealing_key(self.measurement)
