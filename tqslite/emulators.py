"""Small learned emulators of the reference systems, for the theory chapters.

A trained emulator is a dynamical system of its own: ``x[t+1] = F_theta(x[t])`` with ``theta``
learned from a trajectory of the true system. It has the shape of the case-study forecasters in
miniature -- an input projection, a stack of residual blocks, an output projection -- so its
units mean the same thing, and it trains in seconds on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """A residual MLP block: ``h + W2 gelu(W1 layernorm(h))``."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, h):
        return h + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(h))))


class Emulator(nn.Module):
    """One-step emulator ``(B, D) -> (B, D)``: normalise, project in, residual blocks, project out.

    The network predicts the normalised increment ``(x[t+1] - x[t] - inc_mean) / inc_std``; the
    statistics are buffers (not parameters), so the probe perturbs only learned weights.
    Module names: ``input_proj``, ``blocks.0`` ... ``blocks.{depth-1}``, ``output_proj``.
    """

    def __init__(self, dim: int, width: int = 64, depth: int = 2):
        super().__init__()
        self.input_proj = nn.Linear(dim, width)
        self.blocks = nn.ModuleList([Block(width) for _ in range(depth)])
        self.output_proj = nn.Linear(width, dim)
        for name in ("x_mean", "x_std", "inc_mean", "inc_std"):
            self.register_buffer(name, torch.zeros(dim) if "mean" in name else torch.ones(dim))

    def forward(self, x):
        h = self.input_proj((x - self.x_mean) / self.x_std)
        for block in self.blocks:
            h = block(h)
        return x + self.output_proj(h) * self.inc_std + self.inc_mean


def fit_emulator(trajectory: torch.Tensor, width: int = 64, depth: int = 2, steps: int = 2000,
                 batch_size: int = 256, lr: float = 3e-3, seed: int = 0) -> tuple[Emulator, list[float]]:
    """Train an :class:`Emulator` on consecutive pairs of one trajectory or of several.

    Parameters
    ----------
    trajectory : Tensor, shape ``(n, D)`` or ``(n, B, D)``
        States ``x_0 .. x_{n-1}`` of the true system at equal time steps; with a middle dim,
        ``B`` trajectories of the same length, whose pairs are pooled (a pair never spans two
        trajectories).
    width, depth : int
        Hidden width and number of residual blocks.
    steps, batch_size, lr : int, int, float
        Adam steps, pairs per step, learning rate (cosine-decayed to zero).
    seed : int
        Seeds the initialisation and the batches: the same call gives the same emulator.

    Returns
    -------
    (Emulator, list of float)
        The trained emulator (float32, eval mode) and its training loss every 100 steps
        (mean squared error of the normalised increment).
    """
    x = torch.as_tensor(trajectory, dtype=torch.float32)
    if x.ndim not in (2, 3) or len(x) < 2:
        raise ValueError(f"trajectory must be (n, D) or (n, B, D) with n >= 2 steps, got shape {tuple(x.shape)}.")
    if x.ndim == 2:
        x = x[:, None]
    dim = x.shape[-1]
    inputs, increments = x[:-1].reshape(-1, dim), (x[1:] - x[:-1]).reshape(-1, dim)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Emulator(dim, width, depth)
    model.x_mean.copy_(inputs.mean(0))
    model.x_std.copy_(inputs.std(0))
    model.inc_mean.copy_(increments.mean(0))
    model.inc_std.copy_(increments.std(0))
    target = (increments - model.inc_mean) / model.inc_std
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(inputs), (batch_size,), generator=g)
        pred = (model(inputs[idx]) - inputs[idx] - model.inc_mean) / model.inc_std
        loss = torch.nn.functional.mse_loss(pred, target[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            losses.append(loss.item())
    return model.eval(), losses
