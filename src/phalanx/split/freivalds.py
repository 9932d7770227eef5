"""Freivalds' check of a product an untrusted host computed, in floating point (as Slalom does).

The enclave sent ``x`` (N, n) and the host claims ``y = x A^T + b`` (N, m). Instead of recomputing
the product (N·n·m multiply-adds), the enclave draws secret Gaussian vectors ``V`` (m, k), keeps
``U = A^T V`` (n, k) and ``c = b V`` (k,) computed once per key, and checks per row i and vector j

    |y_i · v_j - (x_i · u_j + c_j)|  <=  tau_i  =  rtol · (|x_i| · |A|_F + |b|)       (2-norms)

in float64, which costs N·(n + m)·k. ``|A|_F`` is the root-mean-square of ``|A^T v|`` over
Gaussian ``v``: this is the per-row bound ``rtol · |x_i| |A^T v|`` without an unlucky ``v``.

*Tolerance.* An honest float product has a row error ``e_i`` with ``|e_i| <= rho · |x_i| |A|_F``,
and its residual ``e_i · v`` is ``N(0, |e_i|^2)``. Measured on fp32 (MKL and sequential sums,
n = 64 … 4096): rho ≈ 0.1–0.45 u for masked inputs (the mask makes the products' signs random,
so partial sums are random walks and rho does not grow with n) and below 1.7 u for all-positive
inputs, u = 2^-24 the unit roundoff. The default ``rtol = 32 u`` (:func:`auto_rtol`) is so 19 to
70 standard deviations above an honest residual: no false alarm in practice. A host that computes
in TF32 or bf16 is *not* honest under this contract; give it an ``rtol`` of about 1e-3.

*Detection.* A host that adds an error ``eps_i`` to row i (one entry by ``delta``: ``|eps_i| =
|delta|``) makes the residual ``N(0, |eps_i + e_i|^2)``; each independent vector misses it with
probability ``erf(tau_i / (sqrt(2) |eps_i|))`` <= 0.8 tau_i / |eps_i|, all k with that to the k-th
power (:func:`miss_probability`). The vectors never leave the enclave and are refreshed every
``refresh_every`` checks, so the host cannot aim its error at their null space. An error below
tau_i may pass: measured with masks at 64x the RMS, tau_i is 40-170x the rounding error the masked
product carries anyway, and 0.1% (n = 64) to 0.9% (n = 4096) of the unmasked output row's norm.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch
from torch import Tensor

from phalanx.errors import PhalanxError

RTOL_ROUNDOFFS = 32.0
"""The default tolerance in unit roundoffs of the product's dtype (see the module docstring)."""


class HostMisbehaved(PhalanxError):
    """The untrusted host returned a wrong product, shape, dtype or a non-finite value."""

    def __init__(self, layer_id: str, direction: str, reason: str) -> None:
        super().__init__(f"host misbehaved on layer {layer_id!r} ({direction}): {reason}")
        self.layer_id = layer_id
        self.direction = direction
        self.reason = reason


def secret_generator(device: torch.device | str) -> torch.Generator:
    """A generator seeded with 64 fresh bits from the OS (``secrets``), never from a counter.

    torch's generators are not cryptographic (CPU: Mersenne Twister): callers draw one per mask
    or per key, so knowing one draw says nothing about the next."""
    gen = torch.Generator(device=device)
    gen.manual_seed(secrets.randbits(64))
    return gen


def auto_rtol(dtype: torch.dtype) -> float:
    """The default relative tolerance of the check: 32 unit roundoffs of ``dtype``."""
    return RTOL_ROUNDOFFS * torch.finfo(dtype).eps / 2


def miss_probability(error_norm: float, tol: float, k: int) -> float:
    """Probability that k independent N(0, I) vectors all miss a row error of 2-norm
    ``error_norm`` under a row tolerance ``tol``: ``erf(tol / (sqrt(2) error_norm)) ** k``."""
    if error_norm <= 0:
        return 1.0
    return math.erf(tol / (math.sqrt(2.0) * error_norm)) ** k


def residuals(x: Tensor, y: Tensor, vectors: Tensor, projected: Tensor,
              bias_projected: Tensor) -> Tensor:
    """``y V - (x U + c)`` in float64: (N, k) for x (N, n), y (N, m), V (m, k), U (n, k), c (k,)."""
    return y.double() @ vectors - (x.double() @ projected + bias_projected)  # (N, k)


def row_tolerance(x: Tensor, matrix_norm: float, bias_norm: float, rtol: float) -> Tensor:
    """``rtol · (|x_i| |A|_F + |b|)`` per row of x (N, n): (N,) float64."""
    return rtol * (torch.linalg.vector_norm(x.double(), dim=-1) * matrix_norm + bias_norm)


