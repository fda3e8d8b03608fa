"""Activation quantization: static, dynamic and probabilistic ranges, and the activation probe.

Weights are quantized once, offline (:mod:`tqslite.quantization`). Activations change with every
input, so their quantization grid needs a range ``[lo, hi]`` per input. Three ways to get it:

* **static**: one range per layer, calibrated once on training states (:func:`calibrate`: the
  minimum and maximum over every element of every calibration sample, no percentile clipping).
  Costs nothing at run time; a rollout that leaves the calibrated range is clipped.
* **dynamic**: the minimum and maximum of each sample's output, measured after the layer has run.
  Never clips, but the full-precision output must be held in memory before it can be quantized,
  and it costs a second pass over the output.
* **probabilistic** (Santini, Paissan and Farella, 2025, arXiv 2505.10689): the range is
  *predicted* before the layer runs, from cheap statistics of its input. For ``y = W x + b``
  applied at many positions (the tokens of a transformer, the pixels of a convolution), the
  per-sample mean ``mu`` and variance ``v`` of each input feature over positions give, for each
  output channel ``j``::

      E[y_j]   = W_j . mu + b_j                  (exact for a Linear layer)
      Var[y_j] = (W_j * W_j) . v                 (if input features are independent)

  and the range is ``[min_j (E[y_j] - k std_j), max_j (E[y_j] + k std_j)]``. A convolution uses
  the kernel summed over its spatial taps, which also assumes that neighbouring positions are
  independent: they rarely are in a smooth field, so ``surrogate="calibrated"`` rescales each
  channel's predicted standard deviation by a factor fitted once on calibration states (a small
  learned surrogate, ``d_out`` numbers per layer). The range can clip the tails of a sample.

**Where the quantizers sit, and why.** Every quantizer acts on the *output* of an ``nn.Linear``,
``nn.Conv1d`` or ``nn.Conv2d`` -- the pre-activation, before any nonlinearity or residual sum. That
is the quantity the probabilistic surrogate predicts (``W x + b`` is linear in ``x``, so its moments
follow from those of ``x``), and it is what an integer kernel with a fused epilogue produces: it
accumulates in int32 and *requantizes* its output to ``b`` bits with the output's scale and zero
point. Quantizing a layer's input is the other common choice; up to the nonlinearities, norms and
residual sums in between, one layer's output is what the next one reads, but only the output is
what the surrogate can predict from the statistics of the input.

**The grid.** Ranges are per input sample: the first dim of a layer's output is the sample (batch)
dim, and one range covers all of that sample's elements. The grid is tqslite's asymmetric RTN
grid (:mod:`tqslite.quantization`) over that range: ``[lo, hi]`` widened to contain 0,
``scale = (hi - lo) / (2**bits - 1)`` rounded *up* to a float16 number, integer zero point
``zero = round(-lo / scale)`` in ``[0, 2**bits - 1]``, codes ``clamp(round(y / scale) + zero, 0,
2**bits - 1)``, dequantized ``(codes - zero) * scale``. Inside the (widened) range the error is at
most ``scale / 2``; outside it, a value is clipped to the nearest end of the grid. ``bits=16``
casts to float16 and back; ``bits=32`` leaves the output alone.

**Memory.** Counted in elements held *beyond the layer's own (quantized) output*, per sample
(:func:`activation_costs`): static 0; dynamic the whole full-precision output; probabilistic
``2 (d_in + d_out)`` (input means and variances, predicted means and variances). Persistent
per-layer tensors are counted apart: 2 numbers for static, the squared weights (and, for a
convolution, the spatially summed kernel) for probabilistic. In this module every strategy is
*simulated* in floating point ("fake quantization"): the float output is always computed, so the
accounting says what an integer kernel would need, not what this simulation allocates.

**The activation probe** (:func:`probe_activations`) is the TQS probe of :mod:`tqslite.probe` with
the perturbation moved from a unit's weights to its output: Gaussian noise of relative size
``sigma_rel`` (times the RMS of that sample's output) added at every call, through a forward hook,
seeded by ``(seed, module name)``. Like ``gamma_gauss`` it knows nothing of any quantizer; its
result has the layout of a :func:`tqslite.probe` result.

Everything here works on the ``nn.Module`` of a model (a module, or a
:class:`~tqslite.systems.TorchSystem` / :class:`~tqslite.systems.WindowedSystem`); hooks are
removed on exit and the model's parameters are never written.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from torch import nn
from tqdm import tqdm

from .batched import (NotBatchable, default_memory_budget, parse_bytes, plan_chunks, quiet_slow_ops, step_memory,
                      vmapped_divergence)
from .probe import (as_states, assemble_scores, divergence_floor, fingerprint, nonfinite_stays, reference_rollout,
                    rollout_divergence, unit_seed)
from .config import Int
from .quantization import FP16_MAX, fp16_ceil
from .systems import as_system, device_of
from .units import Unit

#: The layer types whose outputs are quantized.
QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
MODES = ("static", "dynamic", "probabilistic")
SURROGATES = ("moments", "calibrated")


# --------------------------------------------------------------------------------------------
# Finding the layers
# --------------------------------------------------------------------------------------------

def torch_module(model) -> nn.Module:
    """The ``nn.Module`` behind ``model`` (a module, or a system with a ``module`` attribute)."""
    if isinstance(model, nn.Module):
        return model
    module = getattr(model, "module", None)
    if isinstance(module, nn.Module):
        return module
    raise TypeError(f"{type(model).__name__} has no torch module: activation quantization and the activation "
                    "probe attach forward hooks, so they need an nn.Module, a TorchSystem or a WindowedSystem "
                    "(an ONNX graph cannot be hooked).")


def quantizable_modules(model, modules: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """The ``Linear`` / ``Conv1d`` / ``Conv2d`` layers of ``model`` whose outputs get quantized.

    Parameters
    ----------
    model : nn.Module or system
        The model (see :func:`torch_module`).
    modules : list of str, optional
        Module names or ``fnmatch`` patterns (``"blocks.*.mlp.fc1"``); the name of a container
        (``"blocks.0"``) selects every quantizable layer inside it. Default: every quantizable
        layer. A pattern that selects no quantizable layer raises ``ValueError``.

    Returns
    -------
    dict
        ``{qualified name: module}`` in model order.
    """
    net = torch_module(model)
    named = dict(net.named_modules())
    found = {n: m for n, m in named.items() if isinstance(m, QUANTIZABLE)}
    if modules is None:
        if not found:
            raise ValueError(f"{type(net).__name__} has no Linear or Conv1d/2d layer to quantize.")
        return found
    modules = [modules] if isinstance(modules, str) else list(modules)
    chosen = set()
    for pattern in modules:
        hits = [n for n in found if n == pattern or fnmatchcase(n, pattern) or n.startswith(pattern + ".")]
        if not hits:
            if pattern in named:
                raise ValueError(f"module {pattern!r} is a {type(named[pattern]).__name__} with no Linear or "
                                 "Conv1d/2d layer inside; only those layers' outputs are quantized.")
            raise ValueError(f"module {pattern!r} matches no submodule; quantizable layers are e.g. {list(found)[:5]}.")
        chosen.update(hits)
    return {n: m for n, m in found.items() if n in chosen}


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


def _channels(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)``: input features and output channels."""
    if _is_linear(module):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels


