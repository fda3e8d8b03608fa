"""The multiple-choice knapsack: one option per unit, least total cost under a size budget.

Depends on numpy and scipy only. Three solvers (SPEC section 3):

* ``exact`` (default) -- exact: a dynamic program over the Pareto front of (size, cost) of the
  units taken so far (Nemhauser and Ullmann's lists), largest units first, pruned by a lower
  bound (the linear-programming relaxation of the units still to come, read off their convex
  hulls) against an upper bound (the relaxation's rounded-down, feasible solution). Sizes add
  exactly, so the budget holds without tolerances. When its lists would grow past
  :data:`DP_WORK_LIMIT` candidates (thousands of units), or extra constraints are given, it
  hands the instance to ``milp``;
* ``milp`` -- exact: an integer program solved by HiGHS (:func:`scipy.optimize.milp`) with
  ``mip_rel_gap=0``; costs are rescaled so HiGHS's absolute tolerance is negligible, and a
  solution that its tolerances let spill over the budget is re-solved with a tighter limit;
* ``greedy`` -- start every unit at its largest option (ties: lowest cost) and repeatedly take
  the downgrade, to any option of strictly smaller size, with the smallest cost increase per
  unit of size saved, until every constraint holds.

An infeasible budget is refused before either solver runs, naming the smallest feasible one.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp


class InfeasibleBudget(ValueError):
    """The budget is below the smallest size any allowed choice reaches; ``smallest`` says what is."""

    def __init__(self, message: str, smallest: float):
        super().__init__(message)
        self.smallest = smallest


# --------------------------------------------------------------------------------------------
# The multiple-choice knapsack
# --------------------------------------------------------------------------------------------

def smallest_size(sizes, allowed) -> float:
    """The least total size any choice of allowed options reaches."""
    return float(np.where(allowed, sizes, np.inf).min(axis=1).sum())


@contextlib.contextmanager
def _quiet_stdout():
    """Silence HiGHS's C-level debug prints (written to file descriptor 1) during a solve."""
    sys.stdout.flush()
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


def _milp(costs, sizes, budget, allowed, extra):
    U, K = costs.shape
    c = np.where(allowed, costs, 0.0)
    c = c - c.min(axis=1, keepdims=True)  # a constant per unit: the argmin is unchanged
    scale = np.abs(c).max()
    # HiGHS calls a gap below 1e-6 (absolute) closed: scale costs so that it is negligible.
    c = c * (1e6 / scale) if scale > 0 else c
    one_per_unit = sparse.kron(sparse.eye(U), np.ones((1, K)), format="csr")
    limit = math.floor(budget) + 0.5 if float(sizes.max()).is_integer() else budget
    for _ in range(3):
        cons = [LinearConstraint(one_per_unit, 1, 1), LinearConstraint(sizes.reshape(1, -1), -np.inf, limit)]
        cons += [LinearConstraint(w.reshape(1, -1), -np.inf, lim) for w, lim in extra]
        with _quiet_stdout():
            res = milp(c.ravel(), integrality=np.ones(U * K), bounds=Bounds(0, allowed.ravel().astype(float)),
                       constraints=cons, options={"mip_rel_gap": 0.0})
        if res.x is None:
            raise ValueError(f"the exact solver found no solution ({res.message}); the constraints are jointly infeasible.")
        choice = res.x.reshape(U, K).argmax(axis=1)
        over = sizes[np.arange(U), choice].sum() - budget
        if over <= 0:
            return choice
        limit -= over  # HiGHS tolerances let the rounded solution spill over: tighten and re-solve
    raise RuntimeError("the exact solver kept returning solutions over the budget; report this instance.")


#: Candidates (list entries times options, summed over units) the dynamic program may examine
#: before it hands the instance to HiGHS. Measured on quantization-like tables (7 options, sizes
#: params x bits + scales): 40 units about 10^3, 1000 units about 5 * 10^5, 3000 units about
#: 10^7, where both solvers take about 2 s (``benchmarks/probe_throughput.py`` times both).
DP_WORK_LIMIT = 20_000_000


