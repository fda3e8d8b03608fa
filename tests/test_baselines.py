"""Baselines: GPTQ against RTN on a single layer, and on a small model."""

import pytest
import torch
from torch import nn

import tqslite
from tqslite.baselines import gptq_layer, gptq_quantize
from tqslite.evaluation import forecast
from tqslite.quantization import rtn_scales


def correlated_inputs(n_in=64, n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g, dtype=torch.float64) / n_in**0.5
    scales = torch.logspace(0, -2, n_in, dtype=torch.float64)
    return mix @ (scales[:, None] * torch.randn(n_in, n, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size,act_order", [(None, False), (None, True), (16, False), (16, True)])
def test_gptq_has_lower_output_error_than_rtn_on_its_calibration_inputs(bits, group_size, act_order):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, generator=g, dtype=torch.float64)
    X = correlated_inputs()
    q = gptq_layer(w, X, bits, group_size=group_size, act_order=act_order)
    gran = "group" if group_size else "channel"
    r = tqslite.rtn_quantize(w, bits, gran, group_size=group_size)
    err_gptq = ((w - q) @ X).norm()
    err_rtn = ((w - r) @ X).norm()
    assert err_gptq < 0.8 * err_rtn, (float(err_gptq), float(err_rtn))


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_weights_lie_on_the_rtn_grid(bits):
    # per channel, GPTQ keeps RTN's scales (from the original weights): every value is a code times its scale
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    q = gptq_layer(w, correlated_inputs(32, 512), bits)
    scale = rtn_scales(w, bits).double()[:, None]
    codes = q / scale
    assert torch.allclose(codes, codes.round(), atol=1e-6)
    assert codes.abs().max() <= 2 ** (bits - 1) - 1


def test_gptq_quantize_copies_and_beats_rtn_on_a_small_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 16)).double()
    calib = torch.randn(256, 16, dtype=torch.float64) @ torch.randn(16, 16, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = gptq_quantize(model, calib, bits=3)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        ref = model(calib)
        err_gptq = (q(calib) - ref).norm()
        rtn = tqslite.apply_plan(model, tqslite.uniform_plan(tqslite.probe(model, calib[:4], horizon=1, progress=False),
                                                             model, 3))
        err_rtn = (rtn(calib) - ref).norm()
    assert err_gptq < err_rtn
    # biases were quantized too (RTN at the same bits): nothing left in float
    assert torch.equal(q[0].bias, tqslite.rtn_quantize(model[0].bias, 3))


def test_gptq_errors():
    with pytest.raises(ValueError, match="does not divide"):
        gptq_layer(torch.randn(4, 10), torch.randn(10, 50), 4, group_size=3)
    with pytest.raises(ValueError, match="features"):
        gptq_layer(torch.randn(4, 10), torch.randn(9, 50), 4)


@pytest.mark.parametrize("conv", ["1d", "2d"])
def test_gptq_on_convolutions_uses_their_unfolded_inputs(conv):
    torch.manual_seed(3)
    layer = (nn.Conv1d(4, 8, 3, padding=1) if conv == "1d" else nn.Conv2d(4, 8, 3, padding=1, stride=2)).double()
    x = torch.randn(32, 4, 12, dtype=torch.float64) if conv == "1d" else torch.randn(16, 4, 10, 10, dtype=torch.float64)
    x = x + 0.8 * x.roll(1, dims=1)  # correlated channels
    q = gptq_quantize(layer, x, bits=3)
    with torch.no_grad():
        ref = layer(x)
        w_rtn = tqslite.rtn_quantize(layer.weight, 3)
        b_rtn = tqslite.rtn_quantize(layer.bias, 3)
        f = nn.functional.conv1d if conv == "1d" else nn.functional.conv2d
        out_rtn = f(x, w_rtn, b_rtn, stride=layer.stride, padding=layer.padding)
        assert (q(x) - ref).norm() < (out_rtn - ref).norm()


def test_hutchinson_trace_of_a_quadratic_loss():
    # L(w) = mean_n (w . x_n - y_n)^2 has Hessian 2/N X^T X: trace 2/N sum ||x_n||^2
    from tqslite.baselines import hutchinson_traces
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(64, 5, generator=g, dtype=torch.float64), torch.randn(64, 1, generator=g, dtype=torch.float64)
    lin = nn.Linear(5, 1, bias=False).double()
    t = hutchinson_traces(lin, [(x, y)], ["weight"], n_samples=400, seed=0)["weight"]
    exact = float(2 * (x**2).sum() / 64)
    assert t == pytest.approx(exact, rel=0.05)
    x_orth = torch.eye(5, dtype=torch.float64).repeat(4, 1)  # X^T X diagonal: Rademacher probes are exact
    t = hutchinson_traces(lin, [(x_orth, y[:20])], ["weight"], n_samples=3)["weight"]
    assert t == pytest.approx(float(2 * (x_orth**2).sum() / 20), rel=1e-12)
    assert lin.weight.requires_grad  # the module was not touched (a copy was differentiated)


def test_hessian_scores_reproduce_hawq_v2_costs(mlp, x0):
    from tqslite.baselines import hessian_scores
    y = forecast(mlp, x0, 1).isel(lead=0).values
    scores = hessian_scores(mlp, [(x0, torch.as_tensor(y) + 0.1)], n_samples=8)
    table = tqslite.cost_table(scores, mlp, options=(3, 4), objective="quadratic")
    w = mlp[2].weight.detach()
    tr = float(scores["trace"].sel(unit="2.weight"))
    hawq = max(tr, 0) / w.numel() * float((tqslite.rtn_quantize(w, 3).double() - w.double()).pow(2).sum())
    assert float(table["cost"].sel(unit="2.weight", option=0)) == pytest.approx(hawq, rel=1e-9)


def test_range_and_random_scores(mlp):
    from tqslite.baselines import random_scores, range_scores
    r = range_scores(mlp)
    w = mlp[4].weight.detach()
    assert float(r["gamma"].sel(unit="4.weight")) == pytest.approx(float(torch.log(w.max() - w.min())))
    a, b = random_scores(mlp, seed=1), random_scores(mlp, seed=1, exclude=["0.*"])
    assert float(a["gamma"].sel(unit="4.weight")) == float(b["gamma"].sel(unit="4.weight"))
    assert float(random_scores(mlp, seed=2)["gamma"].sel(unit="4.weight")) != float(a["gamma"].sel(unit="4.weight"))
    plan = tqslite.allocate(a, mlp, budget_bits=4)  # any score set drives the same allocator
    assert plan.bits_per_param <= 4


def test_gptq_on_a_depthwise_conv_solves_each_group_and_beats_rtn():
    # a grouped convolution: each output channel sees only its own input channel
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Tanh(), nn.Conv2d(4, 2, 1)).double()
    calib = torch.randn(32, 4, 8, 8, dtype=torch.float64).cumsum(-1)  # correlated neighbours
    q = gptq_quantize(model, calib, bits=3)
    with torch.no_grad():
        for name in ("0.weight", "2.weight"):  # on the RTN grid of the original weights, per channel
            w, qw = model.get_parameter(name).flatten(1), q.get_parameter(name).flatten(1)
            codes = qw / rtn_scales(w, 3).double()[:, None]
            assert torch.allclose(codes, codes.round(), atol=1e-6)
        # the depthwise layer alone, on its own calibration inputs: lower output error than RTN
        conv = model[0]
        rtn_conv = nn.Conv2d(4, 4, 3, padding=1, groups=4).double()
        rtn_conv.load_state_dict({"weight": tqslite.rtn_quantize(conv.weight, 3), "bias": q[0].bias})
        ref = conv(calib)
        assert (q[0](calib) - ref).norm() < (rtn_conv(calib) - ref).norm()


