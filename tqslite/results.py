"""Reading the results of :func:`tqslite.comparison.run`: error tables, win tables of pairs of methods, the verdict.

A result holds every method's errors per window at every lead up to the evaluation lead (the skill
rule's, :mod:`tqslite.skill`). From it:

* :func:`cell_mse`, :func:`rmse_table`, :func:`float_rmse` -- errors at the evaluation lead;
* :func:`usable_cells` -- whether each method's added error is at most the float model's own;
* :func:`head_to_head` -- the win table of any pairs of methods (:mod:`tqslite.wins`: a paired
  bootstrap over the evaluation windows, at matched size, only where both are usable), and the
  pairs of the book's tables: :func:`allocation_gain_pairs` (each score against uniform, at a
  fixed quantizer), :func:`quantizer_gain_pairs` (GPTQ against RTN at a fixed allocation),
  :func:`score_pairs` (TQS against one-step and Hessian scores) and :func:`headline_pairs` (the
  recommended pipeline against uniform GPTQ, its closed loop, rollout calibration);
* :func:`verdict` and :func:`verdict_sentence` -- the figure that matters: the default pipeline
  against uniform GPTQ at 3 and 4 bits per parameter on the three stand-ins, counted per model
  and bit width, in numbers and in one sentence;
* :func:`summarize` -- counts of any win table, grouped.

Numbers from these functions are measurements on the shipped stand-ins, not the paper's.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import xarray as xr

from .comparison import GOAL, HEADLINE_BITS, QUANTIZERS, SCORES, STAND_INS, Method, recommended_method, uniform
from .skill import rmse_per_target, usable
from .wins import tally, win_table


def plan_of(result: xr.Dataset, scheme: str, budget: str, model):
    """The plan a method used at a budget, rebuilt from ``config`` for ``model`` (tensor units)."""
    from .plans import plan_from_configs
    c = result["config"].sel(scheme=scheme, budget=budget)
    return plan_from_configs(model, dict(zip(c["plan_unit"].values.tolist(), c.values.tolist())), "tensor",
                             {"made by": f"comparison: {scheme} at {budget}"})


def target_dim(result: xr.Dataset) -> str:
    """The dim that holds a result's targets in tables: ``variable``, ``station`` or ``target``."""
    per = result.attrs["per"]
    return per if per in ("variable", "station") else "target"


def cell_mse(result: xr.Dataset, against: str = "float") -> xr.DataArray:
    """Errors per window at the evaluation lead: ``(scheme, budget, window[, variable])``."""
    return result["mse"].sel(against=against, lead=result.sizes["lead"], drop=True)


def float_rmse(result: xr.Dataset) -> xr.DataArray:
    """The float model's own RMSE against the truth at the evaluation lead, per target."""
    return rmse_per_target(result["float_mse"].sel(lead=result.sizes["lead"], drop=True), result.attrs["per"])


def rmse_table(result: xr.Dataset, against: str = "float") -> xr.DataArray:
    """RMSE at the evaluation lead per method, budget and target."""
    out = rmse_per_target(cell_mse(result, against), result.attrs["per"]).transpose("scheme", "budget", ...)
    out.name = f"rmse_vs_{against}"
    return out


def usable_cells(result: xr.Dataset) -> xr.DataArray:
    """Whether each method is usable in each cell: added RMSE (against the float model) at most the float
    model's own RMSE (against the truth), at the evaluation lead (:func:`tqslite.skill.usable`).

    A model without skill at any lead (``eval_lead == 0``) has no usable cell.
    """
    added, own = rmse_table(result, "float"), float_rmse(result)
    ok = xr.DataArray(usable(added.values, own.values), dims=added.dims, coords=added.coords)
    return ok & (result.attrs["eval_lead"] > 0)


