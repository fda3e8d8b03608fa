"""The TQS probe on systems with known answers (SPEC section 2)."""

import math
import os
import warnings

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import linear_system, same_weights, snapshot
from torch import nn

import tqslite
import tqslite.sweep
from tqslite import Gaussian, Int, MSEClip, QuantResidual, gamma_at, probe
from tqslite.units import BlockUnits, TensorUnits, Unit

RHO = 1.05
EIGS = [RHO, 0.9, 0.8, -0.7, 0.5, 0.3]


def states(n, d, seed=1, dtype=torch.float64):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_gamma_approaches_log_spectral_radius_of_a_linear_map():
    # x' = A x: the error a persistent perturbation injects grows like t * rho^t, so
    # gamma(T) = log(rho) + O(log(T) / T).
    system = linear_system(EIGS)
    scores = probe(system, states(8, 6), horizon=400, progress=False)
    gap = {T: abs(float(gamma_at(scores, T)[0]) - math.log(RHO)) for T in (50, 100, 200, 400)}
    assert gap[400] < 0.01
    assert gap[400] < gap[200] < gap[100] < gap[50]


@pytest.mark.parametrize("kind", ["gauss", "quant"])
def test_scaling_the_map_shifts_gamma_by_the_log_of_the_scale(kind):
    # B = c A rolls out as c^t times A's trajectory, perturbations included, so
    # Lambda_B(t) = Lambda_A(t) + t log c and gamma_B - gamma_A = log c. With c = 2 every
    # floating-point operation scales exactly.
    a = linear_system(EIGS, seed=3)
    b = linear_system([2 * e for e in EIGS], seed=3)
    x = states(4, 6)
    ga = probe(a, x, perturbation=kind, horizon=30, progress=False)["gamma"].values
    gb = probe(b, x, perturbation=kind, horizon=30, progress=False)["gamma"].values
    np.testing.assert_allclose(gb - ga, math.log(2.0), rtol=0, atol=1e-12)


def test_gamma_gauss_does_not_depend_on_sigma_in_the_linear_regime(mlp, x0):
    # Lambda is normalised by eps, and the noise direction is fixed by (seed, unit): in the linear
    # regime the divergence is proportional to sigma_rel and gamma does not move.
    g1 = probe(mlp, x0, perturbation=Gaussian(1e-4), horizon=10, progress=False)["gamma"].values
    g2 = probe(mlp, x0, perturbation=Gaussian(1e-6), horizon=10, progress=False)["gamma"].values
    np.testing.assert_allclose(g1, g2, atol=1e-4)


def test_gamma_quant_barely_moves_with_probe_bits_in_the_linear_regime(x0):
    # From 4 to 8 probe bits the RTN residual shrinks about 16x (log eps drops by ~2.8), and in the
    # linear regime the divergence shrinks with it: Lambda = log(d / eps) moves by a small fraction
    # of that (what remains is the residual's changing direction).
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 8)).double()
    runs = [probe(mlp, x0, perturbation=QuantResidual(Int(b)), horizon=10, units=TensorUnits(exclude="*.bias"),
                  progress=False) for b in (4, 6, 8)]
    lam = np.stack([r["curve"].isel(lead=-1).values for r in runs])
    log_eps = np.log(np.stack([r["eps"].values for r in runs]))
    assert np.all(np.abs(lam[0] - lam[2]) < 0.25 * np.abs(log_eps[0] - log_eps[2]))
    assert np.all(np.abs(lam[1] - lam[2]) < 0.25 * np.abs(log_eps[1] - log_eps[2]))


def test_a_parameter_that_does_not_affect_the_output_is_dead(x0):
    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8).double()
            self.unused = nn.Parameter(torch.ones(5, dtype=torch.float64))

        def forward(self, x):
            return torch.tanh(self.lin(x))

    scores = probe(WithUnused(), x0, horizon=5, progress=False)
    assert scores["dead"].sel(unit="unused").item()
    assert scores["gamma"].sel(unit="unused").item() == -np.inf
    assert np.isneginf(scores["curve"].sel(unit="unused").values).all()
    assert not scores["dead"].sel(unit="lin.weight").item()


