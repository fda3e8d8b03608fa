"""Packed checkpoints: bit-identical round trips, bytes on disk against the plan's size, refusals."""

import os
import struct

import numpy as np
import pytest
import safetensors.numpy
import torch
import xarray as xr
from torch import nn

import tqslite
from tqslite import GPTQ, Float16, Int, KeepFloat, MSEClip, PerChannel, PerGroup, PerTensor, Plan, plan_size, quantize
from tqslite.checkpoint import (CheckpointError, checkpoint_sizes, load_checkpoint, read_metadata,
                                save_checkpoint)
from tqslite.cli import main
from tqslite.evaluation import forecast
from tqslite.models import load
from tqslite.splits import heldout_windows

torch.set_num_threads(1)


def small_model(width=32, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, width), nn.GELU(), nn.Linear(width, width), nn.LayerNorm(width),
                         nn.Linear(width, 16)).to(dtype)


def states(n=32, seed=1):
    return torch.randn(n, 16, generator=torch.Generator().manual_seed(seed))


def same_parameters(a, b) -> bool:
    a, b = tqslite.as_system(a), tqslite.as_system(b)
    return a.parameter_names() == b.parameter_names() and all(
        torch.equal(a.get_parameter(n), b.get_parameter(n)) for n in a.parameter_names())


def mixed_plan(model):
    configs = {"0.weight": Int(3, PerGroup(16), symmetric=False), "0.bias": Int(8, PerTensor()),
               "2.weight": Int(5, PerChannel()), "2.bias": Float16(), "3.weight": Int(2, symmetric=False),
               "4.weight": Int(7, PerGroup(8)), "4.bias": KeepFloat()}
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n in configs}
    return Plan(configs, {n: (n,) for n in configs}, shapes, {"made by": "hand"})  # 3.bias: outside the plan


CONFIGS = [Int(b, g, s) for b in (2, 3, 4, 5, 6, 7, 8) for g in (PerChannel(), PerGroup(16), PerTensor())
           for s in (True, False)] + [Int(1, PerGroup(8), symmetric=False)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label)
def test_round_trip_is_bit_identical_for_every_format(config, tmp_path):
    model = small_model()
    qm = quantize(model, tqslite.uniform_plan(model, config))
    path = save_checkpoint(qm, tmp_path / "q.safetensors")
    back = load_checkpoint(path, small_model(seed=5))  # another initialisation of the same architecture
    assert same_parameters(back.model, qm.model)
    assert back.plan == qm.plan
    for name, qt in qm.weights.tensors.items():
        b = back.weights.tensors[name]
        assert torch.equal(b.codes, qt.codes) and torch.equal(b.scale, qt.scale) and torch.equal(b.zero, qt.zero)
        assert b.fmt == qt.fmt and b.shape == qt.shape and b.dtype == qt.dtype


@pytest.mark.parametrize("quantizer", ["rtn", MSEClip(), GPTQ()], ids=["rtn", "mse", "gptq"])
def test_round_trip_of_a_mixed_plan_with_every_quantizer(quantizer, tmp_path):
    model = small_model()
    plan = mixed_plan(model)
    qm = quantize(model, plan, quantizer, calibration=states())
    path = save_checkpoint(qm, tmp_path / "q.safetensors", info={"note": "mixed"})
    back = load_checkpoint(path, small_model(seed=3))
    assert same_parameters(back.model, qm.model)
    assert back.plan == plan and back.weights.methods == qm.weights.methods
    assert read_metadata(path)["info"] == {"note": "mixed"}


def test_gptq_weights_are_not_rtn_weights_and_both_survive(tmp_path):
    # guards the test above: were GPTQ's codes replaced by RTN's on the way, the files would agree
    model = small_model()
    plan = tqslite.uniform_plan(model, Int(3, PerGroup(16)))
    files = {}
    for q in ("rtn", "gptq"):
        files[q] = load_checkpoint(save_checkpoint(quantize(model, plan, q, calibration=states()),
                                                   tmp_path / f"{q}.safetensors"), small_model())
    assert not torch.equal(files["rtn"].model[2].weight, files["gptq"].model[2].weight)


