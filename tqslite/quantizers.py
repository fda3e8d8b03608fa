"""Quantizers: what turns a tensor and a configuration into fake-quant weights and packed codes.

Sensitivity (the probe) and quantization are chosen independently (SPEC sections 3-4): any score
drives any quantizer, and every quantizer stores a configuration in exactly the same number of
bits (:meth:`tqslite.config.Int.storage_bits`), so methods compare at matched size.

The interface, :class:`Quantizer`, has two levels:

* :meth:`Quantizer.quantize` -- one tensor, a resolved :class:`~tqslite.config.Int` and, for a
  calibration-based quantizer, what it gathered from calibration (GPTQ: the layer's Hessian);
  returns a :class:`~tqslite.quantization.QuantizedTensor` (codes, float16 scales, zero points);
* :meth:`Quantizer.quantize_weights` -- a whole model and ``{tensor name: configuration}``
  (what a plan says), with calibration states if the quantizer needs them; returns
  :class:`QuantizedWeights`: the stored form of every tensor and how each was quantized. The
  model is never modified.

The quantizers here need no data:

* :class:`RTN` -- round-to-nearest, the reference;
* :class:`MSEClip` -- RTN whose range is shrunk per slice to minimise the weight's squared
  quantization error (a grid search over clipping factors, as GPTQ's ``find_params(mse=True)``);
  it costs nothing at inference and its weight error is never above RTN's.

:class:`tqslite.gptq.GPTQ` is calibration-based. :func:`as_quantizer` reads ``"rtn"``,
``"mse"`` or ``"gptq"``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from tqdm import tqdm

from .config import Config, Int, as_config
from .quantization import (QuantizedTensor, cast, check_finite, fake_quant, grid_params, rtn_codes,
                           to_rows)
from .systems import as_system


@dataclass
class QuantizedWeights:
    """New values for some tensors of a model, as a quantizer made them.

    Attributes
    ----------
    tensors : dict of str to QuantizedTensor
        Tensors on an integer format: their codes, float16 scales and zero points.
    floats : dict of str to Tensor
        Tensors on a float configuration (cast to float16 and back, or kept), in their dtype.
    configs : dict of str to Config
        The resolved configuration of every tensor (concrete granularity and axis).
    methods : dict of str to str
        How each tensor was quantized: the quantizer's name (``"rtn"``, ``"mse"``, ``"gptq"``),
        ``"float16"``/``"float"``, or ``"rtn (fallback: <reason>)"`` where a calibration-based
        quantizer could not calibrate it.
    quantizer : str
        The quantizer's description.
    """

    tensors: dict = field(default_factory=dict)
    floats: dict = field(default_factory=dict)
    configs: dict = field(default_factory=dict)
    methods: dict = field(default_factory=dict)
    quantizer: str = ""

    def dequantized(self) -> dict:
        """``{name: fake-quant tensor}`` for every tensor, in the tensors' own dtypes."""
        out = {n: qt.dequantize() for n, qt in self.tensors.items()}
        return out | dict(self.floats)

    @property
    def fallbacks(self) -> dict:
        """``{name: reason}`` for the tensors a calibration-based quantizer left to RTN."""
        return {n: m.split("fallback: ", 1)[1].removesuffix(")") for n, m in self.methods.items() if "fallback: " in m}

    def __len__(self) -> int:
        return len(self.configs)

    def add(self, name: str, w: torch.Tensor, config: Config, axis: int, quantizer: Quantizer,
            method: str | None = None, hessian: torch.Tensor | None = None) -> None:
        """Quantize tensor ``name`` (values ``w``, channel axis ``axis``) by ``quantizer`` and keep it.

        An integer ``config`` is resolved for ``w`` and passed to ``quantizer.quantize`` (with
        ``hessian`` if given); a float one casts ``w``. ``method`` overrides the recorded method
        (e.g. ``"rtn (fallback: embedding)"``).
        """
        config = as_config(config)
        if isinstance(config, Int):
            fmt = config.resolve(w.shape, axis)
            self.tensors[name] = quantizer.quantize(w, fmt, hessian)
            self.configs[name], self.methods[name] = fmt, method or quantizer.name
        else:
            self.floats[name] = cast(w, config)
            self.configs[name], self.methods[name] = config, "float16" if config.bits == 16 else "float"


