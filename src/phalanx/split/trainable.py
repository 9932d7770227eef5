"""The trainable parts of secure split fine-tuning, chosen by one config.

``method`` is ``full`` (every parameter trains) or parts joined by ``+``: ``lora``
(:mod:`phalanx.split.lora`, through peft), ``ptuning`` (P-tuning v2 prefixes,
:mod:`phalanx.split.ptuning`) and ``spf`` (sparse base entries, :mod:`phalanx.split.spf`), e.g.
``lora+spf`` as in the paper's large-TEE setting. Everything else is frozen.
:func:`trainable_state` / :func:`load_trainable_state` move just the trained parts, which is
what an enclave seals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from phalanx.errors import ConfigError
from phalanx.split.lora import ATTENTION_TARGETS, MLP_TARGETS, add_lora
from phalanx.split.parts import (
    count_trainable,
    load_trainable_state,
    trainable_parameters,
    trainable_state,
)
from phalanx.split.ptuning import add_prefixes
from phalanx.split.spf import SPF_PARTS, add_spf, check_fraction, check_parts, check_scale

METHOD_PARTS = ("lora", "ptuning", "spf")

__all__ = [
    "ATTENTION_TARGETS", "MLP_TARGETS", "METHOD_PARTS", "TrainableConfig", "TrainableSummary",
    "apply_trainable", "count_trainable", "load_trainable_state", "trainable_parameters",
    "trainable_state",
]


@dataclass(kw_only=True)
class TrainableConfig:
    """Which parts of a frozen model train, and their shapes."""

    method: str = "lora"  # full | any of lora, ptuning, spf joined by "+" (lora+spf)
    lora_rank: int = 8
    lora_alpha: float = 16.0  # LoRA scaling is alpha / rank
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(ATTENTION_TARGETS))
    prefix_len: int = 16  # P-tuning v2: prefix vectors per layer (keys and values)
    prefix_hidden: int = 0  # > 0: reparameterise prefixes through an MLP this wide
    spf_fraction: float = 0.5  # share of heads / MLP channels per layer whose weights train
    spf_parts: list[str] = field(default_factory=lambda: list(SPF_PARTS))  # heads, mlp
    spf_scale: float = 0.1  # deltas applied times this: base entries step ~ optim.lr x scale

    def parts(self) -> list[str]:
        """The parts of ``method`` in the order they are applied (empty for ``full``)."""
        if self.method == "full":
            return []
        named = [p.strip() for p in self.method.split("+")]
        bad = [p for p in named if p not in METHOD_PARTS]
        if bad or len(set(named)) != len(named):
            raise ConfigError(
                f"trainable.method={self.method!r} is unknown; use full, or one or more of "
                f"{', '.join(METHOD_PARTS)} joined by '+' (e.g. lora+spf)"
            )
        return [p for p in METHOD_PARTS if p in named]

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad key."""
        self.parts()
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) \
                or self.lora_rank < 1:
            raise ConfigError(f"trainable.lora_rank={self.lora_rank!r} must be an integer >= 1")
        if not self.lora_alpha > 0:
            raise ConfigError(f"trainable.lora_alpha={self.lora_alpha} must be positive")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"trainable.lora_dropout={self.lora_dropout} must be in [0, 1)")
        if not self.lora_targets or not all(isinstance(t, str) and t for t in self.lora_targets):
            raise ConfigError(f"trainable.lora_targets={self.lora_targets!r} must name at least "
                              f"one layer, e.g. {list(ATTENTION_TARGETS + MLP_TARGETS)}")
        if self.prefix_len < 1:
            raise ConfigError(f"trainable.prefix_len={self.prefix_len} must be at least 1")
        if self.prefix_hidden < 0:
            raise ConfigError(f"trainable.prefix_hidden={self.prefix_hidden} must be >= 0 "
                              "(0: no reparameterisation)")
        check_fraction(self.spf_fraction)
        check_parts(self.spf_parts)
        check_scale(self.spf_scale)


@dataclass
class TrainableSummary:
    """What :func:`apply_trainable` left trainable."""

    method: str
    names: list[str]  # trainable parameter names
    count: int  # trainable scalar entries
    total: int  # all scalar entries of the module, trainable parts included
    by_part: dict[str, int]  # trainable entries each part added (lora, ptuning, spf; or full)


def apply_trainable(module: nn.Module, cfg: TrainableConfig) -> TrainableSummary:
    """Make the parts ``cfg`` names trainable in ``module`` (a stage, or any module holding
    Hugging Face decoder layers) and freeze the rest."""
    cfg.validate()
    by_part: dict[str, int] = {}
    if cfg.method == "full":
        module.requires_grad_(True)
        by_part["full"] = count_trainable(module)
    adders = {
        "lora": lambda: add_lora(module, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                                 dropout=cfg.lora_dropout, targets=cfg.lora_targets),
        "ptuning": lambda: add_prefixes(module, length=cfg.prefix_len, hidden=cfg.prefix_hidden),
        "spf": lambda: add_spf(module, fraction=cfg.spf_fraction, parts=cfg.spf_parts,
                               scale=cfg.spf_scale),
    }
    for part in cfg.parts():
        before = count_trainable(module) if by_part else 0  # the first part freezes the base
        adders[part]()
        by_part[part] = count_trainable(module) - before
    named = trainable_parameters(module)
    return TrainableSummary(method=cfg.method, names=[n for n, _ in named],
                            count=sum(p.numel() for _, p in named),
                            total=sum(p.numel() for p in module.parameters()), by_part=by_part)
