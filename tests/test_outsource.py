"""Masked outsourcing of a server's frozen linear layers, end to end on the tiny models
(phalanx.split.outsource)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from phalanx.errors import ConfigError
from phalanx.models import ModelConfig, load_model, partition
from phalanx.models.stages import StageModule
from phalanx.split.freivalds import HostMisbehaved
from phalanx.split.lora import ATTENTION_TARGETS, MLP_TARGETS
from phalanx.split.masking import LocalHost, MaskedLinear, MaskingConfig
from phalanx.split.outsource import Outsourced, enclave_bytes, outsource
from phalanx.split.parts import trainable_parameters
from phalanx.split.trainable import TrainableConfig, apply_trainable

B, T, C = 2, 6, 64
REL_TOL = 5e-4
"""Masked vs unmasked, per tensor: max |masked - plain| <= 5e-4 · max |plain| (fp32). Measured
on two tiny blocks over 5 seeds: outputs and input gradients <= 3e-6, gradients of trainable
parameters <= 4.6e-5 (LoRA, LoRA+SPF, P-tuning, GPT-2 LoRA)."""
LINEARS = {"llama": 7, "gpt2": 4}  # backbone linears per block: q/k/v/o + gate/up/down; c_*


pytestmark = pytest.mark.usefixtures("one_thread")


class SpyHost(LocalHost):
    """An honest host that records what it is registered and sent, per layer and direction."""

    def __init__(self) -> None:
        super().__init__()
        self.registered: dict[str, nn.Linear] = {}
        self.seen: list[tuple[str, str, Tensor]] = []

    def register(self, layer_id: str, linear: nn.Linear) -> None:
        self.registered[layer_id] = linear
        super().register(layer_id, linear)

    def matmul(self, layer_id: str, x: Tensor) -> Tensor:
        self.seen.append((layer_id, "forward", x.clone()))
        return super().matmul(layer_id, x)

    def matmul_t(self, layer_id: str, g: Tensor) -> Tensor:
        self.seen.append((layer_id, "backward", g.clone()))
        return super().matmul_t(layer_id, g)


class TamperingHost(LocalHost):
    """An honest host whose ``direction`` result of call number ``at`` goes through ``bad``."""

    def __init__(self, direction: str, bad: Callable[[Tensor], object], at: int = 3) -> None:
        super().__init__()
        self.direction, self.bad, self.at, self.calls = direction, bad, at, 0

    def _maybe(self, direction: str, y: Tensor) -> Tensor:
        if direction != self.direction:
            return y
        self.calls += 1
        return self.bad(y) if self.calls == self.at else y  # type: ignore[return-value]

    def matmul(self, layer_id: str, x: Tensor) -> Tensor:
        return self._maybe("forward", super().matmul(layer_id, x))

    def matmul_t(self, layer_id: str, g: Tensor) -> Tensor:
        return self._maybe("backward", super().matmul_t(layer_id, g))


def one_entry(y: Tensor) -> Tensor:
    y = y.clone()
    y.view(-1)[5] += 1e-2 * float(y.abs().max())
    return y


def server(method: str = "lora", name: str = "tiny", **trainable: object) -> StageModule:
    """The middle stage (blocks 1 and 2) of a tiny fp32 model with ``method``'s trainable parts,
    all set to random non-zero values so that every one of them changes the output."""
    lm = load_model(ModelConfig(name=name, seed=0, dropout=0.0))
    lm.model.requires_grad_(False)
    stage = partition(lm.model, lm.family, 3, cuts=[1, 3])[1]
    if "lora" in method and "lora_targets" not in trainable:
        trainable["lora_targets"] = list(ATTENTION_TARGETS + MLP_TARGETS)
    apply_trainable(stage.blocks, TrainableConfig(method=method, prefix_len=3, **trainable))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in trainable_parameters(stage):
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return stage


def masked_pair(method: str = "lora", host: LocalHost | None = None, name: str = "tiny",
                **trainable: object) -> tuple[StageModule, StageModule, Outsourced]:
    """(unmasked copy, masked stage, what was outsourced)."""
    stage = server(method, name, **trainable)
    plain = copy.deepcopy(stage)
    done = outsource(stage.blocks, LocalHost() if host is None else host, MaskingConfig())
    return plain, stage, done


def inputs(seed: int = 4) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, C, generator=gen), torch.randn(B, T, C, generator=gen)  # (B, T, C)


def step(stage: nn.Module, x: Tensor, w: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Output, input gradient and trainable gradients of the loss ``sum(stage(x) * w)``."""
    x = x.clone().requires_grad_(True)
    y = stage(x)  # (B, T, C)
    (y * w).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in trainable_parameters(stage)}


