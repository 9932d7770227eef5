"""P-tuning v2 (deep prompt tuning): trainable key and value prefixes in every attention layer.

Each attention module of the Hugging Face decoder layers gets a :class:`LayerPrefix` child
(``self_attn.prefix``) holding ``P`` key and ``P`` value vectors per KV head, and a forward
pre-hook that hands the attention a :class:`PrefixKV` as its KV cache. The attention projects
and rotates its own keys and values as always, then calls ``cache.update(k, v, layer_idx)``,
which returns ``[prefix; k]`` and ``[prefix; v]``: exactly Hugging Face's own
``past_key_values`` path, whose cached keys are stored after rotary, so the prefixes carry no
position. The hook also widens the attention mask by ``P`` leading columns that every query may
attend. Nothing in the stage's forward changes; the base stays frozen.

With ``hidden > 0`` the prefixes are reparameterised as in the P-tuning v2 paper: a trainable
embedding ``(P, C)`` through an MLP ``C -> hidden -> 2 * H_kv * D`` (per layer here).
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from phalanx.errors import ConfigError, PhalanxError
from phalanx.split.parts import TrainablePart, freeze_base

_CACHE_NAMES = ("cache", "past_key_values", "past_key_value")


@functools.cache
def _cache_kwarg(cls: type) -> str | None:
    """The name under which ``cls.forward`` takes its KV cache (``cache`` from transformers
    5.24 on, ``past_key_values`` before), or ``None`` if it takes none."""
    params = inspect.signature(cls.forward).parameters
    return next((n for n in _CACHE_NAMES if n in params), None)


def attention_modules(module: nn.Module) -> list[nn.Module]:
    """The self-attention modules of the decoder layers in ``module``, in layer order."""
    return [m for m in module.modules()
            if _cache_kwarg(type(m)) and hasattr(m, "layer_idx") and hasattr(m, "head_dim")
            and not getattr(m, "is_cross_attention", False)]


class LayerPrefix(TrainablePart):
    """One layer's prefixes: ``forward()`` returns keys and values, each (H_kv, P, D)."""

    def __init__(self, *, kv_heads: int, head_dim: int, length: int, width: int,
                 hidden: int = 0, std: float = 0.02) -> None:
        super().__init__()
        self.kv_heads, self.head_dim, self.length = kv_heads, head_dim, length
        if hidden > 0:  # reparameterised: embedding (P, C) -> MLP -> (P, 2 * H_kv * D)
            self.embed = nn.Parameter(torch.randn(length, width) * std)
            self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(),
                                     nn.Linear(hidden, 2 * kv_heads * head_dim))
        else:
            self.key = nn.Parameter(torch.randn(kv_heads, length, head_dim) * std)
            self.value = nn.Parameter(torch.randn(kv_heads, length, head_dim) * std)

    @property
    def reparameterised(self) -> bool:
        """Whether the prefixes come out of an MLP (P-tuning v2's reparameterisation)."""
        return hasattr(self, "mlp")

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.reparameterised:
            return self.key, self.value  # (H_kv, P, D) each
        kv = self.mlp(self.embed).view(self.length, 2, self.kv_heads, self.head_dim)
        kv = kv.permute(1, 2, 0, 3)  # (2, H_kv, P, D)
        return kv[0], kv[1]


class PrefixKV:
    """A one-layer stand-in for a Hugging Face cache holding the prefixes (B, H_kv, P, D):
    ``update`` prepends them to the layer's keys and values (B, H_kv, T, D)."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor) -> None:
        self.key, self.value = key, value

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int,
               *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefixes followed by the layer's own keys and values."""
        k = torch.cat([self.key.to(key.dtype), key], dim=-2)  # (B, H_kv, P + T, D)
        v = torch.cat([self.value.to(value.dtype), value], dim=-2)
        return k, v


def prefix_mask(mask: torch.Tensor | None, attn: nn.Module, T: int, P: int,
                device: torch.device) -> torch.Tensor:
    """The attention mask (..., T, P + T) for ``T`` queries after ``P`` prefixes: every query
    sees every prefix, and the tokens as ``mask`` says (``None``: causal, Hugging Face's
    shorthand). Boolean masks (True = attend) stay boolean, additive float masks stay float."""
    impl = attn.config._attn_implementation
    if impl not in ("sdpa", "eager"):
        raise PhalanxError(f"deep prompt tuning needs a 4-D attention mask, which "
                           f"attn_implementation {impl!r} does not take: use sdpa or eager")
    if mask is None:
        causal = getattr(attn, "is_causal", True)
        tokens = torch.ones(T, T, dtype=torch.bool, device=device)  # (T, T)
        mask = (tokens.tril() if causal else tokens)[None, None]  # (1, 1, T, T)
        if impl == "eager":  # eager adds the mask to the scores
            neg = torch.finfo(torch.float32).min
            mask = torch.zeros(mask.shape, device=device).masked_fill(~mask, neg)
    see = torch.ones if mask.dtype == torch.bool else torch.zeros
    prefix = see((*mask.shape[:-1], P), dtype=mask.dtype, device=device)  # (..., T, P)
    return torch.cat([prefix, mask], dim=-1)  # (..., T, P + T)


def _prefix_hook(attn: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of an attention module: pass its prefixes as the KV cache and widen
    the attention mask."""
    name = _cache_kwarg(type(attn))
    if kwargs.get(name) is not None:
        raise PhalanxError("deep prompt tuning replaces the KV cache; call the model without one")
    if len(args) > 1:
        raise PhalanxError(f"{type(attn).__name__} got its mask positionally; pass it by name")
    x = args[0] if args else kwargs["hidden_states"]  # (B, T, C)
    B, T = x.shape[:2]
    key, value = attn.prefix()  # (H_kv, P, D) each
    kwargs[name] = PrefixKV(key.expand(B, -1, -1, -1), value.expand(B, -1, -1, -1))
    kwargs["attention_mask"] = prefix_mask(kwargs.get("attention_mask"), attn, T,
                                           key.shape[1], x.device)
    return args, kwargs


def _kv_shape(attn: nn.Module) -> tuple[int, int]:
    """(KV heads, head dim) of a Hugging Face attention module (Llama family or GPT-2)."""
    heads = getattr(attn.config, "num_key_value_heads", None) or attn.num_heads
    return int(heads), int(attn.head_dim)


def add_prefixes(module: nn.Module, *, length: int, hidden: int = 0,
                 std: float = 0.02) -> list[LayerPrefix]:
    """Give every attention layer of ``module`` ``length`` trainable key/value prefixes
    (reparameterised through an MLP of width ``hidden`` if positive, initialised from
    N(0, std)) and freeze every base parameter; returns the prefixes in layer order."""
    layers = attention_modules(module)
    if not layers:
        raise ConfigError(f"{type(module).__name__} has no Hugging Face attention layer to "
                          "prefix")
    out = []
    for attn in layers:
        if hasattr(attn, "prefix"):
            raise ConfigError(f"layer {attn.layer_idx} already has prefixes")
        kv_heads, head_dim = _kv_shape(attn)
        width = int(attn.config.hidden_size)
        like = next(attn.parameters())
        prefix = LayerPrefix(kv_heads=kv_heads, head_dim=head_dim, length=length,
                             width=width, hidden=hidden, std=std)
        attn.add_module("prefix", prefix.to(device=like.device, dtype=like.dtype))
        attn.register_forward_pre_hook(_prefix_hook, with_kwargs=True)
        out.append(prefix)
    freeze_base(module)
    return out
