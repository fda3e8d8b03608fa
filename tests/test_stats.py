"""Bootstrap intervals and Spearman agreement."""

import numpy as np
import pytest
import scipy.stats
import torch

from tqslite import bootstrap_gamma, probe, spearman, spearman_agreement


def test_spearman_matches_scipy_and_known_values(rng):
    a, b = rng.normal(size=30), rng.normal(size=30)
    assert spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b).statistic, abs=1e-12)
    assert spearman(a, np.exp(a)) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)


def test_bootstrap_interval_brackets_the_score_and_collapses_for_identical_windows(mlp, x0):
    scores = probe(mlp, x0, horizon=6, progress=False)
    ci = bootstrap_gamma(scores, n_boot=300)
    assert ci["unit"].values.tolist() == scores["unit"].values.tolist()
    assert np.all(ci["gamma_lo"] <= ci["gamma"]) and np.all(ci["gamma"] <= ci["gamma_hi"])
    assert np.all(ci["gamma_hi"] - ci["gamma_lo"] > 0)
    same = probe(mlp, x0[:1].repeat(8, 1), horizon=6, progress=False)  # 8 copies of one window
    ci = bootstrap_gamma(same, n_boot=100)
    np.testing.assert_allclose(ci["gamma_lo"], ci["gamma"], atol=1e-12)
    np.testing.assert_allclose(ci["gamma_hi"], ci["gamma"], atol=1e-12)


def test_more_windows_give_narrower_intervals(mlp):
    widths = []
    for n in (8, 128):
        x = torch.randn(n, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        ci = bootstrap_gamma(probe(mlp, x, horizon=6, progress=False), n_boot=300)
        widths.append(float((ci["gamma_hi"] - ci["gamma_lo"]).mean()))
    assert widths[1] < 0.6 * widths[0]  # about 1/sqrt(16) = 0.25 expected


def test_spearman_agreement_of_a_probe_with_itself_is_one(mlp, x0):
    s = probe(mlp, x0, horizon=6, progress=False)
    out = spearman_agreement(s, s, n_boot=200)
    assert out["rho"] == pytest.approx(1.0) and out["lo"] == pytest.approx(1.0) and out["hi"] == pytest.approx(1.0)
    assert out["resampled"] == "windows" and out["n_units"] == 6


def test_spearman_agreement_between_gauss_and_quant(mlp, x0):
    g = probe(mlp, x0, horizon=6, progress=False)
    q = probe(mlp, x0, perturbation="quant", horizon=6, progress=False)
    out = spearman_agreement(g, q, n_boot=300)
    assert -1 <= out["lo"] <= out["rho"] <= out["hi"] <= 1
    by_units = spearman_agreement(g["gamma"], q["gamma"], n_boot=300)
    assert by_units["resampled"] == "units" and by_units["rho"] == pytest.approx(out["rho"])
    with pytest.raises(ValueError, match="need at least 3"):
        spearman_agreement(g.isel(unit=[0, 1]), q, n_boot=10)


def test_bootstrap_of_a_window_subset_uses_the_subset(mlp, x0):
    s = probe(mlp, x0, horizon=6, progress=False)
    sub = s.isel(window=slice(0, 5))
    ci = bootstrap_gamma(sub, n_boot=50)
    lam = np.log(sub["divergence"].values[:, :, -1] / sub["eps"].values[:, None]).mean(1)
    np.testing.assert_allclose(ci["gamma"], lam / 6)


def test_windows_are_paired_only_when_they_are_the_same_windows(mlp, x0):
    a = probe(mlp, x0, horizon=6, progress=False)
    other = probe(mlp, x0 + 0.5, horizon=6, progress=False)  # as many windows, other states
    assert a.attrs["windows_sha256"] != other.attrs["windows_sha256"]
    assert spearman_agreement(a, other, n_boot=50)["resampled"] == "units"
    again = probe(mlp, x0.clone(), horizon=6, perturbation="quant", progress=False)
    assert spearman_agreement(a, again, n_boot=50)["resampled"] == "windows"



def test_resamples_where_rho_is_undefined_are_left_out_not_fatal():
    import warnings

    import xarray as xr
    a = xr.DataArray([1.0, 2.0, 3.0, 4.0], dims="unit", coords={"unit": list("abcd")})
    b = xr.DataArray([1.0, 3.0, 2.0, 4.0], dims="unit", coords={"unit": list("abcd")})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = spearman_agreement(a, b, n_boot=400)  # some resamples draw one unit four times: rho undefined
    assert out["rho"] == pytest.approx(0.8)
    assert -1 <= out["lo"] <= out["rho"] <= out["hi"] <= 1
