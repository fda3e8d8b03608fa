"""The shipped stand-in models: probes run on them, the ONNX black box matches torch, the
checkpoints are what their JSON says, and corrupted ones are refused."""

import copy
import shutil

import numpy as np
import pytest
import torch

import tqslite
from tqslite import data as D
from tqslite import models, splits, train

from tqslite.onnx_system import OnnxSystem, export_onnx

GRID_MODELS = ["pangu_lite", "aurora_lite"]


class Loaded(dict):
    """Shipped checkpoints, each loaded on first use: ``loaded[name] -> (system, meta)``;
    ``"pangu_lite_onnx"`` is pangu_lite run by onnxruntime."""

    def __missing__(self, name):
        if name == "pangu_lite_onnx":
            self[name] = models.load("pangu_lite", backend="onnx")
        else:
            self[name] = models.load(name)
        return self[name]


@pytest.fixture(scope="module")
def loaded():
    return Loaded()


@pytest.fixture(scope="module")
def heldout_states(loaded):
    """Normalised held-out Held--Suarez states ``(time, channel, lat, lon)`` (stats from the checkpoint)."""
    meta = loaded["pangu_lite"][1]
    stats = D.stats_from_dict(meta["normalization"])
    return D.stack_grid(D.normalize(D.load_dataset("held_suarez_heldout"), stats), meta["data"]["variables"])


def initial_states(name, loaded, heldout_states, n):
    if name.startswith("timesfm"):
        meta = loaded[name][1]
        ds = D.load_dataset(meta["data"]["dataset"])
        stats = D.stats_from_dict(meta["normalization"])
        series = D.stack_series(D.normalize(ds, stats), meta["data"]["variables"][0])
        return torch.from_numpy(D.series_windows(series, meta["architecture"]["context"], n).values)
    return torch.from_numpy(D.initial_states(heldout_states, n).values)


@pytest.mark.parametrize("granularity", ["tensor", "block"])
@pytest.mark.parametrize("name", ["pangu_lite_onnx", "aurora_lite", "timesfm_lite"])
def test_the_probe_runs_on_every_model(name, granularity, loaded, heldout_states):
    system = loaded[name][0]
    x0 = initial_states(name, loaded, heldout_states, 2)
    scores = tqslite.probe(system, x0, units=granularity, horizon=2, progress=False)
    gamma, dead = scores["gamma"].values, scores["dead"].values
    assert len(gamma) == len(set(scores["unit"].values)) > 1
    assert np.all(np.isfinite(gamma) | dead), scores["unit"].values[~(np.isfinite(gamma) | dead)]
    assert not scores["nonfinite"].any()
    if granularity == "block":
        expected = {"pangu_lite_onnx": {"patch_embed", "pos_embed", "blocks", "norm", "patch_recovery"},
                    "aurora_lite": {"encoder", "processor", "decoder"},
                    "timesfm_lite": {"input_proj", "pos_embed", "blocks", "norm", "output_proj"}}[name]
        assert set(scores["unit"].values) == expected


def test_block_units_of_the_onnx_graph_are_the_torch_blocks(loaded):
    torch_names = loaded["pangu_lite"][0].parameter_names()
    onnx_sys = loaded["pangu_lite_onnx"][0]
    assert sorted(onnx_sys.parameter_names()) == sorted(torch_names)
    units = {u.label: set(u.params) for u in tqslite.make_units(onnx_sys.parameter_names(), tqslite.BlockUnits(2))}
    assert units["blocks.1"] == {n for n in torch_names if n.startswith("blocks.1.")}
    # a Linear weight applied to tokens is a MatMul initializer (in, out): its output channel is axis 1
    w = onnx_sys.get_parameter("blocks.0.attn.qkv.weight")
    assert tuple(w.shape) == (64, 192) and onnx_sys.channel_axis("blocks.0.attn.qkv.weight") == 1
    assert onnx_sys.channel_axis("patch_embed.weight") == 0


