"""Evaluation of rollouts (SPEC section 5): forecasts as xarray, RMSE, latitude weights, ACC.

A forecast here is a :class:`xarray.DataArray` with dims ``("window", "lead", *state_dims)``:
``N`` initial states rolled out for ``T`` steps. Errors are computed against another forecast
(the float model: the error quantization adds) or against the truth (the data itself), per lead
time and, for gridded states, per variable:

* ``rmse``: ``sqrt(mean over windows and space of w * (a - b)**2)`` with latitude weights
  ``w = cos(lat) / mean(cos(lat))`` when the data have a ``lat`` dim (as in WeatherBench);
* ``acc``: the anomaly correlation coefficient against a climatology, latitude-weighted too.
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from .data import lat_weights as data_lat_weights
from .systems import as_system, device_of, rollout


def forecast(model, x0, steps: int, batch_size: int | None = None) -> xr.DataArray:
    """Roll ``model`` out from initial states and label the result.

    Parameters
    ----------
    model : nn.Module or system
        The forecaster (a quantized copy or the float model), rolled out on its own device.
    x0 : DataArray or Tensor, shape ``(window, *S)``
        Initial states. A DataArray's dims and coords (e.g. ``variable``, ``lat``, ``lon``) are
        carried over to the forecast; a tensor gets dims ``window, dim_0, dim_1, ...``.
    steps : int
        Leads 1..steps.
    batch_size : int, optional
        Windows per forward call (default: all at once).

    Returns
    -------
    DataArray, dims ``(window, lead, *state_dims)``, in the model's dtype (in host memory).
    """
    system = as_system(model)
    if not isinstance(x0, xr.DataArray):
        values = x0.detach().cpu().numpy() if torch.is_tensor(x0) else np.asarray(x0)
        x0 = xr.DataArray(values, dims=("window", *[f"dim_{i}" for i in range(values.ndim - 1)]))
    x = torch.as_tensor(x0.values, device=device_of(system)).to(system.dtype)
    with system.evaluating():
        out = rollout(system, x, steps, batch_size)
    da = xr.DataArray(out.transpose(0, 1).cpu().numpy(), dims=(x0.dims[0], "lead", *x0.dims[1:]), coords=x0.coords)
    return da.assign_coords(lead=np.arange(1, steps + 1))


def lat_weights(lat) -> xr.DataArray:
    """:func:`tqslite.data.lat_weights` (``cos(lat) / mean(cos(lat))``) as a DataArray on ``lat``."""
    return xr.DataArray(data_lat_weights(lat), dims="lat", coords={"lat": np.asarray(lat)})


def _mean(x: xr.DataArray, keep) -> xr.DataArray:
    """Mean over every dim but ``lead`` and ``keep``; latitude-weighted when there is a ``lat`` dim.

    ``keep=None`` keeps the ``variable`` or ``channel`` dim if there is one; a ``keep`` dim the
    data do not have is an error (rather than a silent average over everything).
    """
    if keep is None:
        keep = tuple(d for d in ("variable", "channel") if d in x.dims)
    missing = [d for d in keep if d not in x.dims]
    if missing:
        raise ValueError(f"keep={tuple(keep)}: the data have no dim {missing} (dims: {x.dims}).")
    dims = [d for d in x.dims if d not in ("lead", *keep)]
    return x.weighted(lat_weights(x["lat"])).mean(dims) if "lat" in x.dims else x.mean(dims)


def rmse(a: xr.DataArray, b: xr.DataArray, keep=None) -> xr.DataArray:
    """Root-mean-square difference per lead (and per ``keep`` dim), latitude-weighted if gridded.

    Averages over every dim except ``lead`` and those in ``keep`` (windows, space, stations),
    in float64. ``keep=None``: the ``variable`` or ``channel`` dim, if any.
    """
    return np.sqrt(_mean((a.astype("float64") - b.astype("float64")) ** 2, keep))


def acc(fc: xr.DataArray, truth: xr.DataArray, climatology, keep=None) -> xr.DataArray:
    """Anomaly correlation per lead: ``mean(f' t') / sqrt(mean(f'^2) mean(t'^2))``.

    ``f' = fc - climatology`` and ``t' = truth - climatology`` (anomalies, not re-centred); means
    over windows and space, latitude-weighted if gridded. ``climatology`` broadcasts against the
    forecast (e.g. the training period's time mean, with the state's dims).
    """
    f = fc.astype("float64") - climatology
    t = truth.astype("float64") - climatology
    return _mean(f * t, keep) / np.sqrt(_mean(f**2, keep) * _mean(t**2, keep))


def compare_plans(model, plans: dict, x0, steps: int, truth: xr.DataArray | None = None,
                  keep=None, batch_size: int | None = None, view=None, quantizer=None,
                  calibration=None) -> xr.Dataset:
    """Roll out the float model and a quantized copy per plan; errors per lead, side by side.

    Parameters
    ----------
    model : nn.Module or system
        The float model (left untouched: each plan is applied to a copy).
    plans : dict of str to Plan
        ``{name: plan}``, e.g. a TQS plan and uniform RTN at the same size.
    x0 : DataArray or Tensor, ``(window, *S)``
        Initial states.
    steps : int
        Leads 1..steps.
    truth : DataArray, optional
        The verifying states, dims ``(window, lead, *S)`` like the forecasts.
    keep : tuple of str, optional
        Dims kept in the scores (default: ``variable`` or ``channel`` if the state has one).
    view : callable, optional
        Applied to every forecast and to the truth before scoring, e.g. for a context-window
        state ``lambda da: da.isel(dim_0=slice(-patch, None))`` scores only the newest patch.

    Returns
    -------
    xarray.Dataset
        Dim ``plan`` (``"float"`` first, then the plans): ``rmse_vs_float(plan, lead, ...)``
        (the error quantization adds), ``rmse_vs_truth`` when ``truth`` is given, and
        ``bits_per_param(plan)``, stored bits per parameter (32 for float).
    """
    from .plans import apply_plan, plan_size

    view = view or (lambda da: da)
    ref = view(forecast(model, x0, steps, batch_size))
    fcs = {"float": ref, **{name: view(forecast(apply_plan(model, p, quantizer, calibration), x0, steps, batch_size))
                            for name, p in plans.items()}}
    truth = None if truth is None else view(truth)
    names = xr.DataArray(list(fcs), dims="plan", name="plan")
    out = xr.Dataset({"rmse_vs_float": xr.concat([rmse(fc, ref, keep) for fc in fcs.values()], names)})
    if truth is not None:
        out["rmse_vs_truth"] = xr.concat([rmse(fc, truth, keep) for fc in fcs.values()], names)
    out["bits_per_param"] = ("plan", [32.0] + [plan_size(p, model).bits_per_param for p in plans.values()])
    return out
