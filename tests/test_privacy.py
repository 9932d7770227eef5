"""Inversion attacks on what an untrusted stage receives, defenses at the cut, leakage metrics."""

from __future__ import annotations

import math
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from phalanx.errors import ConfigError, PhalanxError
from phalanx.models import ModelConfig, lm_loss, load_model, partition
from phalanx.models.stages import blocks_of
from phalanx.privacy import (
    DPForward,
    ExactSearch,
    NoisyCut,
    Prefix,
    add_noise,
    context_free_tables,
    cut_hidden,
    exact_sequence_match,
    finetuned_copy,
    fit_decoder,
    gaussian_cut,
    labels_from_head_grad,
    labels_from_logit_grad,
    labels_from_stage_grad,
    layer_input_candidates,
    leakage,
    nearest_embedding,
    perturbed_copy,
    public_head,
    rouge_l,
    token_f1,
    token_recovery,
    tokens_from_weight_grad,
)
from phalanx.privacy.accounting import gaussian_epsilon
from phalanx.privacy.metrics import lcs_length
from phalanx.privacy.search import packed_mask


@pytest.fixture(scope="module")
def tiny():
    lm = load_model(ModelConfig(name="tiny"))
    lm.model.eval()
    return lm


@pytest.fixture(scope="module")
def held_out(tiny) -> torch.Tensor:
    """Two sequences of 16 byte tokens of the pydoc topics (the victim's private text)."""
    from pydoc_data.topics import topics

    return torch.tensor(tiny.tokenizer.encode(topics["assert"][:32])).view(2, 16)


@pytest.fixture(scope="module")
def public_blocks(tiny) -> torch.Tensor:
    """The attacker's public text: docstrings of a few standard-library modules."""
    from phalanx.data.stdlib import module_docstrings

    root = Path(sysconfig.get_paths()["stdlib"])
    text = " ".join(doc for name in ("json/__init__.py", "textwrap.py", "string.py", "shlex.py")
                    for doc in module_docstrings((root / name).read_text()))
    ids = torch.tensor(tiny.tokenizer.encode(text))
    n = len(ids) // 32
    return ids[: n * 32].view(n, 32)


def _embedding(lm) -> torch.Tensor:  # noqa: ANN001
    return lm.model.get_input_embeddings().weight


# --- metrics ------------------------------------------------------------------------------


def test_token_recovery_counts_matching_positions_over_the_true_length() -> None:
    assert token_recovery([1, 2, 3], [1, 2, 4, 5]) == 0.5
    assert token_recovery(torch.tensor([7, 8]), torch.tensor([7, 8])) == 1.0
    assert token_recovery([1, 2, 3, 9], [1, 2]) == 1.0  # extra predictions are not counted
    assert token_recovery([], []) == 1.0 and token_recovery([1], []) == 0.0


def test_exact_sequence_match_only_for_identical_sequences() -> None:
    assert exact_sequence_match([1, 2, 3], torch.tensor([1, 2, 3])) == 1.0
    assert exact_sequence_match([1, 2, 3], [1, 2]) == 0.0
    assert exact_sequence_match([1, 3, 2], [1, 2, 3]) == 0.0


