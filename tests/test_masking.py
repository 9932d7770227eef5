"""One-time-pad masking of frozen linear layers and Freivalds checks (phalanx.split.masking)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from phalanx.errors import ConfigError
from phalanx.split.freivalds import (
    FreivaldsVerifier,
    HostMisbehaved,
    auto_rtol,
    miss_probability,
    residuals,
)
from phalanx.split.masking import (
    Host,
    LocalHost,
    MaskedLinear,
    MaskingConfig,
    MaskPool,
    MaskReused,
    draw_mask,
    mask_std,
)

IN, OUT, SHAPE = 64, 96, (2, 8, 64)
ROW_RTOL = 2e-4
"""Masked vs plain, per row: |y - y_plain| <= 2e-4 |y_plain| (2-norms). A mask at 64x the row's
RMS costs 6 of fp32's 24 mantissa bits; the measured error is about 3e-5."""


class SpyHost(Host):
    """Records everything it receives, and forwards to an honest host."""

    def __init__(self, inner: Host) -> None:
        self.inner = inner
        self.seen: list[tuple[str, Tensor]] = []

    def matmul(self, layer_id: str, x: Tensor) -> Tensor:
        self.seen.append(("forward", x.clone()))
        return self.inner.matmul(layer_id, x)

    def matmul_t(self, layer_id: str, g: Tensor) -> Tensor:
        self.seen.append(("backward", g.clone()))
        return self.inner.matmul_t(layer_id, g)


class CorruptingHost(SpyHost):
    """An honest host whose ``direction`` results pass through ``corrupt``."""

    def __init__(self, inner: Host, *, direction: str, corrupt: Callable[[Tensor], object]) -> None:
        super().__init__(inner)
        self.direction = direction
        self.corrupt = corrupt

    def matmul(self, layer_id: str, x: Tensor) -> Tensor:
        y = super().matmul(layer_id, x)
        return self.corrupt(y) if self.direction == "forward" else y  # type: ignore[return-value]

    def matmul_t(self, layer_id: str, g: Tensor) -> Tensor:
        y = super().matmul_t(layer_id, g)
        return self.corrupt(y) if self.direction == "backward" else y  # type: ignore[return-value]


def frozen_linear(bias: bool = True, dtype: torch.dtype = torch.float32,
                  in_features: int = IN, out_features: int = OUT) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias, dtype=dtype).requires_grad_(False)


def masked(linear: nn.Linear, host: Host | None = None, **config: float) -> MaskedLinear:
    """``linear`` as a MaskedLinear; without ``host``, an honest LocalHost holding it."""
    if host is None:
        host = LocalHost()
        host.register("blk0.q", linear)
    return MaskedLinear(linear, host, layer_id="blk0.q", config=MaskingConfig(**config))


def spied(linear: nn.Linear, **config: float) -> tuple[MaskedLinear, SpyHost]:
    local = LocalHost()
    local.register("blk0.q", linear)
    spy = SpyHost(local)
    return masked(linear, spy, **config), spy


def row_error(a: Tensor, b: Tensor) -> float:
    """max over rows of |a - b| / |b| (2-norms over the last dim)."""
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max().detach())


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("bias", [True, False])
def test_masked_forward_equals_plain_linear_with_and_without_bias(bias: bool) -> None:
    torch.manual_seed(0)
    lin = frozen_linear(bias)
    x = torch.randn(SHAPE)
    assert row_error(masked(lin)(x), lin(x)) <= ROW_RTOL


def test_masked_backward_input_gradient_equals_plain() -> None:
    torch.manual_seed(1)
    lin = frozen_linear()
    layer = masked(lin)
    x = torch.randn(SHAPE, requires_grad=True)
    ref = x.detach().clone().requires_grad_(True)
    grad = 1e-4 * torch.randn(2, 8, OUT)  # gradients are small: the mask follows their scale
    layer(x).backward(grad)
    lin(ref).backward(grad)
    assert row_error(x.grad, ref.grad) <= ROW_RTOL
    assert layer.weight.grad is None  # frozen: no weight gradient is made


