"""The probe at scale: batched units, any device, resumable sweeps and clusters."""

import importlib
import math
import os
import threading
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

import tqslite
from tqslite import Gaussian, GPTQ, Int, QuantResidual, probe
from tqslite.activations import probe_activations
from tqslite.allocation import option_residuals
from tqslite.batched import batched_divergence, check_batchable, parse_bytes, plan_chunks, step_memory
from tqslite.evaluation import compare_plans, forecast
from tqslite.models import pangu_lite, timesfm_lite
from tqslite.sweep import WORKER_CONFIG
from tqslite.systems import swapped
from tqslite.units import resolve_units

probe_module = importlib.import_module("tqslite.probe")  # the module (tqslite.probe is the function)

#: Devices to run on: the CPU, and CUDA where there is one.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def states(n, shape, seed=1, dtype=torch.float64):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def small_pangu(dtype=torch.float64):
    """The pangu_lite patch transformer at toy size: a convolution, attention, layer norms, 18 tensors."""
    torch.manual_seed(0)
    return pangu_lite.build(dict(channels=2, grid=(8, 16), patch=(4, 4), dim=16, depth=1, heads=2)).to(dtype)


def small_timesfm(dtype=torch.float64):
    """The timesfm_lite decoder over patches (causal attention), as a windowed system."""
    torch.manual_seed(0)
    return tqslite.WindowedSystem(timesfm_lite.build(dict(context=16, patch=4, dim=16, depth=1, heads=2)).to(dtype))


class Counting(tqslite.TorchSystem):
    """A TorchSystem that records the batch of each plain step and counts its functional (vmap) steps."""

    def __init__(self, module):
        super().__init__(module)
        self.rows, self.functional_steps = [], 0

    def step(self, x):
        self.rows.append(x.shape[0])
        return super().step(x)

    def functional_step(self, params, x):
        self.functional_steps += 1
        return super().functional_step(params, x)


# --------------------------------------------------------------------------------------------
# Batched units agree with one unit at a time
# --------------------------------------------------------------------------------------------

MODELS = {
    "mlp": lambda: (nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                                  nn.Linear(32, 8)).double(), (8,)),
    "pangu": lambda: (small_pangu(), (2, 8, 16)),
    "timesfm": lambda: (small_timesfm(), (16,)),
}


@pytest.mark.parametrize("units", ["tensor", "block"])
@pytest.mark.parametrize("kind", ["gauss", "quant"])
@pytest.mark.parametrize("name", list(MODELS))
def test_batched_units_score_as_one_unit_at_a_time(name, kind, units):
    torch.manual_seed(0)
    model, shape = MODELS[name]()
    x0 = states(6, shape)
    kw = dict(perturbation=kind, units=units, horizon=5, progress=False)
    one = probe(model, x0, chunk_units=1, **kw)
    for chunk_units, batch_size in ((3, None), (None, 4)):  # chunks of 3; everything in one pass, 2 window batches
        batched = probe(model, x0, chunk_units=chunk_units, memory_budget="1GB", batch_size=batch_size, **kw)
        np.testing.assert_array_equal(batched["eps"], one["eps"])
        np.testing.assert_allclose(batched["divergence"], one["divergence"], rtol=1e-10, atol=0)
        np.testing.assert_allclose(batched["gamma"], one["gamma"], rtol=1e-10, atol=0)
        np.testing.assert_allclose(batched["d_floor"], one["d_floor"], rtol=1e-12, atol=0)  # windows batched by 4
        rounded = ["divergence", "gamma", "curve", "d_floor"]
        xr.testing.assert_identical(batched.drop_vars(rounded), one.drop_vars(rounded))


