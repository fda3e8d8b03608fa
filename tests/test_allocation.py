"""The allocator: cost tables priced with the applied quantizer, budgets, constraints, fronts."""

import numpy as np
import pytest
import torch

import tqslite
from tqslite import (Float16, InfeasibleBudget, Int, KeepFloat, MSEClip, PerGroup, allocate, cost_table, pareto,
                     plan_size, predicted_error, probe, uniform_plan)
from tqslite.units import TensorUnits


@pytest.fixture
def scored(mlp, x0):
    return probe(mlp, x0, horizon=8, progress=False)


OPTS = (Int(2), Int(4), Int(8), KeepFloat())


def total_cost(plan, table):
    return sum(float(table["cost"].sel(unit=u, option=c.label)) for u, c in plan.items())


def test_cost_table_matches_its_definitions(mlp, scored):
    t = cost_table(scored, mlp, options=OPTS, objective="linear")
    assert list(t["option"].values) == ["int2/channel", "int4/channel", "int8/channel", "float"]
    w = mlp[2].weight.detach()
    row = t.sel(unit="2.weight", option="int4/channel")
    assert row["size"] == w.numel() * 4 + 16 * w.shape[0]
    assert row["eps"] == pytest.approx(tqslite.relative_error(w, 4), rel=1e-12)
    lam = float(scored["curve"].sel(unit="2.weight").isel(lead=-1))
    assert row["cost"] == pytest.approx(tqslite.relative_error(w, 4) * np.exp(lam), rel=1e-12)
    assert (t["cost"].sel(option="float") == 0).all()  # float costs nothing
    q = cost_table(scored, mlp, options=OPTS)  # the default objective: errors add in quadrature
    assert q.attrs["objective"] == "quadratic"
    np.testing.assert_allclose(q["cost"], t["cost"] ** 2)
    p = cost_table(scored, mlp, options=OPTS, objective="paper")
    g = scored["gamma"].values
    np.testing.assert_allclose(p["cost"].values[:, 0], (g - g.min() + 0.01) * 0.25)


def test_cost_table_prices_with_the_quantizer_that_will_be_applied(mlp, scored):
    rtn = cost_table(scored, mlp, options=(Int(3),))
    mse = cost_table(scored, mlp, options=(Int(3),), quantizer=MSEClip())
    w = mlp[0].weight.detach()
    q = MSEClip().quantize(w, Int(3).resolve(w.shape, 0)).dequantize()
    assert float(mse["eps"].sel(unit="0.weight").item()) == pytest.approx(float((q - w).norm() / w.norm()), rel=1e-12)
    assert np.all(mse["eps"].values <= rtn["eps"].values + 1e-15)  # MSE-clip never worse on the weights
    np.testing.assert_array_equal(mse["size"], rtn["size"])  # the same bits, whatever the quantizer
    assert mse.attrs["quantizer"].startswith("MSEClip(")


def test_plan_meets_budget_and_is_ordered_like_the_units(mlp, scored):
    plan = allocate(scored, mlp, budget_bits=4.5)
    assert list(plan) == list(scored["unit"].values)
    assert plan_size(plan, mlp).bits_per_param <= 4.5
    assert plan.info["objective"] == "quadratic" and plan.info["budget_bits"] == 4.5


def test_exact_allocation_is_no_worse_than_greedy(mlp, scored):
    table = cost_table(scored, mlp)
    for budget in (3.5, 4.5, 6.0):
        exact = allocate(table, budget_bits=budget)
        greedy = allocate(table, budget_bits=budget, solver="greedy")
        assert total_cost(exact, table) <= total_cost(greedy, table) * (1 + 1e-9)
        assert plan_size(greedy, mlp).bits_per_param <= budget


def test_budget_forms_agree(mlp, scored):
    n = sum(p.numel() for p in mlp.parameters())
    a = allocate(scored, mlp, budget_bits=4.0)
    b = allocate(scored, mlp, compression=8.0)
    c = allocate(scored, mlp, budget_bytes=n * 4 / 8)
    assert a.configs == b.configs == c.configs
    with pytest.raises(ValueError, match="exactly one"):
        allocate(scored, mlp, budget_bits=4, compression=8)


def test_allocation_infeasible_budget_message(mlp, scored):
    with pytest.raises(InfeasibleBudget, match=r"smallest feasible budget is 2\.\d+ bits per parameter"):
        allocate(scored, mlp, budget_bits=1.0)
    with pytest.raises(InfeasibleBudget, match=r"bottom=4"):
        allocate(scored, mlp, budget_bits=3.0, bottom=4)


