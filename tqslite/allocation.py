"""Mixed-precision allocation: one bit width per unit under a size budget (SPEC section 3).

The pipeline is ``scores -> cost table -> multiple-choice knapsack -> Plan -> quantized copy``:

* :func:`cost_table` prices every (unit, bit width) option: its exact stored size in bits and its
  cost under an objective -- ``linear`` (default) ``e_u(b) = eps_u(b) * exp(Lambda_u(T))``, the
  linear-response prediction of the rollout error that unit alone causes at lead ``T``;
  ``quadratic`` ``e_u(b)**2``; or ``paper`` ``w_u * 2**-b`` with ``w_u`` a positive shift of gamma.
* :func:`solve_mckp` picks one option per unit minimising the summed cost with the summed size
  within the budget: exactly (``milp``, HiGHS with ``mip_rel_gap=0``) or by the ``greedy``
  downgrade rule.
* :func:`allocate` wraps both into a :class:`Plan` (an ordered ``{unit: bits}`` map),
  :func:`apply_plan` returns a quantized copy of a model, and :func:`pareto` solves many budgets
  from one score set -- the whole Pareto front for one probe sweep.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from .quantization import relative_error, rtn_quantize, storage_bits
from .systems import as_system
from .units import Unit

DEFAULT_OPTIONS = (2, 3, 4, 8, 16, 32)
OBJECTIVES = ("linear", "quadratic", "paper")


class InfeasibleBudget(ValueError):
    """The budget is below the smallest size any allowed choice reaches; ``smallest`` says what is."""

    def __init__(self, message: str, smallest: float):
        super().__init__(message)
        self.smallest = smallest


# --------------------------------------------------------------------------------------------
# The multiple-choice knapsack
# --------------------------------------------------------------------------------------------

def _smallest_size(sizes, allowed) -> float:
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
    smallest = _smallest_size(sizes, allowed)
    if smallest > budget:
        raise InfeasibleBudget(f"budget {budget:.6g} is infeasible: the smallest feasible budget is {smallest:.6g}.",
                               smallest)
    for w, lim in extra:
        if _smallest_size(w, allowed) > lim:
            raise ValueError(f"an extra constraint (limit {lim:.6g}) cannot hold: its smallest reachable total is "
                             f"{_smallest_size(w, allowed):.6g}.")
    costs = np.where(allowed, costs, 0.0)
    if solver == "milp":
        return _milp(costs, sizes, budget, allowed, extra)
    if solver == "greedy":
        return _greedy(costs, sizes, budget, allowed, extra)
    raise ValueError(f"solver={solver!r}: use 'milp' (exact) or 'greedy'.")


# --------------------------------------------------------------------------------------------
# Cost tables
# --------------------------------------------------------------------------------------------

def _units_of(scores: xr.Dataset) -> list[Unit]:
    return [Unit(str(u), tuple(str(m).split(","))) for u, m in zip(scores["unit"].values, scores["members"].values)]


def cost_table(scores: xr.Dataset, model, options=DEFAULT_OPTIONS, objective: str = "linear",
               granularity: str = "channel", group_size: int | None = None, symmetric: bool = True,
               lead: int | None = None, bottom: int | None = None, paper_shift: float = 0.01) -> xr.Dataset:
    """Price every (unit, bit width) option from probe scores and the model's weights.

    Parameters
    ----------
    scores : xarray.Dataset
        A :func:`tqslite.probe` result (uses ``curve``, ``gamma``, ``dead``, ``nonfinite``, ``members``).
    model : nn.Module or system
        The model the scores belong to; its weights give ``eps_u(b)`` and the sizes.
    options : sequence of int
        Bit widths (1-8, 16, 32).
    objective : {"linear", "quadratic", "paper"}
        See the module docstring.
    granularity, group_size, symmetric
        The RTN settings the plan will be applied with (they set sizes and ``eps_u(b)``). With
        ``granularity="group"``, tensors whose channels ``group_size`` does not divide keep one
        scale per channel (:func:`tqslite.quantization.grid_for`).
    lead : int, optional
        The lead ``T`` whose ``Lambda_u(T)`` is used (default: the probe's horizon).
    bottom : int, optional
        The lowest bit width allowed.
    paper_shift : float
        For ``objective="paper"``: ``w_u = gamma_u - min(gamma) + paper_shift``.

    Returns
    -------
    xarray.Dataset
        Dims ``unit`` and ``option`` (coordinate ``bits``): ``size`` (bits), ``eps``,
        ``predicted`` (= ``eps * exp(Lambda)``, the linear-response error), ``cost``,
        ``allowed``, plus ``n_params(unit)``. Dead units may take only their lowest allowed
        option; units whose probe rollout turned non-finite only their highest.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}: use one of {OBJECTIVES}.")
    options = tuple(sorted({check_bits(b, symmetric) for b in options}))
    system = as_system(model)
    units = _units_of(scores)
    known = set(system.parameter_names())
    missing = sorted({p for u in units for p in u.params} - known)
    if missing:
        raise ValueError(f"the scores name parameters the model does not have: {missing[:5]}; "
                         "were they computed on another model?")
    lead = scores.sizes["lead"] if lead is None else lead
    lam = scores["curve"].sel(lead=lead).values.astype(float)
    U, K = len(units), len(options)
    eps, size = np.zeros((U, K)), np.zeros((U, K))
    for i, u in enumerate(units):
        ws = [(system.get_parameter(p), system.channel_axis(p)) for p in u.params]
        norms = [float(w.double().norm()) for w, _ in ws]
        total = math.sqrt(sum(n**2 for n in norms))
        kws = [dict(grid_for(tuple(w.shape), granularity, ax, group_size), axis=ax, symmetric=symmetric) for w, ax in ws]
        for j, b in enumerate(options):
            size[i, j] = sum(storage_bits(tuple(w.shape), b, **kw) for (w, _), kw in zip(ws, kws))
            residual = math.sqrt(sum((relative_error(w, b, **kw) * n) ** 2 for (w, _), kw, n in zip(ws, kws, norms)))
            eps[i, j] = residual / total if total > 0 else 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        predicted = eps * np.exp(lam)[:, None]
    predicted[np.isnan(predicted)] = 0.0  # eps = 0 (kept in float, or already on the grid)
    if objective == "linear":
        cost = predicted.copy()
    elif objective == "quadratic":
        cost = predicted**2
    else:
        gamma = scores["gamma"].values.astype(float)
        finite = np.isfinite(gamma)
        w = np.where(finite, gamma - (gamma[finite].min() if finite.any() else 0.0) + paper_shift, 0.0)
        cost = w[:, None] * 2.0 ** -np.asarray(options, float)[None, :]
    bits = np.asarray(options)
    allowed = np.ones((U, K), bool) if bottom is None else np.broadcast_to(bits >= bottom, (U, K)).copy()
    if not allowed.any():
        raise ValueError(f"bottom={bottom} leaves no option among {options}.")
    dead, nonfinite = scores["dead"].values, scores["nonfinite"].values
    lowest, highest = np.argmax(allowed[0]), K - 1
    allowed[dead] = False
    allowed[dead, lowest] = True
    cost[dead] = 0.0
    allowed[nonfinite] = False
    allowed[nonfinite, highest] = True
    cost[nonfinite] = 0.0
    if not np.isfinite(cost[allowed]).all():
        raise ValueError("some costs overflowed (Lambda too large); use a shorter lead or the 'paper' objective.")
    return xr.Dataset(
        {
            "size": (("unit", "option"), size, {"units": "bit"}),
            "eps": (("unit", "option"), eps, {"long_name": "relative RTN residual eps_u(b)"}),
            "predicted": (("unit", "option"), predicted, {"long_name": "linear-response error eps_u(b) exp(Lambda_u(T))"}),
            "cost": (("unit", "option"), cost, {"long_name": f"cost ({objective} objective)"}),
            "allowed": (("unit", "option"), allowed),
            "n_params": ("unit", scores["n_params"].values),
            "members": ("unit", scores["members"].values),
        },
        coords={"unit": scores["unit"].values, "bits": ("option", bits)},
        attrs=dict(objective=objective, granularity=granularity, group_size=group_size or "none",
                   symmetric=int(symmetric), lead=int(lead), bottom=bottom or "none", kind=scores.attrs.get("kind", "?")),
    )


