"""Activation quantization (static, dynamic, probabilistic) and the activation probe."""

import math

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import linear_system, same_weights, snapshot
from torch import nn

import tqslite
from tqslite import Int, gamma_at, rtn_quantize
from tqslite.activations import (
    activation_costs,
    activation_grid,
    calibrate,
    fake_quantize,
    measured_moments,
    predicted_moments,
    probabilistic_range,
    probe_activations,
    quantizable_modules,
    quantized_activations,
)

RHO = 1.05
EIGS = [RHO, 0.9, 0.8, -0.7, 0.5, 0.3]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def layer_output(model, x):
    with torch.no_grad():
        return model(x)


# --------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8])
def test_error_is_at_most_half_a_step_inside_the_range(bits):
    y = 3 * torch.randn(6, 4, 50, generator=gen(0)) + torch.linspace(-2, 5, 6)[:, None, None]
    lo, hi = y.flatten(1).amin(1) - 0.1, y.flatten(1).amax(1) + 0.2   # every element inside
    scale, zero = activation_grid(lo, hi, bits)
    q = fake_quantize(y, lo, hi, bits)
    assert (q - y).abs().le(scale.view(-1, 1, 1) / 2 * (1 + 1e-6)).all()
    # scales are float16 numbers, rounded up: the grid spans the widened range
    assert torch.equal(scale, scale.to(torch.float16).float())
    assert ((2**bits - 1) * scale >= hi.clamp(min=0) - lo.clamp(max=0)).all()
    assert torch.equal(zero, zero.round()) and zero.min() >= 0 and zero.max() <= 2**bits - 1


def test_per_sample_minmax_grid_is_tqslite_asymmetric_rtn():
    # One range per sample = asymmetric RTN with one scale per row of the (B, -1) view.
    y = torch.randn(5, 3, 40, generator=gen(1)) * torch.tensor([0.1, 1, 10, 100, 3])[:, None, None]
    for bits in (2, 4, 8):
        flat = y.flatten(1)
        q = fake_quantize(y, flat.amin(1), flat.amax(1), bits)
        ref = rtn_quantize(flat, Int(bits, symmetric=False)).reshape(y.shape)
        assert torch.equal(q, ref)


def test_values_outside_the_range_are_clipped_to_the_ends_of_the_grid():
    y = torch.linspace(-4, 4, 801).reshape(1, -1)
    lo, hi, bits = torch.tensor([-1.0]), torch.tensor([2.0]), 4
    scale, zero = activation_grid(lo, hi, bits)
    q = fake_quantize(y, lo, hi, bits)
    top, bottom = float((2**bits - 1 - zero) * scale), float(-zero * scale)
    assert torch.all(q[y > hi + scale / 2] == top)
    assert torch.all(q[y < lo - scale / 2] == bottom)
    assert q.max() == top and q.min() == bottom


def test_zero_is_exact_and_16_32_bits_behave():
    y = torch.tensor([[0.0, 0.3, -1.7, 2.2]])
    assert fake_quantize(y, y.min(), y.max(), 3)[0, 0] == 0
    assert torch.equal(fake_quantize(y, -1.0, 1.0, 32), y)
    assert torch.equal(fake_quantize(y, -1.0, 1.0, 16), y.half().float())
    with pytest.raises(ValueError, match="bits"):
        fake_quantize(y, -1.0, 1.0, 9)
    with pytest.raises(ValueError, match="float16"):
        fake_quantize(1e7 * y, -1e7, 1e7, 8)


# --------------------------------------------------------------------------------------------
# The three quantizers as hooks
# --------------------------------------------------------------------------------------------

@pytest.fixture
def layer():
    torch.manual_seed(0)
    return nn.Linear(16, 24)


def tokens(n=8, positions=64, d=16, seed=2, scale=1.0):
    return scale * torch.randn(n, positions, d, generator=gen(seed))


@pytest.mark.parametrize("bits", [4, 8])
def test_dynamic_never_clips_and_obeys_the_bound(layer, bits):
    x = tokens(scale=5.0)
    y = layer_output(layer, x)
    with quantized_activations(layer, "dynamic", bits, record=True) as log:
        q = layer_output(layer, x)
    scale, _ = activation_grid(y.flatten(1).amin(1), y.flatten(1).amax(1), bits)
    assert (q - y).abs().le(scale.view(-1, 1, 1) / 2 * (1 + 1e-6)).all()
    assert log.clipped[""] == 0 and log.calls[""] == 1 and log.elements[""] == y.numel()
    # the injected error is that of uniform rounding noise, scale^2 / 12 per element
    expected = math.sqrt(float((scale.double() ** 2).sum()) * y[0].numel() / 12) / float(y.double().norm())
    assert 0.85 < log.relative_error()[""] / expected < 1.15