def test_float64_models_and_block_units_round_trip(tmp_path, mlp):
    plan = tqslite.uniform_plan(mlp, Int(4, PerGroup(8)), units=tqslite.BlockUnits(depth=1))
    qm = quantize(mlp, plan)
    back = load_checkpoint(save_checkpoint(qm, tmp_path / "q.safetensors"), mlp)
    assert same_parameters(back.model, qm.model) and back.model[0].weight.dtype == torch.float64
    assert back.plan == plan


def test_weights_and_model_instead_of_a_quantized_model(tmp_path):
    model = small_model()
    qm = quantize(model, mixed_plan(model))
    path = save_checkpoint(qm.weights, tmp_path / "q.safetensors", model=model)
    back = load_checkpoint(path, small_model(seed=9))
    assert same_parameters(back.model, qm.model)
    assert set(back.plan) == set(qm.weights.configs)  # one unit per tensor
    with pytest.raises(ValueError, match="need the model"):
        save_checkpoint(qm.weights, tmp_path / "r.safetensors")


def test_loading_leaves_the_given_model_alone_unless_inplace(tmp_path):
    model = small_model()
    qm = quantize(model, tqslite.uniform_plan(model, 4))
    path = save_checkpoint(qm, tmp_path / "q.safetensors")
    target = small_model(seed=7)
    before = {n: p.clone() for n, p in target.named_parameters()}
    load_checkpoint(path, target)
    assert all(torch.equal(p, before[n]) for n, p in target.named_parameters())
    load_checkpoint(path, target, inplace=True)
    assert same_parameters(target, qm.model)


# --------------------------------------------------------------------------------------------
# Bytes on disk
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [Int(2), Int(3, PerGroup(16)), Int(4, symmetric=False), Int(5), Int(8)],
                         ids=lambda c: c.label)
def test_bytes_on_disk_are_the_plans_size_plus_the_header(config, tmp_path):
    model = small_model(width=48)
    plan = tqslite.uniform_plan(model, config)
    path = save_checkpoint(quantize(model, plan), tmp_path / "q.safetensors")
    sizes = checkpoint_sizes(path)
    expected = plan_size(plan, model).bytes
    n_int = sum(1 for c in quantize(model, plan).weights.configs.values() if isinstance(c, Int))
    assert sizes["file"] == os.path.getsize(path) == sizes["header"] + sizes["data"]
    # every array is rounded up to whole bytes: codes and zero points, at most 2 bytes per tensor
    assert expected <= sizes["data"] <= expected + 2 * n_int
    with open(path, "rb") as f:
        assert sizes["header"] == 8 + struct.unpack("<Q", f.read(8))[0]
    assert sizes["header"] < 600 * len(list(model.parameters()))  # the map: a fixed price per tensor


@pytest.mark.parametrize("name", ["pangu_lite", "aurora_lite", "timesfm_lite"])
def test_shipped_models_land_on_disk_at_the_plans_size(name, tmp_path):
    system, _ = load(name)
    for bits in (2, 3, 4, 8):
        plan = tqslite.uniform_plan(system, bits)
        path = save_checkpoint(quantize(system, plan), tmp_path / f"{bits}.safetensors")
        sizes = checkpoint_sizes(path)
        assert abs(sizes["data"] - plan_size(plan, system).bytes) <= 0.01 * plan_size(plan, system).bytes
        assert sizes["file"] < os.path.getsize(f"data/checkpoints/{name}.pt") * (bits + 1) / 32 + sizes["header"]


def test_the_file_is_plain_safetensors_with_a_readable_map(tmp_path):
    model = small_model()
    path = save_checkpoint(quantize(model, mixed_plan(model)), tmp_path / "q.safetensors")
    arrays = safetensors.numpy.load_file(str(path))
    assert arrays["0.weight.codes"].dtype == np.uint8 and arrays["0.weight.codes"].size == 32 * 16 * 3 // 8
    assert arrays["0.weight.scale"].dtype == np.float16 and arrays["0.weight.scale"].shape == (32,)
    assert arrays["0.weight.zero"].size == 3 * 32 // 8  # 32 zero points at 3 bits
    assert arrays["2.bias"].dtype == np.float16 and arrays["3.bias"].dtype == np.float32
    qmap = read_metadata(path)["map"]
    assert qmap["0.weight"] == {"config": "int3/group16@0/asym", "axis": 0, "shape": [32, 16], "dtype": "float32",
                                "method": "rtn"}
    assert qmap["0.bias"]["config"] == "int8/tensor" and qmap["0.bias"]["axis"] is None
    assert qmap["3.bias"]["method"] == "outside plan" and list(qmap) == [n for n, _ in model.named_parameters()]


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    model = small_model()
    return save_checkpoint(quantize(model, mixed_plan(model)), tmp_path / "q.safetensors")


