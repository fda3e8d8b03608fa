"""Closed-loop refinement: measured fitness, never over budget, never worse than the knapsack, brute force."""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

import tqslite
from tqslite.bank import WeightBank
from tqslite.config import int_options
from tqslite.refine import FULL, Fidelity, Judge, operating_point, refine, within_budget
from conftest import same_weights, snapshot


@pytest.fixture
def setup(mlp, x0):
    options = int_options((2, 3, 4, 6, 8), floats=False)
    bank = WeightBank.build(mlp, options)
    scores = tqslite.probe(mlp, x0, horizon=4, progress=False)
    table = tqslite.cost_table(scores, mlp, options, quantizer=bank)
    budget = tqslite.plan_size(tqslite.uniform_plan(mlp, 3), mlp).bits_per_param
    plan = tqslite.allocate(table, budget_bits=budget)
    return mlp, x0, bank, table, budget, plan


def test_fitness_is_the_rms_divergence_of_the_whole_quantized_rollout(setup):
    mlp, x0, bank, _, _, plan = setup
    before = snapshot(mlp)
    judge = Judge(mlp, bank, x0, horizon=4)
    f = judge.fitness(plan)
    assert same_weights(mlp, before)           # swapped in and restored
    q = tqslite.apply_plan(mlp, plan, tqslite.RTN())
    with torch.no_grad():
        a, b = tqslite.rollout(q, x0, 4)[-1], tqslite.rollout(mlp, x0, 4)[-1]
    d = ((a - b) ** 2).mean(dim=1).sqrt()      # RMS over state elements, per window
    assert f == pytest.approx(float(d.pow(2).mean().sqrt()), rel=1e-12)
    half = judge.fitness(plan, Fidelity(n_windows=8, horizon=2))
    with torch.no_grad():
        a, b = tqslite.rollout(q, x0[:8], 2)[-1], tqslite.rollout(mlp, x0[:8], 2)[-1]
    assert half == pytest.approx(float(((a - b) ** 2).mean(dim=1).mean().sqrt()), rel=1e-12)
    assert judge.full_rollouts == pytest.approx(1 + 8 * 2 / (16 * 4))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_search_never_goes_over_budget_nor_below_the_knapsack(setup, seed):
    mlp, x0, bank, table, budget, plan = setup
    judge = Judge(mlp, bank, x0, horizon=4)
    start = judge.fitness(plan)
    out = refine(judge, table, plan, budget, generations=6, offspring=8, survivors=2, seed=seed)
    assert within_budget(out.plan, mlp, budget)
    size = tqslite.plan_size(out.plan, mlp).bits_per_param
    assert size >= min(0.99 * budget, tqslite.plan_size(plan, mlp).bits_per_param)   # still a matched size
    assert out.fitness <= start and out.start_fitness == start
    assert judge.fitness(out.plan) == pytest.approx(out.fitness, rel=1e-12)   # the reported fitness is measured
    assert out.rollouts > 0 and out.seconds > 0 and sum(out.evaluations.values()) > 0
    op = operating_point(judge, table, plan, budget, levels=1)
    assert within_budget(op.plan, mlp, budget) and op.fitness <= start


def test_a_start_over_budget_is_refused(setup):
    mlp, x0, bank, table, budget, _ = setup
    big = tqslite.uniform_plan(mlp, 8)
    with pytest.raises(ValueError, match="over the budget"):
        refine(Judge(mlp, bank, x0, 4), table, big, budget, generations=1)


def test_the_search_reaches_the_brute_force_optimum_of_a_small_problem():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 12, bias=False), nn.Tanh(), nn.Linear(12, 6, bias=False)).double()
    x0 = torch.randn(12, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    options = int_options((2, 3, 4, 6), floats=False)
    bank = WeightBank.build(model, options)
    scores = tqslite.probe(model, x0, horizon=3, perturbation="gauss", progress=False)
    table = tqslite.cost_table(scores, model, options, quantizer=bank)
    budget = tqslite.plan_size(tqslite.uniform_plan(model, 3), model).bits_per_param
    judge = Judge(model, bank, x0, horizon=3)
    best = math.inf
    for rows in itertools.product(range(4), repeat=2):        # every plan, the ones within budget measured
        plan = tqslite.allocation.plan_from_rows(table, rows, {})
        if within_budget(plan, model, budget):
            best = min(best, judge.fitness(plan))
    start = tqslite.allocate(table, budget_bits=budget)
    out = refine(judge, table, start, budget, generations=10, offspring=6, survivors=3, min_fill=0.0, seed=0)
    assert out.fitness == pytest.approx(best, rel=1e-12)
    # from the optimum, every neighbour measures worse: the search must keep it, not trade down
    again = refine(judge, table, out.plan, budget, generations=5, offspring=6, survivors=3, min_fill=0.0, seed=1)
    assert again.plan.configs == out.plan.configs and again.fitness == out.fitness
    assert all(not h["taken"] for h in again.history)


def test_fidelity_and_judge_check_their_settings(setup):
    mlp, x0, bank, *_ = setup
    with pytest.raises(ValueError, match="positive integer"):
        Fidelity(n_windows=0)
    with pytest.raises(ValueError, match="WeightBank"):
        Judge(mlp, tqslite.RTN(), x0, 4)
    with pytest.raises(ValueError, match="horizon"):
        Judge(mlp, bank, x0, 0)
    assert FULL == Fidelity()
    assert np.isfinite(Judge(mlp, bank, x0, 2).fitness(tqslite.uniform_plan(mlp, 2)))
