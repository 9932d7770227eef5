"""The server's stage in an attested enclave during a split run (``split.enclave=simulated``).

- The server's process loads its stage into an enclave, which measures its code and initial
  weights (:data:`ENCLAVE_CODE`, the stage's state dict).
- Each client stage pins the vendor's key and the expected measurement: ``split.measurement``,
  else the measurement of its own copy of the server's stage, built from the public weights
  and the run's seed exactly as an honest server builds it. It sends a fresh nonce and nothing
  else until the report verifies (:mod:`phalanx.split.link`).
- Every frame between a client stage and the server is then end to end encrypted between the
  client and the enclave; the server's checkpoints are sealed (:class:`SealedStore`), so its
  trained parameters leave the enclave only sealed to its measurement on its platform.

The wrap hook puts the session link right on the transport (inside any attacker's or
defense's wrapper): what a stage's code sends is encrypted, and what the network or the
server's host does to it is caught.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import phalanx.models.stages
import phalanx.pipeline.optim
import phalanx.pipeline.worker
import phalanx.split.enclave
import phalanx.split.envelope
import phalanx.split.freivalds
import phalanx.split.link
import phalanx.split.lora
import phalanx.split.masking
import phalanx.split.outsource
import phalanx.split.parts
import phalanx.split.ptuning
import phalanx.split.spf
from phalanx.comm import Channel
from phalanx.models.stages import StageModule
from phalanx.split.attest import CodePart, measure
from phalanx.split.config import SERVER, SplitConfig
from phalanx.split.enclave import Enclave, SimulatedEnclave
from phalanx.split.link import ClientLink, EnclaveLink, SessionLink, open_links
from phalanx.split.platform import ensure_platform, load_platform, load_vendor_public

ENCLAVE_CODE: tuple[CodePart, ...] = (
    phalanx.models.stages, phalanx.pipeline.worker, phalanx.pipeline.optim, phalanx.split.link,
    phalanx.split.enclave, phalanx.split.envelope, phalanx.split.parts, phalanx.split.lora,
    phalanx.split.ptuning, phalanx.split.spf, phalanx.split.masking, phalanx.split.outsource,
    phalanx.split.freivalds,
)
"""The code the enclave runs, as measured: what computes the stage, trains it, and guards it."""


def measure_stage(stage: nn.Module) -> bytes:
    """The measurement of an enclave holding ``stage`` as it is now (its initial weights)."""
    return measure(ENCLAVE_CODE, stage.state_dict())


def platform_dir(split: SplitConfig, out_dir: str) -> Path:
    """``split.platform``, else a platform made for this one-host run under ``out_dir``."""
    if split.platform:
        return Path(split.platform).expanduser()
    return ensure_platform(Path(out_dir) / "platform")


class SealedStore:
    """Checkpoint files of the enclave's stage: sealed to its measurement and platform."""

    suffix = ".sealed"

    def __init__(self, enclave: Enclave, stage: int) -> None:
        self.enclave, self.label = enclave, f"phalanx checkpoint stage {stage}"

    def dump(self, tensors: dict[str, torch.Tensor]) -> bytes:
        return self.enclave.seal(label=self.label, state=tensors)

    def load(self, data: bytes) -> dict[str, torch.Tensor]:
        return self.enclave.unseal(data, label=self.label)


class EnclaveWiring:
    """The enclave of this process's server stage (if it runs one) and the session links of
    its stages to the other side."""

    def __init__(self, split: SplitConfig, platform: Path, *, server: StageModule | None,
                 reference: nn.Module | None) -> None:
        """``server``: the server's stage when this process runs it (loaded into the enclave
        now, before anything changes its weights); ``reference``: the client's own copy of
        the server's initial stage, measured now when ``split.measurement`` is empty (a
        process without client stages needs neither)."""
        self.clients = split.clients
        self.enclave: SimulatedEnclave | None = None
        self.measurement = (bytes.fromhex(split.measurement) if split.measurement
                            else measure_stage(reference) if reference is not None else None)
        if server is not None:
            self.enclave = SimulatedEnclave(load_platform(platform))
            self.enclave.load(server, code=ENCLAVE_CODE)
        self._platform = platform
        self.links: list[SessionLink] = []

    def wrap(self, stage: StageModule, channels: dict[int, Channel]) -> dict[int, Channel]:
        """Session links on the client-server links of ``stage``."""
        device = next(stage.parameters()).device
        out = dict(channels)
        if stage.index == SERVER:
            if self.enclave is None:
                raise ValueError("the server's stage must be given to the wiring that wraps it")
            for peer in self.clients:
                out[peer] = self._keep(EnclaveLink(channels[peer], self.enclave, device))
        elif stage.index in self.clients and SERVER in channels:
            if self.measurement is None:
                raise ValueError("a client stage needs split.measurement or the server's "
                                 "initial stage to measure")
            vendor = load_vendor_public(self._platform)
            out[SERVER] = self._keep(ClientLink(channels[SERVER], vendor_key=vendor,
                                                measurement=self.measurement, device=device))
        return out

    def _keep(self, link: SessionLink) -> SessionLink:
        self.links.append(link)
        return link

    def open(self, timeout: float | None) -> None:
        """Finish every handshake of this process (before the first iteration)."""
        open_links(self.links, timeout)

    def stores(self) -> dict[int, SealedStore]:
        """The sealed checkpoint store of the server's stage, where this process runs it."""
        return {SERVER: SealedStore(self.enclave, SERVER)} if self.enclave is not None else {}

    def cost(self) -> dict[str, float]:
        """What the machinery cost in this process: attestation, session crypto, sealing."""
        out = {"crypto_s": sum(link.crypto_s for link in self.links)}
        if self.enclave is not None:
            c = self.enclave.cost
            out.update(attest_s=c.attest_s, seal_s=c.seal_s, sealed_bytes=c.sealed_bytes)
        return out


def sealed_suffixes(split: SplitConfig) -> dict[int, str]:
    """The checkpoint file suffix of every stage whose file is sealed."""
    return {SERVER: SealedStore.suffix} if split.enclave != "none" else {}

