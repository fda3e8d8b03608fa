"""The quantizer interface: RTN is the reference, MSE-clip never does worse on the weights, sizes match."""

import pytest
import torch
from conftest import same_weights, snapshot

from tqslite.config import Float16, Int, KeepFloat, PerChannel, PerGroup, PerTensor
from tqslite.quantization import rtn_quantize, to_rows
from tqslite.quantizers import RTN, MSEClip, as_quantizer

GRIDS = [PerTensor(), PerChannel(), PerGroup(16)]


def heavy_tailed(shape=(32, 64), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) ** 3  # heavy tails: a few large weights set the RTN range


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("gran", GRIDS, ids=lambda g: g.label)
def test_rtn_quantizer_is_rtn_quantize(bits, symmetric, gran):
    w = heavy_tailed(seed=bits)
    fmt = Int(bits, gran, symmetric).resolve(w.shape, 0)
    assert torch.equal(RTN().quantize(w, fmt).dequantize(), rtn_quantize(w, Int(bits, gran, symmetric)))


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("gran", GRIDS, ids=lambda g: g.label)
def test_mse_clip_never_has_a_larger_weight_error_than_rtn_and_stores_the_same_bits(bits, symmetric, gran):
    w = heavy_tailed(seed=10 + bits)
    fmt = Int(bits, gran, symmetric).resolve(w.shape, 0)
    rtn, mse = RTN().quantize(w, fmt), MSEClip().quantize(w, fmt)
    e_rtn = float((rtn.dequantize() - w).norm())
    e_mse = float((mse.dequantize() - w).norm())
    assert e_mse <= e_rtn
    assert mse.nbits == rtn.nbits and mse.codes.shape == rtn.codes.shape
    # per slice too: each row keeps the better of its clipping factors, p = 1 (RTN) among them
    per_slice = [(to_rows(q.dequantize() - w, fmt) ** 2).sum(1) for q in (mse, rtn)]
    assert torch.all(per_slice[0] <= per_slice[1] * (1 + 1e-6))


def test_mse_clip_helps_a_lot_at_3_bits_on_heavy_tails():
    w = heavy_tailed((128, 256), seed=3)
    fmt = Int(3).resolve(w.shape, 0)
    ratio = float((MSEClip().quantize(w, fmt).dequantize() - w).norm() / (RTN().quantize(w, fmt).dequantize() - w).norm())
    assert ratio < 0.9, ratio  # clipping the cube's tails pays at 3 bits (0.86 measured; 0.79 at 2 bits)


def test_mse_clip_on_a_uniform_row_keeps_the_full_range():
    # levels of a symmetric 2-bit grid sit at -s, 0, s: a row made of exactly those values is best unclipped
    w = torch.tensor([[-1.0, 0.0, 1.0, 1.0, -1.0, 0.0]])
    fmt = Int(2).resolve(w.shape, 0)
    assert torch.equal(MSEClip().quantize(w, fmt).dequantize(), w)


def test_quantize_weights_of_a_model(mlp):
    before = snapshot(mlp)
    configs = {"0.weight": Int(3, PerGroup(8)), "0.bias": Float16(), "2.weight": "int2/tensor/asym",
               "4.weight": KeepFloat(), "4.bias": 8}
    for q in (RTN(), MSEClip()):
        out = q.quantize_weights(mlp, configs)
        assert same_weights(mlp, before)
        assert set(out.tensors) == {"0.weight", "2.weight", "4.bias"} and set(out.floats) == {"0.bias", "4.weight"}
        assert out.configs["0.weight"] == Int(3, PerGroup(8, 0)) and out.configs["4.bias"] == Int(8, PerTensor())
        assert out.methods == {"0.weight": q.name, "2.weight": q.name, "4.bias": q.name, "0.bias": "float16",
                               "4.weight": "float"}
        assert out.fallbacks == {}
        deq = out.dequantized()
        assert torch.equal(deq["0.bias"], before["0.bias"].half().double())
        assert torch.equal(deq["4.weight"], before["4.weight"])
        assert deq["2.weight"].dtype == torch.float64


def test_as_quantizer():
    assert as_quantizer("rtn") == RTN() and as_quantizer("MSE") == MSEClip()
    assert as_quantizer(MSEClip(grid=50)).grid == 50
    with pytest.raises(ValueError, match="not a quantizer"):
        as_quantizer("awq")
    with pytest.raises(ValueError, match="max_shrink"):
        MSEClip(max_shrink=1.5)
