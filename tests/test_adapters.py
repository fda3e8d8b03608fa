"""Adapters (tqslite.adapters): each rollout equals a hand-written loop of the wrapped model.

The references are written the way a third-party forecaster's own ``forecast`` method is: numpy
normalisation of each window (``nanmean``/``nanstd``), left padding with a validity mask, the
median of the quantiles, de-normalisation, block after block, in float64 -- so the adapters'
torch code is checked against independent code, to float64 round-off. Then: the guard on the
first step, missing values through the probe, GPTQ calibrating through the whole step, and the
function adapter leaving the caller's tensors alone.
"""

from __future__ import annotations

import concurrent.futures
import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import tqslite
from tqslite import GPTQ, RTN, Int, rollout, uniform_plan
from tqslite.adapters import BlockForecaster, Ensemble, Forced, FunctionSystem, Mask, Normalise, Quantiles
from tqslite.evaluation import forecast
from tqslite.probe import Gaussian, gaussian_weights
from tqslite.systems import WindowedSystem
from tqslite.units import Unit

LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9)


class ConvQuantiles(nn.Module):
    """A third-party forecaster: normalised context ``(B, L)`` and mask -> ``(B, k, Q)`` quantiles."""

    def __init__(self, L=24, k=6, q=len(LEVELS), seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.k, self.q = k, q
        self.conv = nn.Conv1d(2, 4, 5, padding=2)
        self.head = nn.Linear(4 * L, k * q)
        self.temperature = nn.Parameter(torch.tensor(0.9))

    def forward(self, x, mask):
        h = torch.tanh(self.conv(torch.stack([x * mask, mask], dim=1)))
        return (self.head(h.flatten(1)) * self.temperature).view(-1, self.k, self.q)


def third_party_forecast(model, history, steps, L, k, location="mean", scale="std", reduce=None):
    """The model's own forecast method: numpy, one window at a time, float64."""
    hist = [float(v) for v in history]
    out = []
    for _ in range(steps):
        ctx = np.asarray(hist[-L:], dtype=np.float64)
        valid = ~np.isnan(ctx)
        if location == "mean":
            mu = np.nanmean(ctx)
        elif location == "last":
            mu = ctx[valid][-1]
        else:
            mu = 0.0
        if scale == "std":
            sd = np.sqrt(np.nanmean((ctx - mu) ** 2))
        elif scale == "mean_abs":
            sd = np.nanmean(np.abs(ctx - mu))
        else:
            sd = 1.0
        sd = 1.0 if sd < 1e-5 else sd
        z = np.where(valid, (ctx - mu) / sd, 0.0)
        pad = L - len(ctx)
        z = np.concatenate([np.zeros(pad), z])
        m = np.concatenate([np.zeros(pad), valid.astype(np.float64)])
        with torch.no_grad():
            raw = model(torch.from_numpy(z[None]), torch.from_numpy(m[None])).numpy()[0]
        y = (raw[:, LEVELS.index(0.5)] if reduce is None else reduce(raw)) * sd + mu
        hist.extend(y)
        out.extend(y)
    return np.asarray(out)


@pytest.fixture
def series():
    rng = np.random.default_rng(0)
    t = np.arange(200)
    return (10 + 3 * np.sin(2 * np.pi * t / 30) + rng.normal(0, 0.5, (5, 200)).cumsum(1) * 0.2)


@pytest.mark.parametrize("location,scale", [("mean", "std"), ("last", "one"), ("zero", "mean_abs")])
def test_block_forecaster_equals_the_models_own_forecast_loop(series, location, scale):
    model = ConvQuantiles().double()
    system = BlockForecaster(model, context_length=24, block_length=6, normalise=Normalise(location, scale),
                             mask=Mask(), output=Quantiles(LEVELS))
    histories = [series[0, :24], series[1, :40], series[2, :24]]      # a longer context keeps its last 24
    x0 = system.states(histories)
    got = system.forecast_series(rollout(system, x0, 5)).numpy()
    want = np.stack([third_party_forecast(model, h, 5, 24, 6, location, scale) for h in histories])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_growing_contexts_and_gaps_are_masked_as_the_model_does(series):
    model = ConvQuantiles().double()
    system = BlockForecaster(model, 24, 6, normalise=Normalise(), mask=Mask(), output=Quantiles(LEVELS))
    gappy = series[3, :20].copy()
    gappy[[4, 5, 11]] = np.nan
    histories = [series[0, :7], series[1, :13], gappy]                   # shorter than L: they grow
    x0 = system.states(histories)
    assert x0.shape == (3, 24) and int(torch.isnan(x0[0]).sum()) == 17 and system.accepts_missing
    traj = rollout(system, x0, 6)
    want = np.stack([third_party_forecast(model, h, 6, 24, 6) for h in histories])
    np.testing.assert_allclose(system.forecast_series(traj).numpy(), want, rtol=1e-12, atol=1e-12)
    # the padding leaves the state as the context grows: 17 NaN, then 11, 5, then none
    assert [int(torch.isnan(traj[t, 0]).sum()) for t in range(4)] == [11, 5, 0, 0]
    # a fixed-length window agrees only once the context is full (here, from the third step on)
    assert torch.isnan(traj[1, 0]).any() and not torch.isnan(traj[2, 0]).any()


def test_padding_masks_the_timesfm_way_and_ensembles_reduce_like_numpy(series):
    class Members(nn.Module):           # (B, L) + paddings (1 = missing) -> (B, members, k)
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.lin = nn.Linear(24, 4 * 6)

        def forward(self, x, paddings):
            return self.lin(x * (1 - paddings)).view(-1, 4, 6)

    model = Members().double()
    for stat in ("median", "mean"):
        system = BlockForecaster(model, 24, 6, normalise=Normalise(), mask=Mask(padding=True),
                                 output=Ensemble(axis=1, statistic=stat))
        histories = [series[0, :24], series[1, :10]]
        got = system.forecast_series(rollout(system, system.states(histories), 3)).numpy()
        np_stat = np.median if stat == "median" else np.mean

        def call(z, m):
            return model(z, 1 - m)

        want = np.stack([third_party_forecast(lambda z, m: call(z, m).transpose(1, 2), h, 3, 24, 6,
                                              reduce=lambda raw: np_stat(raw, axis=1)) for h in histories])
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_without_normalisation_or_mask_it_is_the_windowed_system_bit_for_bit(series):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 6))
    x0 = torch.as_tensor(series[:, :24], dtype=torch.float32)
    a = rollout(BlockForecaster(model, 24, 6), x0, 7)
    b = rollout(WindowedSystem(model), x0, 7)
    assert torch.equal(a, b)


