"""The configuration vocabulary: how one tensor is stored (SPEC section 4).

A *configuration* is a small frozen value, validated when it is made:

* :class:`Int` -- an integer format: ``bits`` (1-8), symmetric or not, on a **scale
  granularity** that says how many float16 scales the tensor stores;
* :class:`Float16` -- the tensor cast to float16 and back;
* :class:`KeepFloat` -- the tensor kept as it is (float32 for the stand-ins).

The scale granularities (not to be confused with the *unit* granularity of
:mod:`tqslite.units`, which says which tensors share one configuration):

=======================  ===========================================  ======================================
granularity              one scale (and zero point) per               scales of an ``(out, in)`` weight
=======================  ===========================================  ======================================
``PerTensor()``          the whole tensor                             ``(1,)``
``PerChannel(axis)``     index of the channel ``axis``                ``(out,)``
``PerGroup(g, axis)``    ``g`` contiguous elements of one channel     ``(out, in // g)``, stored flat
=======================  ===========================================  ======================================

``axis=None`` (the default) means the tensor's output-channel axis as its model reports it
(:meth:`tqslite.systems.TorchSystem.channel_axis`: 0 for ``Linear``/``Conv`` weights, 1 for
``ConvTranspose``; read from the consuming node for an ONNX graph). One configuration serves a
whole unit of several tensors, so :meth:`Int.resolve` turns it into the concrete one for each
tensor: a 1-D or 0-D tensor (a bias, a norm gain, a scalar) has no channel axis and gets one
scale; a group size that does not divide a channel's elements falls back to one scale per
channel (a depthwise kernel of 25 taps under groups of 32). The rule is the same for every
quantizer, so two quantizers on the same configuration store the same number of bits.

Every configuration has a short ``label`` that :func:`parse` reads back (plans keep labels in
JSON): ``"int4/channel"``, ``"int3/group32"``, ``"int8/tensor/asym"``, ``"int4/channel@1"``
(an explicit axis), ``"fp16"``, ``"float"``. :func:`as_config` also takes an int as shorthand:
2-8 for :class:`Int` per channel, 16 for :class:`Float16`, 32 for :class:`KeepFloat`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

import torch

# --------------------------------------------------------------------------------------------
# Scale granularities
# --------------------------------------------------------------------------------------------


def _check_axis(axis) -> None:
    if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
        raise ValueError(f"axis={axis!r}: give an integer axis, or None for the tensor's output-channel axis.")


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor: scales of shape ``(1,)``."""

    @property
    def label(self) -> str:
        return "tensor"


@dataclass(frozen=True)
class PerChannel:
    """One scale per index of the channel ``axis``: scales of shape ``(shape[axis],)``.

    ``axis=None``: the tensor's output-channel axis, as its model reports it.
    """

    axis: int | None = None

    def __post_init__(self):
        _check_axis(self.axis)

    @property
    def label(self) -> str:
        return "channel" + ("" if self.axis is None else f"@{self.axis}")


@dataclass(frozen=True)
class PerGroup:
    """One scale per ``group_size`` contiguous elements of each channel.

    The channel's elements (all axes but ``axis``, flattened in order) are cut into groups;
    scales have shape ``(shape[axis], elements_per_channel // group_size)``, stored flat
    channel by channel. ``group_size`` must divide the elements per channel; where it does not,
    :meth:`Int.resolve` falls back to :class:`PerChannel`.
    """

    group_size: int
    axis: int | None = None

    def __post_init__(self):
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size={self.group_size!r}: give a positive integer (32, 64, 128 are common).")
        _check_axis(self.axis)

    @property
    def label(self) -> str:
        return f"group{self.group_size}" + ("" if self.axis is None else f"@{self.axis}")


Granularity = PerTensor | PerChannel | PerGroup


