"""Uncertainty for probe scores: bootstrap intervals over windows, and Spearman agreement between score sets.

The windows (initial states) of a probe are a sample. ``gamma_u(T)`` is a mean over windows of
``log(max(d, d_floor) / eps_u) / T``, so resampling the windows with replacement gives a
confidence interval for each unit's score, and for any rank statistic between two probes of the
**same** windows, resampled jointly (paired). Both are :func:`scipy.stats.bootstrap` (percentile
intervals); pairing is used only when two score sets were measured on the same initial states
(the probe records a fingerprint of them, ``attrs["windows_sha256"]``), never because two samples
happen to have the same size.
"""

from __future__ import annotations

import warnings

import numpy as np
import xarray as xr
from scipy.stats import DegenerateDataWarning, bootstrap, rankdata, spearmanr


def window_terms(scores: xr.Dataset) -> np.ndarray:
    """``log(max(d, d_floor) / eps) / T`` per unit and window at the last lead: ``(unit, window)``.

    Their mean over windows is ``gamma``; dead units and units without a perturbation are ``-inf``.
    """
    T = scores.sizes["lead"]
    div = scores["divergence"].values[:, :, -1]
    floor = scores["d_floor"].values[:, -1]
    eps = scores["eps"].values
    with np.errstate(divide="ignore"):
        terms = (np.log(np.maximum(div, floor[None, :])) - np.log(eps)[:, None]) / T
    terms[scores["dead"].values | (eps == 0)] = -np.inf
    return terms


def _bootstrap(data, statistic, ci: float, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of :func:`scipy.stats.bootstrap`, leaving out resamples where ``statistic`` is undefined.

    A resample can make a statistic undefined (Spearman's rho of a resample whose scores are all
    tied is NaN); scipy then returns no interval. Those resamples are left out of the percentiles.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateDataWarning)
        res = bootstrap(data, statistic, confidence_level=ci, method="percentile", **kwargs)
    alpha = (1 - ci) / 2
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices give NaN bounds
        lo, hi = np.nanquantile(res.bootstrap_distribution, [alpha, 1 - alpha], axis=-1)
    return lo, hi


def bootstrap_gamma(scores: xr.Dataset, n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> xr.Dataset:
    """Percentile bootstrap interval of ``gamma_u(T)`` over windows (:func:`scipy.stats.bootstrap`).

    Returns a Dataset with ``gamma``, ``gamma_lo`` and ``gamma_hi`` (dim ``unit``) and the
    settings in ``attrs``. ``gamma`` is recomputed from the windows present, so a subset
    (``scores.isel(window=...)``) gets its own estimate, not the full sample's. Dead units keep
    ``-inf`` bounds.
    """
    terms = window_terms(scores)
    gamma = terms.mean(axis=1)
    lo, hi = gamma.copy(), gamma.copy()
    finite = np.isfinite(terms).all(axis=1)
    if finite.any() and terms.shape[1] > 1:
        lo[finite], hi[finite] = _bootstrap((terms[finite],), np.mean, ci, n_resamples=n_boot, axis=-1,
                                            vectorized=True, random_state=np.random.default_rng(seed))
    return xr.Dataset(
        {"gamma": ("unit", gamma), "gamma_lo": ("unit", lo), "gamma_hi": ("unit", hi)},
        coords={"unit": scores["unit"].values},
        attrs={"n_boot": n_boot, "ci": ci, "seed": seed, "resampled": "windows", "method": "percentile"},
    )


def spearman(a, b) -> float:
    """Spearman's rank correlation of two equal-length score vectors (ties get average ranks)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if rankdata(a).std() == 0 or rankdata(b).std() == 0:  # a constant ranking: no correlation (scipy would warn)
        return float("nan")
    return float(spearmanr(a, b).statistic)


def _scores_of(x) -> xr.DataArray:
    if isinstance(x, xr.Dataset):
        return x["gamma"]
    if isinstance(x, xr.DataArray):
        return x
    raise TypeError("pass probe Datasets or DataArrays with a 'unit' dim.")


def same_windows(a, b) -> bool:
    """Whether two probe results were measured on the same initial states (their fingerprints match)."""
    fa = getattr(a, "attrs", {}).get("windows_sha256")
    return (isinstance(a, xr.Dataset) and isinstance(b, xr.Dataset) and "divergence" in a and "divergence" in b
            and fa is not None and fa == b.attrs.get("windows_sha256"))


def spearman_agreement(a, b, n_boot: int = 1000, ci: float = 0.95, seed: int = 0,
                       drop_dead: bool = True) -> dict:
    """Spearman rho between two score sets, with a percentile bootstrap interval.

    Parameters
    ----------
    a, b : xarray.Dataset or DataArray
        Probe results (or score arrays with dim ``unit``); compared on their common units.
    n_boot, ci, seed
        Bootstrap replicates, interval coverage and its seed.
    drop_dead : bool
        Leave out units that are dead (or non-finite) in either set, so that a block of tied
        ``-inf`` scores does not inflate the agreement.

    Returns
    -------
    dict
        ``rho``, ``lo``, ``hi``, ``n_units`` and ``resampled``: ``"windows"`` when both are probe
        Datasets of the same initial states (:func:`same_windows`: the windows are resampled
        jointly and both gammas recomputed from them, a paired bootstrap), else ``"units"`` (the
        pairs of scores are resampled).
    """
    sa, sb = _scores_of(a), _scores_of(b)
    common = [u for u in sa["unit"].values if u in set(sb["unit"].values)]
    if drop_dead:
        finite = np.isfinite(sa.sel(unit=common).values) & np.isfinite(sb.sel(unit=common).values)
        common = [u for u, keep in zip(common, finite) if keep]
    if len(common) < 3:
        raise ValueError(f"only {len(common)} unit(s) in common with finite scores: need at least 3 to rank.")
    va, vb = sa.sel(unit=common).values, sb.sel(unit=common).values
    rho = spearman(va, vb)
    paired = same_windows(a, b)
    if paired:  # resample windows: both gammas are means over the same windows
        data = (window_terms(a.sel(unit=common)), window_terms(b.sel(unit=common)))

        def statistic(ta, tb, axis=-1):  # (unit, *resamples, window) -> rho per resample
            # Spearman's rho as the Pearson correlation of ranks, for every resample at once
            # (scipy.stats.spearmanr would correlate every column with every other)
            ra, rb = rankdata(ta.mean(axis=axis), axis=0), rankdata(tb.mean(axis=axis), axis=0)
            ra, rb = ra - ra.mean(axis=0), rb - rb.mean(axis=0)
            return (ra * rb).sum(axis=0) / np.sqrt((ra**2).sum(axis=0) * (rb**2).sum(axis=0))

        lo, hi = _bootstrap(data, statistic, ci, n_resamples=n_boot, axis=1, paired=True, vectorized=True,
                            random_state=np.random.default_rng(seed))
    else:  # resample units: the pairs (score in a, score in b)
        lo, hi = _bootstrap((va, vb), spearman, ci, n_resamples=n_boot, paired=True, vectorized=False,
                            random_state=np.random.default_rng(seed))
    return {"rho": rho, "lo": float(lo), "hi": float(hi), "n_units": len(common),
            "resampled": "windows" if paired else "units"}
