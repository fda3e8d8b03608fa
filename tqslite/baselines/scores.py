"""Sensitivity scores other than TQS, in the probe's layout, so the same allocator uses them.

Each function returns an :class:`xarray.Dataset` like :func:`tqslite.probe` does (dims ``unit``
and ``lead``; ``gamma``, ``curve``, ``eps``, ``n_params``, ``dead``, ``nonfinite``,
``tensor_unit``), with a single lead whose ``curve`` is the log of the unit's sensitivity ``s_u``.
:func:`tqslite.cost_table` then prices option ``b`` as ``eps_u(b) * s_u`` (``linear``) or
``(eps_u(b) * s_u)**2`` (``quadratic``):

* :func:`one_step_scores` -- TQS at ``T = 1``: the output error of one step, no trajectory;
* :func:`hessian_scores` -- HAWQ-V2: Hutchinson's estimate of the trace of the training loss's
  Hessian per unit, with ``s_u**2 = trace_u / n_u * ||theta_u||**2`` so that the ``quadratic``
  objective is exactly HAWQ-V2's ``trace / n * ||Q_b(w) - w||**2``;
* :func:`range_scores` -- the unit's largest weight range (max - min), a data-free proxy;
* :func:`random_scores` -- seeded random sensitivities, the floor any method must beat.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import xarray as xr

from ..probe import probe, unit_seed
from ..systems import as_system
from ..units import membership, resolve_units


def _layout(system, units, log_s: np.ndarray, method: str, **attrs) -> xr.Dataset:
    log_s = np.asarray(log_s, float)
    dead = np.isneginf(log_s)
    return xr.Dataset(
        {
            "gamma": ("unit", log_s, {"long_name": f"log sensitivity ({method})"}),
            "curve": (("unit", "lead"), log_s[:, None]),
            "eps": ("unit", np.ones(len(units))),
            "n_params": ("unit", np.array([sum(system.get_parameter(p).numel() for p in u.params) for u in units])),
            "dead": ("unit", dead),
            "unmeasured": ("unit", np.zeros(len(units), bool)),
            "nonfinite": ("unit", np.zeros(len(units), bool)),
        },
        coords={"unit": [u.label for u in units], "lead": [1]},
        attrs={"title": f"{method} sensitivity scores", "kind": method, "horizon": 1, **attrs},
    ).merge(membership(units))


def one_step_scores(model, x0, **kwargs) -> xr.Dataset:
    """TQS at horizon 1: how much one step's output moves (keyword arguments go to :func:`tqslite.probe`)."""
    return probe(model, x0, horizon=1, **kwargs)


def range_scores(model, units="tensor") -> xr.Dataset:
    """``s_u`` = the largest ``max - min`` over the unit's tensors (0-range units are dead)."""
    system = as_system(model)
    units = resolve_units(units, system.parameter_names())
    rng = []
    for u in units:
        r = max(float(system.get_parameter(p).max() - system.get_parameter(p).min()) for p in u.params)
        rng.append(np.log(r) if r > 0 else -np.inf)
    return _layout(system, units, rng, "range")


def random_scores(model, seed=0, units="tensor") -> xr.Dataset:
    """``log s_u ~ N(0, 1)``, seeded by ``(seed, unit label)``."""
    system = as_system(model)
    units = resolve_units(units, system.parameter_names())
    log_s = [np.random.default_rng(unit_seed(seed, u.label)).normal() for u in units]
    return _layout(system, units, log_s, "random", seed=seed)


def mse_loss(model, batch) -> torch.Tensor:
    """The one-step training loss: mean squared error of ``model(x)`` against ``y``, ``batch = (x, y)``."""
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def hutchinson_traces(module: torch.nn.Module, batches, names, n_samples: int = 16, seed: int = 0,
                      loss_fn=mse_loss) -> dict:
    """Hutchinson's estimate ``E[v^T H v]`` (Rademacher ``v``) of the loss Hessian's trace per parameter.

    Parameters
    ----------
    module : nn.Module
        A copy is differentiated; the module itself is not touched.
    batches : iterable of ``(x, y)``
        Training pairs; the loss is averaged over them.
    names : list of str
        Parameter names whose diagonal Hessian blocks are traced.
    n_samples : int
        Random vectors per batch.

    Returns
    -------
    dict of str to float
    """
    work = copy.deepcopy(module).eval()
    params = dict(work.named_parameters())
    plist = [params[n] for n in names]
    for p in plist:
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    traces = dict.fromkeys(names, 0.0)
    n_batches = 0
    for batch in batches:
        grads = torch.autograd.grad(loss_fn(work, batch), plist, create_graph=True)
        for _ in range(n_samples):
            vs = [torch.randint(0, 2, p.shape, generator=gen).to(p.dtype) * 2 - 1 for p in plist]
            hvs = torch.autograd.grad(grads, plist, grad_outputs=vs, retain_graph=True)
            for n, v, hv in zip(names, vs, hvs):
                traces[n] += float((v * hv).sum()) / n_samples
        n_batches += 1
    return {n: t / max(n_batches, 1) for n, t in traces.items()}


def hessian_scores(model, batches, n_samples: int = 16, seed: int = 0, loss_fn=mse_loss,
                   units="tensor") -> xr.Dataset:
    """HAWQ-V2 sensitivities from the training loss's Hessian trace per unit.

    ``s_u**2 = trace_u / n_u * ||theta_u||**2``, so that with ``objective="quadratic"`` (set in
    ``attrs``) the cost of option ``b`` is HAWQ-V2's ``trace_u / n_u * ||Q_b(theta_u) - theta_u||**2``.
    The raw traces are in the variable ``trace``. The loss of a trained network is not convex,
    and the estimate is noisy: a unit whose estimated trace is <= 0 (often a norm's gain) would
    make quantization error look free or even welcome. Its ``trace_u / n_u`` is floored to the
    smallest positive one of the model (flagged in ``floored``): least sensitive, not free.
    ``model`` must be an ``nn.Module`` (or a system with a ``module``): gradients are needed,
    unlike for TQS.
    """
    system = as_system(model)
    module = getattr(system, "module", None)
    if module is None:
        raise TypeError("hessian_scores needs a torch module (it differentiates the loss); TQS does not.")
    units = resolve_units(units, system.parameter_names())
    traces = hutchinson_traces(module, batches, [p for u in units for p in u.params], n_samples, seed, loss_fn)
    per_param, norm2 = [], []
    for u in units:
        per_param.append(sum(traces[p] for p in u.params) / sum(system.get_parameter(p).numel() for p in u.params))
        norm2.append(sum(float(system.get_parameter(p).double().pow(2).sum()) for p in u.params))
    per_param, norm2 = np.array(per_param), np.array(norm2)
    positive = per_param > 0
    floor = per_param[positive].min() if positive.any() else 1.0
    with np.errstate(divide="ignore"):
        log_s = 0.5 * np.log(np.where(positive, per_param, floor) * norm2)  # -inf only for all-zero weights
    ds = _layout(system, units, log_s, "hessian", n_samples=n_samples, seed=seed, objective="quadratic")
    ds["trace"] = ("unit", per_param * ds["n_params"].values, {"long_name": "Hutchinson estimate of tr(H_u)"})
    ds["floored"] = ("unit", ~positive, {"long_name": "trace estimate <= 0, floored"})
    return ds
