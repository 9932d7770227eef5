"""One-time-pad masking of frozen linear layers outsourced to an untrusted host (paper 2, method 1).

The enclave holds a secret activation E (..., n); the host holds the frozen layer h(x) = x W^T + b
(W public to it). Per use the enclave takes a fresh mask r, sends E + r, gets Y' = (E + r) W^T + b
back, checks it with Freivalds (:mod:`phalanx.split.freivalds`) and returns Y' - r W^T, where
r W^T was precomputed offline. The backward pass masks the secret gradient G (..., m) the same
way: the host computes (G + s) W, the enclave subtracts s W. W is frozen: no weight gradient.

*Masks.* r = sigma_i · r_hat with r_hat ~ N(0, 1) drawn ahead of time (offline, with its image
r_hat W^T) and, per row i, sigma_i = 2^ceil(log2(mask_scale · rms(E_i))): at least mask_scale
times the row's RMS, a power of two so that scaling r_hat and its image is exact. This is a
real-valued additive mask, *not* a finite-field one-time pad (Slalom's): it is not perfectly
hiding. The host sees a Gaussian channel with per-entry signal-to-noise E_ij^2 / sigma_i^2
(<= 1 / mask_scale^2 for an entry at the row's RMS; an outlier channel k times the RMS has k^2
times that), it learns each row's power-of-two scale exponent, and sending the same E twice lets
it average two masks. A larger ``mask_scale`` hides more and costs log2(mask_scale) of the 24 fp32
mantissa bits: measured at 64 in fp32, a row's error stays below 6e-5 of its norm for
n = 64 … 4096 (one row holding a 1e4 channel included). Hence float32 / float64 only.

*Never reuse a mask.* Two uses of one r give the host E1 - E2, and a reused mask basis let the
host recover a LLaMA-3-8B layer's secrets in about six minutes (arXiv 2602.11088). A :class:`Mask`
is handed out once by its pool and can be consumed once; a second consume raises
:class:`MaskReused`. Every mask and every Freivalds key gets its own OS-seeded generator.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phalanx.errors import ConfigError, PhalanxError
from phalanx.split.freivalds import FreivaldsVerifier, check_result, secret_generator

MASKABLE = (torch.float32, torch.float64)
MAX_MASK_SCALE = 2.0**12  # half of fp32's 24 mantissa bits
MAX_RTOL = 1e-2
DIRECTIONS = ("forward", "backward")


@dataclass(kw_only=True)
class MaskingConfig:
    """Masking and verification of linear layers an untrusted host computes."""

    mask_scale: float = 64.0  # mask std >= mask_scale x each row's RMS (a power of two)
    pool_size: int = 8  # precomputed masks kept per layer and direction (0: draw every one online)
    freivalds_vectors: int = 4  # k secret vectors per check: P(miss) = erf(tau/(√2|err|))^k
    freivalds_rtol: float = 0.0  # row tolerance rtol·|x_i||W|_F; 0: 32 unit roundoffs
    freivalds_refresh: int = 64  # checks before the vectors are drawn afresh

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad value."""
        if not (math.isfinite(self.mask_scale) and 1.0 <= self.mask_scale <= MAX_MASK_SCALE):
            raise ConfigError(f"masking.mask_scale={self.mask_scale} must be in [1, "
                              f"{MAX_MASK_SCALE:g}]: a mask below the activation's RMS hides "
                              "nothing, one above it spends more than half of fp32's precision")
        if self.pool_size < 0:
            raise ConfigError(f"masking.pool_size={self.pool_size} must be >= 0")
        if self.freivalds_vectors < 1:
            raise ConfigError(f"masking.freivalds_vectors={self.freivalds_vectors} must be >= 1: "
                              "every product the host returns is checked")
        if not (math.isfinite(self.freivalds_rtol) and 0.0 <= self.freivalds_rtol <= MAX_RTOL):
            raise ConfigError(f"masking.freivalds_rtol={self.freivalds_rtol} must be in [0, "
                              f"{MAX_RTOL:g}] (0 picks 32 unit roundoffs of the dtype)")
        if self.freivalds_refresh < 1:
            raise ConfigError(f"masking.freivalds_refresh={self.freivalds_refresh} must be >= 1")


class MaskReused(PhalanxError):
    """A one-time mask was used a second time: fatal for privacy (arXiv 2602.11088)."""


class Mask:
    """A unit mask r_hat (..., n) and its image r_hat A^T (..., m), consumable once."""

    __slots__ = ("shape", "_mask", "_image")

    def __init__(self, mask: Tensor, image: Tensor) -> None:
        self.shape = mask.shape
        self._mask: Tensor | None = mask
        self._image: Tensor | None = image

    @property
    def used(self) -> bool:
        return self._mask is None

    def consume(self) -> tuple[Tensor, Tensor]:
        """``(r_hat, r_hat A^T)``, once; the mask forgets both, and a second call raises."""
        if self._mask is None or self._image is None:
            raise MaskReused("this one-time mask was already used; reusing a mask reveals the "
                             "difference of the secrets it hid")
        out = (self._mask, self._image)
        self._mask = self._image = None
        return out


