"""One definition of a win, for the whole book: paired bootstrap of an error ratio, counted honestly.

SPEC section 5: method A **wins** a cell (model x budget x variable or station) over method B
when the paired bootstrap interval of the ratio of their errors at the evaluation lead lies
below 1, at matched size; above 1 it is a **loss**, otherwise a **tie**. Here:

* the error of a method in a cell is its RMSE over the cell's evaluation windows,
  ``sqrt(mean_n mse[n])``, and the ratio is ``RMSE_A / RMSE_B`` (below 1: A is better);
* the interval comes from :func:`scipy.stats.bootstrap` with ``paired=True``: the windows are
  resampled with replacement, the *same* windows for A and B, since both forecast from the same
  initial states -- their errors are paired, and resampling them apart would ignore that and
  widen the interval. The percentile interval (``ci`` = 95 % by default) and a two-sided
  p-value are read off the same bootstrap distribution, ``p = 2 min(P*(r >= 1), P*(r <= 1))``
  with the ``(k + 1) / (B + 1)`` convention, so "interval excludes 1" and "p < 1 - ci" agree;
* two identical error arrays give a ratio of exactly 1 in every resample: a tie, ``p = 1``;
* a cell is **unmatched** (not counted) when the two sizes differ by more than ``tolerance``
  (1 %), and **unusable** (not counted, reported apart) when a method's added error exceeds the
  float model's own error there (:func:`tqslite.skill.usable`).

Counts over many cells (:func:`tally`) always say how many comparisons were made, and come with
the counts after Holm's step-down adjustment of the p-values over the family counted
(:func:`holm`), which keeps the chance of even one false win or loss in the family below
``1 - ci``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr
from scipy.stats import bootstrap

from .skill import target_groups

#: Outcomes of a cell. Only the first three are counted as comparisons.
OUTCOMES = ("win", "tie", "loss", "unusable", "unmatched")
#: Largest relative size difference of a matched comparison.
SIZE_TOLERANCE = 0.01


@dataclass(frozen=True)
class Cell:
    """The comparison of A with B in one cell.

    Attributes
    ----------
    ratio : float
        ``RMSE_A / RMSE_B`` over the cell's windows.
    lo, hi : float
        The bootstrap interval of the ratio.
    p : float
        Two-sided bootstrap p-value of "the ratio is 1".
    outcome : str
        ``"win"`` (``hi < 1``), ``"loss"`` (``lo > 1``) or ``"tie"``.
    """

    ratio: float
    lo: float
    hi: float
    p: float
    outcome: str


def _ratio(a, b, axis=-1):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(np.mean(a, axis=axis) / np.mean(b, axis=axis))


def compare(a, b, *, n_resamples: int = 9999, ci: float = 0.95, seed: int = 0) -> Cell:
    """A against B on the same windows: the ratio of RMSEs, its paired bootstrap interval, p and outcome.

    Parameters
    ----------
    a, b : array-like ``(window,)``
        Mean squared errors of A and B per window (the same windows, in the same order).
    n_resamples : int
        Bootstrap resamples.
    ci : float
        Confidence level of the interval.
    seed : int
        Seeds the resampling.
    """
    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"a and b must hold errors of the same windows (at least 2): got {a.shape} and {b.shape}.")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("the errors must be finite; a rollout that blew up is a loss by inspection, not a statistic.")
    ratio = float(_ratio(a, b))
    if np.array_equal(a, b):  # every resample gives exactly 1
        return Cell(1.0, 1.0, 1.0, 1.0, "tie")
    res = bootstrap((a, b), _ratio, paired=True, vectorized=True, n_resamples=n_resamples, confidence_level=ci,
                    method="percentile", rng=np.random.default_rng(seed))
    dist = res.bootstrap_distribution
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    above, below = int((dist >= 1).sum()), int((dist <= 1).sum())
    p = min(1.0, 2 * min(above + 1, below + 1) / (n_resamples + 1))
    outcome = "win" if hi < 1 else "loss" if lo > 1 else "tie"
    return Cell(ratio, lo, hi, p, outcome)


def holm(pvalues, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Holm's step-down procedure: ``(reject, adjusted p-values)`` for a family of p-values.

    Sorted ascending, ``p_(i)`` is rejected when ``p_(j) <= alpha / (m - j + 1)`` for every
    ``j <= i``; the adjusted value is ``max_{j <= i} min(1, (m - j + 1) p_(j))`` (Holm, 1979).
    NaN entries are not part of the family (never rejected; adjusted NaN).
    """
    p = np.asarray(pvalues, float)
    out_adj = np.full(p.shape, np.nan)
    reject = np.zeros(p.shape, bool)
    flat = p.ravel()
    idx = np.flatnonzero(np.isfinite(flat))
    m = len(idx)
    if m == 0:
        return reject, out_adj
    order = idx[np.argsort(flat[idx], kind="stable")]
    adj = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * flat[order]))
    out_flat, rej_flat = out_adj.ravel(), reject.ravel()
    out_flat[order] = adj
    rej_flat[order] = adj <= alpha
    return rej_flat.reshape(p.shape), out_flat.reshape(p.shape)