def test_multivariate_contexts_and_a_custom_call(series):
    class ChannelsFirst(nn.Module):     # wants (B, C, L), returns (B, C, k, Q)
        def __init__(self):
            super().__init__()
            torch.manual_seed(2)
            self.lin = nn.Linear(24, 6 * 3)

        def forward(self, x):
            return self.lin(x).view(x.shape[0], x.shape[1], 6, 3)

    model = ChannelsFirst().double()

    def call(m, z, mask):
        return m.forward(z.transpose(1, 2)).permute(0, 2, 1, 3)      # -> (B, k, C, Q)

    system = BlockForecaster(model, 24, 6, normalise=Normalise(), output=Quantiles((0.25, 0.5, 0.75)), call=call)
    x0 = torch.as_tensor(np.stack([series[:2, :24].T, series[2:4, :24].T]))        # (2, 24, 2)
    got = system.forecast_series(rollout(system, x0, 3)).numpy()                   # (2, 18, 2)
    for n in range(2):
        hist = x0[n].numpy().copy()
        for _ in range(3):
            ctx = hist[-24:]
            mu, sd = ctx.mean(0), ctx.std(0)
            with torch.no_grad():
                raw = model(torch.from_numpy(((ctx - mu) / sd).T[None])).numpy()[0]   # (C, k, Q)
            hist = np.concatenate([hist, raw[:, :, 1].T * sd + mu])
        np.testing.assert_allclose(got[n], hist[24:], rtol=1e-12, atol=1e-12)


def test_forecast_series_of_a_labelled_forecast(series):
    model = ConvQuantiles().double()
    system = BlockForecaster(model, 24, 6, normalise=Normalise(), mask=Mask(), output=Quantiles(LEVELS))
    x0 = system.states(series[:3, :24])
    da = system.forecast_series(forecast(system, x0, 4))
    assert da.dims == ("window", "step") and da.sizes["step"] == 24 and list(da["step"].values[:2]) == [1, 2]
    np.testing.assert_array_equal(da.values, system.forecast_series(rollout(system, x0, 4)).numpy())


