"""The activation quantizer: quantization's asymmetric RTN grid over a per-sample range ``[lo, hi]``.

Ranges are per input sample: the first dim of a layer's output is the sample (batch) dim, and one
range covers all of that sample's elements. The grid is :func:`tqslite.quantization.asymmetric_grid`
over that range, the same grid as an asymmetric weight format: ``[lo, hi]`` widened to contain 0,
``scale = (hi - lo) / (2**bits - 1)`` rounded *up* to a float16 number, integer zero point
``zero = round(-lo / scale)`` in ``[0, 2**bits - 1]``, codes ``clamp(round(y / scale) + zero, 0,
2**bits - 1)``, dequantized ``(codes - zero) * scale``. Inside the (widened) range the error is at
most ``scale / 2``; outside it, a value is clipped to the nearest end of the grid. ``bits=16``
casts to float16 and back; ``bits=32`` leaves the output alone.
"""

from __future__ import annotations

import torch

from ..config import Int
from ..quantization import FP16_MAX, asymmetric_grid


def check_bits(bits) -> int:
    """An activation bit width: 1-8 (an asymmetric integer grid), 16 (float16) or 32 (unchanged)."""
    if bits in (16, 32) and not isinstance(bits, bool) and int(bits) == bits:
        return int(bits)
    try:
        return Int(bits, symmetric=False).bits
    except ValueError:
        raise ValueError(f"bits={bits!r} is not supported for activations: use an integer in 1-8, or 16 (float16) "
                         "or 32 (unchanged).") from None


def activation_grid(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of the asymmetric grid over per-sample ranges.

    Parameters
    ----------
    lo, hi : Tensor, shape ``(B,)``
        Range of each sample (``lo <= hi``); it is widened to contain 0.
    bits : int
        1-8.

    Returns
    -------
    scale : Tensor, shape ``(B,)``
        ``(hi - lo) / (2**bits - 1)`` rounded up to a float16 number (1 for an empty range), in
        the dtype of ``lo``: :func:`tqslite.quantization.asymmetric_grid`, the weights' grid.
    zero : Tensor, shape ``(B,)``
        Integer zero point ``round(-lo / scale)`` in ``[0, 2**bits - 1]`` (as floats).
    """
    scale, zero = asymmetric_grid(lo, hi, Int(bits, symmetric=False))
    if bool((scale > FP16_MAX).any()):
        raise ValueError(f"activations spanning {float((hi - lo).max()):.3g} need a scale beyond float16's range "
                         f"at {bits} bits; the rollout has left any sensible range.")
    return scale, zero


def fake_quantize(y: torch.Tensor, lo, hi, bits: int) -> torch.Tensor:
    """Quantize-dequantize ``y`` on the asymmetric grid over per-sample ranges ``[lo, hi]``.

    Parameters
    ----------
    y : Tensor, shape ``(B, ...)``
        A layer's output; dim 0 is the sample.
    lo, hi : float or Tensor of shape ``(B,)``
        The range of each sample (a float applies to all samples); see :func:`activation_grid`.
    bits : int
        1-8 for an integer grid, 16 for float16, 32 to return ``y`` unchanged.

    Returns
    -------
    Tensor
        Same shape and dtype as ``y``. Elements inside the widened range move by at most
        ``scale / 2``; elements outside it are clipped to the nearest end of the grid.
    """
    return fake_quantize_counted(y, lo, hi, check_bits(bits))[0]


def fake_quantize_counted(y, lo, hi, bits, count: bool = False):
    """:func:`fake_quantize`, also returning the number of clipped elements when ``count``.

    One buffer, updated in place: each temporary of an output's size would cost an allocation.
    """
    if bits == 32:
        return y, 0
    if bits == 16:
        return y.to(torch.float16).to(y.dtype), 0
    work = torch.promote_types(y.dtype, torch.float32)
    b = y.shape[0]
    lo = torch.as_tensor(lo, dtype=work).reshape(-1).expand(b).contiguous()
    hi = torch.as_tensor(hi, dtype=work).reshape(-1).expand(b).contiguous()
    scale, zero = activation_grid(lo, hi, bits)
    shape = (b,) + (1,) * (y.ndim - 1)
    scale, zero = scale.reshape(shape), zero.reshape(shape)
    qmax = 2**bits - 1
    q = y.to(work) / scale
    q.round_().add_(zero)
    clipped = int(((q < 0) | (q > qmax)).sum()) if count else None
    q.clamp_(0, qmax).sub_(zero).mul_(scale)
    return q.to(y.dtype), clipped
