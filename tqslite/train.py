"""Training: regenerate the shipped checkpoints from the shipped data, seeded and deterministic.

Command line (from the repository root)::

    python -m tqslite.train pangu_lite      # or aurora_lite, timesfm_lite
    python -m tqslite.train all

For model ``NAME`` this writes, each file atomically (a temporary file renamed over the old
one, so an interrupted run never leaves half a checkpoint over a good one), and then updates
``data/checkpoints/SHA256SUMS``:

* ``data/checkpoints/NAME.pt`` -- the ``state_dict``;
* ``data/checkpoints/NAME.json`` -- metadata: data file and its SHA-256, splits, normalisation
  statistics, architecture and training hyper-parameters, seed, torch version, threads,
  training time, the training loss curve, and the skill on validation and held-out data;
* ``data/checkpoints/pangu_lite.onnx`` -- for ``pangu_lite``, its ONNX export
  (:func:`tqslite.onnx_system.export_onnx`).

**Data.** The grid models train on the main Held--Suarez run (``held_suarez``: first 80 % of
the steps; the next 10 % validate; the last 10 % are not used) and are scored on the independent
held-out run (``held_suarez_heldout``). ``timesfm_lite`` trains on the Irish wind records of
1961--1972, validates on 1973--1975 and is scored on 1976--1978. Normalisation statistics come
from the training period only.

**Loss.** Grid models: mean squared error of the predicted state, weighted by ``cos(lat)`` and
divided per channel by the variance of the 6-hour change (so every variable counts by how
predictable its change is); one-step at first, then the loss of 2- and 4-step rollouts (averaged
over the steps), which keeps long rollouts stable (``rollout_schedule`` in ``TRAIN``).
Series model: mean squared error of every token's next-patch prediction.

**Skill.** Root-mean-square error per lead time of the model, of persistence (the initial state
held fixed) and of climatology (the training-period mean state for the grids; a fitted mean
annual cycle per station for the series). Grids: latitude-weighted RMSE (weights ``cos(lat)``),
in normalised units averaged over variables and per variable in physical units; series: plain
RMSE over the values of each predicted patch (normalised, and in knots).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from . import data as D
from .models import CHECKPOINT_DIR, MODELS, module_of, wrap
from .models.layers import count_parameters
from .systems import rollout

#: Grid models: shares of the main run's steps for train / validation / test.
GRID_SPLIT = (0.8, 0.1, 0.1)
#: The held-out dataset of each training dataset.
HELDOUT = {"held_suarez": "held_suarez_heldout"}
#: Series model: last day of the training period and of the validation period.
SERIES_DATES = ("1972-12-31", "1975-12-31")
#: Skill evaluation: windows, horizon (model steps) and the leads written to the JSON.
GRID_EVAL = dict(n_windows=32, horizon=40, leads=(1, 2, 4, 8, 12, 20, 28, 40))
SERIES_EVAL = dict(n_windows=1200, horizon=8, leads=(1, 2, 3, 4, 5, 6, 7, 8))
#: Per-step losses kept in the JSON for the reproducibility check.
FIRST_STEPS = 50


# --------------------------------------------------------------------------------------------
# Data preparation
# --------------------------------------------------------------------------------------------

@dataclass
class Prepared:
    """Everything training and evaluation need for one model, in normalised units.

    ``train`` is a float32 array: states ``(T, C, H, W)`` for the grids, windows
    ``(n, L + P)`` for the series. ``validation`` and ``heldout`` are DataArrays of the same
    layout as what :func:`evaluate` takes. ``info`` is what goes into the JSON.
    """

    name: str
    train: np.ndarray
    validation: xr.DataArray
    heldout: xr.DataArray
    stats: xr.Dataset
    info: dict
    loss_weight: np.ndarray | None = None   # grids: (C, H, 1) = cos-lat weight / tendency variance
    climatology: object = None              # grids: (C, H, W) array; series: annual-cycle coefficients
    extra: dict = field(default_factory=dict)


def prepare(name: str, data_dir=None) -> Prepared:
    """Load, split and normalise the data of model ``name`` (statistics from training only)."""
    module = module_of(name)
    return _prepare_grid(module, data_dir) if module.LAYOUT == "grid" else _prepare_series(module, data_dir)


def _period(split: xr.Dataset) -> list[str]:
    return [str(split["time"].values[0])[:19], str(split["time"].values[-1])[:19]]


def _prepare_grid(module, data_dir) -> Prepared:
    ds = D.load_dataset(module.DATASET, data_dir)
    splits = D.split_time(ds, GRID_SPLIT)
    stats = D.normalization_stats(splits.train, module.VARIABLES)

    def state(d):
        return D.stack_grid(D.normalize(d, stats), module.VARIABLES)

    train = state(splits.train)
    lat = ds["lat"].values
    w = D.lat_weights(lat)
    tend = np.diff(train.values, axis=0)
    tend_var = (tend**2 * w[None, None, :, None]).mean(axis=(0, 2, 3))          # (C,)
    held = D.load_dataset(HELDOUT[module.DATASET], data_dir)
    info = dict(
        dataset=module.DATASET, file=D.DATASETS[module.DATASET].file, sha256=ds.attrs["sha256"],
        heldout_dataset=HELDOUT[module.DATASET], heldout_file=D.DATASETS[HELDOUT[module.DATASET]].file,
        heldout_sha256=held.attrs["sha256"], variables=list(module.VARIABLES), lat=[float(x) for x in lat],
        lon=[float(x) for x in ds["lon"].values], step_hours=6, split_fractions=list(GRID_SPLIT),
        periods=dict(zip(D.Splits._fields, (_period(s) for s in splits))),
        tendency_rms=[float(x) for x in np.sqrt(tend_var)],
        units={v: ds[v].attrs.get("units", "") for v in module.VARIABLES},
    )
    return Prepared(module.NAME, np.ascontiguousarray(train.values), state(splits.validation), state(held), stats,
                    info, loss_weight=(w[None, :, None] / tend_var[:, None, None]).astype(np.float32),
                    climatology=train.mean("time").values)


def _prepare_series(module, data_dir) -> Prepared:
    arch = module.ARCH
    var = module.VARIABLES[0]
    ds = D.load_dataset(module.DATASET, data_dir)
    splits = D.split_time(ds, dates=SERIES_DATES)
    stats = D.normalization_stats(splits.train, [var], over="time")

    def series(d):
        return D.stack_series(D.normalize(d, stats), var)

    train = D.series_windows(series(splits.train), arch["context"] + arch["patch"])
    info = dict(
        dataset=module.DATASET, file=D.DATASETS[module.DATASET].file, sha256=ds.attrs["sha256"], variables=[var],
        stations=[str(s) for s in ds["station"].values], step_days=arch["patch"], split_dates=list(SERIES_DATES),
        periods=dict(zip(D.Splits._fields, (_period(s) for s in splits))), units={var: ds[var].attrs.get("units", "")},
    )
    return Prepared(module.NAME, np.ascontiguousarray(train.values), series(splits.validation), series(splits.test),
                    stats, info, climatology=D.annual_cycle_fit(series(splits.train)))


#: The periods a model's states can be drawn from (see :func:`probe_states`).
SPLITS = ("train", "validation", "heldout")


def probe_states(name: str, split: str = "validation", n: int = 16, horizon: int = 0, seed: int = 0,
                 prep: Prepared | None = None) -> xr.DataArray:
    """``n`` normalised initial states of model ``name`` from one period, for a probe.

    ``split`` is ``"train"``, ``"validation"`` (the default: what probes and allocation use) or
    ``"heldout"`` (what the evaluation uses). States are evenly spaced, leaving room for
    ``horizon`` further steps. Grids: ``(window, channel, lat, lon)``; series: context windows
    ``(window, dim_0)`` with a ``station(window)`` coordinate (none for ``"train"``, whose windows
    are stored without it). ``prep`` saves reloading the data (:func:`prepare`).
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use one of {SPLITS}.")
    prep = prep or prepare(name)
    module = module_of(name)
    if module.LAYOUT == "grid":
        if split == "train":
            ref = prep.validation
            states = xr.DataArray(prep.train, dims=ref.dims, coords={"time": np.arange(len(prep.train)),
                                  **{d: ref[d] for d in ref.dims[1:]}})
        else:
            states = getattr(prep, split)
        return D.initial_states(states, n, horizon, seed=seed)
    ctx, patch = module.ARCH["context"], module.ARCH["patch"]
    if split == "train":
        rows = D.window_starts(len(prep.train), 1, n, "even", seed)
        return xr.DataArray(prep.train[rows, :ctx], dims=("window", "dim_0"))
    win = D.series_windows(getattr(prep, split), ctx + horizon * patch, n, "even", seed)
    return win.isel(step=slice(0, ctx)).rename(step="dim_0").drop_vars("dim_0", errors="ignore")


