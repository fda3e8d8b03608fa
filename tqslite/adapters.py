"""Adapters: real forecasters made state-to-state systems, with their pre- and post-processing.

A forecaster found in the wild rarely maps a state to the next state in its ``forward``. Its
forecast method normalises each context window, pads it with a validity mask, predicts a block of
steps as quantiles, keeps the median and de-normalises it, often in numpy, outside the
``nn.Module``. The probe, the allocator, the quantizers and the evaluation need the whole step
``x[t+1] = F(x[t])`` (:mod:`tqslite.systems`), so this module writes that step once, in torch,
for the common shapes:

* :class:`BlockForecaster` -- a context in, a block of ``k`` steps out. The state is the context
  ``(B, L)`` (or ``(B, L, C)`` for ``C`` variables); one step appends the predicted block and
  drops the oldest ``k`` values. Optional per-window normalisation (:class:`Normalise`),
  validity masks (:class:`Mask`: missing values are NaN in the state, and contexts may *grow*
  up to the model's maximum length ``L``, left-padded with NaN), and quantile or ensemble
  outputs reduced to one forecast (:class:`Quantiles`, :class:`Ensemble`).
* :class:`Forced` -- a model that takes extra inputs per step, ``model(x, f_t)``: forcings or
  time features read from a dataset at the state's time.
* :class:`FunctionSystem` -- a model that is only a function ``step(params, state)`` of a dict
  of named tensors.

Each is a system: ``step``, ``parameter_names``, ``get_parameter``, ``set_parameter``,
``channel_axis``, ``evaluating`` and ``dtype``, so :func:`tqslite.probe`,
:func:`tqslite.allocate`, :func:`tqslite.quantize` and :mod:`tqslite.evaluation` take them
unchanged. Parameter names are those of the wrapped model (``"head.weight"``, not
``"model.head.weight"``), so plans and unit trees read as the model does.

**Quantizers.** RTN and MSE-clip work on every adapter. GPTQ needs a torch module it can feed
calibration inputs through: :class:`BlockForecaster` and :class:`Forced` have one -- their
``.module`` is an ``nn.Module`` whose forward is the *whole step* (normalisation, mask, model,
reduction) and whose parameters are the wrapped model's, under the same names -- so GPTQ
calibrates on **states of the system** (contexts, or :meth:`Forced.states`), exactly what the
probe takes: ``quantize(system, plan, GPTQ(), calibration=states)``, gaps included (the mask
replaces them before any layer sees them). GPTQ traces the step with ``torch.fx``; a ``call`` that calls ``model(...)`` itself rather than ``model.forward(...)``
cannot be traced, and GPTQ then calibrates with hooks (slower, with a warning). A
:class:`FunctionSystem` has no layers, so GPTQ refuses it (use RTN or MSE-clip).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr
from torch import nn

from .systems import TorchSystem

# --------------------------------------------------------------------------------------------
# What the forecast method does around the module: small frozen values
# --------------------------------------------------------------------------------------------

LOCATIONS = ("mean", "last", "zero")
SCALES = ("std", "mean_abs", "one")


@dataclass(frozen=True)
class Normalise:
    """Per-window normalisation: ``z = (x - loc) / scale``, undone on the forecast: ``y * scale + loc``.

    ``loc`` and ``scale`` are computed from the valid (non-NaN) values of each window, along the
    time axis, separately for every variable; the model sees ``z`` and its output is mapped back.

    Parameters
    ----------
    location : {"mean", "last", "zero"}
        The window's mean, its last valid value, or 0.
    scale : {"std", "mean_abs", "one"}
        The population standard deviation about ``loc`` (numpy's ``std``, ``ddof=0``), the
        mean absolute value about ``loc`` (Chronos' scaling, with ``location="zero"``), or 1.
    min_scale : float
        A scale below this is replaced by 1 (a flat window is not rescaled), as TimesFM and
        Chronos do.

    A rule not listed here: subclass and override :meth:`stats`.
    """

    location: str = "mean"
    scale: str = "std"
    min_scale: float = 1e-5

    def __post_init__(self):
        if self.location not in LOCATIONS:
            raise ValueError(f"location={self.location!r}: use one of {LOCATIONS}.")
        if self.scale not in SCALES:
            raise ValueError(f"scale={self.scale!r}: use one of {SCALES}.")
        if not (isinstance(self.min_scale, (int, float)) and self.min_scale >= 0):
            raise ValueError(f"min_scale={self.min_scale!r}: give a non-negative number.")

    def stats(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of windows ``x`` ``(B, L, *C)`` over axis 1 (kept, size 1), from valid values only.

        A window with no valid value gets ``loc = 0`` and ``scale = 1``.
        """
        filled = torch.where(valid, x, torch.zeros_like(x))
        count = valid.sum(dim=1, keepdim=True).to(x.dtype)
        n = count.clamp(min=1)
        if self.location == "mean":
            loc = filled.sum(dim=1, keepdim=True) / n
        elif self.location == "last":
            # the valid value with the largest time index
            idx = torch.arange(x.shape[1], device=x.device).view(1, -1, *([1] * (x.ndim - 2)))
            last = torch.where(valid, idx, torch.full_like(idx, -1)).amax(dim=1, keepdim=True)
            loc = torch.gather(filled, 1, last.clamp(min=0))
        else:
            loc = torch.zeros_like(n)
        centred = torch.where(valid, x - loc, torch.zeros_like(x))
        if self.scale == "std":
            scale = (centred.pow(2).sum(dim=1, keepdim=True) / n).sqrt()
        elif self.scale == "mean_abs":
            scale = centred.abs().sum(dim=1, keepdim=True) / n
        else:
            scale = torch.ones_like(n)
        scale = torch.where(scale < self.min_scale, torch.ones_like(scale), scale)
        empty = count == 0
        return torch.where(empty, torch.zeros_like(loc), loc), torch.where(empty, torch.ones_like(scale), scale)


@dataclass(frozen=True)
class Mask:
    """The model takes a validity mask next to its input, same shape, in the model's dtype.

    ``padding=False`` (default): 1 where a value is present, 0 where it is missing (Chronos'
    ``attention_mask``); ``padding=True``: 1 where it is missing (TimesFM's ``paddings``).
    Missing values are NaN in the state; the model sees ``pad_value`` there (see
    :class:`BlockForecaster`).
    """

    padding: bool = False

    def of(self, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The mask the model takes, from the boolean ``valid`` (True where a value is present)."""
        return (~valid if self.padding else valid).to(dtype)


@dataclass(frozen=True)
class Quantiles:
    """The model predicts quantiles along ``axis``; the forecast is the one at ``level``.

    ``levels`` are the quantile levels in the order of the output axis, e.g.
    ``(0.1, 0.2, ..., 0.9)``; ``level=0.5`` keeps the median.
    """

    levels: tuple[float, ...]
    axis: int = -1
    level: float = 0.5

    def __post_init__(self):
        levels = tuple(float(q) for q in self.levels)
        object.__setattr__(self, "levels", levels)
        if not levels or not all(0 < q < 1 for q in levels):
            raise ValueError(f"levels={levels}: give quantile levels in (0, 1), in the order of the output axis.")
        if not any(math.isclose(q, self.level) for q in levels):
            raise ValueError(f"level={self.level} is not among the levels {levels}; pick one of them.")

    def reduce(self, out: torch.Tensor) -> torch.Tensor:
        """The forecast at :attr:`level`: ``out`` without its quantile axis."""
        if out.shape[self.axis] != len(self.levels):
            raise ValueError(f"the model returned {tuple(out.shape)}: axis {self.axis} has {out.shape[self.axis]} "
                             f"entries, not the {len(self.levels)} quantile levels {self.levels}.")
        index = next(i for i, q in enumerate(self.levels) if math.isclose(q, self.level))
        return out.select(self.axis, index)


STATISTICS = ("median", "mean")


@dataclass(frozen=True)
class Ensemble:
    """The model predicts ensemble members (or samples) along ``axis``, reduced by ``statistic``.

    ``"median"`` is numpy's median (the mean of the two middle members for an even count);
    ``"mean"`` the ensemble mean.
    """

    axis: int = 1
    statistic: str = "median"

    def __post_init__(self):
        if self.statistic not in STATISTICS:
            raise ValueError(f"statistic={self.statistic!r}: use one of {STATISTICS}.")

    def reduce(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` reduced over the member axis."""
        if self.statistic == "mean":
            return out.mean(dim=self.axis)
        return torch.quantile(out, 0.5, dim=self.axis)


# --------------------------------------------------------------------------------------------
# A module that is the whole step, with the wrapped model's parameter names
# --------------------------------------------------------------------------------------------

class _SharedNames(nn.Module):
    """An ``nn.Module`` that holds ``model``'s parameters, buffers and submodules under their own names.

    Its ``_parameters``, ``_buffers`` and ``_modules`` *are* the model's dicts, so
    ``named_parameters()``, ``state_dict()`` and ``get_submodule()`` name everything as the model
    does, and a deep copy copies the model once (both refer to the same dicts). ``model`` is a
    plain attribute rather than a submodule, which would prefix every name with ``"model."``; its
    ``training`` flag is this module's. Subclasses write the step in ``forward`` and call
    ``self.model.forward(...)`` (not ``self.model(...)``, which torch.fx cannot trace here).
    """

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"the adapter wraps an nn.Module, got {type(model).__name__}; for a plain function of "
                            "named tensors use tqslite.adapters.FunctionSystem.")
        object.__setattr__(self, "model", model)
        mode = model.training
        super().__init__()  # sets self.training, i.e. model.training: restored below
        for attr in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"):
            object.__setattr__(self, attr, getattr(model, attr))
        model.training = mode

    @property
    def training(self) -> bool:
        return self.model.training

    @training.setter
    def training(self, mode: bool) -> None:
        self.model.training = mode


def _default_call(model: nn.Module, x: torch.Tensor, mask: torch.Tensor | None):
    return model.forward(x) if mask is None else model.forward(x, mask)


class BlockStep(_SharedNames):
    """The step of a :class:`BlockForecaster` as an ``nn.Module`` (its ``.module``): context ``(B, L, *C)`` -> next.

    Its parameters, buffers and submodules are the wrapped model's, under the same names; the
    model itself is the attribute ``model``. Built by :class:`BlockForecaster`, not by hand.
    """

    def __init__(self, model, block_length, normalise, mask, output, call, pad_value):
        super().__init__(model)
        self.block_length, self.normalise, self.mask, self.output = block_length, normalise, mask, output
        self.call, self.pad_value = call or _default_call, float(pad_value)
        self.accepts_missing = mask is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        valid = ~torch.isnan(x)
        if self.normalise is not None:
            loc, scale = self.normalise.stats(x, valid)
            z = (x - loc) / scale
        else:
            z = x
        z = torch.where(valid, z, torch.full_like(z, self.pad_value))
        mask = self.mask.of(valid, z.dtype) if self.mask is not None else None
        out = self.call(self.model, z, mask)
        if self.output is not None:
            out = self.output.reduce(out)
        k = self.block_length
        # (written without tuple(x.shape), which torch.fx cannot trace)
        if out.ndim != x.ndim or out.shape[0] != x.shape[0] or out.shape[1] != k or out.shape[2:] != x.shape[2:]:
            expected = (x.shape[0], k, *x.shape[2:])
            raise ValueError(f"the model's forecast is {tuple(out.shape)} after the output reduction; a block of "
                             f"{k} steps for states {tuple(x.shape)} is {expected}. Check block_length, output="
                             "Quantiles(levels, axis)/Ensemble(axis) and call=.")
        if self.normalise is not None:
            out = out * scale + loc
        return torch.cat([x[:, k:], out.to(x.dtype)], dim=1)


# --------------------------------------------------------------------------------------------
# The block forecaster
# --------------------------------------------------------------------------------------------

class BlockForecaster(TorchSystem):
    """A forecaster that reads a context and predicts the next ``block_length`` steps, as a system.

    The state is the context: ``(B, L)`` for one variable, ``(B, L, C)`` for ``C`` variables,
    with ``L = context_length``, the longest context the model takes. One step

    1. normalises each window (``normalise``: location and scale from the window's valid values);
    2. puts ``pad_value`` where a value is missing (NaN) and builds the validity mask (``mask``);
    3. calls the model: ``call(model, z, mask)``, by default ``model.forward(z)`` or
       ``model.forward(z, mask)``;
    4. reduces quantile or ensemble outputs to one forecast (``output``), ``(B, k, *C)``;
    5. undoes the normalisation and appends the block: ``cat([x[:, k:], block], dim=1)``.

    Everything is torch, so the same code runs on any device, in any dtype, under GPTQ's
    calibration and in the probe.

    **Growing contexts.** With a mask, missing values are NaN in the state and the model never
    sees them: a context shorter than ``L`` is left-padded with NaN (:meth:`states`) and grows
    by ``k`` steps per step until it fills ``L``, after which the oldest values drop out. That
    is what the model's own forecast method does with a short history; a fixed-length window
    (:class:`tqslite.WindowedSystem`) agrees with it only once the context has reached ``L``.
    Gaps inside a context (NaN) are masked the same way, so initial states with missing values
    are accepted (``accepts_missing``); in the probe a value missing from the reference rollout
    counts as no difference.

    Parameters
    ----------
    model : nn.Module
        Maps the (normalised, padded) context ``(B, L, *C)`` -- and the mask, if any -- to a
        block ``(B, k, *C)``, or to a block with a quantile/ensemble axis. Wrapped, not copied:
        the probe swaps its weights and restores them bit for bit.
    context_length : int
        ``L``: the context length the model takes (its maximum, for a growing context).
    block_length : int
        ``k``: steps predicted per call, ``1 <= k <= L``.
    normalise : Normalise, optional
        Per-window normalisation (default: none).
    mask : Mask, optional
        The model takes a validity mask (default: no mask; then states must be complete).
    output : Quantiles or Ensemble, optional
        How the model's output becomes one forecast (default: it already is one).
    call : callable, optional
        ``call(model, z, mask) -> output`` for any other signature (``mask`` is None without
        :class:`Mask`), e.g. ``lambda m, z, mask: m.forward(z.unsqueeze(1), mask.unsqueeze(1))``
        for a convolution that wants ``(B, 1, L)``. Use ``model.forward`` (see the module
        docstring) and a module-level function rather than a lambda if the system must be
        pickled (a process-pool executor in the probe).
    pad_value : float
        What the model sees where a value is missing, after normalisation (default 0).

    Attributes
    ----------
    module : nn.Module
        The whole step as a module, with the wrapped model's parameter names (what GPTQ
        calibrates on system states). :attr:`model` is the wrapped model (in a quantized copy,
        the quantized model).
    accepts_missing : bool
        True with a mask: states may hold NaN.

    Examples
    --------
    >>> system = BlockForecaster(model, context_length=512, block_length=48,   # doctest: +SKIP
    ...                          normalise=Normalise("mean", "std"), mask=Mask(),
    ...                          output=Quantiles((0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)))
    >>> x0 = system.states(contexts)            # (N, 512), NaN-padded on the left   # doctest: +SKIP
    >>> scores = tqslite.probe(system, x0, horizon=8)                               # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, context_length: int, block_length: int, *, normalise: Normalise | None = None,
                 mask: Mask | None = None, output: Quantiles | Ensemble | None = None,
                 call: Callable | None = None, pad_value: float = 0.0):
        for name, value in (("context_length", context_length), ("block_length", block_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: give a positive integer.")
        if block_length > context_length:
            raise ValueError(f"block_length={block_length} is longer than context_length={context_length}: one step "
                             "appends the block to the context and drops as many old values.")
        for name, value, kinds in (("normalise", normalise, (Normalise,)), ("mask", mask, (Mask,)),
                                   ("output", output, (Quantiles, Ensemble))):
            if value is not None and not isinstance(value, kinds):
                raise TypeError(f"{name}={value!r}: give {' or '.join(k.__name__ for k in kinds)}(...) or None.")
        self.context_length, self.block_length = context_length, block_length
        super().__init__(BlockStep(model, block_length, normalise, mask, output, call, pad_value))

    @property
    def model(self) -> nn.Module:
        """The wrapped model (in a quantized copy, the quantized model)."""
        return self.module.model

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """One step: the context ``(B, L, *C)`` with the predicted block appended, ``k`` oldest values dropped."""
        if x.ndim < 2 or x.shape[1] != self.context_length:
            raise ValueError(f"states of {tuple(x.shape)}: a BlockForecaster's state is the context (B, L) or "
                             f"(B, L, C) with L = context_length = {self.context_length}; pad shorter contexts "
                             "with BlockForecaster.states(...).")
        if not self.accepts_missing and torch.isnan(x).any():
            raise ValueError("the states hold missing values (NaN) but the model takes no mask: pass "
                             "mask=Mask(...) if it masks them, or fill the gaps first.")
        return super().step(x)

    def states(self, contexts, dtype=None) -> torch.Tensor:
        """Initial states ``(N, L, *C)`` from contexts of up to ``L`` steps, left-padded with NaN.

        ``contexts`` is an array, tensor or DataArray ``(N, l, *C)`` (time on axis 1), or a
        list of ``N`` arrays ``(l_n, *C)`` of different lengths. Contexts longer than ``L``
        keep their last ``L`` steps, as the model's own forecast method would; shorter ones
        need a mask (the padding is missing data to the model). ``dtype``: the model's by
        default.
        """
        dtype = self.dtype if dtype is None else dtype
        if isinstance(contexts, xr.DataArray):
            contexts = contexts.values
        if isinstance(contexts, (list, tuple)):
            rows = [torch.as_tensor(np.asarray(c) if not torch.is_tensor(c) else c) for c in contexts]
        else:
            arr = torch.as_tensor(np.asarray(contexts) if not torch.is_tensor(contexts) else contexts)
            if arr.ndim < 2:
                raise ValueError(f"contexts of shape {tuple(arr.shape)}: give (N, l) or (N, l, C), or a list of "
                                 "1-D arrays.")
            rows = list(arr)
        if not rows:
            raise ValueError("no contexts given.")
        length = self.context_length
        out = []
        for i, r in enumerate(rows):
            r = r.to(dtype)[-length:]
            if r.shape[0] < length:
                if not self.accepts_missing:
                    raise ValueError(f"context {i} has {r.shape[0]} steps, fewer than context_length={length}, and the "
                                     "model takes no mask to hide the padding: pass mask=Mask(...) or longer contexts.")
                pad = torch.full((length - r.shape[0], *r.shape[1:]), float("nan"), dtype=dtype)
                r = torch.cat([pad, r])
            out.append(r)
        shapes = {tuple(r.shape) for r in out}
        if len(shapes) > 1:
            raise ValueError(f"contexts have different variables: shapes {sorted(shapes)}.")
        return torch.stack(out)

    def forecast_series(self, trajectory) -> torch.Tensor | xr.DataArray:
        """The forecast values of a rollout, block after block: ``(N, T * k, *C)``.

        ``trajectory`` is :func:`tqslite.rollout`'s ``(T, N, L, *C)`` or
        :func:`tqslite.evaluation.forecast`'s DataArray ``(window, lead, L, *C)``; each state's
        newest ``k`` values are the block predicted at that lead. A DataArray comes back with
        dims ``(window, step, ...)``, ``step = 1..T*k``.
        """
        k = self.block_length
        if isinstance(trajectory, xr.DataArray):
            time_dim = trajectory.dims[2]
            new = trajectory.isel({time_dim: slice(-k, None)})
            stacked = new.stack(step=("lead", time_dim)).transpose(trajectory.dims[0], "step", ...)
            return stacked.drop_vars(["step", "lead", time_dim], errors="ignore").assign_coords(
                step=np.arange(1, stacked.sizes["step"] + 1))
        t = torch.as_tensor(trajectory)
        new = t[:, :, -k:]                                     # (T, N, k, *C)
        return new.transpose(0, 1).reshape(t.shape[1], t.shape[0] * k, *t.shape[3:])


# --------------------------------------------------------------------------------------------
# A model with extra inputs per step
# --------------------------------------------------------------------------------------------

def _forced_call(model: nn.Module, x: torch.Tensor, f: torch.Tensor):
    return model.forward(x, f)


class ForcedStep(_SharedNames):
    """The step of a :class:`Forced` system as an ``nn.Module`` (its ``.module``): packed state ``(B, 1 + P)`` -> next.

    Its parameters, buffers and submodules are the wrapped model's, under the same names. Built
    by :class:`Forced`, not by hand.
    """

    def __init__(self, model, forcings, state_shape, offset, call):
        super().__init__(model)
        self.forcings, self.state_shape, self.offset = forcings, tuple(state_shape), int(offset)
        self.call = call or _forced_call

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        n = self.forcings.shape[0]
        t = torch.round(s[:, 0].double() * n).long()           # the time index, exact (see Forced)
        f = self.forcings[(t + self.offset).cpu()].to(device=s.device, dtype=s.dtype)
        x = s[:, 1:].reshape(s.shape[0], *self.state_shape)
        x_next = self.call(self.model, x, f)
        t_next = ((t + 1).double() / n).to(s.dtype).unsqueeze(1)
        return torch.cat([t_next, x_next.reshape(s.shape[0], -1).to(s.dtype)], dim=1)


class Forced(TorchSystem):
    """A model that takes extra inputs per step -- forcings, time features -- read from a dataset.

    ``model(x, f)`` maps the state ``x`` ``(B, *S)`` and the inputs of its time ``f`` ``(B, *F)``
    to the next state. The inputs come from ``forcings`` ``(T, *F)``, one row per time step of
    the dataset; a state at time index ``t`` is stepped with ``forcings[t + offset]``.

    The step needs the time of every window, so the time travels with the state: a state of
    this system is ``(B, 1 + P)``, the time index then the model's state flattened
    (``P = prod(S)``). :meth:`states` packs states and start indices, :meth:`unpack` takes
    them apart. The time is stored as ``t / T``, a number in ``[0, 1]`` of the size of the
    data (stored as ``t`` itself it would dominate the state's RMS and the probe's floor), and
    read back exactly by rounding ``t / T * T``. It is the same in every rollout from the same
    initial state, so it adds no divergence, but it counts as one element of the state:
    divergences are RMS over ``1 + P`` elements, a factor ``sqrt(P / (1 + P))`` on every unit
    alike (scores shift by the same constant, rankings and plans do not change).

    Parameters
    ----------
    model : nn.Module
        ``model.forward(x, f) -> x_next``, ``(B, *S)``.
    forcings : Tensor, ndarray or DataArray, ``(T, *F)``
        The extra inputs, time first (a DataArray's first dim is its time axis).
    state_shape : tuple of int
        ``S``, the model's state shape without the batch axis.
    offset : int
        The step from time ``t`` reads ``forcings[t + offset]`` (0: the inputs at the state's
        time; 1: at the target time, as models fed the next step's forcing).
    call : callable, optional
        ``call(model, x, f) -> x_next`` for another signature (default ``model.forward(x, f)``).
    """

    def __init__(self, model: nn.Module, forcings, state_shape: Sequence[int], *, offset: int = 0,
                 call: Callable | None = None):
        if isinstance(forcings, xr.DataArray):
            forcings = forcings.values
        forcings = torch.as_tensor(np.asarray(forcings) if not torch.is_tensor(forcings) else forcings)
        if forcings.ndim < 1 or forcings.shape[0] < 1:
            raise ValueError(f"forcings of shape {tuple(forcings.shape)}: give (T, *F) with the time axis first.")
        dtype = next(iter(model.parameters()), torch.zeros(())).dtype if isinstance(model, nn.Module) else None
        if dtype is not None and dtype.is_floating_point and torch.finfo(dtype).eps * forcings.shape[0] > 0.25:
            raise ValueError(f"{forcings.shape[0]} time steps cannot be stored exactly in a {dtype} state (the time "
                             "index travels as t / T); use float32 or float64, or a shorter forcing record.")
        super().__init__(ForcedStep(model, forcings.detach().cpu(), state_shape, offset, call))

    @property
    def model(self) -> nn.Module:
        """The wrapped model."""
        return self.module.model

    @property
    def forcings(self) -> torch.Tensor:
        """The extra inputs ``(T, *F)``."""
        return self.module.forcings

    def states(self, x, start, dtype=None) -> torch.Tensor:
        """Packed states ``(B, 1 + P)`` from model states ``x`` ``(B, *S)`` at time indices ``start`` ``(B,)``."""
        dtype = self.dtype if dtype is None else dtype
        if isinstance(x, xr.DataArray):
            x = x.values
        x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).to(dtype)
        if tuple(x.shape[1:]) != self.module.state_shape:
            raise ValueError(f"states of {tuple(x.shape)}: expected (B, *{self.module.state_shape}).")
        start = torch.as_tensor(np.asarray(start), dtype=torch.int64).reshape(-1)
        if start.shape[0] != x.shape[0]:
            raise ValueError(f"{start.shape[0]} start indices for {x.shape[0]} states.")
        n = self.forcings.shape[0]
        if (start < 0).any() or (start + self.module.offset >= n).any():
            raise ValueError(f"start indices must lie in 0..{n - 1 - self.module.offset} "
                             f"(the forcings have {n} steps).")
        return torch.cat([(start.double() / n).to(dtype).unsqueeze(1), x.reshape(x.shape[0], -1)], dim=1)

    def unpack(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x (..., *S), t (...,))``: the model states and time indices of packed states ``(..., 1 + P)``."""
        s = torch.as_tensor(s)
        n = self.forcings.shape[0]
        t = torch.round(s[..., 0].double() * n).long()
        return s[..., 1:].reshape(*s.shape[:-1], *self.module.state_shape), t

    def step(self, s: torch.Tensor) -> torch.Tensor:
        """One step of packed states ``(B, 1 + P)``; ``ValueError`` past the end of the forcings."""
        n = self.forcings.shape[0]
        t = torch.round(s[:, 0].double() * n).long()
        if (t + self.module.offset >= n).any() or (t < 0).any():
            raise ValueError(f"a rollout reached time index {int(t.max())}, beyond the forcings' {n} steps (offset "
                             f"{self.module.offset}); start earlier or roll out fewer steps.")
        return super().step(s)


# --------------------------------------------------------------------------------------------
# A function of named tensors
# --------------------------------------------------------------------------------------------

class FunctionSystem:
    """A model that is only a function ``step(params, state) -> next state`` of named tensors.

    Parameters
    ----------
    step : callable
        ``step(params, x)`` with ``params`` a dict ``{name: Tensor}`` and ``x`` ``(B, *S)``;
        returns the next states ``(B, *S)``.
    params : dict of str to Tensor
        The named parameters. The system keeps its own dict: swapping a parameter (the probe,
        a quantized copy) replaces the entry and never writes into your tensors.
    channel_axis : int or dict of str to int
        The output-channel axis of every tensor (int) or per name (others: 0). A weight used as
        ``x @ w`` with ``w`` of shape ``(in, out)`` has its output channels on axis 1.

    Notes
    -----
    RTN and MSE-clip quantize it; GPTQ, which needs layers to feed calibration inputs through,
    does not (it says so). The parameter names are the dict's keys, so units can be grouped by
    dotted prefixes (``"enc.w"``, ``"enc.b"``: block ``"enc"``).
    """

    accepts_missing = False

    def __init__(self, step: Callable, params: Mapping[str, torch.Tensor], channel_axis: int | Mapping = 0):
        if not callable(step):
            raise TypeError(f"step must be a function step(params, x), got {type(step).__name__}.")
        if not params:
            raise ValueError("params is empty: a FunctionSystem needs at least one named tensor to quantize.")
        bad = [n for n, p in params.items() if not (torch.is_tensor(p) and p.is_floating_point())]
        if bad:
            raise TypeError(f"params {bad[:5]} are not floating-point tensors.")
        self.function = step
        self.params = {str(n): p.detach() for n, p in params.items()}
        self._axes = dict(channel_axis) if isinstance(channel_axis, Mapping) else {}
        self._default_axis = 0 if isinstance(channel_axis, Mapping) else int(channel_axis)
        unknown = [n for n in self._axes if n not in self.params]
        if unknown:
            raise ValueError(f"channel_axis names unknown parameters {unknown}.")

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """One step, ``step(params, x)``, without gradients."""
        with torch.no_grad():
            return self.function(self.params, x)

    def parameter_names(self) -> list[str]:
        """The dict's keys, in its order."""
        return list(self.params)

    def get_parameter(self, name: str) -> torch.Tensor:
        """The current tensor of ``name``."""
        return self.params[name]

    def set_parameter(self, name: str, value: torch.Tensor) -> None:
        """Replace ``name`` by a copy of ``value`` (same shape; cast to the parameter's dtype)."""
        old = self.params[name]
        if tuple(value.shape) != tuple(old.shape):
            raise ValueError(f"parameter {name!r} has shape {tuple(old.shape)}, got {tuple(value.shape)}.")
        self.params[name] = value.detach().to(dtype=old.dtype, device=old.device).clone()

    def channel_axis(self, name: str) -> int:
        """The output-channel axis of ``name`` (from ``channel_axis``)."""
        return self._axes.get(name, self._default_axis)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the first parameter."""
        return next(iter(self.params.values())).dtype

    @contextlib.contextmanager
    def evaluating(self):
        """Nothing to switch: a function has no training mode."""
        yield self


__all__ = ["BlockForecaster", "BlockStep", "Ensemble", "Forced", "ForcedStep", "FunctionSystem", "Mask", "Normalise",
           "Quantiles"]
