"""Baseline sensitivity scores in the probe's layout: Hessian traces (HAWQ-V2), weight range, random."""

import pytest
import torch
from torch import nn

import tqslite
from tqslite.evaluation import forecast



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
    table = tqslite.cost_table(scores, mlp, options=(3, 4))  # HAWQ-V2's objective is the default, quadratic
    w = mlp[2].weight.detach()
    tr = float(scores["trace"].sel(unit="2.weight"))
    hawq = max(tr, 0) / w.numel() * float((tqslite.rtn_quantize(w, 3).double() - w.double()).pow(2).sum())
    assert float(table["cost"].sel(unit="2.weight", option="int3/channel")) == pytest.approx(hawq, rel=1e-9)


def test_range_and_random_scores(mlp):
    from tqslite.baselines import random_scores, range_scores
    r = range_scores(mlp)
    w = mlp[4].weight.detach()
    assert float(r["gamma"].sel(unit="4.weight")) == pytest.approx(float(torch.log(w.max() - w.min())))
    a, b = random_scores(mlp, seed=1), random_scores(mlp, seed=1, units=tqslite.TensorUnits(exclude="0.*"))
    assert float(a["gamma"].sel(unit="4.weight")) == float(b["gamma"].sel(unit="4.weight"))
    assert float(random_scores(mlp, seed=2)["gamma"].sel(unit="4.weight")) != float(a["gamma"].sel(unit="4.weight"))
    plan = tqslite.allocate(a, mlp, budget_bits=4)  # any score set drives the same allocator
    assert tqslite.plan_size(plan, mlp).bits_per_param <= 4


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
