"""A single-host run over the secure transport: throwaway identities and a roster for every
stage, so ``phalanx train pipeline.runtime=secure`` needs no set-up on one machine."""

from __future__ import annotations

from pathlib import Path

from phalanx.secure.identity import new_identity, roster_of


def local_identities(directory: Path, stages: int) -> list[str]:
    """Create ``stage_<i>`` identities and ``roster.json`` in ``directory``; return the
    overrides that point every stage process at them."""
    ids = [new_identity(directory / f"stage_{i}", f"stage {i}") for i in range(stages)]
    roster_of([(f"stage {i}", x.cert_pem) for i, x in enumerate(ids)]).save(
        directory / "roster.json")
    return [f'secure.key="{directory}/stage_{{rank}}"', f'secure.roster="{directory}/roster.json"']