def draw_mask(shape: tuple[int, ...] | torch.Size, matrix: Tensor) -> Mask:
    """A fresh unit Gaussian mask of ``shape`` (..., n) and its image under ``x A^T`` (A (m, n))."""
    gen = secret_generator(matrix.device)
    mask = torch.randn(shape, generator=gen, dtype=matrix.dtype, device=matrix.device)  # (..., n)
    return Mask(mask, F.linear(mask, matrix))  # image (..., m)


def mask_std(x: Tensor, scale: float) -> Tensor:
    """Per-row mask std ``2^ceil(log2(scale · rms(x_i)))`` for x (..., n): (..., 1), x's dtype.

    The RMS is floored at sqrt(tiny) of the dtype (2^-63 for fp32), so a zero row (a padded
    token's gradient) is still masked, and neither its products nor its Freivalds tolerance
    underflow."""
    rms = x.double().pow(2).mean(dim=-1, keepdim=True).sqrt()  # (..., 1)
    rms = rms.clamp(min=math.sqrt(torch.finfo(x.dtype).tiny))
    return torch.exp2(torch.ceil(torch.log2(scale * rms))).to(x.dtype)


class MaskPool:
    """A bounded store of precomputed masks, by shape: at most ``cap`` masks in all."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._masks: dict[torch.Size, deque[Mask]] = {}

    def __len__(self) -> int:
        return sum(len(q) for q in self._masks.values())

    def fill(self, shape: tuple[int, ...] | torch.Size, count: int, matrix: Tensor) -> int:
        """Precompute up to ``count`` masks of ``shape`` for ``matrix``, never past the cap;
        returns how many were added."""
        added = max(0, min(count, self.cap - len(self)))
        queue = self._masks.setdefault(torch.Size(shape), deque())
        for _ in range(added):
            queue.append(draw_mask(shape, matrix))
        return added

    def take(self, shape: torch.Size) -> Mask | None:
        """A precomputed mask of ``shape``, removed from the pool; None when there is none."""
        queue = self._masks.get(shape)
        return queue.popleft() if queue else None

    def clear(self) -> None:
        """Drop every precomputed mask (they are never handed out again)."""
        self._masks.clear()


@dataclass
class MaskingStats:
    """Cost counters of masked layers (one object may be shared by several layers)."""

    offline_s: float = 0.0  # precompute(): masks, their images, Freivalds keys
    online_s: float = 0.0  # per use: masking, host call, checks, unmasking (and pool misses)
    bytes_to_host: int = 0  # masked activations and gradients sent
    bytes_from_host: int = 0  # products received
    masks_drawn: int = 0
    masks_used: int = 0
    pool_misses: int = 0  # uses that found no precomputed mask and drew one online
    checks: int = 0  # Freivalds checks passed

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, type(getattr(self, f.name))())


class Host(ABC):
    """The untrusted side: computes frozen linear layers on what the enclave sends."""

    @abstractmethod
    def matmul(self, layer_id: str, x: Tensor) -> Tensor:
        """Forward: ``x W^T + b`` for x (..., in): (..., out)."""

    @abstractmethod
    def matmul_t(self, layer_id: str, g: Tensor) -> Tensor:
        """Backward (input gradient): ``g W`` for g (..., out): (..., in)."""


class LocalHost(Host):
    """An honest in-process host holding copies of the frozen weights on its own device."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._layers: dict[str, tuple[Tensor, Tensor | None]] = {}

    def register(self, layer_id: str, linear: nn.Linear) -> None:
        """Load a frozen layer's weight (and bias) as ``layer_id``."""
        bias = None if linear.bias is None else linear.bias.detach().to(self.device, copy=True)
        self._layers[layer_id] = (linear.weight.detach().to(self.device, copy=True), bias)

    def _layer(self, layer_id: str) -> tuple[Tensor, Tensor | None]:
        if layer_id not in self._layers:
            raise KeyError(f"host has no layer {layer_id!r}; register it first")
        return self._layers[layer_id]

    def matmul(self, layer_id: str, x: Tensor) -> Tensor:
        weight, bias = self._layer(layer_id)
        return F.linear(x.to(self.device), weight, bias)  # (..., out)

    def matmul_t(self, layer_id: str, g: Tensor) -> Tensor:
        weight, _ = self._layer(layer_id)
        return g.to(self.device) @ weight  # (..., in)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(kw_only=True)
class _Path:
    """One direction of a layer: the map ``x A^T (+ b)``, its masks, its check, its host call."""

    name: str
    matrix: Tensor  # A (m, n): W forward, W^T backward
    pool: MaskPool
    verifier: FreivaldsVerifier
    call: Callable[[str, Tensor], Tensor]


