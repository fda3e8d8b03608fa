"""Calibration on training states: the static ranges and the calibrated surrogate's correction."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..probe import as_states
from ..systems import as_system, device_of
from .layers import quantizable_modules
from .surrogate import Surrogate, input_moments, measured_moments


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
    x0 = as_states(states, system.dtype, device_of(system))
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps={steps!r}: calibration runs at least one step.")
    lo = {n: math.inf for n in targets}
    hi = {n: -math.inf for n in targets}
    meas_var = {n: 0.0 for n in targets}
    pred_var = {n: 0.0 for n in targets}
    surrogates = {n: Surrogate.of(m) for n, m in targets.items()}
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
