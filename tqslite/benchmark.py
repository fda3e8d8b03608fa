"""A benchmark model: everything a comparison of quantization methods needs for one shipped model.

:func:`benchmark` gathers, from a shipped checkpoint and its data (:mod:`tqslite.train`), in the
model's normalised units:

* **probe states** from the validation period, with the truth that follows them: what the
  sensitivity scores, the pipeline's horizon rule and the closed-loop refinement may look at;
* **evaluation windows** from the held-out data (for the grid models an independent
  simulation; for ``timesfm_lite`` a later period; for ``lorenz96_emulator`` an independent
  exact run), with their truth: what methods are judged on, and nothing else sees;
* the **reference forecasts** of both sets, climatology and persistence, as
  :mod:`tqslite.train` defines them (the training-period mean state, or each station's mean
  annual cycle; the last observed state, or the last observed value of a series), for the
  skill rule of :mod:`tqslite.skill`;
* GPTQ's **calibration states** and the Hessian baseline's **training pairs and loss**, from the
  training period.

:func:`window_mse` and :func:`float_skill` turn forecasts into the per-window errors and skill
curves the rest of the comparison uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import xarray as xr

from . import data as D
from .evaluation import forecast, lat_weights
from .skill import horizon_of, skill_curves

#: Longest lead a benchmark holds truth for, per layout (the skill rule picks the lead used).
MAX_HORIZON = {"grid": 24, "series": 8, "vector": 60}
#: Probe states and evaluation windows per layout.
N_PROBE = {"grid": 16, "series": 256, "vector": 32}
N_EVAL = {"grid": 32, "series": 1200, "vector": 64}


@dataclass
class Benchmark:
    """One model's comparison data (see the module docstring), in normalised units.

    Attributes
    ----------
    name : str
    system
        The float model as a system; never modified.
    probe_states : DataArray ``(window, *S)``
        Probe states (validation period); :attr:`x_probe` as a tensor.
    probe_truth : DataArray ``(window, lead, *S)``
        What followed each probe state.
    probe_references : DataArray ``(forecast, window, lead, ...)``
        Climatology and persistence forecasts of the probe states, already in the scored view.
    x_eval : DataArray ``(window, *S)``
        Evaluation windows (held-out data).
    truth : DataArray ``(window, lead, *S)``
        What followed each evaluation window.
    eval_references : DataArray ``(forecast, window, lead, ...)``
        Climatology and persistence forecasts of the evaluation windows, in the scored view.
    calibration : Tensor ``(n, *S)``
        Training states, GPTQ's calibration data.
    loss_batches : list of ``(x, y)``
        Training pairs for the Hessian traces; ``loss_fn(module, (x, y))`` is the training loss.
    loss_fn : callable
    view : callable
        DataArray -> DataArray: the scored part of a state (identity, or the newest patch of a
        context window).
    per : str
        The target of a cell: ``"variable"`` (grids), ``"station"`` (series, a coordinate of
        ``window``) or ``"all"`` (the whole state of a vector model).
    """

    name: str
    system: object
    probe_states: xr.DataArray
    probe_truth: xr.DataArray
    probe_references: xr.DataArray
    x_eval: xr.DataArray
    truth: xr.DataArray
    eval_references: xr.DataArray
    calibration: torch.Tensor
    loss_batches: list
    loss_fn: object
    view: object = field(default=lambda da: da)
    per: str = "variable"

    @property
    def x_probe(self) -> torch.Tensor:
        """The probe states as a tensor ``(N, *S)``."""
        return torch.from_numpy(np.ascontiguousarray(self.probe_states.values))

    @property
    def max_horizon(self) -> int:
        """Leads with truth: ``1..max_horizon``."""
        return int(self.truth.sizes["lead"])


def window_mse(a: xr.DataArray, b: xr.DataArray) -> xr.DataArray:
    """Mean squared difference per window and lead (and variable): ``(window, lead[, variable])``, float64.

    The mean runs over every other dim (space, days of a patch), latitude-weighted
    (``cos(lat)``) when there is a ``lat`` dim.
    """
    se = (a.astype("float64") - b.astype("float64")) ** 2
    dims = [d for d in se.dims if d not in ("window", "lead", "variable")]
    out = se.weighted(lat_weights(se["lat"])).mean(dims) if "lat" in se.dims else se.mean(dims)
    return out.transpose("window", "lead", ...)


def _references(layout: str, module, prep, x0: xr.DataArray, truth: xr.DataArray, view) -> xr.DataArray:
    """Climatology and persistence forecasts ``(forecast, window, lead, ...)`` in the scored view."""
    viewed = view(truth)
    if layout != "series":
        clim = xr.zeros_like(viewed) + np.asarray(prep.climatology, dtype=np.float64).reshape(viewed.shape[2:])
        pers = xr.zeros_like(viewed) + x0.values[:, None]  # the initial state, held
    else:
        ctx, p = module.ARCH["context"], module.ARCH["patch"]
        n, T = viewed.sizes["window"], viewed.sizes["lead"]
        pers = xr.zeros_like(viewed) + x0.values[:, -1][:, None, None]  # the last observed value, held
        days = (x0["init_time"].values[:, None] + np.arange(ctx, ctx + T * p)[None, :] * np.timedelta64(1, "D"))
        cycle = D.annual_cycle(prep.climatology, days.ravel()).values.reshape(n, T * p, -1)
        column = {s: i for i, s in enumerate(prep.climatology["station"].values)}
        idx = np.array([column[s] for s in x0["station"].values])
        clim = xr.zeros_like(viewed) + cycle[np.arange(n), :, idx].reshape(n, T, p)
    return xr.concat([clim, pers], xr.DataArray(["climatology", "persistence"], dims="forecast", name="forecast"))


def benchmark(name: str, max_horizon: int | None = None, n_probe: int | None = None, n_eval: int | None = None,
              n_calibration: int = 32, n_loss_batches: int = 4, loss_batch_size: int = 16, seed: int = 0,
              prep=None) -> Benchmark:
    """The :class:`Benchmark` of a shipped model, from its shipped (or generated) data.

    Defaults per layout: leads ``1..max_horizon`` of truth (grids 24 steps = 6 days, series 8
    patches = 32 days, vector 60 steps = 3 time units: past where each float model loses its
    skill, so the skill rule can find the crossing); 16, 256 and 32 probe states; 32, 1200
    (100 per station) and 64 evaluation windows; 32 calibration states (for a grid model,
    32 x 2048 grid points feed each convolution).
    """
    from .models import load, module_of
    from .splits import calibration_states, prepare, windows

    module = module_of(name)
    layout = module.LAYOUT
    max_horizon = max_horizon or MAX_HORIZON[layout]
    n_probe = n_probe or N_PROBE[layout]
    n_eval = n_eval or N_EVAL[layout]
    prep = prep or prepare(name)
    system, _ = load(name)
    x_probe, probe_truth = windows(name, "validation", n_probe, max_horizon, seed, prep)
    x_eval, truth = windows(name, "heldout", n_eval, max_horizon, seed, prep)
    rng = np.random.default_rng(seed)
    train = torch.from_numpy(prep.train)
    calibration = calibration_states(name, n_calibration, seed, prep)
    if layout != "series":
        if layout == "grid":
            rename = dict(channel="variable")
            x_probe, probe_truth = x_probe.rename(rename), probe_truth.rename(rename)
            x_eval, truth = x_eval.rename(rename), truth.rename(rename)
        idx = rng.choice(len(train) - 1, (n_loss_batches, loss_batch_size), replace=False)
        batches = [(train[i], train[i + 1]) for i in idx]
        weight = torch.from_numpy(prep.loss_weight)

        def loss_fn(model, batch):  # the one-step training loss (tqslite.train)
            x, y = batch
            return ((model(x) - y) ** 2 * weight).mean()

        view, per = (lambda da: da), ("variable" if layout == "grid" else "all")
    else:
        ctx, patch = module.ARCH["context"], module.ARCH["patch"]
        idx = rng.choice(len(train), (n_loss_batches, loss_batch_size), replace=False)
        batches = [(train[i, :ctx], train[i, patch:ctx + patch]) for i in idx]

        def loss_fn(model, batch):  # the series model's training loss: every token's next patch
            x, y = batch
            return ((model.forward_all(x) - y.reshape(len(y), -1, patch)) ** 2).mean()

        def view(da):
            return da.isel(dim_0=slice(-patch, None))

        per = "station"
    refs = {k: _references(layout, module, prep, x, t, view) for k, (x, t) in
            {"probe": (x_probe, probe_truth), "eval": (x_eval, truth)}.items()}
    return Benchmark(name, system, x_probe, probe_truth, refs["probe"], x_eval, truth,
                     refs["eval"], calibration, batches, loss_fn, view, per)


def float_skill(bench: Benchmark, which: str = "eval") -> xr.Dataset:
    """Skill curves of the float model on the evaluation windows (``"eval"``) or the probe states (``"probe"``).

    Returns :func:`tqslite.skill.skill_curves` (``rmse(forecast, lead, target)``, ``mean_rmse``)
    with ``attrs["horizon"]``, the skill horizon of :func:`tqslite.skill.horizon_of`, and
    ``model_mse(window, lead[, variable])``, the float model's own error per window.
    """
    if which == "eval":
        x0, truth, refs = bench.x_eval, bench.truth, bench.eval_references
    elif which == "probe":
        x0, truth, refs = bench.probe_states, bench.probe_truth, bench.probe_references
    else:
        raise ValueError(f"which={which!r}: use 'eval' (evaluation windows) or 'probe' (probe states).")
    fc = bench.view(forecast(bench.system, x0, bench.max_horizon))
    truth = bench.view(truth)
    model = window_mse(fc, truth)
    ref = {str(f): window_mse(refs.sel(forecast=f, drop=True), truth) for f in refs["forecast"].values}
    curves = skill_curves(model, ref, bench.per)
    curves["model_mse"] = model
    curves.attrs = dict(horizon=horizon_of(curves), which=which, model=bench.name,
                        note="RMSE per lead in normalised units; skill horizon = last lead before the float model "
                             "stops beating every reference")
    return curves


__all__ = ["Benchmark", "MAX_HORIZON", "N_EVAL", "N_PROBE", "benchmark", "float_skill", "window_mse"]