def _hull(size, cost):
    """The lower convex hull of one unit's options, from the smallest: points with size rising,
    cost falling and slope (cost per size) rising. Options off it never win the LP relaxation."""
    order = np.lexsort((cost, size))
    hull: list[tuple[float, float]] = []
    for x, y in zip(size[order], cost[order]):
        if hull and (x == hull[-1][0] or y >= hull[-1][1]):
            continue  # same size and dearer, or larger and no cheaper: dominated
        while len(hull) >= 2 and (hull[-1][1] - hull[-2][1]) * (x - hull[-2][0]) >= (y - hull[-2][1]) * (
                hull[-1][0] - hull[-2][0]):
            hull.pop()  # the last point lies on or above the chord to the new one
        hull.append((float(x), float(y)))
    return np.array(hull)


def _relaxation(costs, sizes, allowed):
    """The LP relaxation's ingredients: each unit's hull start and its hull segments by slope.

    Returns ``start (U, 2)`` (size, cost of each unit's smallest hull point) and ``segments``,
    an array ``(n, 3)`` of (unit, size step, cost step) sorted by cost per size, steepest fall
    first: taking segments in this order is the relaxation's optimum at every capacity.
    """
    start, segments = np.zeros((costs.shape[0], 2)), []
    for u in range(costs.shape[0]):
        h = _hull(sizes[u, allowed[u]], costs[u, allowed[u]])
        start[u] = h[0]
        segments += [(u, *step) for step in np.diff(h, axis=0)]
    segments = np.array(segments, float).reshape(-1, 3)
    return start, segments[np.argsort(segments[:, 2] / segments[:, 1], kind="stable")]


def _dp(costs, sizes, budget, allowed):
    """Exact by dynamic programming over Pareto lists, pruned by LP bounds; ``None`` past the work limit."""
    U = costs.shape[0]
    order = np.argsort(-np.where(allowed, sizes, -np.inf).max(axis=1), kind="stable")  # largest units first
    costs, sizes, allowed = costs[order], sizes[order], allowed[order]
    start, segments = _relaxation(costs, sizes, allowed)
    # Upper bound: the relaxation rounded down, i.e. hull segments taken by slope while they fit.
    room, frozen, upper = budget - start[:, 0].sum(), np.zeros(U, bool), start[:, 1].sum()
    for u, ds, dc in segments:
        if not frozen[int(u)]:
            if ds <= room:
                room, upper = room - ds, upper + dc
            else:
                frozen[int(u)] = True  # its later segments follow this one: none of them can be taken
    slack = 1e-9 * abs(upper) + 1e-300
    unit_of = segments[:, 0].astype(int)
    lists_size, lists_cost, trail, work = np.zeros(1), np.zeros(1), [], 0
    for i in range(U):
        # The relaxation of units i+1.. as a convex, falling, piecewise-linear function of capacity.
        later = unit_of > i
        xs = start[i + 1:, 0].sum() + np.concatenate([[0.0], np.cumsum(segments[later, 1])])
        ys = start[i + 1:, 1].sum() + np.concatenate([[0.0], np.cumsum(segments[later, 2])])
        ks = np.flatnonzero(allowed[i])
        work += ks.size * lists_size.size
        if work > DP_WORK_LIMIT:
            return None
        size = (lists_size[None, :] + sizes[i, ks, None]).ravel()
        cost = (lists_cost[None, :] + costs[i, ks, None]).ravel()
        parent = np.tile(np.arange(lists_size.size), ks.size)
        option = np.repeat(ks, lists_size.size)
        room = budget - size
        fits = room >= xs[0]  # the later units' smallest options still fit
        bound = np.full(size.shape, np.inf)
        bound[fits] = cost[fits] + np.interp(room[fits], xs, ys)
        keep = bound <= upper + slack
        size, cost, parent, option = size[keep], cost[keep], parent[keep], option[keep]
        by_size = np.lexsort((cost, size))
        size, cost, parent, option = size[by_size], cost[by_size], parent[by_size], option[by_size]
        front = np.ones(size.size, bool)  # Pareto: each kept entry is cheaper than every smaller one
        front[1:] = cost[1:] < np.minimum.accumulate(cost)[:-1]
        lists_size, lists_cost = size[front], cost[front]
        trail.append((parent[front], option[front]))
    j = int(np.argmin(lists_cost))  # every entry fits; the cheapest wins
    choice = np.empty(U, int)
    for i in range(U - 1, -1, -1):
        parent, option = trail[i]
        choice[order[i]], j = option[j], parent[j]
    return choice


