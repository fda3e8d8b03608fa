"""Round-to-nearest (RTN) weight quantization: fake-quant, packed storage and exact sizes.

The conventions (SPEC section 4) in one place:

* **symmetric**, ``bits >= 2``: ``qmax = 2**(bits-1) - 1``, ``scale = max|w| / qmax`` per slice,
  codes ``clamp(round(w / scale), -qmax, qmax)``. Zero is exact and re-quantizing is idempotent.
* **asymmetric**, ``bits >= 1``: the slice's range ``[min, max]`` is widened to contain 0,
  ``scale = (max - min) / (2**bits - 1)``, integer zero point ``zp = round(-min / scale)`` in
  ``[0, 2**bits - 1]``, codes ``clamp(round(w / scale) + zp, 0, 2**bits - 1)``.
* an all-zero slice keeps ``scale = 1`` and stays zero.
* **granularity**: ``"tensor"`` (one slice), ``"channel"`` (one slice per index of ``axis``;
  default axis 0, the output channel of a torch ``Linear``/``Conv`` weight) or ``"group"``
  (each channel's remaining elements, flattened, cut into contiguous groups of ``group_size``).
  A 1-D tensor (a bias, a norm gain) has no channel axis: it counts as a single channel.
* **scales are stored in float16**, and fake-quant uses exactly the stored scale, so what you
  simulate is what lands on disk. The float16 scale is rounded *up*, so no weight is ever
  clipped and ``|w - q(w)| <= scale / 2`` holds with the stored scale.
* ``bits=16`` casts to float16 and back; ``bits=32`` keeps the tensor as it is.

A note on idempotence: symmetric grids re-quantize to themselves bit for bit. Asymmetric ones
almost always do, but the upward rounding of the float16 scale can leave the top code of a slice
unused (more often at 7-8 bits), and a second pass then fits a slightly finer grid, moving values
by less than one step. Rounding the scale to nearest instead would clip the extreme weights.

Storage: codes at ``bits`` bits, scales at 16 bits, asymmetric zero points at ``bits`` bits.
:func:`storage_bits` counts these exactly and :meth:`QuantizedTensor.to_bytes` writes exactly
``ceil(storage_bits / 8)`` bytes of payload.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

#: Bit widths accepted anywhere in tqslite: integer RTN at 1-8 bits, float16, float32.
VALID_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32)
GRANULARITIES = ("tensor", "channel", "group")
FP16_MAX = 65504.0
#: Below this a float16 scale is a subnormal with fewer than 5 significant bits (error >= 3 %).
_FP16_COARSE = 2.0**-20


def check_bits(bits, symmetric: bool = True) -> int:
    """Return ``bits`` as an int, or raise ``ValueError`` if tqslite cannot quantize to it."""
    if isinstance(bits, bool) or int(bits) != bits or int(bits) not in VALID_BITS:
        raise ValueError(f"bits={bits!r} is not supported: use an integer in 1-8, or 16 (float16) or 32 (float).")
    bits = int(bits)
    if bits == 1 and symmetric:
        raise ValueError("1-bit RTN exists only as asymmetric: pass symmetric=False, or use bits >= 2.")
    return bits


def check_finite(w: torch.Tensor, name: str = "tensor") -> None:
    """Raise ``ValueError`` naming ``name`` if ``w`` holds NaN or Inf."""
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or Inf); fix or drop it before quantizing.")


# --------------------------------------------------------------------------------------------
# Slicing a tensor into rows that share one scale
# --------------------------------------------------------------------------------------------

def _to_rows(w: torch.Tensor, granularity: str, axis: int, group_size: int | None) -> torch.Tensor:
    """View ``w`` as a 2-D float32 matrix ``(n_slices, slice_len)``: one row per scale."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r}: use one of {GRANULARITIES}.")
    w = w.detach().to(torch.float32)
    if granularity == "tensor" or w.ndim == 0:
        return w.reshape(1, -1)
    if w.ndim == 1:
        rows = w.reshape(1, -1)
    else:
        if not -w.ndim <= axis < w.ndim:
            raise ValueError(f"axis={axis} is out of range for a tensor of shape {tuple(w.shape)}.")
        rows = w.movedim(axis, 0).reshape(w.shape[axis], -1)
    if granularity == "channel":
        return rows
    if group_size is None or group_size < 1:
        raise ValueError("granularity='group' needs a positive group_size.")
    if rows.shape[1] % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide the {rows.shape[1]} elements per channel of a tensor "
            f"of shape {tuple(w.shape)} (axis={axis}); choose a divisor of {rows.shape[1]}."
        )
    return rows.reshape(-1, group_size)


