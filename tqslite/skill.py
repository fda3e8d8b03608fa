"""The skill-aware horizon rule: judge quantized forecasts only where the float forecast is worth having.

A forecaster's rollout is only useful at leads where it beats the forecasts that need no model:
**climatology** (the mean state, or a station's mean annual cycle) and **persistence** (the
initial state held fixed). Past that lead, a quantized model that "wins" wins at forecasting
noise. And a quantized model whose own added error (against the float model) is larger than the
float model's error against the truth has lost what made the model worth quantizing. SPEC
section 5 turns both into rules, computed from the data, never typed in:

* :func:`skill_horizon` -- the **evaluation horizon**: the last lead ``L`` such that at every lead
  ``1..L`` the float model's RMSE is below the RMSE of every reference forecast (0 when the model
  has no skill even at lead 1);
* :func:`usable` (and :func:`usable_targets`, per target from per-window errors) -- a
  quantized model is **usable** at a lead when its added RMSE (against the
  float model) is at most the float model's own RMSE (against the truth) there; comparisons in
  which a method is not usable are kept out of win counts and reported separately
  (:mod:`tqslite.wins`).

Errors come in as mean squared errors per window, ``mse(window, lead[, target])`` (a *target*
is a variable of a grid, a station of a series, or the whole state), as
:func:`tqslite.comparison.run` records them. The RMSE of one target is over its
windows; a model's skill curve is the mean over targets of their RMSEs, the way
:mod:`tqslite.train` reports skill (the mean over variables of each variable's RMSE).
"""

from __future__ import annotations

import numpy as np
import xarray as xr


def target_groups(mse: xr.DataArray, per: str) -> list[tuple[str, np.ndarray]]:
    """``[(target, window indices)]``: one per variable, per station (a coordinate of ``window``), or ``"all"``.

    ``per`` is ``"variable"`` (a dim of ``mse``), ``"station"`` (a coordinate along ``window``)
    or anything else (one target, every window).
    """
    n = mse.sizes["window"]
    if per == "station":
        st = np.asarray(mse["station"].values).astype(str)
        return [(s, np.flatnonzero(st == s)) for s in dict.fromkeys(st)]
    if per == "variable" and "variable" in mse.dims:
        return [(str(v), np.arange(n)) for v in mse["variable"].values]
    return [("all", np.arange(n))]


def rmse_per_target(mse: xr.DataArray, per: str) -> xr.DataArray:
    """``sqrt`` of the mean over each target's windows: dims of ``mse`` without ``window``, the target last.

    The target dim is named ``per`` (``"variable"``, ``"station"``, or ``"target"`` for one
    target called ``"all"``).
    """
    dim = per if per in ("variable", "station") else "target"
    parts = []
    for t, idx in target_groups(mse, per):
        m = mse.isel(window=idx)
        if per == "variable" and "variable" in m.dims:
            m = m.sel(variable=t, drop=True)
        parts.append(np.sqrt(m.mean("window")).expand_dims({dim: [t]}))
    return xr.concat(parts, dim).transpose(..., dim)


def skill_curves(model_mse: xr.DataArray, reference_mse: dict, per: str) -> xr.Dataset:
    """RMSE per lead of the model and of each reference forecast, per target and averaged over targets.

    Parameters
    ----------
    model_mse : DataArray ``(window, lead[, variable])``
        The float model against the truth.
    reference_mse : dict of str to DataArray
        The same for each reference forecast, e.g. ``{"climatology": ..., "persistence": ...}``.
    per : str
        The target (see :func:`target_groups`).

    Returns
    -------
    xarray.Dataset
        ``rmse(forecast, lead, target)`` and ``mean_rmse(forecast, lead)`` (the mean over targets);
        ``forecast`` is ``"model"`` then the references.
    """
    names = ["model", *reference_mse]
    per_target = xr.concat([rmse_per_target(m, per) for m in (model_mse, *reference_mse.values())],
                           xr.DataArray(names, dims="forecast", name="forecast"))
    dim = per_target.dims[-1]
    return xr.Dataset({"rmse": per_target, "mean_rmse": per_target.mean(dim)})


def skill_horizon(model_rmse, reference_rmse) -> int:
    """The last lead ``L`` up to which the model beats every reference at every lead (0: not even at lead 1).

    Parameters
    ----------
    model_rmse : array-like ``(lead,)``
        The model's error at leads ``1, 2, ...`` (consecutive).
    reference_rmse : array-like ``(reference, lead)`` or ``(lead,)``
        The reference forecasts' errors at the same leads.

    A tie is not skill: the model must be strictly below. The rule reads the leads in order
    and stops at the first lead where the model is not below some reference, so a model that
    loses at lead 3 and wins again at lead 5 (noise) has horizon 2.
    """
    model = np.asarray(model_rmse, float)
    refs = np.atleast_2d(np.asarray(reference_rmse, float))
    if model.ndim != 1 or refs.shape[-1] != model.shape[0]:
        raise ValueError(f"model_rmse {model.shape} and reference_rmse {refs.shape} must cover the same leads.")
    ok = np.isfinite(model) & (model < refs).all(axis=0)
    return int(len(ok) if ok.all() else np.argmin(ok))


def horizon_of(curves: xr.Dataset) -> int:
    """:func:`skill_horizon` of a :func:`skill_curves` result, on the mean over targets."""
    mean = curves["mean_rmse"]
    refs = [f for f in mean["forecast"].values if f != "model"]
    return skill_horizon(mean.sel(forecast="model").values, mean.sel(forecast=refs).values)


def usable(added_rmse, own_rmse):
    """Whether a quantized model is usable: its added error at most the float model's own error.

    ``added_rmse`` is the quantized model's RMSE against the float model, ``own_rmse`` the
    float model's RMSE against the truth, at the same lead and target (they broadcast). NaN
    is not usable.
    """
    added, own = np.asarray(added_rmse, float), np.asarray(own_rmse, float)
    return np.isfinite(added) & (added <= own)


def usable_targets(added_mse: xr.DataArray, own_mse: xr.DataArray, per: str) -> xr.DataArray:
    """:func:`usable` per target, from per-window errors at one lead.

    ``added_mse`` is a quantized model's MSE against the float model, ``own_mse`` the float
    model's MSE against the truth, both ``(window[, variable])`` on the same windows; each is
    turned into an RMSE per target (:func:`rmse_per_target`) before they are compared. Returns a
    boolean DataArray over the target dim.
    """
    added, own = rmse_per_target(added_mse, per), rmse_per_target(own_mse, per)
    return xr.DataArray(usable(added.values, own.values), dims=added.dims, coords=added.coords)


__all__ = ["horizon_of", "rmse_per_target", "skill_curves", "skill_horizon", "target_groups", "usable",
           "usable_targets"]
