"""Forecast labelling, RMSE with latitude weights, and the anomaly correlation."""

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from tqslite.evaluation import acc, forecast, lat_weights, rmse


class Decay(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

    def forward(self, x):
        return self.a * x


def grid(n=3, lat=(-60.0, 0.0, 60.0)):
    rng = np.random.default_rng(0)
    return xr.DataArray(rng.normal(size=(n, 2, len(lat), 4)), dims=("window", "variable", "lat", "lon"),
                        coords={"variable": ["u", "v"], "lat": list(lat), "lon": [0, 90, 180, 270]})


def test_forecast_keeps_labels_and_leads():
    x0 = grid()
    fc = forecast(Decay(), x0, steps=3)
    assert fc.dims == ("window", "lead", "variable", "lat", "lon")
    assert fc["lead"].values.tolist() == [1, 2, 3] and fc["variable"].values.tolist() == ["u", "v"]
    np.testing.assert_allclose(fc.sel(lead=3), 0.125 * x0)
    np.testing.assert_allclose(forecast(Decay(), x0, 3, batch_size=1), fc)
    plain = forecast(Decay(), torch.ones(2, 5, dtype=torch.float64), 2)
    assert plain.dims == ("window", "lead", "dim_0")


def test_lat_weights_and_weighted_rmse():
    w = lat_weights([-60.0, 0.0, 60.0])
    np.testing.assert_allclose(w.values, np.array([0.5, 1, 0.5]) / (2 / 3))
    a = grid()
    b = a.copy()
    b.loc[dict(lat=0.0)] += 1.0  # error 1 on the equator only: weighted MSE = 1 * w_eq / 3 rows
    r = rmse(a.expand_dims(lead=[1]), b.expand_dims(lead=[1]))
    assert r.dims == ("lead", "variable")
    np.testing.assert_allclose(r.values, np.sqrt(1.5 / 3))
    assert float(rmse(a, a.copy()).max()) == 0


def test_acc_is_one_for_a_perfect_forecast_and_minus_one_for_inverted_anomalies():
    t = grid().expand_dims(lead=[1, 2])
    clim = t.mean(("window", "lead"))
    assert np.allclose(acc(t, t, clim), 1.0)
    assert np.allclose(acc(2 * clim - t, t, clim), -1.0)
    assert acc(t, t, clim).dims == ("lead", "variable")


def test_station_series_are_unweighted():
    a = xr.DataArray(np.zeros((2, 3, 4)), dims=("window", "lead", "station"))
    b = a + xr.DataArray([0.0, 0.0, 0.0, 2.0], dims="station")
    np.testing.assert_allclose(rmse(a, b, keep=()).values, [1.0, 1.0, 1.0])
    assert rmse(a, b, keep=("station",)).sel(station=3).values.tolist() == pytest.approx([2.0, 2.0, 2.0])


def test_compare_plans_float_row_is_zero_and_model_untouched(mlp, x0):
    import tqslite
    scores = tqslite.probe(mlp, x0, horizon=5, progress=False)
    plans = {"tqs": tqslite.allocate(scores, mlp, budget_bits=4.5), "rtn4": tqslite.uniform_plan(mlp, 4)}
    before = {n: p.clone() for n, p in mlp.state_dict().items()}
    truth = tqslite.evaluation.forecast(mlp, x0, 5) + 0.1
    res = tqslite.evaluation.compare_plans(mlp, plans, x0, 5, truth=truth, keep=())
    assert res["plan"].values.tolist() == ["float", "tqs", "rtn4"]
    assert float(res["rmse_vs_float"].sel(plan="float").max()) == 0
    np.testing.assert_allclose(res["rmse_vs_truth"].sel(plan="float"), 0.1, rtol=1e-6)
    assert (res["rmse_vs_float"].sel(plan="rtn4") > 0).all()
    assert all(torch.equal(p, before[n]) for n, p in mlp.state_dict().items())


def test_keep_defaults_to_the_variable_dim_and_refuses_missing_dims():
    a = grid().rename(variable="channel")
    assert rmse(a, a + 1).dims == ("channel",)
    with pytest.raises(ValueError, match="no dim"):
        rmse(a, a, keep=("variable",))