def _from_rows(rows: torch.Tensor, shape: tuple, granularity: str, axis: int) -> torch.Tensor:
    """Inverse of :func:`_to_rows`."""
    if granularity == "tensor" or len(shape) <= 1:
        return rows.reshape(shape)
    axis = axis % len(shape)
    moved = (shape[axis],) + tuple(s for i, s in enumerate(shape) if i != axis)
    return rows.reshape(moved).movedim(0, axis)


def grid_for(shape, granularity: str = "channel", axis: int = 0, group_size: int | None = None) -> dict:
    """The grid a whole-model plan gives one tensor: ``granularity`` and ``group_size`` keywords.

    :func:`rtn_quantize` refuses a ``group_size`` that does not divide a channel's elements. A
    plan over a whole model asks for one grouping everywhere, and some tensors (a depthwise
    kernel of 25 taps, a bias of 7) cannot take it; those keep one scale per channel. Allocation,
    :func:`tqslite.apply_plan` and GPTQ all use this rule, so sizes agree across methods.
    """
    if granularity == "group" and group_size:
        per_channel = _to_rows(torch.empty(tuple(shape), device="meta"), "channel", axis, None).shape[1]
        if per_channel % group_size:
            return {"granularity": "channel", "group_size": None}
    return {"granularity": granularity, "group_size": group_size}


def n_slices(shape, granularity: str = "channel", axis: int = 0, group_size: int | None = None) -> int:
    """Number of scales RTN stores for a tensor of ``shape`` (no data needed)."""
    return _to_rows(torch.empty(tuple(shape), device="meta"), granularity, axis, group_size).shape[0]


def fp16_ceil(x: torch.Tensor) -> torch.Tensor:
    """Round positive float32 values up to the next float16 number (returned as float32)."""
    h = x.to(torch.float16).to(torch.float32)
    up = torch.nextafter(x.to(torch.float16), torch.tensor(float("inf"), dtype=torch.float16)).to(torch.float32)
    return torch.where(h < x, up, h)


# --------------------------------------------------------------------------------------------
# The quantizer
# --------------------------------------------------------------------------------------------

def _quantize_rows(rows: torch.Tensor, bits: int, symmetric: bool):
    """RTN on each row. Returns integer codes, float16-representable scales and zero points.

    ``rows`` is ``(n_slices, slice_len)`` float32; ``codes`` has the same shape (int32),
    ``scale`` and ``zero`` are ``(n_slices, 1)``. Dequantize as ``(codes - zero) * scale``.
    """
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        amax = rows.abs().amax(dim=1, keepdim=True)
        scale = torch.where(amax > 0, fp16_ceil(amax / qmax), torch.ones_like(amax))
        zero = torch.zeros_like(scale)
        codes = torch.clamp(torch.round(rows / scale), -qmax, qmax)
    else:
        qmax = 2**bits - 1
        lo = rows.amin(dim=1, keepdim=True).clamp(max=0)
        hi = rows.amax(dim=1, keepdim=True).clamp(min=0)
        scale = torch.where(hi > lo, fp16_ceil((hi - lo) / qmax), torch.ones_like(hi))
        zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
        codes = torch.clamp(torch.round(rows / scale) + zero, 0, qmax)
    if not torch.all(scale <= FP16_MAX):
        raise ValueError(f"weights up to {float(rows.abs().max()):.3g} need a scale beyond float16's range at {bits} bits.")
    if torch.any((scale < _FP16_COARSE) & (scale != 1)):
        warnings.warn(f"some {bits}-bit scales fall below {_FP16_COARSE:.1e}, where float16 keeps too few significant "
                      "bits: the grid is coarser than intended. Keep such tiny weights at 16 or 32 bits.", stacklevel=3)
    return codes.to(torch.int32), scale, zero


