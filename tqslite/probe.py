"""The Trajectory-based Quantization Sensitivity (TQS) probe (SPEC section 2).

For every unit ``u`` (a named set of parameter tensors) the probe perturbs the unit's weights by
``delta_u``, rolls the perturbed system out from ``N`` initial states for ``T`` steps next to the
unperturbed rollout (computed once, reused for every unit), and measures

* the divergence ``d[n, t] = RMS over state elements of (x_t(theta + delta_u) - x_t(theta))``,
* the log-amplification curve ``Lambda_u(t) = mean_n log(max(d[n, t], d_floor) / eps_u)``,
  with ``eps_u = ||delta_u|| / ||theta_u||`` the relative size of the perturbation,
* the TQS score ``gamma_u(T) = Lambda_u(T) / T``: a finite-time, Lyapunov-style growth rate of
  the error a unit's perturbation injects at every step.

Two perturbations: ``kind="quant"`` uses the RTN residual ``Q_b(theta_u) - theta_u`` at the probe
bit width (gamma_quant); ``kind="gauss"`` uses ``sigma_rel * rms(theta_p) * xi`` with
``xi ~ N(0, I)`` drawn from a generator seeded by ``(seed, unit label)`` (gamma_gauss, which
knows nothing of any quantizer). Rollouts run in the model's dtype; ``d``, ``Lambda`` and
``gamma`` are float64. Only forward passes are needed.
"""

from __future__ import annotations

import copy
import hashlib
import math

import numpy as np
import torch
import xarray as xr
from tqdm import tqdm

from .quantization import check_finite, rtn_quantize
from .config import Int as _Int
check_bits = lambda b, symmetric=True: _Int(b, symmetric=symmetric).bits  # noqa: E731  (temporary)
from .systems import as_system, rollout, swapped
from .units import Unit, check_units, make_units

#: Floor under the divergence before taking logs (SPEC: a tiny constant, float64).
D_FLOOR = 1e-30


def unit_seed(seed: int, label: str) -> int:
    """A 63-bit generator seed from ``(seed, unit label)``: stable across runs and unit orders."""
    digest = hashlib.sha256(f"{int(seed)}:{label}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def perturbation(system, unit: Unit, kind: str, bits: int = 4, sigma_rel: float = 1e-2, seed: int = 0,
                 quant_granularity: str = "channel", group_size: int | None = None,
                 symmetric: bool = True) -> tuple[dict, float]:
    """The perturbed weights of one unit, ``theta_u + delta_u``, and ``eps_u``.

    Returns ``({param name: perturbed tensor}, eps_u)`` with
    ``eps_u = ||delta_u|| / ||theta_u||`` over all tensors of the unit (float64; 0 when both are
    0). For ``kind="quant"`` the perturbed tensor is exactly ``Q_b(theta)``.
    """
    perturbed, num, den = {}, 0.0, 0.0
    gen = torch.Generator().manual_seed(unit_seed(seed, unit.label))
    for name in unit.params:
        w = system.get_parameter(name)
        if kind == "quant":
            new = rtn_quantize(w, bits, quant_granularity, system.channel_axis(name), group_size, symmetric)
        else:
            rms = float(w.double().pow(2).mean().sqrt()) if w.numel() else 0.0
            xi = torch.randn(tuple(w.shape), generator=gen, dtype=w.dtype)  # drawn in the weight's dtype
            new = w + (sigma_rel * rms) * xi
        perturbed[name] = new
        num += float((new.double() - w.double()).pow(2).sum())
        den += float(w.double().pow(2).sum())
    return perturbed, (math.sqrt(num / den) if den > 0 else 0.0)


def as_states(x0, dtype) -> torch.Tensor:
    """Initial states as a tensor ``(N, *S)`` of ``dtype``; ``ValueError`` if not a finite batch."""
    if isinstance(x0, xr.DataArray):
        x0 = x0.values
    x0 = torch.as_tensor(np.asarray(x0) if not torch.is_tensor(x0) else x0).to(dtype)
    if x0.ndim < 2 or x0.shape[0] < 1:
        raise ValueError(f"x0 must be a batch of initial states (N, *S) with N >= 1, got shape {tuple(x0.shape)}.")
    check_finite(x0, "initial states x0")
    return x0


