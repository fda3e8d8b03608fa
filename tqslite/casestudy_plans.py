"""What every case-study chapter does with plans side by side: sizes, matched plans, errors and win counts.

Once a case study (:mod:`tqslite.casestudy`) has probed a model, it allocates block plans at
several budgets, matches TQS plans to uniform RTN plans in size, rolls all of them out on
held-out data and counts wins of TQS over uniform at the evaluation lead ``L`` with the book's
one win definition (:mod:`tqslite.wins`; usable plans only, :mod:`tqslite.skill`).

Conventions: plans are named ``"uniform {b}"`` and ``"TQS {granularity} @ {b}"`` for a uniform
bit width ``b``; sizes are stored bits per parameter, scales included
(:func:`tqslite.plan_size`); errors are mean squared errors per window in normalised units; a
*target* (``per``) is a variable of a grid or a station of a series.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import xarray as xr

from . import data as D
from . import wins
from .allocation import allocate, cost_table, predicted_error
from .benchmark import window_mse
from .casestudy import Ranking, lead_text, role_of
from .evaluation import compare_plans, forecast, lat_weights
from .plans import apply_plan, plan_size, uniform_plan
from .skill import usable_targets
from .units import BlockUnits, block_label

#: Words for the winner of each outcome of a win table.
WINNER = {"win": "TQS", "loss": "uniform", "tie": "tie"}


def bits_per_param(plan, system) -> float:
    """Stored bits per parameter of a plan on a model, scales included."""
    return plan_size(plan, system).bits_per_param


def unit_params(plan) -> dict:
    """The number of parameters of each unit of a plan: ``{unit: int}``."""
    return {u: sum(int(np.prod(plan.shapes[t])) for t in plan.members[u]) for u in plan}


def budget_plans(block: xr.Dataset, system, budgets, options, roles: dict):
    """Block plans at each budget (bits/param), priced once by :func:`tqslite.cost_table`.

    Returns
    -------
    plans : dict
        ``{budget: Plan}``.
    bits : pandas.DataFrame
        One row per unit: role, parameters and the bit width at each budget.
    achieved : pandas.DataFrame
        One row per budget: bits/param, size in KiB, compression against float32 and the
        predicted error at ``T`` (linear and root-sum-of-squares).
    """
    costs = cost_table(block, system, options=options)
    plans = {B: allocate(costs, budget_bits=B) for B in budgets}
    bits = pd.DataFrame({f"budget {B}": p.bits for B, p in plans.items()})
    bits.insert(0, "parameters", block["n_params"].values)
    bits.insert(0, "role", [role_of(u, roles) for u in bits.index])
    bits.index.name = "unit"
    achieved = pd.DataFrame(
        {
            "bits/param, scales included": [bits_per_param(p, system) for p in plans.values()],
            "size (KiB)": [plan_size(p, system).stored_bits / 8 / 1024 for p in plans.values()],
            "compression vs float32": [32 / bits_per_param(p, system) for p in plans.values()],
            "predicted error at T, linear sum": [predicted_error(p, costs, "linear") for p in plans.values()],
            "predicted error at T, root sum of squares": [predicted_error(p, costs) for p in plans.values()],
        },
        index=pd.Index(list(budgets), name="budget"),
    )
    return plans, bits, achieved


def bits_per_block(plans: dict, depth: int = 2) -> pd.DataFrame:
    """Parameter-weighted mean bit width of each block under tensor-level plans ``{budget: Plan}``."""
    per_block = {}
    for B, p in plans.items():
        b = pd.Series(p.bits, dtype=float)
        n = pd.Series(unit_params(p), dtype=float)
        blocks_of = [block_label(t, depth) for t in b.index]
        per_block[f"budget {B}"] = (b * n).groupby(blocks_of, sort=False).sum() / n.groupby(blocks_of, sort=False).sum()
    return pd.DataFrame(per_block)


def matched_plans(system, scores: dict, uniform_bits, options, depth: int = 2):
    """Uniform RTN plans and TQS plans of the same size, per uniform bit width and granularity.

    Parameters
    ----------
    scores : dict
        ``{granularity: probe result}``, e.g. ``{"block": ..., "tensor": ...}``.
    uniform_bits : list of int
        Bit widths of the uniform plans; each TQS plan gets the uniform plan's bits/param as budget.

    Returns
    -------
    plans : dict
        ``{"uniform {b}": Plan, "TQS {granularity} @ {b}": Plan, ...}``.
    match : pandas.DataFrame
        Index ``(uniform bits, TQS units)``: both sizes in bits/param and their difference in %.
    """
    plans, rows = {}, []
    for b in uniform_bits:
        u_plan = uniform_plan(system, b, units=BlockUnits(depth=depth))
        plans[f"uniform {b}"] = u_plan
        for gran, s in scores.items():
            t_plan = allocate(s, system, budget_bits=bits_per_param(u_plan, system), options=options)
            plans[f"TQS {gran} @ {b}"] = t_plan
            bu, bt = bits_per_param(u_plan, system), bits_per_param(t_plan, system)
            rows.append({"uniform bits": b, "TQS units": gran, "uniform bits/param": bu, "TQS bits/param": bt,
                         "size difference %": 100 * (bt / bu - 1)})
    match = pd.DataFrame(rows).set_index(["uniform bits", "TQS units"])
    worst = match["size difference %"].abs().max()
    if worst > 100 * wins.SIZE_TOLERANCE:
        raise ValueError(f"a TQS plan and its uniform plan differ in size by {worst:.2f}% (at most "
                         f"{100 * wins.SIZE_TOLERANCE:g}% allowed): add finer bit widths to options")
    return plans, match


def plan_file(name: str) -> str:
    """The JSON file name of a named plan: ``"TQS block @ 3"`` -> ``"TQS_block_at_3.json"``."""
    return name.replace(" @ ", "_at_").replace(" ", "_") + ".json"


def save_plans(plans: dict, folder) -> None:
    """Save named plans ``{name: Plan}`` as JSON files :func:`plan_file` in ``folder``."""
    for name, p in plans.items():
        p.save(Path(folder) / plan_file(name))


def bit_share(plans: dict, n_params: int) -> pd.DataFrame:
    """Percent of the parameters stored at each bit width (rows) under each named plan (columns)."""
    share = pd.DataFrame(
        {name: pd.Series(unit_params(p)).groupby(pd.Series(p.bits)).sum() / n_params * 100
         for name, p in plans.items()}
    ).fillna(0.0)
    share.index.name = "bits"
    return share


def grid_windows(heldout: xr.DataArray, horizon: int, n_eval: int):
    """Initial states ``(window, variable, ...)`` and the truth ``(window, lead, variable, ...)`` of a gridded run."""
    win = D.time_windows(heldout, 1 + horizon, n_eval).rename(channel="variable")
    x_eval = win.isel(step=0, drop=True)
    truth = win.isel(step=slice(1, None)).rename(step="lead").assign_coords(lead=np.arange(1, horizon + 1))
    return x_eval, truth


def grid_comparison(system, plans: dict, x_eval, truth: xr.DataArray, std: xr.DataArray, units: dict,
                    model_name: str, step_days: float) -> xr.Dataset:
    """Every plan and the float model rolled out side by side on a gridded held-out run.

    :func:`tqslite.evaluation.compare_plans` (normalised, latitude-weighted RMSE per plan, lead and
    variable) plus ``rmse_vs_float_physical`` and ``rmse_vs_truth_physical``: the same times the
    training standard deviation ``std`` of each variable, in ``units``.
    """
    cmp = compare_plans(system, plans, x_eval, int(truth.sizes["lead"]), truth=truth)
    for key in ("rmse_vs_float", "rmse_vs_truth"):
        cmp[f"{key}_physical"] = cmp[key] * std
        cmp[f"{key}_physical"].attrs = {
            "long_name": f"{key} in physical units (latitude-weighted)",
            "units": ", ".join(f"{v}: {units[v]}" for v in std["variable"].values),
        }
    cmp.attrs = {"model": model_name, "n_eval": int(x_eval.sizes["window"]), "horizon": int(truth.sizes["lead"]),
                 "data": "held-out run", "lead_hours": 24 * step_days}
    return cmp


def errors_at_lead(system, plans: dict, x_eval, truth: xr.DataArray, horizon: int, lead: int):
    """Per-window MSE at one lead of every plan against the float model and the truth, paired by window.

    Returns
    -------
    mse : dict
        ``{name: {"float": (window, variable), "truth": (window, variable)}}``, normalised units squared.
    float_own : xarray.DataArray
        The float model's own MSE against the truth, ``(window, variable)``.
    """
    float_l = forecast(system, x_eval, horizon).sel(lead=[lead])
    mse = {}
    for name, p in plans.items():
        fc = forecast(apply_plan(system, p), x_eval, horizon).sel(lead=[lead])
        mse[name] = {
            "float": window_mse(fc, float_l).isel(lead=0, drop=True),
            "truth": window_mse(fc, truth.sel(lead=[lead])).isel(lead=0, drop=True),
        }
    return mse, window_mse(float_l, truth.sel(lead=[lead])).isel(lead=0, drop=True)


class WinTables(NamedTuple):
    """What :func:`win_tables` returns; see there."""

    ratios: pd.DataFrame
    rows: pd.DataFrame
    tables: dict


def win_tables(mse: dict, float_own: xr.DataArray, sizes: dict, eval_lead: int, uniform_bits, granularities,
               per: str, against: str, seed: int = 0):
    """TQS against uniform RTN at the evaluation lead, with the book's one win definition (:mod:`tqslite.wins`).

    A comparison counts only where both plans are usable (:func:`tqslite.skill.usable_targets`)
    and the float model has skill (``eval_lead > 0``); sizes must match within 1 %.

    Parameters
    ----------
    mse : dict
        From :func:`errors_at_lead` (or the same layout): ``mse[name][against]`` is ``(window, per)``.
    float_own : xarray.DataArray
        The float model's MSE against the truth, ``(window, per)``.
    sizes : dict
        ``{name: bits per parameter}`` of every plan.
    per : str
        The target dim: ``"variable"`` or ``"station"``.
    against : str
        ``"float"`` or ``"truth"``.

    Returns
    -------
    WinTables
        A named tuple: ``ratios``, a DataFrame of the RMSE ratio TQS / uniform with one column
        ``"TQS {g} / uniform, {b} bits"`` per pair and one row per target; ``rows``, a DataFrame
        with one row per pair and target (ratio, its 95 % interval, outcome and winner); ``tables``,
        ``{(b, g): wins.win_table(...)}``.
    """
    def usable_plan(name):
        return usable_targets(mse[name]["float"], float_own, per) & (eval_lead > 0)

    ratios, rows, tables = {}, [], {}
    for b in uniform_bits:
        for gran in granularities:
            a, u = f"TQS {gran} @ {b}", f"uniform {b}"
            t = wins.win_table(mse[a][against], mse[u][against], per, size_a=sizes[a], size_b=sizes[u],
                               usable=usable_plan(a) & usable_plan(u), seed=seed)
            tables[b, gran] = t
            ratios[f"TQS {gran} / uniform, {b} bits"] = t["ratio"].to_series()
            for k in t[per].values:
                outcome = str(t["outcome"].sel({per: k}).item())
                rows.append({"bits": b, "TQS units": gran, per: k, "ratio": float(t["ratio"].sel({per: k})),
                             "95% low": float(t["lo"].sel({per: k})), "95% high": float(t["hi"].sel({per: k})),
                             "outcome": outcome, "winner": WINNER.get(outcome, "not counted")})
    return WinTables(pd.DataFrame(ratios), pd.DataFrame(rows), tables)


def win_report(mse: dict, float_own: xr.DataArray, sizes: dict, eval_lead: int, uniform_bits, granularities,
               per: str, seed: int = 0) -> dict:
    """:func:`win_tables` against the float model and against the truth: ``{"float": (...), "truth": (...)}``."""
    return {against: win_tables(mse, float_own, sizes, eval_lead, uniform_bits, granularities, per, against, seed)
            for against in ("float", "truth")}


def win_rows(report: dict) -> pd.DataFrame:
    """The rows of both :func:`win_report` tables, with a column ``against`` (``"float model"`` or ``"truth"``)."""
    return pd.concat([report["float"].rows.assign(against="float model"), report["truth"].rows.assign(against="truth")])


def win_sentences(report: dict, uniform_bits, granularities, lead: int, step_days: float, per: str) -> list[str]:
    """:func:`win_sentence` against the float model and against the truth, from a :func:`win_report`."""
    return [win_sentence(label, report[k].tables, report[k].ratios, uniform_bits, granularities, lead, step_days, per)
            for label, k in (("the float model", "float"), ("the truth", "truth"))]


def style_ratios(ratios: pd.DataFrame):
    """A ratio table styled for display: below 1 (TQS better) green and bold, otherwise red."""
    return ratios.style.format("{:.3f}").map(
        lambda v: "color: #1a7f37; font-weight: bold" if v < 1 else "color: #b42318"
    )


def win_sentence(label: str, tables: dict, ratios: pd.DataFrame, uniform_bits, granularities, lead: int,
                 step_days: float, per: str) -> str:
    """A Markdown bullet with the :func:`tqslite.wins.describe` counts of every pair against ``label``."""
    parts = []
    for b in uniform_bits:
        for g in granularities:
            col = ratios[f"TQS {g} / uniform, {b} bits"]
            parts.append(f"{b} bits, TQS {g} units: TQS " + wins.describe(wins.tally(tables[b, g]))
                         + f" (ratio {col.min():.2f} to {col.max():.2f})")
    return (f"- Against {label}, at lead {lead} ({lead_text(lead, step_days)}), one comparison per {per}: "
            + "; ".join(parts) + ".")


def count_lines(tables: dict, uniform_bits, granularities, lead: int, per: str) -> list[str]:
    """Summary bullets: wins, ties and losses against the float model per pair (:func:`tqslite.wins.tally`)."""
    lines = []
    for b in uniform_bits:
        for gran in granularities:
            c = {k: int(v) for k, v in wins.tally(tables[b, gran]).items()}
            n_out = c["unusable"] + c["unmatched"]
            lines.append(
                f"- {b} bits, TQS {gran} units, against the float model at lead {lead}: TQS wins "
                f"{c['win']}, ties {c['tie']} and loses {c['loss']} of {c['n']} {per}s counted (paired "
                "bootstrap over windows"
                + (f"; {n_out} {per}s not counted, where a plan adds more error than the float model's own"
                   if n_out else "")
                + ")."
            )
    return lines


def error_maps(system, plans: dict, map_plans: dict, x_eval, horizon: int, std: xr.DataArray) -> xr.Dataset:
    """RMS over windows of quantized minus float at lead ``horizon``, per grid point, in physical units.

    ``map_plans`` is ``{key: plan name}``; the result has one variable per key, ``(variable, lat, lon)``.
    """
    ref = forecast(system, x_eval, horizon).sel(lead=horizon).astype("float64")
    maps = {}
    for k, n in map_plans.items():
        fc = forecast(apply_plan(system, plans[n]), x_eval, horizon).sel(lead=horizon)
        maps[k] = (np.sqrt(((fc - ref) ** 2).mean("window")) * std).drop_vars(["start", "init_time"], errors="ignore")
    return xr.Dataset(maps)


def global_rms(maps: xr.Dataset, reported: xr.DataArray | None = None, names: dict | None = None) -> dict:
    """The latitude-weighted global RMS of each map, per variable: ``{key: (variable,)}``.

    It is the RMSE that :func:`tqslite.evaluation.compare_plans` reports; given that report at the
    maps' lead, ``reported(plan, variable)``, and ``names`` (``{key: plan name}``), every map is
    checked against it (relative tolerance 1e-4) and a mismatch raises ``AssertionError``.
    """
    w = lat_weights(maps["lat"])
    rms = {k: np.sqrt((maps[k] ** 2).weighted(w).mean(("lat", "lon"))) for k in maps.data_vars}
    for k, n in (names or {}).items():
        check = reported.sel(plan=n)
        if not np.allclose(rms[k], check, rtol=1e-4):
            raise AssertionError(f"map {k!r}: global RMS {rms[k].values} differs from the reported {check.values}")
    return rms


def zonal_lines(maps: xr.Dataset, rms: dict, variables) -> list[str]:
    """Per variable: the TQS / uniform ratio of the global RMS and the latitude where each zonal-mean error peaks.

    ``maps`` and ``rms`` have the keys ``"uniform"`` and ``"TQS"``.
    """
    zonal = {k: np.sqrt((maps[k] ** 2).mean("lon")) for k in ("uniform", "TQS")}
    lines = []
    for v in variables:
        ratio = float(rms["TQS"].sel(variable=v) / rms["uniform"].sel(variable=v))
        peaks = {k: float(z.sel(variable=v).idxmax("lat")) for k, z in zonal.items()}
        lines.append(f"- {v}: global RMS of the TQS map / uniform map = {ratio:.2f}; "
                     f"the zonal-mean error peaks at {peaks['uniform']:.0f}° (uniform) "
                     f"and {peaks['TQS']:.0f}° (TQS) latitude.")
    return lines


def summary_lines(model_name: str, n_params: int, skill_gap: float, rank: Ranking, match: pd.DataFrame,
                  tables_float: dict, uniform_bits, granularities, lead: int, per: str, probe_seconds: dict,
                  compare_seconds: float, total_seconds: float, smoke: bool) -> list[str]:
    """The Markdown bullets of a case study's summary, from the results of its sections (times in s)."""
    lines = [
        f"- `{model_name}`: {n_params:,} parameters; recorded and recomputed skill differ by at most {skill_gap:.1e}.",
        f"- Most sensitive block: `{rank.top}` ({rank.table.loc[rank.top, 'role']}), {rank.gamma_name} = "
        f"{rank.with_ci(rank.top)}; least: `{rank.least}`; mean by role: "
        + ", ".join(f"{r} {v:.3f}" for r, v in rank.by_role.items()) + ".",
        f"- Sizes of TQS and uniform plans agree within {match['size difference %'].abs().max():.2f}%.",
    ]
    lines += count_lines(tables_float, uniform_bits, granularities, lead, per)
    lines.append("- These counts are against uniform RTN, the weaker baseline; "
                 "[chapter 10](10_baselines_and_cost.ipynb) "
                 "compares the library's default pipeline with uniform GPTQ on all three stand-ins.")
    lines.append("- Probe: " + ", ".join(f"{g} {s:.0f} s" for g, s in probe_seconds.items())
                 + f"; evaluation rollouts {compare_seconds:.0f} s; the whole notebook {total_seconds:.0f} s"
                 + (" (SMOKE run)." if smoke else "."))
    return lines


__all__ = [
    "WINNER",
    "WinTables",
    "bit_share",
    "bits_per_block",
    "bits_per_param",
    "budget_plans",
    "count_lines",
    "error_maps",
    "errors_at_lead",
    "global_rms",
    "grid_comparison",
    "grid_windows",
    "matched_plans",
    "plan_file",
    "save_plans",
    "style_ratios",
    "summary_lines",
    "unit_params",
    "win_sentence",
    "win_report",
    "win_rows",
    "win_sentences",
    "win_tables",
    "zonal_lines",
]
