"""This stage's links over the transport for untrusted networks, from its settings."""

from __future__ import annotations

from phalanx.comm import Channel
from phalanx.errors import ConfigError
from phalanx.secure.config import SecureConfig
from phalanx.secure.identity import load_identity, load_roster
from phalanx.secure.mesh import Mesh
from phalanx.wire import DEFAULT_LIMITS, Limits


def secure_links(cfg: SecureConfig, rank: int, stages: int, timeout: float,
                 limits: Limits = DEFAULT_LIMITS) -> dict[int, Channel]:
    """Load this stage's identity and the roster, meet the other stages, return the links."""
    if cfg.missing():
        raise ConfigError(f"pipeline.runtime=secure needs {', '.join(cfg.missing())}: see the "
                          "README's section on several hosts")
    identity = load_identity(cfg.key_dir(rank))
    roster = load_roster(cfg.roster, stages)
    mesh = Mesh(rank, identity, roster, cfg.coordinator, cfg.listen, cfg.advertise, timeout,
                sign=cfg.sign, encrypt=cfg.encrypt, limits=limits)
    return dict(mesh.connect())
