"""``lorenz96_emulator``: a learned emulator of the chaotic Lorenz-96 system, with an exact truth.

The three stand-ins learn from data whose dynamics nobody can write down; this fourth model
learns a system that is known exactly, so its forecasts can be verified against the exact
integration and its errors grow at a known rate. :class:`tqslite.systems.Lorenz96` with
``n = 40`` sites, forcing ``F = 8`` and an RK4 step of ``dt = 0.05`` (about 6 hours of
atmospheric time) is chaotic with a leading Lyapunov exponent of about 1.7 per time unit
(Lorenz and Emanuel, 1998): a small error doubles in about 0.4 time units, 8 steps.

The model is :class:`tqslite.emulators.Emulator` (input projection, residual MLP blocks, output
projection; the normalised one-step increment is learned), trained by :mod:`tqslite.train` on
states normalised by the training period's mean and standard deviation (one of each: the sites
are statistically alike). **Data** are generated, not shipped: each run starts from
``F + 0.01 * N(0, I)`` drawn with its seed, is spun up for ``spinup`` steps onto the attractor,
then recorded -- the training run (its first ``train`` steps train, the next ``validation``
steps validate) and an independent held-out run from another seed. The exact integration of
the held-out run is the truth.
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from ..emulators import Emulator

NAME = "lorenz96_emulator"
DATASET = "lorenz96"
LAYOUT = "vector"
VARIABLES = ("x",)
#: The true system.
SYSTEM = dict(n=40, forcing=8.0, dt=0.05)
#: The generated runs: steps of spin-up, of training, validation and held-out data; seeds.
DATA = dict(spinup=2000, train=20000, validation=4000, heldout=4000, seed_train=1, seed_heldout=2)
ARCH = dict(dim=40, width=128, depth=2)
#: Training hyper-parameters (read by :mod:`tqslite.train`): one step at first, then the loss
#: of 2- and 4-step rollouts, as for the grid models. One thread: bit-reproducible.
TRAIN = dict(seed=0, steps=3000, batch_size=128, lr=2e-3, weight_decay=1e-5, warmup=100,
             rollout_schedule=((0.0, 1), (0.5, 2), (0.8, 4)), log_every=50, threads=1)


def build(arch: dict | None = None) -> Emulator:
    """A freshly initialised emulator (default :data:`ARCH`; seed torch first)."""
    return Emulator(**{**ARCH, **(arch or {})})


def setup(model: Emulator, train: np.ndarray) -> None:
    """Set the emulator's normalisation buffers from the training states ``(time, n)`` (before training).

    The states are already normalised, so ``x_mean``/``x_std`` stay 0 and 1; the increment
    statistics make the network's target of order one.
    """
    inc = torch.from_numpy(np.diff(train, axis=0))
    with torch.no_grad():
        model.inc_mean.copy_(inc.mean(0))
        model.inc_std.copy_(inc.std(0))


def simulate(seed: int, steps: int, spinup: int | None = None) -> np.ndarray:
    """An exact Lorenz-96 run (float64 RK4): ``steps`` states after ``spinup`` steps, shape ``(steps, n)``."""
    from ..systems import Lorenz96
    spinup = DATA["spinup"] if spinup is None else spinup
    system = Lorenz96(SYSTEM["n"], SYSTEM["forcing"], SYSTEM["dt"])
    g = torch.Generator().manual_seed(int(seed))
    x = SYSTEM["forcing"] + 0.01 * torch.randn(1, SYSTEM["n"], generator=g, dtype=torch.float64)
    out = np.empty((steps, SYSTEM["n"]))
    with torch.no_grad():
        for t in range(spinup + steps):
            if t >= spinup:
                out[t - spinup] = x[0].numpy()
            x = system(x)
    return out


def runs() -> dict:
    """The generated data, in physical units: ``{"train", "validation", "heldout"}`` DataArrays ``(time, site)``.

    ``time`` counts model steps from the start of each recorded run.
    """
    main = simulate(DATA["seed_train"], DATA["train"] + DATA["validation"])
    held = simulate(DATA["seed_heldout"], DATA["heldout"])
    n_tr = DATA["train"]

    def da(values, start):
        return xr.DataArray(values, dims=("time", "site"),
                            coords={"time": np.arange(start, start + len(values)), "site": np.arange(SYSTEM["n"])})

    return {"train": da(main[:n_tr], 0), "validation": da(main[n_tr:], n_tr), "heldout": da(held, 0)}