def test_a_tensor_already_on_the_grid_is_unmeasured_and_reprobed_not_free(mlp, x0):
    with torch.no_grad():
        mlp[0].weight.copy_(tqslite.rtn_quantize(mlp[0].weight, 4))
    scores = probe(mlp, x0, perturbation="quant", horizon=5, progress=False)
    gauss = probe(mlp, x0, horizon=5, units=[Unit("0.weight", ("0.weight",))], progress=False)
    assert scores["unmeasured"].sel(unit="0.weight").item() and scores["unmeasured"].sum() == 1
    assert not scores["dead"].any()
    # its score is the Gaussian probe's, with the same noise
    assert scores["gamma"].sel(unit="0.weight").item() == pytest.approx(gauss["gamma"].item(), rel=1e-12)
    assert np.isfinite(scores["gamma"]).all()
    # and the allocator prices it like any other unit: exact at 4 bits, costly at 2
    table = tqslite.cost_table(scores, mlp, options=(2, 4, 32))
    cost = table["cost"].sel(unit="0.weight")
    assert cost.sel(option="int4/channel") == 0 and cost.sel(option="int2/channel") > 0
    assert table["allowed"].sel(unit="0.weight").all()


def test_an_unmeasured_unit_without_a_curve_is_refused_by_the_allocator(mlp, x0):
    scores = probe(mlp, x0, horizon=3, progress=False)
    scores["unmeasured"].loc["2.weight"] = True
    scores["curve"].loc["2.weight"] = -np.inf
    with pytest.raises(ValueError, match=r"\['2.weight'\] were not measured"):
        tqslite.cost_table(scores, mlp)


def test_one_window_that_does_not_diverge_cannot_drag_lambda_down_by_tens_of_nats():
    class Gated(nn.Module):  # the gain only acts on states whose first coordinate is positive
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.tensor(0.5))

        def forward(self, x):
            return 0.9 * x + self.gain * torch.relu(x[:, :1]) * 1e-3

    x = torch.tensor([[1.0, 0.0], [2.0, 1.0], [3.0, -1.0], [-1.0, 0.5]])  # the last window never moves
    scores = probe(Gated(), x, horizon=4, progress=False)
    assert scores["n_zero_windows"].item() == 1 and not scores["dead"].item()
    lam_others = probe(Gated(), x[:3], horizon=4, progress=False)["curve"].values[0]
    gap = lam_others - scores["curve"].values[0]
    # the zero window enters at log(d_floor / eps), d_floor = eps(float32) * RMS(state): a few nats below
    # the others, not the ~60 nats a 1e-30 floor would cost (d ~ 1e-5 here)
    assert np.all(gap > 0) and np.all(gap < 5)
    np.testing.assert_allclose(scores["d_floor"].values[3], torch.finfo(torch.float32).eps * 0.9 ** np.arange(1, 5)
                               * float(x[3].pow(2).mean().sqrt()), rtol=1e-6)


def test_the_quant_probe_takes_any_quantizer(mlp, x0):
    mse = probe(mlp, x0, perturbation=QuantResidual(Int(3), MSEClip()), horizon=3, progress=False)
    w = mlp[2].weight.detach()
    q = MSEClip().quantize(w, Int(3).resolve(w.shape, 0)).dequantize()
    assert mse["eps"].sel(unit="2.weight").item() == pytest.approx(float((q - w).norm() / w.norm()), rel=1e-12)
    assert mse.attrs["quantizer"] == "MSEClip(grid=100, max_shrink=0.8, norm=2.0)" and mse.attrs["config"] == "int3/channel"


def test_dead_threshold_flags_near_dead_units(mlp, x0):
    scores = probe(mlp, x0, horizon=5, progress=False)
    cut = float(scores["curve"].isel(lead=-1).median())
    flagged = probe(mlp, x0, horizon=5, progress=False, dead_threshold=cut)
    assert flagged["dead"].values.tolist() == (scores["curve"].isel(lead=-1) <= cut).values.tolist()


def test_same_seed_same_scores_and_units_do_not_interact(mlp, x0):
    full = probe(mlp, x0, horizon=6, perturbation=Gaussian(seed=7), progress=False)
    again = probe(mlp, x0, horizon=6, perturbation=Gaussian(seed=7), progress=False)
    xr.testing.assert_identical(full, again)
    other = probe(mlp, x0, horizon=6, perturbation=Gaussian(seed=8), progress=False)
    assert not np.array_equal(full["gamma"].values, other["gamma"].values)
    # noise is seeded by (seed, unit label): scoring a subset, in another order, changes nothing
    subset = [Unit("4.weight", ("4.weight",)), Unit("0.bias", ("0.bias",))]
    part = probe(mlp, x0, horizon=6, perturbation=Gaussian(seed=7), units=subset, progress=False)
    np.testing.assert_array_equal(part["gamma"].values, full["gamma"].sel(unit=["4.weight", "0.bias"]).values)