def rtn_quantize(
    w: torch.Tensor,
    bits: int,
    granularity: str = "channel",
    axis: int = 0,
    group_size: int | None = None,
    symmetric: bool = True,
) -> torch.Tensor:
    """Fake-quantize ``w`` by round-to-nearest: the dequantized weights, same shape and dtype.

    Parameters
    ----------
    w : Tensor
        Weights of any shape; they must be finite.
    bits : int
        1-8 for integer RTN (1 only with ``symmetric=False``), 16 for float16, 32 to keep ``w``.
    granularity : {"tensor", "channel", "group"}
        One scale per tensor, per index of ``axis``, or per ``group_size`` contiguous elements
        of each channel.
    axis : int
        The channel axis (0: the output channel of a torch ``Linear``/``Conv`` weight).
    group_size : int, optional
        Group length for ``granularity="group"``; must divide the elements per channel.
    symmetric : bool
        Symmetric grid around zero (default) or asymmetric grid with an integer zero point.

    Returns
    -------
    Tensor
        ``(codes - zero) * scale`` cast back to ``w.dtype``; a new tensor, ``w`` is untouched.
    """
    bits = check_bits(bits, symmetric)
    if bits == 32:
        return w.detach().clone()
    if bits == 16:
        return w.detach().to(torch.float16).to(w.dtype)
    rows = _to_rows(w, granularity, axis, group_size)
    codes, scale, zero = _quantize_rows(rows, bits, symmetric)
    deq = (codes - zero) * scale
    return _from_rows(deq, tuple(w.shape), granularity, axis).to(dtype=w.dtype, device=w.device)


def rtn_scales(w: torch.Tensor, bits: int, granularity="channel", axis=0, group_size=None, symmetric=True):
    """The stored per-slice scales, shape ``(n_slices,)`` float32 (what the residual bound uses)."""
    bits = check_bits(bits, symmetric)
    return _quantize_rows(_to_rows(w, granularity, axis, group_size), bits, symmetric)[1].reshape(-1)


def relative_error(w: torch.Tensor, bits: int, **kwargs) -> float:
    """``||Q_b(w) - w|| / ||w||`` (Frobenius, float64); 0 for an all-zero tensor."""
    w = w.detach()
    norm = float(w.double().norm())
    return 0.0 if norm == 0 else float((rtn_quantize(w, bits, **kwargs).double() - w.double()).norm()) / norm


def sqnr_db(w: torch.Tensor, bits: int, **kwargs) -> float:
    """Signal-to-quantization-noise ratio ``20 log10(||w|| / ||w - Q_b(w)||)`` in dB."""
    return -20.0 * math.log10(relative_error(w, bits, **kwargs))


# --------------------------------------------------------------------------------------------
# Real storage: packed integer codes + float16 scales (+ zero points)
# --------------------------------------------------------------------------------------------

def storage_bits(shape, bits: int, granularity="channel", axis=0, group_size=None, symmetric=True) -> int:
    """Exact stored size in bits of a tensor of ``shape`` quantized at ``bits``.

    ``numel * bits`` for the codes, plus 16 bits per scale, plus ``bits`` per zero point when
    asymmetric. Float16 and float32 store ``numel * 16`` and ``numel * 32`` bits, no scales.
    """
    bits = check_bits(bits, symmetric)
    numel = math.prod(shape)
    if bits in (16, 32):
        return numel * bits
    s = n_slices(shape, granularity, axis, group_size)
    return numel * bits + 16 * s + (0 if symmetric else bits * s)


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack unsigned integers ``< 2**bits`` into a little-endian bit stream, ``ceil(n*bits/8)`` bytes."""
    v = np.ascontiguousarray(values, dtype=np.uint8).reshape(-1, 1)
    stream = np.unpackbits(v, axis=1, bitorder="little")[:, :bits]
    return np.packbits(stream.reshape(-1), bitorder="little").tobytes()


def unpack_bits(buf: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` unsigned integers as uint8."""
    stream = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="little")[: count * bits]
    return np.packbits(stream.reshape(count, bits), axis=1, bitorder="little").reshape(-1)


