"""The skill-aware horizon rule on synthetic errors with known answers, and on a shipped model."""

import numpy as np
import pytest
import xarray as xr

from tqslite import skill as S


def test_the_horizon_is_the_last_lead_before_the_first_crossing():
    leads = np.arange(1, 11)
    model = 0.1 * leads                        # crosses climatology (0.55) after lead 5
    clim = np.full(10, 0.55)
    pers = 0.2 * leads                         # always worse than the model
    assert S.skill_horizon(model, [clim, pers]) == 5
    assert S.skill_horizon(model, [np.full(10, 2.0), 0.09 * leads]) == 0     # persistence wins at lead 1
    assert S.skill_horizon(model, np.full(10, 2.0)) == 10                    # skill at every lead
    assert S.skill_horizon([0.1, 0.5, 0.2], [[0.3, 0.3, 0.3]]) == 1          # regained skill does not count
    assert S.skill_horizon([0.1, 0.3], [[0.3, 0.3]]) == 1                    # a tie is not skill
    with pytest.raises(ValueError, match="same leads"):
        S.skill_horizon([0.1, 0.2], [[0.3, 0.3, 0.3]])


def synthetic_mse(rmse_by_lead, n_windows=8, variables=("a", "b")):
    """mse(window, lead, variable) whose RMSE over windows is exactly ``rmse_by_lead`` for every variable."""
    r = np.asarray(rmse_by_lead, float)
    w = np.linspace(0.5, 1.5, n_windows)
    w = w / w.mean()                           # mean over windows 1: RMSE = sqrt(r**2)
    mse = w[:, None, None] * (r**2)[None, :, None] * np.ones(len(variables))
    return xr.DataArray(mse, dims=("window", "lead", "variable"),
                        coords={"lead": np.arange(1, len(r) + 1), "variable": list(variables)})


def test_skill_curves_and_horizon_from_per_window_errors():
    leads = np.arange(1, 13)
    model = synthetic_mse(0.05 * np.exp(0.25 * leads))           # 0.05 e^{0.25 t} crosses 0.7 at t = 10.6
    refs = {"climatology": synthetic_mse(np.full(12, 0.7)), "persistence": synthetic_mse(0.3 * leads)}
    curves = S.skill_curves(model, refs, "variable")
    np.testing.assert_allclose(curves["mean_rmse"].sel(forecast="model"), 0.05 * np.exp(0.25 * leads))
    assert list(curves["forecast"].values) == ["model", "climatology", "persistence"]
    # persistence 0.3 t beats 0.05 e^{0.25 t}? no: at t = 1 0.3 > 0.064; the model crosses climatology first
    assert S.horizon_of(curves) == 10


def test_targets_are_stations_when_the_windows_carry_them():
    mse = xr.DataArray(np.r_[np.full(5, 1.0), np.full(5, 4.0)][:, None], dims=("window", "lead"),
                       coords={"lead": [1], "station": ("window", ["A"] * 5 + ["B"] * 5)})
    r = S.rmse_per_target(mse, "station")
    assert r.dims == ("lead", "station") and r.sel(station="A").item() == 1.0 and r.sel(station="B").item() == 2.0
    one = S.rmse_per_target(mse, "all")
    assert one.dims == ("lead", "target") and one.item() == pytest.approx(np.sqrt(2.5))


def test_usable_means_added_error_at_most_the_float_models_own():
    assert S.usable([0.1, 0.5, 0.6, np.nan], 0.5).tolist() == [True, True, False, False]


def test_a_shipped_model_has_skill_only_at_lead_1_where_its_record_says_so():
    # timesfm_lite's recorded skill: below climatology at lead 1 only (tqslite.train's own numbers)
    import json

    from tqslite.benchmark import benchmark, float_skill
    from tqslite.models import CHECKPOINT_DIR
    rec = json.loads((CHECKPOINT_DIR / "timesfm_lite.json").read_text())["skill"]["heldout"]["rmse_normalised"]
    assert rec["model"][0] < rec["climatology"][0] and rec["model"][1] > rec["climatology"][1]
    bench = benchmark("timesfm_lite", max_horizon=3, n_probe=24, n_eval=240)
    curves = float_skill(bench, "eval")
    assert curves.attrs["horizon"] == 1
    m = curves["mean_rmse"]
    assert float(m.sel(forecast="model", lead=1)) < float(m.sel(forecast="climatology", lead=1))
    assert float(m.sel(forecast="model", lead=2)) >= float(m.sel(forecast="climatology", lead=2))


def test_window_mse_weights_latitudes_by_their_cosine():
    from tqslite.benchmark import window_mse
    # two latitudes, 0 and 60 degrees: weights cos(lat) / mean = 4/3 and 2/3; squared errors 1 and 4
    err = xr.DataArray(np.array([1.0, 2.0])[None, None, None, :, None] * np.ones((3, 2, 1, 2, 5)),
                       dims=("window", "lead", "variable", "lat", "lon"), coords={"lat": [0.0, 60.0]})
    mse = window_mse(err, xr.zeros_like(err))
    assert mse.dims == ("window", "lead", "variable")
    np.testing.assert_allclose(mse.values, (4 / 3 * 1 + 2 / 3 * 4) / 2)   # 2.0, not the unweighted 2.5


def test_usable_targets_compare_rmse_per_target_not_per_window():
    # variable a: added RMSE sqrt(mean(1, 9)) = sqrt(5) > own 2 -> not usable, though one window is below;
    # variable b: added sqrt(mean(1, 1)) = 1 <= own 1 -> usable (equal is usable)
    added = xr.DataArray([[1.0, 1.0], [9.0, 1.0]], dims=("window", "variable"), coords={"variable": ["a", "b"]})
    own = xr.DataArray([[4.0, 1.0], [4.0, 1.0]], dims=("window", "variable"), coords={"variable": ["a", "b"]})
    ok = S.usable_targets(added, own, "variable")
    assert ok.dims == ("variable",) and ok.values.tolist() == [False, True]
    st = xr.DataArray([1.0, 1.0, 9.0, 9.0], dims="window", coords={"station": ("window", ["A", "A", "B", "B"])})
    assert S.usable_targets(st, xr.full_like(st, 4.0), "station").values.tolist() == [True, False]
