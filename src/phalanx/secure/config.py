"""Settings of the transport for untrusted networks (``pipeline.runtime=secure``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from phalanx.errors import ConfigError


@dataclass(kw_only=True)
class SecureConfig:
    """Where this stage's identity and the roster are, and how the stages meet.

    ``key`` and ``roster`` name files (never key material); ``{rank}`` in ``key`` is replaced by
    the stage index, so one command line can serve every stage of a single-host run.
    """

    key: str = ""  # folder with this stage's key.pem and cert.pem (phalanx keys new)
    roster: str = ""  # the data owner's roster file (phalanx keys roster)
    coordinator: str = ""  # host:port where stage 0 listens
    listen: str = "127.0.0.1:0"  # host:port where this stage listens (port 0: any)
    advertise: str = ""  # host:port the others dial, if not the listen address (NAT)
    stage: int = -1  # the stage this process runs; -1: from the launcher's RANK
    encrypt: bool = True  # false: TLS authenticates, then frames travel in the clear
    sign: bool = True  # sign every frame (accountability); false only to measure its cost
    token: str = ""  # a join token (or its file) that binds this stage's new key at the start
    reconnect_s: float = 30.0  # how long a broken link waits for its peer to come back


    def rank(self) -> int:
        if self.stage >= 0:
            return self.stage
        if "RANK" not in os.environ:
            raise ConfigError("secure.stage is not set: give the stage this process runs, "
                              "e.g. secure.stage=2")
        return int(os.environ["RANK"])

    def key_dir(self, rank: int) -> str:
        return self.key.replace("{rank}", str(rank))

    def validate(self, runtime: str) -> None:
        """Addresses parse; the files are checked when the stage loads them."""
        if runtime != "secure":
            return
        from phalanx.secure.mesh import parse_address

        for key in ("coordinator", "listen", "advertise"):
            value = getattr(self, key)
            if value:
                parse_address(value, f"secure.{key}")
        if not 0 <= self.reconnect_s <= 3600:
            raise ConfigError(f"secure.reconnect_s={self.reconnect_s} must be in [0, 3600] "
                              "seconds (0: a broken link is not resumed)")

    def missing(self) -> list[str]:
        """The settings a stage process needs that are not given."""
        need = ("key", "coordinator") if self.token else ("key", "roster", "coordinator")
        return [f"secure.{k}" for k in need if not getattr(self, k)]
