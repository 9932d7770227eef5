"""Trainable parts of split fine-tuning: LoRA (peft), P-tuning v2 prefixes, SPF, their config
and their state, on the tiny random models."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from phalanx.errors import ConfigError, PhalanxError
from phalanx.models import ModelConfig, load_model, partition
from phalanx.models.stages import lm_loss
from phalanx.split.lora import ATTENTION_TARGETS, MLP_TARGETS, add_lora
from phalanx.split.parts import count_trainable, trainable_parameters
from phalanx.split.ptuning import _cache_kwarg, add_prefixes
from phalanx.split.spf import (
    SparseDelta,
    add_spf,
    channel_scores,
    head_scores,
    head_slices,
    top_fraction,
)
from phalanx.split.trainable import (
    TrainableConfig,
    apply_trainable,
    load_trainable_state,
    trainable_state,
)

B, T = 2, 6


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(name: str = "tiny", attn: str = "sdpa", seed: int = 0):  # noqa: ANN201
    """A tiny random model (float32, no dropout) and its family."""
    lm = load_model(ModelConfig(name=name, seed=seed, dropout=0.0))
    lm.model.config._attn_implementation = attn
    return lm.model, lm.family


def two_stages(seed: int = 0):  # noqa: ANN201
    model, family = tiny(seed=seed)
    return model, partition(model, family, 2)


def ids_batch() -> torch.Tensor:
    return torch.randint(0, 257, (B, T), generator=torch.Generator().manual_seed(1))  # (B, T)


def hidden_batch() -> torch.Tensor:
    return torch.randn(B, T, 64, generator=torch.Generator().manual_seed(2))  # (B, T, C)


def adam_step(stage, x: torch.Tensor, ids: torch.Tensor, weight_decay: float = 0.0) -> None:  # noqa: ANN001
    opt = torch.optim.AdamW([p for _, p in trainable_parameters(stage)], lr=1e-2,
                            weight_decay=weight_decay)
    lm_loss(stage(x), ids).backward()
    opt.step()


def frozen_copy(stage) -> dict[str, torch.Tensor]:  # noqa: ANN001
    return {n: p.detach().clone() for n, p in stage.named_parameters() if not p.requires_grad}


def assert_bitwise_unchanged(stage, before: dict[str, torch.Tensor]) -> None:  # noqa: ANN001
    now = dict(stage.named_parameters())
    changed = [n for n, t in before.items() if not torch.equal(now[n], t)]
    assert not changed, f"frozen parameters changed: {changed}"


# --- LoRA ---------------------------------------------------------------------------------

def test_lora_trains_only_adapters_and_their_count_is_the_rank_formula():
    model, stages = two_stages()
    last, r = stages[1], 4
    add_lora(last, rank=r, alpha=8, targets=ATTENTION_TARGETS + MLP_TARGETS)
    names = [n for n, _ in trainable_parameters(last)]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert not last.head.weight.requires_grad and not last.norm.weight.requires_grad
    c = model.config
    hd = c.hidden_size // c.num_attention_heads
    q, kv, i = c.num_attention_heads * hd, c.num_key_value_heads * hd, c.intermediate_size
    C = c.hidden_size
    per_layer = r * ((C + q) + 2 * (C + kv) + (q + C) + 2 * (C + i) + (i + C))
    assert count_trainable(last) == len(last.blocks) * per_layer


@pytest.mark.parametrize(("name", "targets"), [("tiny", ATTENTION_TARGETS),
                                               ("tiny-gpt2", ("c_attn", "c_proj"))])
def test_lora_b_starts_at_zero_so_the_stage_computes_the_base(name, targets):
    model, family = tiny(name)
    stages = partition(model, family, 2)
    x = hidden_batch()
    base = stages[1](x)
    add_lora(stages[1], rank=8, alpha=16, targets=targets)
    assert all(p.abs().sum() == 0 for n, p in trainable_parameters(stages[1]) if "lora_B" in n)
    assert torch.equal(stages[1](x), base)


def test_lora_step_changes_the_output_and_leaves_base_weights_bitwise():
    _, stages = two_stages()
    last, x, ids = stages[1], hidden_batch(), ids_batch()
    add_lora(last, rank=4, alpha=8, targets=["q_proj", "v_proj"])
    before, out0 = frozen_copy(last), last(x).detach()
    adam_step(last, x, ids, weight_decay=0.1)
    assert not torch.allclose(last(x), out0)
    assert_bitwise_unchanged(last, before)


def test_lora_targets_that_match_nothing_are_a_config_error():
    _, stages = two_stages()
    with pytest.raises(ConfigError, match="LoRA targets"):
        add_lora(stages[1], rank=4, alpha=8, targets=["no_such_proj"])


# --- P-tuning v2 --------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "attn", "hidden"),
                         [("tiny", "sdpa", 0), ("tiny", "eager", 0), ("tiny", "sdpa", 8),
                          ("tiny-gpt2", "sdpa", 0)])
def test_prefixes_equal_hugging_face_past_key_values_path(name, attn, hidden):
    """Our hook == the model's own cache path with the prefixes as past keys/values, a mask
    that lets every query see every prefix, and positions 0..T-1 for the tokens."""
    from transformers import DynamicCache

    model, family = tiny(name, attn)
    reference = copy.deepcopy(model)
    stages = partition(model, family, 2)
    ids, P = ids_batch(), 3
    prefixes = [p for s in stages for p in add_prefixes(s, length=P, hidden=hidden, std=1.0)]
    out = stages[1](stages[0](ids))  # (B, T, V)
    cache = DynamicCache(config=reference.config)
    for j, prefix in enumerate(prefixes):
        k, v = (t.detach().expand(B, -1, -1, -1) for t in prefix())  # (B, H_kv, P, D)
        cache.update(k, v, j)
    want = reference(ids, attention_mask=torch.ones(B, P + T, dtype=torch.long),
                     position_ids=torch.arange(T)[None],
                     **{_cache_kwarg(type(reference)): cache}).logits
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, reference(ids).logits, atol=1e-3)  # the prefixes matter


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_zero_length_prefix_computes_the_base(attn):
    model, family = tiny(attn=attn)
    stage = partition(model, family, 1)[0]
    ids = ids_batch()
    base = stage(ids)
    add_prefixes(stage, length=0)
    torch.testing.assert_close(stage(ids), base, rtol=0, atol=1e-6)


@pytest.mark.parametrize("hidden", [0, 8])
def test_only_prefixes_train_and_every_layer_gets_a_gradient(hidden):
    _, stages = two_stages()
    prefixes = [p for s in stages for p in add_prefixes(s, length=4, hidden=hidden)]
    ids = ids_batch()
    lm_loss(stages[1](stages[0](ids)), ids).backward()
    for s in stages:
        names = [n for n, _ in trainable_parameters(s)]
        assert names and all(".self_attn.prefix." in n for n in names)
        assert all(p.grad is None for p in s.parameters() if not p.requires_grad)
    assert len(prefixes) == 4
    for prefix in prefixes:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prefix.parameters())


def test_a_deepcopied_stage_uses_its_own_prefixes():
    """The duplicated block's replica is a deepcopy: its hooks must read its own prefixes."""
    _, stages = two_stages()
    last, x = stages[1], hidden_batch()
    add_prefixes(last, length=2, std=1.0)
    replica = copy.deepcopy(last)
    torch.testing.assert_close(replica(x), last(x), rtol=0, atol=0)
    out = last(x).detach()
    with torch.no_grad():
        replica.blocks[0].self_attn.prefix.value.add_(1.0)
    assert not torch.allclose(replica(x), out)
    assert torch.equal(last(x), out)


