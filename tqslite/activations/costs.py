"""What activation quantization costs: per-layer memory and arithmetic, and measured overhead."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import numpy as np
import torch
import xarray as xr

from ..probe import as_states
from ..systems import as_system, device_of
from .calibration import Calibration
from .context import MODES, quantized_activations
from .grid import fake_quantize_counted
from .layers import is_linear, layer_channels, quantizable_modules
from .surrogate import Surrogate


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
    x = as_states(x, system.dtype, device_of(system))
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
        d_in, d_out = layer_channels(m)
        w_el = m.weight.numel() // (m.weight.shape[2:].numel() if not is_linear(m) else 1)   # d_out * d_in / groups
        layer = 2 * (m.weight.numel() // d_out) * out_el
        rows["extra"].append([0, out_el, 2 * (d_in + d_out)])
        rows["flops"].append([0, 2 * out_el, 3 * in_el + 4 * w_el + 5 * d_out])
        rows["persist"].append([2, 0, w_el if is_linear(m) else 2 * w_el])
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
    x = as_states(x, system.dtype, device_of(system))
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
            s = Surrogate.of(m)
            lo_s, hi_s = calibration.ranges[n]
            t = _best_times({
                "layer": lambda: m(xin),
                "dynamic": lambda: (y.flatten(1).amin(1), y.flatten(1).amax(1)),
                "probabilistic": lambda: s.range(xin, k),
                "quantize": lambda: fake_quantize_counted(y, lo_s, hi_s, bits),
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