def test_onnx_and_torch_agree_over_a_20_step_rollout(loaded, heldout_states):
    x0 = torch.from_numpy(D.initial_states(heldout_states, 4).values)
    a = tqslite.rollout(loaded["pangu_lite"][0], x0, 20)
    b = tqslite.rollout(loaded["pangu_lite_onnx"][0], x0, 20)
    assert b.dtype == torch.float32
    # float32 kernels differ (onnxruntime vs torch) in the last bits; over 20 steps (5 days) the
    # difference stays below 1e-4 in normalised units (fields are of order 1).
    torch.testing.assert_close(b, a, rtol=0, atol=1e-4)


def test_a_quantized_onnx_copy_matches_the_quantized_torch_model(loaded, heldout_states):
    torch_sys, onnx_sys = loaded["pangu_lite"][0], loaded["pangu_lite_onnx"][0]
    before = {n: onnx_sys.get_parameter(n).clone() for n in onnx_sys.parameter_names()}
    # the graph stores a token Linear's weight transposed, as MatMul's (in, out): a plan is made on the
    # system it is applied to, and the per-output-channel axis is read from the consuming node
    with pytest.raises(ValueError, match="has shape \\(192, 64\\), the model's \\(64, 192\\)"):
        tqslite.apply_plan(onnx_sys, tqslite.uniform_plan(torch_sys, 4, units="block"))
    q_onnx = tqslite.apply_plan(onnx_sys, tqslite.uniform_plan(onnx_sys, 4, units="block"))
    q_torch = tqslite.apply_plan(torch_sys.module, tqslite.uniform_plan(torch_sys, 4, units="block"))
    assert all(torch.equal(onnx_sys.get_parameter(n), w) for n, w in before.items())   # original untouched
    x0 = torch.from_numpy(D.initial_states(heldout_states, 2).values)
    with torch.no_grad():
        ref = tqslite.rollout(tqslite.TorchSystem(q_torch.eval()), x0, 5)
    got = tqslite.rollout(q_onnx, x0, 5)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)   # same per-output-channel RTN on both sides
    assert (got - tqslite.rollout(onnx_sys, x0, 5)).abs().max() > 1e-3  # and 4-bit weights do change it


def test_probing_the_onnx_graph_and_the_torch_model_ranks_units_alike(loaded, heldout_states):
    x0 = torch.from_numpy(D.initial_states(heldout_states, 2).values)
    kw = dict(perturbation="quant", units="tensor", horizon=4, progress=False)
    s_torch = tqslite.probe(loaded["pangu_lite"][0], x0, **kw)
    s_onnx = tqslite.probe(loaded["pangu_lite_onnx"][0], x0, **kw)
    labels = list(s_torch["unit"].values)
    g_torch = s_torch["gamma"].sel(unit=labels).values
    g_onnx = s_onnx["gamma"].sel(unit=labels).values
    assert tqslite.spearman(g_torch, g_onnx) > 0.99
    np.testing.assert_allclose(g_onnx, g_torch, atol=1e-3)


@pytest.mark.parametrize("name", list(models.MODELS))
def test_shipped_checkpoints_beat_persistence_and_match_their_recorded_skill(name, loaded, heldout_states):
    """Re-evaluate each checkpoint now, on held-out data, with the settings recorded in its JSON."""
    system, meta = loaded[name]
    recorded = meta["skill"]["heldout"]
    if name == "timesfm_lite":
        states = splits.prepare(name).heldout      # the test period of the station records
    else:
        states = heldout_states
    # the recorded windows, rolled out over the first leads only (the full horizon is slow)
    skill = train.evaluate(name, system, states, meta, recorded["n_windows"], recorded["horizon"], max_lead=4)
    leads = [lead for lead in recorded["leads"] if lead <= 4]
    model = skill["rmse"].sel(forecast="model", lead=leads).values
    persistence = skill["rmse"].sel(forecast="persistence", lead=leads).values
    assert model[0] < persistence[0], f"{name} does not beat persistence at lead 1"
    n = len(leads)
    np.testing.assert_allclose(model, recorded["rmse_normalised"]["model"][:n], rtol=1e-4)
    np.testing.assert_allclose(persistence, recorded["rmse_normalised"]["persistence"][:n], rtol=1e-4)
    assert recorded["beats_persistence_at_lead_1"]