def head_to_head(result: xr.Dataset, pairs, against: str = "float", budgets=None, n_resamples: int = 9999,
                 ci: float = 0.95, seed: int = 0) -> xr.Dataset:
    """The win table of each pair ``(A, B)`` of method labels, per budget and target (:func:`tqslite.wins.win_table`).

    Sizes must match within 1 % (the budget's RTN size for both); a cell counts only where both
    methods are usable (:func:`usable_cells`). Returns dims ``pair`` (``"A vs B"``), ``budget``
    and the target, plus ``a``/``b`` (the labels) along ``pair`` and ``usable_a``/``usable_b``
    (whether each method is usable in the cell: an unusable cell may still have one usable side).
    """
    pairs = [tuple(p) for p in pairs]
    methods = set(result["scheme"].values.tolist())
    missing = sorted({x for p in pairs for x in p} - methods)
    if missing:
        raise ValueError(f"{missing} are not methods of this result; it has {sorted(methods)}.")
    sel = {} if budgets is None else {"budget": list(budgets)}
    mse = cell_mse(result, against).sel(**sel)
    ok = usable_cells(result).sel(**sel)
    names = [f"{a} vs {b}" for a, b in pairs]
    def pick(da, k):  # the k-th method of every pair, along a new dim "pair"
        return da.sel(scheme=xr.DataArray([p[k] for p in pairs], dims="pair", coords={"pair": names}), drop=True)

    size = result["bits_per_param"].sel(**sel)
    table = win_table(pick(mse, 0), pick(mse, 1), result.attrs["per"], size_a=pick(size, 0), size_b=pick(size, 1),
                      usable=pick(ok, 0) & pick(ok, 1),
                      n_resamples=n_resamples, ci=ci, seed=seed)
    table = table.assign_coords(a=("pair", [p[0] for p in pairs]), b=("pair", [p[1] for p in pairs]))
    table["usable_a"], table["usable_b"] = (pick(ok, k).transpose(*table["outcome"].dims) for k in (0, 1))
    table.attrs.update(model=result.attrs["model"], against=against, eval_lead=result.attrs["eval_lead"])
    return table


def allocation_gain_pairs(result: xr.Dataset) -> list:
    """Each score against the uniform plan, at a fixed quantizer: ``[(s+q, none+q)]`` present in ``result``."""
    have = set(result["scheme"].values.tolist())
    out = []
    for q in QUANTIZERS:
        for s in SCORES[:-1]:
            a, b = Method(s, q).label, uniform(q).label
            if a in have and b in have:
                out.append((a, b))
    return out


def quantizer_gain_pairs(result: xr.Dataset) -> list:
    """GPTQ against RTN at a fixed allocation (the same plan): ``[(s+gptq(rtn plan), s+rtn)]``, the uniform
    plans included; and QEP against GPTQ on uniform plans."""
    have = set(result["scheme"].values.tolist())
    out = [(uniform("gptq").label, uniform("rtn").label), (uniform("qep").label, uniform("gptq").label)]
    out += [(Method(s, "gptq", priced_by="rtn").label, Method(s, "rtn").label) for s in SCORES[:-1]]
    return [p for p in out if p[0] in have and p[1] in have]


def score_pairs(result: xr.Dataset) -> list:
    """TQS (both probes) against one-step and Hessian scores, at a fixed quantizer."""
    have = set(result["scheme"].values.tolist())
    out = []
    for q in QUANTIZERS:
        for s in ("tqs", "tqs_quant"):
            for o in ("one_step", "hessian"):
                out.append((Method(s, q).label, Method(o, q).label))
    return [p for p in out if p[0] in have and p[1] in have]


def headline_pairs(result: xr.Dataset) -> list:
    """The recommended pipeline against uniform GPTQ (the headline); its closed loop and operating-point
    step against it; GPTQ calibrated on the model's own rollout against on data (those present)."""
    have = set(result["scheme"].values.tolist())
    rec = recommended_method()
    out = [(rec.label, uniform("gptq").label), (replace(rec, refine="closed_loop").label, rec.label),
           (replace(rec, refine="operating_point").label, rec.label),
           (recommended_method("rollout").label, rec.label),
           (Method("none", "gptq", calibration="rollout").label, uniform("gptq").label)]
    return [p for p in out if p[0] in have and p[1] in have]


