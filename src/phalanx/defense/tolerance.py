"""How closely a claimed message must match its recomputation, per check and per stage.

Modes (``defense.tolerance``):

- ``bitwise`` (the default): equal, bit for bit. Where every stage runs the same hardware and
  software the replica is in lockstep with its original and honest deviations are exactly 0.
- ``rms``: ``max|a - b| <= atol + rtol * rms(a)``, with ``a`` the recomputation. Scaling by the
  RMS rather than the largest entry matters: SmolLM2's hidden states have a channel ~190x their
  RMS, so a max-scaled tolerance lets an attacker move every other entry by ~190x more.
- ``calibrated``: ``rms`` with one ``rtol`` per (check, stage), read from the file that
  ``phalanx calibrate`` wrote from honest runs on the run's own machines
  (``defense.calibration``): the largest deviation each check saw, times a margin.
- ``measure``: calibration only. Every finite, well-shaped claim agrees and its deviation is
  recorded; content alerts are off.

The attack budget a tolerance leaves: per message, every entry may move by ``rtol x RMS``
(a relative L2 change of at most ``rtol``), in a direction of the attacker's choice, every
time (the ``drift`` attacker measures it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from phalanx.errors import ConfigError

MODES = ("bitwise", "rms", "calibrated", "measure")
CHECKS = ("forward", "backward", "norm")  # a stage's activation, its gradient, its squared norm
FORMAT = "phalanx-calibration/1"
MAX_RTOL = 1.0  # a tolerance of the message's own RMS checks nothing
MAX_BYTES = 1 << 20  # a calibration file is a few hundred bytes


def rms(t: torch.Tensor) -> float:
    """Root mean square of ``t``'s entries (float64); 0 for an empty tensor."""
    return float(t.double().pow(2).mean().sqrt()) if t.numel() else 0.0


def deviation(recomputed: torch.Tensor, claimed: torch.Tensor) -> float:
    """``max|a - b|`` in units of the recomputation's RMS (in absolute terms where it is 0)."""
    if not claimed.numel():
        return 0.0
    diff = float((recomputed.double() - claimed.double()).abs().max())
    return diff / (rms(recomputed) or 1.0)


def comparable(recomputed: torch.Tensor, claimed: torch.Tensor) -> bool:
    """Same shape and dtype, and a finite claim: the precondition of any agreement."""
    return (claimed.shape == recomputed.shape and claimed.dtype == recomputed.dtype
            and bool(torch.isfinite(claimed).all()))


@dataclass(frozen=True)
class Tolerance:
    """One check's tolerance: ``rtol = atol = 0`` is bitwise; ``measure`` accepts any finite,
    well-shaped claim (calibration)."""

    rtol: float = 0.0
    atol: float = 0.0
    measure: bool = False

    def agrees(self, recomputed: torch.Tensor, claimed: torch.Tensor) -> bool:
        if not comparable(recomputed, claimed):
            return False
        if self.measure:
            return True
        if self.rtol == 0 and self.atol == 0:
            return torch.equal(recomputed, claimed)
        if not claimed.numel():
            return True
        diff = float((recomputed.double() - claimed.double()).abs().max())
        return diff <= self.atol + self.rtol * rms(recomputed)

    def scalars_agree(self, recomputed: float, claimed: float) -> bool:
        """The same test for two numbers (a squared norm and its replica's)."""
        if not math.isfinite(claimed):
            return False
        if self.measure:
            return True
        if self.rtol == 0 and self.atol == 0:
            return recomputed == claimed
        return abs(recomputed - claimed) <= self.atol + self.rtol * abs(recomputed)


@dataclass(frozen=True)
class Tolerances:
    """The tolerance of every check of every stage of a run."""

    default: Tolerance = Tolerance()
    table: dict[str, tuple[Tolerance, ...]] = field(default_factory=dict)

    def of(self, check: str, stage: int) -> Tolerance:
        row = self.table.get(check)
        return row[stage] if row is not None and 0 <= stage < len(row) else self.default


def load_calibration(path: str | Path, num_stages: int) -> dict[str, list[float]]:
    """The per-(check, stage) ``rtol`` of a calibration file, validated for a run of
    ``num_stages`` stages; a :class:`ConfigError` naming the defect otherwise."""
    p = Path(path)
    where = f"defense.calibration={str(path)!r}"
    try:
        with p.open("rb") as f:  # (a device or a FIFO says size 0: read no more than the cap)
            raw = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{where} cannot be read ({exc.strerror or exc}); write one with "
                          "phalanx calibrate") from None
    if len(raw) > MAX_BYTES:
        raise ConfigError(f"{where} is over 1 MiB: not a calibration file")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # (huge ints: ValueError)
        raise ConfigError(f"{where} is not JSON a calibration can be ({type(exc).__name__})"
                          ) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ConfigError(f"{where} is not a calibration file (format {FORMAT!r})")
    if doc.get("stages") != num_stages:
        raise ConfigError(f"{where} was calibrated for {doc.get('stages')!r} stages, this run "
                          f"has {num_stages}")
    rtol = doc.get("rtol")
    out: dict[str, list[float]] = {}
    for check in CHECKS:
        row = rtol.get(check) if isinstance(rtol, dict) else None
        if (not isinstance(row, list) or len(row) != num_stages
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                           and _fits(x) for x in row)):
            raise ConfigError(f"{where}: rtol.{check} must be {num_stages} numbers in "
                              f"[0, {MAX_RTOL:g})")
        out[check] = [float(x) for x in row]
    if not isinstance(doc.get("steps"), int) or isinstance(doc.get("steps"), bool):
        raise ConfigError(f"{where}: steps (how many the calibration covered) must be a whole "
                          "number")
    return out


def _fits(x: int | float) -> bool:
    try:
        return 0 <= float(x) < MAX_RTOL
    except OverflowError:
        return False


def covered_steps(path: str | Path) -> int:
    """How many training steps a (valid) calibration file covered."""
    return int(json.loads(Path(path).read_text(encoding="utf-8"))["steps"])


def calibration(deviations: dict[str, list[float]], num_stages: int, margin: float,
                steps: int, source: dict) -> dict:
    """A calibration file's content from the largest honest deviation of each (check, stage)
    over ``steps`` training steps: ``rtol = margin x deviation`` (0, i.e. bitwise, where the
    replica agreed bitwise)."""
    if not (math.isfinite(margin) and margin >= 1):
        raise ConfigError(f"--margin {margin} must be a number >= 1")
    rows = {}
    for check in CHECKS:
        row = deviations.get(check)
        if not isinstance(row, list) or len(row) != num_stages:
            raise ConfigError(f"the run recorded no {check} deviations for {num_stages} stages: "
                              "was it run with defense.tolerance=measure?")
        rows[check] = [float(x) for x in row]
        wide = [s for s, x in enumerate(rows[check]) if not _fits(margin * x)]
        if wide:
            raise ConfigError(f"the honest {check} deviations of stages {wide} times the margin "
                              f"reach {MAX_RTOL:g} x RMS: such replicas check nothing")
    return {"format": FORMAT, "stages": num_stages, "steps": steps, "margin": margin,
            "deviation": rows, "rtol": {c: [margin * x for x in r] for c, r in rows.items()},
            "source": source}
