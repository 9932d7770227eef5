"""SPF (sparsification parameter fine-tuning): train a sparse subset of the base weights.

The paper's details are unpublished; this follows the public reimplementation's reading: in each
decoder layer, rank the attention heads and the MLP channels by L1 norm and train the top
``fraction`` of each (at least one), alongside LoRA.

*Units and their weights* (Llama family; ``W`` is a linear layer's weight, (out, in)):

- attention head ``h`` (query head, dim ``D``) owns rows ``hD..(h+1)D`` of ``q_proj`` and the
  same columns of ``o_proj``: what reads the head's query and writes its output. Under
  grouped-query attention ``k_proj``/``v_proj`` rows are shared by several query heads, so they
  belong to no single head and stay frozen (LoRA may adapt them).
- MLP channel ``i`` owns row ``i`` of ``gate_proj`` and ``up_proj`` and column ``i`` of
  ``down_proj``.

A unit's score is the L1 norm of all the entries it owns, which are exactly the entries that
train when it is selected. The base weights stay frozen: each selected slice gets a
:class:`SparseDelta` stored compactly (only the selected rows or columns, with their index as a
buffer) that a forward hook adds to the linear layer's output, so the layer computes
``x @ (W + scatter(delta)).T`` and nothing outside the selection can change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from phalanx.errors import ConfigError
from phalanx.split.parts import TrainablePart, freeze_base

SPF_PARTS = ("heads", "mlp")


def check_fraction(fraction: float) -> None:
    """Raise :class:`ConfigError` unless ``fraction`` is in (0, 1]."""
    number = isinstance(fraction, int | float) and not isinstance(fraction, bool)
    if not (number and 0.0 < fraction <= 1.0):  # NaN fails the comparison too
        raise ConfigError(f"spf_fraction={fraction!r} must be in (0, 1]: the share of heads "
                          "and MLP channels to train in each layer")


def check_scale(scale: float) -> None:
    """Raise :class:`ConfigError` unless ``0 < scale <= 1``."""
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not (
            math.isfinite(scale) and 0.0 < scale <= 1.0):
        raise ConfigError(f"trainable.spf_scale={scale!r} must be in (0, 1]")


def check_parts(parts: Sequence[str]) -> None:
    """Raise :class:`ConfigError` unless ``parts`` is a non-empty subset of ``SPF_PARTS``."""
    if not parts or not set(parts) <= set(SPF_PARTS):
        raise ConfigError(f"spf_parts={list(parts)} must be a non-empty subset of "
                          f"{list(SPF_PARTS)}")


def top_fraction(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices (ascending) of the ``ceil(fraction * n)`` largest of ``scores`` (n,); ties go to
    the lower index."""
    check_fraction(fraction)
    k = max(1, math.ceil(fraction * scores.numel()))
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k].sort().values


