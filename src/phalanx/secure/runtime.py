"""This stage's links over the transport for untrusted networks, from its settings."""

from __future__ import annotations

from pathlib import Path

from phalanx.comm import Channel
from phalanx.errors import ConfigError
from phalanx.secure.config import SecureConfig
from phalanx.secure.identity import load_identity, load_roster
from phalanx.secure.join import join
from phalanx.secure.mesh import Mesh, parse_address
from phalanx.wire import DEFAULT_LIMITS, Limits


def secure_links(cfg: SecureConfig, rank: int, stages: int, timeout: float,
                 limits: Limits = DEFAULT_LIMITS
                 ) -> tuple[dict[int, Channel], Mesh]:
    """Load this stage's identity and the roster (or bind the identity with a join token),
    meet the other stages; the links, and the mesh (to close after them; its session and keys
    check signatures)."""
    if cfg.missing():
        raise ConfigError(f"pipeline.runtime=secure needs {', '.join(cfg.missing())}: see the "
                          "README's section on several hosts")
    identity = load_identity(cfg.key_dir(rank))
    if cfg.token:
        stage, roster = join(identity, cfg.token, parse_address(cfg.coordinator,
                                                                "secure.coordinator"), timeout)
        if stage != rank:
            raise ConfigError(f"the join token is for stage {stage}, but this process runs "
                              f"stage {rank}: set secure.stage={stage}")
        if roster.size != stages:
            raise ConfigError(f"the coordinator's roster has {roster.size} stages but "
                              f"pipeline.stages={stages}")
        if cfg.roster:
            roster.save(Path(cfg.roster).expanduser())
    else:
        roster = load_roster(cfg.roster, stages)
    mesh = Mesh(rank, identity, roster, cfg.coordinator, cfg.listen, cfg.advertise, timeout,
                sign=cfg.sign, encrypt=cfg.encrypt, limits=limits,
                reconnect_s=cfg.reconnect_s)
    return dict(mesh.connect()), mesh
