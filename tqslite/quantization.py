"""Integer grids: slicing a tensor into rows that share a scale, round-to-nearest, stored codes.

The conventions of SPEC section 4, for an :class:`~tqslite.config.Int` configuration:

* **symmetric**, ``bits >= 2``: ``scale = max|w| / qmax`` per slice with ``qmax = 2**(bits-1) - 1``,
  codes ``clamp(round(w / scale), -qmax, qmax)``. Zero is exact and re-quantizing is idempotent.
* **asymmetric**: the slice's range ``[min, max]`` is widened to contain 0,
  ``scale = (max - min) / (2**bits - 1)``, integer zero point ``zero = round(-min / scale)`` in
  ``[0, 2**bits - 1]``, codes ``clamp(round(w / scale) + zero, 0, 2**bits - 1)``.
* an all-zero slice keeps ``scale = 1`` and stays zero.
* **scales are stored in float16**, and fake-quant uses exactly the stored scale, so what you
  simulate is what lands on disk. The float16 scale is rounded *up*, so no weight is clipped
  and ``|w - q(w)| <= scale / 2`` holds with the stored scale.

Every quantizer (:mod:`tqslite.quantizers`: RTN, MSE-clip, GPTQ) produces a
:class:`QuantizedTensor` on these grids -- integer codes, float16 scales, zero points -- and the
fake-quant weights are its :meth:`~QuantizedTensor.dequantize`. :func:`rtn_quantize` is the
reference: round-to-nearest in one line, ``(clamp(round(w / scale) + zero, qmin, qmax) - zero) * scale``.

A note on idempotence: symmetric grids re-quantize to themselves bit for bit. Asymmetric ones
almost always do, but the upward rounding of the float16 scale can leave the top code of a slice
unused (more often at 7-8 bits), and a second pass then fits a slightly finer grid, moving values
by less than one step. Rounding the scale to nearest instead would clip the extreme weights.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .config import Float16, Int, KeepFloat, PerChannel, PerTensor, as_config, parse

FP16_MAX = 65504.0
#: Below this a float16 scale is a subnormal with fewer than 5 significant bits (error >= 3 %).
_FP16_COARSE = 2.0**-20


def check_finite(w: torch.Tensor, name: str = "tensor") -> None:
    """Raise ``ValueError`` naming ``name`` if ``w`` holds NaN or Inf."""
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or Inf); fix or drop it before quantizing.")


# --------------------------------------------------------------------------------------------
# Slicing a tensor into rows that share one scale
# --------------------------------------------------------------------------------------------

def to_rows(w: torch.Tensor, fmt: Int) -> torch.Tensor:
    """View ``w`` as a float32 matrix ``(n_scales, slice_len)``: one row per scale.

    ``fmt`` must be resolved (:meth:`tqslite.config.Int.resolve`): per tensor, one row; per
    channel, one row per index of the axis; per group, each channel's elements cut into rows of
    ``group_size``, channel by channel.
    """
    w = w.detach().to(torch.float32)
    g = fmt.granularity
    if isinstance(g, PerTensor):
        return w.reshape(1, -1)
    if g.axis is None:
        raise ValueError(f"{fmt.label} is not resolved for a tensor: call fmt.resolve(shape, axis) first.")
    rows = w.movedim(g.axis, 0).reshape(w.shape[g.axis], -1)
    return rows if isinstance(g, PerChannel) else rows.reshape(-1, g.group_size)


def from_rows(rows: torch.Tensor, shape: tuple, fmt: Int) -> torch.Tensor:
    """Inverse of :func:`to_rows`."""
    g = fmt.granularity
    if isinstance(g, PerTensor):
        return rows.reshape(shape)
    moved = (shape[g.axis],) + tuple(s for i, s in enumerate(shape) if i != g.axis)
    return rows.reshape(moved).movedim(0, g.axis)


def fp16_ceil(x: torch.Tensor) -> torch.Tensor:
    """Round positive float32 values up to the next float16 number (returned as float32)."""
    h = x.to(torch.float16).to(torch.float32)
    up = torch.nextafter(x.to(torch.float16), torch.tensor(float("inf"), dtype=torch.float16, device=x.device))
    return torch.where(h < x, up.to(torch.float32), h)


# --------------------------------------------------------------------------------------------
# The grid of each row, and rounding onto it
# --------------------------------------------------------------------------------------------

def grid_params(rows: torch.Tensor, fmt: Int, shrink: torch.Tensor | float | None = None):
    """Scale and zero point of each row of ``rows`` ``(n, k)``: two float32 tensors ``(n, 1)``.

    The scale is float16-representable (rounded up). ``shrink`` (a factor in ``(0, 1]``, one
    per row or one for all) narrows the range before the scale is set, clipping the extremes:
    what MSE-clip RTN searches over. Symmetric zero points are 0.
    """
    rows = rows.to(torch.float32)
    if fmt.symmetric:
        amax = rows.abs().amax(dim=1, keepdim=True)
        if shrink is not None:
            amax = amax * shrink
        scale = torch.where(amax > 0, fp16_ceil(amax / fmt.qmax), torch.ones_like(amax))
        zero = torch.zeros_like(scale)
    else:
        lo = rows.amin(dim=1, keepdim=True).clamp(max=0)
        hi = rows.amax(dim=1, keepdim=True).clamp(min=0)
        if shrink is not None:
            lo, hi = lo * shrink, hi * shrink
        scale, zero = asymmetric_grid(lo, hi, fmt)
    if not torch.all(scale <= FP16_MAX):
        raise ValueError(f"weights up to {float(rows.abs().max()):.3g} need a scale beyond float16's range at "
                         f"{fmt.bits} bits.")
    if torch.any((scale < _FP16_COARSE) & (scale != 1)):
        warnings.warn(f"some {fmt.bits}-bit scales fall below {_FP16_COARSE:.1e}, where float16 keeps too few "
                      "significant bits: the grid is coarser than intended. Keep such tiny weights at float16 or "
                      "float.", stacklevel=3)
    return scale, zero


def asymmetric_grid(lo: torch.Tensor, hi: torch.Tensor, fmt: Int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of the asymmetric grid over ranges ``[lo, hi]`` (any two equal shapes).

    The range is widened to contain 0; ``scale = (hi - lo) / fmt.qmax`` rounded up to a float16
    number (1 for an empty range), in the dtype of ``lo``; ``zero = round(-lo / scale)`` in
    ``[0, fmt.qmax]``, as floats. The weights' asymmetric rows (:func:`grid_params`) and the
    activations' per-sample ranges (:mod:`tqslite.activations`) share it. The caller checks the
    scale against ``FP16_MAX`` (its message says what overflowed).
    """
    lo = lo.clamp(max=0)
    hi = hi.clamp(min=0)
    scale = torch.where(hi > lo, fp16_ceil((hi - lo) / fmt.qmax).to(lo.dtype), torch.ones_like(hi))
    zero = torch.clamp(torch.round(-lo / scale), 0, fmt.qmax)
    return scale, zero


