"""The standard figures of the case-study chapters: skill, probe curves, scores, errors per lead, error maps.

Each function draws on a matplotlib ``ax`` (or returns a new figure for multi-panel layouts) and
never shows or saves it: the notebook sets the title, saves the figure under its
``output_dir`` and shows it. The tables behind the figures are in :mod:`tqslite.casestudy`.
Leads are drawn in days (model steps times ``step_days``); the evaluation lead ``L`` of the skill
rule (:mod:`tqslite.skill`) is marked by a grey dash-dotted vertical line.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter

from .casestudy import ROLE_COLORS, role_of
from .units import block_label

#: Line style of each role in the curve figure.
ROLE_LINES = {"input": "--", "inner": "-", "output": ":"}


def log_axis(ax) -> None:
    """Log y axis with plain-number tick labels (call after plotting)."""
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    labelled = (2, 3, 4, 5, 6) if hi / lo < 10 else (2, 5)  # minor ticks that get a label

    def minor(v, _):
        return f"{v:.3g}" if round(v / 10 ** np.floor(np.log10(v))) in labelled else ""

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def plan_style(name: str, uniform_bits) -> dict:
    """Line style of a named plan: one colour per bit width, dashed uniform, dotted TQS block, solid TQS tensor.

    ``"float"`` is a thick black line; other names end in their uniform bit width
    (``"uniform 3"``, ``"TQS block @ 3"``), which must be in ``uniform_bits``.
    """
    if name == "float":
        return dict(color="k", lw=2.5, label="float model")
    b = int(name.split()[-1])
    ls = "--" if name.startswith("uniform") else (":" if "block" in name else "-")
    return dict(color=f"C{list(uniform_bits).index(b) % 10}", ls=ls, lw=2, label=name)


def mark_lead(ax, lead: int, step_days: float) -> None:
    """Mark the evaluation lead ``L`` (model steps) on an axis whose x is in days."""
    ax.axvline(lead * step_days, color="0.5", lw=1, ls="-.")


def plot_skill(ax, recorded: dict, skill, horizon: int, step_days: float) -> None:
    """Recorded RMSE per forecast (lines) and the recomputed values (crosses), with the probe horizon.

    ``recorded`` is ``meta["skill"]["heldout"]``, ``skill`` has ``rmse(forecast, lead)``; normalised units.
    """
    for i, f in enumerate(recorded["rmse_normalised"]):
        ax.plot(np.array(recorded["leads"]) * step_days, recorded["rmse_normalised"][f], "o-", color=f"C{i}",
                label=f"{f}, recorded")
        ax.plot(skill["lead"] * step_days, skill["rmse"].sel(forecast=f), "x", color="k", ms=7,
                label="recomputed here" if i == 0 else None)
    ax.axvline(horizon * step_days, color="gray", ls=":", lw=1)
    ax.text(horizon * step_days, ax.get_ylim()[0], "probe horizon T ", color="gray", ha="right", va="bottom",
            fontsize=9)
    ax.set_xlabel("lead time (days)")
    ax.set_ylabel("RMSE (normalised units)")
    ax.legend()


def plot_curves(ax, block, roles: dict) -> None:
    """The probe's curves ``Lambda_u(t)``, one per block, styled by role (:data:`ROLE_LINES`)."""
    for i, u in enumerate(str(u) for u in block["unit"].values):
        ax.plot(block["lead"], block["curve"].sel(unit=u), ROLE_LINES[role_of(u, roles)], color=f"C{i % 10}",
                lw=2, label=f"{u} ({role_of(u, roles)})")
    ax.set_ylabel("$\\Lambda_u(t)$")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))


def plot_gamma(ax, boot, roles: dict, horizon: int, tensor=None, seed: int = 0, depth: int = 2) -> None:
    """Block scores as bars coloured by role with bootstrap intervals; tensor scores as jittered dots.

    ``boot`` is :func:`tqslite.bootstrap_gamma`'s output (``gamma``, ``gamma_lo``, ``gamma_hi`` per
    unit, 1/step); ``tensor`` an optional tensor-level probe result. Non-finite scores are left out.
    """
    units = [str(u) for u in boot["unit"].values]
    g, lo, hi = (boot[k].values for k in ("gamma", "gamma_lo", "gamma_hi"))
    finite = np.isfinite(g)
    x = np.arange(len(units))
    ax.bar(x[finite], g[finite], color=[ROLE_COLORS[role_of(u, roles)] for u in np.array(units)[finite]],
           alpha=0.8, yerr=[g[finite] - lo[finite], hi[finite] - g[finite]], capsize=4, error_kw={"lw": 1.2})
    handles = [Patch(color=c, alpha=0.8, label=r) for r, c in ROLE_COLORS.items()]
    if tensor is not None:
        tg = tensor["gamma"].values
        tb = [units.index(block_label(str(u), depth)) for u in tensor["unit"].values]
        jitter = np.random.default_rng(seed).uniform(-0.25, 0.25, len(tb))
        ok = np.isfinite(tg)
        handles.append(ax.scatter(np.array(tb)[ok] + jitter[ok], tg[ok], s=14, color="k", zorder=3,
                                  label="single tensors"))
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x, units, rotation=30, ha="right")
    ax.set_ylabel(f"$\\gamma_u(T)$ (1 / step), T = {horizon}")
    ax.legend(handles=handles, loc="best")