def calibration_states(name: str, n: int = 32, seed: int = 0, prep: Prepared | None = None) -> torch.Tensor:
    """``n`` training states of model ``name`` as its module takes them: GPTQ's calibration data.

    Grids: states ``(n, C, lat, lon)`` drawn without replacement from the training period;
    series: context windows ``(n, L)``. Sorted in time; seeded.
    """
    prep = prep or prepare(name)
    module = module_of(name)
    rng = np.random.default_rng(seed)
    train = torch.from_numpy(prep.train)
    if module.LAYOUT == "grid":
        return train[np.sort(rng.choice(len(train) - 1, n, replace=False))]
    return train[np.sort(rng.choice(len(train), n, replace=False)), :module.ARCH["context"]]


def heldout_windows(name: str, n: int, horizon: int, seed: int = 0, prep: Prepared | None = None):
    """``n`` initial states of model ``name`` from its held-out data, and the truth that follows.

    Returns ``(x0, truth)``: ``x0`` a DataArray ``(window, *S)`` (normalised), ``truth`` a
    DataArray ``(window, lead, *S)`` for leads ``1..horizon`` (for the series model, the context
    windows that the true values would make; score their newest patch).
    """
    prep = prep or prepare(name)
    module = module_of(name)
    if module.LAYOUT == "grid":
        win = D.time_windows(prep.heldout, 1 + horizon, n, "even", seed)
        x0 = win.isel(step=0, drop=True)
        truth = win.isel(step=slice(1, None)).rename(step="lead").assign_coords(lead=np.arange(1, horizon + 1))
        return x0, truth.transpose("window", "lead", ...)
    ctx, p = module.ARCH["context"], module.ARCH["patch"]
    win = D.series_windows(prep.heldout, ctx + horizon * p, n, "even", seed)
    x0 = win.isel(step=slice(0, ctx)).rename(step="dim_0").drop_vars("dim_0", errors="ignore")
    truth = xr.concat([win.isel(step=slice((t + 1) * p, ctx + (t + 1) * p)).rename(step="dim_0")
                       .drop_vars("dim_0", errors="ignore") for t in range(horizon)], dim="lead")
    return x0, truth.assign_coords(lead=np.arange(1, horizon + 1)).transpose("window", "lead", ...)


