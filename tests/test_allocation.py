"""The allocator: exact against brute force, greedy feasible, constraints, plans applied to models."""

import itertools
import json

import numpy as np
import pytest
import torch
from conftest import same_weights, snapshot

import tqslite
from tqslite import InfeasibleBudget, Plan, allocate, apply_plan, cost_table, pareto, probe, solve_mckp
from tqslite.quantization import QuantizedTensor


def brute_force(costs, sizes, budget, allowed=None, extra=()):
    best, arg = np.inf, None
    U, K = costs.shape
    for choice in itertools.product(range(K), repeat=U):
        idx = (np.arange(U), np.array(choice))
        if allowed is not None and not allowed[idx].all():
            continue
        if sizes[idx].sum() > budget or any(w[idx].sum() > lim for w, lim in extra):
            continue
        if costs[idx].sum() < best:
            best, arg = costs[idx].sum(), np.array(choice)
    return best, arg


def random_instance(rng, U=5, K=4):
    sizes = np.sort(rng.integers(1, 40, size=(U, K)), axis=1).astype(float)
    costs = np.sort(rng.random((U, K)) * rng.choice([1e-3, 1.0, 1e3], size=(U, 1)), axis=1)[:, ::-1].copy()
    lo, hi = sizes.min(1).sum(), sizes.max(1).sum()
    return costs, sizes, rng.uniform(lo, hi)


def test_milp_equals_brute_force_and_greedy_is_feasible(rng):
    gaps = []
    for _ in range(40):
        costs, sizes, budget = random_instance(rng)
        best, _ = brute_force(costs, sizes, budget)
        exact = solve_mckp(costs, sizes, budget, "milp")
        idx = (np.arange(len(exact)), exact)
        assert sizes[idx].sum() <= budget
        assert costs[idx].sum() == pytest.approx(best, rel=1e-9, abs=1e-12)
        greedy = solve_mckp(costs, sizes, budget, "greedy")
        gidx = (np.arange(len(greedy)), greedy)
        assert sizes[gidx].sum() <= budget  # greedy never breaks the constraint
        assert costs[gidx].sum() >= best - 1e-12  # and never beats the optimum
        gaps.append(costs[gidx].sum() / best - 1)
    assert max(gaps) > 0  # on some instances greedy is measurably suboptimal: the exact solver matters


def test_milp_equals_brute_force_with_masks_and_an_extra_constraint(rng):
    for _ in range(20):
        costs, sizes, budget = random_instance(rng)
        allowed = rng.random(costs.shape) > 0.2
        allowed[:, -1] = True
        # like fp_budget: the parameters of units kept at their largest options
        weights = (np.arange(costs.shape[1]) >= costs.shape[1] - 2) * rng.integers(1, 5, size=(costs.shape[0], 1))
        extra = [(weights.astype(float), float(weights.sum(1).mean()))]
        best, _ = brute_force(costs, sizes, budget, allowed, extra)
        if not np.isfinite(best):
            continue
        exact = solve_mckp(costs, sizes, budget, "milp", allowed, extra)
        idx = (np.arange(len(exact)), exact)
        assert allowed[idx].all() and weights[idx].sum() <= extra[0][1]
        assert costs[idx].sum() == pytest.approx(best, rel=1e-9, abs=1e-12)
        greedy = solve_mckp(costs, sizes, budget, "greedy", allowed, extra)
        gidx = (np.arange(len(greedy)), greedy)
        assert allowed[gidx].all() and weights[gidx].sum() <= extra[0][1] and sizes[gidx].sum() <= budget


def test_infeasible_budget_names_the_smallest_feasible_one():
    costs = np.ones((3, 2))
    sizes = np.array([[2.0, 4.0], [3.0, 5.0], [1.0, 9.0]])
    with pytest.raises(InfeasibleBudget, match="smallest feasible budget is 6") as e:
        solve_mckp(costs, sizes, 5.5)
    assert e.value.smallest == 6.0
    assert solve_mckp(costs, sizes, 6.0).tolist() == [0, 0, 0]