def test_a_corrupted_checkpoint_is_refused(tmp_path):
    for f in ("pangu_lite.pt", "pangu_lite.json", "pangu_lite.onnx", "SHA256SUMS"):
        shutil.copy(models.CHECKPOINT_DIR / f, tmp_path / f)
    models.load("pangu_lite", checkpoint_dir=tmp_path)          # the pristine copy loads
    for f in ("pangu_lite.pt", "pangu_lite.onnx"):
        raw = bytearray((tmp_path / f).read_bytes())
        raw[len(raw) // 2] ^= 0x01
        (tmp_path / f).write_bytes(bytes(raw))
    with pytest.raises(D.ChecksumError) as err:
        models.load("pangu_lite", checkpoint_dir=tmp_path)
    assert "pangu_lite.pt" in str(err.value) and "python -m tqslite.train pangu_lite" in str(err.value)
    with pytest.raises(D.ChecksumError, match="pangu_lite.onnx"):
        models.load("pangu_lite", backend="onnx", checkpoint_dir=tmp_path)


@pytest.mark.parametrize("name", list(models.MODELS))
def test_retraining_with_the_recorded_seed_reproduces_the_first_steps(name, loaded):
    """Full retraining takes minutes per model, too slow for CI: retrain the first 30 steps with
    the recorded seed and the full run's learning-rate schedule, and compare the per-step losses
    with ``loss_first_steps`` at the relative tolerance recorded in the JSON (1e-4: same data
    order and initial weights; only floating-point summation order may differ across machines)."""
    meta = loaded[name][1]
    rep = meta["reproducibility"]
    assert meta["data"]["sha256"] == D.load_dataset(meta["data"]["dataset"]).attrs["sha256"]
    _, record = train.fit(name, splits.prepare(name), stop_after=rep["check_steps"], progress=False)
    np.testing.assert_allclose(record["loss_first_steps"], meta["loss_first_steps"][:rep["check_steps"]],
                               rtol=rep["rtol"])


def test_checkpoint_metadata_records_how_it_was_made(loaded):
    for name in models.MODELS:
        meta = loaded[name][1]
        for key in ("seed", "torch_version", "training_seconds", "loss_curve", "architecture", "training", "skill"):
            assert key in meta, f"{name}.json lacks {key}"
        assert meta["data"]["sha256"] == D.read_checksums(D.DATA_DIR / "SHA256SUMS")[meta["data"]["file"]]
        system = loaded[name][0]
        assert meta["n_parameters"] == sum(p.numel() for p in system.module.parameters()), name
        assert len(meta["loss_curve"]["step"]) == len(meta["loss_curve"]["loss"]) > 10


def test_export_keeps_torch_names_and_the_system_deep_copies(tmp_path):
    torch.manual_seed(0)
    model = models.pangu_lite.build(dict(depth=1, dim=32, heads=2))
    path = export_onnx(model, torch.randn(2, 7, 32, 64), tmp_path / "tiny.onnx")
    system = OnnxSystem(path)
    assert sorted(system.parameter_names()) == sorted(n for n, _ in model.named_parameters())
    x = torch.randn(3, 7, 32, 64)
    torch.testing.assert_close(system.step(x), model(x).detach(), rtol=0, atol=1e-5)
    twin = copy.deepcopy(system)
    twin.set_parameter("norm.weight", torch.zeros(32))
    assert not torch.equal(twin.step(x), system.step(x))
    assert torch.count_nonzero(system.get_parameter("norm.weight")) == 32
    with pytest.raises(ValueError, match="shape"):
        twin.set_parameter("norm.weight", torch.zeros(3))
    saved = OnnxSystem(twin.save(tmp_path / "saved.onnx"))
    torch.testing.assert_close(saved.step(x), twin.step(x))
