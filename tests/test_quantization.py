"""RTN conventions of SPEC section 4: properties that break if the grid or the stored form is wrong."""

import math

import numpy as np
import pytest
import torch

from tqslite.config import Float16, Int, KeepFloat, PerChannel, PerGroup, PerTensor
from tqslite.quantization import (QuantizedTensor, pack_bits, relative_error, rtn_codes, rtn_quantize, sqnr_db,
                                  storage_bits, to_rows, unpack_bits)

INT_BITS = [2, 3, 4, 5, 6, 7, 8]
GRANS = [PerTensor(), PerChannel(), PerGroup(8)]


def weights(shape=(16, 24), seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def resolved(bits, gran, symmetric=True, shape=(16, 24), axis=0):
    return Int(bits, gran, symmetric).resolve(shape, axis)


@pytest.mark.parametrize("bits", INT_BITS)
@pytest.mark.parametrize("gran", GRANS, ids=lambda g: g.label)
def test_symmetric_is_idempotent(bits, gran):
    q = rtn_quantize(weights(), Int(bits, gran))
    assert torch.equal(rtn_quantize(q, Int(bits, gran)), q)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("gran", GRANS, ids=lambda g: g.label)
def test_asymmetric_requantization_is_idempotent_or_moves_less_than_a_step(bits, gran):
    # See the note in tqslite.quantization: exact in most slices, within one step always.
    w = weights((64, 24), seed=bits)
    cfg = Int(bits, gran, symmetric=False)
    fmt = cfg.resolve(w.shape, 0)
    q = rtn_quantize(w, cfg)
    qq = rtn_quantize(q, cfg)
    step = rtn_codes(w, fmt).scale.float()
    moved = to_rows(qq - q, fmt).abs().amax(dim=1)
    assert torch.all(moved <= step)
    if len(moved) >= 16:
        assert (moved == 0).float().mean() > 0.9


@pytest.mark.parametrize("bits", INT_BITS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("gran", GRANS[1:], ids=lambda g: g.label)
def test_residual_within_half_a_step_per_slice(bits, symmetric, gran):
    w = weights((12, 4, 3, 2), seed=bits)  # a conv-like weight: channel axis 0, 24 elements per channel
    fmt = Int(bits, gran, symmetric).resolve(w.shape, 0)
    qt = rtn_codes(w, fmt)
    resid = to_rows(w - qt.dequantize(), fmt).abs().amax(dim=1)
    scale = qt.scale.float()
    assert scale.shape[0] == fmt.n_scales(w.shape) == (12 if isinstance(gran, PerChannel) else 36)
    assert torch.all(resid <= scale / 2 * (1 + 1e-6))
    # and the bound is nearly attained somewhere: the quantizer does not round too finely
    assert (resid / (scale / 2)).max() > 0.8


@pytest.mark.parametrize("bits", INT_BITS)
def test_values_on_the_grid_round_trip_exactly(bits):
    qmax = 2 ** (bits - 1) - 1
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(-qmax, qmax + 1, (6, 20), generator=g).float()
    codes[:, 0] = qmax  # every row reaches the end of its grid
    scale = torch.tensor([0.5, 0.125, 3.0, 2.0**-10, 1.5, 0.75])[:, None]  # float16-representable
    w = codes * scale
    assert torch.equal(rtn_quantize(w, bits), w)


def test_the_codes_are_the_one_line_kernel():
    # GPTQ's quant.py: scale * (clamp(round(x / scale) + zero, 0, maxq) - zero), scale from the row's range
    w = weights((5, 9))
    for sym in (True, False):
        fmt = resolved(3, PerChannel(), sym, w.shape)
        if sym:
            scale = (w.abs().amax(1, keepdim=True) / 3).half()
            scale = torch.where(scale.float() < w.abs().amax(1, keepdim=True) / 3,
                                torch.nextafter(scale, torch.tensor(torch.inf, dtype=torch.half)), scale).float()
            zero = torch.zeros_like(scale)
            expected = torch.clamp(torch.round(w / scale), -3, 3) * scale
        else:
            lo, hi = w.amin(1, keepdim=True).clamp(max=0), w.amax(1, keepdim=True).clamp(min=0)
            scale = ((hi - lo) / 7).half()
            scale = torch.where(scale.float() < (hi - lo) / 7,
                                torch.nextafter(scale, torch.tensor(torch.inf, dtype=torch.half)), scale).float()
            zero = torch.round(-lo / scale)
            expected = (torch.clamp(torch.round(w / scale) + zero, 0, 7) - zero) * scale
        assert torch.equal(rtn_codes(w, fmt).dequantize(), expected)


def test_sqnr_gains_about_6_db_per_bit():
    # Each extra bit halves the step: 20 log10(2) = 6.02 dB. With symmetric grids (2**b - 1 levels)
    # the gain is a little larger at low bits and tends to 6.02 dB from above.
    w = weights((256, 256))
    gains = np.diff([sqnr_db(w, b) for b in range(4, 9)])
    assert np.all((gains > 5.9) & (gains < 6.8)), gains
    assert np.all(np.diff(gains) < 0), gains
    assert abs(gains[-1] - 6.02) < 0.15, gains


def test_all_zero_rows_stay_zero_and_leave_others_alone():
    w = weights((4, 10))
    w[2] = 0
    for sym in (True, False):
        cfg = Int(4, symmetric=sym)
        q = rtn_quantize(w, cfg)
        assert torch.equal(q[2], torch.zeros(10))
        assert rtn_codes(w, cfg.resolve(w.shape)).scale[2] == 1.0
        assert torch.equal(q[[0, 1, 3]], rtn_quantize(w[[0, 1, 3]], cfg))
    assert torch.equal(rtn_quantize(torch.zeros(3, 5), 3), torch.zeros(3, 5))


def test_channels_are_independent_and_power_of_two_equivariant():
    w = weights((8, 16))
    q = rtn_quantize(w, 4)
    w2 = w.clone()
    w2[0] *= 1000.0
    assert torch.equal(rtn_quantize(w2, 4)[1:], q[1:])  # one scale per output channel
    assert torch.equal(rtn_quantize(4 * w, 4), 4 * q)  # scaling by 2^k is exact


def test_axis_selects_the_channel():
    w = weights((6, 10))
    assert torch.equal(rtn_quantize(w, 3, axis=1), rtn_quantize(w.T.contiguous(), 3, axis=0).T)
    assert torch.equal(rtn_quantize(w, Int(3, PerChannel(1))), rtn_quantize(w, 3, axis=1))
    assert Int(3).n_scales((6, 10), 1) == 10


def test_shape_dtype_preserved_and_input_untouched():
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        w = weights((5, 7), dtype=dtype)
        before = w.clone()
        q = rtn_quantize(w, 4)
        assert q.shape == w.shape and q.dtype == dtype
        assert torch.equal(w, before)


def test_float_options():
    w = weights()
    assert torch.equal(rtn_quantize(w, KeepFloat()), w)
    assert torch.equal(rtn_quantize(w, Float16()), w.half().float())
    assert relative_error(w, 32) == 0.0


def test_one_bit_grids_have_two_levels_per_row():
    q = rtn_quantize(weights(), Int(1, symmetric=False))
    assert all(len(torch.unique(row)) <= 2 for row in q)


def test_1d_tensors_use_one_scale():
    b = weights((10,))
    fmt = Int(4).resolve(b.shape)
    assert fmt.n_scales(b.shape) == 1 and rtn_codes(b, fmt).scale.shape == (1,)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("gran", GRANS, ids=lambda g: g.label)
def test_storage_round_trip_and_size_on_disk(tmp_path, bits, symmetric, gran):
    if bits == 1 and symmetric:
        pytest.skip("1 bit is asymmetric only")
    w = weights((16, 24), seed=bits)
    fmt = Int(bits, gran, symmetric).resolve(w.shape)
    qt = rtn_codes(w, fmt)
    assert torch.equal(qt.dequantize(), rtn_quantize(w, Int(bits, gran, symmetric)))
    # exact accounting, by hand: codes + float16 scales (+ zero points) ...
    s = {"tensor": 1, "channel": 16, "group8": 48}[gran.label]
    assert qt.nbits == w.numel() * bits + 16 * s + (0 if symmetric else bits * s)
    # ... and the bytes really written: the header line, then exactly ceil(nbits / 8) bytes
    path = tmp_path / "w.tqs"
    path.write_bytes(qt.to_bytes())
    header = path.read_bytes().split(b"\n", 1)[0]
    assert path.stat().st_size - len(header) - 1 == math.ceil(qt.nbits / 8)
    back = QuantizedTensor.from_bytes(path.read_bytes())
    assert torch.equal(back.dequantize(), qt.dequantize()) and back.fmt == fmt


def test_storage_bits_shorthands():
    assert storage_bits((10, 10), 16) == 1600
    assert storage_bits((10, 10), 32) == 3200
    assert storage_bits((10, 10), Int(4, PerGroup(5))) == 400 + 16 * 20


def test_pack_bits_round_trip(rng):
    for bits in range(1, 9):
        v = rng.integers(0, 2**bits, size=101).astype(np.uint8)
        buf = pack_bits(v, bits)
        assert len(buf) == math.ceil(101 * bits / 8)
        assert np.array_equal(unpack_bits(buf, bits, 101), v)


@pytest.mark.parametrize("bits", [0, 9, 12, 33, -4, True])
def test_bad_bits_are_refused(bits):
    with pytest.raises(ValueError):
        rtn_quantize(weights(), bits)


def test_group_size_must_divide_when_one_tensor_is_quantized():
    with pytest.raises(ValueError, match="does not divide the 24 elements"):
        rtn_quantize(weights(), Int(4, PerGroup(5)))


def test_non_finite_weights_are_named():
    from tqslite.quantization import check_finite
    w = weights()
    w[3, 3] = float("nan")
    with pytest.raises(ValueError, match="layer.weight contains 1 non-finite"):
        check_finite(w, "layer.weight")


def test_tiny_weights_warn_that_float16_scales_are_too_coarse():
    w = weights((4, 8)) * 1e-7
    with pytest.warns(UserWarning, match="Keep such tiny weights at float16 or float"):
        rtn_quantize(w, 8)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rtn_quantize(weights((4, 8)) * 1e-2, 8)  # ordinary small weights: no warning
        rtn_quantize(torch.zeros(3, 3), 4)  # all-zero slices keep scale 1: no warning