def plot_errors(ax, errors, step_days: float, lead: int, uniform_bits, with_float: bool = True,
                float_marker: str | None = None) -> None:
    """Error per lead of every plan, ``errors(plan, lead)``, on a log axis, with the evaluation lead marked.

    The float model's line (plan ``"float"``) is drawn only when ``with_float``, with markers
    ``float_marker``; lead in model steps, drawn in days.
    """
    for name in errors["plan"].values:
        if name != "float" or with_float:
            ax.plot(errors["lead"] * step_days, errors.sel(plan=name), marker=float_marker if name == "float" else None,
                    **plan_style(str(name), uniform_bits))
    log_axis(ax)
    mark_lead(ax, lead, step_days)


def variable_panels(cmp, key: str, units: dict) -> list:
    """Panels for :func:`error_panels`: ``cmp[key + "_physical"]`` per variable, then ``cmp[key]`` averaged over them.

    ``cmp`` is a :func:`tqslite.evaluation.compare_plans` result with physical errors added
    (:func:`tqslite.casestudy_plans.with_physical`); ``key`` is ``"rmse_vs_float"`` or ``"rmse_vs_truth"``.
    """
    panels = [(cmp[f"{key}_physical"].sel(variable=v), f"{v} [{units[v]}]") for v in cmp["variable"].values]
    return panels + [(cmp[key].mean("variable"), "mean over variables, normalised")]


def error_panels(panels, step_days: float, lead: int, uniform_bits, with_float: bool, title: str, ncol: int = 4):
    """A figure of :func:`plot_errors` panels, ``panels = [(errors(plan, lead), panel title), ...]``, one legend."""
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow + 0.8), sharex=True, squeeze=False)
    for ax, (da, label) in zip(axes.flat, panels):
        plot_errors(ax, da, step_days, lead, uniform_bits, with_float)
        ax.set_title(label, fontsize=11)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("lead time (days)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.09 if nrow > 1 else 0.15, 1, 1))
    return fig


def plot_error_maps(maps, global_rms: dict, plan_names: dict, variables, units: dict):
    """A figure with one row per variable and one map per plan key of ``maps`` (``(variable, lat, lon)``).

    ``global_rms[key]`` (per variable) goes into each title; ``plan_names`` is ``{key: plan name}``;
    each row shares one colour scale from 0.
    """
    lat, lon = maps["lat"].values, maps["lon"].values
    fig, axes = plt.subplots(len(variables), len(plan_names), figsize=(12, 3.2 * len(variables) + 0.6),
                             squeeze=False, layout="constrained")
    for row, v in zip(axes, variables):
        vmax = max(float(maps[k].sel(variable=v).max()) for k in plan_names)
        for ax, (k, n) in zip(row, plan_names.items()):
            mesh = ax.pcolormesh(lon, lat, maps[k].sel(variable=v), vmin=0, vmax=vmax, cmap="magma_r",
                                 shading="nearest")
            rms = float(global_rms[k].sel(variable=v))
            rms_text = f"{rms:,.0f}" if rms >= 1000 else f"{rms:.3g}"
            ax.set_title(f"{v}, {n}: global RMS {rms_text} {units[v]}", fontsize=11)
            ax.set_aspect("equal")
            ax.set_xticks(np.arange(0, 361, 60))
            ax.set_yticks(np.arange(-60, 61, 30))
            ax.set_xlabel("longitude (°E)")
        row[0].set_ylabel("latitude (°N)")
        fig.colorbar(mesh, ax=list(row), label=f"RMS error [{units[v]}]", shrink=0.9)
    return fig


__all__ = ["ROLE_LINES", "error_panels", "log_axis", "mark_lead", "plan_style", "plot_curves", "plot_error_maps",
           "plot_errors", "plot_gamma", "plot_skill", "variable_panels"]