def test_static_uses_the_calibrated_range_and_clips_outside_it(layer):
    train = tokens(seed=3)
    cal = calibrate(layer, train)
    y_train = layer_output(layer, train)
    assert cal.ranges[""] == (float(y_train.min()), float(y_train.max()))
    x = tokens(seed=4, scale=3.0)   # the rollout has drifted: larger values than in training
    y = layer_output(layer, x)
    with quantized_activations(layer, "static", 6, calibration=cal, record=True) as log:
        q = layer_output(layer, x)
    lo, hi = cal.ranges[""]
    scale, zero = activation_grid(torch.tensor([lo]), torch.tensor([hi]), 6)
    inside = (y >= lo) & (y <= hi)
    assert (q - y)[inside].abs().max() <= scale / 2 * (1 + 1e-6)
    assert torch.all(q[y > hi + scale / 2] == (63 - zero) * scale)
    assert torch.all(q[y < lo - scale / 2] == -zero * scale)
    assert log.clip_fraction()[""] > 0.1
    # the range is the same for every sample: static ranges ignore the input
    with quantized_activations(layer, "static", 6, calibration=train) as _:
        q2 = layer_output(layer, x)
    assert torch.equal(q, q2)


def test_probabilistic_range_is_predicted_before_the_layer_runs(layer):
    x = tokens(seed=5)
    y = layer_output(layer, x)
    lo, hi = probabilistic_range(layer, x, k=1.0)
    mean_p, std_p = predicted_moments(layer, x)
    torch.testing.assert_close(lo, (mean_p - std_p).amin(1))
    torch.testing.assert_close(hi, (mean_p + std_p).amax(1))
    with quantized_activations(layer, "probabilistic", 8, k=1.0, record=True) as log:
        q = layer_output(layer, x)
    scale, zero = activation_grid(lo, hi, 8)
    s = scale.view(-1, 1, 1)
    inside = (y >= lo.view(-1, 1, 1)) & (y <= hi.view(-1, 1, 1))
    assert ((q - y).abs() <= s / 2 * (1 + 1e-6))[inside].all()
    # k = 1 std cuts the Gaussian tails of the widest channels: those elements are clipped
    above = y > (hi.view(-1, 1, 1) + s / 2)
    assert above.any() and torch.all(q[above] == ((255 - zero).view(-1, 1, 1) * s).expand_as(q)[above])
    assert log.clip_fraction()[""] > 0
    with quantized_activations(layer, "probabilistic", 8, k=6.0, record=True) as log6:
        layer_output(layer, x)
    assert log6.clipped[""] == 0  # 6 predicted std cover every element here


def test_the_context_leaves_the_model_as_it_was(mlp, x0):
    before = snapshot(mlp)
    y = layer_output(mlp, x0)
    for mode in ("static", "dynamic", "probabilistic"):
        with quantized_activations(mlp, mode, 4, calibration=x0, surrogate="calibrated"):
            assert not torch.equal(layer_output(mlp, x0), y)
        assert torch.equal(layer_output(mlp, x0), y)
        assert same_weights(mlp, before)
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in mlp.modules())
    with pytest.raises(RuntimeError, match="boom"):
        with quantized_activations(mlp, "dynamic", 4):
            raise RuntimeError("boom")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in mlp.modules())


def test_module_selection_and_per_module_bits(mlp, x0):
    assert list(quantizable_modules(mlp)) == ["0", "2", "4"]
    assert list(quantizable_modules(mlp, ["?"])) == ["0", "2", "4"]
    with quantized_activations(mlp, "dynamic", {"2": 4, "4": 32}, record=True) as log:
        layer_output(mlp, x0)
    assert list(log.calls) == ["2"]   # 32 bits: no hook at all
    with quantized_activations(mlp, "dynamic", {"*": 8, "4": 4}) as log:
        layer_output(mlp, x0)
    assert log.bits == {"0": 8, "2": 8, "4": 4}
    with pytest.raises(ValueError, match="not both"):
        with quantized_activations(mlp, "dynamic", {"2": 4}, modules=["2"]):
            pass
    with pytest.raises(ValueError, match="matches no submodule"):
        quantizable_modules(mlp, ["blocks.9"])
    with pytest.raises(ValueError, match="Tanh"):
        quantizable_modules(mlp, ["1"])
    with pytest.raises(ValueError, match="needs calibration"):
        with quantized_activations(mlp, "static", 8):
            pass
    with pytest.raises(ValueError, match="mode"):
        with quantized_activations(mlp, "percentile", 8):
            pass