def test_bad_tables_are_refused():
    with pytest.raises(ValueError, match="same shape|one shape"):
        solve_mckp(np.ones((2, 3)), np.ones((3, 2)), 10)
    with pytest.raises(ValueError, match="NaN"):
        solve_mckp(np.array([[np.nan, 1.0]]), np.ones((1, 2)), 10)
    with pytest.raises(ValueError, match="solver"):
        solve_mckp(np.ones((1, 2)), np.ones((1, 2)), 10, solver="cplex")


@pytest.fixture
def scored(mlp, x0):
    return probe(mlp, x0, horizon=8, progress=False)


def test_cost_table_matches_its_definitions(mlp, scored):
    t = cost_table(scored, mlp, options=(2, 4, 8, 32))
    w = mlp[2].weight
    j4 = list(t["bits"].values).index(4)
    assert t["size"].sel(unit="2.weight").values[j4] == w.numel() * 4 + 16 * w.shape[0]
    assert t["eps"].sel(unit="2.weight").values[j4] == pytest.approx(tqslite.relative_error(w, 4))
    lam = float(scored["curve"].sel(unit="2.weight").isel(lead=-1))
    assert t["cost"].sel(unit="2.weight").values[j4] == pytest.approx(tqslite.relative_error(w, 4) * np.exp(lam))
    assert (t["cost"].sel(option=3) == 0).all()  # float32 costs nothing
    q = cost_table(scored, mlp, options=(2, 4, 8, 32), objective="quadratic")
    np.testing.assert_allclose(q["cost"], t["cost"] ** 2)
    p = cost_table(scored, mlp, options=(2, 4, 8, 32), objective="paper")
    g = scored["gamma"].values
    np.testing.assert_allclose(p["cost"].values[:, 0], (g - g.min() + 0.01) * 0.25)


def test_plan_meets_budget_and_its_size_is_the_packed_size(mlp, scored):
    plan = allocate(scored, mlp, budget_bits=4.5)
    assert list(plan) == list(scored["unit"].values)  # ordered like the units
    assert plan.bits_per_param <= 4.5
    packed = 0
    params = dict(mlp.named_parameters())
    for unit, bits in plan.items():
        w = params[unit]
        packed += (QuantizedTensor.from_tensor(w.detach(), bits).nbits if bits <= 8 else w.numel() * bits)
    assert packed == plan.size_bits


def test_exact_allocation_is_no_worse_than_greedy(mlp, scored):
    for budget in (3.5, 4.5, 6.0):
        exact = allocate(scored, mlp, budget_bits=budget)
        greedy = allocate(scored, mlp, budget_bits=budget, solver="greedy")
        assert exact.objective_value <= greedy.objective_value * (1 + 1e-9)
        assert greedy.bits_per_param <= budget


def test_budget_forms_agree(mlp, scored):
    n = sum(p.numel() for p in mlp.parameters())
    a = allocate(scored, mlp, budget_bits=4.0)
    b = allocate(scored, mlp, compression=8.0)
    c = allocate(scored, mlp, budget_bytes=n * 4 / 8)
    assert dict(a) == dict(b) == dict(c)
    with pytest.raises(ValueError, match="exactly one"):
        allocate(scored, mlp, budget_bits=4, compression=8)


def test_allocation_infeasible_budget_message(mlp, scored):
    with pytest.raises(InfeasibleBudget, match=r"smallest feasible budget is 2\.\d+ bits per parameter"):
        allocate(scored, mlp, budget_bits=1.0)
    with pytest.raises(InfeasibleBudget, match=r"bottom=4"):
        allocate(scored, mlp, budget_bits=3.0, bottom=4)


def test_bottom_tied_and_fp_budget_constraints(mlp, scored):
    plan = allocate(scored, mlp, budget_bits=6, bottom=4)
    assert min(plan.values()) >= 4
    plan = allocate(scored, mlp, budget_bits=5, tied=[["0.weight", "2.weight", "4.weight"]])
    assert plan["0.weight"] == plan["2.weight"] == plan["4.weight"]
    loose = allocate(scored, mlp, budget_bits=12)
    n = sum(plan.n_params.values())
    fp_loose = sum(plan_n for u, plan_n in loose.n_params.items() if loose[u] >= 16) / n
    assert fp_loose > 0.05
    for solver in ("milp", "greedy"):
        tight = allocate(scored, mlp, budget_bits=12, fp_budget=0.05, solver=solver)
        assert sum(tight.n_params[u] for u in tight if tight[u] >= 16) <= 0.05 * n