def test_group_grid_falls_back_per_tensor_and_sizes_agree_across_methods():
    from tqslite.quantization import grid_for
    assert grid_for((64, 25), "group", 0, 32) == {"granularity": "channel", "group_size": None}
    assert grid_for((64, 64), "group", 0, 32) == {"granularity": "group", "group_size": 32}
    assert grid_for((7,), "group", 0, 32)["granularity"] == "channel"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 25), nn.Tanh(), nn.Linear(25, 64)).double()  # 25 columns: no groups of 32
    scores = tqslite.probe(model, torch.randn(4, 64, dtype=torch.float64), horizon=1, progress=False)
    plan = tqslite.uniform_plan(scores, model, 3, granularity="group", group_size=32)
    expected = sum(tqslite.storage_bits(tuple(p.shape), 3, **grid_for(tuple(p.shape), "group", 0, 32))
                   for p in model.parameters())
    assert plan.size_bits == expected
    q_plan = tqslite.apply_plan(model, plan)
    q_gptq = gptq_quantize(model, torch.randn(64, 64, dtype=torch.float64), 3, group_size=32)
    # parameters GPTQ leaves to RTN follow the same rule: groups of 32 where they fit
    assert torch.equal(q_gptq[0].bias, tqslite.rtn_quantize(model[0].bias, 3, "channel"))
    assert torch.equal(q_gptq[2].bias, tqslite.rtn_quantize(model[2].bias, 3, "group", group_size=32))
    assert torch.equal(q_plan[0].weight, tqslite.rtn_quantize(model[0].weight, 3, "group", group_size=32))
    assert torch.equal(q_plan[2].weight, tqslite.rtn_quantize(model[2].weight, 3, "channel"))