def _greedy(costs, sizes, budget, allowed, extra):
    U = costs.shape[0]
    rows = np.arange(U)
    big = np.where(allowed, sizes, -np.inf)
    # Start at the largest allowed option; among equally large ones, the cheapest.
    start = np.where(big == big.max(axis=1, keepdims=True), np.where(allowed, costs, np.inf), np.inf)
    cur = start.argmin(axis=1)

    def violated():
        if sizes[rows, cur].sum() > budget:
            return None  # the size budget: any downgrade helps
        for w, lim in extra:
            if w[rows, cur].sum() > lim:
                return w
        return False

    while (which := violated()) is not False:
        saved = sizes[rows, cur][:, None] - sizes
        ok = allowed & (saved > 0)
        if which is not None:
            ok &= which[rows, cur][:, None] - which > 0
        if not ok.any():
            raise ValueError("greedy only downgrades, and no downgrade brings the constraints within their limits; "
                             "use solver='milp'.")
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(ok, (costs - costs[rows, cur][:, None]) / saved, np.inf)
        u, k = np.unravel_index(np.argmin(ratio), ratio.shape)
        cur[u] = k
    return cur


def solve_mckp(costs, sizes, budget: float, solver: str = "exact", allowed=None, extra=()) -> np.ndarray:
    """Choose one option per unit: minimise total cost with total size <= budget.

    Parameters
    ----------
    costs, sizes : array_like, shape ``(units, options)``
        Cost and size of each option (sizes in any unit, usually bits). Non-finite costs are
        treated as forbidden options.
    budget : float
        The bound on the summed size.
    solver : {"exact", "milp", "greedy"}
        ``exact``: a dynamic program over Pareto lists pruned by LP bounds (HiGHS past
        :data:`DP_WORK_LIMIT`, or with ``extra`` constraints). ``milp``: exact, an integer
        program solved by HiGHS with ``mip_rel_gap=0``. ``greedy``:
        start every unit at its largest option (ties: lowest cost) and repeatedly take the
        downgrade, to any option of strictly smaller size, with the smallest cost increase per
        unit of size saved, until every constraint holds.
    allowed : array_like of bool, shape ``(units, options)``, optional
        Options a unit may take (default: all with finite cost).
    extra : sequence of ``(weights, limit)``
        More constraints ``sum(weights[u, choice[u]]) <= limit`` (weights shaped like ``costs``).

    Returns
    -------
    numpy.ndarray of int, shape ``(units,)``
        The chosen option index of each unit.

    Raises
    ------
    InfeasibleBudget
        Before any solver runs, when even the smallest allowed options exceed the budget; the
        message and ``.smallest`` give the smallest feasible budget.
    """
    costs = np.asarray(costs, dtype=float)
    sizes = np.asarray(sizes, dtype=float)
    if costs.ndim != 2 or costs.shape != sizes.shape or costs.shape[0] == 0:
        raise ValueError(f"costs and sizes must be non-empty arrays of one shape (units, options); "
                         f"got {costs.shape} and {sizes.shape}.")
    if np.isnan(costs).any() or not np.isfinite(sizes).all() or (sizes < 0).any():
        raise ValueError("costs must not be NaN, and sizes must be finite and non-negative.")
    allowed = np.isfinite(costs) & (np.ones_like(costs, bool) if allowed is None else np.asarray(allowed, bool))
    if not allowed.any(axis=1).all():
        raise ValueError(f"unit(s) {np.flatnonzero(~allowed.any(axis=1)).tolist()} have no allowed option.")
    extra = [(np.asarray(w, float), float(lim)) for w, lim in extra]
    smallest = smallest_size(sizes, allowed)
    if smallest > budget:
        raise InfeasibleBudget(f"budget {budget:.6g} is infeasible: the smallest feasible budget is {smallest:.6g}.",
                               smallest)
    for w, lim in extra:
        if smallest_size(w, allowed) > lim:
            raise ValueError(f"an extra constraint (limit {lim:.6g}) cannot hold: its smallest reachable total is "
                             f"{smallest_size(w, allowed):.6g}.")
    costs = np.where(allowed, costs, 0.0)
    if solver == "exact" and not extra:
        choice = _dp(costs, sizes, budget, allowed)
        if choice is not None:
            return choice
    if solver in ("exact", "milp"):
        return _milp(costs, sizes, budget, allowed, extra)
    if solver == "greedy":
        return _greedy(costs, sizes, budget, allowed, extra)
    raise ValueError(f"solver={solver!r}: use 'exact' (the default), 'milp' (exact, HiGHS) or 'greedy'.")


__all__ = ["DP_WORK_LIMIT", "InfeasibleBudget", "smallest_size", "solve_mckp"]
