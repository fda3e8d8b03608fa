"""What every case-study chapter does to one shipped model: describe it, check its skill, probe and rank its units.

Chapters 06-08 take one shipped stand-in (``pangu_lite``, ``aurora_lite``, ``timesfm_lite``)
through the same steps: describe the model and its data, check its recorded skill, find the
evaluation lead ``L`` with the skill rule (:mod:`tqslite.skill`), probe its units and rank them
with bootstrap intervals. This module holds those steps, so that each notebook tells its model's
story and nothing else. The plans compared side by side and their win counts are in
:mod:`tqslite.casestudy_plans`, the figures in :mod:`tqslite.casestudy_plots`.

Conventions: a *unit* is a block label (``BlockUnits(depth=2)``); ``roles`` maps a unit to
``"input"`` or ``"output"`` (every other unit is ``"inner"``); a lead is a number of model
steps; errors are RMSE in normalised units (training standard deviations) unless a table says
physical units.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import xarray as xr

from .config import Int
from .probe import Gaussian, QuantResidual, probe
from .skill import skill_horizon
from .units import BlockUnits, block_label

#: Colours of the three roles in the figures.
ROLE_COLORS = {"input": "C0", "inner": "C7", "output": "C3"}


def role_of(unit: str, roles: dict) -> str:
    """``"input"``, ``"inner"`` or ``"output"``: where a unit sits between the data and the forecast."""
    return roles.get(unit, "inner")


def lead_text(steps: int, step_days: float) -> str:
    """A lead of ``steps`` model steps in days, for the text: ``"0.25 days"``, ``"1 day"``."""
    d = steps * step_days
    return f"{d:g} day" + ("" if d == 1 else "s")


def step_days_of(info: dict) -> float:
    """One model step in days, from the ``"data"`` entry of a model's metadata."""
    return info["step_hours"] / 24 if "step_hours" in info else info["step_days"]


def model_lines(meta: dict, n_params: int, step_days: float) -> list[str]:
    """What a shipped model is: description, architecture, size and training, data file and step."""
    info = meta["data"]
    return [
        meta["description"],
        f"architecture: {meta['architecture']}",
        f"{n_params:,} parameters; trained for {meta['steps_run']} steps in {meta['training_seconds']:.0f} s on "
        f"{meta['threads']} thread, torch {meta['torch_version']}, seed {meta['seed']}",
        f"data: {info['file']} (sha256 {info['sha256'][:12]}...); one model step = {lead_text(1, step_days)}",
    ]


def variable_scales(stats, variables) -> xr.DataArray:
    """The training standard deviation of each variable, ``(variable,)``: normalised units -> physical units."""
    return xr.DataArray([float(stats[v].sel(stat="std")) for v in variables], dims="variable",
                        coords={"variable": list(variables)})


def variable_table(stats, variables, units: dict) -> pd.DataFrame:
    """Units, training mean and training standard deviation of each variable of a gridded model."""
    return pd.DataFrame(
        {
            "units": [units[v] for v in variables],
            "training mean": [float(stats[v].sel(stat="mean")) for v in variables],
            "training std": variable_scales(stats, variables).values,
        },
        index=pd.Index(list(variables), name="variable"),
    )


def periods_table(info: dict, heldout: xr.DataArray, heldout_name: str) -> pd.DataFrame:
    """First and last time of each data period of a model's record, plus the held-out period.

    ``info`` is the ``"data"`` entry of the model's metadata; ``heldout`` has a ``time`` coordinate.
    """
    periods = pd.DataFrame(info["periods"], index=["first", "last"]).T
    periods.loc[heldout_name] = [str(heldout["time"].values[i])[:19] for i in (0, -1)]
    return periods


def unit_table(model, roles: dict, depth: int = 2) -> pd.DataFrame:
    """One row per block unit: role, module type, number of tensors and parameters, share in %.

    Parameters
    ----------
    model : torch.nn.Module
        The float model.
    roles : dict
        ``{unit: "input" | "output"}``; other units are inner.
    depth : int
        Depth of the block labels (:func:`tqslite.units.block_label`).
    """
    params = dict(model.named_parameters())
    n_params = sum(p.numel() for p in params.values())
    tensors = pd.DataFrame(
        [{"unit": block_label(n, depth), "tensor": n, "parameters": p.numel()} for n, p in params.items()]
    )
    table = tensors.groupby("unit", sort=False).agg(tensors=("tensor", "count"), parameters=("parameters", "sum"))
    table.insert(0, "role", [role_of(u, roles) for u in table.index])
    table.insert(
        1, "module", [type(params[u] if u in params else model.get_submodule(u)).__name__ for u in table.index]
    )
    table["share of parameters %"] = (100 * table["parameters"] / n_params).round(1)
    return table


