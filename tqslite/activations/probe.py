"""The activation probe: the TQS probe with Gaussian noise at a layer's output instead of its weights."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable

import numpy as np
import torch
import xarray as xr
from tqdm import tqdm

from .. import row_blocks
from ..batched import (NotBatchable, copies_divergence, default_memory_budget, parse_bytes, plan_chunks,
                       quiet_slow_ops, step_memory)
from ..probe import (as_states, assemble_scores, divergence_floor, fingerprint, nonfinite_stays, reference_rollout,
                     rollout_divergence, unit_seed)
from ..systems import as_system, device_of
from ..units import Unit
from .layers import quantizable_modules, torch_module


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

    Layers are scored in chunks of ``K``, as the weight probe's units are: ``K`` copies of the
    model run as blocks of rows of one plain pass (:mod:`tqslite.row_blocks`), copy ``k``'s rows
    with noise at layer ``k`` only, each drawing the same noise as it would alone. A chunk is
    checked one step against its layers alone first; a model that mixes the rows of a batch runs
    under ``torch.vmap`` instead (:mod:`tqslite.batched`; the other copies add an exact zero).

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
        engine = "rows" if len(chunks) < len(layers) else None  # then "vmap", then one layer at a time
        for chunk in chunks:
            sub = [layers[i] for i in chunk]
            if engine == "rows" and len(chunk) > 1:
                if _rows_agree(system, sub, sigma_rel, seed, x0[:batch_size]):
                    try:
                        _noisy_rows(system, sub, sigma_rel, seed, x0, ref, batch_size, eps, n_out, div, chunk)
                        bar.update(len(chunk))
                        continue
                    except NotBatchable:  # a later window batch the row blocks cannot cut
                        pass
                engine = "vmap"  # the copies' rows do not step as the layers alone do
            if engine == "vmap" and len(chunk) > 1:
                try:
                    with quiet_slow_ops():
                        _noisy_batched(system, sub, sigma_rel, seed, x0, ref, batch_size, eps, n_out, div, chunk)
                    bar.update(len(chunk))
                    continue
                except NotBatchable as e:
                    engine = None
                    warnings.warn(f"{type(net).__name__} cannot run batched (row blocks: the copies step differently "
                                  f"than alone; torch.vmap: {e}); the activation probe scores one layer at a time.",
                                  stacklevel=2)
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


@contextlib.contextmanager
def _noise_on_rows(layers, sigma_rel: float, seed: int):
    """Noise hooks for ``K`` layers on a batch of ``K`` row blocks: block ``k`` gets noise at layer ``k`` only.

    Layer ``k`` draws from its own generator, seeded by ``(seed, name)``, once per call and in
    the shape of its block, so its noise is what it draws alone (``K = 1``: the one-layer probe).
    Yields ``(ratios, sizes)``: per layer, ``||noise|| / ||y||`` of every call, and its output
    elements per sample. Raises :class:`~tqslite.batched.NotBatchable` (from the step) if a
    layer's output is not a batch of ``K`` blocks.
    """
    k = len(layers)
    gens = [torch.Generator().manual_seed(unit_seed(seed, name)) for name, _ in layers]
    ratios, sizes = [[] for _ in range(k)], [0] * k

    def hook_of(j):
        def hook(mod, args, out):
            if not isinstance(out, torch.Tensor) or out.ndim == 0 or out.shape[0] % k:
                raise NotBatchable(f"layer {layers[j][0]!r} does not return a batch of {k} row blocks")
            if any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
                   for a in args):
                out = out.clone()  # the noise is added in place: never into an input's memory
            per = out.shape[0] // k
            block = out[j * per:(j + 1) * per]
            sizes[j] = block[0].numel()
            noise, ratio = _noise(block, sigma_rel, gens[j])
            ratios[j].append(ratio)
            block += noise
            return out
        return hook

    handles = [module.register_forward_hook(hook_of(j)) for j, (_, module) in enumerate(layers)]
    try:
        yield ratios, sizes
    finally:
        for h in handles:
            h.remove()


def _realised(ratios: list) -> float:
    """``eps``: the RMS over calls of ``||noise|| / ||y||`` (0 without a call)."""
    r = torch.stack(ratios).cpu().numpy() if ratios else np.zeros(0)
    return math.sqrt(np.mean(np.square(r))) if len(r) else 0.0


def _noisy_one(system, layer, sigma_rel, seed, x0, ref, batch_size, eps, n_out, div, i) -> None:
    """One layer's rollout with noise at its output: fills ``eps[i]``, ``n_out[i]``, ``div[i]``."""
    with _noise_on_rows([layer], sigma_rel, seed) as (ratios, sizes):
        div[i] = rollout_divergence(system, x0, ref, batch_size)
    eps[i], n_out[i] = _realised(ratios[0]), sizes[0]


def _noisy_rows(system, layers, sigma_rel, seed, x0, ref, batch_size, eps, n_out, div, chunk) -> None:
    """``K`` layers at once as row blocks of one plain pass (:mod:`tqslite.row_blocks`)."""
    with _noise_on_rows(layers, sigma_rel, seed) as (ratios, sizes):
        raw, _ = copies_divergence(lambda x: row_blocks.step_rows(system, x), len(layers), x0, ref, batch_size)
    div[chunk] = nonfinite_stays(raw)
    for j, i in enumerate(chunk):
        eps[i], n_out[i] = _realised(ratios[j]), sizes[j]


def _rows_agree(system, layers, sigma_rel, seed, x: torch.Tensor) -> bool:
    """Whether ``K`` layers' copies, one window each from ``x``, step as row blocks as they step alone."""
    states = row_blocks.copy_windows(x, len(layers))
    try:
        with _noise_on_rows(layers, sigma_rel, seed):
            batched = row_blocks.step_rows(system, states)
    except torch.OutOfMemoryError:
        raise
    except Exception:  # noqa: BLE001 -- whatever the row blocks break, vmap or one layer at a time runs
        return False
    for j, layer in enumerate(layers):
        plain = system.step(states[j])
        with _noise_on_rows([layer], sigma_rel, seed):
            single = system.step(states[j])
        if not row_blocks.agrees(batched[j], single, plain):
            return False
    return True


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
        raw, aux = copies_divergence(lambda x: mapped(onehot, x), k, x0, ref, batch_size)
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