def budget_bits(label: str) -> int:
    """The bit width of a budget label: ``"3b/channel"`` -> 3."""
    try:
        return int(str(label).split("b/")[0])
    except ValueError:
        raise ValueError(f"budget {label!r} is not a budget label like '3b/channel' or '4b/group'.") from None


def headline_pair() -> str:
    """The pair of the figure that matters, as win tables name it: ``"recommended vs none+gptq"``."""
    return f"{recommended_method().label} vs {uniform('gptq').label}"


def verdict(source, models=STAND_INS, bits=HEADLINE_BITS, n_resamples: int = 9999, seed: int = 0) -> xr.Dataset:
    """The figure that matters: the default pipeline against uniform GPTQ, counted per model and bit width.

    Parameters
    ----------
    source : path or dict
        A folder holding ``wins_MODEL.nc`` (as ``benchmarks/baselines.py`` and notebook 10 write
        them), or ``{model: win table}`` (:func:`head_to_head` output), or ``{model: result}``
        (:func:`run` output: the headline pair is then compared here).
    models : sequence of str
        Models to count (those absent from ``source`` are left out; at least one must be there).
    bits : sequence of int
        Bit widths counted: every budget of that width (both scale grids) is a cell.
    n_resamples, seed
        Bootstrap settings, used only when ``source`` holds results rather than win tables.

    Returns
    -------
    xarray.Dataset
        Dims ``(model, bits)``: the counts of :func:`tqslite.wins.tally` over the cells (budgets
        of that width x targets) -- ``n`` (wins + ties + losses), ``win``, ``tie``, ``loss``,
        ``unusable``, ``unmatched``, ``holm_win``, ``holm_loss`` (Holm's family: the counted
        cells of one model and bit width), and among the unusable cells ``only_a_usable`` (the
        default pipeline usable, uniform GPTQ not) and ``only_b_usable`` (the reverse; both 0 for
        win tables without ``usable_a``/``usable_b``). ``attrs``: the pair, the goal and the
        grid counted.
    """
    from pathlib import Path

    pair = headline_pair()
    tables = {}
    if isinstance(source, (str, Path)):
        folder = Path(source)
        for name in models:
            f = folder / f"wins_{name}.nc"
            if f.exists():
                tables[name] = xr.load_dataset(f)
    else:
        for name in models:
            if name in source:
                t = source[name]
                tables[name] = t if "outcome" in t else head_to_head(t, [pair.split(" vs ")], n_resamples=n_resamples,
                                                                     seed=seed)
    tables = {n: t for n, t in tables.items() if pair in t["pair"].values}
    if not tables:
        where = source if isinstance(source, (str, Path)) else "the dict given"
        raise ValueError(f"no win table of {pair!r} for {list(models)} in {where}: run benchmarks/baselines.py "
                         "(or notebook 10) first, or pass comparison.run results.")
    bits = [int(b) for b in bits]
    keys = ("n", "win", "tie", "loss", "unusable", "unmatched", "holm_win", "holm_loss", "only_a_usable",
            "only_b_usable")
    counts = {k: np.zeros((len(tables), len(bits)), int) for k in keys}
    budgets = np.full((len(tables), len(bits)), "", dtype=object)
    for i, (name, t) in enumerate(tables.items()):
        t = t.sel(pair=pair)
        for j, b in enumerate(bits):
            keep = [x for x in t["budget"].values if budget_bits(x) == b]
            budgets[i, j] = ", ".join(map(str, keep))
            if keep:
                sub = t.sel(budget=keep)
                c = tally(sub)
                for k in keys[:-2]:
                    counts[k][i, j] = int(c[k])
                if "usable_a" in sub:  # unusable cells where only one side is usable (tables since 2 Dec 2026)
                    off = (sub["outcome"] == "unusable").values
                    ua, ub = sub["usable_a"].values.astype(bool), sub["usable_b"].values.astype(bool)
                    counts["only_a_usable"][i, j] = int((off & ua & ~ub).sum())
                    counts["only_b_usable"][i, j] = int((off & ub & ~ua).sum())
    dims = ("model", "bits")
    out = xr.Dataset({k: (dims, v) for k, v in counts.items()} | {"budgets": (dims, budgets.astype(str))},
                     coords={"model": list(tables), "bits": bits})
    out.attrs = dict(pair=pair, goal_won=GOAL[0], goal_lost=GOAL[1], against="float model at the evaluation lead",
                     note="cells: budgets of each bit width (both scale grids) x targets; unusable and unmatched "
                          "cells are not counted")
    return out