# --------------------------------------------------------------------------------------------
# The quantizer: an asymmetric RTN grid over a per-sample range
# --------------------------------------------------------------------------------------------

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
        ``(hi - lo) / (2**bits - 1)`` rounded up to a float16 number (1 for an empty range).
    zero : Tensor, shape ``(B,)``
        Integer zero point ``round(-lo / scale)`` in ``[0, 2**bits - 1]`` (as floats).
    """
    qmax = 2**bits - 1
    lo = lo.clamp(max=0)
    hi = hi.clamp(min=0)
    scale = torch.where(hi > lo, fp16_ceil((hi - lo) / qmax).to(lo.dtype), torch.ones_like(hi))
    if bool((scale > FP16_MAX).any()):
        raise ValueError(f"activations spanning {float((hi - lo).max()):.3g} need a scale beyond float16's range "
                         f"at {bits} bits; the rollout has left any sensible range.")
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
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
    return _fake_quantize(y, lo, hi, check_bits(bits))[0]


def _fake_quantize(y, lo, hi, bits, count: bool = False):
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


# --------------------------------------------------------------------------------------------
# Per-sample statistics: measured after the layer, predicted before it
# --------------------------------------------------------------------------------------------

def _channel_moments(t: torch.Tensor, linear: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean and variance of each channel over positions: ``(B, channels)`` each.

    A Linear's tensor is ``(B, ..., d)`` (channels last), a conv's ``(B, C, *spatial)``. Two passes
    (mean, then mean squared deviation): stable, and much faster here than ``torch.var_mean``
    over a middle dim.
    """
    b = t.shape[0]
    v, dim = (t.reshape(b, -1, t.shape[-1]), 1) if linear else (t.reshape(b, t.shape[1], -1), 2)
    mean = v.mean(dim, keepdim=True)
    var = (v - mean).pow_(2).mean(dim)
    return mean.squeeze(dim), var