def test_the_batched_pass_is_what_runs():
    torch.manual_seed(0)
    model, shape = MODELS["mlp"]()
    system = Counting(model)
    probe(system, states(8, shape), horizon=4, chunk_units=3, batch_size=4, progress=False)  # 6 units: 2 chunks
    # the copies of a chunk run as one plain step on 3 x 4 rows: 2 chunks x 2 window batches x 4 steps
    assert system.rows.count(3 * 4) == 2 * 2 * 4
    assert system.functional_steps == 0  # the row blocks, not torch.vmap
    # the rest: reference rollout 2 x 4 steps of 4 windows, the memory measurement (4), where the
    # hooks go (1, 2), and per chunk the check, one window per copy: the copies (3 x 1), then each
    # copy's window plain (1) and with its unit alone (1)
    assert sorted(system.rows) == sorted([4] * (2 * 4 + 1) + [1, 2] + ([3] + [1, 1] * 3) * 2 + [12] * 16)


def test_the_shipped_stand_ins_score_the_same_batched():
    for name in ("pangu_lite", "aurora_lite", "timesfm_lite"):
        system, _ = tqslite.models.load(name)
        shape = (64,) if name == "timesfm_lite" else (7, 32, 64)
        x0 = states(2, shape, dtype=torch.float32) * 0.5
        units = resolve_units("tensor", system.parameter_names())[:8]
        one = probe(system, x0, units=units, horizon=3, chunk_units=1, progress=False)
        batched = probe(system, x0, units=units, horizon=3, chunk_units=8, memory_budget="1GB", progress=False)
        # float32: the batched kernels round differently; the divergences differ by less than d_floor,
        # one unit of float32's resolution at the state's RMS
        gap = np.abs(batched["divergence"] - one["divergence"])
        assert (gap <= one["d_floor"]).all(), (name, float((gap / one["d_floor"]).max()))
        assert (one["divergence"] > 10 * one["d_floor"]).all()  # ... while the divergences themselves are far above


class KeepsGaps(nn.Module):
    """A step that masks missing values (NaN): they stay missing, the rest is updated from the valid ones."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8).double()

    def forward(self, x):
        gap = torch.isnan(x)
        return torch.where(gap, x, torch.tanh(self.lin(torch.where(gap, torch.zeros_like(x), x))))


def test_values_missing_from_the_reference_count_as_no_difference_batched_or_not():
    # A system that masks missing values (accepts_missing) keeps NaN in its rollouts: the batched
    # pass must score those entries as the one-unit probe does (no difference), not as +inf.
    torch.manual_seed(0)
    system = tqslite.TorchSystem(KeepsGaps())
    x0 = states(4, (8,))
    x0[:, :2] = float("nan")
    x0[1, 5] = float("nan")
    ref = tqslite.rollout(system, x0, 3)
    units = resolve_units("tensor", system.parameter_names())
    weights = [probe_module.gaussian_weights(system, u, Gaussian()) for u in units]
    batched = batched_divergence(system, x0, ref, 2, weights)
    for k, w in enumerate(weights):
        with swapped(system, w):
            run = tqslite.rollout(system, x0, 3)
            alone = probe_module.rollout_divergence(system, x0, ref, 2)
        expected = torch.nan_to_num(run - ref).pow(2).mean(-1).sqrt().T.numpy()  # RMS over all 8 elements
        assert (expected > 0).all()
        np.testing.assert_allclose(batched[k], expected, rtol=1e-12, atol=0)
        np.testing.assert_allclose(alone, expected, rtol=1e-12, atol=0)


def test_the_activation_probe_draws_the_same_noise_batched():
    torch.manual_seed(0)
    model, shape = MODELS["pangu"]()
    system = Counting(model)
    x0 = states(4, shape)
    one = probe_activations(system, x0, horizon=4, chunk_units=1, progress=False)
    system.rows.clear()
    batched = probe_activations(system, x0, horizon=4, chunk_units=3, memory_budget="1GB", progress=False)
    # row blocks: every full chunk of 3 layers steps as one plain pass on 3 x 4 rows, 4 steps
    assert system.rows.count(3 * 4) == len(one["unit"]) // 3 * 4 > 0 and system.functional_steps == 0
    # the realised noise size, call by call: another draw would move it by about 1e-3
    np.testing.assert_allclose(batched["eps"], one["eps"], rtol=1e-12, atol=0)
    np.testing.assert_array_equal(batched["n_outputs"], one["n_outputs"])
    np.testing.assert_allclose(batched["divergence"], one["divergence"], rtol=1e-10, atol=0)


def test_the_activation_probe_of_a_model_that_mixes_rows_runs_under_vmap():
    torch.manual_seed(0)
    system = Counting(nn.Sequential(Mixing(), nn.Linear(4, 4).double()))
    x0 = states(5, (4,))
    one = probe_activations(system, x0, horizon=4, chunk_units=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batched = probe_activations(system, x0, horizon=4, chunk_units=2, memory_budget="1GB", progress=False)
    assert 2 in system.rows and 2 * 5 not in system.rows  # row blocks checked (2 copies x 1 window), never run
    np.testing.assert_allclose(batched["eps"], one["eps"], rtol=1e-12, atol=0)
    np.testing.assert_allclose(batched["divergence"], one["divergence"], rtol=1e-10, atol=0)


class Branchy(nn.Module):
    """A forward with a Python branch on a tensor's value: torch.vmap cannot map it."""

    def __init__(self, mix=False):
        super().__init__()
        self.lin = nn.Linear(4, 4).double()
        self.mix = mix

    def forward(self, x):
        if self.mix:  # every row sees the batch mean: copies in one batch would see each other
            x = x - x.mean(0, keepdim=True)
        if x.abs().max() > 100:
            return x
        return torch.tanh(self.lin(x))