def role_share(table: pd.DataFrame) -> pd.Series:
    """Percent of the parameters held by each role, from a :func:`unit_table`."""
    return table.groupby("role")["parameters"].sum() / table["parameters"].sum() * 100


def skill_check(recorded: dict, skill: xr.Dataset, horizon: int) -> tuple[pd.DataFrame, float]:
    """Recorded against recomputed RMSE per forecast and lead, and their largest difference.

    Parameters
    ----------
    recorded : dict
        The model's ``meta["skill"]["heldout"]``: ``leads`` and ``rmse_normalised[forecast]``.
    skill : xarray.Dataset
        :func:`tqslite.train.evaluate` output with ``rmse(forecast, lead)``, normalised units.
    horizon : int
        Only leads up to ``horizon`` (model steps) are compared.

    Returns
    -------
    table : pandas.DataFrame
        Rows ``(forecast, "recorded" | "recomputed")``, one column per lead.
    gap : float
        Largest absolute difference, normalised units.
    """
    leads = [lead for lead in recorded["leads"] if lead <= horizon]
    rows = {}
    for f in recorded["rmse_normalised"]:
        rec = dict(zip(recorded["leads"], recorded["rmse_normalised"][f]))
        rows[f, "recorded"] = [rec[lead] for lead in leads]
        rows[f, "recomputed"] = [float(skill["rmse"].sel(forecast=f, lead=lead)) for lead in leads]
    table = pd.DataFrame(rows, index=pd.Index(leads, name="lead")).T
    gap = np.abs(table.xs("recorded", level=1).values - table.xs("recomputed", level=1).values).max()
    return table, float(gap)


def leading_run(recorded: dict, ref: str):
    """The last recorded lead up to which the model's RMSE stays below that of ``ref`` (None: not at lead 1)."""
    below = np.array(recorded["rmse_normalised"]["model"]) < np.array(recorded["rmse_normalised"][ref])
    n = len(below) if below.all() else int(np.argmin(below))
    return recorded["leads"][n - 1] if n else None


def skill_lines(recorded: dict, gap: float, seconds: float, step_days: float) -> list[str]:
    """How well the recomputed skill matches the record, and up to which lead the model beats each reference."""
    lines = [f"recomputed from the same {recorded['n_windows']} initial states in {seconds:.1f} s; "
             f"largest difference from the record: {gap:.1e} (normalised units)"]
    for ref in ("persistence", "climatology"):
        lead = leading_run(recorded, ref)
        lines.append(f"below {ref}: " + (f"at every recorded lead up to {lead} ({lead_text(lead, step_days)})"
                                         if lead else "not even at lead 1"))
    return lines


def evaluation_lead(skill: xr.Dataset) -> int:
    """The skill rule's lead (:func:`tqslite.skill.skill_horizon`) from ``rmse(forecast, lead)``; 0: no skill.

    The last lead up to which the float model (``forecast="model"``) beats climatology and
    persistence; plans are compared at that lead, never past it. Leads must be ``1, 2, ...``.
    """
    if skill["lead"].values.tolist() != list(range(1, skill.sizes["lead"] + 1)):
        raise ValueError(f"leads must be 1, 2, ...; got {skill['lead'].values.tolist()}")
    return skill_horizon(skill["rmse"].sel(forecast="model").values,
                         skill["rmse"].sel(forecast=["climatology", "persistence"]).values)


def physical_skill(recorded: dict, variables, units: dict, lead: int) -> pd.DataFrame:
    """Recorded RMSE in physical units per variable (rows) and forecast (columns) at one recorded lead."""
    i = recorded["leads"].index(lead)
    table = pd.DataFrame(
        {f: [recorded["rmse_physical"][v][f][i] for v in variables] for f in recorded["rmse_normalised"]},
        index=pd.Index(list(variables), name="variable"),
    )
    table.insert(0, "units", [units[v] for v in variables])
    return table