def assert_near(got: Tensor, want: Tensor, what: str) -> None:
    err, scale = float((got - want).abs().max()), float(want.abs().max())
    assert scale > 0, f"{what} is zero: the comparison would prove nothing"
    assert err <= REL_TOL * scale, f"{what}: max error {err:.3g} > {REL_TOL} x {scale:.3g}"


@pytest.mark.parametrize(("method", "name", "extra"), [
    ("lora", "tiny", {}), ("lora+spf", "tiny", {}), ("ptuning", "tiny", {}),
    ("ptuning", "tiny", {"prefix_hidden": 8}),
    ("lora", "tiny-gpt2", {"lora_targets": ["c_attn", "c_proj"]}),
])
def test_masked_blocks_give_the_same_output_and_gradients_as_unmasked(method, name, extra):
    plain, masked, done = masked_pair(method, name=name, **extra)
    family = plain.family
    assert len(done.layers) == LINEARS[family] * len(masked.blocks) and not done.kept
    x, w = inputs()
    y0, gx0, grads0 = step(plain, x, w)
    y1, gx1, grads1 = step(masked, x, w)
    assert_near(y1, y0, "output")
    assert_near(gx1, gx0, "input gradient")
    assert grads0 and grads1.keys() == grads0.keys()
    for n, g in grads0.items():
        assert_near(grads1[n], g, f"gradient of {n}")
    s = done.stats
    assert s.checks == s.masks_used == 2 * len(done.layers)  # every layer forward and backward


def test_spf_deltas_move_with_their_hook_onto_the_masked_layer():
    _, masked, done = masked_pair("lora+spf")
    spf = [m for m in done.layers.values() if hasattr(m, "spf")]
    assert len(spf) == 5 * len(masked.blocks)  # q, o, gate, up, down carry a delta
    assert all(m.spf.delta.requires_grad for m in spf)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_host_corrupting_one_entry_of_one_product_is_caught(direction):
    host = TamperingHost(direction, one_entry)
    _, masked, _ = masked_pair("lora+spf", host=host)
    x, w = inputs()
    with pytest.raises(HostMisbehaved, match="Freivalds") as caught:
        step(masked, x, w)
    assert caught.value.direction == direction and host.calls == host.at


@pytest.mark.parametrize(("bad", "why"), [
    (lambda y: y[..., :-1], "shape"), (lambda y: y.double(), "dtype"),
    (lambda y: y.masked_fill(y > 0, float("nan")), "non-finite"),
])
def test_malformed_host_result_is_refused_at_model_level(bad, why):
    _, masked, _ = masked_pair("lora", host=TamperingHost("forward", bad, at=1))
    x, _ = inputs()
    with pytest.raises(HostMisbehaved, match=why):
        masked(x)


def test_host_never_sees_the_clear_activations_or_gradients():
    host = SpyHost()
    _, masked, done = masked_pair("lora+spf", host=host)
    clear: list[tuple[str, str, Tensor]] = []
    for layer_id, layer in done.layers.items():
        layer.register_forward_pre_hook(
            lambda m, args, i=layer_id: clear.append((i, "forward", args[0].detach().clone())))
        layer.register_full_backward_pre_hook(
            lambda m, grad, i=layer_id: clear.append((i, "backward", grad[0].detach().clone())))
    x, w = inputs()
    step(masked, x, w)
    assert len(host.seen) == len(clear) == 2 * len(done.layers)
    secret = {(i, d): t for i, d, t in clear}
    for layer_id, direction, sent in host.seen:
        e = secret[(layer_id, direction)]
        ratio = torch.linalg.vector_norm(sent - e, dim=-1) / torch.linalg.vector_norm(e, dim=-1)
        assert float(ratio.min()) > 16, (layer_id, direction)  # mask >= 64 x each row's RMS
        cos = torch.nn.functional.cosine_similarity(sent.flatten(), e.flatten(), dim=0)
        assert abs(float(cos)) < 0.3, (layer_id, direction)  # ~1/64 + N(0, 1/√numel)