def test_forced_equals_a_hand_loop_with_the_inputs_of_each_time():
    class Driven(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(3)
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(2, 4, bias=False)

        def forward(self, x, f):
            return torch.tanh(self.a(x) + self.b(f))

    model = Driven().double()
    t = np.arange(500)
    forcings = np.stack([np.sin(2 * np.pi * t / 365.25), np.cos(2 * np.pi * t / 365.25)], axis=1)
    for offset in (0, 1):
        system = Forced(model, forcings, state_shape=(4,), offset=offset)
        x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        start = np.array([0, 123, 480])
        s0 = system.states(x, start)
        traj = rollout(system, s0, 10)
        states, times = system.unpack(traj)
        for n in range(3):
            xn = x[n:n + 1]
            for step in range(10):
                with torch.no_grad():
                    xn = model(xn, torch.from_numpy(forcings[start[n] + step + offset][None]))
                assert torch.allclose(states[step, n], xn[0], rtol=0, atol=1e-15)
                assert int(times[step, n]) == start[n] + step + 1
        with pytest.raises(ValueError, match="beyond the forcings"):
            rollout(system, s0, 25)


def test_function_system_rollout_and_quantization_leave_the_callers_tensors_alone():
    g = torch.Generator().manual_seed(0)
    params = {"enc.w": torch.randn(3, 16, generator=g), "enc.b": torch.zeros(16),
              "dec.w": torch.randn(16, 3, generator=g)}
    before = {n: p.clone() for n, p in params.items()}

    def step(p, x):
        return x + 0.1 * torch.tanh(x @ p["enc.w"] + p["enc.b"]) @ p["dec.w"]

    system = FunctionSystem(step, params, channel_axis={"enc.w": 1, "dec.w": 1})
    x0 = torch.randn(4, 3, generator=g)
    traj = rollout(system, x0, 5)
    x = x0
    for t in range(5):
        x = step(params, x)
        assert torch.equal(traj[t], x)
    scores = tqslite.probe(system, x0, horizon=3, progress=False, units="block")
    assert list(scores["unit"].values) == ["enc", "dec"]
    qm = tqslite.quantize(system, uniform_plan(system, Int(4)))
    # per output column (axis 1): every column of a 4-bit weight reaches +-7 steps of its own scale
    w, q = params["dec.w"], qm.model.get_parameter("dec.w")
    assert torch.allclose(q.abs().amax(0), w.abs().amax(0), rtol=1e-3)
    assert all(torch.equal(params[n], before[n]) for n in params), "the caller's tensors changed"
    assert not torch.equal(qm.model.get_parameter("dec.w"), params["dec.w"])
    system.set_parameter("dec.w", torch.zeros(16, 3))      # the system's own entry, not the caller's tensor
    assert torch.equal(params["dec.w"], before["dec.w"]) and not system.get_parameter("dec.w").any()
    with pytest.raises(ValueError, match="GPTQ needs a torch module"):
        tqslite.quantize(system, uniform_plan(system, Int(4)), GPTQ(), calibration=x0)


# --------------------------------------------------------------------------------------------
# The guard on the first step
# --------------------------------------------------------------------------------------------

def test_a_step_that_returns_a_block_is_refused_naming_the_adapter():
    block = nn.Linear(512, 48)
    x0 = torch.randn(4, 512)
    for call in (lambda: rollout(block, x0, 3), lambda: tqslite.probe(block, x0, horizon=3, progress=False),
                 lambda: forecast(block, x0, 3)):
        with pytest.raises(ValueError, match=r"returned \(4, 48\) for a state \(4, 512\).*BlockForecaster\(model, "
                                             r"context_length=512, block_length=48\)"):
            call()


def test_quantile_outputs_dtype_and_tuples_are_refused_with_what_came_back():
    class Quant(nn.Module):
        def forward(self, x):
            return x[:, -8:, None].repeat(1, 1, 9)

    with pytest.raises(ValueError, match=r"returned \(2, 8, 9\).*Quantiles"):
        rollout(Quant(), torch.randn(2, 32), 2)

    class Doubles(nn.Module):
        def forward(self, x):
            return x.double()

    with pytest.raises(ValueError, match="returned float64 states for float32"):
        rollout(Doubles(), torch.randn(2, 3), 2)

    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(ValueError, match="returned a tuple"):
        rollout(Pair(), torch.randn(2, 3), 2)


def test_bad_adapter_arguments_get_clear_errors(series):
    model = ConvQuantiles()
    with pytest.raises(ValueError, match="block_length=30 is longer than context_length=24"):
        BlockForecaster(model, 24, 30)
    with pytest.raises(ValueError, match="level=0.45 is not among"):
        Quantiles(LEVELS, level=0.45)
    with pytest.raises(ValueError, match="location='median'"):
        Normalise("median")
    with pytest.raises(TypeError, match="output="):
        BlockForecaster(model, 24, 6, output="median")
    system = BlockForecaster(model, 24, 6, normalise=Normalise(), mask=Mask(), output=Quantiles(LEVELS, axis=1))
    with pytest.raises(ValueError, match="axis 1 has 6 entries, not the 5 quantile levels"):
        rollout(system, system.states(series[:2, :24]), 1)
    unmasked = BlockForecaster(nn.Linear(24, 6), 24, 6)
    with pytest.raises(ValueError, match="fewer than context_length=24.*mask"):
        unmasked.states([series[0, :10]])
    gappy = torch.as_tensor(series[:2, :24], dtype=torch.float32).clone()
    gappy[0, 3] = float("nan")
    with pytest.raises(ValueError, match="takes no mask"):
        rollout(unmasked, gappy, 1)
    with pytest.raises(ValueError, match="BlockForecaster.*mask=Mask"):
        tqslite.probe(nn.Linear(24, 24), gappy, horizon=2, progress=False)


# --------------------------------------------------------------------------------------------
# Missing values in the probe
# --------------------------------------------------------------------------------------------

def test_a_masked_initial_state_with_gaps_is_probed(series):
    model = ConvQuantiles().double()
    system = BlockForecaster(model, 24, 6, normalise=Normalise(), mask=Mask(), output=Quantiles(LEVELS))
    gappy = series[2, :24].copy()
    gappy[[2, 9, 10]] = np.nan
    histories = [series[0, :24], series[1, :12], gappy]
    x0 = system.states(histories)
    before = {n: p.clone() for n, p in model.named_parameters()}
    scores = tqslite.probe(system, x0, horizon=5, units="tensor", progress=False)
    assert np.isfinite(scores["gamma"].values).all() and not scores["nonfinite"].any()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # the divergence of one unit, from the model's own forecast loop: missing values are no difference
    unit = Unit("head.weight", ("head.weight",))
    weights = gaussian_weights(system, unit, Gaussian())
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.head.weight.copy_(weights["head.weight"])
    for n, h in enumerate(histories):
        ref = third_party_forecast(model, h, 5, 24, 6)
        new = third_party_forecast(perturbed, h, 5, 24, 6)
        ctx = np.concatenate([np.full(24 - len(h), np.nan), h])
        for lead in range(1, 6):
            a = np.concatenate([ctx, ref[:6 * lead]])[-24:]
            b = np.concatenate([ctx, new[:6 * lead]])[-24:]
            d = np.sqrt(np.nansum((a - b) ** 2) / 24)
            got = scores["divergence"].sel(unit="head.weight", window=n, lead=lead).item()
            assert got == pytest.approx(d, rel=1e-9)


def test_parallel_probe_of_an_adapter_equals_the_serial_one(series):
    model = ConvQuantiles()
    system = BlockForecaster(model, 24, 6, normalise=Normalise(), mask=Mask(), output=Quantiles(LEVELS))
    x0 = system.states([series[0, :24], series[1, :9]])
    serial = tqslite.probe(system, x0, horizon=3, progress=False)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        parallel = tqslite.probe(system, x0, horizon=3, progress=False, executor=pool)
    np.testing.assert_array_equal(serial["gamma"].values, parallel["gamma"].values)


# --------------------------------------------------------------------------------------------
# Quantizers through the adapters
# --------------------------------------------------------------------------------------------

def test_gptq_calibrates_through_the_whole_step_on_system_states(series):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 6)).double()
    contexts = torch.as_tensor(series[:, 100:124])
    plan = uniform_plan(model, Int(3))
    # no normalisation: the step feeds the model the states themselves, so GPTQ must agree bit for bit
    bare = BlockForecaster(model, 24, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # traced, not the hook fallback
        a = tqslite.quantize(bare, plan, GPTQ(), calibration=contexts)
    b = tqslite.quantize(model, plan, GPTQ(), calibration=contexts)
    for name in ("0.weight", "2.weight"):
        assert a.weights.methods[name] == "gptq"
        assert torch.equal(a.weights.tensors[name].dequantize(), b.weights.tensors[name].dequantize())
    # with normalisation the layers see normalised windows: GPTQ of the bare model on them agrees
    norm = BlockForecaster(model, 24, 6, normalise=Normalise())
    c = tqslite.quantize(norm, plan, GPTQ(), calibration=contexts)
    mu, sd = contexts.mean(1, keepdim=True), contexts.std(1, unbiased=False, keepdim=True)
    d = tqslite.quantize(model, plan, GPTQ(), calibration=(contexts - mu) / sd)
    for name in ("0.weight", "2.weight"):
        assert torch.allclose(c.weights.tensors[name].dequantize(), d.weights.tensors[name].dequantize(),
                              rtol=0, atol=1e-12)
        assert not torch.equal(c.weights.tensors[name].dequantize(), a.weights.tensors[name].dequantize())
    assert isinstance(c.model, BlockForecaster) and c.model.model is not model


def test_gptq_traces_through_states_with_gaps(series):
    # the mask replaces missing values before any layer sees them: the layers' inputs are finite and
    # GPTQ's traced pass is used (no hook fallback, no warning) on contexts that hold NaN
    model = ConvQuantiles().double()
    system = BlockForecaster(model, 24, 6, normalise=Normalise(), mask=Mask(), output=Quantiles(LEVELS))
    gappy = series[3, :20].copy()
    gappy[[4, 5, 11]] = np.nan
    states = system.states([series[0, :24], series[1, :13], gappy, series[2, 30:54]])
    assert torch.isnan(states).any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = tqslite.quantize(system, uniform_plan(system, Int(4)), GPTQ(), calibration=states)
    calibrated = [n for n, m in q.weights.methods.items() if m == "gptq"]
    assert calibrated and all(torch.isfinite(q.weights.tensors[n].dequantize()).all() for n in calibrated)


def test_forced_systems_take_gptq_and_rtn():
    class Driven(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(5)
            self.a = nn.Linear(6, 16)
            self.b = nn.Linear(16, 4)

        def forward(self, x, f):
            return x + 0.1 * self.b(torch.tanh(self.a(torch.cat([x, f], dim=1))))

    model = Driven()
    forcings = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    system = Forced(model, forcings, (4,))
    s0 = system.states(torch.randn(32, 4), np.arange(0, 256, 8))
    plan = uniform_plan(system, Int(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qm = tqslite.quantize(system, plan, GPTQ(), calibration=s0)
    assert qm.weights.methods["a.weight"] == qm.weights.methods["b.weight"] == "gptq"
    err_gptq = (rollout(qm.model, s0, 5) - rollout(system, s0, 5)).pow(2).mean()
    err_rtn = (rollout(tqslite.quantize(system, plan, RTN()).model, s0, 5) - rollout(system, s0, 5)).pow(2).mean()
    assert err_gptq < err_rtn   # calibrated on the states it runs on
    assert system.channel_axis("a.weight") == 0 and system.parameter_names() == [n for n, _ in model.named_parameters()]


def test_adapters_keep_the_models_names_training_flags_and_copies(series):
    model = ConvQuantiles()
    model.train()
    system = BlockForecaster(model, 24, 6, normalise=Normalise(), mask=Mask(), output=Quantiles(LEVELS))
    assert system.parameter_names() == [n for n, _ in model.named_parameters()]
    assert system.module.state_dict().keys() == model.state_dict().keys()
    with system.evaluating():
        assert not model.training and not model.conv.training
    assert model.training and model.conv.training
    twin = copy.deepcopy(system)
    assert twin.model.conv is twin.module.conv and twin.model.conv is not model.conv
