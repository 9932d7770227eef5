"""Masked outsourcing of a server's frozen linear layers to an untrusted host (paper 2, method 1).

:func:`outsource` walks a module holding decoder layers (a stage, an ``nn.ModuleList`` of
blocks) and replaces every frozen linear layer of the backbone (Llama's q/k/v/o and gate/up/down
projections; GPT-2's ``Conv1D`` c_attn/c_proj/c_fc) in place by a
:class:`~phalanx.split.masking.MaskedLinear` registered on the host: the host computes the
products on masked inputs and gradients, the enclave checks and unmasks them. Everything else
stays in the enclave, unchanged: norms, rotary, attention over dynamic operands (Q K^T, A V),
activations, residuals and every trainable part.

*Trainable parts are never outsourced*, frozen or not: LoRA's A/B (and its dropout) stay in the
enclave and only the adapter's ``base_layer`` goes out; SPF's deltas move with the forward hook
that applies them onto the masked layer; P-tuning's prefixes (and their MLP) stay on the
attention module. A backbone linear that trains (``method=full``) cannot be outsourced (the
host would need its updated weight): it is left in the enclave and listed in
:attr:`Outsourced.kept`. Add the trainable parts first (:func:`~phalanx.split.trainable.
apply_trainable`), then outsource; do not merge LoRA into an outsourced base afterwards.
Parameter and buffer names do not change (an outsourced weight becomes a buffer of the same
name); a GPT-2 ``Conv1D``'s ``weight`` is then its transpose, (out, in).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from phalanx.errors import ConfigError
from phalanx.split.masking import Host, MaskedLinear, MaskingConfig, MaskingStats
from phalanx.split.parts import _adapter_parameters

_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
          "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
          "_backward_hooks", "_is_full_backward_hook")
"""The per-module hook tables a masked layer takes over from the layer it replaces (the tables
themselves move, so the hooks' removable handles keep working)."""


@dataclass
class EnclaveBytes:
    """Parameter bytes kept in the enclave vs frozen weights outsourced to the host.

    ``outsourced`` is what the host holds and computes with. :class:`MaskedLinear` still keeps
    its weight as a buffer, for the offline mask images r W^T and the Freivalds keys; an enclave
    short of memory would stream it in for that offline work."""

    trainable: int  # trainable parameters (LoRA, prefixes, SPF deltas; the backbone if full)
    frozen: int  # frozen parameters kept inside: norms, anything not outsourced
    outsourced: int  # weights and biases of the masked layers, computed by the host

    @property
    def inside(self) -> int:
        return self.trainable + self.frozen

    @property
    def total(self) -> int:
        return self.inside + self.outsourced


@dataclass
class Outsourced:
    """What :func:`outsource` did: the masked layers by id, the linears it kept, shared stats."""

    module: nn.Module
    layers: dict[str, MaskedLinear]
    kept: list[str] = field(default_factory=list)  # backbone linears that train: left inside
    stats: MaskingStats = field(default_factory=MaskingStats)  # summed over every masked layer

    def precompute(self, batch: int, seq: int, count: int | None = None) -> int:
        """Offline: fill every masked layer's pools for inputs (batch, seq, in) and their
        gradients (``count`` masks each, default the pool size); returns masks added. Its time
        is ``stats.offline_s``; the masked forward and backward passes are ``stats.online_s``."""
        return sum(layer.precompute((batch, seq, layer.in_features), count)
                   for layer in self.layers.values())

    def bytes(self) -> EnclaveBytes:
        """Parameter bytes of the module inside vs outside the enclave."""
        return enclave_bytes(self.module)


def enclave_bytes(module: nn.Module) -> EnclaveBytes:
    """Parameter bytes of ``module`` in the enclave (trainable, frozen) and outsourced (the
    weights and biases of its :class:`MaskedLinear` layers); buffers are not counted."""
    trainable = frozen = 0
    for p in module.parameters():
        size = p.numel() * p.element_size()
        if p.requires_grad:
            trainable += size
        else:
            frozen += size
    outsourced = sum(t.numel() * t.element_size() for m in module.modules()
                     if isinstance(m, MaskedLinear) for t in (m.weight, m.bias) if t is not None)
    return EnclaveBytes(trainable=trainable, frozen=frozen, outsourced=outsourced)


def _as_linear(module: nn.Module) -> nn.Linear | None:
    """``module`` as an ``nn.Linear`` (a GPT-2 ``Conv1D`` as a transposed view of its weight,
    no copy); ``None`` when it is neither."""
    if isinstance(module, nn.Linear):
        return module
    from transformers.pytorch_utils import Conv1D

    if not isinstance(module, Conv1D):
        return None
    w = module.weight  # (in, out)
    view = nn.Linear(module.nx, module.nf, bias=module.bias is not None, device="meta",
                     dtype=w.dtype)
    view.weight = nn.Parameter(w.detach().T, requires_grad=w.requires_grad)  # (out, in)
    if module.bias is not None:
        view.bias = nn.Parameter(module.bias.detach(), requires_grad=module.bias.requires_grad)
    return view


def _take_over(old: nn.Module, new: MaskedLinear) -> None:
    """Give ``new`` the children (an SPF delta), hooks and mode of the layer it replaces."""
    for name, child in old.named_children():
        new.add_module(name, child)
    for table in _HOOKS:
        setattr(new, table, getattr(old, table))
    new.train(old.training)


def outsource(module: nn.Module, host: Host, cfg: MaskingConfig | None = None, *,
              prefix: str = "") -> Outsourced:
    """Replace every frozen backbone linear of ``module`` in place by a :class:`MaskedLinear`
    on ``host`` (id: ``prefix`` + its path in ``module``), sharing one :class:`MaskingStats`.

    A host with a ``register(layer_id, linear)`` method (:class:`~phalanx.split.masking.
    LocalHost`) is given each layer's weight; any other host must already hold them (they are
    public to it). Raises :class:`ConfigError` for a layer that is not float32/float64."""
    cfg = MaskingConfig() if cfg is None else cfg
    parts = {id(p) for p in _adapter_parameters(module)}  # trainable parts, frozen or not
    register = getattr(host, "register", None)
    done = Outsourced(module=module, layers={})
    todo: list[tuple[str, nn.Module, nn.Linear, MaskedLinear]] = []
    for name, m in module.named_modules():
        linear = _as_linear(m)
        own = list(m.parameters(recurse=False))  # not an SPF delta held as a child
        if linear is None or not name or any(id(p) in parts for p in own):
            continue
        if any(p.requires_grad for p in own):
            done.kept.append(name)
            continue
        masked = MaskedLinear(linear, host, layer_id=prefix + name, config=cfg, stats=done.stats)
        todo.append((name, m, linear, masked))  # every layer validated before any is replaced
    if not todo and not done.kept:
        raise ConfigError(f"{type(module).__name__} has no linear layer to outsource")
    for name, m, linear, masked in todo:
        if callable(register):
            register(masked.layer_id, linear)
        _take_over(m, masked)
        parent, _, leaf = name.rpartition(".")
        module.get_submodule(parent).register_module(leaf, masked)
        done.layers[masked.layer_id] = masked
    return done