# --------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------

def _lr(step: int, cfg: dict) -> float:
    """Linear warm-up, then cosine decay to 5 % of the peak learning rate."""
    if step < cfg["warmup"]:
        return cfg["lr"] * (step + 1) / cfg["warmup"]
    frac = (step - cfg["warmup"]) / max(1, cfg["steps"] - cfg["warmup"])
    return cfg["lr"] * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


def rollout_length(step: int, cfg: dict) -> int:
    """Steps unrolled in the loss at training step ``step``: from ``cfg["rollout_schedule"]``,
    a list of ``(fraction of the run, steps)`` pairs, the last pair whose fraction is reached."""
    k = 1
    for frac, steps in cfg["rollout_schedule"]:
        if step >= frac * cfg["steps"]:
            k = int(steps)
    return k


def _grid_loss(model, prep: Prepared, rng: np.random.Generator, cfg: dict, step: int) -> torch.Tensor:
    k = rollout_length(step, cfg)
    idx = rng.integers(0, len(prep.train) - k, size=cfg["batch_size"])
    x = torch.from_numpy(prep.train[idx])
    weight = torch.from_numpy(prep.loss_weight)
    loss = 0.0
    for j in range(1, k + 1):
        x = model(x)
        loss = loss + ((x - torch.from_numpy(prep.train[idx + j])) ** 2 * weight).mean() / k
    return loss