def win_table(mse_a: xr.DataArray, mse_b: xr.DataArray, per: str = "variable", *, size_a=None, size_b=None,
              usable=None, tolerance: float = SIZE_TOLERANCE, n_resamples: int = 9999, ci: float = 0.95,
              seed: int = 0) -> xr.Dataset:
    """A against B in every cell: the ratio, its interval, p and the outcome.

    Parameters
    ----------
    mse_a, mse_b : DataArray ``(window, ...)``
        Mean squared errors per window at the evaluation lead, on the same windows; any other
        dims (``budget``, ``variable``, ``pair``, ...) are cells. With ``per="station"`` the
        windows of each station (a coordinate along ``window``) form a cell of their own.
    per : str
        ``"variable"``, ``"station"`` or ``"all"`` (:func:`tqslite.skill.target_groups`).
    size_a, size_b : DataArray or float, optional
        Stored bits per parameter of A and B (broadcast against the cells): cells whose sizes
        differ by more than ``tolerance`` are ``"unmatched"``.
    usable : DataArray of bool, optional
        Cells to count (broadcast against the cells, the target dim included): elsewhere the
        outcome is ``"unusable"`` (ratio and interval are still computed).
    n_resamples, ci, seed
        See :func:`compare`.

    Returns
    -------
    xarray.Dataset
        Dims: the cell dims of the inputs, then the target (``variable``, ``station`` or
        ``target``). ``ratio``, ``lo``, ``hi``, ``p`` and ``outcome`` (:data:`OUTCOMES`);
        ``attrs`` keep the settings.
    """
    mse_a, mse_b = xr.broadcast(mse_a, mse_b)
    if per == "variable" and "variable" in mse_a.dims:
        mse_a, mse_b = mse_a.rename(variable="_target"), mse_b.rename(variable="_target")
    groups = target_groups(mse_a, per if per == "station" else "all")
    dim = per if per in ("variable", "station") else "target"
    cells = [d for d in mse_a.dims if d != "window"]
    a = mse_a.transpose(*cells, "window")
    b = mse_b.transpose(*cells, "window")
    shape = tuple(a.sizes[d] for d in cells)
    has_target = "_target" in cells
    out_dims = [d for d in cells if d != "_target"] + [dim]
    n_groups = len(groups)
    fields = {k: np.full(shape + (n_groups,), np.nan) for k in ("ratio", "lo", "hi", "p")}
    outcome = np.full(shape + (n_groups,), "tie", dtype=object)
    for pos in np.ndindex(*shape):
        for g, (_, idx) in enumerate(groups):
            cell = compare(a.values[pos][idx], b.values[pos][idx], n_resamples=n_resamples, ci=ci, seed=seed)
            for k in fields:
                fields[k][pos + (g,)] = getattr(cell, k)
            outcome[pos + (g,)] = cell.outcome
    coords = {d: a[d].values for d in cells if d in a.coords}
    if has_target:  # the target dim is the variable dim; no station groups
        move = cells.index("_target")
        fields = {k: v[..., 0] for k, v in fields.items()}
        outcome = outcome[..., 0]
        fields = {k: np.moveaxis(v, move, -1) for k, v in fields.items()}
        outcome = np.moveaxis(outcome, move, -1)
        coords[dim] = coords.pop("_target")
    else:
        coords[dim] = [t for t, _ in groups]
    ds = xr.Dataset({k: (out_dims, v) for k, v in fields.items()} | {"outcome": (out_dims, outcome)},
                    coords={k: v for k, v in coords.items()})
    if size_a is not None and size_b is not None:
        matched = abs(xr.DataArray(size_a) / xr.DataArray(size_b) - 1) <= tolerance
        ds["outcome"] = ds["outcome"].where(matched.broadcast_like(ds["ratio"]), "unmatched")
    if usable is not None:
        ok = xr.DataArray(usable).astype(bool).broadcast_like(ds["ratio"])
        ds["outcome"] = ds["outcome"].where(ok | (ds["outcome"] == "unmatched"), "unusable")
    ds["ratio"].attrs["long_name"] = "RMSE of A / RMSE of B (below 1: A is better)"
    ds["p"].attrs["long_name"] = "two-sided paired bootstrap p-value of ratio = 1"
    ds.attrs = dict(n_resamples=n_resamples, ci=ci, seed=seed, tolerance=tolerance, per=per,
                    statistic="sqrt(mean mse_A / mean mse_B) over the cell's windows",
                    interval="percentile, scipy.stats.bootstrap(paired=True)")
    return ds.transpose(*out_dims)


