"""The multiple-choice knapsack: one option per unit, least total cost under a size budget.

Depends on numpy and scipy only. Two solvers (SPEC section 3):

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


def solve_mckp(costs, sizes, budget: float, solver: str = "milp", allowed=None, extra=()) -> np.ndarray:
    """Choose one option per unit: minimise total cost with total size <= budget.

    Parameters
    ----------
    costs, sizes : array_like, shape ``(units, options)``
        Cost and size of each option (sizes in any unit, usually bits). Non-finite costs are
        treated as forbidden options.
    budget : float
        The bound on the summed size.
    solver : {"milp", "greedy"}
        ``milp``: exact, an integer program solved by HiGHS with ``mip_rel_gap=0``. ``greedy``:
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
    if solver == "milp":
        return _milp(costs, sizes, budget, allowed, extra)
    if solver == "greedy":
        return _greedy(costs, sizes, budget, allowed, extra)
    raise ValueError(f"solver={solver!r}: use 'milp' (exact) or 'greedy'.")


__all__ = ["InfeasibleBudget", "smallest_size", "solve_mckp"]