def test_hooks_need_a_torch_module():
    class Opaque:
        def step(self, x):
            return x
    with pytest.raises(TypeError, match="nn.Module"):
        quantizable_modules(Opaque())


# --------------------------------------------------------------------------------------------
# The surrogate's predicted statistics against the measured ones
# --------------------------------------------------------------------------------------------

def test_surrogate_tracks_measured_stats_with_independent_inputs(layer):
    # Independent input features with per-sample means and scales: E[y] is exact for a Linear
    # layer, and Var[y] = (W * W) Var[x] up to the sampling noise of the input's off-diagonal
    # covariance over 256 positions (about 1 / sqrt(256)).
    g = gen(6)
    x = torch.randn(32, 256, 16, generator=g) * (0.2 + 2 * torch.rand(32, 1, 16, generator=g)) \
        + torch.randn(32, 1, 16, generator=g)
    mean_p, std_p = predicted_moments(layer, x)
    mean_m, std_m = measured_moments(layer, layer_output(layer, x))
    assert mean_p.shape == std_p.shape == (32, 24)
    torch.testing.assert_close(mean_p, mean_m, rtol=0, atol=1e-5 * float(mean_m.abs().max()))
    rel = ((std_p - std_m) / std_m).abs()
    assert rel.median() < 0.05 and rel.max() < 0.25
    # and per-sample std tracks the per-sample scale: log-log correlation across samples
    corr = np.corrcoef(np.log(std_p.flatten().numpy()), np.log(std_m.flatten().numpy()))[0, 1]
    assert corr > 0.95


def test_surrogate_fails_when_inputs_are_correlated_and_calibration_repairs_the_scale(layer):
    # A common factor shared by all input features breaks independence: Var[y_j] gains
    # (sum_i W_ji)^2 Var[z], which (W * W) Var[x] misses. The mean stays exact; the std is off.
    def correlated(seed, n=16):
        g = gen(seed)
        return torch.randn(n, 128, 1, generator=g) * 2 + 0.3 * torch.randn(n, 128, 16, generator=g)

    x = correlated(7)
    mean_p, std_p = predicted_moments(layer, x)
    mean_m, std_m = measured_moments(layer, layer_output(layer, x))
    torch.testing.assert_close(mean_p, mean_m, rtol=0, atol=1e-5 * float(mean_m.abs().max()))
    rel = ((std_p - std_m) / std_m).abs()
    assert rel.median() > 0.5   # the independence assumption is badly wrong here
    # calibrate() fits one std correction per output channel on other states of the same kind
    cal = calibrate(layer, correlated(8))
    _, std_c = predicted_moments(layer, x, cal.std_ratio[""])
    rel_c = ((std_c - std_m) / std_m).abs()
    assert rel_c.median() < 0.2 and rel_c.median() < rel.median() / 3


def test_surrogate_on_a_conv_uses_summed_kernels_and_groups():
    torch.manual_seed(0)
    for conv in (nn.Conv2d(4, 6, 3), nn.Conv2d(6, 6, 3, groups=3), nn.Conv1d(4, 5, 2, stride=2)):
        shape = (16, conv.in_channels, 48, 48) if isinstance(conv, nn.Conv2d) else (16, conv.in_channels, 512)
        x = torch.randn(*shape, generator=gen(9)) + torch.randn(16, conv.in_channels, *[1] * (len(shape) - 2),
                                                                generator=gen(10))
        mean_p, std_p = predicted_moments(conv, x)
        mean_m, std_m = measured_moments(conv, layer_output(conv, x))
        assert mean_p.shape == (16, conv.out_channels)
        # i.i.d. pixels: boundary effects aside, the mean is right and the std within sampling noise
        mean_err = (mean_p - mean_m).abs() / std_m
        assert mean_err.median() < 0.05 and mean_err.max() < 0.3
        assert ((std_p - std_m) / std_m).abs().median() < 0.05