def tally(table: xr.Dataset, by=(), alpha: float | None = None) -> xr.Dataset:
    """Counts of outcomes over the cells of a :func:`win_table`, grouped by the dims ``by``.

    Returns a Dataset (dims ``by``) with ``n`` (comparisons counted: wins + ties + losses),
    ``win``, ``tie``, ``loss``, ``unusable``, ``unmatched``, and ``holm_win``/``holm_loss``:
    wins and losses that remain after Holm's adjustment (:func:`holm`) over the ``n`` counted
    cells of each group, at ``alpha`` (default ``1 - ci`` of the table).
    """
    by = [by] if isinstance(by, str) else list(by)
    alpha = round(1 - float(table.attrs.get("ci", 0.95)), 12) if alpha is None else alpha
    rest = [d for d in table["outcome"].dims if d not in by]
    stacked = table.stack(_cell=rest) if rest else table.expand_dims(_cell=[0])
    out = {k: (stacked["outcome"] == k).sum("_cell") for k in OUTCOMES}
    counted = stacked["outcome"].isin(["win", "tie", "loss"])
    p = stacked["p"].where(counted)
    groups = [()] if not by else list(np.ndindex(*(table.sizes[d] for d in by)))
    hw, hl = np.zeros(len(groups), int), np.zeros(len(groups), int)
    for k, pos in enumerate(groups):
        sel = dict(zip(by, pos))
        reject, _ = holm(p.isel(sel).values, alpha)
        ratio = stacked["ratio"].isel(sel).values
        hw[k], hl[k] = int((reject & (ratio < 1)).sum()), int((reject & (ratio > 1)).sum())
    shape = tuple(table.sizes[d] for d in by)
    ds = xr.Dataset({k: v.astype(int) for k, v in out.items()})
    ds["n"] = ds["win"] + ds["tie"] + ds["loss"]
    ds["holm_win"] = (by, hw.reshape(shape))
    ds["holm_loss"] = (by, hl.reshape(shape))
    ds.attrs = dict(alpha=alpha, family="the counted cells of each group")
    return ds


def describe(counts: xr.Dataset) -> str:
    """One line for a single group of :func:`tally`: ``"12 wins, 3 ties, 1 loss of 16 comparisons (Holm: ...)"``."""
    c = {k: int(counts[k]) for k in ("n", "win", "tie", "loss", "holm_win", "holm_loss", "unusable", "unmatched")}

    def n(k, word, plural):
        return f"{c[k]} {word if c[k] == 1 else plural}"

    text = (f"{n('win', 'win', 'wins')}, {n('tie', 'tie', 'ties')}, {n('loss', 'loss', 'losses')} of "
            f"{n('n', 'comparison', 'comparisons')} (after Holm's adjustment: {n('holm_win', 'win', 'wins')}, "
            f"{n('holm_loss', 'loss', 'losses')})")
    extra = [f"{c[k]} {k}" for k in ("unusable", "unmatched") if c[k]]
    return text + (f"; not counted: {', '.join(extra)}" if extra else "")


def won_tied_lost(counts) -> str:
    """``"W won, T tied, L lost of N"`` from a mapping with ``win``, ``tie`` and ``loss`` counts (``N`` their sum)."""
    w, t, lo = (int(counts[k]) for k in ("win", "tie", "loss"))
    return f"{w} won, {t} tied, {lo} lost of {w + t + lo}"


__all__ = ["Cell", "OUTCOMES", "SIZE_TOLERANCE", "compare", "describe", "holm", "tally", "win_table", "won_tied_lost"]