# --------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Int:
    """An integer format: codes of ``bits`` bits plus float16 scales on a granularity.

    * symmetric (default, ``bits >= 2``): codes in ``[-qmax, qmax]`` with
      ``qmax = 2**(bits-1) - 1``, ``w ~ code * scale``; zero is exact;
    * asymmetric: codes in ``[0, 2**bits - 1]`` and an integer zero point per scale,
      ``w ~ (code - zero) * scale``; 1 bit exists only as asymmetric.

    Stored size: ``bits`` per element, 16 per scale, and ``bits`` per zero point when
    asymmetric (:meth:`storage_bits`).
    """

    bits: int
    granularity: Granularity = field(default_factory=PerChannel)
    symmetric: bool = True

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"bits={self.bits!r}: integer formats have 1 to 8 bits; use Float16() or KeepFloat() "
                             "for 16 and 32.")
        if self.bits == 1 and self.symmetric:
            raise ValueError("1-bit integers exist only as asymmetric: Int(1, symmetric=False), or use bits >= 2.")
        if not isinstance(self.granularity, (PerTensor, PerChannel, PerGroup)):
            raise ValueError(f"granularity={self.granularity!r}: use PerTensor(), PerChannel(axis) or "
                             "PerGroup(group_size, axis).")

    @property
    def qmin(self) -> int:
        """Smallest code."""
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        """Largest code."""
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def label(self) -> str:
        return f"int{self.bits}/{self.granularity.label}" + ("" if self.symmetric else "/asym")

    def resolve(self, shape, axis: int = 0, strict: bool = False) -> Int:
        """The concrete configuration for one tensor of ``shape`` whose channel axis is ``axis``.

        ``axis`` is used where the granularity leaves it open (``axis=None``). Returns an
        :class:`Int` whose granularity is :class:`PerTensor` (0-D and 1-D tensors, or
        ``PerTensor`` asked for), or a :class:`PerChannel`/:class:`PerGroup` with a
        non-negative axis. A group size that does not divide the elements per channel falls
        back to :class:`PerChannel` -- the rule for a configuration shared by a whole unit or
        plan -- or, with ``strict=True`` (one tensor quantized on purpose), raises ``ValueError``.
        """
        shape = tuple(int(s) for s in shape)
        g = self.granularity
        if isinstance(g, PerTensor) or len(shape) == 0:
            return replace(self, granularity=PerTensor())
        if len(shape) == 1:  # no channel axis: the tensor is one channel
            if isinstance(g, PerGroup) and shape[0] % g.group_size == 0 and g.group_size < shape[0]:
                return replace(self, granularity=PerGroup(g.group_size, 0))
            if strict and isinstance(g, PerGroup) and shape[0] % g.group_size:
                raise ValueError(f"group_size={g.group_size} does not divide the {shape[0]} elements of a tensor of "
                                 f"shape {shape}; choose a divisor of {shape[0]}.")
            return replace(self, granularity=PerTensor())
        ax = axis if g.axis is None else g.axis
        if not -len(shape) <= ax < len(shape):
            raise ValueError(f"axis={ax} is out of range for a tensor of shape {shape}.")
        ax %= len(shape)
        if isinstance(g, PerGroup):
            per_channel = math.prod(shape) // shape[ax]
            if per_channel % g.group_size == 0:
                return replace(self, granularity=PerGroup(g.group_size, ax))
            if strict:
                raise ValueError(f"group_size={g.group_size} does not divide the {per_channel} elements per channel of "
                                 f"a tensor of shape {shape} (axis={ax}); choose a divisor of {per_channel}.")
        return replace(self, granularity=PerChannel(ax))

    def n_scales(self, shape, axis: int = 0) -> int:
        """Number of scales stored for a tensor of ``shape`` (after :meth:`resolve`)."""
        r = self.resolve(shape, axis).granularity
        shape = tuple(shape)
        if isinstance(r, PerTensor):
            return 1
        if isinstance(r, PerChannel):
            return shape[r.axis]
        return math.prod(shape) // r.group_size

    def storage_bits(self, shape, axis: int = 0, dtype=None) -> int:
        """Exact stored size in bits: codes, float16 scales, and zero points if asymmetric."""
        s = self.n_scales(shape, axis)
        return math.prod(shape) * self.bits + 16 * s + (0 if self.symmetric else self.bits * s)