def measured_moments(module: nn.Module, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and standard deviation of a layer's output over positions.

    Parameters
    ----------
    module : nn.Linear, nn.Conv1d or nn.Conv2d
        The layer (it says where the channel axis is).
    y : Tensor
        Its output: ``(B, ..., d_out)`` for a Linear, ``(B, d_out, *spatial)`` for a conv.

    Returns
    -------
    mean, std : Tensor, shape ``(B, d_out)``
        Over the tokens / pixels of each sample (population standard deviation).
    """
    mean, var = _channel_moments(y, _is_linear(module))
    return mean, var.sqrt()


def input_moments(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean and variance of each input feature over positions: the surrogate's input.

    Returns
    -------
    mean, var : Tensor, shape ``(B, d_in)``
        ``O(d_in)`` numbers per sample, from one pass over the input.
    """
    return _channel_moments(x, _is_linear(module))


@dataclass
class _Surrogate:
    """What the probabilistic quantizer of one layer keeps: weights for the mean and the variance."""

    w_mean: torch.Tensor      # Linear: W (d_out, d_in), the layer's own; conv: kernel summed over taps
    w_var: torch.Tensor       # W * W, summed over taps for a conv: the persistent extra memory
    bias: torch.Tensor | None
    groups: int
    linear: bool
    std_ratio: torch.Tensor | None = None   # (d_out,) fitted correction ("calibrated" surrogate)

    @classmethod
    def of(cls, module: nn.Module, std_ratio=None) -> "_Surrogate":
        w = module.weight.detach()
        if _is_linear(module):
            return cls(w, w * w, _detached(module.bias), 1, True, std_ratio)
        taps = tuple(range(2, w.ndim))
        return cls(w.sum(taps)[..., None], (w * w).sum(taps)[..., None], _detached(module.bias),
                   module.groups, False, std_ratio)

    @property
    def persistent_elements(self) -> int:
        """Elements stored beyond the layer's own weights."""
        n = self.w_var.numel() + (0 if self.linear else self.w_mean.numel())
        return n + (0 if self.std_ratio is None else self.std_ratio.numel())

    def moments(self, mean_in: torch.Tensor, var_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, d_in)`` input moments -> predicted ``(B, d_out)`` output mean and std."""
        if self.linear:
            mean = F.linear(mean_in, self.w_mean, self.bias)
            var = F.linear(var_in, self.w_var)
        else:
            mean = F.conv1d(mean_in[..., None], self.w_mean, self.bias, groups=self.groups)[..., 0]
            var = F.conv1d(var_in[..., None], self.w_var, groups=self.groups)[..., 0]
        std = var.clamp(min=0).sqrt()
        return mean, std if self.std_ratio is None else std * self.std_ratio

    def range(self, x: torch.Tensor, k: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted per-sample range ``(lo, hi)``, each ``(B,)``, from the layer's input ``x``."""
        mean, std = self.moments(*_channel_moments(x, self.linear))
        return (mean - k * std).amin(1), (mean + k * std).amax(1)


def _detached(t):
    return None if t is None else t.detach()


def predicted_moments(module: nn.Module, x: torch.Tensor, std_ratio=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The surrogate's per-sample prediction of the output moments, before the layer runs.

    Parameters
    ----------
    module : nn.Linear, nn.Conv1d or nn.Conv2d
        The layer.
    x : Tensor
        Its input: ``(B, ..., d_in)`` for a Linear, ``(B, d_in, *spatial)`` for a conv.
    std_ratio : Tensor of shape ``(d_out,)``, optional
        Per-channel correction of the predicted std (from :func:`calibrate`).

    Returns
    -------
    mean, std : Tensor, shape ``(B, d_out)``
        ``E[y_j] = W_j . mu + b_j`` and ``sqrt((W_j * W_j) . v)`` (kernels summed over taps for a
        conv), with ``mu``, ``v`` from :func:`input_moments`. The mean is exact for a Linear layer;
        the std assumes independent input features (and, for a conv, independent positions).
    """
    with torch.no_grad():
        return _Surrogate.of(module, std_ratio).moments(*input_moments(module, x))


def probabilistic_range(module: nn.Module, x: torch.Tensor, k: float = 3.0,
                        std_ratio=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-sample range the probabilistic quantizer sets, before the layer runs.

    Parameters
    ----------
    module : nn.Linear, nn.Conv1d or nn.Conv2d
        The layer.
    x : Tensor
        Its input (see :func:`predicted_moments`).
    k : float
        Predicted standard deviations on each side of the predicted mean.
    std_ratio : Tensor of shape ``(d_out,)``, optional
        Per-channel correction of the predicted std (from :func:`calibrate`).

    Returns
    -------
    lo, hi : Tensor, shape ``(B,)``
        ``min_j (mean_j - k std_j)`` and ``max_j (mean_j + k std_j)`` over output channels ``j``.
    """
    with torch.no_grad():
        return _Surrogate.of(module, std_ratio).range(x, k)


# --------------------------------------------------------------------------------------------
# Calibration on training states
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Calibration:
    """What :func:`calibrate` measured on training states, per layer.

    Attributes
    ----------
    ranges : dict
        ``{module name: (lo, hi)}``: the minimum and maximum of the layer's output over every
        element of every calibration sample (the static range).
    std_ratio : dict
        ``{module name: Tensor (d_out,)}``: ``sqrt(sum_n measured var / sum_n predicted var)`` per
        output channel, the correction of the ``"calibrated"`` surrogate (1 where nothing is
        predicted).
    n_states : int
        Calibration states (samples).
    steps : int
        Model steps run from each state; every step's layer outputs were recorded.
    """

    ranges: dict
    std_ratio: dict
    n_states: int
    steps: int


def _as_input(system, states) -> torch.Tensor:
    return as_states(states, system.dtype)


def calibrate(model, states, modules: Iterable[str] | None = None, steps: int = 1,
              batch_size: int | None = None) -> Calibration:
    """Calibrate the static ranges and the surrogate's correction on training states.

    Parameters
    ----------
    model : nn.Module or system
        The model, as it will be run (quantize the weights first if they will be).
    states : Tensor, ndarray or DataArray, shape ``(N, *S)``
        Calibration states, from the training period.
    modules : list of str, optional
        Layers to calibrate (default: every quantizable layer); see :func:`quantizable_modules`.
    steps : int
        Roll each state out this many steps and record every step, so that the ranges cover a
        little of the model's own trajectory and not only the data.
    batch_size : int, optional
        States per forward call (default: all at once).

    Returns
    -------
    Calibration
    """
    system = as_system(model)
    targets = quantizable_modules(system, modules)
    x0 = _as_input(system, states)
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps={steps!r}: calibration runs at least one step.")
    lo = {n: math.inf for n in targets}
    hi = {n: -math.inf for n in targets}
    meas_var = {n: 0.0 for n in targets}
    pred_var = {n: 0.0 for n in targets}
    surrogates = {n: _Surrogate.of(m) for n, m in targets.items()}
    pending: dict[str, torch.Tensor] = {}

    def pre_hook(name):
        def hook(module, args):
            s = surrogates[name]
            pending[name] = s.moments(*input_moments(module, args[0]))[1]
        return hook

    def post_hook(name):
        def hook(module, args, out):
            lo[name] = min(lo[name], float(out.min()))
            hi[name] = max(hi[name], float(out.max()))
            std = measured_moments(module, out)[1]
            meas_var[name] = meas_var[name] + std.double().pow(2).sum(0)
            pred_var[name] = pred_var[name] + pending.pop(name).double().pow(2).sum(0)
        return hook

    handles = []
    try:
        for name, m in targets.items():
            handles += [m.register_forward_pre_hook(pre_hook(name)), m.register_forward_hook(post_hook(name))]
        batch_size = batch_size or len(x0)
        with system.evaluating(), torch.no_grad():
            for i in range(0, len(x0), batch_size):
                x = x0[i:i + batch_size]
                for _ in range(int(steps)):
                    x = system.step(x)
    finally:
        for h in handles:
            h.remove()
    if not all(math.isfinite(lo[n]) and math.isfinite(hi[n]) for n in targets):
        bad = [n for n in targets if not (math.isfinite(lo[n]) and math.isfinite(hi[n]))]
        raise ValueError(f"layers {bad[:5]} never ran or produced non-finite outputs on the calibration states.")
    ratio = {}
    for n, m in targets.items():
        pv = torch.as_tensor(pred_var[n], dtype=torch.float64)
        mv = torch.as_tensor(meas_var[n], dtype=torch.float64)
        r = torch.where(pv > 0, (mv / pv.clamp(min=1e-300)).sqrt(), torch.ones_like(pv))
        ratio[n] = r.to(m.weight.dtype)
    return Calibration({n: (lo[n], hi[n]) for n in targets}, ratio, len(x0), int(steps))


# --------------------------------------------------------------------------------------------
# The context manager
# --------------------------------------------------------------------------------------------

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
                q, clipped = _fake_quantize(out, lo, hi, b, count=record)
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
                s = _Surrogate.of(m, ratio)
                handles.append(m.register_forward_pre_hook(pre_hook(name, s)))
            handles.append(m.register_forward_hook(post_hook(name, s)))
        yield log
    finally:
        for h in handles:
            h.remove()
        pending.clear()


# --------------------------------------------------------------------------------------------
# Costs: memory accounting and measured compute overhead
# --------------------------------------------------------------------------------------------

def layer_io(model, x, modules: Iterable[str] | None = None) -> dict:
    """Run one step of ``model`` on ``x`` and return each layer's input and output.

    Parameters
    ----------
    model : nn.Module or system
        The model.
    x : Tensor, ndarray or DataArray, shape ``(B, *S)``
        States.
    modules : list of str, optional
        Layers (default: every Linear / Conv1d / Conv2d).

    Returns
    -------
    dict
        ``{name: (input, output)}`` (detached tensors) of each layer's first call in the step.
    """
    system = as_system(model)
    targets = quantizable_modules(system, modules)
    x = _as_input(system, x)
    seen, handles = {}, []

    def hook(name):
        def f(module, args, out):
            seen.setdefault(name, (args[0].detach(), out.detach()))
        return f

    try:
        for n, m in targets.items():
            handles.append(m.register_forward_hook(hook(n)))
        with system.evaluating(), torch.no_grad():
            system.step(x)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in targets if n not in seen]
    if missing:
        raise ValueError(f"layers {missing[:5]} did not run in one step of the model; leave them out.")
    return seen


def activation_costs(model, x, modules: Iterable[str] | None = None) -> xr.Dataset:
    """Per-layer memory and arithmetic that each strategy adds, per sample (accounting, no timing).

    Parameters
    ----------
    model : nn.Module or system
        The model.
    x : Tensor, ndarray or DataArray, shape ``(B, *S)``
        States to run one step on (only the layers' shapes are used).
    modules : list of str, optional
        Layers (default: every quantizable one).

    Returns
    -------
    xarray.Dataset
        Dims ``module`` and ``mode`` (static, dynamic, probabilistic). Per sample:
        ``extra_elements(module, mode)`` held beyond the layer's own quantized output
        (dynamic: the full-precision output; probabilistic: ``2 (d_in + d_out)``; static: 0);
        ``range_flops(module, mode)``, the arithmetic to find the range (dynamic: a min and a
        max over the output; probabilistic: input means and variances plus two products with
        ``d_in x d_out`` matrices); ``layer_flops(module)`` (``2 x`` multiply-adds of the layer),
        ``output_elements(module)``, ``input_elements(module)``, ``d_in``, ``d_out``. Per layer,
        not per sample: ``persistent_elements(module, mode)`` (static: 2 numbers;
        probabilistic: the squared weights, and for a conv the kernel summed over taps).
    """
    system = as_system(model)
    targets = quantizable_modules(system, modules)
    seen = layer_io(system, x, list(targets))
    names = list(targets)
    rows = {key: [] for key in ("extra", "flops", "persist", "layer", "out", "inp", "din", "dout")}
    for n in names:
        m = targets[n]
        xin, y = seen[n]
        b = y.shape[0]
        out_el, in_el = y.numel() // b, xin.numel() // b
        d_in, d_out = _channels(m)
        w_el = m.weight.numel() // (m.weight.shape[2:].numel() if not _is_linear(m) else 1)   # d_out * d_in / groups
        layer = 2 * (m.weight.numel() // d_out) * out_el
        rows["extra"].append([0, out_el, 2 * (d_in + d_out)])
        rows["flops"].append([0, 2 * out_el, 3 * in_el + 4 * w_el + 5 * d_out])
        rows["persist"].append([2, 0, w_el if _is_linear(m) else 2 * w_el])
        rows["layer"].append(layer)
        rows["out"].append(out_el)
        rows["inp"].append(in_el)
        rows["din"].append(d_in)
        rows["dout"].append(d_out)
    per_sample = {"units": "elements per sample"}
    return xr.Dataset(
        {"extra_elements": (("module", "mode"), np.asarray(rows["extra"], np.int64), per_sample),
         "range_flops": (("module", "mode"), np.asarray(rows["flops"], np.int64), {"units": "flop per sample"}),
         "persistent_elements": (("module", "mode"), np.asarray(rows["persist"], np.int64),
                                 {"units": "elements per layer"}),
         "layer_flops": ("module", np.asarray(rows["layer"], np.int64), {"units": "flop per sample"}),
         "output_elements": ("module", np.asarray(rows["out"], np.int64), per_sample),
         "input_elements": ("module", np.asarray(rows["inp"], np.int64), per_sample),
         "d_in": ("module", np.asarray(rows["din"], np.int64)),
         "d_out": ("module", np.asarray(rows["dout"], np.int64))},
        coords={"module": names, "mode": list(MODES)},
        attrs={"title": "extra memory and arithmetic of activation quantization strategies"},
    )


def _best_times(fns: dict, repeats: int) -> dict:
    """Best wall time of each function over ``repeats`` interleaved rounds."""
    best = {k: math.inf for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - t0)
    return best


def overhead_timing(model, x, calibration: Calibration, bits: int = 8, k: float = 3.0,
                    modules: Iterable[str] | None = None, repeats: int = 5) -> xr.Dataset:
    """Measured compute overhead of each strategy: best-of-``repeats`` wall times, interleaved.

    Two measurements, both in this process, now (ratios within one run are meaningful; absolute
    times depend on the machine and its load):

    * the whole model's forward pass with each strategy's hooks, against the float model;
    * per layer, on the layer's captured input and output: the time to find the range (dynamic:
      min and max of the output; probabilistic: the surrogate on the input; static: nothing) and
      the time of the fake quantization itself, against the time of the layer.

    Parameters
    ----------
    model : nn.Module or system
        The model.
    x : Tensor, shape ``(B, *S)``
        The batch that is timed.
    calibration : Calibration
        For the static ranges.
    bits, k, modules
        As in :func:`quantized_activations`.
    repeats : int
        Rounds; the best time of each is kept.

    Returns
    -------
    xarray.Dataset
        ``forward_seconds(strategy)`` and ``forward_ratio(strategy)`` (strategy ``float``, then
        the three modes), ``range_seconds(module, mode)``, ``quantize_seconds(module)`` and
        ``layer_seconds(module)``; attrs ``batch``, ``repeats``, ``threads``.
    """
    system = as_system(model)
    targets = quantizable_modules(system, modules)
    x = _as_input(system, x)
    seen = layer_io(system, x, list(targets))

    def run():
        with system.evaluating():
            system.step(x)

    def with_mode(mode):
        def f():
            with quantized_activations(system, mode, bits, k, calibration, list(targets)):
                run()
        return f

    forward = _best_times({"float": run, **{m: with_mode(m) for m in MODES}}, repeats)
    layer, quant, rng = {}, {}, {}
    with torch.no_grad():
        for n, m in targets.items():
            xin, y = seen[n]
            s = _Surrogate.of(m)
            lo_s, hi_s = calibration.ranges[n]
            t = _best_times({
                "layer": lambda: m(xin),
                "dynamic": lambda: (y.flatten(1).amin(1), y.flatten(1).amax(1)),
                "probabilistic": lambda: s.range(xin, k),
                "quantize": lambda: _fake_quantize(y, lo_s, hi_s, bits),
            }, repeats)
            layer[n], quant[n] = t["layer"], t["quantize"]
            rng[n] = [0.0, t["dynamic"], t["probabilistic"]]
    names = list(targets)
    strategies = ["float", *MODES]
    fwd = np.array([forward[s] for s in strategies])
    return xr.Dataset(
        {"forward_seconds": ("strategy", fwd, {"units": "s"}),
         "forward_ratio": ("strategy", fwd / fwd[0], {"long_name": "forward time / float forward time"}),
         "range_seconds": (("module", "mode"), np.array([rng[n] for n in names]), {"units": "s"}),
         "quantize_seconds": ("module", np.array([quant[n] for n in names]), {"units": "s"}),
         "layer_seconds": ("module", np.array([layer[n] for n in names]), {"units": "s"})},
        coords={"strategy": strategies, "module": names, "mode": list(MODES)},
        attrs={"batch": int(x.shape[0]), "repeats": int(repeats), "threads": torch.get_num_threads(), "bits": bits},
    )


# --------------------------------------------------------------------------------------------
# The activation probe
# --------------------------------------------------------------------------------------------

def probe_activations(model, x0, horizon: int = 20, sigma_rel: float = 1e-2, modules: Iterable[str] | None = None,
                      seed: int = 0, dead_threshold: float | None = None, batch_size: int | None = None,
                      progress: bool = True, chunk_units: int | None = None, memory_budget=None) -> xr.Dataset:
    """Score every layer by how fast noise at its output makes the rollout diverge.

    The TQS probe (:func:`tqslite.probe`) with the perturbation on activations: for each layer
    ``u``, a forward hook adds ``sigma_rel * rms_n(y) * xi`` to its output ``y`` at every call
    (every step of the rollout), where ``rms_n(y)`` is the RMS of sample ``n``'s output and
    ``xi ~ N(0, I)`` comes from a CPU generator seeded by ``(seed, u)`` (the same on every
    device), drawn afresh at each call (a quantization error changes with the input too). The
    divergence, ``Lambda_u(t)`` and ``gamma_u(T)`` are those of :mod:`tqslite.probe`, with
    ``eps_u`` the realised relative size of the noise: the RMS over calls of ``||noise|| / ||y||``
    (close to ``sigma_rel``; each call is relative to its own output, so a rollout whose states
    grow or shrink does not reweight it).

    Layers are scored in chunks of ``K``, as the weight probe's units are (:mod:`tqslite.batched`):
    ``torch.vmap`` runs ``K`` copies of the model, copy ``k`` with noise at layer ``k`` only (the
    others add an exact zero), each drawing the same noise as it would alone.

    Parameters
    ----------
    model : nn.Module or system
        The model (hooked through its ``nn.Module``; nothing is written to it), on its own device.
    x0 : Tensor, ndarray or DataArray, shape ``(N, *S)``
        Initial states (dim ``window``).
    horizon : int
        Rollout length ``T`` (>= 1).
    sigma_rel : float
        Noise size relative to each sample's output RMS.
    modules : list of str, optional
        Layers to score (default: every Linear / Conv1d / Conv2d).
    seed : int
        Seeds each layer's noise together with its name: adding, removing or reordering layers
        leaves the others' scores unchanged. Same seed, same windows and batch size: identical
        scores.
    dead_threshold : float, optional
        Also flag layers with ``Lambda_u(T) <= dead_threshold`` as dead.
    batch_size : int, optional
        Windows per forward call (default: all at once). The noise drawn depends on it.
    progress : bool
        Show a tqdm progress bar over layers.
    chunk_units, memory_budget
        Layers per batched pass and the bytes one pass may hold, as in :func:`tqslite.probe`
        (default on the CPU: one layer at a time).

    Returns
    -------
    xarray.Dataset
        The layout of a :func:`tqslite.probe` result, with ``unit`` = layer name: ``gamma(unit)``,
        ``curve(unit, lead)``, ``eps(unit)``, ``n_params(unit)`` (the layer's parameters),
        ``dead(unit)``, ``nonfinite(unit)``, ``tensor_unit(tensor)`` (its parameter names),
        ``divergence(unit, window, lead)``; plus ``n_outputs(unit)``, output elements per sample.
        A layer whose output is zero, or whose noise leaves the trajectory unchanged, is dead
        (``gamma = -inf``); one whose rollout turns non-finite scores ``+inf``.
    """
    system = as_system(model)
    net = torch_module(system)
    targets = quantizable_modules(net, modules)
    if isinstance(horizon, bool) or int(horizon) != horizon or horizon < 1:
        raise ValueError(f"horizon={horizon!r}: the rollout needs at least 1 step (an integer >= 1).")
    horizon = int(horizon)
    if not (isinstance(sigma_rel, (int, float)) and math.isfinite(sigma_rel) and sigma_rel > 0):
        raise ValueError(f"sigma_rel={sigma_rel!r}: the noise needs a positive, finite size.")
    if chunk_units is not None and (isinstance(chunk_units, bool) or not isinstance(chunk_units, int)
                                    or chunk_units < 1):
        raise ValueError(f"chunk_units={chunk_units!r}: give a positive number of layers per pass (1: one at a time).")
    x0 = as_states(x0, system.dtype, device_of(system))
    n_win = x0.shape[0]
    batch_size = batch_size or n_win
    known = set(system.parameter_names())
    param_names = {n: tuple(p for p in (f"{n}.{q}" if n else q for q, _ in m.named_parameters()) if p in known)
                   for n, m in targets.items()}
    layers = list(targets.items())

    with system.evaluating():
        ref = reference_rollout(system, x0, horizon, batch_size)
        eps = np.zeros(len(layers))
        n_out = np.zeros(len(layers), dtype=np.int64)
        div = np.zeros((len(layers), n_win, horizon))
        chunks = _activation_chunks(system, x0[:batch_size], len(layers), chunk_units, memory_budget)
        bar = tqdm(desc="activation probe", total=len(layers), disable=not progress)
        batched = True
        for chunk in chunks:
            if batched and len(chunk) > 1:
                try:
                    with quiet_slow_ops():
                        _noisy_batched(system, [layers[i] for i in chunk], sigma_rel, seed, x0, ref, batch_size,
                                       eps, n_out, div, chunk)
                    bar.update(len(chunk))
                    continue
                except NotBatchable as e:
                    batched = False
                    warnings.warn(f"{type(net).__name__} cannot run batched under torch.vmap ({e}); the activation "
                                  "probe scores one layer at a time.", stacklevel=2)
            for i in chunk:
                _noisy_one(system, layers[i], sigma_rel, seed, x0, ref, batch_size, eps, n_out, div, i)
                bar.update()
        bar.close()
    units = [Unit(n, param_names[n]) for n in targets]
    scores = assemble_scores(units, system, eps, div, divergence_floor(ref), eps == 0, dead_threshold, dict(
        kind="activation_gauss", units="module", horizon=horizon, sigma_rel=sigma_rel,
        seed=seed, n_windows=n_win, windows_sha256=fingerprint(x0), batch_size=batch_size,
        dtype=str(x0.dtype).removeprefix("torch."),
        dead_threshold="none" if dead_threshold is None else dead_threshold, system=type(net).__name__,
    ))
    scores["n_outputs"] = ("unit", n_out, {"long_name": "output elements per sample"})
    scores.attrs["title"] = "TQS activation probe scores"
    return scores


def _activation_chunks(system, x: torch.Tensor, n_layers: int, chunk_units, memory_budget) -> list[list[int]]:
    """Layers per pass: one at a time on the CPU unless asked, else as many as the budget allows."""
    on_cpu = x.device.type == "cpu"
    if chunk_units == 1 or n_layers < 2 or (on_cpu and chunk_units is None and memory_budget is None):
        return [[i] for i in range(n_layers)]
    budget = default_memory_budget(x.device) if memory_budget is None else parse_bytes(memory_budget)
    return plan_chunks([()] * n_layers, {}, step_memory(system.step, x), budget, chunk_units)


def _noise(out: torch.Tensor, sigma_rel: float, gen: torch.Generator):
    """``(noise, ||noise|| / ||y||)`` for a layer output ``out`` (per-sample RMS scaling, float64 draw on the CPU)."""
    y = out.detach().double()
    rms = y.flatten(1).pow(2).mean(1).sqrt().view((-1,) + (1,) * (out.ndim - 1))
    xi = torch.randn(tuple(out.shape), generator=gen, dtype=torch.float64, device="cpu").to(out.device)
    noise = (sigma_rel * rms * xi).to(out.dtype)
    norm = y.norm()
    ratio = torch.where(norm > 0, noise.double().norm() / norm.clamp(min=torch.finfo(torch.float64).tiny),
                        torch.zeros_like(norm))
    return noise, ratio


def _noisy_one(system, layer, sigma_rel, seed, x0, ref, batch_size, eps, n_out, div, i) -> None:
    """One layer's rollout with noise at its output: fills ``eps[i]``, ``n_out[i]``, ``div[i]``."""
    name, module = layer
    gen = torch.Generator().manual_seed(unit_seed(seed, name))
    ratios = []   # ||noise|| / ||y|| of every call

    def hook(mod, args, out):
        n_out[i] = out[0].numel()
        noise, ratio = _noise(out, sigma_rel, gen)
        ratios.append(ratio)
        return out + noise

    handle = module.register_forward_hook(hook)
    try:
        div[i] = rollout_divergence(system, x0, ref, batch_size)
    finally:
        handle.remove()
    r = torch.stack(ratios).cpu().numpy() if ratios else np.zeros(0)
    eps[i] = math.sqrt(np.mean(np.square(r))) if len(r) else 0.0


def _noisy_batched(system, layers, sigma_rel, seed, x0, ref, batch_size, eps, n_out, div, chunk) -> None:
    """``K`` layers at once: copy ``k`` of a vmapped rollout has noise at layer ``k`` only.

    Every hook draws its own layer's noise once per call, from that layer's generator, exactly as
    :func:`_noisy_one` does; the other copies add ``0 * noise``. The ratios leave ``vmap`` as an
    output of the step, one per hook call.
    """
    k = len(layers)
    gens = [torch.Generator().manual_seed(unit_seed(seed, name)) for name, _ in layers]
    current, order = {}, []  # the copy's one-hot selector during a step; the layer of each ratio, per step

    def hook_of(j):
        def hook(mod, args, out):
            n_out[chunk[j]] = out[0].numel()
            noise, ratio = _noise(out, sigma_rel, gens[j])
            current["ratios"].append(ratio)
            current["layers"].append(j)
            return out + current["onehot"][j].to(out.dtype) * noise
        return hook

    def step(onehot, x):
        current.update(onehot=onehot, ratios=[], layers=[])
        nxt = system.step(x)
        order.append(current["layers"])
        ratios = torch.stack(current["ratios"]) if current["ratios"] else onehot.new_zeros(0, dtype=torch.float64)
        return nxt, ratios

    onehot = torch.eye(k, dtype=torch.float64, device=x0.device)
    mapped = torch.vmap(step, in_dims=(0, 0), randomness="same")
    handles = [module.register_forward_hook(hook_of(j)) for j, (_, module) in enumerate(layers)]
    try:
        raw, aux = vmapped_divergence(lambda x: mapped(onehot, x), k, x0, ref, batch_size)
    finally:
        for h in handles:
            h.remove()
    div[chunk] = nonfinite_stays(raw)
    per_layer = [[] for _ in range(k)]
    for ratios, lay in zip(aux, order):
        ratios = ratios.cpu().numpy()  # (k, calls in this step)
        for c, j in enumerate(lay):
            per_layer[j].append(ratios[j, c])
    for j, i in enumerate(chunk):
        eps[i] = math.sqrt(np.mean(np.square(per_layer[j]))) if per_layer[j] else 0.0