@dataclass(frozen=True)
class QuantizedTensor:
    """A tensor as it is stored: packed codes (and zero points) plus float16 scales.

    ``payload`` holds the codes of all elements followed by the zero points (asymmetric only),
    each at ``bits`` bits in one little-endian bit stream; symmetric codes are stored offset by
    ``qmax``. ``scales`` is float16 of shape ``(n_slices,)``.
    """

    shape: tuple
    dtype: str
    bits: int
    granularity: str
    axis: int
    group_size: int | None
    symmetric: bool
    scales: np.ndarray
    payload: bytes

    @classmethod
    def from_tensor(cls, w, bits, granularity="channel", axis=0, group_size=None, symmetric=True):
        """Quantize ``w`` (integer RTN, 1-8 bits) into its stored form."""
        bits = check_bits(bits, symmetric)
        if bits > 8:
            raise ValueError("QuantizedTensor stores integer codes (1-8 bits); save 16/32-bit tensors as floats.")
        rows = _to_rows(w, granularity, axis, group_size)
        codes, scale, zero = _quantize_rows(rows, bits, symmetric)
        offset = 2 ** (bits - 1) - 1 if symmetric else 0
        stored = (codes + offset).reshape(-1).numpy().astype(np.uint8)
        if not symmetric:
            stored = np.concatenate([stored, zero.reshape(-1).numpy().astype(np.uint8)])
        return cls(tuple(w.shape), str(w.dtype).removeprefix("torch."), bits, granularity, axis, group_size,
                   symmetric, scale.reshape(-1).numpy().astype(np.float16), pack_bits(stored, bits))

    @property
    def nbits(self) -> int:
        """Exact size in bits (:func:`storage_bits` of this tensor)."""
        return storage_bits(self.shape, self.bits, self.granularity, self.axis, self.group_size, self.symmetric)

    def dequantize(self) -> torch.Tensor:
        """The float tensor, equal bit for bit to :func:`rtn_quantize` with the same settings."""
        numel, s = math.prod(self.shape), len(self.scales)
        stored = unpack_bits(self.payload, self.bits, numel + (0 if self.symmetric else s)).astype(np.int32)
        if self.symmetric:
            codes, zero = stored - (2 ** (self.bits - 1) - 1), np.zeros(s, np.int32)
        else:
            codes, zero = stored[:numel], stored[numel:]
        rows = (torch.from_numpy(codes).reshape(s, -1) - torch.from_numpy(zero)[:, None]) * torch.from_numpy(
            self.scales.astype(np.float32))[:, None]
        return _from_rows(rows, self.shape, self.granularity, self.axis).to(getattr(torch, self.dtype))

    def to_bytes(self) -> bytes:
        """Serialise: one JSON header line, then the float16 scales, then the packed payload."""
        header = dict(shape=list(self.shape), dtype=self.dtype, bits=self.bits, granularity=self.granularity,
                      axis=self.axis, group_size=self.group_size, symmetric=self.symmetric)
        return json.dumps(header).encode() + b"\n" + self.scales.astype("<f2").tobytes() + self.payload

    @classmethod
    def from_bytes(cls, data: bytes) -> "QuantizedTensor":
        """Inverse of :meth:`to_bytes`."""
        line, rest = data.split(b"\n", 1)
        h = json.loads(line)
        s = n_slices(h["shape"], h["granularity"], h["axis"], h["group_size"])
        scales = np.frombuffer(rest[: 2 * s], dtype="<f2").astype(np.float16)
        return cls(tuple(h["shape"]), h["dtype"], h["bits"], h["granularity"], h["axis"], h["group_size"],
                   h["symmetric"], scales, rest[2 * s:])