def round_to_grid(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: Int) -> torch.Tensor:
    """Integer codes ``clamp(round(x / scale) + zero, qmin, qmax)``, in the dtype of ``x``."""
    return torch.clamp(torch.round(x / scale) + zero, fmt.qmin, fmt.qmax)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: Int) -> torch.Tensor:
    """``(codes - zero) * scale``: ``x`` rounded onto the grid, as floats (GPTQ's ``quantize``)."""
    return (round_to_grid(x, scale, zero, fmt) - zero) * scale


# --------------------------------------------------------------------------------------------
# A tensor as stored: codes, float16 scales, zero points
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A tensor as it is stored: integer codes plus float16 scales (and zero points).

    Attributes
    ----------
    codes : Tensor, int16, ``(n_scales, slice_len)``
        One row per scale (the layout of :func:`to_rows`); values in ``[fmt.qmin, fmt.qmax]``.
    scale : Tensor, float16, ``(n_scales,)``
    zero : Tensor, int16, ``(n_scales,)``
        Zero points (all 0 when symmetric).
    fmt : Int
        The resolved configuration (concrete granularity and axis).
    shape : tuple of int
        The tensor's shape.
    dtype : torch.dtype
        The tensor's float dtype, restored by :meth:`dequantize`.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    fmt: Int
    shape: tuple
    dtype: torch.dtype

    @classmethod
    def from_rows(cls, codes, scale, zero, fmt: Int, shape, dtype) -> QuantizedTensor:
        """Build from row-layout codes ``(n, k)`` and per-row scale and zero (``(n,)`` or ``(n, 1)``)."""
        return cls(codes.to(torch.int16), scale.reshape(-1).to(torch.float16), zero.reshape(-1).to(torch.int16),
                   fmt, tuple(int(s) for s in shape), dtype)

    def dequantize(self) -> torch.Tensor:
        """The fake-quant tensor ``(codes - zero) * scale``, in :attr:`dtype` and :attr:`shape`."""
        rows = (self.codes.to(torch.float32) - self.zero.to(torch.float32)[:, None]) * self.scale.to(torch.float32)[:, None]
        return from_rows(rows, self.shape, self.fmt).to(self.dtype)

    @property
    def nbits(self) -> int:
        """Exact stored size in bits: ``fmt.storage_bits(shape)``."""
        return self.fmt.storage_bits(self.shape)

    def to_bytes(self) -> bytes:
        """One JSON header line, then the float16 scales, then codes and zero points packed at ``bits`` bits.

        Codes are stored offset by ``-qmin`` (so unsigned); the payload is exactly
        ``ceil(nbits / 8) - 2 * n_scales`` bytes after the scales.
        """
        header = dict(config=self.fmt.label, shape=list(self.shape), dtype=str(self.dtype).removeprefix("torch."))
        stored = (self.codes.reshape(-1).to(torch.int32) - self.fmt.qmin).cpu().numpy().astype(np.uint8)
        if not self.fmt.symmetric:
            stored = np.concatenate([stored, self.zero.cpu().numpy().astype(np.uint8)])
        scales = self.scale.cpu().numpy().astype("<f2").tobytes()
        return json.dumps(header).encode() + b"\n" + scales + pack_bits(stored, self.fmt.bits)

    @classmethod
    def from_bytes(cls, data: bytes) -> QuantizedTensor:
        """Inverse of :meth:`to_bytes`."""
        line, rest = data.split(b"\n", 1)
        h = json.loads(line)
        fmt, shape = parse(h["config"]), tuple(h["shape"])
        s = fmt.n_scales(shape)
        scale = torch.from_numpy(np.frombuffer(rest[: 2 * s], dtype="<f2").astype(np.float16))
        numel = math.prod(shape)
        stored = unpack_bits(rest[2 * s:], fmt.bits, numel + (0 if fmt.symmetric else s)).astype(np.int32)
        codes = torch.from_numpy(stored[:numel] + fmt.qmin).reshape(s, -1)
        zero = torch.from_numpy(stored[numel:]) if not fmt.symmetric else torch.zeros(s, dtype=torch.int32)
        return cls.from_rows(codes, scale, zero, fmt, shape, getattr(torch, h["dtype"]))


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack unsigned integers ``< 2**bits`` into a little-endian bit stream, ``ceil(n*bits/8)`` bytes."""
    v = np.ascontiguousarray(values, dtype=np.uint8).reshape(-1, 1)
    stream = np.unpackbits(v, axis=1, bitorder="little")[:, :bits]
    return np.packbits(stream.reshape(-1), bitorder="little").tobytes()


def unpack_bits(buf: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` unsigned integers as uint8."""
    stream = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="little")[: count * bits]
    return np.packbits(stream.reshape(count, bits), axis=1, bitorder="little").reshape(-1)