# --- SPF ----------------------------------------------------------------------------------

def test_head_and_channel_scores_by_hand_and_top_fraction():
    H, D, C = 4, 2, 3
    q = torch.zeros(H * D, C)
    o = torch.zeros(C, H * D)
    q[2 * D] = -5.0  # head 2: |q| = 15
    o[:, 1 * D] = 2.0  # head 1: |o| = 6
    q[0, 0] = 6.0  # head 0: 6, ties with head 1
    assert head_scores(q, o, H).tolist() == [6.0, 6.0, 15.0, 0.0]
    assert top_fraction(head_scores(q, o, H), 0.5).tolist() == [0, 2]  # tie: lower index
    assert top_fraction(head_scores(q, o, H), 0.01).tolist() == [2]  # at least one
    assert top_fraction(head_scores(q, o, H), 1.0).tolist() == [0, 1, 2, 3]
    gate, up, down = torch.zeros(5, C), torch.zeros(5, C), torch.zeros(C, 5)
    gate[3], up[1, 0], down[:, 4] = 1.0, -2.0, -0.5
    assert channel_scores(gate, up, down).tolist() == [0.0, 2.0, 0.0, 3.0, 1.5]
    assert top_fraction(channel_scores(gate, up, down), 0.4).tolist() == [1, 3]
    assert head_slices(torch.tensor([0, 2]), D).tolist() == [0, 1, 4, 5]


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.01, math.nan, math.inf])
def test_spf_fraction_outside_the_unit_interval_is_a_config_error(fraction):
    _, stages = two_stages()
    with pytest.raises(ConfigError, match="spf_fraction"):
        add_spf(stages[1], fraction=fraction)
    with pytest.raises(ConfigError, match="spf_fraction"):
        TrainableConfig(method="lora+spf", spf_fraction=fraction).validate()


