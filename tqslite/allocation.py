"""Mixed-precision allocation: one configuration per unit under a size budget (SPEC section 3).

The pipeline is ``scores -> cost table -> multiple-choice knapsack -> Plan``:

* :func:`cost_table` prices every (unit, option) pair: its exact stored size in bits
  (:mod:`tqslite.config`) and its cost under an objective. Both use the quantizer that will be
  applied (RTN, MSE-clip, GPTQ, ...): the unit's relative residual ``eps_u(o)`` under option ``o``
  comes from that quantizer's weights, and the linear-response prediction of the rollout error
  the unit alone causes at lead ``T`` is ``e_u(o) = eps_u(o) * exp(Lambda_u(T))``. Objectives:
  ``quadratic`` (default) ``e_u(o)**2`` -- independent errors add in quadrature, which notebooks
  05 and 10 measured; ``linear`` ``e_u(o)``; ``paper`` ``w_u * 2**-bits`` with ``w_u`` a positive
  shift of ``gamma_u``, the form the paper states.
* :func:`allocate` solves the knapsack (:mod:`tqslite.knapsack`, exact or greedy) for a budget
  in bits per parameter of the whole model (parameters outside every unit stay in float and
  count), a compression ratio or bytes, and returns a :class:`~tqslite.plans.Plan`.
* :func:`pareto` solves many budgets from one table: a whole front for one probe sweep.
* :func:`predicted_error` is the linear-response error a plan predicts, from a table.

Any score set in the probe's layout drives any quantizer: TQS (:func:`tqslite.probe`) or the
baselines of :mod:`tqslite.baselines.scores`.
"""

from __future__ import annotations

import math
import time

import numpy as np
import xarray as xr

from .config import DEFAULT_OPTIONS, Int, KeepFloat, as_config
from .knapsack import InfeasibleBudget, smallest_size, solve_mckp
from .plans import Plan
from .quantization import cast
from .quantizers import RTN, as_quantizer
from .systems import as_system
from .units import units_of

OBJECTIVES = ("quadratic", "linear", "paper")


# --------------------------------------------------------------------------------------------
# Cost tables
# --------------------------------------------------------------------------------------------

def option_residuals(model, units, options, quantizer=None, calibration=None) -> np.ndarray:
    """Relative residual ``eps[u, o] = ||Q_o(theta_u) - theta_u|| / ||theta_u||`` (float64).

    Each integer option quantizes every unit's tensors once with ``quantizer`` (the whole model,
    so a calibration-based quantizer sees the model it will see when the plan is applied); float
    options cast. An all-zero unit has ``eps = 0`` everywhere.
    """
    system = as_system(model)
    quantizer = RTN() if quantizer is None else as_quantizer(quantizer)
    names = [p for u in units for p in u.params]
    theta = {p: system.get_parameter(p).double() for p in names}
    norm2 = {u.label: sum(float(theta[p].pow(2).sum()) for p in u.params) for u in units}
    eps = np.zeros((len(units), len(options)))
    for k, option in enumerate(options):
        if isinstance(option, Int):
            new = quantizer.quantize_weights(system, dict.fromkeys(names, option), calibration).dequantized()
        else:
            new = {p: cast(system.get_parameter(p), option) for p in names}
        for i, u in enumerate(units):
            if norm2[u.label] > 0:
                resid = sum(float((new[p].double() - theta[p]).pow(2).sum()) for p in u.params)
                eps[i, k] = math.sqrt(resid / norm2[u.label])
    return eps