def test_another_architecture_is_refused_naming_the_file_and_tensor(saved):
    with pytest.raises(CheckpointError, match=r"q\.safetensors: tensor '0\.weight' has shape \(32, 16\) in the file "
                                              r"and \(40, 16\)"):
        load_checkpoint(saved, small_model(width=40))
    with pytest.raises(CheckpointError, match="has no tensor '5.weight'"):
        load_checkpoint(saved, nn.Sequential(*small_model(), nn.Linear(16, 16)))
    with pytest.raises(CheckpointError, match="holds tensor '4.weight', which this model lacks"):
        load_checkpoint(saved, nn.Sequential(*list(small_model())[:4]))
    with pytest.raises(CheckpointError, match="float32 in the file and float64"):
        load_checkpoint(saved, small_model(dtype=torch.float64))


@pytest.mark.parametrize("keep", [0, 5, 100, -1, -100], ids=["empty", "5 bytes", "in the header", "last byte",
                                                             "in the data"])
def test_a_truncated_file_is_refused(saved, keep):
    data = saved.read_bytes()
    saved.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    with pytest.raises(CheckpointError, match=r"q\.safetensors is (truncated|corrupted)"):
        load_checkpoint(saved, small_model())


def test_a_flipped_byte_anywhere_is_refused(saved):
    data = saved.read_bytes()
    header = 8 + struct.unpack("<Q", data[:8])[0]
    text = data[8:header].decode()
    positions = [3,                                          # the header's length
                 8 + text.index("int3/group16@0/asym") + 3,  # int3 -> int2: still valid JSON
                 8 + text.index("data_offsets") + 16,        # an offset of the tensor index
                 header, header + 100, len(data) - 1]        # the data
    for pos in positions:
        flipped = bytearray(data)
        flipped[pos] ^= 0x01
        saved.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError, match=r"q\.safetensors is (corrupted|truncated)"):
            load_checkpoint(saved, small_model())
    saved.write_bytes(data)
    load_checkpoint(saved, small_model())  # the intact file still loads


def test_a_file_that_is_not_a_tqslite_checkpoint_is_refused(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors.numpy.save_file({"w": np.zeros(3, np.float32)}, str(path))
    with pytest.raises(CheckpointError, match="is not a tqslite checkpoint"):
        load_checkpoint(path, small_model())
    (tmp_path / "garbage.safetensors").write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(CheckpointError, match="garbage.safetensors is corrupted: its header is not valid JSON"):
        read_metadata(tmp_path / "garbage.safetensors")


def test_a_failed_write_leaves_the_old_file(saved, monkeypatch):
    before = saved.read_bytes()
    model = small_model(seed=4)
    qm = quantize(model, tqslite.uniform_plan(model, 2))

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(qm, saved)
    assert saved.read_bytes() == before and list(saved.parent.iterdir()) == [saved]


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------

def test_cli_quantize_writes_the_packed_checkpoint_and_forecasts_from_it(tmp_path, capsys):
    plan, out, fc = tmp_path / "plan.json", tmp_path / "q.safetensors", tmp_path / "fc.nc"
    assert main(["uniform", "timesfm_lite", "--bits", "4", "--out", str(plan)]) == 0
    assert main(["quantize", "timesfm_lite", str(plan), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    system, _ = load("timesfm_lite")
    qm = quantize(system, Plan.load(plan))
    assert same_parameters(load_checkpoint(out, system).model, qm.model)
    assert f"{os.path.getsize(out)} bytes" in printed and read_metadata(out)["info"]["model"] == "timesfm_lite"
    assert main(["forecast", str(out), "--horizon", "3", "--windows", "4", "--out", str(fc)]) == 0
    ds = xr.load_dataset(fc)
    x0, truth = heldout_windows("timesfm_lite", 4, 3)
    assert np.array_equal(ds["forecast"].values, forecast(qm.model, x0, 3).values)
    assert np.array_equal(ds["truth"].values, truth.values)
    assert ds.attrs["model"] == "timesfm_lite" and ds.attrs["source"].endswith("q.safetensors")