def test_identical_inputs_are_sent_under_fresh_masks():
    host = SpyHost()
    _, masked, _ = masked_pair("lora", host=host)
    x, _ = inputs()
    with torch.no_grad():
        y1, y2 = masked(x), masked(x)
    half = len(host.seen) // 2
    assert half and len(host.seen) == 2 * half
    for (id1, _, a), (id2, _, b) in zip(host.seen[:half], host.seen[half:], strict=True):
        assert id1 == id2 and not torch.allclose(a, b, rtol=0.1, atol=0.0)
    assert_near(y2, y1, "second output")


def test_frozen_backbone_is_outsourced_trainable_parts_never():
    stage = server("lora+spf")
    before = sum(p.numel() * p.element_size() for p in stage.blocks.parameters())
    frozen = {n: p for n, p in stage.blocks.named_parameters() if not p.requires_grad}
    trainable = dict(trainable_parameters(stage.blocks))
    keys = stage.state_dict().keys()
    host = SpyHost()
    done = outsource(stage.blocks, host, MaskingConfig(), prefix="server.")
    assert set(host.registered) == set(done.layers)
    assert all(i.startswith("server.") and "lora_" not in i for i in done.layers)
    for linear in host.registered.values():
        assert not linear.weight.requires_grad
        assert all(linear.weight.data_ptr() != p.data_ptr() for p in trainable.values())
    assert set(dict(trainable_parameters(stage.blocks))) == set(trainable)  # all still inside
    assert stage.state_dict().keys() == keys  # outsourced weights stay as buffers of one name
    outsourced = {n for n in frozen if n.endswith("_proj.weight")
                  or n.endswith("_proj.base_layer.weight")}
    assert len(outsourced) == LINEARS["llama"] * len(stage.blocks)
    acct = done.bytes()
    assert acct == enclave_bytes(stage.blocks) and acct.total == before
    assert acct.outsourced == sum(frozen[n].numel() * 4 for n in outsourced)
    assert acct.trainable == sum(p.numel() * 4 for p in trainable.values())
    assert acct.frozen == sum(p.numel() * 4 for n, p in frozen.items() if n not in outsourced)


def test_trainable_linears_are_kept_inside_even_when_frozen():
    """method=full trains every linear: none can go out. A reparameterised prefix's MLP is a
    trainable part: it stays in the enclave even while frozen."""
    stage = server("full")
    done = outsource(stage.blocks, LocalHost(), MaskingConfig())
    assert not done.layers and len(done.kept) == LINEARS["llama"] * len(stage.blocks)
    assert done.bytes().outsourced == 0
    stage = server("ptuning", prefix_hidden=8)
    stage.requires_grad_(False)
    done = outsource(stage.blocks, LocalHost(), MaskingConfig())
    assert all(".prefix." not in i for i in done.layers) and not done.kept
    prefix = [m for n, m in stage.blocks.named_modules() if ".prefix." in n]
    assert sum(type(m) is nn.Linear for m in prefix) == 2 * len(stage.blocks)
    assert not any(isinstance(m, MaskedLinear) for m in prefix)


def test_precomputed_masks_serve_a_step_with_no_online_draw():
    _, masked, done = masked_pair("lora")
    added = done.precompute(B, T, count=1)
    assert added == 2 * len(done.layers) and done.stats.offline_s > 0
    x, w = inputs()
    step(masked, x, w)
    s = done.stats
    assert s.pool_misses == 0 and s.masks_used == added and s.online_s > 0
    assert s.bytes_to_host == s.bytes_from_host == sum(
        B * T * (m.in_features + m.out_features) * 4 for m in done.layers.values())


def test_low_precision_backbone_is_a_config_error():
    stage = server("lora").to(torch.bfloat16)
    with pytest.raises(ConfigError, match="float32"):
        outsource(stage.blocks, LocalHost(), MaskingConfig())
    assert not any(isinstance(m, MaskedLinear) for m in stage.modules())


def test_module_without_a_linear_layer_is_a_config_error():
    with pytest.raises(ConfigError, match="no linear layer"):
        outsource(nn.Sequential(nn.LayerNorm(C), nn.GELU()), LocalHost())
