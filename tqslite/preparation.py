"""Preparation: a Dataset checked, split in time, normalised, stacked into states and cut into windows.

What a forecaster's training, the probe and an evaluation need from a Dataset, whichever file it
came from (:mod:`tqslite.data` opens the shipped ones; any ``xarray.Dataset`` of the same layout
works):

* :func:`validate_layout` says which variable or dimension a Dataset lacks.
* :func:`split_time` cuts the time axis into train / validation / test periods, in time order and
  without overlap, by fractions or by dates.
* :func:`normalization_stats` computes mean and standard deviation per variable on the
  **training period only** (pass the training split); :func:`normalize` and :func:`denormalize`
  apply them.
* :func:`stack_grid` turns gridded variables into a state array ``(time, channel, lat, lon)``;
  :func:`stack_series` turns station records into ``(time, station)``; :func:`lat_weights` weighs
  latitudes by area.
* :func:`time_windows`, :func:`series_windows` and :func:`initial_states` cut windows of
  consecutive steps (evenly spaced or seeded random) for training, probes and evaluation.
* :func:`annual_cycle_fit` and :func:`annual_cycle`: the smooth mean annual cycle of station
  records, the "no skill" reference forecast.

Layouts. *Grid*: dims ``time``, ``lat``, ``lon`` (any latitude order), one variable per field.
*Stations*: dims ``time`` and ``station``. *Series*: dim ``time`` only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
import xarray as xr

# --------------------------------------------------------------------------------------------
# Layout checks and splits
# --------------------------------------------------------------------------------------------

def validate_layout(ds: xr.Dataset, variables: Iterable[str] = (), dims: Iterable[str] = ("time",)) -> xr.Dataset:
    """Check that ``ds`` has the ``variables`` and ``dims`` asked for; return it unchanged.

    Raises
    ------
    ValueError
        Naming every missing variable and dimension, and what the Dataset has instead.
    """
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"expected an xarray.Dataset, got {type(ds).__name__}.")
    missing_vars = [v for v in variables if v not in ds.data_vars]
    missing_dims = [d for d in dims if d not in ds.dims]
    if missing_vars or missing_dims:
        parts = []
        if missing_vars:
            parts.append(f"variable(s) {missing_vars} missing (it has {sorted(ds.data_vars)})")
        if missing_dims:
            parts.append(f"dimension(s) {missing_dims} missing (it has {sorted(ds.dims)})")
        raise ValueError("the Dataset does not have the expected layout: " + "; ".join(parts) + ".")
    for v in variables:
        absent = [d for d in dims if d not in ds[v].dims]
        if absent:
            raise ValueError(f"variable {v!r} lacks dimension(s) {absent}: its dims are {ds[v].dims}.")
    return ds


class Splits(NamedTuple):
    """Three consecutive, non-overlapping periods of one Dataset, in time order."""

    train: xr.Dataset
    validation: xr.Dataset
    test: xr.Dataset


def split_time(ds: xr.Dataset, fractions: Sequence[float] = (0.7, 0.15, 0.15), dates=None,
               gap: int = 0) -> Splits:
    """Cut ``ds`` along ``time`` into train, validation and test periods.

    Parameters
    ----------
    ds : xarray.Dataset
        With a ``time`` dimension in increasing order.
    fractions : three floats
        Shares of the time steps for train, validation and test (they must sum to at most 1;
        whatever is left at the end is not used). Ignored when ``dates`` is given.
    dates : (str, str), optional
        The last time stamp of the training period and of the validation period (inclusive),
        e.g. ``("1972-12-31", "1975-12-31")``; the test period is the rest.
    gap : int
        Time steps dropped after the training and after the validation period, so that windows
        cut near a boundary do not see the next period.

    Returns
    -------
    Splits
        ``(train, validation, test)``; each keeps ``time`` in order, and no time stamp is in two.
    """
    validate_layout(ds)
    times = ds["time"].values
    n = len(times)
    if n > 1 and not np.all(times[1:] > times[:-1]):
        raise ValueError("time must be strictly increasing to split by period; sort the Dataset first (ds.sortby('time')).")
    if dates is not None:
        if len(dates) != 2:
            raise ValueError(f"dates={dates!r}: give (end of training, end of validation).")
        ends = [int(np.searchsorted(times, np.datetime64(d), side="right")) for d in dates]
        if ends[1] < ends[0]:
            raise ValueError(f"dates={dates!r}: the validation period must end after the training period.")
        bounds = [(0, ends[0]), (ends[0] + gap, ends[1]), (ends[1] + gap, n)]
    else:
        f = [float(x) for x in fractions]
        if len(f) != 3 or min(f) < 0 or sum(f) > 1 + 1e-9:
            raise ValueError(f"fractions={fractions!r}: give three non-negative shares summing to at most 1.")
        e1, e2, e3 = (int(round(c * n)) for c in np.cumsum(f))
        bounds = [(0, e1), (e1 + gap, e2), (e2 + gap, e3)]
    parts = [ds.isel(time=slice(a, max(a, b))) for a, b in bounds]
    empty = [name for name, p in zip(Splits._fields, parts) if p.sizes["time"] == 0]
    if empty:
        raise ValueError(f"the {' and '.join(empty)} period(s) would be empty ({n} time steps, "
                         f"fractions={fractions}, dates={dates}, gap={gap}).")
    return Splits(*parts)


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------

def normalization_stats(train: xr.Dataset, variables: Iterable[str] | None = None, over=None) -> xr.Dataset:
    """Mean and standard deviation of each variable, computed on the training period you pass.

    Parameters
    ----------
    train : xarray.Dataset
        The **training split** (``split_time(ds).train``): statistics must not see the periods
        that are evaluated.
    variables : list of str, optional
        Which data variables (default all).
    over : str or list of str, optional
        Dimensions to reduce (default: all of each variable's dims, one number per variable).
        ``over="time"`` keeps the other dims, e.g. one mean and std per station.

    Returns
    -------
    xarray.Dataset
        The same variables with a leading dimension ``stat = ["mean", "std"]`` (NaNs skipped);
        ``stats.to_dict()`` / ``xarray.Dataset.from_dict`` round-trip it through JSON.
    """
    variables = list(variables or train.data_vars)
    validate_layout(train, variables)
    over = [over] if isinstance(over, str) else over
    out = {}
    for v in variables:
        da = train[v].astype("float64")
        dims = list(over) if over is not None else list(da.dims)
        mean, std = da.mean(dims, skipna=True), da.std(dims, skipna=True)
        bad = ~(np.isfinite(std) & (std > 0))
        if bool(bad.any()):
            raise ValueError(f"variable {v!r} has zero or undefined spread over {dims} in the training period; "
                             "it cannot be normalised (drop it, or reduce over more dimensions).")
        out[v] = xr.concat([mean, std], dim="stat").drop_vars([c for c in mean.coords if c not in mean.dims])
    return xr.Dataset(out).assign_coords(stat=["mean", "std"])


def normalize(ds: xr.Dataset, stats: xr.Dataset) -> xr.Dataset:
    """``(ds - mean) / std`` for every variable in ``stats`` (others are dropped); float32 kept."""
    validate_layout(ds, list(stats.data_vars))
    out = {v: ((ds[v] - stats[v].sel(stat="mean", drop=True)) / stats[v].sel(stat="std", drop=True)).astype(ds[v].dtype)
           for v in stats.data_vars}
    return xr.Dataset(out, attrs=ds.attrs)


def denormalize(ds: xr.Dataset, stats: xr.Dataset) -> xr.Dataset:
    """Inverse of :func:`normalize`: ``ds * std + mean``, back to physical units."""
    validate_layout(ds, list(stats.data_vars))
    out = {v: (ds[v] * stats[v].sel(stat="std", drop=True) + stats[v].sel(stat="mean", drop=True)).astype(ds[v].dtype)
           for v in stats.data_vars}
    return xr.Dataset(out, attrs=ds.attrs)


def stats_from_dict(d: dict) -> xr.Dataset:
    """Rebuild statistics saved with ``stats.to_dict()`` (for example from a checkpoint's JSON)."""
    return xr.Dataset.from_dict(d)


# --------------------------------------------------------------------------------------------
# State arrays
# --------------------------------------------------------------------------------------------

def stack_grid(ds: xr.Dataset, variables: Sequence[str] | None = None, dtype="float32") -> xr.DataArray:
    """Stack gridded variables into the state array ``(time, channel, lat, lon)``.

    ``channel`` is labelled by the variable names, in the order given (default: the Dataset's).
    """
    variables = list(variables or ds.data_vars)
    validate_layout(ds, variables, ("time", "lat", "lon"))
    da = ds[variables].to_array("channel").transpose("time", "channel", "lat", "lon")
    return da.astype(dtype).rename("state")


def stack_series(ds: xr.Dataset, variable: str, dtype="float32") -> xr.DataArray:
    """One variable of a station Dataset as ``(time, station)`` (a single series gets ``station`` of size 1)."""
    validate_layout(ds, [variable])
    da = ds[variable]
    if "station" not in da.dims:
        da = da.expand_dims(station=[variable])
    return da.transpose("time", "station").astype(dtype)


def lat_weights(lat) -> np.ndarray:
    """Latitude weights ``cos(lat) / mean(cos(lat))`` (mean 1), for area-weighted RMSE.

    ``lat`` in degrees (array or DataArray); returns float64 of the same length.
    """
    w = np.cos(np.deg2rad(np.asarray(lat, dtype=np.float64)))
    return w / w.mean()


# --------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------

def window_starts(n_time: int, length: int, n: int | None = None, method: str = "even", seed: int = 0,
                  stride: int = 1) -> np.ndarray:
    """Start indices of windows of ``length`` consecutive steps inside ``n_time`` steps.

    ``n=None`` gives every start ``0, stride, 2 stride, ...``; otherwise ``n`` starts, evenly
    spaced over the whole period (``method="even"``, first and last possible start included)
    or drawn without replacement by a generator seeded with ``seed`` (``"random"``), sorted.
    """
    last = n_time - length
    if length < 1 or last < 0:
        raise ValueError(f"a window of {length} steps does not fit in {n_time} time steps.")
    if n is None:
        return np.arange(0, last + 1, stride)
    if n < 1 or n > last + 1:
        raise ValueError(f"n={n} windows of {length} steps: between 1 and {last + 1} fit in {n_time} steps.")
    if method == "even":
        starts = np.unique(np.round(np.linspace(0, last, n)).astype(np.int64))
        if len(starts) < n:  # only when n is close to last + 1
            starts = np.arange(n)
        return starts
    if method == "random":
        return np.sort(np.random.default_rng(seed).choice(last + 1, size=n, replace=False))
    raise ValueError(f"method={method!r}: use 'even' or 'random'.")


def time_windows(state: xr.DataArray, length: int, n: int | None = None, method: str = "even", seed: int = 0,
                 stride: int = 1) -> xr.DataArray:
    """Cut ``state`` ``(time, *S)`` into windows ``(window, step, *S)`` of ``length`` consecutive steps.

    For an evaluation with ``horizon`` leads, use ``length = 1 + horizon``: ``w[:, 0]`` are the
    initial states and ``w[:, 1:]`` the truth at leads ``1..horizon``. Coordinates:
    ``start(window)`` (index into ``time``) and ``init_time(window)``.
    """
    starts = window_starts(state.sizes["time"], length, n, method, seed, stride)
    values = state.values
    idx = starts[:, None] + np.arange(length)[None, :]
    other = [d for d in state.dims if d != "time"]
    out = xr.DataArray(values[idx], dims=("window", "step", *other),
                       coords={d: state[d] for d in other if d in state.coords})
    return out.assign_coords(window=np.arange(len(starts)), step=np.arange(length), start=("window", starts),
                             init_time=("window", state["time"].values[starts]))


def initial_states(state: xr.DataArray, n: int, horizon: int = 0, method: str = "even", seed: int = 0) -> xr.DataArray:
    """``n`` initial states ``(window, *S)`` from ``state`` ``(time, *S)`` for probes and evaluation.

    Starts leave room for ``horizon`` further steps of truth; ``start`` and ``init_time`` say
    where each came from. Pass the split the states must come from (e.g. the test period).
    """
    return time_windows(state, 1 + horizon, n, method, seed).isel(step=0, drop=True)


def series_windows(series: xr.DataArray, length: int, n: int | None = None, method: str = "even", seed: int = 0,
                   stride: int = 1) -> xr.DataArray:
    """Windows ``(window, step)`` of ``length`` consecutive values from every station of ``(time, station)``.

    All ``(start, station)`` pairs with no missing value are candidates (``stride`` apart in
    time); ``n=None`` keeps them all, else ``n`` are taken evenly spaced through the list (ordered
    by start, then station) or drawn at random with ``seed``. Coordinates ``station(window)``,
    ``start(window)`` and ``init_time(window)``.
    """
    if series.dims != ("time", "station"):
        raise ValueError(f"series must have dims ('time', 'station'), got {series.dims}; use stack_series first.")
    starts = window_starts(series.sizes["time"], length, None, stride=stride)
    vals = series.values
    idx = starts[:, None] + np.arange(length)[None, :]
    win = vals[idx]                                   # (start, step, station)
    win = np.moveaxis(win, 2, 1).reshape(-1, length)  # (start * station, step)
    st = np.repeat(starts, series.sizes["station"])
    sta = np.tile(np.arange(series.sizes["station"]), len(starts))
    ok = np.isfinite(win).all(axis=1)
    win, st, sta = win[ok], st[ok], sta[ok]
    if n is not None:
        pick = window_starts(len(win), 1, n, method, seed)
        win, st, sta = win[pick], st[pick], sta[pick]
    return xr.DataArray(win, dims=("window", "step"), name=series.name).assign_coords(
        window=np.arange(len(win)), step=np.arange(length), start=("window", st),
        station=("window", series["station"].values[sta]), init_time=("window", series["time"].values[st]))


# --------------------------------------------------------------------------------------------
# Climatologies (the "no skill" reference forecasts)
# --------------------------------------------------------------------------------------------

def _harmonic_terms(time, harmonics: int) -> np.ndarray:
    """Design matrix ``(time, 1 + 2 * harmonics)``: 1, cos and sin of the annual phase and overtones."""
    t = np.asarray(time, dtype="datetime64[ns]")
    years = (t - np.datetime64("2000-01-01")) / np.timedelta64(1, "D") / 365.2425
    cols = [np.ones_like(years)]
    for k in range(1, harmonics + 1):
        cols += [np.cos(2 * np.pi * k * years), np.sin(2 * np.pi * k * years)]
    return np.stack(cols, axis=1)


def annual_cycle_fit(series: xr.DataArray, harmonics: int = 2) -> xr.DataArray:
    """Fit a smooth mean annual cycle to each station of ``series`` ``(time, station)``.

    Least squares on the mean plus ``harmonics`` annual harmonics (NaNs skipped). Pass the
    training period. Returns the coefficients ``(station, term)``; evaluate them with
    :func:`annual_cycle`.
    """
    x = _harmonic_terms(series["time"].values, harmonics)
    coefs = []
    for s in range(series.sizes["station"]):
        y = series.values[:, s].astype(np.float64)
        ok = np.isfinite(y)
        coefs.append(np.linalg.lstsq(x[ok], y[ok], rcond=None)[0])
    return xr.DataArray(np.asarray(coefs), dims=("station", "term"),
                        coords={"station": series["station"].values}, attrs={"harmonics": harmonics})


def annual_cycle(coefs: xr.DataArray, time) -> xr.DataArray:
    """The fitted annual cycle at the given times: ``(time, station)`` float64."""
    x = _harmonic_terms(time, int(coefs.attrs["harmonics"]))
    return xr.DataArray(x @ coefs.values.T, dims=("time", "station"),
                        coords={"time": np.asarray(time, dtype="datetime64[ns]"), "station": coefs["station"].values})