class Mixing(nn.Module):
    """Rows that see the batch mean: row blocks would mix the copies, torch.vmap keeps them apart."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4).double()

    def forward(self, x):
        return torch.tanh(self.lin(x - x.mean(0, keepdim=True)))


class Tied(nn.Module):
    """``a.weight`` is used by ``a`` and, directly, by the model: a row-block copy of ``a`` alone misses the second use."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4).double(), nn.Linear(4, 4).double()

    def forward(self, x):
        return torch.tanh(self.b(torch.tanh(self.a(x)))) + 0.1 * torch.tanh(x @ self.a.weight)


class Scaled(nn.Module):
    """A module with its own parameter around a ``Linear``: a unit of both sits at nested hook points."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4).double()
        self.scale = nn.Parameter(torch.ones(4, dtype=torch.float64))

    def forward(self, x):
        return torch.tanh(self.inner(x) * self.scale)


class Gated(NamedTuple):
    value: torch.Tensor
    gate: torch.Tensor


class GatedLayer(nn.Module):
    """A layer that returns a named tuple: its copies' outputs are written into both fields."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4).double()
        self.g = nn.Parameter(torch.linspace(-1, 1, 4, dtype=torch.float64))

    def forward(self, x):
        return Gated(torch.tanh(self.lin(x)), torch.sigmoid(x * self.g))


class GatedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer, self.out = GatedLayer(), nn.Linear(4, 4).double()

    def forward(self, x):
        y = self.layer(x)
        return self.out(y.value * y.gate)