def test_spf_on_a_model_without_llama_layers_is_a_config_error():
    model, family = tiny("tiny-gpt2")
    with pytest.raises(ConfigError, match="no Llama-family decoder layer"):
        add_spf(partition(model, family, 2)[1], fraction=0.5)


def test_spf_selects_the_heaviest_head_and_counts_its_entries():
    model, stages = two_stages()
    last, c = stages[1], model.config
    attn = last.blocks[0].self_attn
    D = attn.head_dim
    with torch.no_grad():
        attn.q_proj.weight[3 * D:4 * D] *= 100  # head 3 is by far the heaviest
    add_spf(last, fraction=0.25)  # one head of four, 32 channels of 128
    q_delta = attn.q_proj.spf
    assert q_delta.index.tolist() == list(range(3 * D, 4 * D))
    assert attn.o_proj.spf.index.tolist() == q_delta.index.tolist()
    heads, channels = 1, 32
    per_layer = 2 * heads * D * c.hidden_size + 3 * channels * c.hidden_size
    assert count_trainable(last) == len(last.blocks) * per_layer
    assert all(".spf.delta" in n for n, _ in trainable_parameters(last))


def test_spf_step_changes_only_the_selected_rows_and_columns():
    _, stages = two_stages()
    last, x, ids = stages[1], hidden_batch(), ids_batch()
    deltas = add_spf(last, fraction=0.5)
    before, out0 = frozen_copy(last), last(x).detach()
    assert torch.equal(last(x), out0)
    adam_step(last, x, ids, weight_decay=0.1)
    assert_bitwise_unchanged(last, before)
    assert not torch.allclose(last(x), out0)
    for d in deltas:  # every selected slice moved: the gradient reached it
        assert (d.delta.abs().sum(dim=1 - d.dim) > 0).all()
    # each layer computes x @ (W + scatter(delta)).T: selected rows/columns only, the right ones
    for name, lin in last.named_modules():
        if isinstance(getattr(lin, "spf", None), SparseDelta):
            d = lin.spf
            dense = d.dense(lin.weight.shape)
            other = torch.ones(lin.weight.shape[d.dim], dtype=torch.bool)
            other[d.index] = False
            assert (dense.index_select(d.dim, other.nonzero()[:, 0]) == 0).all(), name
            xin = torch.randn(3, lin.in_features)
            torch.testing.assert_close(lin(xin), xin @ (lin.weight + dense).T, msg=name)


