"""Systems: the state-to-state protocol every probe and evaluation runs on (SPEC section 2).

A *system* maps a batch of states ``x`` of shape ``(B, *S)`` to the next states, same shape,
and owns a set of named parameter tensors that can be swapped and restored exactly:

* :class:`TorchSystem` adapts an ``nn.Module`` whose forward is that map;
* :class:`WindowedSystem` adapts a model that reads a fixed-length history window ``(B, k, *F)``
  and predicts the next frame(s): the *state is the window*, so the map stays state-to-state;
* :class:`Lorenz63` and :class:`Lorenz96` are reference chaotic systems (RK4), written as
  ``nn.Module`` s whose physical constants are parameters, so they can be probed too.

Any other object with the same methods (``step``, ``parameter_names``, ``get_parameter``,
``set_parameter``, ``channel_axis``, ``evaluating``) is a system too; the ONNX adapter is one,
and :mod:`tqslite.adapters` has the common shapes of real forecasters (a block forecaster with
its own normalisation, masks and quantiles; a model with extra inputs per step; a plain
function of named tensors). A system that sets ``accepts_missing = True`` takes states with
missing values (NaN) and masks them itself; the probe then lets NaN through in initial states.
A system that also has ``functional_step(params, x)`` -- one step with some parameters replaced
by the tensors in ``params``, without touching the model -- can be run as many perturbed copies in
one batched pass (:mod:`tqslite.batched`); :class:`TorchSystem` and :class:`WindowedSystem` have it.

:func:`rollout` checks on the first step that a state maps to a state of the same shape and
dtype, and says what was returned instead and which adapter fits.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.func import functional_call


class TorchSystem:
    """A torch ``nn.Module`` seen as a discrete-time map ``x[t+1] = module(x[t])``.

    Parameters
    ----------
    module : nn.Module
        Maps states ``(B, *S)`` to next states ``(B, *S)``. It is used as it is (not copied):
        the probe swaps its weights in place and always restores them bit for bit.
    """

    def __init__(self, module: nn.Module):
        if not isinstance(module, nn.Module):
            raise TypeError(f"TorchSystem wraps an nn.Module, got {type(module).__name__}.")
        self.module = module
        #: Whether states may hold missing values (NaN) that the model masks: the module's own
        #: ``accepts_missing`` attribute if it has one (see :mod:`tqslite.adapters`), else False.
        self.accepts_missing = bool(getattr(module, "accepts_missing", False))
        self._params = dict(module.named_parameters())
        # Transposed convolutions keep their output channels on axis 1 of the weight.
        self._axis1 = {f"{m_name}.weight" if m_name else "weight" for m_name, m in module.named_modules()
                       if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))}

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """One step: ``(B, *S) -> (B, *S)``, without gradients."""
        with torch.no_grad():
            return self.module(x)

    def functional_step(self, params: dict, x: torch.Tensor) -> torch.Tensor:
        """One step with the parameters in ``params`` (``{name: tensor}``) in place of the module's own.

        The module is not modified (``torch.func.functional_call``); parameters not in ``params``
        are the module's. This is what :func:`torch.vmap` maps over to run many perturbed copies
        of the model at once.
        """
        with torch.no_grad():
            return functional_call(self.module, params, (x,))

    def parameter_names(self) -> list[str]:
        """Names of the swappable parameters, in model order."""
        return list(self._params)

    def get_parameter(self, name: str) -> torch.Tensor:
        """The live parameter tensor (detached; do not modify it, use :meth:`set_parameter`)."""
        return self._params[name].detach()

    def set_parameter(self, name: str, value: torch.Tensor) -> None:
        """Copy ``value`` into parameter ``name`` (same shape; cast to its dtype)."""
        with torch.no_grad():
            self._params[name].copy_(value)

    def channel_axis(self, name: str) -> int:
        """The output-channel axis of parameter ``name``: 0 for torch ``Linear``/``Conv``, 1 for ``ConvTranspose``."""
        return 1 if name in self._axis1 else 0

    @property
    def dtype(self) -> torch.dtype:
        """The dtype rollouts run in (that of the first parameter)."""
        return next(iter(self._params.values())).dtype if self._params else torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        """The device rollouts run on (that of the first parameter; the CPU for a module without any)."""
        return next(iter(self._params.values())).device if self._params else torch.device("cpu")

    @contextlib.contextmanager
    def evaluating(self):
        """Run in eval mode (no dropout), then give every submodule back its own training flag."""
        flags = {m: m.training for m in self.module.modules()}
        self.module.eval()
        try:
            yield self
        finally:
            for m, flag in flags.items():
                m.training = flag


class WindowedSystem(TorchSystem):
    """A history-window model made state-to-state: the state is the window itself.

    ``module`` reads a window ``(B, k, *F)`` and predicts either the next frame ``(B, *F)`` or
    the next ``m`` frames ``(B, m, *F)`` (a patch, for a patch-based series model). One step
    drops the oldest ``m`` frames and appends the prediction, so the state keeps shape
    ``(B, k, *F)``; for a univariate context ``(B, L)`` with a patch output ``(B, m)`` this is
    "append each predicted patch to the context".

    What it assumes: the model reads exactly ``k`` frames, every one of them valid, and its
    forward is the whole forecast (no normalisation, masking or choice among outputs outside
    the module). A model that accepts a *growing* context up to a maximum length, with a mask,
    agrees with this wrapper only once its context has reached that maximum: with a shorter
    window it would have seen more history. For such models, and for those whose forecast
    method normalises each window, pads it with a validity mask or predicts quantiles, use
    :class:`tqslite.adapters.BlockForecaster`.
    """

    def step(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._append(x, self.module(x))

    def functional_step(self, params: dict, x: torch.Tensor) -> torch.Tensor:
        """:meth:`step` with the parameters in ``params`` in place of the module's own."""
        with torch.no_grad():
            return self._append(x, functional_call(self.module, params, (x,)))

    @staticmethod
    def _append(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The next window: ``x`` without its oldest ``m`` frames, then the ``m`` predicted ones."""
        if out.ndim == x.ndim - 1:
            out = out.unsqueeze(1)
        m = out.shape[1]
        if m > x.shape[1] or out.shape[2:] != x.shape[2:]:
            raise ValueError(f"windowed model returned {tuple(out.shape)} for a window {tuple(x.shape)}; "
                             "expected (B, *F) or (B, m, *F) with m <= k.")
        return torch.cat([x[:, m:], out.to(x.dtype)], dim=1)


def as_system(model):
    """Return ``model`` as a system: an ``nn.Module`` is wrapped in :class:`TorchSystem`."""
    if isinstance(model, nn.Module):
        return TorchSystem(model)
    needed = ("step", "parameter_names", "get_parameter", "set_parameter", "channel_axis", "evaluating")
    missing = [m for m in needed if not hasattr(model, m)]
    if missing:
        raise TypeError(f"{type(model).__name__} is not a system: it lacks {missing}. Pass an nn.Module whose forward "
                        "maps a state to the next state, or wrap the model in an adapter: tqslite.WindowedSystem "
                        "(a fixed history window), tqslite.adapters.BlockForecaster (a context in, a block of "
                        "steps out, with its own normalisation, masks or quantiles), tqslite.adapters.Forced "
                        "(extra inputs per step) or tqslite.adapters.FunctionSystem (a function step(params, state)).")
    return model


def device_of(system) -> torch.device:
    """The device a system computes on: its ``device`` attribute, else its first parameter's (else the CPU)."""
    device = getattr(system, "device", None)
    if device is not None:
        return torch.device(device)
    names = system.parameter_names()
    return system.get_parameter(names[0]).device if names else torch.device("cpu")


@contextlib.contextmanager
def swapped(system, values: dict):
    """Temporarily replace parameters ``{name: tensor}``; restore the originals exactly on exit."""
    saved = {name: system.get_parameter(name).clone() for name in values}
    try:
        for name, value in values.items():
            system.set_parameter(name, value)
        yield system
    finally:
        for name, value in saved.items():
            system.set_parameter(name, value)


def rollout(system, x0: torch.Tensor, steps: int, batch_size: int | None = None) -> torch.Tensor:
    """Roll ``system`` (or an ``nn.Module``) out from ``x0`` ``(B, *S)``: ``(steps, B, *S)``, t = 1..steps.

    ``batch_size`` windows go through each forward call (default: all ``B`` at once). The first
    step is checked (:func:`check_step`): a step that does not return a state of the same shape
    and dtype is refused with a message that names the adapter that fits.
    """
    system = as_system(system)
    batch_size = batch_size or len(x0)
    out = None
    for i in range(0, len(x0), batch_size):
        x = x0[i:i + batch_size]
        for t in range(steps):
            x_next = system.step(x)
            if out is None:  # the first step only: the check is cheap, and later steps are the same map
                check_step(x, x_next, system)
                out = torch.empty((steps, len(x0), *x_next.shape[1:]), dtype=x_next.dtype, device=x_next.device)
            out[t, i:i + batch_size] = x = x_next
    return out if out is not None else torch.empty((0, *x0.shape), dtype=x0.dtype, device=x0.device)


def check_step(x: torch.Tensor, x_next, system=None) -> None:
    """``ValueError`` unless one step mapped the states ``x`` ``(B, *S)`` to states of the same shape and dtype.

    The message says what came back and which adapter of :mod:`tqslite.adapters` fits: a block
    of steps ``(B, k)`` for a context ``(B, L)`` is a block forecaster, an extra trailing axis a
    quantile or ensemble head, a tuple a model with several outputs.
    """
    name = type(getattr(system, "module", system)).__name__ if system is not None else "the step"
    state = tuple(x.shape)
    if not torch.is_tensor(x_next):
        raise ValueError(f"{name} returned a {type(x_next).__name__} for a state {state}; a step returns one tensor, "
                         "the next state. Pick the forecast out of its outputs with "
                         "tqslite.adapters.BlockForecaster(model, ..., call=...) or write the step as a function "
                         "(tqslite.adapters.FunctionSystem).")
    got = tuple(x_next.shape)
    if got == state and x_next.dtype == x.dtype:
        return
    if got == state:
        raise ValueError(f"{name} returned {str(x_next.dtype).removeprefix('torch.')} states for "
                         f"{str(x.dtype).removeprefix('torch.')} ones; a step keeps the state's dtype: cast the "
                         "model (model.to(dtype)) or the initial states to the same dtype.")
    hint = "a step maps a state (B, *S) to the next state of the same shape; see tqslite.adapters for wrappers."
    if len(got) >= 2 and len(state) >= 2 and got[0] == state[0] and got[1] < state[1]:
        k, length = got[1], state[1]
        if got[2:] == state[2:]:
            hint = (f"a block forecaster (a context of {length} steps in, {k} steps out)? Wrap it in "
                    f"tqslite.adapters.BlockForecaster(model, context_length={length}, block_length={k}).")
        elif got[2:-1] == state[2:] or len(got) == len(state) + 1:
            hint = (f"a block forecaster with {got[-1]} outputs per step (quantiles or ensemble members)? Wrap it "
                    f"in tqslite.adapters.BlockForecaster(model, context_length={length}, block_length={k}, "
                    "output=Quantiles(levels) or Ensemble(axis)).")
    raise ValueError(f"{name} returned {got} for a state {state}: {hint}")


# --------------------------------------------------------------------------------------------
# Reference chaotic systems
# --------------------------------------------------------------------------------------------

def _rk4(f, x, dt):
    k1 = f(x)
    k2 = f(x + 0.5 * dt * k1)
    k3 = f(x + 0.5 * dt * k2)
    k4 = f(x + dt * k3)
    return x + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)