# --------------------------------------------------------------------------------------------
# Memory accounting
# --------------------------------------------------------------------------------------------

def test_costs_count_the_elements_each_strategy_holds():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(2), nn.Linear(100, 20))
    costs = activation_costs(model, torch.randn(2, 3, 10, 10))
    conv, lin = costs.sel(module="0"), costs.sel(module="2")
    assert conv["output_elements"] == 8 * 100 and lin["output_elements"] == 8 * 20
    assert conv["extra_elements"].sel(mode="dynamic") == 800
    assert conv["extra_elements"].sel(mode="static") == 0
    assert conv["extra_elements"].sel(mode="probabilistic") == 2 * (3 + 8)
    assert lin["extra_elements"].sel(mode="probabilistic") == 2 * (100 + 20)
    assert lin["persistent_elements"].sel(mode="probabilistic") == 100 * 20
    assert conv["persistent_elements"].sel(mode="probabilistic") == 2 * 8 * 3
    assert conv["layer_flops"] == 2 * 3 * 9 * 800 and lin["layer_flops"] == 2 * 100 * 20 * 8


# --------------------------------------------------------------------------------------------
# The activation probe
# --------------------------------------------------------------------------------------------

def states(n, d, seed=1):
    return torch.randn(n, d, generator=gen(seed), dtype=torch.float64)


def test_activation_gamma_approaches_log_spectral_radius_of_a_linear_map():
    # x' = A x + noise of relative size sigma at the output, every step: the error at step T is a
    # sum of T terms of size ~ rho^T, so Lambda(T) = T log(rho) + O(log T) and gamma(T) -> log(rho).
    system = linear_system(EIGS)
    scores = probe_activations(system, states(8, 6), horizon=400, progress=False)
    assert scores.sizes == {"unit": 1, "lead": 400, "window": 8, "tensor": 1}
    assert abs(float(scores["eps"][0]) - 1e-2) < 1e-3
    assert abs(float(gamma_at(scores, 400)[0]) - math.log(RHO)) < 0.01
    curve = scores["curve"][0]
    slope = float(curve.sel(lead=400) - curve.sel(lead=200)) / 200
    assert abs(slope - math.log(RHO)) < 3e-3


def test_scaling_the_map_shifts_activation_gamma_by_the_log_of_the_scale():
    # B = 2 A: the state and the output RMS double each step, so does the injected noise, every
    # floating-point operation scales exactly, and gamma_B - gamma_A = log 2.
    a, b = linear_system(EIGS, seed=3), linear_system([2 * e for e in EIGS], seed=3)
    x = states(4, 6)
    ga = probe_activations(a, x, horizon=30, progress=False)["gamma"].values
    gb = probe_activations(b, x, horizon=30, progress=False)["gamma"].values
    np.testing.assert_allclose(gb - ga, math.log(2.0), rtol=0, atol=1e-12)


def test_activation_probe_same_seed_same_scores_and_layers_do_not_interact(mlp, x0):
    before = snapshot(mlp)
    full = probe_activations(mlp, x0, horizon=6, seed=7, progress=False)
    xr.testing.assert_identical(full, probe_activations(mlp, x0, horizon=6, seed=7, progress=False))
    other = probe_activations(mlp, x0, horizon=6, seed=8, progress=False)
    assert not np.array_equal(full["gamma"].values, other["gamma"].values)
    part = probe_activations(mlp, x0, horizon=6, seed=7, modules=["4", "0"], progress=False)
    np.testing.assert_array_equal(part["gamma"].values, full["gamma"].sel(unit=["0", "4"]).values)
    assert list(full["unit"].values) == ["0", "2", "4"]
    assert tqslite.units.units_of(full)[1].params == ("2.weight", "2.bias")
    assert same_weights(mlp, before) and mlp.training
    assert all(not m._forward_hooks for m in mlp.modules())


def test_a_layer_whose_output_is_ignored_is_dead(x0):
    class Ignores(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(8, 8).double()
            self.unused = nn.Linear(8, 8).double()

        def forward(self, x):
            return torch.tanh(self.used(x)) + 0 * self.unused(x).detach().clamp(0, 0)

    scores = probe_activations(Ignores(), x0, horizon=4, progress=False)
    assert scores["dead"].sel(unit="unused").item() and scores["gamma"].sel(unit="unused").item() == -np.inf
    assert not scores["dead"].sel(unit="used").item()
