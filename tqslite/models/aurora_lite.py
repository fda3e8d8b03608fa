"""``aurora_lite``: a small Aurora-like encoder-processor-decoder on the lat-lon grid.

Aurora encodes the atmosphere into a coarser latent representation, evolves that latent state
with a deep processor, and decodes it back to the grid. This stand-in keeps the three stages at
toy size, on the Held--Suarez T21 grid:

* ``encoder``: a 3x3 convolution on the variables plus two static fields (sin and cos of
  latitude, a buffer, not a parameter), then a stride-2 convolution to the latent grid:
  ``(B, C + 2, 32, 64) -> (B, d, 16, 32)``;
* ``processor.0`` ... ``processor.{depth-1}``: ConvNeXt-style residual blocks on the latent
  grid (5x5 depthwise convolution, channel ``LayerNorm``, pointwise MLP);
* ``decoder``: a 1x1 convolution and a pixel-shuffle back to the full grid, then a 3x3
  convolution to the ``C`` variables: the increment ``delta``.

Convolutions wrap around in longitude and repeat the edge rows in latitude. ``forward(x)``
returns ``x + delta``, the state 6 hours later in normalised units.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NAME = "aurora_lite"
DATASET = "held_suarez"
LAYOUT = "grid"
VARIABLES = ("z500", "t850", "u250", "v250", "u850", "v850", "ps")
ARCH = dict(channels=len(VARIABLES), grid=(32, 64), hidden=32, dim=64, depth=4, kernel=5, mlp_ratio=2.0)
#: Training hyper-parameters (read by :mod:`tqslite.train`). One thread: on a shared 2-core
#: machine it is faster than two, and the run is bit-reproducible on the same machine.
TRAIN = dict(seed=0, steps=800, batch_size=8, lr=2e-3, weight_decay=1e-4, warmup=50,
             rollout_schedule=((0.0, 1), (0.6, 2), (0.85, 4)), log_every=20, threads=1)


def pad_sphere(x: torch.Tensor, p: int) -> torch.Tensor:
    """Pad ``(B, C, lat, lon)`` by ``p``: periodic in longitude, edge rows repeated in latitude."""
    if p == 0:
        return x
    x = F.pad(x, (p, p, 0, 0), mode="circular")
    return F.pad(x, (0, 0, p, p), mode="replicate")


class Encoder(nn.Module):
    """``(B, C_in, H, W) -> (B, d, H / 2, W / 2)``: 3x3 conv, GELU, stride-2 2x2 conv."""

    def __init__(self, c_in: int, hidden: int, dim: int):
        super().__init__()
        self.conv_in = nn.Conv2d(c_in, hidden, 3)
        self.act = nn.GELU()
        self.down = nn.Conv2d(hidden, dim, 2, stride=2)

    def forward(self, x):
        return self.down(self.act(self.conv_in(pad_sphere(x, 1))))


class ProcessorBlock(nn.Module):
    """ConvNeXt-style block on ``(B, d, h, w)``: ``z + pw2(gelu(pw1(norm(dwconv(z)))))``."""

    def __init__(self, dim: int, kernel: int = 7, mlp_ratio: float = 2.0):
        super().__init__()
        self.pad = kernel // 2
        self.dwconv = nn.Conv2d(dim, dim, kernel, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pw1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.act = nn.GELU()
        self.pw2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, z):
        y = self.dwconv(pad_sphere(z, self.pad)).permute(0, 2, 3, 1)      # channels last
        y = self.pw2(self.act(self.pw1(self.norm(y))))
        return z + y.permute(0, 3, 1, 2)


class Decoder(nn.Module):
    """``(B, d, h, w) -> (B, C, 2h, 2w)``: 1x1 conv to 4 x hidden, pixel-shuffle, GELU, 3x3 conv."""

    def __init__(self, dim: int, hidden: int, c_out: int):
        super().__init__()
        self.up = nn.Conv2d(dim, 4 * hidden, 1)
        self.shuffle = nn.PixelShuffle(2)
        self.act = nn.GELU()
        self.conv_out = nn.Conv2d(hidden, c_out, 3)

    def forward(self, z):
        return self.conv_out(pad_sphere(self.act(self.shuffle(self.up(z))), 1))


class AuroraLite(nn.Module):
    """Encoder -> processor blocks on a 2x coarser latent grid -> decoder, residual.

    Parameters
    ----------
    channels : int
        Number of variables ``C``.
    grid : (int, int)
        ``(n_lat, n_lon)``, both even.
    hidden : int
        Width of the full-resolution layers of the encoder and decoder.
    dim : int
        Width of the latent grid.
    depth : int
        Number of processor blocks.
    kernel : int
        Depthwise kernel size of the processor.
    mlp_ratio : float
        Pointwise MLP width / ``dim``.
    lat : sequence of float, optional
        Grid latitudes in degrees (default: equally spaced); they set the static fields.
    """

    def __init__(self, channels=7, grid=(32, 64), hidden=32, dim=64, depth=4, kernel=7, mlp_ratio=2.0, lat=None):
        super().__init__()
        nl, nx = grid
        if nl % 2 or nx % 2:
            raise ValueError(f"grid {grid} must have an even number of rows and columns.")
        lat = np.linspace(-90 + 90 / nl, 90 - 90 / nl, nl) if lat is None else np.asarray(lat, dtype=np.float64)
        if len(lat) != nl:
            raise ValueError(f"{len(lat)} latitudes for a grid of {nl} rows.")
        phi = torch.tensor(np.deg2rad(lat), dtype=torch.float32)[:, None].expand(nl, nx)
        self.register_buffer("static", torch.stack([phi.sin(), phi.cos()])[None])  # (1, 2, n_lat, n_lon)
        self.encoder = Encoder(channels + 2, hidden, dim)
        self.processor = nn.ModuleList(ProcessorBlock(dim, kernel, mlp_ratio) for _ in range(depth))
        self.decoder = Decoder(dim, hidden, channels)
        with torch.no_grad():  # start close to persistence
            self.decoder.conv_out.weight.mul_(0.1)
            self.decoder.conv_out.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, n_lat, n_lon) -> (B, C, n_lat, n_lon)``: the next normalised state."""
        z = self.encoder(torch.cat([x, self.static.expand(x.shape[0], -1, -1, -1)], dim=1))
        for block in self.processor:
            z = block(z)
        return x + self.decoder(z)


def build(arch: dict | None = None, lat=None) -> AuroraLite:
    """A freshly initialised :class:`AuroraLite` (default :data:`ARCH`; seed torch first)."""
    return AuroraLite(**{**ARCH, **(arch or {})}, lat=lat)