def test_a_layer_that_returns_a_named_tuple_runs_as_row_blocks():
    torch.manual_seed(0)
    model, x0 = GatedModel(), states(5, (4,))
    units = {"layer": ["layer.lin.weight", "layer.lin.bias", "layer.g"], "out": ["out.weight", "out.bias"]}
    for kind in ("quant", "gauss"):
        one = probe(model, x0, horizon=4, units=units, perturbation=kind, chunk_units=1, progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # neither a fallback to vmap nor to one unit at a time
            batched = probe(model, x0, horizon=4, units=units, perturbation=kind, chunk_units=2, progress=False)
        np.testing.assert_allclose(batched["divergence"], one["divergence"], rtol=1e-10, atol=0)


def test_a_unit_at_nested_hook_points_runs_as_row_blocks():
    torch.manual_seed(0)
    model, x0 = nn.Sequential(Scaled(), nn.Linear(4, 4).double()), states(5, (4,))
    units = {"outer": ["0.inner.weight", "0.scale"], "inner": ["0.inner.bias"], "last": ["1.weight", "1.bias"]}
    one = probe(model, x0, horizon=4, units=units, chunk_units=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unit falls back to running alone
        batched = probe(model, x0, horizon=4, units=units, chunk_units=3, progress=False)
    np.testing.assert_allclose(batched["divergence"], one["divergence"], rtol=1e-10, atol=0)


def test_a_python_branch_on_values_runs_as_row_blocks():
    model, x0 = Branchy(), states(5, (4,))
    one = probe(model, x0, horizon=4, chunk_units=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batched = probe(model, x0, horizon=4, chunk_units=2, progress=False)
    np.testing.assert_allclose(batched["divergence"], one["divergence"], rtol=1e-10, atol=0)


def test_a_model_that_mixes_rows_runs_under_vmap():
    system = Counting(Mixing())
    x0 = states(5, (4,))
    one = probe(system, x0, horizon=4, chunk_units=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batched = probe(system, x0, horizon=4, chunk_units=2, progress=False)
    assert system.functional_steps > 0
    np.testing.assert_allclose(batched["divergence"], one["divergence"], rtol=1e-10, atol=0)


def test_a_model_neither_engine_runs_falls_back_with_one_warning():
    model, x0 = Branchy(mix=True), states(5, (4,))
    one = probe(model, x0, horizon=4, chunk_units=1, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = probe(model, x0, horizon=4, chunk_units=2, progress=False)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "Branchy cannot run batched (row blocks: no copy stepped" in messages[0], messages
    assert "torch.vmap: " in messages[0]
    xr.testing.assert_identical(fallback, one)


def test_a_unit_whose_copy_disagrees_is_scored_alone():
    model, x0 = Tied(), states(5, (4,))
    one = probe(model, x0, horizon=4, chunk_units=1, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batched = probe(model, x0, horizon=4, chunk_units=4, progress=False)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and messages[0].startswith("1 of 4 units step differently as row blocks than alone "
                                                         "(a.weight)"), messages
    np.testing.assert_allclose(batched["divergence"], one["divergence"], rtol=1e-10, atol=0)


def test_a_fused_layer_runs_as_row_blocks():
    # nn.TransformerEncoderLayer in eval mode runs one fused kernel that reads its children's
    # weights directly, unless a hook is attached to one of them: the row blocks attach one to
    # every module they run, so the children are called and rerun as in hook_points
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).double()
    x0 = states(3, (5, 8))
    system = tqslite.as_system(layer)
    with system.evaluating():
        engine = tqslite.row_blocks.hook_points(system, ["linear1.weight", "self_attn.out_proj.weight"], x0[:1])
    # MultiheadAttention reads out_proj.weight itself: its copies are rerun by the attention module
    assert dict(engine.points) == {"linear1.weight": "linear1", "self_attn.out_proj.weight": "self_attn"}
    assert layer.training  # given back as it was
    one = probe(layer, x0, horizon=3, chunk_units=1, progress=False)
    for chunk_units in (2, 12):  # a chunk of linear1's weight and bias alone: only stacked products
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            batched = probe(layer, x0, horizon=3, chunk_units=chunk_units, memory_budget="1GB", progress=False)
        np.testing.assert_allclose(batched["divergence"], one["divergence"], rtol=1e-10)


class SequenceFirst(nn.Module):
    """States ``(B, L, d)`` through a sequence-first encoder layer ``(L, B, d)``: rows are not batch-major inside."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=False).double()

    def forward(self, x):
        return self.layer(x.transpose(0, 1)).transpose(0, 1)


def test_a_sequence_first_layout_is_never_scored_as_row_blocks():
    # inside the layer the batch is dim 1: no module there may be cut by rows; the copies that
    # only the row blocks could run disagree in the check and are scored another way
    torch.manual_seed(0)
    model, x0 = SequenceFirst(), states(3, (4, 8))
    one = probe(model, x0, horizon=3, chunk_units=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batched = probe(model, x0, horizon=3, chunk_units=12, memory_budget="1GB", progress=False)
    np.testing.assert_allclose(batched["divergence"], one["divergence"], rtol=1e-10)
    system = tqslite.as_system(model)
    with system.evaluating():
        engine = tqslite.row_blocks.hook_points(system, ["layer.linear1.weight"], x0[:1])
    assert dict(engine.points) == {"layer.linear1.weight": "layer.linear1"}
    assert engine.layouts == (("layer.linear1", (False,), (False,)),)  # (L, B, d): the leading dim is not the batch


def test_operators_without_a_batching_rule_are_named():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).double()
    system = tqslite.as_system(layer)
    with system.evaluating():
        weights = [probe_module.gaussian_weights(system, u, Gaussian())
                   for u in resolve_units("tensor", system.parameter_names())[:2]]
        assert check_batchable(system, states(3, (5, 8)), weights) == ["aten::_transformer_encoder_layer_fwd"]


def test_a_pass_that_runs_out_of_memory_is_split_in_halves(monkeypatch):
    torch.manual_seed(0)
    model, shape = MODELS["mlp"]()
    x0 = states(4, shape)
    one = probe(model, x0, horizon=3, chunk_units=1, progress=False)
    sizes = []
    real = probe_module.row_blocks.divergence

    def small_device(system, engine, x0, ref, batch_size, weights):
        sizes.append(len(weights))
        if len(weights) > 2:
            raise torch.OutOfMemoryError("pretend: too many copies")
        return real(system, engine, x0, ref, batch_size, weights)

    monkeypatch.setattr(probe_module.row_blocks, "divergence", small_device)
    split = probe(model, x0, horizon=3, chunk_units=6, memory_budget="1GB", progress=False)
    assert sizes == [6, 3, 2, 3, 2]  # 6 -> 3 + 3 -> (1 + 2) + (1 + 2); single units run in place
    np.testing.assert_allclose(split["divergence"], one["divergence"], rtol=1e-10, atol=0)


# --------------------------------------------------------------------------------------------
# Chunks and memory
# --------------------------------------------------------------------------------------------

def test_chunks_fit_the_budget():
    units = [("a",), ("b",), ("c", "d"), ("e",), ("f",)]
    nbytes = dict(a=100, b=100, c=50, d=50, e=1000, f=10)
    # K units need K * (bytes of their tensors + activations), activations 20 per copy:
    # [0, 1] 2 * 220 = 440, [0, 1, 2] 3 * 320 = 960, [2, 3] 2 * 1120, [3, 4] 2 * 1030 = 2060
    assert plan_chunks(units, nbytes, 20, budget=1000) == [[0, 1, 2], [3], [4]]
    assert plan_chunks(units, nbytes, 20, budget=900) == [[0, 1], [2], [3], [4]]
    assert plan_chunks(units, nbytes, 20, budget=2100) == [[0, 1, 2], [3, 4]]
    assert plan_chunks(units, nbytes, 20, budget=10**9, max_units=2) == [[0, 1], [2, 3], [4]]
    assert plan_chunks(units, nbytes, 20, budget=1) == [[0], [1], [2], [3], [4]]  # none fits: one at a time
    for budget in (300, 500, 900, 2000, 5000):
        for chunk in plan_chunks(units, nbytes, 20, budget):
            need = len(chunk) * (sum(nbytes[n] for i in chunk for n in units[i]) + 20)
            assert len(chunk) == 1 or need <= budget


def test_step_memory_is_the_peak_of_live_tensors():
    x = torch.zeros(1000)  # 4000 bytes

    def chain(x):  # at most two intermediates alive at once
        y = x * 2
        y = y * 3
        y = y * 4
        return y

    def growing(x):  # each intermediate twice the last, the one before it released
        a = x * 2
        b = torch.cat([a, a])
        del a
        c = torch.cat([b, b])
        del b
        return c * 1

    assert step_memory(lambda x: x * 2, x) == 4000
    assert step_memory(chain, x) == 8000
    assert step_memory(growing, x) == 16000 + 16000  # c and c * 1 at the end; a and b were gone
    assert step_memory(lambda x: torch.cat([x * 2, x * 3]), x) == 4000 + 4000 + 8000
    assert step_memory(lambda x: (x * 2).view(10, 100).transpose(0, 1), x) == 4000  # views share a storage


def test_memory_budgets_read_as_bytes():
    assert parse_bytes(1024) == 1024
    assert parse_bytes("512MB") == 512 * 10**6
    assert parse_bytes("2GiB") == 2 * 2**30
    assert parse_bytes("1.5 GB") == 1_500_000_000
    for bad in ("lots", "-1GB", 0, True, "1XB"):
        with pytest.raises(ValueError, match="memory_budget"):
            parse_bytes(bad)


def test_bad_engine_settings_get_clear_errors(mlp, x0):
    with pytest.raises(ValueError, match="chunk_units=0"):
        probe(mlp, x0, chunk_units=0, progress=False)
    with pytest.raises(ValueError, match="memory_budget='lots'"):
        probe(mlp, x0, memory_budget="lots", progress=False)


# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------

def everything_on(model, x0):
    """Each device-dependent path of the issue once: probes, residuals, GPTQ, forecasts, comparisons."""
    names = [n for n, _ in model.named_parameters()]
    plan = tqslite.uniform_plan(model, 4)
    return dict(
        gauss=probe(model, x0, horizon=3, progress=False),
        batched=probe(model, x0, horizon=3, chunk_units=3, memory_budget="1GB", progress=False),
        quant=probe(model, x0, horizon=3, perturbation=QuantResidual(Int(3)), progress=False),
        activations=probe_activations(model, x0, horizon=3, chunk_units=2, memory_budget="1GB", progress=False),
        residuals=option_residuals(model, resolve_units("tensor", names), [Int(4), Int(2), tqslite.Float16()]),
        gptq={n: w.cpu() for n, w in GPTQ().quantize_weights(model, {n: Int(4) for n in names}, x0).dequantized().items()},
        forecast=forecast(model, x0, 3),
        compare=compare_plans(model, {"int4": plan}, x0, 3),
    )


def assert_same(a: dict, b: dict, rtol=0.0):
    for key in a:
        if isinstance(a[key], (xr.Dataset, xr.DataArray)):
            xr.testing.assert_allclose(a[key], b[key], rtol=rtol, atol=0) if rtol else xr.testing.assert_identical(
                a[key], b[key])
        elif isinstance(a[key], dict):
            for n in a[key]:
                torch.testing.assert_close(a[key][n], b[key][n], rtol=rtol, atol=0)
        else:
            np.testing.assert_allclose(a[key], b[key], rtol=rtol, atol=0)


def test_nothing_is_allocated_on_the_default_device():
    # With "meta" as the default device, a tensor made without an explicit device has no data:
    # anything in these paths that allocates on the default device (instead of the model's) fails.
    torch.manual_seed(0)
    model, shape = MODELS["mlp"]()
    x0 = states(6, shape)
    plain = everything_on(model, x0)
    with torch.device("meta"):
        elsewhere = everything_on(model, x0)
    assert_same(plain, elsewhere)


@pytest.mark.parametrize("device", DEVICES)
def test_the_same_seed_gives_the_same_scores_on_every_device(device):
    torch.manual_seed(0)
    model, shape = MODELS["mlp"]()
    x0 = states(6, shape)
    on_cpu = everything_on(model, x0)
    on_device = everything_on(model.to(device), x0.to(device))  # noise drawn on the CPU, moved
    assert next(model.parameters()).device.type == device  # the model stayed where it was put
    assert_same(on_cpu, on_device, rtol=1e-9 if device != "cpu" else 0.0)


# --------------------------------------------------------------------------------------------
# Resumable sweeps
# --------------------------------------------------------------------------------------------

class Interrupted(Exception):
    pass


class StopsAfter(tqslite.TorchSystem):
    """A TorchSystem that stops the sweep (as Ctrl-C would) after a number of steps."""

    def __init__(self, module, steps):
        super().__init__(module)
        self.left = steps

    def step(self, x):
        self.left -= 1
        if self.left < 0:
            raise Interrupted
        return super().step(x)


def computed_units(monkeypatch):
    """Record the units whose perturbed rollouts run (the probe's unit of work)."""
    seen = []
    real = probe_module.score_units

    def spy(system, x0, ref, batch_size, perturbation, batched, units, quantized):
        seen.extend(u.label for u in units)
        return real(system, x0, ref, batch_size, perturbation, batched, units, quantized)

    monkeypatch.setattr(probe_module, "score_units", spy)
    return seen


@pytest.mark.parametrize("kind", ["gauss", "quant"])
def test_an_interrupted_sweep_resumes_to_the_uninterrupted_result(kind, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, shape = MODELS["mlp"]()
    x0 = states(6, shape)
    kw = dict(perturbation=kind, units="tensor", horizon=4, progress=False)
    whole = probe(model, x0, chunk_units=1, **kw)
    file = tmp_path / "sweep.nc"
    with pytest.raises(Interrupted):  # the reference (4 steps), then 2 units of 4 steps, then stop
        probe(StopsAfter(model, 4 + 2 * 4 + 1), x0, chunk_units=1, checkpoint=file, **kw)
    kept = xr.load_dataset(file)
    assert list(kept["unit"].values) == ["0.weight", "0.bias"]
    seen = computed_units(monkeypatch)
    resumed = probe(model, x0, chunk_units=1, checkpoint=file, **kw)
    assert seen == ["2.weight", "2.bias", "4.weight", "4.bias"]  # only what the file lacked
    xr.testing.assert_identical(resumed, whole)
    # once finished, the file is the whole sweep: nothing is computed again
    seen.clear()
    again = probe(model, x0, chunk_units=1, checkpoint=file, **kw)
    assert seen == []
    xr.testing.assert_identical(again, whole)


def test_a_sweep_resumes_with_another_chunk_size(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, shape = MODELS["pangu"]()
    x0 = states(4, shape)
    kw = dict(horizon=4, progress=False)
    whole = probe(model, x0, chunk_units=4, memory_budget="1GB", **kw)
    file = tmp_path / "sweep.nc"
    with pytest.raises(Interrupted):
        probe(StopsAfter(model, 4 + 3 * 4 + 1), x0, chunk_units=1, checkpoint=file, **kw)
    seen = computed_units(monkeypatch)
    resumed = probe(model, x0, chunk_units=4, memory_budget="1GB", checkpoint=file, **kw)
    assert len(seen) == whole.sizes["unit"] - 3
    np.testing.assert_allclose(resumed["divergence"], whole["divergence"], rtol=1e-10, atol=0)
    xr.testing.assert_identical(resumed.drop_vars(["divergence", "gamma", "curve"]),
                                whole.drop_vars(["divergence", "gamma", "curve"]))


def other_weights(model):
    other = __import__("copy").deepcopy(model)
    with torch.no_grad():
        other[2].weight[0, 0] += 1e-6
    return other


@pytest.mark.parametrize("change, what", [
    (dict(model=other_weights), "model_sha256"),
    (dict(x0=lambda x: x + 1e-9), "windows_sha256"),
    (dict(horizon=5), "settings.horizon is 4 there, 5 here"),
    (dict(perturbation=Gaussian(seed=1)), "settings.seed is 0 there, 1 here"),
    (dict(perturbation=Gaussian(sigma_rel=2e-2)), "settings.sigma_rel is 0.01 there, 0.02 here"),
    (dict(units="block"), "settings.units is"),
    (dict(perturbation="quant"), 'settings.kind is "gauss" there, "quant" here'),
])
def test_a_sweep_file_from_another_model_or_settings_is_refused(change, what, tmp_path):
    torch.manual_seed(0)
    model, shape = MODELS["mlp"]()
    x0 = states(4, shape)
    file = tmp_path / "sweep.nc"
    kw = dict(horizon=4, perturbation=Gaussian(), units="tensor", progress=False, checkpoint=file)
    probe(model, x0, **kw)
    before = file.read_bytes()
    model = change.pop("model", lambda m: m)(model)
    x0 = change.pop("x0", lambda x: x)(x0)
    with pytest.raises(ValueError, match="was written by another sweep") as err:
        probe(model, x0, **(kw | change))
    assert what in str(err.value) and "delete the file or give another checkpoint path" in str(err.value)
    assert file.read_bytes() == before


def test_a_file_that_is_not_a_sweep_is_refused_and_left_alone(tmp_path, mlp, x0):
    file = tmp_path / "other.nc"
    xr.Dataset({"a": ("x", [1.0])}).to_netcdf(file)
    with pytest.raises(ValueError, match="not a tqslite sweep file"):
        probe(mlp, x0, horizon=2, checkpoint=file, progress=False)
    file.write_text("garbage")
    with pytest.raises(ValueError, match="cannot be read as a sweep file"):
        probe(mlp, x0, horizon=2, checkpoint=file, progress=False)
    assert file.read_text() == "garbage"


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path, monkeypatch, mlp, x0):
    file = tmp_path / "sweep.nc"
    with pytest.raises(Interrupted):
        probe(StopsAfter(mlp, 3 + 2 * 3 + 1), x0, horizon=3, chunk_units=1, checkpoint=file, progress=False)
    good = file.read_bytes()
    real = xr.Dataset.to_netcdf

    def disk_full(self, path, *args, **kwargs):
        real(self, path, *args, **kwargs)
        Path(path).write_bytes(Path(path).read_bytes()[:100])  # half a file, then the failure
        raise OSError("No space left on device")

    monkeypatch.setattr(xr.Dataset, "to_netcdf", disk_full)
    with pytest.raises(OSError, match="No space"):
        probe(mlp, x0, horizon=3, chunk_units=1, checkpoint=file, progress=False)
    assert file.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.nc"]  # no temporary file left behind


# --------------------------------------------------------------------------------------------
# A cluster
# --------------------------------------------------------------------------------------------

class DiesOnce(nn.Module):
    """An MLP whose forward, in a dask worker, kills its process once ``marker`` exists.

    The worker dies in the middle of a chunk (on the third step after it sees the marker), the
    way a machine of a cluster goes away; the marker is taken by renaming, so only one dies.
    """

    def __init__(self, marker: str, driver: int):
        super().__init__()
        self.net = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)]).double()
        self.marker, self.driver, self.seen = marker, driver, 0

    def forward(self, x):
        time.sleep(0.05)
        if os.getpid() != self.driver and os.path.exists(self.marker):
            self.seen += 1
            if self.seen == 3:
                try:
                    os.rename(self.marker, self.marker + ".taken")
                except FileNotFoundError:
                    pass
                else:
                    os._exit(1)
        return torch.tanh(self.net(x))


def test_a_worker_killed_mid_sweep_loses_no_finished_unit(tmp_path):
    distributed, dask = pytest.importorskip("distributed"), pytest.importorskip("dask")
    torch.manual_seed(0)
    marker = tmp_path / "kill-a-worker"
    model = DiesOnce(str(marker), os.getpid())
    x0 = states(4, (8,))
    kw = dict(horizon=6, chunk_units=2, memory_budget="1GB", progress=False)  # 8 units: 4 chunks of 2
    serial = probe(model, x0, **kw)
    file = tmp_path / "sweep.nc"
    finished_at_kill = []

    def kill_a_worker_once_a_chunk_is_in():
        while not file.exists():
            time.sleep(0.01)
        finished_at_kill.extend(xr.load_dataset(file)["unit"].values.tolist())
        marker.touch()

    with dask.config.set(WORKER_CONFIG), \
            distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client, distributed.get_task_stream(client) as stream:
        killer = threading.Thread(target=kill_a_worker_once_a_chunk_is_in, daemon=True)
        killer.start()
        remote = probe(model, x0, executor=client, checkpoint=file, **kw)
        killer.join(timeout=10)
    assert Path(str(marker) + ".taken").exists()  # a worker did die, in the middle of a chunk
    assert 0 < len(finished_at_kill) < 8
    xr.testing.assert_identical(remote, serial)
    kept = xr.load_dataset(file)
    np.testing.assert_array_equal(kept["divergence"].sel(unit=remote["unit"].values), remote["divergence"])
    runs = [str(t["key"]) for t in stream.data if str(t["key"]).startswith("tqslite-probe")]
    assert {int(k.rsplit("-", 1)[1]) for k in runs} == set(range(4))  # every chunk finished
    assert len(runs) - len(set(runs)) <= 1  # at most the chunk whose result died with the worker ran twice
