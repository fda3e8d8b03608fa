"""Matched size: the stored bits of another quantized model (tqslite.release_size) against its bytes on disk.

A ``torch.save`` file is a zip archive whose ``data/N`` entries are the tensors' storages, byte
for byte; the rest is the pickle and the zip's headers. So the count must equal the bytes of
those entries -- plus 16 per per-tensor quantized tensor, whose scale and zero point torch
pickles as a Python float and int instead of storing them as tensors.
"""

import warnings
import zipfile

import pytest
import torch
from torch import nn

import tqslite
from tqslite import Int, budget_of, plan_size, release_size, uniform_plan


def storage_bytes(path) -> int:
    with zipfile.ZipFile(path) as z:
        return sum(i.file_size for i in z.infolist() if "/data/" in i.filename and "/.data/" not in i.filename)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 64), nn.LayerNorm(64))


def torch_int8_release(model, per_channel=True) -> dict:
    """A vendor's int8 release: torch quantized weights (per channel or per tensor), the rest in float."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch deprecates its quantized tensors; vendors still ship them
        for name, p in model.state_dict().items():
            if p.ndim == 2:
                amax = p.abs().amax(1).double()
                if per_channel:
                    out[name] = torch.quantize_per_channel(p, amax / 127, torch.zeros(p.shape[0], dtype=torch.long),
                                                           0, torch.qint8)
                else:
                    out[name] = torch.quantize_per_tensor(p, float(amax.max() / 127), 0, torch.qint8)
            else:
                out[name] = p.clone()
    return out


def plain_int8_release(model) -> dict:
    """The same release in the plain layout: int8 codes, float16 scales, no zero points."""
    out = {}
    for name, p in model.state_dict().items():
        if p.ndim == 2:
            scale = (p.abs().amax(1, keepdim=True) / 127).half()
            out[name] = (torch.round(p / scale.float()).clamp(-127, 127).to(torch.int8), scale.squeeze(1), None)
        else:
            out[name] = p.clone()
    return out


def test_per_channel_int8_known_value_and_bytes_on_disk(model, tmp_path):
    release = torch_int8_release(model)
    size = release_size(release)
    n_weights = 64 * 32 + 32 * 64
    assert size.code_bits == 8 * n_weights
    assert size.scale_bits == 64 * (32 + 64) and size.zero_point_bits == 64 * (32 + 64)   # float64, int64
    assert size.float_bits == 32 * (32 + 64 + 64 + 64) and size.n_params == sum(p.numel() for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(release, tmp_path / "int8.pt")
    assert size.bytes == storage_bytes(tmp_path / "int8.pt")
    assert release_size(tmp_path / "int8.pt") == size


def test_per_tensor_and_dynamic_quantization_count_their_pickled_scales(model, tmp_path):
    release = torch_int8_release(model, per_channel=False)
    size = release_size(release)
    assert size.scale_bits == size.zero_point_bits == 2 * 64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(release, tmp_path / "t.pt")
        dynamic = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
        torch.save(dynamic.state_dict(), tmp_path / "d.pt")
    assert size.bytes == storage_bytes(tmp_path / "t.pt") + 16 * 2
    d = release_size(dynamic)
    assert d.bytes == storage_bytes(tmp_path / "d.pt") + 16 * 2
    assert d.n_params == size.n_params and d.code_bits == size.code_bits


def test_the_plain_layout_and_flat_keys(model, tmp_path):
    release = plain_int8_release(model)
    size = release_size(release)
    assert size.scale_bits == 16 * (32 + 64) and size.zero_point_bits == 0
    torch.save(release, tmp_path / "plain.pt")
    assert size.bytes == storage_bytes(tmp_path / "plain.pt")
    flat = {}
    for name, v in release.items():
        if isinstance(v, tuple):
            flat[name], flat[f"{name}_scale"] = v[0], v[1]
        else:
            flat[name] = v
    flat["0.layer_scale"] = torch.ones(4)          # a float parameter, not a quantization scale
    got = release_size(flat)
    assert got.scale_bits == size.scale_bits and got.n_params == size.n_params + 4
    assert size.nominal_bits < size.bits_per_param


def test_a_plan_at_the_size_of_a_release(model):
    release = torch_int8_release(model)
    budget = budget_of(release)
    x0 = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    scores = tqslite.probe(model, x0, horizon=2, progress=False)
    for fraction in (1.0, 0.5):
        plan = tqslite.allocate(scores, model, budget_bytes=fraction * budget)
        assert plan_size(plan, model).bytes <= fraction * budget
    # tqslite's own uniform int8 per channel (float16 scales, symmetric) is smaller than torch's
    assert plan_size(uniform_plan(model, Int(8), units="tensor"), model).bytes < budget


def test_bad_input():
    with pytest.raises(TypeError, match="state dict"):
        release_size(42)
    with pytest.raises(ValueError, match="no parameters"):
        release_size({"dtype": torch.qint8})


def test_the_command_line_allocates_at_the_size_of_a_release(tmp_path, capsys):
    from tqslite.cli import main
    from tqslite.models import load
    from tqslite.plans import Plan
    system, _ = load("timesfm_lite")
    release = plain_int8_release(system.module)
    torch.save(release, tmp_path / "vendor.pt")
    s, plan = tmp_path / "s.nc", tmp_path / "plan.json"
    assert main(["probe", "timesfm_lite", "--horizon", "2", "--windows", "2", "--quiet", "--out", str(s)]) == 0
    assert main(["allocate", str(s), "timesfm_lite", "--budget-of", str(tmp_path / "vendor.pt"),
                 "--out", str(plan)]) == 0
    out = capsys.readouterr().out
    assert f"{release_size(release).bytes} bytes" in out and "nominal" in out
    assert plan_size(Plan.load(plan), system).bytes <= release_size(release).bytes
