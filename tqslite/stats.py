"""Uncertainty for probe scores: bootstrap over windows, and Spearman agreement between score sets.

The windows (initial states) of a probe are a sample; resampling them with replacement and
recomputing ``gamma`` gives a confidence interval for each unit's score and for any rank statistic
between two probes run on the same windows (SPEC section 2, "Uncertainty").
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from scipy.stats import rankdata

from .probe import curves_from_divergence


def _resampled_gamma(scores: xr.Dataset, idx: np.ndarray) -> np.ndarray:
    """gamma(T) of every unit for each row of window indices ``idx`` (n_boot, N): (n_boot, unit)."""
    T = scores.sizes["lead"]
    div = scores["divergence"].values[:, :, -1:]  # (unit, window, 1): only lead T matters
    floor = scores["d_floor"].values[:, -1:]
    eps = scores["eps"].values
    out = np.stack([curves_from_divergence(div[:, row], eps, floor[row])[:, 0] / T for row in idx])
    out[:, scores["dead"].values | (eps == 0)] = -np.inf
    return out


def bootstrap_gamma(scores: xr.Dataset, n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> xr.Dataset:
    """Percentile bootstrap interval of ``gamma_u(T)`` over windows.

    Returns a Dataset with ``gamma``, ``gamma_lo`` and ``gamma_hi`` (dim ``unit``) and the
    settings in ``attrs``. ``gamma`` is recomputed from the divergence of the windows present,
    so a subset (``scores.isel(window=...)``) gets its own estimate, not the full sample's.
    """
    n = scores.sizes["window"]
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    boot = _resampled_gamma(scores, idx)
    gamma = _resampled_gamma(scores, np.arange(n)[None, :])[0]  # from the windows present (after any isel)
    alpha = (1 - ci) / 2
    with np.errstate(invalid="ignore"):
        lo, hi = np.quantile(boot, [alpha, 1 - alpha], axis=0)
    return xr.Dataset(
        {"gamma": ("unit", gamma), "gamma_lo": ("unit", lo), "gamma_hi": ("unit", hi)},
        coords={"unit": scores["unit"].values},
        attrs={"n_boot": n_boot, "ci": ci, "seed": seed, "resampled": "windows"},
    )


def spearman(a, b) -> float:
    """Spearman's rank correlation of two equal-length score vectors (ties get average ranks)."""
    ra, rb = rankdata(np.asarray(a, float)), rankdata(np.asarray(b, float))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _scores_of(x) -> xr.DataArray:
    if isinstance(x, xr.Dataset):
        return x["gamma"]
    if isinstance(x, xr.DataArray):
        return x
    raise TypeError("pass probe Datasets or DataArrays with a 'unit' dim.")


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
        Datasets over the same number of windows (windows resampled jointly, both gammas
        recomputed), else ``"units"`` (pairs of scores resampled).
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
    rng = np.random.default_rng(seed)
    paired = (isinstance(a, xr.Dataset) and isinstance(b, xr.Dataset) and "divergence" in a and "divergence" in b
              and a.sizes["window"] == b.sizes["window"])
    if paired:
        n = a.sizes["window"]
        idx = rng.integers(0, n, size=(n_boot, n))
        ga = _resampled_gamma(a.sel(unit=common), idx)
        gb = _resampled_gamma(b.sel(unit=common), idx)
        boot = np.array([spearman(x, y) for x, y in zip(ga, gb)])
    else:
        idx = rng.integers(0, len(common), size=(n_boot, len(common)))
        boot = np.array([spearman(va[i], vb[i]) for i in idx])
    alpha = (1 - ci) / 2
    lo, hi = np.nanquantile(boot, [alpha, 1 - alpha])
    return {"rho": rho, "lo": float(lo), "hi": float(hi), "n_units": len(common),
            "resampled": "windows" if paired else "units"}