def test_spf_and_lora_compose_in_either_order():
    """peft freezes everything that is not its own adapter; the SPF deltas must survive."""
    sets = []
    for order in ("lora-first", "spf-first"):
        _, stages = two_stages()
        steps = [lambda s: add_lora(s, rank=2, alpha=4, targets=["o_proj"]),
                 lambda s: add_spf(s, fraction=0.5)]
        for step in steps if order == "lora-first" else steps[::-1]:
            step(stages[1])
        names = sorted(n.replace(".base_layer", "") for n, _ in trainable_parameters(stages[1]))
        sets.append(names)
    assert sets[0] == sets[1]
    assert any(".lora_A." in n for n in sets[0]) and any(".spf.delta" in n for n in sets[0])


# --- config, apply, state -----------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(method="adapter"), "trainable.method"),
    (dict(method="lora+lora"), "trainable.method"),
    (dict(method="full+lora"), "trainable.method"),
    (dict(lora_rank=0), "lora_rank"),
    (dict(lora_alpha=0.0), "lora_alpha"),
    (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(lora_targets=[]), "lora_targets"),
    (dict(prefix_len=0), "prefix_len"),
    (dict(prefix_hidden=-1), "prefix_hidden"),
    (dict(spf_parts=["heads", "embeddings"]), "spf_parts"),
])
def test_bad_trainable_config_names_the_key(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TrainableConfig(**kwargs).validate()


def test_method_parts_apply_in_a_fixed_order():
    assert TrainableConfig(method="spf + ptuning+lora").parts() == ["lora", "ptuning", "spf"]
    assert TrainableConfig(method="full").parts() == []


def test_apply_trainable_summarises_each_part():
    _, stages = two_stages()
    last = stages[1]
    total_before = sum(p.numel() for p in last.parameters())
    s = apply_trainable(last, TrainableConfig(method="lora+ptuning+spf", lora_rank=2,
                                              prefix_len=3, spf_fraction=0.25))
    assert set(s.by_part) == {"lora", "ptuning", "spf"} and all(s.by_part.values())
    assert s.count == sum(s.by_part.values()) == count_trainable(last)
    assert s.by_part["ptuning"] == len(last.blocks) * 2 * 2 * 3 * 16  # 2 KV heads, D = 16
    assert s.total == total_before + s.count
    assert s.names == [n for n, _ in trainable_parameters(last)]


def test_full_method_trains_every_parameter():
    _, stages = two_stages()
    s = apply_trainable(stages[1], TrainableConfig(method="full"))
    assert s.count == s.total == sum(p.numel() for p in stages[1].parameters())


def test_trainable_state_round_trips_into_a_fresh_copy():
    cfg = TrainableConfig(method="lora+ptuning+spf", lora_rank=2, prefix_len=2, spf_fraction=0.5)
    _, trained = two_stages()
    apply_trainable(trained[1], cfg)
    with torch.no_grad():  # as if trained: every trainable entry moves
        for _, p in trainable_parameters(trained[1]):
            p.add_(torch.randn_like(p))
    state = trainable_state(trained[1])
    assert not any(n.endswith("base_layer.weight") or n.startswith("head.") for n in state)
    assert any(n.endswith(".spf.index") for n in state)  # where the deltas go travels along
    _, fresh = two_stages()
    apply_trainable(fresh[1], cfg)
    x = hidden_batch()
    assert not torch.allclose(fresh[1](x), trained[1](x))
    load_trainable_state(fresh[1], state)
    assert torch.equal(fresh[1](x), trained[1](x))


def test_trainable_state_refuses_another_configuration():
    _, a = two_stages()
    _, b = two_stages()
    apply_trainable(a[1], TrainableConfig(method="lora", lora_rank=2))
    apply_trainable(b[1], TrainableConfig(method="lora", lora_rank=4))
    with pytest.raises(PhalanxError, match=r"\(2, 64\); the model.s is torch.float32 \(4, 64\)"):
        load_trainable_state(b[1], trainable_state(a[1]))
    _, c = two_stages()
    apply_trainable(c[1], TrainableConfig(method="ptuning"))
    with pytest.raises(PhalanxError, match="missing"):
        load_trainable_state(c[1], trainable_state(a[1]))