# --------------------------------------------------------------------------------------------
# Round-to-nearest, the reference quantizer, as functions
# --------------------------------------------------------------------------------------------

def rtn_codes(w: torch.Tensor, fmt: Int, shrink=None) -> QuantizedTensor:
    """Round-to-nearest of one tensor onto a resolved integer format: its stored form."""
    rows = to_rows(w, fmt)
    scale, zero = grid_params(rows, fmt, shrink)
    return QuantizedTensor.from_rows(round_to_grid(rows, scale, zero, fmt), scale, zero, fmt, w.shape, w.dtype)


def cast(w: torch.Tensor, config: Float16 | KeepFloat) -> torch.Tensor:
    """A float configuration applied to ``w``: cast to float16 and back, or a copy."""
    return w.detach().to(torch.float16).to(w.dtype) if isinstance(config, Float16) else w.detach().clone()


def rtn_quantize(w: torch.Tensor, config=4, axis: int = 0) -> torch.Tensor:
    """Fake-quantize ``w`` by round-to-nearest: the dequantized weights, same shape and dtype.

    Parameters
    ----------
    w : Tensor
        Weights of any shape; they must be finite. ``w`` itself is untouched.
    config : Config, str or int
        :class:`~tqslite.config.Int` (e.g. ``Int(4, PerGroup(32))``), :class:`~tqslite.config.Float16`,
        :class:`~tqslite.config.KeepFloat`, a label (``"int3/group32"``) or an int (4 is
        ``Int(4)``: per channel, symmetric; 16 and 32 are the float formats).
    axis : int
        The channel axis where the granularity leaves it open (0: the output channel of a torch
        ``Linear``/``Conv`` weight). A group size that does not divide the elements per channel
        raises ``ValueError`` here (plans fall back to one scale per channel instead).
    """
    config = as_config(config)
    if not isinstance(config, Int):
        return cast(w, config)
    return rtn_codes(w, config.resolve(w.shape, axis, strict=True)).dequantize().to(w.device)


def relative_error(w: torch.Tensor, config=4, axis: int = 0) -> float:
    """``||Q(w) - w|| / ||w||`` for RTN (Frobenius, float64); 0 for an all-zero tensor."""
    w = w.detach()
    norm = float(w.double().norm())
    return 0.0 if norm == 0 else float((rtn_quantize(w, config, axis).double() - w.double()).norm()) / norm


def sqnr_db(w: torch.Tensor, config=4, axis: int = 0) -> float:
    """Signal-to-quantization-noise ratio ``20 log10(||w|| / ||w - Q(w)||)`` in dB, for RTN."""
    return -20.0 * math.log10(relative_error(w, config, axis))


def storage_bits(shape, config=4, axis: int = 0, dtype=None) -> int:
    """Exact stored size in bits of a tensor of ``shape`` under ``config`` (any quantizer).

    Integer formats: ``numel * bits`` for the codes, 16 per scale, ``bits`` per zero point when
    asymmetric; float16: ``numel * 16``; kept in float: ``numel`` times the dtype's bits.
    """
    return as_config(config).storage_bits(tuple(shape), axis, dtype)


__all__ = ["QuantizedTensor", "asymmetric_grid", "cast", "check_finite", "fake_quant", "fp16_ceil", "from_rows", "grid_params", "pack_bits",
           "relative_error", "round_to_grid", "rtn_codes", "rtn_quantize", "sqnr_db", "storage_bits", "to_rows",
           "unpack_bits"]