def test_hessian_traces_at_or_below_zero_are_floored_not_free(mlp, x0):
    from tqslite.baselines import hessian_scores
    y = forecast(mlp, x0, 1).isel(lead=0).values

    def loss(model, batch):  # negative curvature along the first layer's bias
        x, t = batch
        return torch.nn.functional.mse_loss(model(x), t) - 10.0 * (model[0].bias ** 2).sum()

    s = hessian_scores(mlp, [(x0, torch.as_tensor(y) + 0.1)], n_samples=4, loss_fn=loss)
    assert bool(s["floored"].sel(unit="0.bias")) and float(s["trace"].sel(unit="0.bias")) < 0
    assert not bool(s["dead"].sel(unit="0.bias"))
    per_param = (s["trace"] / s["n_params"]).where(~s["floored"])
    floor = float(per_param.min())
    b = mlp[0].bias.detach().double()
    assert float(s["gamma"].sel(unit="0.bias")) == pytest.approx(0.5 * float(torch.log(floor * b.pow(2).sum())))


def test_error_propagation_is_the_least_squares_fit_to_the_float_outputs():
    from tqslite.baselines import propagate_error
    g = torch.Generator().manual_seed(4)
    w = torch.randn(6, 10, generator=g, dtype=torch.float64)
    x = torch.randn(10, 200, generator=g, dtype=torch.float64)
    xq = x + 0.1 * torch.randn(10, 200, generator=g, dtype=torch.float64)  # what a quantized path delivers
    star = propagate_error(w, x, xq, alpha=1.0, damp=1e-12)
    lstsq = torch.linalg.lstsq(xq.T, (w @ x).T).solution.T  # argmin ||W X - W* X~||
    assert torch.allclose(star, lstsq, atol=1e-8)
    assert torch.allclose(propagate_error(w, x, xq, alpha=0.0), w)
    assert torch.allclose(propagate_error(w, x, x, alpha=1.0), w)  # nothing to correct


def test_gptq_with_error_propagation_tracks_the_float_model_better():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 16)).double()
    calib = torch.randn(512, 16, dtype=torch.float64) @ torch.randn(16, 16, dtype=torch.float64)
    plain, qep = gptq_quantize(model, calib, 3), gptq_quantize(model, calib, 3, propagation=1.0)
    assert torch.equal(plain[0].weight, qep[0].weight)  # the first layer has no upstream error to correct
    with torch.no_grad():
        ref = model(calib)
        assert (qep(calib) - ref).norm() < (plain(calib) - ref).norm()
    assert torch.equal(gptq_quantize(model, calib, 3, propagation=0.0)[2].weight, plain[2].weight)