def skill_sentence(eval_lead: int, horizon: int, step_days: float) -> str:
    """Markdown that states the evaluation lead ``L`` found by :func:`tqslite.skill.skill_horizon`."""
    if eval_lead == 0:
        return ("The float model does not beat both climatology and persistence even at lead 1 on the held-out "
                "run: every comparison below is between forecasts without skill, and none is counted.")
    return (f"The float model beats climatology and persistence on the held-out run at every lead up to "
            f"{eval_lead} ({lead_text(eval_lead, step_days)})"
            + (f", the whole probe horizon $T$ = {horizon}" if eval_lead == horizon else
               f", not beyond (the probe horizon is $T$ = {horizon})")
            + f": plans are compared at lead $L$ = {eval_lead} below.")


def perturbation(kind: str, bits: int, sigma_rel: float, seed: int):
    """The probe's perturbation: ``"gauss"`` (Gaussian, ``sigma_rel`` of each tensor's RMS) or ``"quant"``
    (the residual of ``Int(bits)`` RTN, Gaussian where it vanishes)."""
    gauss = Gaussian(sigma_rel=sigma_rel, seed=seed)
    return QuantResidual(Int(bits), fallback=gauss) if kind == "quant" else gauss


def probe_units(system, x, horizon: int, perturbation, granularities, depth: int = 2):
    """Probe the model at each granularity (``"block"``: ``BlockUnits(depth)``, ``"tensor"``).

    Returns
    -------
    scores : dict
        ``{granularity: probe result}``.
    seconds : dict
        ``{granularity: wall time in s}``.
    """
    specs = {"block": BlockUnits(depth=depth), "tensor": "tensor"}
    scores, seconds = {}, {}
    for gran in granularities:
        t0 = time.perf_counter()
        scores[gran] = probe(system, x, horizon=horizon, perturbation=perturbation, units=specs[gran], progress=False)
        seconds[gran] = time.perf_counter() - t0
    return scores, seconds


def probe_line(gran: str, scores: xr.Dataset, horizon: int, seconds: float) -> str:
    """One line on a probe run: units, windows, time, dead and non-finite units."""
    s = scores
    return (f"{gran:6s}: {s.sizes['unit']:3d} units, {s.sizes['window']} windows, T = {horizon}: "
            f"{seconds:.1f} s; dead units: {list(s['unit'][s['dead']].values) or 'none'}; "
            f"non-finite: {list(s['unit'][s['nonfinite']].values) or 'none'}")


def bootstrap_table(block: xr.Dataset, boot: xr.Dataset, roles: dict, horizon: int, gamma_name: str) -> pd.DataFrame:
    """One row per block: role, parameters, ``eps_u``, ``Lambda(1)``, ``Lambda(T)``, score and its interval.

    ``block`` is a :func:`tqslite.probe` result, ``boot`` its :func:`tqslite.bootstrap_gamma`.
    """
    units = [str(u) for u in block["unit"].values]
    return pd.DataFrame(
        {
            "role": [role_of(u, roles) for u in units],
            "parameters": block["n_params"].values,
            "eps_u": block["eps"].values,
            "Lambda(1)": block["curve"].sel(lead=1).values,
            f"Lambda({horizon})": block["curve"].sel(lead=horizon).values,
            gamma_name: boot["gamma"].values,
            "95% low": boot["gamma_lo"].values,
            "95% high": boot["gamma_hi"].values,
        },
        index=pd.Index(units, name="unit"),
    )


def tensor_table(tens: xr.Dataset, gamma_name: str, depth: int = 2) -> pd.DataFrame:
    """One row per tensor of a tensor-level probe: its block, parameters, ``eps_u`` and score."""
    return pd.DataFrame(
        {
            "block": [block_label(str(u), depth) for u in tens["unit"].values],
            "parameters": tens["n_params"].values,
            "eps_u": tens["eps"].values,
            gamma_name: tens["gamma"].values,
        },
        index=pd.Index([str(u) for u in tens["unit"].values], name="tensor"),
    )