def cost_table(scores: xr.Dataset, model, options=DEFAULT_OPTIONS, objective: str = "quadratic", quantizer=None,
               calibration=None, lead: int | None = None, bottom: int | None = None,
               paper_shift: float = 0.01) -> xr.Dataset:
    """Price every (unit, option) pair from scores and the model's weights.

    Parameters
    ----------
    scores : xarray.Dataset
        A score set in the probe's layout (:func:`tqslite.probe`, or :mod:`tqslite.baselines.scores`):
        ``curve``, ``gamma``, ``dead``, ``nonfinite``, ``unmeasured`` and ``tensor_unit``.
    model : nn.Module or system
        The model the scores belong to; its weights give ``eps_u(o)`` and the sizes.
    options : sequence of configurations
        What a unit may become (:func:`tqslite.config.int_options`; ints and labels are read by
        :func:`tqslite.config.as_config`). Default: 2, 3, 4, 5, 6 and 8 bits per channel,
        float16 and float.
    objective : {"quadratic", "linear", "paper"}
        See the module docstring.
    quantizer : Quantizer or str, optional
        The quantizer the plan will be applied with (RTN by default); it sets ``eps_u(o)``.
    calibration : Tensor, optional
        Its calibration states, if it needs them (GPTQ).
    lead : int, optional
        The lead ``T`` whose ``Lambda_u(T)`` is used (default: the last probed lead).
    bottom : int, optional
        The lowest nominal bit width allowed.
    paper_shift : float
        For ``objective="paper"``: ``w_u = gamma_u - min(gamma) + paper_shift``.

    Returns
    -------
    xarray.Dataset
        Dims ``unit`` and ``option`` (labels such as ``"int4/channel"``, with the nominal
        ``bits(option)``): ``size`` (bits), ``eps``, ``predicted`` (``eps * exp(Lambda)``),
        ``cost``, ``allowed``; ``n_params(unit)``; the units' tensors (``tensor_unit``,
        ``tensor_shape``). Dead units may take only their lowest allowed option, at zero cost;
        units whose probe rollout turned non-finite only their highest. ``attrs`` hold the
        settings, ``n_params_total`` and ``outside_bits`` (parameters in no unit, in float).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}: use one of {OBJECTIVES}.")
    options = tuple(dict.fromkeys(as_config(o) for o in options))
    options = tuple(sorted(options, key=lambda o: (o.bits, o.label)))
    quantizer = RTN() if quantizer is None else as_quantizer(quantizer)
    system = as_system(model)
    units = units_of(scores)
    known = set(system.parameter_names())
    missing = sorted({p for u in units for p in u.params} - known)
    if missing:
        raise ValueError(f"the scores name parameters the model does not have: {missing[:5]}; "
                         "were they computed on another model?")
    lead = scores.sizes["lead"] if lead is None else lead
    lam = scores["curve"].sel(lead=lead).values.astype(float)
    U, K = len(units), len(options)
    size = np.array([[sum(o.storage_bits(tuple(system.get_parameter(p).shape), system.channel_axis(p),
                                         system.get_parameter(p).dtype) for p in u.params) for o in options]
                     for u in units], dtype=float)
    eps = option_residuals(system, units, options, quantizer, calibration)
    with np.errstate(over="ignore", invalid="ignore"):
        predicted = eps * np.exp(lam)[:, None]
    predicted[eps == 0] = 0.0  # stored exactly: no error, whatever Lambda is
    unmeasured = scores["unmeasured"].values if "unmeasured" in scores else np.zeros(U, bool)
    blind = unmeasured & ~np.isfinite(lam) & (eps > 0).any(axis=1)
    if blind.any():
        raise ValueError(f"unit(s) {[units[i].label for i in np.flatnonzero(blind)][:5]} were not measured (their "
                         "probe perturbation was zero) but are not stored exactly at every option: re-probe them "
                         "with perturbation='gauss' instead of taking them for free.")
    if objective == "linear":
        cost = predicted.copy()
    elif objective == "quadratic":
        cost = predicted**2
    else:
        gamma = scores["gamma"].values.astype(float)
        finite = np.isfinite(gamma)
        w = np.where(finite, gamma - (gamma[finite].min() if finite.any() else 0.0) + paper_shift, 0.0)
        cost = w[:, None] * 2.0 ** -np.asarray([o.bits for o in options], float)[None, :]
    bits = np.asarray([o.bits for o in options])
    allowed = np.ones((U, K), bool) if bottom is None else np.broadcast_to(bits >= bottom, (U, K)).copy()
    if not allowed.any():
        raise ValueError(f"bottom={bottom} leaves no option among {[o.label for o in options]}.")
    dead, nonfinite = scores["dead"].values, scores["nonfinite"].values
    lowest, highest = int(np.argmax(allowed[0])), K - 1
    allowed[dead] = False
    allowed[dead, lowest] = True
    cost[dead] = 0.0
    allowed[nonfinite] = False
    allowed[nonfinite, highest] = True
    cost[nonfinite] = 0.0
    if not np.isfinite(cost[allowed]).all():
        raise ValueError("some costs overflowed (Lambda too large); use a shorter lead or the 'paper' objective.")
    names = system.parameter_names()
    in_units = {p for u in units for p in u.params}
    outside_bits = sum(KeepFloat().storage_bits(tuple(system.get_parameter(p).shape), 0, system.get_parameter(p).dtype)
                       for p in names if p not in in_units)
    members = [p for u in units for p in u.params]
    shapes = [tuple(system.get_parameter(p).shape) for p in members]
    ndim = max((len(s) for s in shapes), default=0)
    table = xr.Dataset(
        {
            "size": (("unit", "option"), size, {"units": "bit"}),
            "eps": (("unit", "option"), eps, {"long_name": "relative residual eps_u(o) of the quantizer"}),
            "predicted": (("unit", "option"), predicted,
                          {"long_name": "linear-response error eps_u(o) exp(Lambda_u(T))"}),
            "cost": (("unit", "option"), cost, {"long_name": f"cost ({objective} objective)"}),
            "allowed": (("unit", "option"), allowed),
            "n_params": ("unit", scores["n_params"].values),
            "tensor_unit": ("tensor", np.asarray([u.label for u in units for _ in u.params], dtype=object)),
            "tensor_shape": (("tensor", "shape_dim"),
                             np.array([list(s) + [-1] * (ndim - len(s)) for s in shapes], dtype=np.int64).reshape(
                                 len(shapes), ndim),
                             {"long_name": "shape of each member tensor, padded with -1"}),
        },
        coords={"unit": scores["unit"].values, "option": [o.label for o in options], "bits": ("option", bits),
                "tensor": np.asarray(members, dtype=object)},
        attrs=dict(objective=objective, quantizer=repr(quantizer), lead=int(lead), bottom=bottom or "none",
                   kind=scores.attrs.get("kind", "?"),
                   n_params_total=int(sum(system.get_parameter(p).numel() for p in names)),
                   outside_bits=int(outside_bits)),
    )
    return table


def _shapes_of(table: xr.Dataset) -> dict:
    return {str(p): tuple(int(s) for s in row if s >= 0)
            for p, row in zip(table["tensor"].values, table["tensor_shape"].values)}


def plan_from_rows(table: xr.Dataset, rows, info: dict) -> Plan:
    """The plan that gives unit ``i`` of ``table`` the option ``rows[i]``."""
    units = units_of(table)
    options = [as_config(o) for o in table["option"].values]
    return Plan({u.label: options[int(k)] for u, k in zip(units, rows)}, {u.label: u.params for u in units},
                _shapes_of(table), info)


def _rows_of(plan: Plan, table: xr.Dataset) -> np.ndarray:
    labels = [str(o) for o in table["option"].values]
    missing = [u for u in table["unit"].values if str(u) not in plan]
    if missing:
        raise ValueError(f"the plan has no unit {missing[0]!r} of the table.")
    try:
        return np.array([labels.index(plan[str(u)].label) for u in table["unit"].values])
    except ValueError:
        raise ValueError(f"the plan uses a configuration that is not among the table's options {labels}.") from None


def predicted_error(plan: Plan, table: xr.Dataset, combine: str = "rss") -> float:
    """The rollout error at the table's lead that ``plan`` predicts by linear response.

    ``combine="rss"``: ``sqrt(sum_u e_u(o_u)**2)``, independent errors in quadrature (what the
    book measures to fit); ``"linear"``: ``sum_u e_u(o_u)``.
    """
    rows = _rows_of(plan, table)
    e = table["predicted"].values[np.arange(len(rows)), rows]
    if combine == "rss":
        return float(np.sqrt((e**2).sum()))
    if combine == "linear":
        return float(e.sum())
    raise ValueError(f"combine={combine!r}: use 'rss' or 'linear'.")


# --------------------------------------------------------------------------------------------
# Solving for a budget
# --------------------------------------------------------------------------------------------

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
    labels = [str(u) for u in table["unit"].values]
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


TABLE_SETTINGS = ("options", "objective", "quantizer", "calibration", "lead", "bottom")


def _table(scores, model, settings: dict) -> xr.Dataset:
    """``scores`` itself if it is a cost table (then no table setting may be given), else a new one."""
    given = {k: v for k, v in settings.items() if v is not None}
    if "cost" in scores:
        if given:
            raise ValueError(f"{sorted(given)} cannot be changed here: the cost table passed in fixes them. "
                             "Build a new table with cost_table(...), or pass the scores and the model.")
        return scores
    if model is None:
        raise ValueError("pass the model the scores belong to (its weights price each option), or a cost_table.")
    return cost_table(scores, model, **given)


def allocate(scores, model=None, *, budget_bits=None, compression=None, budget_bytes=None, options=None,
             objective=None, quantizer=None, calibration=None, solver="exact", bottom=None, fp_budget=None,
             tied=None, lead=None) -> Plan:
    """Choose a configuration per unit under a size budget.

    Parameters
    ----------
    scores : xarray.Dataset
        A score set (then ``model`` is needed to price options) or a :func:`cost_table`.
    model : nn.Module or system, optional
        The scored model.
    budget_bits, compression, budget_bytes : float
        Exactly one: average stored bits per parameter of the whole model (scales, zero points
        and the float parameters outside every unit included), a compression ratio against
        float32, or a total in bytes.
    options, objective, quantizer, calibration, bottom, lead
        See :func:`cost_table` (its defaults apply). Only with scores: a cost table already
        fixes them, and giving them anyway is an error rather than silently ignored.
    solver : {"exact", "milp", "greedy"}
        See :func:`tqslite.knapsack.solve_mckp`.
    fp_budget : float, optional
        Largest fraction of the model's parameters kept at 16 or 32 bits.
    tied : list of list of str, optional
        Groups of unit labels that must share one option.

    Returns
    -------
    Plan
        Its ``info`` says how it was made (budget, solver, objective, quantizer, score kind).
    """
    table = _table(scores, model, dict(options=options, objective=objective, quantizer=quantizer,
                                       calibration=calibration, lead=lead, bottom=bottom))
    n_total = int(table.attrs["n_params_total"])
    budget = _budget_bits(n_total, budget_bits, compression, budget_bytes)
    outside = float(table.attrs["outside_bits"])
    costs, sizes, fp, allowed, groups = _merge_tied(table, tied)
    extra = [] if fp_budget is None else [(fp, float(fp_budget) * n_total)]
    try:
        choice = solve_mckp(costs, sizes, budget - outside, solver, allowed, extra)
    except InfeasibleBudget as e:
        smallest = e.smallest + outside
        raise InfeasibleBudget(
            f"a budget of {budget / n_total:.4g} bits per parameter ({budget / 8:.0f} bytes) is infeasible with "
            f"options {[str(o) for o in table['option'].values]} and bottom={table.attrs['bottom']}: the smallest feasible "
            f"budget is {smallest / n_total:.4g} bits per parameter ({math.ceil(smallest / 8)} bytes, compression "
            f"{32 * n_total / smallest:.3g}x).", smallest / n_total) from None
    rows = np.empty(table.sizes["unit"], int)
    for g, k in zip(groups, choice):
        rows[g] = k
    info = {"made by": "allocate", "budget_bits": budget / n_total, "solver": solver,
            "objective": table.attrs["objective"], "quantizer": table.attrs["quantizer"],
            "scores": table.attrs["kind"], "lead": table.attrs["lead"],
            "fp_budget": "none" if fp_budget is None else fp_budget, "tied": [list(g) for g in tied or []]}
    return plan_from_rows(table, rows, info)


def pareto(scores, model=None, budgets=None, **kwargs) -> xr.Dataset:
    """Plans for many budgets (average bits per parameter) from one score set.

    The cost table is computed once; each budget costs one solve. ``budgets=None`` takes 10
    budgets evenly spaced from the smallest feasible one to that of every unit at its largest
    integer option. Keyword arguments go to :func:`allocate` (and to :func:`cost_table` when
    ``scores`` is not a table). Returns a Dataset with dims ``budget`` and ``unit``:
    ``config(budget, unit)`` (labels), ``bits(budget, unit)`` (nominal), ``bits_per_param``,
    ``size_bits``, ``predicted_rss``, ``predicted_linear``, ``objective_value`` and
    ``solve_seconds`` per budget.
    """
    table = _table(scores, model, {k: kwargs.pop(k, None) for k in TABLE_SETTINGS})
    n_total = float(table.attrs["n_params_total"])
    outside = float(table.attrs["outside_bits"])
    if budgets is None:
        allowed, size = table["allowed"].values, table["size"].values
        low = (smallest_size(size, allowed) + outside) / n_total
        int_opts = allowed & (table["bits"].values <= 8)[None, :]
        high = (np.where(int_opts | ~int_opts.any(1, keepdims=True) & allowed, size, -np.inf).max(1).sum()
                + outside) / n_total
        budgets = np.linspace(low, max(high, low), 10)
    plans, seconds = [], []
    for b in budgets:
        t0 = time.perf_counter()
        plans.append(allocate(table, budget_bits=b, **kwargs))
        seconds.append(time.perf_counter() - t0)
    rows = [_rows_of(p, table) for p in plans]
    idx = np.arange(table.sizes["unit"])
    size = np.array([table["size"].values[idx, r].sum() + outside for r in rows])
    pred = [table["predicted"].values[idx, r] for r in rows]
    return xr.Dataset(
        {
            "config": (("budget", "unit"), np.array([[str(table["option"].values[k]) for k in r] for r in rows],
                                                    dtype=object)),
            "bits": (("budget", "unit"), np.array([[int(table["bits"].values[k]) for k in r] for r in rows])),
            "bits_per_param": ("budget", size / n_total),
            "size_bits": ("budget", size),
            "predicted_rss": ("budget", [float(np.sqrt((e**2).sum())) for e in pred]),
            "predicted_linear": ("budget", [float(e.sum()) for e in pred]),
            "objective_value": ("budget", [float(table["cost"].values[idx, r].sum()) for r in rows]),
            "solve_seconds": ("budget", seconds),
        },
        coords={"budget": np.asarray(budgets, float), "unit": table["unit"].values},
        attrs={k: v for k, v in table.attrs.items()},
    )


__all__ = ["OBJECTIVES", "InfeasibleBudget", "allocate", "cost_table", "option_residuals", "pareto", "plan_from_rows",
           "predicted_error"]