@pytest.mark.parametrize("kind", ["gauss", "quant"])
def test_weights_are_restored_exactly(mlp, x0, kind):
    before = snapshot(mlp)
    probe(mlp, x0, perturbation=kind, units="block", horizon=4, progress=False)
    assert same_weights(mlp, before)
    assert mlp.training  # the caller's training flag is given back


def test_batching_windows_does_not_change_scores(mlp, x0):
    whole = probe(mlp, x0, horizon=5, progress=False)
    batched = probe(mlp, x0, horizon=5, batch_size=5, progress=False)
    np.testing.assert_allclose(batched["divergence"].values, whole["divergence"].values, rtol=1e-12, atol=0)


def test_result_layout_and_netcdf_round_trip(mlp, x0, tmp_path):
    s = probe(mlp, x0, units="block", horizon=7, progress=False)
    assert s["curve"].dims == ("unit", "lead") and s["divergence"].dims == ("unit", "window", "lead")
    assert s.sizes == {"unit": 3, "lead": 7, "window": 16, "tensor": 6}
    assert tqslite.units.units_of(s) == tqslite.make_units([n for n, _ in mlp.named_parameters()], "block")
    assert list(s["unit"].values) == ["0", "2", "4"]
    assert s["n_params"].sum() == sum(p.numel() for p in mlp.parameters())
    np.testing.assert_allclose(s["gamma"], s["curve"].sel(lead=7) / 7)
    # Lambda is the window-mean of log(d / eps), computed from the stored divergence
    lam = np.log(np.maximum(s["divergence"].values, s["d_floor"].values) / s["eps"].values[:, None, None]).mean(1)
    np.testing.assert_allclose(s["curve"].values, lam)
    assert s.attrs["kind"] == "gauss" and s.attrs["horizon"] == 7 and s.attrs["sigma_rel"] == 0.01
    s.to_netcdf(tmp_path / "scores.nc")
    back = xr.load_dataset(tmp_path / "scores.nc")
    xr.testing.assert_equal(back, s)