def test_dead_units_get_the_lowest_tier(mlp, x0):
    with torch.no_grad():
        mlp[2].bias.zero_()  # zero bias: gauss noise of size 0 -> dead
    scores = probe(mlp, x0, horizon=5, progress=False)
    assert scores["dead"].sel(unit="2.bias")
    plan = allocate(scores, mlp, budget_bits=30, bottom=3)
    assert plan["2.bias"] == 3


def test_plan_json_round_trip_and_apply(mlp, scored, tmp_path):
    plan = allocate(scored, mlp, budget_bits=4.0)
    path = plan.save(tmp_path / "plan.json")
    back = Plan.load(path)
    assert back == plan and list(back) == list(plan)
    assert json.loads(path.read_text())["bits_per_param"] == pytest.approx(plan.bits_per_param)
    before = snapshot(mlp)
    q = apply_plan(mlp, back)
    assert same_weights(mlp, before)  # the caller's model is untouched
    for name, p in q.named_parameters():
        assert torch.equal(p, tqslite.rtn_quantize(before[name], plan[name]))
    assert apply_plan(mlp, plan, inplace=True) is mlp and not same_weights(mlp, before)


def test_applying_a_plan_for_another_model_fails_and_writes_nothing(mlp, scored):
    plan = allocate(scored, mlp, budget_bits=4.0)
    plan.members["ghost"] = ("ghost.weight",)
    plan.bits["ghost"] = 4
    before = snapshot(mlp)
    with pytest.raises(ValueError, match="ghost.weight"):
        apply_plan(mlp, plan, inplace=True)
    assert same_weights(mlp, before)


def test_loading_something_that_is_not_a_plan(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="not a tqslite plan"):
        Plan.load(tmp_path / "x.json")


def test_pareto_front_from_one_sweep(mlp, scored):
    front = pareto(scored, mlp, budgets=[3, 4, 5, 6, 8])
    assert front.sizes["budget"] == 5 and front["bits"].dims == ("budget", "unit")
    assert np.all(front["bits_per_param"].values <= front["budget"].values)
    assert np.all(np.diff(front["predicted_error"].values) <= 1e-15)  # more bits never predicts more error
    one = allocate(scored, mlp, budget_bits=5)
    assert front["bits"].sel(budget=5).values.tolist() == list(one.values())
    auto = pareto(scored, mlp)
    assert auto.sizes["budget"] == 10


def test_uniform_plan_is_every_unit_at_one_width(mlp, scored):
    plan = tqslite.uniform_plan(scored, mlp, bits=4)
    assert set(plan.values()) == {4}
    assert plan.size_bits == sum(tqslite.storage_bits(tuple(p.shape), 4) for p in mlp.parameters())
    mixed = allocate(scored, mlp, budget_bits=plan.bits_per_param)
    assert mixed.bits_per_param <= plan.bits_per_param
    assert mixed.predicted_error <= plan.predicted_error  # the optimum is never worse at the same size


def test_a_cost_table_fixes_its_settings(mlp, scored):
    table = cost_table(scored, mlp, options=(2, 4, 8))
    assert set(allocate(table, budget_bits=5).values()) <= {2, 4, 8}
    with pytest.raises(ValueError, match="cost table passed in fixes them"):
        allocate(table, budget_bits=5, options=(4,))
    with pytest.raises(ValueError, match="objective"):
        pareto(table, budgets=[4, 5], objective="quadratic")


def test_pareto_saves_to_netcdf_and_reports_both_predictions(mlp, scored, tmp_path):
    front = pareto(scored, mlp, budgets=[4, 6], fp_budget=None)
    front.to_netcdf(tmp_path / "front.nc")
    assert np.all(front["predicted_rss"] <= front["predicted_error"] + 1e-15)  # ||e||_2 <= ||e||_1