def verdict_sentence(v: xr.Dataset) -> str:
    """The verdict of :func:`verdict` in one sentence, every number from ``v`` (Markdown)."""
    total = {k: int(v[k].sum()) for k in ("n", "win", "tie", "loss", "unusable", "unmatched", "holm_win", "holm_loss")}
    n = total["n"]
    met = n > 0 and total["win"] / n >= v.attrs["goal_won"] and total["loss"] / n <= v.attrs["goal_lost"]
    pct = (lambda k: f"{100 * total[k] / n:.0f}%") if n else (lambda k: "-")
    text = (f"Against uniform GPTQ at {' and '.join(map(str, v['bits'].values.tolist()))} bits per parameter on "
            f"{', '.join(f'`{m}`' for m in v['model'].values)}, the default pipeline won {total['win']}, tied "
            f"{total['tie']} and lost {total['loss']} of {n} cells counted ({pct('win')} won, {pct('loss')} lost; "
            f"after Holm's adjustment {total['holm_win']} wins and {total['holm_loss']} losses remain)")
    if total["unusable"]:
        text += (f"; {total['unusable']} more cells were not counted because a quantized model added more error "
                 "than the float model's own there (unusable)")
        none = [(str(m), int(b)) for m in v["model"].values for b in v["bits"].values
                if int(v["n"].sel(model=m, bits=b)) == 0 and int(v["unusable"].sel(model=m, bits=b)) > 0]
        if none:
            text += (": no cell counts for " + ", ".join(f"`{m}` at {b} bits" for m, b in none))
        a_only, b_only = int(v["only_a_usable"].sum()), int(v["only_b_usable"].sum())
        if a_only or b_only:
            text += (f"; in {a_only} of the {total['unusable']} the default pipeline is usable and uniform GPTQ is "
                     f"not, in {b_only} the reverse")
    if total["unmatched"]:
        text += f"; {total['unmatched']} cells were not counted because the two sizes differ by more than 1%"
    return text + (f". The goal (at least {100 * v.attrs['goal_won']:.0f}% won, at most {100 * v.attrs['goal_lost']:.0f}% "
                   f"lost) is {'met' if met else 'not met'} on the cells counted.")


def summarize(table: xr.Dataset, by=("pair",)) -> xr.Dataset:
    """Counts of :func:`tqslite.wins.tally` grouped ``by``, with the median ratio of the counted cells."""
    counts = tally(table, by=list(by))
    counted = table["outcome"].isin(["win", "tie", "loss"])
    rest = [d for d in table["ratio"].dims if d not in by]
    counts["median_ratio"] = table["ratio"].where(counted).median(rest)
    return counts


__all__ = ["allocation_gain_pairs", "budget_bits", "cell_mse", "float_rmse", "head_to_head", "headline_pair", "headline_pairs", "plan_of", "quantizer_gain_pairs", "rmse_table", "score_pairs", "summarize", "target_dim", "usable_cells", "verdict", "verdict_sentence"]