def test_float64_gradcheck_of_masked_layer() -> None:
    torch.manual_seed(2)
    layer = masked(frozen_linear(dtype=torch.float64, in_features=8, out_features=6))
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    # each call draws fresh masks: outputs differ by ~1e-14, hence nondet_tol
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-6, nondet_tol=1e-9)


def test_host_only_sees_masked_values_never_the_secret() -> None:
    torch.manual_seed(3)
    layer, spy = spied(frozen_linear())
    secret = torch.randn(SHAPE, requires_grad=True)
    grad = torch.randn(2, 8, OUT)
    layer(secret).backward(grad)
    layer(secret)  # the same secret a second time
    (_, first), (_, sent_grad), (_, second) = spy.seen
    for sent, hidden in ((first, secret.detach()), (second, secret.detach()), (sent_grad, grad)):
        noise = sent - hidden
        assert not torch.allclose(sent, hidden, rtol=0.1, atol=0.1)
        # the mask's std is at least mask_scale (64) times the RMS of the row it hides
        assert float(noise.std()) >= 64 * float(hidden.pow(2).mean().sqrt())
        corr = torch.corrcoef(torch.stack([sent.flatten(), hidden.flatten()]))[0, 1]
        assert abs(float(corr)) < 0.15  # ~1/64 expected; 1024 samples
    assert float((first - second).std()) > 64 * float(secret.detach().std())  # fresh masks


