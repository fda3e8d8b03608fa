"""RTN conventions of SPEC section 4: properties that break if the quantizer is wrong."""

import math

import numpy as np
import pytest
import torch

from tqslite.quantization import (QuantizedTensor, _to_rows, n_slices, pack_bits, relative_error, rtn_quantize,
                                  rtn_scales, sqnr_db, storage_bits, unpack_bits)

INT_BITS = [2, 3, 4, 5, 6, 7, 8]
GRANS = [("tensor", None), ("channel", None), ("group", 8)]


def weights(shape=(16, 24), seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("bits", INT_BITS)
@pytest.mark.parametrize("gran,group", GRANS, ids=[g for g, _ in GRANS])
def test_symmetric_is_idempotent(bits, gran, group):
    q = rtn_quantize(weights(), bits, gran, group_size=group)
    assert torch.equal(rtn_quantize(q, bits, gran, group_size=group), q)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("gran,group", GRANS, ids=[g for g, _ in GRANS])
def test_asymmetric_requantization_is_idempotent_or_moves_less_than_a_step(bits, gran, group):
    # See the note in tqslite.quantization: exact in most slices, within one step always.
    w = weights((64, 24), seed=bits)
    q = rtn_quantize(w, bits, gran, group_size=group, symmetric=False)
    qq = rtn_quantize(q, bits, gran, group_size=group, symmetric=False)
    step = rtn_scales(w, bits, gran, group_size=group, symmetric=False)
    moved = _to_rows(qq - q, gran, 0, group).abs().amax(dim=1)
    assert torch.all(moved <= step)
    if len(moved) >= 16:
        assert (moved == 0).float().mean() > 0.9


@pytest.mark.parametrize("bits", INT_BITS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("gran,group", GRANS[1:], ids=["channel", "group"])
def test_residual_within_half_a_step_per_slice(bits, symmetric, gran, group):
    w = weights((12, 4, 3, 2), seed=bits)  # a conv-like weight: channel axis 0, 24 elements per channel
    q = rtn_quantize(w, bits, gran, group_size=group, symmetric=symmetric)
    scale = rtn_scales(w, bits, gran, group_size=group, symmetric=symmetric)
    resid = _to_rows(w - q, gran, 0, group).abs().amax(dim=1)
    assert scale.shape[0] == n_slices(w.shape, gran, 0, group)
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
        q = rtn_quantize(w, 4, symmetric=sym)
        assert torch.equal(q[2], torch.zeros(10))
        assert rtn_scales(w, 4, symmetric=sym)[2] == 1.0
        assert torch.equal(q[[0, 1, 3]], rtn_quantize(w[[0, 1, 3]], 4, symmetric=sym))
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
    assert n_slices((6, 10), "channel", axis=1) == 10


def test_shape_dtype_preserved_and_input_untouched():
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        w = weights((5, 7), dtype=dtype)
        before = w.clone()
        q = rtn_quantize(w, 4)
        assert q.shape == w.shape and q.dtype == dtype
        assert torch.equal(w, before)


def test_float_options():
    w = weights()
    assert torch.equal(rtn_quantize(w, 32), w)
    assert torch.equal(rtn_quantize(w, 16), w.half().float())
    assert relative_error(w, 32) == 0.0


def test_one_bit_is_asymmetric_only():
    w = weights()
    with pytest.raises(ValueError, match="asymmetric"):
        rtn_quantize(w, 1)
    q = rtn_quantize(w, 1, symmetric=False)
    assert all(len(torch.unique(row)) <= 2 for row in q)


def test_1d_tensors_use_one_scale():
    b = weights((10,))
    assert n_slices((10,), "channel") == 1
    assert rtn_scales(b, 4).shape == (1,)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("gran,group", GRANS, ids=[g for g, _ in GRANS])
def test_storage_round_trip_and_size(tmp_path, bits, symmetric, gran, group):
    if bits == 1 and symmetric:
        pytest.skip("1 bit is asymmetric only")
    w = weights((16, 24), seed=bits)
    qt = QuantizedTensor.from_tensor(w, bits, gran, group_size=group, symmetric=symmetric)
    assert torch.equal(qt.dequantize(), rtn_quantize(w, bits, gran, group_size=group, symmetric=symmetric))
    # exact accounting: codes + float16 scales (+ zero points), then the bytes really written
    s = n_slices(w.shape, gran, 0, group)
    assert qt.nbits == w.numel() * bits + 16 * s + (0 if symmetric else bits * s)
    path = tmp_path / "w.tqs"
    path.write_bytes(qt.to_bytes())
    header = qt.to_bytes().split(b"\n", 1)[0]
    assert path.stat().st_size - len(header) - 1 == math.ceil(qt.nbits / 8)
    back = QuantizedTensor.from_bytes(path.read_bytes())
    assert torch.equal(back.dequantize(), qt.dequantize())


def test_storage_bits_of_float_options():
    assert storage_bits((10, 10), 16) == 1600
    assert storage_bits((10, 10), 32) == 3200
    assert storage_bits((10, 10), 4, "group", group_size=5) == 400 + 16 * 20


def test_pack_bits_round_trip(rng):
    for bits in range(1, 9):
        v = rng.integers(0, 2**bits, size=101).astype(np.uint8)
        buf = pack_bits(v, bits)
        assert len(buf) == math.ceil(101 * bits / 8)
        assert np.array_equal(unpack_bits(buf, bits, 101), v)


@pytest.mark.parametrize("bits", [0, 9, 12, 33, 2.5, -4, True])
def test_bad_bits_are_refused(bits):
    with pytest.raises(ValueError, match="not supported"):
        rtn_quantize(weights(), bits)


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="does not divide the 24 elements"):
        rtn_quantize(weights(), 4, "group", group_size=5)
    with pytest.raises(ValueError, match="group_size"):
        rtn_quantize(weights(), 4, "group")


def test_non_finite_weights_are_named():
    from tqslite.quantization import check_finite
    w = weights()
    w[3, 3] = float("nan")
    with pytest.raises(ValueError, match="layer.weight contains 1 non-finite"):
        check_finite(w, "layer.weight")


def test_tiny_weights_warn_that_float16_scales_are_too_coarse():
    w = weights((4, 8)) * 1e-7
    with pytest.warns(UserWarning, match="Keep such tiny weights at 16 or 32 bits"):
        rtn_quantize(w, 8)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rtn_quantize(weights((4, 8)) * 1e-2, 8)  # ordinary small weights: no warning
        rtn_quantize(torch.zeros(3, 3), 4)  # all-zero slices keep scale 1: no warning