def save_scores(block: xr.Dataset, boot: xr.Dataset, path) -> None:
    """Write block scores with their bootstrap interval (``gamma_lo``, ``gamma_hi``) to netCDF."""
    out = block.merge(boot[["gamma_lo", "gamma_hi"]])
    out.attrs.update({f"bootstrap_{k}": v for k, v in boot.attrs.items()})
    out.to_netcdf(path)


class Ranking:
    """The blocks of a :func:`bootstrap_table` ranked by score, finite scores only.

    Attributes: ``table`` (finite rows), ``ranked`` (most sensitive first), ``top``, ``second``,
    ``least`` (unit names), ``clear`` (the top interval lies above every other block's),
    ``by_role`` (mean score per role), ``n_pairs`` (inner x input/output pairs) and
    ``inner_above`` (how many of them the inner block scores higher in).
    """

    def __init__(self, table: pd.DataFrame, gamma_name: str):
        bt = table[np.isfinite(table[gamma_name])]
        self.table, self.gamma_name = bt, gamma_name
        self.ranked = bt.sort_values(gamma_name, ascending=False)
        self.top, self.second, self.least = self.ranked.index[0], self.ranked.index[1], self.ranked.index[-1]
        self.clear = bool(bt.loc[self.top, "95% low"] > bt.drop(self.top)["95% high"].max())
        self.by_role = bt.groupby("role")[gamma_name].mean()
        io = bt[bt["role"] != "inner"][gamma_name]
        inner = bt[bt["role"] == "inner"][gamma_name]
        self.n_pairs = len(inner) * len(io)
        self.inner_above = int((inner.values[:, None] > io.values[None, :]).sum())

    def with_ci(self, u: str) -> str:
        """A block's score and its bootstrap interval, as text."""
        bt, g = self.table, self.gamma_name
        return f"{bt.loc[u, g]:.3f} [{bt.loc[u, '95% low']:.3f}, {bt.loc[u, '95% high']:.3f}]"

    def lines(self, shares: pd.Series, tensors: pd.DataFrame | None = None) -> list[str]:
        """Markdown bullets on the ranking.

        ``shares`` comes from :func:`role_share`, ``tensors`` (optional) from :func:`tensor_table`.
        """
        bt, g, top, least = self.table, self.gamma_name, self.top, self.least
        lines = [
            f"- The most sensitive block is `{top}` ({bt.loc[top, 'role']}), {g} = {self.with_ci(top)} per step; "
            + ("its interval lies above every other block's." if self.clear else
               "its interval overlaps that of at least one other block (the runner-up is "
               f"`{self.second}`, {self.with_ci(self.second)})."),
            "- Mean score by role: " + ", ".join(f"{r} {v:.3f}" for r, v in self.by_role.items())
            + f". Of the {self.n_pairs} (inner, input/output) pairs of blocks, "
            f"the inner block scores higher in {self.inner_above}.",
            f"- The least sensitive block is `{least}` ({bt.loc[least, 'role']}), {bt.loc[least, g]:.3f}. "
            "Block ranking, most sensitive first: " + ", ".join(f"`{u}`" for u in self.ranked.index) + ".",
            f"- The input and output units hold {shares.drop('inner', errors='ignore').sum():.1f}% of the "
            f"parameters, the inner blocks {shares.get('inner', 0):.1f}%.",
        ]
        if tensors is not None:
            ts = tensors[np.isfinite(tensors[g])].sort_values(g, ascending=False)
            lines.append(
                f"- Of the {len(ts)} tensors with a finite score, the five most sensitive are "
                + ", ".join(f"`{t}` ({ts.loc[t, g]:.3f})" for t in ts.index[:5])
                + f"; tensor scores range from {ts[g].min():.3f} to {ts[g].max():.3f}, "
                f"block scores from {bt[g].min():.3f} to {bt[g].max():.3f}."
            )
        return lines


__all__ = [
    "ROLE_COLORS",
    "Ranking",
    "bootstrap_table",
    "evaluation_lead",
    "lead_text",
    "leading_run",
    "model_lines",
    "periods_table",
    "perturbation",
    "physical_skill",
    "probe_line",
    "probe_units",
    "role_of",
    "role_share",
    "save_scores",
    "skill_check",
    "skill_lines",
    "skill_sentence",
    "step_days_of",
    "tensor_table",
    "unit_table",
    "variable_scales",
    "variable_table",
]