def test_nonfinite_input_is_refused_before_reaching_the_host() -> None:
    layer, spy = spied(frozen_linear())
    x = torch.randn(SHAPE)
    x[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite input"):
        layer(x)
    assert spy.seen == []  # an honest host is not blamed for the enclave's NaN


def test_consuming_a_mask_twice_raises() -> None:
    mask = draw_mask((3, IN), frozen_linear().weight)
    unit, image = mask.consume()
    assert unit.shape == (3, IN) and image.shape == (3, OUT) and mask.used
    with pytest.raises(MaskReused, match="already used"):
        mask.consume()


def test_pool_hands_out_each_mask_once_then_reports_empty() -> None:
    weight = frozen_linear().weight
    pool = MaskPool(cap=3)
    assert pool.fill((4, IN), 3, weight) == 3
    taken = [pool.take(torch.Size((4, IN))) for _ in range(3)]
    assert pool.take(torch.Size((4, IN))) is None and len(pool) == 0
    units = [m.consume()[0] for m in taken if m is not None]
    assert len(units) == 3
    assert not torch.allclose(units[0], units[1]) and not torch.allclose(units[1], units[2])


def test_pool_cap_is_never_exceeded() -> None:
    layer = masked(frozen_linear(), pool_size=4)
    assert layer.precompute(SHAPE, count=9) == 8  # 4 forward + 4 backward masks
    assert layer.precompute(SHAPE, count=9) == 0  # full
    assert [len(layer._path(d).pool) for d in ("forward", "backward")] == [4, 4]
    layer.precompute((3, IN), count=2)  # another shape shares the same cap
    assert len(layer._path("forward").pool) == 4


def test_precomputed_masks_move_cost_offline_and_bytes_are_counted() -> None:
    layer = masked(frozen_linear(), pool_size=2)
    layer.precompute(SHAPE)
    stats = layer.stats
    assert stats.offline_s > 0 and stats.masks_drawn == 4 and stats.online_s == 0
    x = torch.randn(SHAPE, requires_grad=True)
    layer(x).sum().backward()
    assert stats.pool_misses == 0 and stats.masks_used == 2 and stats.online_s > 0
    assert stats.bytes_to_host == 4 * (x.numel() + 2 * 8 * OUT)  # E + r, then G + s (fp32)
    assert stats.bytes_from_host == stats.bytes_to_host
    layer(torch.randn(5, IN))  # no mask of that shape was precomputed: drawn online
    assert stats.pool_misses == 1 and stats.masks_drawn == 5 and stats.checks == 3


def test_moving_the_layer_drops_its_precomputed_masks() -> None:
    lin = frozen_linear()
    layer = masked(lin)
    layer.precompute(SHAPE)
    layer.float()  # nn.Module._apply: masks and keys of the old tensors must not survive
    assert layer._paths == {}
    x = torch.randn(SHAPE)
    assert row_error(layer(x), lin(x)) <= ROW_RTOL


def one_entry(delta: Callable[[Tensor], float],
              where: tuple[int, ...]) -> Callable[[Tensor], Tensor]:
    """A corruption adding delta(y) to the entry ``where`` of a product y."""

    def corrupt(y: Tensor) -> Tensor:
        y = y.clone()
        y[where] += delta(y)
        return y

    return corrupt


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_host_corrupting_one_entry_of_one_product_is_caught(direction: str) -> None:
    torch.manual_seed(4)
    lin = frozen_linear()
    x = torch.randn(SHAPE, requires_grad=True)
    plain = lin(x)  # (2, 8, OUT)
    grad = torch.randn_like(plain)
    plain_grad = grad @ lin.weight  # (2, 8, IN)
    # the RMS of the true (unmasked) row: an error as large as a typical entry of it
    truth = plain.detach() if direction == "forward" else plain_grad
    delta = float(truth[1, 3].pow(2).mean().sqrt())
    local = LocalHost()
    local.register("blk0.q", lin)
    for _ in range(20):
        host = CorruptingHost(local, direction=direction, corrupt=one_entry(lambda y: delta,
                                                                             (1, 3, 5)))
        layer = masked(lin, host)
        with pytest.raises(HostMisbehaved, match=rf"'blk0.q' \({direction}\).*row 11"):
            layer(x).backward(grad)
        path = layer._path(direction)
        sent = host.seen[-1][1].reshape(-1, path.matrix.shape[1])  # what the host got: (16, n)
        tau = float(path.verifier.row_tolerances(sent)[11])
        assert tau < delta / 30  # so the stated miss probability is below erf(1/30/sqrt 2)^4
        assert miss_probability(delta, tau, k=4) < 1e-6


@pytest.mark.parametrize("k", [1, 2])
def test_detection_probability_matches_the_erf_statement(k: int) -> None:
    torch.manual_seed(5)
    weight = frozen_linear().weight  # (OUT, IN)
    x = 64 * torch.randn(1, IN)  # a masked row
    y = x @ weight.T  # (1, OUT)
    verifier = FreivaldsVerifier(weight, k=k, refresh_every=1, layer_id="l", direction="forward")
    tau = float(verifier.row_tolerances(x)[0])
    bad = y.clone()
    bad[0, 7] += 2 * tau  # close to the tolerance: missed often, by design
    trials, missed = 500, 0
    for _ in range(trials):
        try:
            verifier.check(x, bad)
            missed += 1
        except HostMisbehaved:
            pass
    expected = miss_probability(2 * tau, tau, k)  # erf(0.5 / sqrt 2)^k: 0.383, 0.147
    assert abs(missed / trials - expected) < 4 * math.sqrt(expected * (1 - expected) / trials)


def test_freivalds_residual_of_a_corrupted_entry_is_delta_times_its_vector() -> None:
    a = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.0, 4.0]], dtype=torch.float64)  # (3, 2)
    b = torch.tensor([1.0, 0.0, -2.0], dtype=torch.float64)
    x = torch.tensor([[1.0, 1.0], [2.0, -3.0]], dtype=torch.float64)  # (2, 2)
    y = x @ a.T + b  # [[4, 2, 2], [-3, 9, -14]]
    v = torch.tensor([[1.0, 0.5], [-1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)  # (3, 2)
    assert torch.equal(residuals(x, y, v, a.T @ v, b @ v), torch.zeros(2, 2, dtype=torch.float64))
    y[1, 2] += 0.25
    assert torch.equal(residuals(x, y, v, a.T @ v, b @ v),
                       torch.tensor([[0.0, 0.0], [0.5, 0.25]], dtype=torch.float64))


def test_verifier_alone_fails_a_nan_product() -> None:
    weight = frozen_linear().weight
    verifier = FreivaldsVerifier(weight, k=2, refresh_every=4, layer_id="l", direction="forward")
    x = torch.randn(3, IN)
    y = x @ weight.T
    verifier.check(x, y)  # honest
    y[2, 0] = float("nan")  # NaN compares false with everything: it must still fail
    with pytest.raises(HostMisbehaved, match="row 2"):
        verifier.check(x, y)


def test_miss_probability_values() -> None:
    assert miss_probability(1.0, 0.0, 4) == 0.0  # zero tolerance: any error is seen
    assert miss_probability(1.0, math.sqrt(2.0), 2) == pytest.approx(math.erf(1.0) ** 2)
    assert miss_probability(0.0, 1.0, 4) == 1.0  # no error: nothing to catch
    assert auto_rtol(torch.float32) == 32 * 2.0**-24


BAD_RESULTS: dict[str, tuple[Callable[[Tensor], object], str]] = {
    "wrong shape": (lambda y: y[..., :-1], "returned shape"),
    "nan": (one_entry(lambda y: float("nan"), (0, 0, 0)), "non-finite"),
    "inf": (one_entry(lambda y: float("inf"), (1, 2, 3)), "non-finite"),
    "wrong dtype": (lambda y: y.double(), "returned dtype"),
    "not a tensor": (lambda y: y.tolist(), "not a plain torch.Tensor"),
    "tensor subclass": (lambda y: nn.Parameter(y), "not a plain torch.Tensor"),
}


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("bad", sorted(BAD_RESULTS))
def test_malformed_host_result_is_refused_naming_the_layer(bad: str, direction: str) -> None:
    lin = frozen_linear()
    local = LocalHost()
    local.register("blk0.q", lin)
    corrupt, reason = BAD_RESULTS[bad]
    layer = masked(lin, CorruptingHost(local, direction=direction, corrupt=corrupt))
    with pytest.raises(HostMisbehaved, match=rf"layer 'blk0.q' \({direction}\): .*{reason}"):
        layer(torch.randn(SHAPE, requires_grad=True)).sum().backward()


def test_honest_host_raises_no_false_alarm_over_200_trials() -> None:
    torch.manual_seed(6)
    lin = frozen_linear()
    layer = masked(lin, freivalds_refresh=8)  # many fresh keys
    for trial in range(200):
        scale = 10.0 ** (trial % 7 - 3)  # activations from 1e-3 to 1e3
        x = scale * torch.randn(SHAPE)
        x[0, 3, trial % IN] = 1e4  # a row with a huge channel
        x.requires_grad_(True)
        y = layer(x)
        y.backward(1e-3 * torch.randn_like(y))
    assert layer.stats.checks == 400
    assert row_error(y, lin(x)) <= ROW_RTOL  # the huge row and the others stay accurate


def test_mask_std_is_a_power_of_two_at_least_scale_times_row_rms() -> None:
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1e-3, 1e-3]])
    std = mask_std(x, 64.0)  # 64 x rms: 226, 64 x 2^-63 (floor), 0.064
    assert torch.equal(std.flatten(), torch.tensor([256.0, 2.0**-57, 2.0**-3]))


@pytest.mark.parametrize("bad", [
    {"mask_scale": -1.0}, {"mask_scale": 0.5}, {"mask_scale": float("nan")},
    {"mask_scale": 1e6}, {"pool_size": -1}, {"freivalds_vectors": 0},
    {"freivalds_rtol": -1e-6}, {"freivalds_rtol": 0.5}, {"freivalds_rtol": float("inf")},
    {"freivalds_refresh": 0},
])
def test_bad_masking_config_is_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match=f"masking.{next(iter(bad))}="):
        MaskingConfig(**bad)


def test_trainable_or_low_precision_layer_is_refused() -> None:
    with pytest.raises(ConfigError, match="frozen"):
        masked(nn.Linear(IN, OUT))
    with pytest.raises(ConfigError, match="float32 or float64"):
        masked(frozen_linear(dtype=torch.bfloat16))