def test_parameters_outside_the_units_stay_float_and_count(mlp, x0):
    no_bias = probe(mlp, x0, horizon=4, units=TensorUnits(exclude="*.bias"), progress=False)
    biases = sum(p.numel() for n, p in mlp.named_parameters() if n.endswith("bias"))
    n = sum(p.numel() for p in mlp.parameters())
    table = cost_table(no_bias, mlp)
    assert table.attrs["outside_bits"] == 64 * biases  # float64 model: 64 bits each
    plan = allocate(table, budget_bits=6.0)
    size = plan_size(plan, mlp)
    assert size.outside_params == biases and size.n_params == n and size.bits_per_param <= 6.0
    weights_bits = sum(c.storage_bits(plan.shapes[u], 0) for u, c in plan.items())
    assert size.stored_bits == weights_bits + 64 * biases  # counted by hand
    with pytest.raises(InfeasibleBudget, match="smallest feasible budget is"):
        allocate(table, budget_bits=2.2)  # the float biases alone cost more than that leaves


def test_bottom_tied_and_fp_budget_constraints(mlp, scored):
    plan = allocate(scored, mlp, budget_bits=6, bottom=4)
    assert min(plan.bits.values()) >= 4
    plan = allocate(scored, mlp, budget_bits=5, tied=[["0.weight", "2.weight", "4.weight"]])
    assert plan["0.weight"] == plan["2.weight"] == plan["4.weight"]
    loose = allocate(scored, mlp, budget_bits=12)
    numel = {n: p.numel() for n, p in mlp.named_parameters()}
    n = sum(numel.values())
    assert sum(numel[u] for u, b in loose.bits.items() if b >= 16) / n > 0.05
    for solver in ("milp", "greedy"):
        tight = allocate(scored, mlp, budget_bits=12, fp_budget=0.05, solver=solver)
        assert sum(numel[u] for u, b in tight.bits.items() if b >= 16) <= 0.05 * n


def test_dead_units_get_the_lowest_tier(mlp, x0):
    class WithUnused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp
            self.unused = torch.nn.Parameter(torch.ones(5, dtype=torch.float64))

        def forward(self, x):
            return self.net(x)

    model = WithUnused()
    scores = probe(model, x0, horizon=5, progress=False)
    assert scores["dead"].sel(unit="unused")
    plan = allocate(scores, model, budget_bits=30, bottom=3)
    assert plan["unused"] == Int(3)


def test_uniform_plan_needs_no_scores_and_the_optimum_is_never_worse(mlp, scored):
    plan = uniform_plan(mlp, 4)
    assert set(plan.configs.values()) == {Int(4)}
    assert plan_size(plan, mlp).stored_bits == sum(p.numel() * 4 + 16 * (p.shape[0] if p.ndim > 1 else 1)
                                                   for p in mlp.parameters())
    table = cost_table(scored, mlp)
    mixed = allocate(table, budget_bits=plan_size(plan, mlp).bits_per_param)
    assert plan_size(mixed, mlp).stored_bits <= plan_size(plan, mlp).stored_bits
    assert predicted_error(mixed, table) <= predicted_error(plan, table)


def test_a_cost_table_fixes_its_settings(mlp, scored):
    table = cost_table(scored, mlp, options=(2, 4, 8))
    assert set(allocate(table, budget_bits=5).bits.values()) <= {2, 4, 8}
    with pytest.raises(ValueError, match="cost table passed in fixes them"):
        allocate(table, budget_bits=5, options=(4,))
    with pytest.raises(ValueError, match="objective"):
        pareto(table, budgets=[4, 5], objective="linear")


def test_pareto_front_from_one_sweep(mlp, scored, tmp_path):
    table = cost_table(scored, mlp, options=(2, 3, 4, 5, 6, 8, Float16(), KeepFloat()))
    front = pareto(table, budgets=[3, 4, 5, 6, 8])
    assert front.sizes["budget"] == 5 and front["config"].dims == ("budget", "unit")
    assert np.all(front["bits_per_param"].values <= front["budget"].values)
    assert np.all(np.diff(front["objective_value"].values) <= 1e-15)  # more bits never costs more
    one = allocate(table, budget_bits=5)
    assert front["config"].sel(budget=5).values.tolist() == [c.label for c in one.values()]
    assert front["predicted_rss"].sel(budget=5) == pytest.approx(predicted_error(one, table))
    assert np.all(front["predicted_rss"] <= front["predicted_linear"] + 1e-15)  # ||e||_2 <= ||e||_1
    assert pareto(table).sizes["budget"] == 10
    front.to_netcdf(tmp_path / "front.nc")


def test_grouped_options_fall_back_per_tensor_and_sizes_stay_exact(mlp, scored):
    table = cost_table(scored, mlp, options=tqslite.int_options((2, 4), PerGroup(16)))
    # 8-input layer: 8 elements per channel, groups of 16 do not divide them -> per channel
    w0 = mlp[0].weight
    assert table["size"].sel(unit="0.weight", option="int4/group16") == w0.numel() * 4 + 16 * w0.shape[0]
    w2 = mlp[2].weight  # 32 inputs: two groups of 16 per channel
    assert table["size"].sel(unit="2.weight", option="int4/group16") == w2.numel() * 4 + 16 * w2.shape[0] * 2
