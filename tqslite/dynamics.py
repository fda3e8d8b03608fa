"""Lyapunov exponents of a discrete-time map ``x[t+1] = step(x[t])`` by the QR method.

The classic algorithm (Benettin et al. 1980; Shimada & Nagashima 1979): carry an orthonormal
frame ``Q`` (D x k) along the trajectory, push it through each step's Jacobian ``J_t`` and
re-orthonormalise, ``J_t Q_t = Q_{t+1} R_t``. The growth of the i-th direction over one step is
``|R_t[i, i]|``, so the i-th exponent is the time average of ``log |R_t[i, i]|`` per unit time.

For speed the trajectory is computed first and all its Jacobians in batched ``torch.func`` calls
(``vmap`` of ``jacfwd`` over states); only the cheap k x k QR recursion runs step by step.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.func import jacfwd, vmap


def trajectory(step, x0, n: int) -> torch.Tensor:
    """States ``x_0 .. x_{n-1}`` of the map, shape ``(n, D)``, in ``x0``'s dtype."""
    x = torch.as_tensor(x0)
    if x.ndim != 1:
        raise ValueError(f"step maps one state of shape (D,); got x0 of shape {tuple(x.shape)}.")
    out = torch.empty((n, x.shape[0]), dtype=x.dtype)
    with torch.no_grad():
        for t in range(n):
            out[t] = x
            x = step(x)
    if not torch.isfinite(out).all():
        raise ValueError("the trajectory turned non-finite; use a smaller step or a state on the attractor.")
    return out


def jacobians(step, states: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Jacobians ``d step / d x`` at each state: ``(n, D, D)``, in batched ``vmap(jacfwd)`` calls.

    ``chunk`` states go into one call (default: about 4M Jacobian entries per call).
    """
    D = states.shape[1]
    chunk = chunk or int(np.clip(2**22 // (D * D), 256, 65536))
    jac = vmap(jacfwd(step))
    return torch.cat([jac(states[i:i + chunk]).detach() for i in range(0, len(states), chunk)])


def _log_growth(step, x0, n_steps: int, k: int | None, transient: int) -> np.ndarray:
    """``log |R_t[i, i]|`` for the ``n_steps`` steps after ``transient``: shape ``(n_steps, k)``."""
    if n_steps < 1 or transient < 0:
        raise ValueError(f"need n_steps >= 1 and transient >= 0, got {n_steps} and {transient}.")
    states = trajectory(step, x0, transient + n_steps)
    D = states.shape[1]
    k = D if k is None else int(k)
    if not 1 <= k <= D:
        raise ValueError(f"k={k}: ask for between 1 and D={D} exponents.")
    q = np.eye(D, k)
    out = np.empty((n_steps, k))
    block = 65536  # bounds the memory of Jacobians held at once
    for i0 in range(0, transient + n_steps, block):
        J = jacobians(step, states[i0:i0 + block]).double().numpy()
        for j, Jt in enumerate(J):
            q, r = np.linalg.qr(Jt @ q)
            t = i0 + j - transient
            if t >= 0:
                out[t] = np.log(np.abs(np.diag(r)))
    return out


def lyapunov_spectrum(step, x0, n_steps: int, dt: float = 1.0, k: int | None = None,
                      transient: int = 0) -> np.ndarray:
    """The ``k`` leading Lyapunov exponents per unit time, descending (float64).

    Parameters
    ----------
    step : callable
        Maps a state ``(D,)`` to the next state ``(D,)``; must be ``torch.func``-traceable
        (an ``nn.Module`` or a function of torch ops).
    x0 : Tensor, shape ``(D,)``
        Initial state; use float64 for reference values.
    n_steps : int
        Steps averaged over.
    dt : float
        Time per step, so that exponents come out per unit time (1.0: per step).
    k : int, optional
        Number of exponents (default: all ``D``).
    transient : int
        Steps run first, during which the frame evolves but nothing is averaged.

    Returns
    -------
    numpy.ndarray, shape ``(k,)``
    """
    growth = _log_growth(step, x0, n_steps, k, transient)
    return np.sort(growth.sum(axis=0) / (n_steps * dt))[::-1]


def finite_time_lyapunov(step, x0, n_steps: int, window: int, dt: float = 1.0, k: int = 1,
                         transient: int = 0) -> np.ndarray:
    """Finite-time exponents along one trajectory: ``(n_steps // window, k)``, per unit time.

    Row ``w`` is the growth rate over steps ``[w * window, (w + 1) * window)`` after the
    transient; their mean is the (``n_steps``-step) Lyapunov exponent and their spread shows how
    predictability varies along the attractor.
    """
    if window < 1:
        raise ValueError(f"window={window}: must be at least 1 step.")
    growth = _log_growth(step, x0, n_steps, k, transient)
    n_win = n_steps // window
    return growth[: n_win * window].reshape(n_win, window, -1).sum(axis=1) / (window * dt)