class MaskedLinear(nn.Module):
    """A drop-in for a frozen ``nn.Linear`` whose products an untrusted :class:`Host` computes
    on masked inputs, forward and backward (input gradient only: the weight is frozen)."""

    def __init__(self, linear: nn.Linear, host: Host, *, layer_id: str,
                 config: MaskingConfig | None = None, stats: MaskingStats | None = None) -> None:
        super().__init__()
        if linear.weight.requires_grad or (linear.bias is not None and linear.bias.requires_grad):
            raise ConfigError(f"layer {layer_id!r}: MaskedLinear wraps a frozen linear layer "
                              "(its weight gets no gradient); call requires_grad_(False) first")
        if linear.weight.dtype not in MASKABLE:
            raise ConfigError(f"layer {layer_id!r} is {linear.weight.dtype}: masking needs "
                              "float32 or float64 (a mask costs log2(mask_scale) mantissa bits)")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.layer_id = layer_id
        self.host = host
        self.config = MaskingConfig() if config is None else config
        self.stats = MaskingStats() if stats is None else stats
        self.register_buffer("weight", linear.weight.detach())  # (out, in)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())
        self._paths: dict[str, _Path] = {}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, layer_id={self.layer_id!r}")

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> MaskedLinear:
        out = super()._apply(fn, recurse)
        self._paths.clear()  # masks and keys of the old device / dtype are dropped, never reused
        return out

    def _path(self, name: str) -> _Path:
        if name not in self._paths:
            forward = name == "forward"
            matrix = self.weight if forward else self.weight.T  # (m, n)
            bias = self.bias if forward else None
            verifier = FreivaldsVerifier(matrix, bias, k=self.config.freivalds_vectors,
                                         rtol=self.config.freivalds_rtol,
                                         refresh_every=self.config.freivalds_refresh,
                                         layer_id=self.layer_id, direction=name)
            call = self.host.matmul if forward else self.host.matmul_t
            self._paths[name] = _Path(name=name, matrix=matrix, pool=MaskPool(
                self.config.pool_size), verifier=verifier, call=call)
        return self._paths[name]

    @contextmanager
    def _timed(self, counter: str) -> Iterator[None]:
        _sync(self.weight.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            _sync(self.weight.device)
            setattr(self.stats, counter, getattr(self.stats, counter) + time.perf_counter() - start)

    def precompute(self, shape: tuple[int, ...] | torch.Size, count: int | None = None) -> int:
        """Offline: fill both pools with masks for inputs of ``shape`` (..., in) and their
        gradients (..., out), up to the cap, and draw Freivalds keys; returns masks added."""
        count = self.config.pool_size if count is None else count
        shapes = {"forward": torch.Size(shape), "backward": torch.Size((*shape[:-1],
                                                                         self.out_features))}
        added = 0
        with self._timed("offline_s"):
            for name in DIRECTIONS:
                path = self._path(name)
                added += path.pool.fill(shapes[name], count, path.matrix)
                path.verifier.ensure_key()
        self.stats.masks_drawn += added
        return added

    def outsource(self, name: str, x: Tensor) -> Tensor:
        """The online protocol for one use: ``x A^T (+ b)`` computed by the host on ``x`` masked,
        checked and unmasked. ``name`` is forward (x (..., in)) or backward (x (..., out))."""
        path = self._path(name)
        m, n = path.matrix.shape
        if x.dtype != self.weight.dtype or x.shape[-1:] != (n,):
            raise ValueError(f"layer {self.layer_id!r} ({name}) takes (..., {n}) "
                             f"{self.weight.dtype}, got {tuple(x.shape)} {x.dtype}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"layer {self.layer_id!r} ({name}): non-finite input; refusing to "
                             "send it (an honest host would be blamed for the NaN)")
        with self._timed("online_s"):
            mask = path.pool.take(x.shape)
            if mask is None:
                mask = draw_mask(x.shape, path.matrix)
                self.stats.pool_misses += 1
                self.stats.masks_drawn += 1
            unit, image = mask.consume()  # (..., n), (..., m)
            self.stats.masks_used += 1
            sigma = mask_std(x, self.config.mask_scale)  # (..., 1)
            sent = x + sigma * unit  # (..., n): all the host ever sees of x
            if not bool(torch.isfinite(sent).all()):
                raise ValueError(f"layer {self.layer_id!r} ({name}): input too large to mask")
            self.stats.bytes_to_host += sent.numel() * sent.element_size()
            got = check_result(path.call(self.layer_id, sent), shape=torch.Size((*x.shape[:-1], m)),
                               dtype=x.dtype, device=x.device, layer_id=self.layer_id,
                               direction=name)  # (..., m)
            self.stats.bytes_from_host += got.numel() * got.element_size()
            path.verifier.check(sent.reshape(-1, n), got.reshape(-1, m))
            self.stats.checks += 1
            return got - sigma * image  # (..., m)

    def forward(self, x: Tensor) -> Tensor:
        return _MaskedMatmul.apply(x, self)  # (..., in) -> (..., out)


class _MaskedMatmul(torch.autograd.Function):
    """Masked forward and masked input-gradient backward through a frozen linear layer."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: MaskedLinear) -> Tensor:
        ctx.layer = layer
        return layer.outsource("forward", x)  # (..., out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        return ctx.layer.outsource("backward", grad.contiguous()), None  # (..., in)
