"""The context manager that quantizes a model's layer outputs while it is active, and its log."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import xarray as xr

from .calibration import Calibration, calibrate
from .grid import check_bits, fake_quantize_counted
from .layers import quantizable_modules
from .surrogate import Surrogate

#: How each sample's range is found (see :mod:`tqslite.activations`).
MODES = ("static", "dynamic", "probabilistic")
#: The probabilistic range's surrogates: plain moment propagation, or with a fitted correction.
SURROGATES = ("moments", "calibrated")


@dataclass
class ActivationLog:
    """Counters filled while :func:`quantized_activations` is active (with ``record=True``).

    Per module name: ``calls``, ``elements`` (output elements seen), ``clipped`` (elements outside
    the grid), ``sq_error`` (sum of squared quantization errors) and ``sq_output`` (sum of squared
    outputs), the last three only when recording.
    """

    mode: str
    bits: dict
    calls: dict = field(default_factory=dict)
    elements: dict = field(default_factory=dict)
    clipped: dict = field(default_factory=dict)
    sq_error: dict = field(default_factory=dict)
    sq_output: dict = field(default_factory=dict)

    def clip_fraction(self) -> dict:
        """``{module: clipped / elements}``."""
        return {n: self.clipped[n] / self.elements[n] if self.elements.get(n) else 0.0 for n in self.clipped}

    def relative_error(self) -> dict:
        """``{module: ||q(y) - y|| / ||y||}`` pooled over every call: the layer's own injected error."""
        return {n: math.sqrt(self.sq_error[n] / self.sq_output[n]) if self.sq_output.get(n) else 0.0
                for n in self.sq_error}

    def to_dataset(self) -> xr.Dataset:
        """The counters as an xarray Dataset with dim ``module``."""
        names = list(self.calls)
        return xr.Dataset(
            {"calls": ("module", [self.calls[n] for n in names]),
             "clip_fraction": ("module", [self.clip_fraction().get(n, np.nan) for n in names]),
             "relative_error": ("module", [self.relative_error().get(n, np.nan) for n in names]),
             "bits": ("module", [self.bits[n] for n in names])},
            coords={"module": names}, attrs={"mode": self.mode})


def _bits_per_module(model, bits, modules) -> tuple[dict, dict]:
    """``(targets, {name: bits})``; a ``{name or pattern: bits}`` mapping selects the layers itself."""
    if not isinstance(bits, Mapping):
        targets = quantizable_modules(model, modules)
        b = check_bits(bits)
        return targets, {n: b for n in targets}
    if modules is not None:
        raise ValueError("pass either modules=... or a {module: bits} mapping, not both.")
    per_bits = {}
    for key, b in bits.items():   # later keys override earlier ones
        for n in quantizable_modules(model, [key]):
            per_bits[n] = check_bits(b)
    targets = quantizable_modules(model, list(per_bits))
    return targets, {n: per_bits[n] for n in targets}


@contextlib.contextmanager
def quantized_activations(model, mode: str = "dynamic", bits=8, k: float = 3.0, calibration=None,
                          modules: Iterable[str] | None = None, surrogate: str = "moments", record: bool = False):
    """Quantize the outputs of a model's Linear and Conv layers while the context is active.

    Hooks are attached on entry and removed on exit (also on an exception); the model's
    parameters and buffers are never written. Use the model (or system) as usual inside::

        with quantized_activations(system, "probabilistic", bits=6, k=3, calibration=cal):
            fc = forecast(system, x0, steps=20)

    Parameters
    ----------
    model : nn.Module or system
        The model; a :class:`~tqslite.systems.TorchSystem` or
        :class:`~tqslite.systems.WindowedSystem` is hooked through its ``module``.
    mode : {"static", "dynamic", "probabilistic"}
        How each sample's range is found; see the module docstring.
    bits : int or dict
        Activation bit width (1-8, 16 or 32) for every selected layer, or ``{module name or
        pattern: bits}`` (its keys then select the layers, later keys overriding earlier ones;
        do not pass ``modules`` too).
    k : float
        Probabilistic mode: the range is the predicted mean +- ``k`` predicted standard deviations.
    calibration : Calibration or states, optional
        Needed by ``mode="static"`` and by ``surrogate="calibrated"``: a :func:`calibrate` result,
        or calibration states ``(N, *S)`` to calibrate on now (one step).
    modules : list of str, optional
        Layers to quantize (names or ``fnmatch`` patterns; default: every Linear / Conv1d / Conv2d).
    surrogate : {"moments", "calibrated"}
        Probabilistic mode: plain moment propagation, or with the per-channel std correction
        fitted by :func:`calibrate`.
    record : bool
        Count clipped elements and quantization errors per layer in the yielded
        :class:`ActivationLog` (costs an extra pass over each output; leave off when timing).

    Yields
    ------
    ActivationLog
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: use one of {MODES}.")
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate={surrogate!r}: use one of {SURROGATES}.")
    if not (isinstance(k, (int, float)) and math.isfinite(k) and k > 0):
        raise ValueError(f"k={k!r}: the probabilistic range needs a positive, finite number of standard deviations.")
    targets, per_bits = _bits_per_module(model, bits, modules)
    needs_cal = mode == "static" or (mode == "probabilistic" and surrogate == "calibrated")
    if needs_cal:
        if calibration is None:
            raise ValueError(f"mode={mode!r}{' with surrogate=calibrated' if mode == 'probabilistic' else ''} needs "
                             "calibration: pass calibration=calibrate(model, training_states) or the states.")
        if not isinstance(calibration, Calibration):
            calibration = calibrate(model, calibration, list(targets))
        missing = [n for n in targets if n not in calibration.ranges]
        if missing:
            raise ValueError(f"the calibration does not cover layers {missing[:5]}; calibrate them too.")
    log = ActivationLog(mode, dict(per_bits))
    static = {n: tuple(torch.tensor([v]) for v in calibration.ranges[n]) for n in targets} if mode == "static" else {}
    pending: dict[str, tuple] = {}
    handles = []

    def post_hook(name, surrogate_obj):
        b = per_bits[name]

        def hook(module, args, out):
            if mode == "static":
                lo, hi = static[name]
            elif mode == "dynamic":
                flat = out.detach().flatten(1)
                lo, hi = flat.amin(1), flat.amax(1)
            else:
                lo, hi = pending.pop(name)
            try:
                q, clipped = fake_quantize_counted(out, lo, hi, b, count=record)
            except ValueError as err:
                raise ValueError(f"layer {name!r}: {err}") from None
            log.calls[name] = log.calls.get(name, 0) + 1
            log.elements[name] = log.elements.get(name, 0) + out.numel()
            if record:
                log.clipped[name] = log.clipped.get(name, 0) + clipped
                log.sq_error[name] = log.sq_error.get(name, 0.0) + float((q.double() - out.double()).pow(2).sum())
                log.sq_output[name] = log.sq_output.get(name, 0.0) + float(out.double().pow(2).sum())
            return q
        return hook

    def pre_hook(name, surrogate_obj):
        def hook(module, args):
            pending[name] = surrogate_obj.range(args[0], k)
        return hook

    try:
        for name, m in targets.items():
            if per_bits[name] == 32:
                continue
            s = None
            if mode == "probabilistic":
                ratio = calibration.std_ratio[name] if surrogate == "calibrated" else None
                s = Surrogate.of(m, ratio)
                handles.append(m.register_forward_pre_hook(pre_hook(name, s)))
            handles.append(m.register_forward_hook(post_hook(name, s)))
        yield log
    finally:
        for h in handles:
            h.remove()
        pending.clear()