def check_result(y: object, *, shape: torch.Size, dtype: torch.dtype, device: torch.device,
                 layer_id: str, direction: str) -> Tensor:
    """What the host returned, validated (a plain dense tensor of ``shape`` and ``dtype``, all
    finite) and moved to the enclave's ``device``; :class:`HostMisbehaved` otherwise."""

    def bad(reason: str) -> HostMisbehaved:
        return HostMisbehaved(layer_id, direction, reason)

    if type(y) is not Tensor:  # a subclass could override the enclave's own arithmetic
        raise bad(f"returned a {type(y).__name__}, not a plain torch.Tensor")
    if y.layout != torch.strided:
        raise bad(f"returned a {y.layout} tensor, not a dense one")
    if y.shape != shape:
        raise bad(f"returned shape {tuple(y.shape)}, expected {tuple(shape)}")
    if y.dtype != dtype:
        raise bad(f"returned dtype {y.dtype}, expected {dtype}")
    y = y.detach().to(device)
    if not bool(torch.isfinite(y).all()):
        raise bad(f"returned {int((~torch.isfinite(y)).sum())} non-finite values")
    return y


@dataclass(kw_only=True)
class FreivaldsKey:
    """Secret check vectors and their precomputed images; valid for a bounded number of uses."""

    vectors: Tensor  # (m, k) float64, N(0, 1)
    projected: Tensor  # (n, k) = A^T V
    bias_projected: Tensor  # (k,) = b V, zeros without bias
    uses: int = 0


class FreivaldsVerifier:
    """Checks products ``x A^T + b`` of one matrix (a layer's W forward, W^T backward)."""

    def __init__(self, matrix: Tensor, bias: Tensor | None = None, *, k: int, rtol: float = 0.0,
                 refresh_every: int, layer_id: str, direction: str) -> None:
        if matrix.dim() != 2 or (bias is not None and bias.shape != matrix.shape[:1]):
            raise ValueError(f"matrix must be (m, n) and bias (m,), got {tuple(matrix.shape)} "
                             f"and {None if bias is None else tuple(bias.shape)}")
        if k < 1 or refresh_every < 1 or not (math.isfinite(rtol) and rtol >= 0):
            raise ValueError(f"need k >= 1, refresh_every >= 1, finite rtol >= 0; got k={k}, "
                             f"refresh_every={refresh_every}, rtol={rtol}")
        self.matrix = matrix  # (m, n)
        self.bias = bias  # (m,) or None
        self.k = k
        self.rtol = rtol or auto_rtol(matrix.dtype)
        self.refresh_every = refresh_every
        self.layer_id = layer_id
        self.direction = direction
        self.matrix_norm = float(torch.linalg.matrix_norm(matrix.double()))
        self.bias_norm = 0.0 if bias is None else float(torch.linalg.vector_norm(bias.double()))
        self._key: FreivaldsKey | None = None

    def ensure_key(self) -> FreivaldsKey:
        """The current key, drawn afresh when there is none or it has served its uses."""
        if self._key is None or self._key.uses >= self.refresh_every:
            m = self.matrix.shape[0]
            gen = secret_generator(self.matrix.device)
            vectors = torch.randn(m, self.k, generator=gen, dtype=torch.float64,
                                  device=self.matrix.device)  # (m, k)
            bias = self.bias.double() @ vectors if self.bias is not None else \
                vectors.new_zeros(self.k)  # (k,)
            self._key = FreivaldsKey(vectors=vectors, bias_projected=bias,
                                     projected=self.matrix.double().T @ vectors)  # (n, k)
        return self._key

    def row_tolerances(self, x: Tensor) -> Tensor:
        """The tolerance tau_i of every row of x (N, n): (N,)."""
        return row_tolerance(x, self.matrix_norm, self.bias_norm, self.rtol)

    def check(self, x: Tensor, y: Tensor) -> None:
        """Raise :class:`HostMisbehaved` unless ``y`` (N, m) passes as ``x`` (N, n) ``A^T + b``."""
        key = self.ensure_key()
        key.uses += 1
        excess = residuals(x, y, key.vectors, key.projected, key.bias_projected).abs() \
            - self.row_tolerances(x)[:, None]  # (N, k)
        excess = excess.nan_to_num(nan=math.inf)  # a NaN residual fails too
        if bool((excess > 0).any()):
            row, vec = divmod(int(excess.argmax()), self.k)
            tau = float(self.row_tolerances(x[row:row + 1])[0])
            raise HostMisbehaved(self.layer_id, self.direction,
                                 f"Freivalds check failed on row {row} (vector {vec}): "
                                 f"|y v - x A^T v| = {float(excess[row, vec]) + tau:.4g} > "
                                 f"tolerance {tau:.4g} (rtol {self.rtol:.3g})")
