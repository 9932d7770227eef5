"""A run's metrics turned into one row of results: attacked, detected and attributed
iterations, false alerts, redos, the validation curve (shared by the robustness, detection and
adaptive experiments)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    attack: str  # clean | sign_flip | gaussian
    rate: float
    defense: str  # none | restart | skip

    @property
    def name(self) -> str:
        return "clean" if self.attack == "clean" and self.defense == "none" else \
            f"{self.attack}-p{self.rate:g}-{self.defense}"


def attempts(records: list[dict]) -> list[dict]:
    """Every iteration attempt of a run (redone ones included), in order."""
    out = []
    for r in records:
        out += r.get("redone", [])
        out.append(r)
    return out


def left_out(tries: list[dict]) -> list[set[int]]:
    """For each attempt, the stages its plan left out of the data path (what the attempt
    before it decided: ``next``)."""
    out, current = [], set()
    for t in tries:
        out.append(current)
        nxt = t.get("next", {})
        current = set(nxt.get("bypassed", [])) | set(nxt.get("repaired", []))
    return out


def score(cell: Cell, records: list[dict], summary: dict,
          covers: frozenset[int] = frozenset()) -> dict:
    """One row of the results: what the attack did and what the defense caught. An attempt
    whose attackers were all left out of its data path attacked in vain (nothing it sent was
    used): it is counted apart, not as an attacked iteration. ``covers`` are attackers whose
    only act is to cover for another (a colluder that keeps quiet about its partner's
    forgery): with every other attacker out of the path they have nothing to hide, and the
    attempt is in vain too."""
    tries = attempts(records)
    outs = left_out(tries)
    hits = [set(t.get("malicious", [])) - o for t, o in zip(tries, outs, strict=True)]
    attacked = [t for t, h in zip(tries, hits, strict=True) if h - covers]
    vain = [t for t, h in zip(tries, hits, strict=True) if t.get("malicious") and not h - covers]
    honest = [t for t in tries if not t.get("malicious")]
    detected = [t for t in attacked if t.get("blamed")]
    false_alerts = sum(1 for t in honest if t.get("alerts")) + sum(
        1 for t in attacked + vain if set(t.get("blamed", [])) - set(t["malicious"]))
    val = [(0, summary["val_loss_start"])]
    val += [(r["step"] + 1, r["val_loss"]) for r in records if "val_loss" in r]
    val.append((summary["steps"], summary["val_loss_end"]))
    return {
        "run": cell.name, "attack": cell.attack, "rate": cell.rate, "defense": cell.defense,
        "val_ppl_start": summary["val_ppl_start"], "val_ppl_end": summary["val_ppl_end"],
        "attacked_iterations": len(attacked), "detected_iterations": len(detected),
        "attacks_in_vain": len(vain),
        "honest_iterations": len(honest), "checked_iterations": len(tries)
        if cell.defense != "none" else 0,
        "false_alerts": false_alerts if cell.defense != "none" else None,
        "blame_correct": (sum(set(t["blamed"]) <= set(t["malicious"]) for t in detected)
                          / len(detected)) if detected else None,
        "redone_iterations": sum(len(r.get("redone", [])) for r in records),
        "skipped_steps": sum(bool(r.get("skipped_step")) for r in records),
        "tokens_per_s": summary["tokens_per_s"], "wall_s": summary["wall_s"],
        "comparisons": summary.get("defense", {}).get("comparisons", 0),
        "max_agreeing_deviation": summary.get("defense", {}).get("max_agreeing_deviation"),
        "val_ppl_curve": [[s, math.exp(v) if v < 700 else float("inf")] for s, v in val],
    }