class Lorenz63(nn.Module):
    """Lorenz (1963): ``x' = sigma (y - x)``, ``y' = x (rho - z) - y``, ``z' = x y - beta z``.

    One forward call is one RK4 step of ``dt`` (model time units) on states ``(..., 3)``.
    ``sigma``, ``rho`` and ``beta`` are parameters, so the probe can perturb them.
    The classic values give exponents about (0.906, 0, -14.57) summing to ``-(sigma + 1 + beta)``.
    """

    def __init__(self, sigma=10.0, rho=28.0, beta=8.0 / 3.0, dt=0.01, dtype=torch.float64):
        super().__init__()
        self.sigma = nn.Parameter(torch.tensor(sigma, dtype=dtype), requires_grad=False)
        self.rho = nn.Parameter(torch.tensor(rho, dtype=dtype), requires_grad=False)
        self.beta = nn.Parameter(torch.tensor(beta, dtype=dtype), requires_grad=False)
        self.dt = dt

    def tendency(self, s: torch.Tensor) -> torch.Tensor:
        x, y, z = s[..., 0], s[..., 1], s[..., 2]
        return torch.stack([self.sigma * (y - x), x * (self.rho - z) - y, x * y - self.beta * z], dim=-1)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return _rk4(self.tendency, s, self.dt)


class Lorenz96(nn.Module):
    """Lorenz (1996): ``x_i' = (x_{i+1} - x_{i-2}) x_{i-1} - x_i + F`` on a ring of ``n`` sites.

    One forward call is one RK4 step of ``dt`` (0.05 is about 6 hours) on states ``(..., n)``.
    The forcing ``F`` is a parameter. With n = 40 and F = 8 the leading exponent is about 1.7.
    """

    def __init__(self, n=40, forcing=8.0, dt=0.05, dtype=torch.float64):
        super().__init__()
        self.n = n
        self.forcing = nn.Parameter(torch.tensor(forcing, dtype=dtype), requires_grad=False)
        self.dt = dt

    def tendency(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.roll(x, -1, -1) - torch.roll(x, 2, -1)) * torch.roll(x, 1, -1) - x + self.forcing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rk4(self.tendency, x, self.dt)