def _rms_divergence(x: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
    """RMS over state elements of ``x - ref`` for states ``(T, B, *S)``: ``(B, T)`` float64, NaN -> +inf."""
    diff = (x - ref).flatten(2)
    d = (torch.linalg.vector_norm(diff, dim=2, dtype=torch.float64) / math.sqrt(diff.shape[2])).T.numpy()
    return np.where(np.isnan(d), np.inf, d)


def probe(
    model,
    x0,
    kind: str = "gauss",
    granularity: str = "tensor",
    horizon: int = 20,
    bits: int = 4,
    sigma_rel: float = 1e-2,
    units=None,
    seed: int = 0,
    depth: int = 1,
    include=None,
    exclude=None,
    quant_granularity: str = "channel",
    group_size: int | None = None,
    symmetric: bool = True,
    dead_threshold: float | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    executor=None,
) -> xr.Dataset:
    """Score every unit of ``model`` by how fast its perturbation makes the rollout diverge.

    Parameters
    ----------
    model : nn.Module or system
        Maps states ``(B, *S)`` to next states; see :mod:`tqslite.systems`. Its weights are
        swapped during the sweep and restored bit for bit afterwards.
    x0 : Tensor, ndarray or DataArray, shape ``(N, *S)``
        ``N`` initial states (dim ``window`` of the result).
    kind : {"gauss", "quant"}
        Gaussian relative noise (gamma_gauss) or the RTN residual at ``bits`` (gamma_quant).
    granularity : {"tensor", "block"}
        Units: one per parameter tensor, or one per module subtree at ``depth``.
    horizon : int
        Rollout length ``T`` in steps (>= 1); the curve covers leads 1..T.
    bits : int
        Probe bit width for ``kind="quant"``.
    sigma_rel : float
        Noise size relative to each tensor's RMS for ``kind="gauss"``.
    units : list of Unit or dict, optional
        Custom units (``{label: [names or patterns]}`` or :class:`~tqslite.units.Unit` list).
    seed : int
        Seeds the Gaussian noise of each unit together with its label.
    depth, include, exclude
        Passed to :func:`tqslite.units.make_units`.
    quant_granularity, group_size, symmetric
        RTN settings of the ``quant`` probe (per output channel, symmetric by default).
    dead_threshold : float, optional
        Also flag units with ``Lambda_u(T) <= dead_threshold`` as dead.
    batch_size : int, optional
        Windows per forward call (default: all ``N`` at once).
    progress : bool
        Show a tqdm progress bar over units.
    executor : concurrent.futures.Executor, optional
        Score the units in parallel: any executor with ``submit`` (a process pool, or a dask
        cluster's ``client.get_executor()``). Each task works on its own copy of the system;
        the unperturbed rollout is computed once here and sent with every task. Scores are
        identical to the serial run.

    Returns
    -------
    xarray.Dataset
        Dims ``unit``, ``lead`` (1..T), ``window`` (0..N-1). Variables: ``gamma(unit)``,
        ``curve(unit, lead)`` = Lambda_u(t), ``eps(unit)``, ``n_params(unit)``, ``dead(unit)``,
        ``nonfinite(unit)``, ``members(unit)`` (comma-joined parameter names) and
        ``divergence(unit, window, lead)``. Dead units have ``gamma = curve = -inf``; units
        whose rollout turned non-finite have ``gamma = +inf``. ``attrs`` record every setting.
    """
    system = as_system(model)
    if kind not in ("gauss", "quant"):
        raise ValueError(f"kind={kind!r}: use 'gauss' (a-priori Gaussian probe) or 'quant' (RTN residual).")
    if isinstance(horizon, bool) or int(horizon) != horizon or horizon < 1:
        raise ValueError(f"horizon={horizon!r}: the rollout needs at least 1 step (an integer >= 1).")
    horizon = int(horizon)
    if kind == "quant":
        bits = check_bits(bits, symmetric)
    elif not (math.isfinite(sigma_rel) and sigma_rel > 0):
        raise ValueError(f"sigma_rel={sigma_rel!r}: the Gaussian probe needs a positive, finite size.")
    names = system.parameter_names()
    if units is None:
        unit_list = make_units(names, granularity, depth, include, exclude)
    elif isinstance(units, dict):
        unit_list = make_units(names, custom=units, include=include, exclude=exclude)
    else:
        unit_list = check_units(units, names)
    for u in unit_list:
        for p in u.params:
            check_finite(system.get_parameter(p), f"parameter {p!r}")
    x0 = as_states(x0, system.dtype)
    n_win = x0.shape[0]
    settings = dict(kind=kind, bits=bits, sigma_rel=sigma_rel, seed=seed, quant_granularity=quant_granularity,
                    group_size=group_size, symmetric=symmetric)
    batch_size = batch_size or n_win

    with system.evaluating():
        ref = reference_rollout(system, x0, horizon, batch_size)  # computed once, reused for every unit
        bar = dict(desc=f"TQS probe ({kind})", total=len(unit_list), disable=not progress)
        if executor is None:
            results = [score_unit(system, u, x0, ref, batch_size, settings) for u in tqdm(unit_list, **bar)]
        else:
            futures = [executor.submit(_score_unit_on_copy, system, u, x0, ref, batch_size, settings)
                       for u in unit_list]
            results = [f.result() for f in tqdm(futures, **bar)]
    eps = np.array([e for e, _ in results])
    div = np.stack([d for _, d in results])
    return assemble_scores(unit_list, system, eps, div, dead_threshold, dict(
        kind=kind, granularity="custom" if units is not None else granularity, horizon=horizon,
        bits=bits if kind == "quant" else "none", sigma_rel=sigma_rel if kind == "gauss" else "none",
        seed=seed, depth=depth, quant_granularity=quant_granularity, group_size=group_size or "none",
        symmetric=int(symmetric), n_windows=n_win, dtype=str(x0.dtype).removeprefix("torch."),
        d_floor=D_FLOOR, dead_threshold="none" if dead_threshold is None else dead_threshold,
        include=",".join(include or []) or "none", exclude=",".join(exclude or []) or "none",
        system=type(system).__name__ if not hasattr(system, "module") else type(system.module).__name__,
    ))


def reference_rollout(system, x0: torch.Tensor, horizon: int, batch_size: int) -> torch.Tensor:
    """The unperturbed rollout ``(T, N, *S)``; ``ValueError`` naming the lead where it turns non-finite."""
    ref = rollout(system, x0, horizon, batch_size)
    if not torch.isfinite(ref).all():
        bad = int(torch.nonzero(~torch.isfinite(ref.flatten(1)).all(1))[0]) + 1
        raise ValueError(f"the unperturbed rollout turns non-finite at lead {bad}; use a horizon below {bad} "
                         "or initial states inside the model's range.")
    return ref


def rollout_divergence(system, x0: torch.Tensor, ref: torch.Tensor, batch_size: int) -> np.ndarray:
    """RMS divergence ``(window, lead)`` of the system's rollout from ``ref``; once non-finite, ``+inf``."""
    div = _rms_divergence(rollout(system, x0, ref.shape[0], batch_size), ref)
    div[np.logical_or.accumulate(np.isinf(div), axis=1)] = np.inf
    return div


def score_unit(system, unit: Unit, x0: torch.Tensor, ref: torch.Tensor, batch_size: int,
               settings: dict) -> tuple[float, np.ndarray]:
    """The probe's work for one unit: ``(eps_u, divergence (window, lead))``.

    Perturbs the unit (``settings``: the keyword arguments of :func:`perturbation`), rolls out
    from ``x0``, compares with the unperturbed rollout ``ref`` ``(T, N, *S)`` and restores the
    weights exactly. Once a window's rollout is non-finite its divergence stays ``+inf``.
    """
    perturbed, eps = perturbation(system, unit, **settings)
    if eps == 0:
        return eps, np.zeros((x0.shape[0], ref.shape[0]))  # nothing to perturb: dead, no rollout needed
    with swapped(system, perturbed):
        return eps, rollout_divergence(system, x0, ref, batch_size)


def _score_unit_on_copy(system, unit, x0, ref, batch_size, settings):
    """:func:`score_unit` on a private copy of the system, for executors (threads would share it)."""
    system = copy.deepcopy(system)
    with system.evaluating():
        return score_unit(system, unit, x0, ref, batch_size, settings)


def curves_from_divergence(div: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """``Lambda(unit, lead) = mean over windows of log(max(d, d_floor) / eps)``; ``div`` is (unit, window, lead)."""
    with np.errstate(divide="ignore"):
        logd = np.log(np.maximum(div, D_FLOOR)) - np.log(eps)[:, None, None]
    return logd.mean(axis=1)


def assemble_scores(units, system, eps, div, dead_threshold, attrs) -> xr.Dataset:
    """The probe's result Dataset from per-unit ``eps`` ``(unit,)`` and divergence ``(unit, window, lead)``."""
    horizon = div.shape[2]
    curve = curves_from_divergence(div, eps)
    nonfinite = np.isinf(div).any(axis=(1, 2))
    dead = (eps == 0) | ((div == 0).all(axis=(1, 2)) & ~nonfinite)
    if dead_threshold is not None:
        dead |= (curve[:, -1] <= dead_threshold) & ~nonfinite
    curve[dead] = -np.inf
    gamma = curve[:, -1] / horizon
    labels = [u.label for u in units]
    n_params = [sum(system.get_parameter(p).numel() for p in u.params) for u in units]
    return xr.Dataset(
        {
            "gamma": ("unit", gamma, {"long_name": "TQS score gamma_u(T) = Lambda_u(T) / T", "units": "1/step"}),
            "curve": (("unit", "lead"), curve, {"long_name": "log-amplification Lambda_u(t)", "units": "1"}),
            "eps": ("unit", eps, {"long_name": "relative perturbation size ||delta_u|| / ||theta_u||"}),
            "n_params": ("unit", np.asarray(n_params, dtype=np.int64)),
            "dead": ("unit", dead, {"long_name": "perturbation is zero or leaves the trajectory unchanged"}),
            "nonfinite": ("unit", nonfinite, {"long_name": "perturbed rollout turned non-finite"}),
            "members": ("unit", np.asarray([",".join(u.params) for u in units], dtype=object)),
            "divergence": (("unit", "window", "lead"), div,
                           {"long_name": "RMS divergence from the unperturbed rollout", "units": "state units"}),
        },
        coords={"unit": labels, "lead": np.arange(1, horizon + 1), "window": np.arange(div.shape[1])},
        attrs={"title": "TQS probe scores", **attrs},
    )


def gamma_at(scores: xr.Dataset, lead: int) -> xr.DataArray:
    """``gamma_u(T')`` for any ``T' <= T`` from the same sweep: ``Lambda_u(T') / T'``."""
    if not 1 <= lead <= scores.sizes["lead"]:
        raise ValueError(f"lead={lead} is outside the probed leads 1..{scores.sizes['lead']}.")
    return scores["curve"].sel(lead=lead, drop=True) / lead
