"""Privacy accounting of the Gaussian mechanism at the cut, through Opacus' RDP accountant.

Never hand-written: the accountant is Opacus' (``pip install opacus``), imported only when an
epsilon is asked for, so the rest of :mod:`phalanx.privacy` works without it.
"""

from __future__ import annotations

import math

from phalanx.errors import ConfigError, PhalanxError


def _rdp_accountant():  # noqa: ANN202 - opacus' class, imported lazily
    try:
        from opacus.accountants import RDPAccountant
    except ImportError:
        raise PhalanxError("privacy accounting needs Opacus: pip install 'opacus>=1.5'") from None
    return RDPAccountant


def gaussian_epsilon(noise_multiplier: float, *, steps: int, delta: float,
                     sample_rate: float = 1.0) -> float:
    """Epsilon at ``delta`` of ``steps`` compositions of the (subsampled) Gaussian mechanism
    whose noise std is ``noise_multiplier`` times its L2 sensitivity (RDP accounting)."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ConfigError(f"privacy noise_multiplier={noise_multiplier!r} must be finite and > 0")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"privacy steps={steps!r} must be an integer >= 1")
    if not 0 < delta < 1:
        raise ConfigError(f"privacy delta={delta!r} must be in (0, 1)")
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"privacy sample_rate={sample_rate!r} must be in (0, 1]")
    accountant = _rdp_accountant()()
    accountant.history = [(float(noise_multiplier), float(sample_rate), steps)]
    return float(accountant.get_epsilon(delta=delta))