def test_token_f1_ignores_order_and_counts_repeats() -> None:
    assert token_f1([3, 2, 1], [1, 2, 3]) == 1.0
    assert token_f1([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / 3)  # P = R = 2/3
    assert token_f1([4, 5], [1, 2]) == 0.0
    assert token_f1([], []) == 1.0


def test_rouge_l_is_the_f1_of_the_longest_common_subsequence() -> None:
    assert lcs_length(list(b"ABCBDAB"), list(b"BDCABA")) == 4
    assert rouge_l([1, 3, 2, 4], [1, 2, 3, 4]) == pytest.approx(0.75)  # LCS 3 of 4 and 4
    assert rouge_l([1, 2], [1, 2, 3, 4]) == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert rouge_l([5], [1, 2]) == 0.0


def test_leakage_averages_every_metric_over_sequences() -> None:
    out = leakage([[1, 2], [3, 4]], [[1, 2], [4, 3]])
    assert out == {"token_recovery": 0.5, "exact_match": 0.5, "token_f1": 1.0,
                   "rouge_l": pytest.approx(0.75)}
    with pytest.raises(ValueError):
        leakage([[1]], [])


# --- what the stage receives --------------------------------------------------------------


def test_cut_hidden_is_what_the_pipeline_first_stage_sends(tiny, held_out) -> None:
    stage0 = partition(tiny.model, tiny.family, 2, [2])[0]
    with torch.no_grad():
        sent = stage0(held_out)
    assert torch.allclose(cut_hidden(tiny.model, tiny.family, held_out, 2), sent, atol=1e-6)
    assert torch.equal(cut_hidden(tiny.model, tiny.family, held_out, 0),
                       _embedding(tiny)[held_out])


def test_packed_candidates_equal_separate_runs(tiny, held_out) -> None:
    search = ExactSearch(Prefix(tiny.model, tiny.family, 2))
    recovered = held_out[0, :5].tolist()
    cands = torch.tensor([3, 65, 101, 200])
    got = search.candidates(recovered, cands)
    for row, c in zip(got, cands.tolist(), strict=True):
        alone = cut_hidden(tiny.model, tiny.family, torch.tensor([recovered + [c]]), 2)[0, -1]
        assert torch.allclose(row, alone, atol=1e-5)
    assert packed_mask(2, 2)[0, 0].tolist() == [[True, False, False, False],
                                                [True, True, False, False],
                                                [True, True, True, False],
                                                [True, True, False, True]]


# --- attacks on activations ---------------------------------------------------------------


@pytest.mark.parametrize("cut", [0, 1])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_nearest_embedding_recovers_tokens_at_shallow_cuts(tiny, held_out, cut, metric) -> None:
    hidden = cut_hidden(tiny.model, tiny.family, held_out, cut)
    pred = nearest_embedding(hidden, _embedding(tiny), metric=metric)
    assert pred.shape == held_out.shape
    want = 1.0 if cut == 0 else 0.9
    assert leakage(list(pred), list(held_out))["token_recovery"] >= want


@pytest.mark.parametrize(("name", "cut"), [("tiny", 1), ("tiny", 2), ("tiny-gpt2", 2)])
def test_exact_search_recovers_every_token_when_weights_match(name, cut, held_out) -> None:
    lm = load_model(ModelConfig(name=name))
    lm.model.eval()
    hidden = cut_hidden(lm.model, lm.family, held_out, cut)
    results = ExactSearch(Prefix(lm.model, lm.family, cut))(hidden)
    assert leakage([r.tokens for r in results], list(held_out))["exact_match"] == 1.0
    assert all(r.matched(1e-3) == 1.0 for r in results)


def test_exact_search_stops_early_on_a_good_ranking(tiny, held_out) -> None:
    hidden = cut_hidden(tiny.model, tiny.family, held_out[:1], 1)
    result = ExactSearch(Prefix(tiny.model, tiny.family, 1), chunk=16)(hidden)[0]
    assert result.tokens == held_out[0].tolist()
    assert sum(result.evaluated) < held_out.shape[1] * 257 / 4  # far from the whole vocabulary


def test_table_ranker_puts_the_true_token_first_and_budget_caps_the_scan(tiny, held_out) -> None:
    hidden = cut_hidden(tiny.model, tiny.family, held_out[:1], 2)
    prefix = Prefix(tiny.model, tiny.family, 2)
    search = ExactSearch(prefix, chunk=8)
    search.rank = context_free_tables(prefix, [2], anchor=tiny.tokenizer.eos_id)[2]
    result = search(hidden)[0]
    assert result.tokens == held_out[0].tolist()
    assert sum(result.evaluated) <= held_out.shape[1] * 8 * 2
    capped = ExactSearch(Prefix(tiny.model, tiny.family, 2), budget=3)(hidden)[0]
    assert capped.evaluated == [3] * held_out.shape[1]


def test_exact_search_degrades_when_victim_weights_are_perturbed(tiny, held_out) -> None:
    victim = perturbed_copy(tiny.model, tiny.family, 2, rel_std=1.0, seed=1)
    hidden = cut_hidden(victim, tiny.family, held_out, 2)
    results = ExactSearch(Prefix(tiny.model, tiny.family, 2))(hidden)
    assert leakage([r.tokens for r in results], list(held_out))["token_recovery"] < 0.9
    assert all(r.matched(1e-3) == 0.0 for r in results)  # no exact match is left
    same = perturbed_copy(tiny.model, tiny.family, 2, rel_std=0.0)
    assert torch.equal(cut_hidden(same, tiny.family, held_out, 2),
                       cut_hidden(tiny.model, tiny.family, held_out, 2))


def test_finetuned_victim_leaves_no_exact_match(tiny, held_out) -> None:
    victim = finetuned_copy(tiny.model, tiny.family, 2, held_out, steps=3, lr=1e-2)
    changed = blocks_of(victim, "llama")[0].mlp.up_proj.weight
    assert not torch.equal(changed, blocks_of(tiny.model, "llama")[0].mlp.up_proj.weight)
    assert torch.equal(blocks_of(victim, "llama")[3].mlp.up_proj.weight,
                       blocks_of(tiny.model, "llama")[3].mlp.up_proj.weight)
    hidden = cut_hidden(victim, tiny.family, held_out[:1], 2)
    result = ExactSearch(Prefix(tiny.model, tiny.family, 2))(hidden)[0]
    assert result.matched(1e-3) == 0.0


def test_decoder_trained_on_stdlib_text_inverts_held_out_pydoc_text(
        tiny, held_out, public_blocks) -> None:
    decoder = fit_decoder(Prefix(tiny.model, tiny.family, 2), public_blocks, steps=100)
    hidden = cut_hidden(tiny.model, tiny.family, held_out, 2)
    assert leakage(list(decoder.decode(hidden)), list(held_out))["token_recovery"] >= 0.95
    mlp = fit_decoder(Prefix(tiny.model, tiny.family, 1), public_blocks, hidden=64, steps=100)
    hidden = cut_hidden(tiny.model, tiny.family, held_out, 1)
    assert leakage(list(mlp.decode(hidden)), list(held_out))["token_recovery"] >= 0.9


# --- defenses -----------------------------------------------------------------------------


def test_large_noise_at_the_cut_drops_recovery(tiny, held_out, public_blocks) -> None:
    hidden = cut_hidden(tiny.model, tiny.family, held_out, 1)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(add_noise(hidden, 0.0), hidden)
    noisy = add_noise(hidden, 10.0, generator=gen)
    embed = _embedding(tiny)
    assert leakage(list(nearest_embedding(noisy, embed)), list(held_out))["token_recovery"] < 0.3
    decoder = fit_decoder(Prefix(tiny.model, tiny.family, 1), public_blocks, steps=100)
    assert leakage(list(decoder.decode(noisy)), list(held_out))["token_recovery"] < 0.5


def test_noise_is_relative_to_each_tokens_rms() -> None:
    hidden = torch.cat([torch.ones(1, 4096), 100 * torch.ones(1, 4096)])
    diff = add_noise(hidden, 0.5, generator=torch.Generator().manual_seed(0)) - hidden
    assert diff[0].std().item() == pytest.approx(0.5, rel=0.05)
    assert diff[1].std().item() == pytest.approx(50.0, rel=0.05)


def test_dp_forward_clips_each_token_and_adds_noise_of_multiplier_times_clip() -> None:
    hidden = torch.randn(8, 4096) * 3
    clipped = DPForward(clip=1.0, noise_multiplier=0.0)(hidden)
    assert torch.allclose(clipped.norm(dim=-1), torch.ones(8), atol=1e-5)
    small = torch.full((1, 4), 0.1)
    assert torch.equal(DPForward(clip=1.0, noise_multiplier=0.0)(small), small)
    mech = DPForward(clip=2.0, noise_multiplier=0.5)
    noise = mech(hidden, generator=torch.Generator().manual_seed(0)) - \
        DPForward(clip=2.0, noise_multiplier=0.0)(hidden)
    assert mech.sigma == 1.0 and noise.std().item() == pytest.approx(1.0, rel=0.05)
    assert mech.sensitivity("token") == 4.0
    assert mech.sensitivity("sequence", seq_len=16) == pytest.approx(16.0)


def test_noisy_cut_wraps_the_first_stage_and_passes_gradients(tiny, held_out) -> None:
    stage0 = partition(tiny.model, tiny.family, 2, [1])[0]
    wrapped = NoisyCut(stage0, gaussian_cut(1.0, seed=0))
    out = wrapped(held_out)
    with torch.no_grad():
        clean = stage0(held_out)
    assert out.shape == clean.shape and not torch.allclose(out, clean)
    out.sum().backward()
    assert stage0.embed.weight.grad is not None and stage0.embed.weight.grad.abs().sum() > 0
    tiny.model.zero_grad(set_to_none=True)


def test_dp_forward_epsilon_comes_from_opacus() -> None:
    pytest.importorskip("opacus")
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for _ in range(10):
        acc.step(noise_multiplier=1.0, sample_rate=1.0)
    assert gaussian_epsilon(1.0, steps=10, delta=1e-5) == pytest.approx(acc.get_epsilon(1e-5))
    assert gaussian_epsilon(2.0, steps=10, delta=1e-5) < gaussian_epsilon(1.0, steps=10,
                                                                          delta=1e-5)
    assert gaussian_epsilon(1.0, steps=20, delta=1e-5) > gaussian_epsilon(1.0, steps=10,
                                                                          delta=1e-5)
    mech = DPForward(clip=1.0, noise_multiplier=8.0)  # z = 8 / (2 * sqrt(16)) = 1
    assert mech.epsilon(steps=10, delta=1e-5, seq_len=16) == pytest.approx(
        gaussian_epsilon(1.0, steps=10, delta=1e-5))
    assert DPForward(clip=1.0, noise_multiplier=0.0).epsilon(steps=1, delta=1e-5) == math.inf


def test_accounting_without_opacus_names_the_package(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "opacus", None)
    monkeypatch.setitem(sys.modules, "opacus.accountants", None)
    with pytest.raises(PhalanxError, match="pip install 'opacus"):
        gaussian_epsilon(1.0, steps=1, delta=1e-5)


# --- attacks on gradients -----------------------------------------------------------------


def test_logit_gradient_reveals_every_label(tiny, held_out) -> None:
    ids = held_out[:1]
    logits = tiny.model(ids).logits.detach().requires_grad_(True)
    lm_loss(logits, ids).backward()
    labels = labels_from_logit_grad(logits.grad[0])
    assert labels[:-1].tolist() == ids[0, 1:].tolist() and labels[-1] == -1


def test_gradient_at_the_head_input_reveals_every_label(tiny, held_out) -> None:
    ids = held_out[:1]
    hidden = cut_hidden(tiny.model, tiny.family, ids, 4)[0].clone().requires_grad_(True)
    head = public_head(tiny.model, tiny.family)
    lm_loss(head(hidden)[None], ids).backward()
    labels = labels_from_head_grad(hidden.grad, hidden.detach(), head)
    assert labels[:-1].tolist() == ids[0, 1:].tolist() and labels[-1] == -1


def test_gradient_at_a_cut_before_public_layers_reveals_every_label(tiny, held_out) -> None:
    ids = held_out[:1, :10]
    last = partition(tiny.model, tiny.family, 2, [3])[1]
    hidden = cut_hidden(tiny.model, tiny.family, ids, 3)[0].clone().requires_grad_(True)
    lm_loss(last(hidden[None]), ids).backward()
    labels = labels_from_stage_grad(hidden.grad, hidden.detach(), lambda h: last(h[None])[0])
    assert labels[:-1].tolist() == ids[0, 1:].tolist()
    tiny.model.zero_grad(set_to_none=True)


def test_weight_gradient_of_the_first_server_layer_reveals_the_token_set(tiny, held_out) -> None:
    ids = held_out[:1]
    v_proj = blocks_of(tiny.model, tiny.family)[0].self_attn.v_proj
    tiny.model.zero_grad(set_to_none=True)
    lm_loss(tiny.model(ids).logits, ids).backward()
    grad = v_proj.weight.grad.clone()
    tiny.model.zero_grad(set_to_none=True)
    found = tokens_from_weight_grad(grad, layer_input_candidates(tiny.model, tiny.family, 0))
    assert found == sorted(set(ids[0, :-1].tolist()))  # the last token has no gradient


def test_lora_a_gradient_reveals_tokens_once_b_is_nonzero(tiny) -> None:
    ids = torch.tensor([tiny.tokenizer.encode("abcabcabx")])
    v_proj = blocks_of(tiny.model, tiny.family)[0].self_attn.v_proj
    gen = torch.Generator().manual_seed(0)
    cands = layer_input_candidates(tiny.model, tiny.family, 0)
    found = {}
    for init in ("zero", "trained"):
        a = torch.randn(4, v_proj.in_features, generator=gen).requires_grad_(True)
        b = (torch.zeros(v_proj.out_features, 4) if init == "zero"
             else torch.randn(v_proj.out_features, 4, generator=gen))
        def lora(mod, inp, out, a=a, b=b):  # noqa: ANN001, ANN202 - y = W x + B A x
            return out + inp[0] @ a.T @ b.T

        hook = v_proj.register_forward_hook(lora)
        try:
            lm_loss(tiny.model(ids).logits, ids).backward()
        finally:
            hook.remove()
            tiny.model.zero_grad(set_to_none=True)
        found[init] = tokens_from_weight_grad(a.grad, cands)
    assert found["zero"] == []  # B = 0 at initialisation: grad A is zero
    assert found["trained"] == sorted(set(tiny.tokenizer.encode("abc")))


def _lora_grads(tiny, public_blocks, *, rank: int, steps: int) -> dict:  # noqa: ANN001
    from phalanx.privacy.lora_leak import lora_copy, lora_gradients

    model = lora_copy(tiny.model, tiny.family, 0, rank=rank, public=public_blocks, steps=steps)
    return lora_gradients(model, tiny.family, 0, torch.tensor(tiny.tokenizer.encode("abcabcabx")))


def test_stacked_q_k_v_lora_a_gradients_find_the_tokens_one_adapters_rank_misses(
        tiny, public_blocks) -> None:
    from phalanx.privacy.lora_leak import QKV, tokens_from_lora_a

    true = sorted(set(tiny.tokenizer.encode("abc")))  # 3 distinct inputs > rank 2
    cands = layer_input_candidates(tiny.model, tiny.family, 0)
    g = _lora_grads(tiny, public_blocks, rank=2, steps=3)
    assert tokens_from_lora_a([g[n].grad_a for n in QKV], cands) == true  # 3 x 2 >= 3
    assert tokens_from_lora_a([g["v_proj"].grad_a], cands) != true
    v_best = tokens_from_lora_a([g["v_proj"].grad_a], cands, top_rank=True)
    assert len(v_best) == 2 and token_f1(v_best, true) < 1.0


def test_lora_a_gradient_is_zero_at_initialisation_but_b_gradient_is_not(
        tiny, public_blocks) -> None:
    from phalanx.privacy.lora_leak import QKV, tokens_from_lora_a

    g = _lora_grads(tiny, public_blocks, rank=8, steps=0)
    cands = layer_input_candidates(tiny.model, tiny.family, 0)
    assert all(float(g[n].grad_a.abs().max()) == 0 for n in QKV)
    assert tokens_from_lora_a([g[n].grad_a for n in QKV], cands, top_rank=True) == []
    assert float(g["v_proj"].grad_b.abs().max()) > 0  # B's gradient does not need B


@pytest.mark.parametrize(("rank", "leaks"), [(8, True), (2, False)])
def test_lora_b_gradient_names_the_tokens_through_a_only_below_its_rank(
        tiny, public_blocks, rank, leaks) -> None:
    from phalanx.privacy.lora_leak import tokens_from_lora_b

    g = _lora_grads(tiny, public_blocks, rank=rank, steps=0)["v_proj"]
    found = tokens_from_lora_b(g.grad_b, g.a, layer_input_candidates(tiny.model, tiny.family, 0))
    true = sorted(set(tiny.tokenizer.encode("abc")))
    assert (found == true) is leaks  # rank 2 < 3 inputs: the projections fill R^2


def test_lora_copy_trains_b_and_leaves_the_public_model_alone(tiny, public_blocks) -> None:
    from phalanx.privacy.lora_leak import lora_copy
    from phalanx.split.lora import lora_layers

    before = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    model = lora_copy(tiny.model, tiny.family, 1, rank=4, public=public_blocks, steps=2)
    attn = blocks_of(model, tiny.family)[1].self_attn
    assert float(attn.v_proj.lora_B["default"].weight.detach().abs().max()) > 0
    assert lora_layers(model) and all(".layers.1." in n for n in lora_layers(model))
    assert lora_layers(tiny.model) == []
    assert all(torch.equal(p, before[n]) for n, p in tiny.model.named_parameters())
    with pytest.raises(ConfigError, match="public text"):
        lora_copy(tiny.model, tiny.family, 0, steps=1)


# --- bad input ----------------------------------------------------------------------------


def _one_line(exc: pytest.ExceptionInfo) -> bool:
    return "\n" not in str(exc.value) and len(str(exc.value)) > 0


@pytest.mark.parametrize("cut", [-1, 5, 1.5, "1", True])
def test_cut_outside_the_model_is_a_config_error(tiny, cut) -> None:
    with pytest.raises(ConfigError) as exc:
        Prefix(tiny.model, tiny.family, cut)
    assert _one_line(exc)
    with pytest.raises(ConfigError):
        cut_hidden(tiny.model, tiny.family, torch.tensor([[1, 2]]), cut)


@pytest.mark.parametrize("sigma", [-0.1, math.nan, math.inf, "x"])
def test_bad_sigma_is_a_config_error(sigma) -> None:
    with pytest.raises(ConfigError) as exc:
        add_noise(torch.ones(2, 4), sigma)
    assert _one_line(exc)
    with pytest.raises(ConfigError):
        DPForward(clip=1.0, noise_multiplier=sigma)


def test_bad_mechanism_and_accounting_settings_are_config_errors() -> None:
    for make in (lambda: DPForward(clip=0.0, noise_multiplier=1.0),
                 lambda: DPForward(clip=math.nan, noise_multiplier=1.0),
                 lambda: DPForward(clip=1.0, noise_multiplier=1.0).sensitivity("word"),
                 lambda: gaussian_epsilon(1.0, steps=0, delta=1e-5),
                 lambda: gaussian_epsilon(1.0, steps=1, delta=2.0),
                 lambda: gaussian_epsilon(1.0, steps=1, delta=1e-5, sample_rate=0.0),
                 lambda: nearest_embedding(torch.ones(1, 4), torch.ones(3, 4), metric="dot")):
        with pytest.raises(ConfigError) as exc:
            make()
        assert _one_line(exc)
