"""``privacy.report=true``: the run's own exposure, measured before it trains
(:mod:`phalanx.privacy.exposure`), printed and written to ``exposure.json`` in the run folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from phalanx.train.config import Config


def report_exposure(cfg: Config) -> list[dict]:
    """Measure, print and write the exposure of ``cfg``'s first training batch; nothing (and
    no model load) unless ``privacy.report``."""
    if not cfg.privacy.report:
        return []
    from phalanx.data import build_data
    from phalanx.models.loading import cache_root
    from phalanx.models.stages import blocks_of, resolve_bounds
    from phalanx.privacy.exposure import lines, measure, untrusted_cuts
    from phalanx.train.setup import bounds_of, load_prepared

    p = cfg.privacy
    loaded = load_prepared(cfg)
    layers = len(blocks_of(loaded.model, loaded.family))
    bounds = resolve_bounds(layers, cfg.pipeline.stages, bounds_of(cfg, loaded))
    cuts = untrusted_cuts(bounds, cfg.split.cut if cfg.split.active else None)
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc: dict = {"cuts": [], "model": cfg.model.name}
    if not cuts:
        print("privacy: no stage outside the data owner's receives hidden states in this run",
              file=sys.stderr)
    else:
        cuts = cuts[:1] if p.cuts == "first" else cuts
        data = build_data(cfg.data, loaded.tokenizer)
        ids = data.batch(0, min(p.sequences, data.train.shape[0]))[:, :p.tokens]
        rows = measure(loaded.model, loaded.family, ids, cuts,
                       anchor=int(loaded.tokenizer.eos_id or 0), budget=p.budget,
                       cache_dir=cache_root(cfg.model) / "privacy",
                       progress=lambda s: print(f"privacy: {s}", file=sys.stderr, flush=True))
        doc["cuts"] = rows
        for line in lines(rows):
            print(line, file=sys.stderr)
        if cfg.split.active and cfg.split.enclave != "none":
            print("privacy: (the server's host sees ciphertext; this is what the attested "
                  "enclave code itself receives)", file=sys.stderr)
    (out / "exposure.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"privacy: exposure written to {out / 'exposure.json'}", file=sys.stderr)
    return doc["cuts"]