def test_a_unit_whose_rollout_blows_up_scores_inf_and_the_others_are_kept():
    class Fragile(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.trigger = nn.Parameter(torch.ones(()))  # exactly 1: its term vanishes unperturbed

        def forward(self, x):
            return torch.tanh(self.lin(x)) + (self.trigger - 1.0) * 1e30 * torch.exp(x * 50)

    scores = probe(Fragile(), states(4, 4, dtype=torch.float32), horizon=8, progress=False)
    assert scores["nonfinite"].sel(unit="trigger").item()
    assert scores["gamma"].sel(unit="trigger").item() == np.inf
    assert np.isfinite(scores["gamma"].sel(unit=["lin.weight", "lin.bias"])).all()
    assert not scores["nonfinite"].sel(unit="lin.weight").item()


def test_windowed_and_block_probe_run_on_history_models():
    class Patch(nn.Module):  # reads a context of 12 values, predicts the next 4
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(12, 16)
            self.out = nn.Linear(16, 4)

        def forward(self, ctx):
            return self.out(torch.tanh(self.inp(ctx)))

    system = tqslite.WindowedSystem(Patch())
    x = torch.randn(3, 12)
    nxt = system.step(x)
    assert nxt.shape == (3, 12) and torch.equal(nxt[:, :8], x[:, 4:])
    scores = probe(system, x, units="block", horizon=5, progress=False)
    assert list(scores["unit"].values) == ["inp", "out"] and np.isfinite(scores["gamma"]).all()


def test_bad_input_gets_clear_errors(mlp, x0):
    with pytest.raises(ValueError, match="horizon"):
        probe(mlp, x0, horizon=0, progress=False)
    with pytest.raises(ValueError, match="perturbation='hessian'"):
        probe(mlp, x0, perturbation="hessian", progress=False)
    with pytest.raises(ValueError, match="bits=9"):
        probe(mlp, x0, perturbation=QuantResidual(9), progress=False)
    with pytest.raises(ValueError, match="sigma_rel"):
        probe(mlp, x0, perturbation=Gaussian(-1.0), progress=False)
    with pytest.raises(ValueError, match="unit set is empty"):
        probe(mlp, x0, units=TensorUnits(exclude="*"), progress=False)
    with pytest.raises(ValueError, match="x0"):
        probe(mlp, x0[0], progress=False)
    bad = x0.clone()
    bad[2, 3] = float("inf")
    with pytest.raises(ValueError, match="initial states x0 contains 1 non-finite"):
        probe(mlp, bad, progress=False)
    with torch.no_grad():
        mlp[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="parameter '2.weight' contains 1 non-finite"):
        probe(mlp, x0, progress=False)
    with pytest.raises(TypeError, match="not a system"):
        probe(object(), x0, progress=False)


def test_parallel_executors_give_identical_scores(mlp, x0):
    from concurrent.futures import ThreadPoolExecutor

    serial = probe(mlp, x0, horizon=6, progress=False, chunk_units=2)
    before = snapshot(mlp)
    with ThreadPoolExecutor(max_workers=2) as pool:
        threaded = probe(mlp, x0, horizon=6, progress=False, executor=pool, chunk_units=2)
    xr.testing.assert_identical(threaded, serial)
    assert same_weights(mlp, before)


def test_dask_local_cluster_gives_identical_scores(mlp, x0):
    distributed, dask = pytest.importorskip("distributed"), pytest.importorskip("dask")
    serial = probe(mlp, x0, perturbation="quant", units="block", horizon=6, progress=False, chunk_units=2)
    with dask.config.set(tqslite.sweep.WORKER_CONFIG), \
            distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        assert tqslite.sweep.slow_allocation_workers(client) == []  # the setting was there from the start
        remote = probe(mlp, x0, perturbation="quant", units="block", horizon=6, progress=False,
                       executor=client.get_executor(), chunk_units=2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning about the workers' allocator
            scattered = probe(mlp, x0, perturbation="quant", units="block", horizon=6, progress=False,
                              executor=client, chunk_units=2)
    xr.testing.assert_identical(scattered, serial)
    xr.testing.assert_identical(remote, serial)


@pytest.mark.skipif(not os.path.exists("/proc/self/environ"), reason="reads a process's initial environment (Linux)")
def test_workers_given_the_allocator_setting_too_late_are_named(mlp, x0, monkeypatch):
    """``LocalCluster(env=...)`` sets the variable inside the running worker, after glibc read its
    environment: the worker still maps every large tensor afresh, and the probe says so."""
    distributed = pytest.importorskip("distributed")
    # a nanny copies its pre-spawn settings into this process's environment, where workers inherit them
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                                  env=tqslite.sweep.WORKER_ENV) as cluster, distributed.Client(cluster) as client:
        workers = list(client.scheduler_info()["workers"])
        mmap = client.run(lambda: os.environ.get("MALLOC_MMAP_THRESHOLD_"))  # read in the worker
        assert mmap == dict.fromkeys(workers, "33554432")  # it is set there, but too late
        assert tqslite.sweep.slow_allocation_workers(client) == workers
        with pytest.warns(UserWarning, match="MALLOC_MMAP_THRESHOLD_=33554432"):
            probe(mlp, x0, horizon=2, progress=False, executor=client, chunk_units=2)


def test_transposed_convolutions_are_quantized_per_output_channel():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ConvTranspose2d(3, 5, 2))
    system = tqslite.TorchSystem(net)
    assert system.channel_axis("0.weight") == 0 and system.channel_axis("1.weight") == 1
    w = net[1].weight.detach()  # (in=3, out=5, kh, kw): the output channel is axis 1
    plan = tqslite.uniform_plan(net, Int(2))
    q = tqslite.apply_plan(net, plan)[1].weight.detach()
    for j in range(5):  # one scale per output channel: each one's largest |w| is a grid point of its own
        col = w[:, j].abs().max()
        assert torch.isclose(q[:, j].abs().max(), col, rtol=1e-3)
    assert not torch.equal(q, tqslite.rtn_quantize(w, Int(2), axis=0))  # per input channel would differ