class Quantizer(ABC):
    """Turns a tensor and an integer configuration into its stored form (see the module docstring)."""

    #: Short name, used in plans, tables and on the command line.
    name: ClassVar[str] = ""
    #: Whether :meth:`quantize_weights` needs calibration states.
    needs_calibration: ClassVar[bool] = False

    @abstractmethod
    def quantize(self, w: torch.Tensor, fmt: Int, hessian: torch.Tensor | None = None) -> QuantizedTensor:
        """Quantize one tensor onto ``fmt`` (already resolved for ``w``: :meth:`Int.resolve`)."""

    def quantize_weights(self, model, configs: Mapping[str, Config], calibration=None,
                         progress: bool = False) -> QuantizedWeights:
        """The stored form of every tensor in ``configs`` (``{name: configuration}``), tensor by tensor.

        ``model`` (an ``nn.Module`` or a system) is read, never modified. Each configuration is
        resolved for its tensor with the model's channel axis (:meth:`tqslite.config.Int.resolve`).
        """
        system = as_system(model)
        out = QuantizedWeights(quantizer=repr(self))
        for name, config in tqdm(configs.items(), desc=f"{self.name}: tensors", disable=not progress):
            w = system.get_parameter(name)
            check_finite(w, f"parameter {name!r}")
            out.add(name, w, config, system.channel_axis(name), self)
        return out


@dataclass(frozen=True)
class RTN(Quantizer):
    """Round-to-nearest: each slice's scale from its range, each weight to the nearest code."""

    name: ClassVar[str] = "rtn"

    def quantize(self, w, fmt, hessian=None) -> QuantizedTensor:
        return rtn_codes(w, fmt)


@dataclass(frozen=True)
class MSEClip(Quantizer):
    """RTN with each slice's range shrunk to minimise its squared quantization error.

    For every slice the factors ``p = 1, 1 - 1/grid, ..., 1 - (max_shrink * grid - 1) / grid``
    narrow the range (``max|w|`` when symmetric, ``[min, max]`` otherwise) before the scale is
    set, weights beyond it are clipped, and the ``p`` with the smallest ``sum |w - q(w)|**norm``
    wins. ``p = 1`` is plain RTN, so with ``norm=2`` the weight error is never above RTN's.
    Nothing changes at inference: the result is stored like any RTN tensor.

    Parameters
    ----------
    grid : int
        Steps of the search per unit of shrinkage (100: factors 0.01 apart).
    max_shrink : float
        Largest shrinkage searched, in ``(0, 1)`` (0.8: factors down to 0.21).
    norm : float
        Exponent of the error (2: squared error).
    """

    grid: int = 100
    max_shrink: float = 0.8
    norm: float = 2.0
    name: ClassVar[str] = "mse"

    def __post_init__(self):
        if not (isinstance(self.grid, int) and self.grid >= 1 and 0 < self.max_shrink < 1 and self.norm > 0):
            raise ValueError(f"MSEClip(grid={self.grid!r}, max_shrink={self.max_shrink!r}, norm={self.norm!r}): "
                             "grid must be a positive int, max_shrink in (0, 1), norm > 0.")

    def quantize(self, w, fmt, hessian=None) -> QuantizedTensor:
        rows = to_rows(w, fmt)
        best = torch.full((rows.shape[0], 1), float("inf"), device=rows.device)
        shrink = torch.ones_like(best)
        for i in range(max(1, int(self.max_shrink * self.grid))):
            p = 1.0 - i / self.grid
            scale, zero = grid_params(rows, fmt, p)
            err = (fake_quant(rows, scale, zero, fmt) - rows).abs().pow(self.norm).sum(dim=1, keepdim=True)
            better = err < best
            best = torch.where(better, err, best)
            shrink = torch.where(better, torch.full_like(shrink, p), shrink)
        return rtn_codes(w, fmt, shrink)


def as_quantizer(q) -> Quantizer:
    """A quantizer from an instance or a name: ``"rtn"``, ``"mse"`` or ``"gptq"`` (default settings)."""
    if isinstance(q, Quantizer):
        return q
    from .gptq import GPTQ
    known = {cls.name: cls for cls in (RTN, MSEClip, GPTQ)}
    if isinstance(q, str) and q.lower() in known:
        return known[q.lower()]()
    raise ValueError(f"{q!r} is not a quantizer: use one of {sorted(known)} or an instance such as GPTQ(damp=0.01).")


__all__ = ["MSEClip", "QuantizedWeights", "Quantizer", "RTN", "as_quantizer"]
