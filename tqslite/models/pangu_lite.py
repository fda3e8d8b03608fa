"""``pangu_lite``: a small Pangu-Weather-like patch transformer on the lat-lon grid.

Pangu-Weather cuts the globe into patches, embeds each patch as a token, mixes tokens with
(windowed, Earth-specific) transformer blocks and maps tokens back to grid-point fields. This
stand-in keeps that skeleton at toy size, on the Held--Suarez T21 grid:

* ``patch_embed``: ``Conv2d(C, d, kernel=patch, stride=patch)``: ``(B, C, 32, 64) -> (B, d, 8, 16)``,
  flattened to 128 tokens ``(B, 128, d)``;
* ``pos_embed``: a learned positional embedding ``(1, 128, d)`` (the model's only notion of
  where a patch sits: latitude matters for the dynamics);
* ``blocks.0`` ... ``blocks.{depth-1}``: pre-norm transformer blocks with global attention over
  the 128 patch tokens (Pangu's windows are not needed at 128 tokens);
* ``norm``: a final ``LayerNorm``;
* ``patch_recovery``: ``Linear(d, C * ph * pw)`` per token, then a pixel-shuffle back to the
  grid ``(B, C, 32, 64)``: the increment ``delta``.

``forward(x)`` returns ``x + delta``: the state 6 hours later, in normalised units (each
variable minus its training mean, divided by its training standard deviation). Every variable
is a channel. This is the model that is exported to ONNX and probed as a black box.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import TransformerBlock

NAME = "pangu_lite"
DATASET = "held_suarez"
LAYOUT = "grid"
#: The state's channels, in order.
VARIABLES = ("z500", "t850", "u250", "v250", "u850", "v850", "ps")
#: Architecture hyper-parameters (what :func:`build` takes).
ARCH = dict(channels=len(VARIABLES), grid=(32, 64), patch=(4, 4), dim=64, depth=3, heads=4, mlp_ratio=2.0)
#: Training hyper-parameters (read by :mod:`tqslite.train`). One thread: on a shared 2-core
#: machine it is faster than two, and the run is bit-reproducible on the same machine.
TRAIN = dict(seed=0, steps=1800, batch_size=16, lr=2e-3, weight_decay=1e-4, warmup=100,
             rollout_schedule=((0.0, 1), (0.6, 2), (0.85, 4)), log_every=20, threads=1)


class PanguLite(nn.Module):
    """Patch embedding -> transformer blocks over patch tokens -> patch recovery, residual.

    Parameters
    ----------
    channels : int
        Number of variables ``C`` in the state.
    grid : (int, int)
        ``(n_lat, n_lon)``; each must be a multiple of the patch size.
    patch : (int, int)
        Patch size ``(ph, pw)`` in grid points.
    dim, depth, heads, mlp_ratio
        Token width, number of blocks, attention heads, MLP width / ``dim``.
    """

    def __init__(self, channels=7, grid=(32, 64), patch=(4, 4), dim=64, depth=3, heads=4, mlp_ratio=2.0):
        super().__init__()
        (nl, nx), (ph, pw) = grid, patch
        if nl % ph or nx % pw:
            raise ValueError(f"grid {grid} is not a multiple of the patch size {patch}.")
        self.channels, self.grid, self.patch = channels, (nl, nx), (ph, pw)
        self.tokens = (nl // ph, nx // pw)
        self.patch_embed = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, self.tokens[0] * self.tokens[1], dim))
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.patch_recovery = nn.Linear(dim, channels * ph * pw)
        with torch.no_grad():  # start close to persistence: a small first increment
            self.patch_recovery.weight.mul_(0.1)
            self.patch_recovery.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, n_lat, n_lon) -> (B, C, n_lat, n_lon)``: the next normalised state."""
        (h, w), (ph, pw), c = self.tokens, self.patch, self.channels
        t = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed   # (B, h * w, d)
        for block in self.blocks:
            t = block(t)
        p = self.patch_recovery(self.norm(t))                                # (B, h * w, C * ph * pw)
        delta = p.reshape(-1, h, w, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(-1, c, h * ph, w * pw)
        return x + delta


def build(arch: dict | None = None) -> PanguLite:
    """A freshly initialised :class:`PanguLite` (default :data:`ARCH`; seed torch first)."""
    return PanguLite(**{**ARCH, **(arch or {})})