# --------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------

@dataclass
class Plan(Mapping):
    """An ordered ``{unit: bits}`` map, with what is needed to apply it and judge it.

    ``members`` gives each unit's parameter names; ``settings`` the RTN settings (granularity,
    group size, symmetric) and how the plan was made. ``size_bits`` counts every stored bit,
    scales included; ``predicted_error`` is the linear-response prediction of the rollout RMS
    error at the probe's lead, ``sum_u eps_u(b_u) exp(Lambda_u(T))`` (errors that add up), and
    ``predicted_rss`` the same terms added in quadrature (independent errors).
    """

    bits: dict
    members: dict
    n_params: dict
    size_bits: int
    predicted_error: float
    objective_value: float
    predicted_rss: float = float("nan")
    settings: dict = field(default_factory=dict)

    def __getitem__(self, unit):
        return self.bits[unit]

    def __iter__(self):
        return iter(self.bits)

    def __len__(self):
        return len(self.bits)

    @property
    def bits_per_param(self) -> float:
        """Average stored bits per parameter, scales included."""
        return self.size_bits / sum(self.n_params.values())

    def to_json(self) -> str:
        return json.dumps({"bits": self.bits, "members": {u: list(m) for u, m in self.members.items()},
                           "n_params": self.n_params, "size_bits": self.size_bits,
                           "bits_per_param": self.bits_per_param, "predicted_error": self.predicted_error,
                           "objective_value": self.objective_value, "predicted_rss": self.predicted_rss,
                           "settings": self.settings}, indent=1)

    def save(self, path) -> Path:
        """Write the plan as JSON (atomically: a failed write leaves any older file intact)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path) -> "Plan":
        d = json.loads(Path(path).read_text())
        try:
            return cls(bits={u: int(b) for u, b in d["bits"].items()},
                       members={u: tuple(m) for u, m in d["members"].items()}, n_params=d["n_params"],
                       size_bits=int(d["size_bits"]), predicted_error=float(d["predicted_error"]),
                       objective_value=float(d["objective_value"]),
                       predicted_rss=float(d.get("predicted_rss", "nan")), settings=d.get("settings", {}))
        except KeyError as e:
            raise ValueError(f"{path} is not a tqslite plan: it lacks {e}.") from None


def _budget_bits(n_total: int, budget_bits, compression, budget_bytes) -> float:
    given = [x is not None for x in (budget_bits, compression, budget_bytes)]
    if sum(given) != 1:
        raise ValueError("give exactly one of budget_bits (average bits per parameter, scales included), "
                         "compression (ratio against float32) or budget_bytes.")
    if budget_bits is not None:
        return float(budget_bits) * n_total
    if compression is not None:
        return 32.0 / float(compression) * n_total
    return 8.0 * float(budget_bytes)


def _merge_tied(table: xr.Dataset, tied):
    """Fold tied units into one row each: returns (costs, sizes, fp weights, allowed, groups of row indices)."""
    labels = list(table["unit"].values)
    groups, seen = [], set()
    for group in tied or ():
        idx = []
        for u in group:
            if u not in labels:
                raise ValueError(f"tied unit {u!r} is not among the scored units.")
            if u in seen:
                raise ValueError(f"unit {u!r} appears in two tied groups.")
            seen.add(u)
            idx.append(labels.index(u))
        groups.append(idx)
    groups += [[i] for i in range(len(labels)) if labels[i] not in seen]
    groups.sort(key=lambda g: g[0])
    fold = lambda a: np.stack([a[g].sum(axis=0) for g in groups])  # noqa: E731
    allowed = np.stack([table["allowed"].values[g].all(axis=0) for g in groups])
    fp = (table["bits"].values >= 16)[None, :] * table["n_params"].values[:, None]
    return fold(table["cost"].values), fold(table["size"].values), fold(fp), allowed, groups


TABLE_SETTINGS = ("options", "objective", "granularity", "group_size", "symmetric", "lead", "bottom")


def _table(scores, model, settings: dict) -> xr.Dataset:
    """``scores`` itself if it is a cost table (then no table setting may be given), else a new one."""
    given = {k: v for k, v in settings.items() if v is not None}
    if "cost" in scores:
        if given:
            raise ValueError(f"{sorted(given)} cannot be changed here: the cost table passed in fixes them. "
                             "Build a new table with cost_table(...), or pass the probe scores and the model.")
        return scores
    return cost_table(scores, _need(model), **given)


def allocate(scores, model=None, *, budget_bits=None, compression=None, budget_bytes=None, options=None,
             solver="milp", objective=None, bottom=None, fp_budget=None, tied=None, granularity=None,
             group_size=None, symmetric=None, lead=None) -> Plan:
    """Choose a bit width per unit under a size budget.

    Parameters
    ----------
    scores : xarray.Dataset
        A probe result (then ``model`` is needed to price options) or a :func:`cost_table`.
    model : nn.Module or system, optional
        The scored model.
    budget_bits, compression, budget_bytes : float
        Exactly one: average stored bits per parameter (scales included), a compression ratio
        against float32, or a total in bytes.
    options, objective, bottom, granularity, group_size, symmetric, lead
        See :func:`cost_table` (its defaults apply). Only with probe scores: a cost table
        already fixes them, and giving them anyway is an error rather than silently ignored.
    solver : {"milp", "greedy"}
        See :func:`solve_mckp`.
    fp_budget : float, optional
        Largest fraction of parameters kept at 16 or 32 bits.
    tied : list of list of str, optional
        Groups of unit labels that must share one bit width.

    Returns
    -------
    Plan
    """
    table = _table(scores, model, dict(options=options, objective=objective, granularity=granularity,
                                       group_size=group_size, symmetric=symmetric, lead=lead, bottom=bottom))
    n_total = int(table["n_params"].sum())
    budget = _budget_bits(n_total, budget_bits, compression, budget_bytes)
    costs, sizes, fp, allowed, groups = _merge_tied(table, tied)
    extra = [] if fp_budget is None else [(fp, float(fp_budget) * n_total)]
    try:
        choice = solve_mckp(costs, sizes, budget, solver, allowed, extra)
    except InfeasibleBudget as e:
        raise InfeasibleBudget(
            f"a budget of {budget / n_total:.4g} bits per parameter ({budget / 8:.0f} bytes) is infeasible with "
            f"options {tuple(table['bits'].values.tolist())} and bottom={table.attrs['bottom']}: the smallest "
            "feasible budget is "
            f"{e.smallest / n_total:.4g} bits per parameter ({math.ceil(e.smallest / 8)} bytes, compression "
            f"{32 * n_total / e.smallest:.3g}x).", e.smallest / n_total) from None
    rows = np.empty(table.sizes["unit"], int)
    for g, k in zip(groups, choice):
        rows[g] = k
    return _plan(table, rows, dict(solver=solver, budget_bits=budget / n_total, fp_budget=fp_budget,
                                   tied=tied or [], options=table["bits"].values.tolist()))


def _need(model):
    if model is None:
        raise ValueError("pass the model the scores belong to (its weights price each option), or a cost_table.")
    return model


def _plan(table: xr.Dataset, rows: np.ndarray, settings: dict) -> Plan:
    idx = np.arange(len(rows))
    labels = [str(u) for u in table["unit"].values]
    return Plan(
        bits={u: int(table["bits"].values[k]) for u, k in zip(labels, rows)},
        members={u: tuple(str(m).split(",")) for u, m in zip(labels, table["members"].values)},
        n_params={u: int(n) for u, n in zip(labels, table["n_params"].values)},
        size_bits=int(table["size"].values[idx, rows].sum()),
        predicted_error=float(table["predicted"].values[idx, rows].sum()),
        objective_value=float(table["cost"].values[idx, rows].sum()),
        predicted_rss=float(np.sqrt((table["predicted"].values[idx, rows] ** 2).sum())),
        settings={**{k: (v.item() if hasattr(v, "item") else v) for k, v in table.attrs.items()}, **settings},
    )


def uniform_plan(scores, model=None, bits: int = 4, granularity="channel", group_size=None,
                 symmetric=True) -> Plan:
    """Every unit at the same bit width: uniform RTN, priced with the same size accounting.

    The baseline that mixed-precision plans are compared with at matched size. ``scores`` is a
    probe result (with ``model``) or a :func:`cost_table` that has ``bits`` among its options.
    """
    table = scores if "cost" in scores else cost_table(
        scores, _need(model), (bits,), "linear", granularity, group_size, symmetric)
    options = table["bits"].values.tolist()
    if bits not in options:
        raise ValueError(f"bits={bits} is not among the cost table's options {options}.")
    rows = np.full(table.sizes["unit"], options.index(bits))
    return _plan(table, rows, dict(solver="uniform", budget_bits=None, fp_budget=None, tied=[], options=options))


def pareto(scores, model=None, budgets=None, **kwargs) -> xr.Dataset:
    """Plans for many budgets (average bits per parameter) from one score set.

    The cost table is computed once; each budget costs one solve. ``budgets=None`` takes 10
    budgets evenly spaced from the smallest feasible one to that of every unit at its largest
    option below 16 bits. Keyword arguments go to :func:`allocate`. Returns a Dataset with dims ``budget`` and ``unit``: ``bits(budget, unit)``,
    ``bits_per_param``, ``size_bits``, ``predicted_error``, ``objective_value`` and
    ``solve_seconds`` per budget.
    """
    table = _table(scores, model, {k: kwargs.pop(k, None) for k in TABLE_SETTINGS})
    if budgets is None:
        n_total = float(table["n_params"].sum())
        allowed, size = table["allowed"].values, table["size"].values
        low = _smallest_size(size, allowed) / n_total
        int_opts = allowed & (table["bits"].values <= 8)[None, :]
        high = np.where(int_opts | ~int_opts.any(1, keepdims=True) & allowed, size, -np.inf).max(1).sum() / n_total
        budgets = np.linspace(low, max(high, low), 10)
    plans, seconds = [], []
    for b in budgets:
        t0 = time.perf_counter()
        plans.append(allocate(table, budget_bits=b, **kwargs))
        seconds.append(time.perf_counter() - t0)
    return xr.Dataset(
        {
            "bits": (("budget", "unit"), np.array([[p[u] for u in p] for p in plans])),
            "bits_per_param": ("budget", [p.bits_per_param for p in plans]),
            "size_bits": ("budget", [p.size_bits for p in plans]),
            "predicted_error": ("budget", [p.predicted_error for p in plans]),
            "objective_value": ("budget", [p.objective_value for p in plans]),
            "predicted_rss": ("budget", [p.predicted_rss for p in plans]),
            "solve_seconds": ("budget", seconds),
        },
        coords={"budget": np.asarray(budgets, float), "unit": table["unit"].values},
        attrs={k: "none" if v is None else v for k, v in plans[0].settings.items()
               if k not in ("budget_bits", "tied", "options")},
    )


def apply_plan(model, plan: Plan, inplace: bool = False):
    """Return a copy of ``model`` with every unit's weights RTN-quantized at the plan's bits.

    ``model`` (an ``nn.Module`` or a system) is left untouched unless ``inplace=True``. The
    plan is checked against the model before anything is written: unknown parameters raise
    ``ValueError`` naming them.
    """
    target = model if inplace else copy.deepcopy(model)
    system = as_system(target)
    known = set(system.parameter_names())
    unknown = {u: [p for p in ps if p not in known] for u, ps in plan.members.items()}
    unknown = {u: ps for u, ps in unknown.items() if ps}
    if unknown:
        raise ValueError(f"the plan names parameters this model does not have: {unknown}; "
                         "was it made for another model?")
    s = plan.settings
    granularity = s.get("granularity", "channel")
    group_size = None if s.get("group_size", "none") == "none" else int(s["group_size"])
    new = {}
    for u, ps in plan.members.items():  # everything computed before anything is written
        for p in ps:
            w, ax = system.get_parameter(p), system.channel_axis(p)
            new[p] = rtn_quantize(w, plan[u], axis=ax, symmetric=bool(s.get("symmetric", True)),
                                  **grid_for(tuple(w.shape), granularity, ax, group_size))
    for p, w in new.items():
        system.set_parameter(p, w)
    return target
