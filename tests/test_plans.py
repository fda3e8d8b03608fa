"""Plans: {unit: configuration} as JSON, sizes counted on the model, applying them, refusing a wrong model."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import same_weights, snapshot
from torch import nn

import tqslite
from tqslite import Float16, Int, KeepFloat, MSEClip, PerGroup, Plan, allocate, apply_plan, plan_size, probe, quantize
from tqslite.plans import FORMAT, uniform_plan


@pytest.fixture
def plan(mlp, x0):
    return allocate(probe(mlp, x0, horizon=4, progress=False), mlp, budget_bits=4.5)


def test_json_round_trip_keeps_order_configs_and_shapes(plan, tmp_path):
    path = plan.save(tmp_path / "plan.json")
    back = Plan.load(path)
    assert back == plan and list(back) == list(plan)
    d = json.loads(path.read_text())
    assert d["format"] == FORMAT and d["units"]["2.weight"]["tensors"] == {"2.weight": [32, 32]}
    assert "bits_per_param" not in d and "size_bits" not in json.dumps(d)  # no metrics in a plan


def test_a_hand_written_plan_needs_no_metrics(mlp, tmp_path):
    text = {"format": FORMAT, "units": {
        "first": {"config": "int3/group8", "tensors": {"0.weight": [32, 8], "0.bias": [32]}},
        "rest": {"config": "fp16", "tensors": {"2.weight": [32, 32]}}}}
    (tmp_path / "mine.json").write_text(json.dumps(text))
    plan = Plan.load(tmp_path / "mine.json")
    assert plan["first"] == Int(3, PerGroup(8)) and plan["rest"] == Float16()
    q = apply_plan(mlp, plan)
    assert torch.equal(q[2].weight, mlp[2].weight.half().double())
    assert torch.equal(q[4].weight, mlp[4].weight)  # not in the plan: untouched
    size = plan_size(plan, mlp)
    outside = sum(p.numel() for n, p in mlp.named_parameters() if n not in ("0.weight", "0.bias", "2.weight"))
    by_hand = (32 * 8 * 3 + 16 * 32) + (32 * 3 + 16 * 4) + 32 * 32 * 16 + 64 * outside  # codes+scales; float64 rest
    assert size.stored_bits == by_hand and size.outside_params == outside


@pytest.mark.parametrize("text,match", [
    ("{}", "not a tqslite plan"),
    ("[1, 2]", "not a tqslite plan"),
    ("not json", "is not JSON"),
    (json.dumps({"format": FORMAT, "units": {"u": {"tensors": {"a": [2]}}}}), "unit 'u' needs a \"config\""),
    (json.dumps({"format": FORMAT, "units": {"u": {"config": "int9/channel", "tensors": {"a": [2]}}}}), "unit 'u'"),
])
def test_loading_something_that_is_not_a_plan_names_the_file(tmp_path, text, match):
    (tmp_path / "x.json").write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        Plan.load(tmp_path / "x.json")
    assert "x.json" in str(err.value)


def test_applying_leaves_the_model_untouched_and_matches_rtn(mlp, plan):
    before = snapshot(mlp)
    q = apply_plan(mlp, plan)
    assert same_weights(mlp, before)
    for name, p in q.named_parameters():
        assert torch.equal(p, tqslite.rtn_quantize(before[name], plan[name]))
    assert apply_plan(mlp, plan, inplace=True) is mlp and not same_weights(mlp, before)


def test_quantize_returns_the_stored_form_of_every_tensor(mlp, plan):
    qm = quantize(mlp, plan, MSEClip())
    deq = qm.weights.dequantized()
    for name, p in qm.model.named_parameters():
        assert torch.equal(p, deq[name])
    assert set(qm.weights.methods.values()) <= {"mse", "float16", "float"}
    assert qm.weights.quantizer.startswith("MSEClip(")


@pytest.mark.parametrize("config", [Int(2), Int(3, PerGroup(8)), Int(4, symmetric=False), Int(8), Float16()],
                         ids=lambda c: c.label)
def test_plan_size_is_the_bytes_written(mlp, tmp_path, config):
    plan = uniform_plan(mlp, config)
    qm = quantize(mlp, plan)
    written = 0
    for name, qt in qm.weights.tensors.items():  # codes, scales, zero points: a header line, then the payload
        data = qt.to_bytes()
        (tmp_path / name).write_bytes(data)
        written += (tmp_path / name).stat().st_size - len(data.split(b"\n", 1)[0]) - 1
    for name, w in qm.weights.floats.items():
        path = tmp_path / f"{name}.npy"
        np.save(path, w.to(torch.float16 if config == Float16() else w.dtype).numpy())
        written += path.stat().st_size - 128  # numpy's header
    n_files = len(qm.weights.tensors) + len(qm.weights.floats)
    size = plan_size(plan, mlp)
    assert 0 <= written - size.stored_bits / 8 < n_files  # each file rounds up to a whole byte
    assert size.bytes == math.ceil(size.stored_bits / 8)


def test_a_model_of_another_shape_is_refused_naming_the_first_mismatch(mlp, plan):
    other = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 8)).double()
    before = snapshot(other)
    with pytest.raises(ValueError, match=r"'2.weight' has shape \(32, 32\), the model's \(16, 32\)"):
        apply_plan(other, plan, inplace=True)
    assert same_weights(other, before)
    with pytest.raises(ValueError, match="unit '2.weight' names tensor '2.weight', which this model does not have"):
        apply_plan(nn.Sequential(nn.Linear(8, 32)).double(), plan)


def test_save_is_atomic(plan, tmp_path, monkeypatch):
    path = plan.save(tmp_path / "plan.json")
    good = path.read_text()
    monkeypatch.setattr(Plan, "to_json", lambda self: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError):
        plan.save(path)
    assert path.read_text() == good and list(tmp_path.iterdir()) == [path]


def test_uniform_plan_over_blocks_and_kept_floats(mlp):
    plan = uniform_plan(mlp, "int4/group8", units="block")
    assert list(plan) == ["0", "2", "4"] and plan.members["2"] == ("2.weight", "2.bias")
    assert plan_size(uniform_plan(mlp, KeepFloat()), mlp).bits_per_param == 64  # a float64 model kept as is
