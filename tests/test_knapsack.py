"""The multiple-choice knapsack: both exact solvers against brute force and each other, greedy feasible and
never better, constraints, the dynamic program's hull and its hand-over to HiGHS."""

import itertools

import numpy as np
import pytest

from tqslite import knapsack
from tqslite.knapsack import InfeasibleBudget, solve_mckp


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


@pytest.mark.parametrize("solver", ["exact", "milp"])
def test_exact_solvers_equal_brute_force_and_greedy_is_feasible(rng, solver):
    gaps = []
    for _ in range(40):
        costs, sizes, budget = random_instance(rng)
        best, _ = brute_force(costs, sizes, budget)
        exact = solve_mckp(costs, sizes, budget, solver)
        idx = (np.arange(len(exact)), exact)
        assert sizes[idx].sum() <= budget
        assert costs[idx].sum() == pytest.approx(best, rel=1e-9, abs=1e-12)
        greedy = solve_mckp(costs, sizes, budget, "greedy")
        gidx = (np.arange(len(greedy)), greedy)
        assert sizes[gidx].sum() <= budget  # greedy never breaks the constraint
        assert costs[gidx].sum() >= best - 1e-12  # and never beats the optimum
        gaps.append(costs[gidx].sum() / best - 1)
    assert max(gaps) > 0  # on some instances greedy is measurably suboptimal: the exact solver matters


def test_dynamic_program_equals_brute_force_on_awkward_instances(rng):
    """Ties in cost and size, masked options, one-option units, fractional sizes, a unit whose larger
    option costs more: the pruning bounds and the Pareto lists must keep an optimum in every case."""
    checked = 0
    for _ in range(300):
        U, K = rng.integers(1, 6), rng.integers(1, 5)
        costs, sizes, budget = random_instance(rng, U, K)
        if rng.random() < 0.3:
            costs = np.round(costs, 1)  # ties in cost
        if rng.random() < 0.3:
            sizes = np.round(sizes / 8) * 8  # ties in size
        if rng.random() < 0.3:
            sizes = sizes + rng.random(sizes.shape)  # sizes that are not integers
        if rng.random() < 0.3:
            costs = costs[:, ::-1].copy()  # larger options cost more: the smallest is best
        allowed = rng.random(costs.shape) > 0.25
        allowed[np.arange(U), rng.integers(K, size=U)] = True
        best, _ = brute_force(costs, sizes, budget, allowed)
        if not np.isfinite(best):
            continue
        choice = solve_mckp(costs, sizes, budget, "exact", allowed)
        idx = (np.arange(U), choice)
        assert allowed[idx].all() and sizes[idx].sum() <= budget
        assert costs[idx].sum() == pytest.approx(best, rel=1e-12, abs=1e-15)
        checked += 1
    assert checked > 150


def test_dynamic_program_equals_highs_on_large_instances(rng):
    """60 and 300 units of a quantization-like table (size = params x bits + scales, cost ~ 2^-2b):
    the objective matches HiGHS's proven optimum and the budget holds to the bit."""
    bits = np.array([2, 3, 4, 5, 6, 8, 16.0])
    for units in (60, 300):
        n = rng.integers(1_000, 500_000, size=units)
        sizes = n[:, None] * bits + np.where(bits <= 8, 16 * np.ceil(n / 256)[:, None], 0)
        costs = np.exp(rng.normal(0, 2, size=(units, 1))) * 4.0 ** -bits * rng.uniform(0.8, 1.2, (units, 7))
        for per_param in (2.5, 4.0, 7.0):
            budget = per_param * n.sum()
            dp, hi = solve_mckp(costs, sizes, budget, "exact"), solve_mckp(costs, sizes, budget, "milp")
            rows = np.arange(units)
            assert sizes[rows, dp].sum() <= budget
            assert costs[rows, dp].sum() == pytest.approx(costs[rows, hi].sum(), rel=1e-9)


def test_hull_drops_points_above_the_chord_and_dominated_options():
    size = np.array([3.0, 1.0, 4.0, 2.0, 5.0, 2.0])
    cost = np.array([3.5, 10.0, 1.0, 4.0, 2.0, 6.0])
    # (3, 3.5) lies above the chord (2, 4)-(4, 1); (5, 2) is larger and dearer; (2, 6) is dearer at size 2
    assert knapsack._hull(size, cost).tolist() == [[1.0, 10.0], [2.0, 4.0], [4.0, 1.0]]


def test_exact_hands_over_to_highs_past_its_work_limit_or_with_extra_constraints(rng, monkeypatch):
    calls = []
    real = knapsack._milp
    monkeypatch.setattr(knapsack, "_milp", lambda *a: calls.append(1) or real(*a))
    costs, sizes, budget = random_instance(rng, U=6, K=4)
    best, _ = brute_force(costs, sizes, budget)
    solve_mckp(costs, sizes, budget, "exact")
    assert calls == []  # small: the dynamic program answers
    monkeypatch.setattr(knapsack, "DP_WORK_LIMIT", 5)
    choice = solve_mckp(costs, sizes, budget, "exact")
    assert calls == [1]
    assert costs[np.arange(6), choice].sum() == pytest.approx(best, rel=1e-9)
    monkeypatch.setattr(knapsack, "DP_WORK_LIMIT", 10**9)
    solve_mckp(costs, sizes, budget, "exact", extra=[(np.ones_like(costs), 6.0)])
    assert calls == [1, 1]


def test_exact_solvers_equal_brute_force_with_masks_and_an_extra_constraint(rng):
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
        exact = solve_mckp(costs, sizes, budget, "exact", allowed, extra)
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