def head_scores(q_weight: torch.Tensor, o_weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """L1 norm of each head's ``q_proj`` rows (H * D, C) and ``o_proj`` columns (C, H * D)."""
    q = q_weight.detach().abs().reshape(num_heads, -1).sum(dim=1)  # (H,)
    o = o_weight.detach().abs().reshape(o_weight.shape[0], num_heads, -1).sum(dim=(0, 2))
    return q + o  # (H,)


def channel_scores(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """L1 norm of each MLP channel's ``gate_proj``/``up_proj`` rows (I, C) and ``down_proj``
    column (C, I)."""
    rows = gate.detach().abs().sum(dim=1) + up.detach().abs().sum(dim=1)  # (I,)
    return rows + down.detach().abs().sum(dim=0)  # (I,)


def head_slices(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row (or column) indices of the heads ``heads`` (k,): (k * D,)."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).reshape(-1)


class SparseDelta(TrainablePart):
    """A trainable delta on the rows (``dim=0``) or columns (``dim=1``) ``index`` of a frozen
    linear weight (out, in), stored compactly: (k, in) or (out, k), zero at the start, and
    applied times ``scale``: under Adam a step moves the base entries by about lr x scale (base
    weights want smaller steps than adapters)."""

    state_buffers = ("index",)

    def __init__(self, weight: torch.Tensor, index: torch.Tensor, dim: int,
                 scale: float = 1.0) -> None:
        super().__init__()
        self.dim, self.scale = dim, scale
        self.register_buffer("index", index.to(device=weight.device, dtype=torch.long))
        shape = (len(index), weight.shape[1]) if dim == 0 else (weight.shape[0], len(index))
        self.delta = nn.Parameter(torch.zeros(shape, dtype=weight.dtype, device=weight.device))

    def dense(self, shape: torch.Size) -> torch.Tensor:
        """The delta as a full (out, in) matrix."""
        full = torch.zeros(shape, dtype=self.delta.dtype, device=self.delta.device)
        return full.index_add(self.dim, self.index, self.delta * self.scale)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The layer's output ``y`` (..., out) for input ``x`` (..., in), plus the delta's."""
        delta = self.delta * self.scale
        if self.dim == 0:
            extra = F.linear(x, delta)  # (..., k): the selected outputs
            return y.index_add(-1, self.index, extra.to(y.dtype))
        extra = F.linear(x.index_select(-1, self.index), delta)  # (..., out)
        return y + extra.to(y.dtype)


def _add_delta(linear: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of a linear layer with an SPF delta."""
    return linear.spf(args[0], output)


def _base(linear: nn.Module) -> nn.Linear:
    """The frozen ``nn.Linear`` itself, under a peft adapter if one wraps it."""
    return getattr(linear, "base_layer", linear)


def _attach(linear: nn.Module, index: torch.Tensor, dim: int, scale: float) -> SparseDelta:
    base = _base(linear)
    if hasattr(base, "spf"):
        raise ConfigError("this layer already has SPF deltas")
    delta = SparseDelta(base.weight, index, dim, scale)
    base.add_module("spf", delta)
    base.register_forward_hook(_add_delta)
    return delta


def _units(module: nn.Module, parts: Sequence[str]) -> list[tuple[nn.Module, str]]:
    """(attention or MLP module, part) for every decoder layer in ``module``, in order."""
    found = []
    for m in module.modules():
        if "heads" in parts and all(hasattr(m, a) for a in ("q_proj", "o_proj")):
            found.append((m, "heads"))
        if "mlp" in parts and all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj")):
            found.append((m, "mlp"))
    return found


def add_spf(module: nn.Module, *, fraction: float, parts: Sequence[str] = SPF_PARTS,
            scale: float = 1.0) -> list[SparseDelta]:
    """Select the top ``fraction`` of heads and/or MLP channels (``parts``) of every decoder
    layer of ``module`` by L1 norm, give their weights trainable deltas (applied times
    ``scale``), and freeze every base parameter; returns the deltas."""
    check_fraction(fraction)
    check_scale(scale)
    check_parts(parts)
    units = _units(module, parts)
    if not units:
        raise ConfigError(f"{type(module).__name__} has no Llama-family decoder layer "
                          "(q_proj/o_proj, gate_proj/up_proj/down_proj) for SPF")
    deltas = []
    for m, part in units:
        if part == "heads":
            q, o = _base(m.q_proj).weight, _base(m.o_proj).weight
            heads = top_fraction(head_scores(q, o, m.config.num_attention_heads), fraction)
            idx = head_slices(heads, m.head_dim)
            deltas += [_attach(m.q_proj, idx, 0, scale), _attach(m.o_proj, idx, 1, scale)]
        else:
            g, u, d = (_base(getattr(m, n)).weight for n in ("gate_proj", "up_proj", "down_proj"))
            idx = top_fraction(channel_scores(g, u, d), fraction)
            deltas += [_attach(m.gate_proj, idx, 0, scale), _attach(m.up_proj, idx, 0, scale),
                       _attach(m.down_proj, idx, 1, scale)]
    freeze_base(module)
    return deltas