@dataclass(frozen=True)
class Float16:
    """The tensor cast to float16 (and back to its dtype when used): 16 bits per element."""

    bits = 16

    @property
    def label(self) -> str:
        return "fp16"

    def storage_bits(self, shape, axis: int = 0, dtype=None) -> int:
        return math.prod(shape) * 16


@dataclass(frozen=True)
class KeepFloat:
    """The tensor kept as it is: the bits of its dtype per element (32 for float32)."""

    bits = 32

    @property
    def label(self) -> str:
        return "float"

    def storage_bits(self, shape, axis: int = 0, dtype=None) -> int:
        width = 32 if dtype is None else torch.finfo(dtype).bits
        return math.prod(shape) * width


Config = Int | Float16 | KeepFloat


# --------------------------------------------------------------------------------------------
# Reading configurations from labels and shorthands
# --------------------------------------------------------------------------------------------

_INT_LABEL = re.compile(r"^int(\d)/(tensor|channel|group(\d+))(?:@(-?\d+))?(/asym)?$")


def parse(label: str) -> Config:
    """The configuration a label names (the inverse of ``config.label``).

    Examples: ``"int4/channel"``, ``"int3/group32"``, ``"int2/tensor/asym"``,
    ``"int4/channel@1"``, ``"fp16"``, ``"float"``.
    """
    text = str(label).strip().lower()
    if text in ("fp16", "float16"):
        return Float16()
    if text in ("float", "fp32", "float32"):
        return KeepFloat()
    m = _INT_LABEL.match(text)
    if not m:
        raise ValueError(f"{label!r} is not a configuration label; examples: 'int4/channel', 'int3/group32', "
                         "'int8/tensor/asym', 'fp16', 'float'.")
    bits, kind, group, axis, asym = m.groups()
    axis = None if axis is None else int(axis)
    gran = PerTensor() if kind == "tensor" else PerChannel(axis) if kind == "channel" else PerGroup(int(group), axis)
    return Int(int(bits), gran, symmetric=asym is None)


def as_config(x) -> Config:
    """A configuration from a configuration, a label, or an int (2-8: ``Int``, 16, 32)."""
    if isinstance(x, (Int, Float16, KeepFloat)):
        return x
    if isinstance(x, str):
        return parse(x)
    if isinstance(x, int) and not isinstance(x, bool):
        if x == 16:
            return Float16()
        if x == 32:
            return KeepFloat()
        return Int(x)
    raise ValueError(f"{x!r} is not a configuration: pass Int(bits, granularity), Float16(), KeepFloat(), a label "
                     "such as 'int4/group32', or an int (2-8, 16, 32).")


def int_options(bits=(2, 3, 4, 5, 6, 8), granularity: Granularity | None = None, symmetric: bool = True,
                floats: bool = True) -> tuple[Config, ...]:
    """Options for the allocator: ``Int(b, granularity)`` for each ``b``, then float16 and float.

    ``int_options()`` is :data:`DEFAULT_OPTIONS`; ``int_options((2, 3, 4), PerGroup(32))``
    prices three grouped formats plus the two float ones; ``floats=False`` leaves those out.
    """
    gran = PerChannel() if granularity is None else granularity
    ints = tuple(Int(int(b), gran, symmetric) for b in bits)
    return ints + ((Float16(), KeepFloat()) if floats else ())


#: The allocator's default options: 2, 3, 4, 5, 6 and 8 bits per channel (symmetric), float16, float.
DEFAULT_OPTIONS = int_options()


__all__ = ["Config", "DEFAULT_OPTIONS", "Float16", "Granularity", "Int", "KeepFloat", "PerChannel", "PerGroup",
           "PerTensor", "as_config", "int_options", "parse"]
