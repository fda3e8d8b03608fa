"""The Trajectory-based Quantization Sensitivity (TQS) probe (SPEC section 2).

For every unit ``u`` (a named set of parameter tensors) the probe perturbs the unit's weights by
``delta_u``, rolls the perturbed system out from ``N`` initial states for ``T`` steps next to the
unperturbed rollout (computed once, reused for every unit), and measures

* the divergence ``d[n, t] = RMS over state elements of (x_t(theta + delta_u) - x_t(theta))``,
* the log-amplification curve ``Lambda_u(t) = mean_n log(max(d[n, t], d_floor[n, t]) / eps_u)``,
  with ``eps_u = ||delta_u|| / ||theta_u||`` the relative size of the perturbation,
* the TQS score ``gamma_u(T) = Lambda_u(T) / T``: the error a unit's perturbation injects at every
  step, as a rate per step. On the book's models most of ``Lambda_u(T)`` is the first step's
  offset ``Lambda_u(1)``, and units share the later growth (chapters 01, 03 and 06 measure it).

Two perturbations, chosen with a small value:

* :class:`Gaussian` (``"gauss"``): ``delta = sigma_rel * rms(theta_p) * xi`` with ``xi ~ N(0, I)``
  drawn from a CPU generator seeded by ``(seed, unit label)`` (gamma_gauss, the a-priori probe that
  knows nothing of any quantizer; the same on every device);
* :class:`QuantResidual` (``"quant"``): ``delta = Q(theta) - theta`` for a configuration and any
  quantizer (gamma_quant; RTN at 4 bits per channel by default, GPTQ with calibration states).

**Dead and unmeasured units.** A unit whose perturbation leaves every window's trajectory
unchanged at every lead (``d == 0``) although ``eps_u > 0`` is ``dead``: its curve and gamma are
``-inf``. A unit whose perturbation is itself zero (``eps_u == 0``, e.g. a tensor already on the
probe's grid) was not measured: it is flagged ``unmeasured`` and, for the quant probe, re-probed
with the Gaussian perturbation, so the allocator does not take it for free. ``d_floor`` is one unit
of the model dtype's resolution at the state's RMS (``finfo(dtype).eps * rms(x_t)``): a window whose
divergence is exactly 0 counts as that, not as ``1e-30`` that would drag ``Lambda`` down by tens
of nats; ``n_zero_windows`` counts such windows per unit. A unit whose rollout turns non-finite
scores ``+inf``. Rollouts run in the model's dtype; ``d``, ``Lambda`` and ``gamma`` are float64.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import xarray as xr
from tqdm import tqdm

from . import row_blocks
from .batched import (NotBatchable, Vmap, batched_divergence, check_batchable, default_memory_budget, parse_bytes,
                      plan_chunks, quiet_slow_ops, step_memory, supports_batching)
from .config import Config, Int, as_config
from .quantization import check_finite
from .quantizers import RTN, Quantizer, as_quantizer
from .sweep import SweepFile, as_json, is_dask_client, run_tasks, weights_fingerprint
from .systems import as_system, device_of, rollout, swapped
from .units import Unit, as_unit_spec, membership, resolve_units


@dataclass(frozen=True)
class Gaussian:
    """Relative Gaussian noise: ``delta_p = sigma_rel * rms(theta_p) * xi`` for every tensor ``p`` of a unit.

    ``xi`` is drawn in the weight's dtype from a CPU generator seeded by ``(seed, unit label)``,
    so adding, removing or reordering units, or moving the model to another device, leaves a
    unit's noise unchanged.
    """

    sigma_rel: float = 1e-2
    seed: int = 0
    kind: ClassVar[str] = "gauss"

    def __post_init__(self):
        if not (isinstance(self.sigma_rel, (int, float)) and math.isfinite(self.sigma_rel) and self.sigma_rel > 0):
            raise ValueError(f"sigma_rel={self.sigma_rel!r}: the Gaussian probe needs a positive, finite size.")

    def describe(self) -> dict:
        return dict(kind=self.kind, sigma_rel=float(self.sigma_rel), seed=int(self.seed))


@dataclass(frozen=True)
class QuantResidual:
    """The residual of a quantizer: ``delta = Q(theta) - theta`` on ``config``.

    Any quantizer (:class:`~tqslite.quantizers.RTN` by default; :class:`~tqslite.gptq.GPTQ`
    needs ``calibration`` states in :func:`probe`). The whole model is quantized once on
    ``config`` and each unit is perturbed to its quantized weights. Units whose residual is zero
    are re-probed with ``fallback``.
    """

    config: Config = field(default_factory=lambda: Int(4))
    quantizer: Quantizer = field(default_factory=RTN)
    fallback: Gaussian = field(default_factory=Gaussian)
    kind: ClassVar[str] = "quant"

    def __post_init__(self):
        object.__setattr__(self, "config", as_config(self.config))
        object.__setattr__(self, "quantizer", as_quantizer(self.quantizer))

    def describe(self) -> dict:
        return dict(kind=self.kind, config=self.config.label, quantizer=repr(self.quantizer),
                    sigma_rel=float(self.fallback.sigma_rel), seed=int(self.fallback.seed))


def as_perturbation(p) -> Gaussian | QuantResidual:
    """``"gauss"`` -> :class:`Gaussian`, ``"quant"`` -> :class:`QuantResidual`; instances as they are."""
    if isinstance(p, (Gaussian, QuantResidual)):
        return p
    if p == "gauss":
        return Gaussian()
    if p == "quant":
        return QuantResidual()
    raise ValueError(f"perturbation={p!r}: use 'gauss', 'quant', Gaussian(sigma_rel, seed) or "
                     "QuantResidual(config, quantizer).")


def unit_seed(seed: int, label: str) -> int:
    """A 63-bit generator seed from ``(seed, unit label)``: stable across runs and unit orders."""
    digest = hashlib.sha256(f"{int(seed)}:{label}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def gaussian_weights(system, unit: Unit, noise: Gaussian) -> dict:
    """``{name: theta + sigma_rel * rms(theta) * xi}`` for the tensors of ``unit``."""
    gen = torch.Generator().manual_seed(unit_seed(noise.seed, unit.label))
    out = {}
    for name in unit.params:
        w = system.get_parameter(name)
        rms = float(w.double().pow(2).mean().sqrt()) if w.numel() else 0.0
        xi = torch.randn(tuple(w.shape), generator=gen, dtype=w.dtype, device="cpu").to(w.device)
        out[name] = w + (noise.sigma_rel * rms) * xi
    return out


def relative_size(system, perturbed: dict) -> float:
    """``eps = ||delta|| / ||theta||`` over the tensors of ``perturbed`` (float64; 0 when both are 0)."""
    num = den = 0.0
    for name, new in perturbed.items():
        w = system.get_parameter(name).double()
        num += float((new.double() - w).pow(2).sum())
        den += float(w.pow(2).sum())
    return math.sqrt(num / den) if den > 0 else 0.0


def as_states(x0, dtype, device=None, allow_missing: bool = False) -> torch.Tensor:
    """Initial states as a tensor ``(N, *S)`` of ``dtype``; ``ValueError`` if not a finite batch.

    ``allow_missing=True`` (a system with ``accepts_missing``, which masks missing values
    itself, see :mod:`tqslite.adapters`) lets NaN through; infinities are refused all the same.
    """
    if isinstance(x0, xr.DataArray):
        x0 = x0.values
    x0 = torch.as_tensor(np.asarray(x0) if not torch.is_tensor(x0) else x0, device=device).to(dtype=dtype)
    if x0.ndim < 2 or x0.shape[0] < 1:
        raise ValueError(f"x0 must be a batch of initial states (N, *S) with N >= 1, got shape {tuple(x0.shape)}.")
    bad = torch.isinf(x0) if allow_missing else ~torch.isfinite(x0)
    if bad.any():
        raise ValueError(f"initial states x0 contains {int(bad.sum())} " + (
            "infinite value(s); missing values must be NaN." if allow_missing else
            "non-finite value(s) (NaN or Inf). If NaN marks missing data that the model masks, wrap it in an "
            "adapter that accepts missing values (tqslite.adapters.BlockForecaster(..., mask=Mask()))."))
    return x0


def fingerprint(x0: torch.Tensor) -> str:
    """SHA-256 of the initial states (dtype, shape and values): two probes of the same windows share it."""
    x = x0.detach().cpu().contiguous()
    return hashlib.sha256(f"{x.dtype}{tuple(x.shape)}".encode() + x.numpy().tobytes()).hexdigest()


def probe(
    model,
    x0,
    *,
    horizon: int = 20,
    perturbation="gauss",
    units="tensor",
    calibration=None,
    dead_threshold: float | None = None,
    batch_size: int | None = None,
    executor=None,
    progress: bool = True,
    chunk_units: int | None = None,
    memory_budget=None,
    checkpoint=None,
) -> xr.Dataset:
    """Score every unit of ``model`` by how fast its perturbation makes the rollout diverge.

    Parameters
    ----------
    model : nn.Module or system
        Maps states ``(B, *S)`` to next states; see :mod:`tqslite.systems`. It is read, on its
        own device; where units are scored one at a time its weights are swapped and restored
        bit for bit afterwards.
    x0 : Tensor, ndarray or DataArray, shape ``(N, *S)``
        ``N`` initial states (dim ``window`` of the result), moved to the model's device.
    horizon : int
        Rollout length ``T`` in steps (>= 1); the curve covers leads 1..T.
    perturbation : "gauss", "quant", Gaussian or QuantResidual
        Gaussian relative noise (gamma_gauss; ``Gaussian(sigma_rel=1e-2, seed=0)``) or a
        quantizer's residual (gamma_quant; ``QuantResidual(Int(4), RTN())``).
    units : "tensor", "block", TensorUnits, BlockUnits, dict or list of Unit
        Which tensors are perturbed together (see :mod:`tqslite.units`).
    calibration : Tensor, optional
        States for a calibration-based quantizer in ``QuantResidual`` (GPTQ).
    dead_threshold : float, optional
        Also flag units with ``Lambda_u(T) <= dead_threshold`` as dead.
    batch_size : int, optional
        Windows per forward call (default: all ``N`` at once).
    executor : concurrent.futures.Executor or distributed.Client, optional
        Score chunks of units in parallel: any executor with ``submit`` (a process pool), or a
        dask ``distributed.Client`` (for a cluster: ``Client("tcp://scheduler:8786")``), which
        receives the model once per worker and re-runs the chunk of a worker that dies. The
        unperturbed rollout is computed once here and sent along. Scores are identical to the
        serial run with the same ``chunk_units``.
    progress : bool
        Show a tqdm progress bar over units.
    chunk_units : int, optional
        At most this many units per batched pass: their ``K`` perturbed copies run as one
        forward pass of the model on ``K * batch_size`` rows (:mod:`tqslite.row_blocks`; where
        the model's step does not allow it, under ``torch.vmap``, :mod:`tqslite.batched`).
        Default: on a CUDA device as many as ``memory_budget`` allows (with an executor, also
        few enough to give every worker two chunks); on the CPU one unit at a time, where a
        model whose step is compute-bound gains nothing from larger batches
        (``benchmarks/probe_throughput.py`` measures it). ``1`` scores one unit at a time, its
        weights swapped in place. Scores depend on the chunks only through the order of
        floating-point operations: they agree with the one-unit probe within float tolerance,
        and bit for bit between runs with the same chunks. Systems without an ``nn.Module``
        or ``functional_step`` (ONNX graphs), and models neither engine can run (a single
        warning says why), are scored one unit at a time.
    memory_budget : int or str, optional
        Bytes one batched pass may hold (its copies of the perturbed weights plus activations), e.g.
        ``"4GB"``; given on the CPU, it turns batching on. Default: half the free memory of a
        CUDA device; 1 GiB on the CPU when ``chunk_units`` asks for batches.
    checkpoint : path-like, optional
        A netCDF file that receives every unit as it is finished (:class:`tqslite.sweep.SweepFile`).
        If it exists, the sweep resumes from it: only the units it lacks are computed, and the
        result is the uninterrupted run's (chunking may differ). A file written for another
        model, other initial states or other settings is refused with a message naming what
        differs.

    Returns
    -------
    xarray.Dataset
        Dims ``unit``, ``lead`` (1..T), ``window`` (0..N-1) and ``tensor`` (the member tensors).
        Variables: ``gamma(unit)``, ``curve(unit, lead)`` = Lambda_u(t), ``eps(unit)``,
        ``n_params(unit)``, ``dead(unit)``, ``unmeasured(unit)``, ``nonfinite(unit)``,
        ``n_zero_windows(unit)``, ``divergence(unit, window, lead)``, ``d_floor(window, lead)``
        and ``tensor_unit(tensor)`` (:func:`tqslite.units.units_of` reads the units back).
        ``attrs`` record every setting.
    """
    system = as_system(model)
    perturbation = as_perturbation(perturbation)
    if isinstance(horizon, bool) or int(horizon) != horizon or horizon < 1:
        raise ValueError(f"horizon={horizon!r}: the rollout needs at least 1 step (an integer >= 1).")
    horizon = int(horizon)
    if chunk_units is not None and (isinstance(chunk_units, bool) or not isinstance(chunk_units, int)
                                    or chunk_units < 1):
        raise ValueError(f"chunk_units={chunk_units!r}: give a positive number of units per pass (1: one at a time).")
    budget = None if memory_budget is None else parse_bytes(memory_budget)
    unit_list = resolve_units(units, system.parameter_names())
    for u in unit_list:
        for p in u.params:
            check_finite(system.get_parameter(p), f"parameter {p!r}")
    x0 = as_states(x0, system.dtype, device_of(system), allow_missing=getattr(system, "accepts_missing", False))
    batch_size = batch_size or x0.shape[0]
    spec = units if isinstance(units, (list, tuple)) else as_unit_spec(units)
    attrs = dict(**perturbation.describe(), horizon=horizon, units=_describe_units(spec), n_windows=x0.shape[0],
                 windows_sha256=fingerprint(x0), dtype=str(x0.dtype).removeprefix("torch."),
                 dead_threshold="none" if dead_threshold is None else dead_threshold,
                 system=type(getattr(system, "module", system)).__name__)

    with system.evaluating():
        ref = reference_rollout(system, x0, horizon, batch_size)  # computed once, reused for every unit
        sweep = None if checkpoint is None else SweepFile(checkpoint, _identity(system, unit_list, attrs, perturbation,
                                                                                 calibration))
        done = {} if sweep is None or sweep.done is None else {
            str(u): (float(sweep.done["eps"].sel(unit=u)), sweep.done["divergence"].sel(unit=u).values,
                     bool(sweep.done["unmeasured"].sel(unit=u))) for u in sweep.done["unit"].values}
        todo = [u for u in unit_list if u.label not in done]
        bar = tqdm(desc=f"TQS probe ({perturbation.kind})", total=len(unit_list), initial=len(unit_list) - len(todo),
                   disable=not progress)
        try:
            _sweep(system, x0, ref, batch_size, perturbation, calibration, unit_list, todo, done, sweep, chunk_units,
                   budget, executor, bar)
        finally:
            bar.close()
    eps = np.array([done[u.label][0] for u in unit_list], dtype=np.float64)
    div = np.stack([np.asarray(done[u.label][1], dtype=np.float64) for u in unit_list])
    unmeasured = np.array([done[u.label][2] for u in unit_list], dtype=bool)
    return assemble_scores(unit_list, system, eps, div, divergence_floor(ref), unmeasured, dead_threshold, attrs)


def _sweep(system, x0, ref, batch_size, perturbation, calibration, unit_list, todo, done, sweep, chunk_units, budget,
           executor, bar) -> None:
    """Score the units ``todo`` in chunks; put each unit's ``(eps, divergence, unmeasured)`` in ``done``
    (and in the sweep file) as its chunk finishes."""
    if not todo:
        return
    quantized = {}
    if isinstance(perturbation, QuantResidual):  # the whole model quantized once
        configs = {p: perturbation.config for u in unit_list for p in u.params}
        quantized = perturbation.quantizer.quantize_weights(system, configs, calibration).dequantized()
    chunks, engine = _chunks(system, x0[:batch_size], todo, perturbation, quantized, chunk_units, budget, executor)
    tasks = [([todo[i] for i in c], {p: quantized[p] for i in c for p in todo[i].params if p in quantized})
             for c in chunks]
    fell_back = []

    def finished(j, out):
        chunk = tasks[j][0]
        for k, u in enumerate(chunk):
            done[u.label] = (out["eps"][k], out["divergence"][k], out["unmeasured"][k])
        if sweep is not None:
            sweep.add(_finished_units(chunk, out))
        if out["fell_back"]:
            fell_back.append(out["fell_back"])
        bar.update(len(chunk))

    fn = score_units if executor is None else _score_units_on_copy
    run_tasks(fn, (system, x0, ref, batch_size, perturbation, engine), tasks, executor, finished, name="tqslite-probe")
    if fell_back:
        warnings.warn(f"the batched probe fell back to one unit at a time in {len(fell_back)} of {len(tasks)} chunks: "
                      f"{fell_back[0]}.", stacklevel=3)


def _identity(system, units, attrs: dict, perturbation, calibration) -> dict:
    """What a sweep file must share with this probe: model, states, and every setting that sets a unit's numbers."""
    settings = {k: v for k, v in attrs.items() if k not in ("dead_threshold", "units")}
    settings["units"] = [[u.label, list(u.params)] for u in units]
    if isinstance(perturbation, QuantResidual) and calibration is not None:
        settings["calibration_sha256"] = fingerprint(torch.as_tensor(calibration))
    return dict(model_sha256=weights_fingerprint(system), windows_sha256=attrs["windows_sha256"],
                settings=as_json(settings))


def _finished_units(units, out: dict) -> xr.Dataset:
    """The finished units of one chunk as a Dataset along ``unit`` (what a sweep file stores)."""
    return xr.Dataset({"eps": ("unit", np.asarray(out["eps"], dtype=np.float64)),
                       "divergence": (("unit", "window", "lead"), np.asarray(out["divergence"], dtype=np.float64)),
                       "unmeasured": ("unit", np.asarray(out["unmeasured"], dtype=bool))},
                      coords={"unit": [u.label for u in units]})


def _chunks(system, x: torch.Tensor, units, perturbation, quantized, chunk_units, budget, executor):
    """``(chunks, engine)``: the units cut into chunks for batched passes, and the engine that runs them.

    ``engine`` is a :class:`tqslite.row_blocks.RowBlocks` (copies as blocks of rows of one plain
    pass), a :class:`~tqslite.batched.Vmap` (stacked copies under ``torch.vmap``) or None (one
    unit at a time). On the CPU the default is one unit at a time (batched passes measured no
    faster there); a ``chunk_units`` above 1 or a ``memory_budget`` asks for batches anyway. Row blocks are tried first: every
    chunk's copies take one step both ways, batched and alone, one window each
    (:func:`tqslite.row_blocks.check`), and a unit whose copy disagrees runs alone. Where the row blocks cannot run at all, one
    ``torch.vmap`` step is tried; a model it cannot map either gets one warning and single units.
    """
    singles = [[i] for i in range(len(units))]
    on_cpu = x.device.type == "cpu"
    if chunk_units == 1 or len(units) < 2 or (on_cpu and chunk_units is None and budget is None) or not (
            row_blocks.supports_row_blocks(system) or supports_batching(system)):
        return singles, None
    if budget is None:
        budget = default_memory_budget(x.device)
    if executor is not None and chunk_units is None:  # enough chunks to keep every worker busy
        chunk_units = max(1, math.ceil(len(units) / (2 * _n_workers(executor))))
    sizes = {p: system.get_parameter(p).nbytes for u in units for p in u.params}
    activations = step_memory(system.step, x)
    chunks = plan_chunks([u.params for u in units], sizes, activations, budget, chunk_units)
    reasons = []
    if row_blocks.supports_row_blocks(system):
        try:
            return _row_block_chunks(system, x, units, chunks, perturbation, quantized)
        except NotBatchable as e:
            reasons.append(f"row blocks: {e}")
    if supports_batching(system):
        try:
            slow = check_batchable(system, x, [_perturbed(system, u, perturbation, quantized) for u in units[:2]])
        except NotBatchable as e:
            reasons.append(f"torch.vmap: {e}")
        else:
            if slow:
                warnings.warn(f"torch.vmap has no batching rule for {', '.join(slow)}: those operators run once per "
                              "unit inside each batched pass (exact, but slower).", stacklevel=4)
            return chunks, Vmap()
    warnings.warn(f"{type(getattr(system, 'module', system)).__name__} cannot run batched ({'; '.join(reasons)}); "
                  "the probe scores one unit at a time (same scores, without the batched speed-up). "
                  "chunk_units=1 skips this attempt.", stacklevel=4)
    return singles, None


def _row_block_chunks(system, x: torch.Tensor, units, chunks, perturbation, quantized):
    """``(chunks, engine)`` for the row blocks: each chunk checked on windows of ``x``, disagreeing units alone.

    Raises :class:`~tqslite.batched.NotBatchable` if the model's step cannot run as row blocks at
    all, or if no copy of any chunk agrees (the vmap engine is tried next).
    """
    engine = row_blocks.hook_points(system, [p for u in units for p in u.params], x[:1])
    kept, alone = [], []
    for chunk in chunks:
        if len(chunk) == 1:
            kept.append(chunk)
            continue
        agree = row_blocks.check(system, engine, x, [_perturbed(system, units[i], perturbation, quantized)
                                                     for i in chunk])
        ok = [i for i, a in zip(chunk, agree) if a]
        alone += [i for i, a in zip(chunk, agree) if not a]
        kept += [ok] if ok else []
    if alone and not any(len(c) > 1 for c in kept):
        raise NotBatchable(f"no copy stepped as its unit alone does ({units[alone[0]].label!r} first): the model "
                           "mixes the rows of a batch, or keeps them in another order")
    if alone:
        warnings.warn(f"{len(alone)} of {len(units)} units step differently as row blocks than alone "
                      f"({', '.join(units[i].label for i in alone[:3])}{', ...' if len(alone) > 3 else ''}): "
                      "they are scored one at a time.", stacklevel=5)
    return kept + [[i] for i in alone], engine


def _n_workers(executor) -> int:
    if is_dask_client(executor):
        return max(1, len(executor.scheduler_info().get("workers", {})))
    return os.cpu_count() or 1


def _describe_units(spec) -> str:
    if isinstance(spec, (dict, list, tuple)):
        return "custom"
    return repr(spec)


def _perturbed(system, unit: Unit, perturbation, quantized: dict) -> dict:
    """The perturbed weights ``{name: theta_p + delta_p}`` of one unit."""
    if isinstance(perturbation, Gaussian):
        return gaussian_weights(system, unit, perturbation)
    return {p: quantized[p] for p in unit.params}


def reference_rollout(system, x0: torch.Tensor, horizon: int, batch_size: int) -> torch.Tensor:
    """The unperturbed rollout ``(T, N, *S)``; ``ValueError`` naming the lead where it turns non-finite."""
    ref = rollout(system, x0, horizon, batch_size)
    if getattr(system, "accepts_missing", False):  # NaN is a missing value the system masks, not a failure
        ref_ok = ~torch.isinf(ref)
    else:
        ref_ok = torch.isfinite(ref)
    if not ref_ok.all():
        bad = int(torch.nonzero(~ref_ok.flatten(2).all(2).all(1))[0]) + 1
        raise ValueError(f"the unperturbed rollout turns non-finite at lead {bad}; use a horizon below {bad} "
                         "or initial states inside the model's range.")
    return ref


def _rms(x: torch.Tensor) -> np.ndarray:
    """RMS over state elements of states ``(T, B, *S)``: ``(B, T)`` float64 on the CPU."""
    flat = x.flatten(2)
    return (torch.linalg.vector_norm(flat, dim=2, dtype=torch.float64) / math.sqrt(flat.shape[2])).T.cpu().numpy()


def divergence_floor(ref: torch.Tensor) -> np.ndarray:
    """``d_floor (window, lead)``: one unit of the dtype's resolution at the reference state's RMS."""
    rms = _rms(torch.nan_to_num(ref, nan=0.0))  # a missing value (NaN, accepts_missing) counts as 0
    return np.maximum(torch.finfo(ref.dtype).eps * rms, np.finfo(np.float64).tiny)


def rollout_divergence(system, x0: torch.Tensor, ref: torch.Tensor, batch_size: int) -> np.ndarray:
    """RMS divergence ``(window, lead)`` of the system's rollout from ``ref``; once non-finite, ``+inf``."""
    diff = rollout(system, x0, ref.shape[0], batch_size) - ref
    diff = torch.where(torch.isnan(ref), torch.zeros_like(diff), diff)  # missing in the reference: no difference
    div = _rms(diff)
    div = np.where(np.isnan(div), np.inf, div)
    div[np.logical_or.accumulate(np.isinf(div), axis=1)] = np.inf
    return div


def nonfinite_stays(div: np.ndarray) -> np.ndarray:
    """Divergence ``(..., lead)`` with NaN as ``+inf``, and ``+inf`` at every lead after the first one."""
    div = np.where(np.isnan(div), np.inf, div)
    div[np.logical_or.accumulate(np.isinf(div), axis=-1)] = np.inf
    return div


def score_unit(system, x0: torch.Tensor, ref: torch.Tensor, batch_size: int, perturbed: dict):
    """The probe's work for one unit: ``(eps_u, divergence (window, lead))``.

    Swaps in the unit's perturbed weights ``{name: tensor}``, rolls out from ``x0``, compares with
    the unperturbed rollout ``ref`` ``(T, N, *S)`` and restores the weights exactly. Once a
    window's rollout is non-finite its divergence stays ``+inf``.
    """
    eps = relative_size(system, perturbed)
    if eps == 0:
        return eps, np.zeros((x0.shape[0], ref.shape[0]))  # nothing to perturb: no rollout needed
    with swapped(system, perturbed):
        return eps, rollout_divergence(system, x0, ref, batch_size)


def score_units(system, x0: torch.Tensor, ref: torch.Tensor, batch_size: int, perturbation, engine,
                units, quantized: dict) -> dict:
    """The probe's work for a chunk of ``K`` units: their perturbed rollouts, in one batched pass if asked.

    Each unit's weights are perturbed (for :class:`QuantResidual`, from ``quantized``, the
    quantizer's weights of the chunk's tensors; a zero residual is replaced by the fallback
    Gaussian noise). With an ``engine`` (a :class:`tqslite.row_blocks.RowBlocks` or a
    :class:`~tqslite.batched.Vmap`) the units with a non-zero perturbation run together (a pass that does not fit the device's
    memory is split in halves); without one, or if the engine refuses the step, one at a time
    with their weights swapped in place and restored.

    Returns
    -------
    dict
        ``eps`` ``(K,)``, ``divergence`` ``(K, window, lead)``, ``unmeasured`` ``(K,)`` (the
        probe's own perturbation was zero) and ``fell_back`` (why the batched pass was not
        possible, or None).
    """
    weights, eps, unmeasured = [], np.zeros(len(units)), np.zeros(len(units), dtype=bool)
    for k, u in enumerate(units):
        w = _perturbed(system, u, perturbation, quantized)
        eps[k] = relative_size(system, w)
        if eps[k] == 0:
            unmeasured[k] = True
            if isinstance(perturbation, QuantResidual):  # not free: measure it with the Gaussian instead
                w = gaussian_weights(system, u, perturbation.fallback)
                eps[k] = relative_size(system, w)
        weights.append(w)
    div = np.zeros((len(units), x0.shape[0], ref.shape[0]))
    live = [k for k in range(len(units)) if eps[k] > 0]  # a zero perturbation needs no rollout
    fell_back = None
    if engine is not None and len(live) > 1:
        try:
            div[live] = _batched(system, engine, x0, ref, batch_size, [weights[k] for k in live])
            live = []
        except NotBatchable as e:
            fell_back = str(e)
    for k in live:
        with swapped(system, weights[k]):
            div[k] = rollout_divergence(system, x0, ref, batch_size)
    return dict(eps=eps, divergence=div, unmeasured=unmeasured, fell_back=fell_back)


def _batched(system, engine, x0, ref, batch_size, weights: list) -> np.ndarray:
    """The divergences of a chunk's copies by ``engine``, split in halves while the device runs out of memory."""
    if len(weights) == 1:
        with swapped(system, weights[0]):
            return rollout_divergence(system, x0, ref, batch_size)[None]
    try:
        if isinstance(engine, Vmap):
            with quiet_slow_ops():
                return nonfinite_stays(batched_divergence(system, x0, ref, batch_size, weights))
        return nonfinite_stays(row_blocks.divergence(system, engine, x0, ref, batch_size, weights))
    except torch.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(weights) // 2
        return np.concatenate([_batched(system, engine, x0, ref, batch_size, weights[:half]),
                               _batched(system, engine, x0, ref, batch_size, weights[half:])])


def _score_units_on_copy(system, x0, ref, *args):
    """:func:`score_units` on private copies, for executors: tasks may share one object, and
    tensors unpacked from a network buffer may be misaligned, which changes the rounding of
    some CPU kernels (fresh copies make a worker's numbers this process's)."""
    system = copy.deepcopy(system)
    with system.evaluating():
        return score_units(system, x0.clone(), ref.clone(), *args)


def curves_from_divergence(div: np.ndarray, eps: np.ndarray, floor: np.ndarray) -> np.ndarray:
    """``Lambda(unit, lead) = mean over windows of log(max(d, d_floor) / eps)``.

    ``div`` is ``(unit, window, lead)``, ``eps`` ``(unit,)``, ``floor`` ``(window, lead)``.
    """
    with np.errstate(divide="ignore"):
        logd = np.log(np.maximum(div, floor[None])) - np.log(eps)[:, None, None]
    return logd.mean(axis=1)


def assemble_scores(units, system, eps, div, floor, unmeasured, dead_threshold, attrs) -> xr.Dataset:
    """The probe's result Dataset from per-unit ``eps`` ``(unit,)`` and divergence ``(unit, window, lead)``."""
    horizon = div.shape[2]
    curve = curves_from_divergence(div, eps, floor)
    nonfinite = np.isinf(div).any(axis=(1, 2))
    zero_windows = (div == 0).all(axis=2)
    dead = (eps > 0) & zero_windows.all(axis=1) & ~nonfinite
    if dead_threshold is not None:
        dead |= (curve[:, -1] <= dead_threshold) & ~nonfinite & (eps > 0)
    curve[dead | (eps == 0)] = -np.inf
    gamma = curve[:, -1] / horizon
    labels = [u.label for u in units]
    n_params = [sum(system.get_parameter(p).numel() for p in u.params) for u in units]
    ds = xr.Dataset(
        {
            "gamma": ("unit", gamma, {"long_name": "TQS score gamma_u(T) = Lambda_u(T) / T", "units": "1/step"}),
            "curve": (("unit", "lead"), curve, {"long_name": "log-amplification Lambda_u(t)", "units": "1"}),
            "eps": ("unit", eps, {"long_name": "relative perturbation size ||delta_u|| / ||theta_u||"}),
            "n_params": ("unit", np.asarray(n_params, dtype=np.int64)),
            "dead": ("unit", dead, {"long_name": "the perturbation leaves every trajectory unchanged"}),
            "unmeasured": ("unit", np.asarray(unmeasured, bool),
                           {"long_name": "the probe's own perturbation was zero (re-probed with Gaussian noise "
                                         "where it could be)"}),
            "nonfinite": ("unit", nonfinite, {"long_name": "perturbed rollout turned non-finite"}),
            "n_zero_windows": ("unit", np.where(dead, 0, zero_windows.sum(axis=1)).astype(np.int64),
                               {"long_name": "windows whose divergence is exactly 0 at every lead"}),
            "divergence": (("unit", "window", "lead"), div,
                           {"long_name": "RMS divergence from the unperturbed rollout", "units": "state units"}),
            "d_floor": (("window", "lead"), floor,
                        {"long_name": "floor under the divergence: finfo(dtype).eps * RMS of the reference state"}),
        },
        coords={"unit": labels, "lead": np.arange(1, horizon + 1), "window": np.arange(div.shape[1])},
        attrs={"title": "TQS probe scores", **attrs},
    )
    return ds.merge(membership(units))


def gamma_at(scores: xr.Dataset, lead: int) -> xr.DataArray:
    """``gamma_u(T')`` for any ``T' <= T`` from the same sweep: ``Lambda_u(T') / T'``."""
    if not 1 <= lead <= scores.sizes["lead"]:
        raise ValueError(f"lead={lead} is outside the probed leads 1..{scores.sizes['lead']}.")
    return scores["curve"].sel(lead=lead, drop=True) / lead
