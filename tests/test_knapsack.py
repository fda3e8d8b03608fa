"""The multiple-choice knapsack: exact against brute force, greedy feasible and never better, constraints."""

import itertools

import numpy as np
import pytest

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