def _series_loss(model, prep: Prepared, rng: np.random.Generator, cfg: dict, step: int) -> torch.Tensor:
    idx = rng.integers(0, len(prep.train), size=cfg["batch_size"])
    w = torch.from_numpy(prep.train[idx])
    ctx, p = model.context, model.patch
    target = w[:, p:ctx + p].reshape(-1, model.n_tokens, p)
    return ((model.forward_all(w[:, :ctx]) - target) ** 2).mean()


def fit(name: str, prep: Prepared, train_cfg: dict | None = None, stop_after: int | None = None,
        progress: bool = True):
    """Build model ``name`` from its seed and train it; return ``(model, record)``.

    Parameters
    ----------
    name : str
        A key of :data:`tqslite.models.MODELS`.
    prep : Prepared
        From :func:`prepare`.
    train_cfg : dict, optional
        Overrides of the module's ``TRAIN`` hyper-parameters.
    stop_after : int, optional
        Stop after this many steps, with the learning-rate schedule of the full run (so the
        first steps are those of a full run: the reproducibility check uses this).
    progress : bool
        Print the loss every ``log_every`` steps.

    Returns
    -------
    nn.Module
        The trained model, in eval mode.
    dict
        ``loss_first_steps`` (per-step losses of the first :data:`FIRST_STEPS` steps),
        ``loss_curve`` (``step`` and mean ``loss`` over each ``log_every`` steps),
        ``training_seconds`` and ``steps_run``.
    """
    module = module_of(name)
    cfg = {**module.TRAIN, **(train_cfg or {})}
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(int(cfg["threads"]))
    torch.use_deterministic_algorithms(True)
    try:
        return _train_loop(name, module, prep, cfg, stop_after, progress)
    finally:  # give the caller back its own settings
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train_loop(name, module, prep, cfg, stop_after, progress):
    torch.manual_seed(cfg["seed"])
    rng = np.random.default_rng(cfg["seed"])
    model = module.build(module.ARCH, **({"lat": prep.info["lat"]} if name == "aurora_lite" else {}))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    loss_fn = _grid_loss if module.LAYOUT == "grid" else _series_loss
    steps = cfg["steps"] if stop_after is None else min(stop_after, cfg["steps"])
    first, curve_steps, curve, window = [], [], [], []
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg)
        loss = loss_fn(model, prep, rng, cfg, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = loss.item()
        if not math.isfinite(value):
            raise RuntimeError(f"{name}: the training loss became {value} at step {step}; lower the learning rate.")
        if step < FIRST_STEPS:
            first.append(value)
        window.append(value)
        if len(window) == cfg["log_every"] or step == steps - 1:
            curve_steps.append(step + 1)
            curve.append(float(np.mean(window)))
            window = []
            if progress:
                print(f"  {name} step {step + 1:5d}/{steps}  loss {curve[-1]:.5f}  "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()
    return model, dict(loss_first_steps=first, loss_curve=dict(every=cfg["log_every"], step=curve_steps, loss=curve),
                       training_seconds=round(time.perf_counter() - t0, 1), steps_run=steps, config=cfg)


# --------------------------------------------------------------------------------------------
# Skill
# --------------------------------------------------------------------------------------------

def evaluate(name: str, system, states: xr.DataArray, prep_or_meta, n_windows: int, horizon: int,
             climatology=None, max_lead: int | None = None) -> xr.Dataset:
    """RMSE per lead of the model, persistence and (optionally) climatology on ``states``.

    Parameters
    ----------
    name : str
        The model's name (its layout decides the metric).
    system
        The model as a system (:func:`tqslite.models.load` or :func:`tqslite.models.wrap`).
    states : xarray.DataArray
        Normalised truth: ``(time, channel, lat, lon)`` for the grids, ``(time, station)`` for
        the series.
    prep_or_meta : Prepared or dict
        Where the normalisation statistics and, for the grids, latitudes come from (a
        :class:`Prepared` or a checkpoint's JSON metadata).
    n_windows : int
        Initial states, evenly spaced through ``states``.
    horizon : int
        Model steps rolled out (6 hours each for the grids, one patch for the series).
    climatology : optional
        Grids: the mean state ``(C, H, W)``; series: coefficients from
        :func:`tqslite.data.annual_cycle_fit`. Without it only model and persistence are scored.
    max_lead : int, optional
        Roll out and score only leads ``1..max_lead``, from the same initial states as with the
        full ``horizon`` (the windows are placed for ``horizon``): a quick re-check of the first
        leads of a recorded evaluation.

    Returns
    -------
    xarray.Dataset
        ``rmse(forecast, lead)`` in normalised units (grids: latitude-weighted, averaged over
        variables) and ``rmse_physical(forecast, lead, variable)`` in the variables' units;
        ``forecast`` is ``model``, ``persistence`` and, if given, ``climatology``.
    """
    stats = prep_or_meta.stats if isinstance(prep_or_meta, Prepared) else D.stats_from_dict(prep_or_meta["normalization"])
    run = horizon if max_lead is None else min(int(max_lead), horizon)
    if module_of(name).LAYOUT == "grid":
        return _evaluate_grid(system, states, stats, n_windows, horizon, run, climatology)
    return _evaluate_series(system, states, stats, n_windows, horizon, run, climatology)


def _evaluate_grid(system, states, stats, n_windows, horizon, run, clim) -> xr.Dataset:
    win = D.time_windows(states, 1 + horizon, n_windows).isel(step=slice(0, 1 + run))
    w = torch.from_numpy(D.lat_weights(states["lat"].values)).to(torch.float64)[:, None]
    x0 = torch.from_numpy(win.values[:, 0])
    truth = torch.from_numpy(win.values[:, 1:]).transpose(0, 1)              # (lead, N, C, H, W)
    with system.evaluating():
        pred = rollout(system, x0, run)
    forecasts = {"model": pred, "persistence": x0.expand_as(truth)}
    if clim is not None:
        forecasts["climatology"] = torch.as_tensor(np.asarray(clim, dtype=np.float32)).expand_as(truth)
    std = np.array([float(stats[v].sel(stat="std")) for v in states["channel"].values])
    rmse = {k: ((f.double() - truth.double()) ** 2 * w).mean(dim=(1, 3, 4)).sqrt().numpy()   # (lead, C)
            for k, f in forecasts.items()}
    return _skill_dataset(rmse, std, list(states["channel"].values))


def _evaluate_series(system, series, stats, n_windows, horizon, run, coefs) -> xr.Dataset:
    model = system.module
    ctx, p = model.context, model.patch
    win = D.series_windows(series, ctx + horizon * p, n_windows).isel(step=slice(0, ctx + run * p))
    n = len(win.window)
    x0 = torch.from_numpy(win.values[:, :ctx])
    truth = win.values[:, ctx:].reshape(n, run, p)                              # (N, lead, P)
    with system.evaluating():
        pred = rollout(system, x0, run)[:, :, -p:].numpy().transpose(1, 0, 2)   # (N, lead, P)
    forecasts = {"model": pred, "persistence": np.broadcast_to(win.values[:, ctx - 1, None, None], truth.shape)}
    if coefs is not None:
        # The date of every predicted value: the window's first day plus its offset, daily.
        days = win["init_time"].values[:, None] + np.arange(ctx, ctx + run * p)[None, :] * np.timedelta64(1, "D")
        cyc = D.annual_cycle(coefs, days.ravel()).values.reshape(n, run * p, coefs.sizes["station"])
        column = {s: i for i, s in enumerate(coefs["station"].values)}
        idx = np.array([column[s] for s in win["station"].values])
        forecasts["climatology"] = cyc[np.arange(n), :, idx].reshape(truth.shape)
    var = list(stats.data_vars)[0]
    std = stats[var].sel(stat="std").sel(station=win["station"].values).values[:, None, None]   # (N, 1, 1)
    rmse, phys = {}, {}
    for k, f in forecasts.items():
        err = np.asarray(f, dtype=np.float64) - truth
        rmse[k] = np.sqrt((err**2).mean(axis=(0, 2)))[:, None]                  # (lead, 1)
        phys[k] = np.sqrt(((err * std) ** 2).mean(axis=(0, 2)))[:, None]
    return _skill_dataset(rmse, None, [var], phys)


def _skill_dataset(rmse: dict, std, variables, phys=None) -> xr.Dataset:
    names = list(rmse)
    norm = np.stack([rmse[k] for k in names])                                     # (forecast, lead, var)
    physical = norm * std[None, None, :] if phys is None else np.stack([phys[k] for k in names])
    lead = np.arange(1, norm.shape[1] + 1)
    return xr.Dataset(
        {"rmse": (("forecast", "lead"), norm.mean(axis=2), {"long_name": "RMSE, normalised units, mean over variables"}),
         "rmse_physical": (("forecast", "lead", "variable"), physical, {"long_name": "RMSE in physical units"})},
        coords={"forecast": names, "lead": lead, "variable": variables})


def _skill_json(skill: xr.Dataset, leads, extra: dict) -> dict:
    leads = [int(x) for x in leads if x <= skill.sizes["lead"]]
    sel = skill.sel(lead=leads)
    out = dict(extra, leads=leads,
               rmse_normalised={f: [round(float(v), 6) for v in sel["rmse"].sel(forecast=f).values]
                                for f in sel["forecast"].values},
               rmse_physical={str(v): {f: [round(float(x), 6) for x in sel["rmse_physical"].sel(forecast=f, variable=v).values]
                                       for f in sel["forecast"].values} for v in sel["variable"].values})
    out["beats_persistence_at_lead_1"] = bool(skill["rmse"].sel(lead=1, forecast="model")
                                              < skill["rmse"].sel(lead=1, forecast="persistence"))
    return out


def skill_report(name: str, system, prep: Prepared, which: str = "heldout") -> dict:
    """Score ``system`` on the validation or held-out period with the settings of the JSON."""
    grid = module_of(name).LAYOUT == "grid"
    cfg = GRID_EVAL if grid else SERIES_EVAL
    states = prep.heldout if which == "heldout" else prep.validation
    skill = evaluate(name, system, states, prep, cfg["n_windows"], cfg["horizon"], prep.climatology)
    period = [str(states["time"].values[0])[:10], str(states["time"].values[-1])[:10]]
    lead = "6 hours (one model step)" if grid else f"{prep.info['step_days']} days (one predicted patch)"
    metric = ("latitude-weighted RMSE (weights cos(lat))" if grid else "RMSE over the values of each patch")
    return _skill_json(skill, cfg["leads"], dict(period=period, n_windows=cfg["n_windows"], horizon=cfg["horizon"],
                                                 lead_unit=lead, metric=metric))


def print_skill(name: str, report: dict, which: str) -> None:
    """Print the normalised RMSE table of a skill report (model x lead)."""
    print(f"  {name} skill on {which} data {report['period']} ({report['n_windows']} windows), "
          "RMSE in normalised units:")
    print("    lead   " + "".join(f"{lead:>9d}" for lead in report["leads"]))
    for f, vals in report["rmse_normalised"].items():
        print(f"    {f:<11s}" + "".join(f"{v:9.4f}" for v in vals))


# --------------------------------------------------------------------------------------------
# Writing the files
# --------------------------------------------------------------------------------------------

def _write_atomic(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` to a temporary file in ``path``'s folder, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; checkpoints are ordinary readable files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def state_dict_bytes(model: torch.nn.Module) -> bytes:
    """``torch.save`` of the model's ``state_dict`` as bytes. Saving to a buffer (not to the
    temporary file) keeps the file name out of the archive, so equal weights give equal files."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


def update_checksums(folder: Path, files) -> None:
    """Set the entries of ``files`` in ``folder/SHA256SUMS`` (other entries kept), atomically."""
    sums_file = folder / "SHA256SUMS"
    sums = D.read_checksums(sums_file) if sums_file.exists() else {}
    for f in files:
        sums[Path(f).name] = D.sha256_file(f)
    text = "".join(f"{sums[k]}  {k}\n" for k in sorted(sums))
    _write_atomic(sums_file, lambda p: p.write_text(text))


def train(name: str, out_dir=None, data_dir=None, train_cfg: dict | None = None, progress: bool = True) -> dict:
    """Train model ``name``, score it, and write its checkpoint files; return the metadata.

    Parameters
    ----------
    name : str
        A key of :data:`tqslite.models.MODELS`.
    out_dir : path-like, optional
        Checkpoint folder (default ``data/checkpoints``).
    data_dir : path-like, optional
        Data folder (default :data:`tqslite.data.DATA_DIR`).
    train_cfg : dict, optional
        Overrides of the module's ``TRAIN`` (e.g. ``{"steps": 50}`` for a quick look).
    progress : bool
        Print the loss curve and the skill tables.
    """
    module = module_of(name)
    out_dir = Path(out_dir or CHECKPOINT_DIR)
    prep = prepare(name, data_dir)
    print(f"{name}: training on {prep.info['file']} ({len(prep.train)} training samples)", flush=True)
    model, record = fit(name, prep, train_cfg, progress=progress)
    system = wrap(name, model)
    skill = {which: skill_report(name, system, prep, which) for which in ("validation", "heldout")}
    if progress:
        for which, rep in skill.items():
            print_skill(name, rep, which)
    cfg = record.pop("config")
    meta = dict(
        name=name, description=(module.__doc__ or "").strip().splitlines()[0].replace("``", ""), architecture=module.ARCH,
        n_parameters=count_parameters(model), training={k: v for k, v in cfg.items() if k != "seed"},
        seed=cfg["seed"], data=prep.info, normalization=prep.stats.to_dict(),
        torch_version=torch.__version__, python_version=platform.python_version(), threads=cfg["threads"],
        **record, skill=skill,
        reproducibility=dict(
            check_steps=30, rtol=1e-4,
            note=("Full retraining takes the training_seconds above; the test suite retrains only the first "
                  "30 steps with the recorded seed (python -m tqslite.train replays the same data order and "
                  "learning-rate schedule) and compares the per-step losses with loss_first_steps at rtol=1e-4. "
                  "Results are bit-identical on the same machine, torch version and thread count."),
        ),
        regenerate=f"python -m tqslite.train {name}",
    )
    files = {out_dir / f"{name}.pt": lambda p: p.write_bytes(state_dict_bytes(model)),
             out_dir / f"{name}.json": lambda p: p.write_text(json.dumps(meta, indent=1) + "\n")}
    if name == "pangu_lite":
        from .onnx_system import export_onnx
        example = torch.from_numpy(prep.heldout.values[:2])
        files[out_dir / f"{name}.onnx"] = lambda p: export_onnx(model, example, p)
    for path, write in files.items():
        _write_atomic(path, write)
    update_checksums(out_dir, list(files))
    print(f"{name}: wrote {', '.join(str(p) for p in files)} ({record['training_seconds']} s of training)", flush=True)
    return meta


def main(argv=None) -> int:
    """Entry point of ``python -m tqslite.train``."""
    parser = argparse.ArgumentParser(prog="python -m tqslite.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=[*MODELS, "all"], help="the model to (re)train, or all of them")
    parser.add_argument("--out", default=None, help="checkpoint folder (default data/checkpoints)")
    parser.add_argument("--steps", type=int, default=None, help="override the number of training steps (quick looks)")
    args = parser.parse_args(argv)
    names = list(MODELS) if args.name == "all" else [args.name]
    for name in names:
        train(name, args.out, train_cfg={"steps": args.steps} if args.steps else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
