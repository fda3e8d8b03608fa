"""``timesfm_lite``: a small TimesFM-like decoder-only transformer over patches of a series.

TimesFM reads a univariate context cut into patches, embeds each patch as a token, runs causal
transformer blocks, and maps each token to the next patch of values. This stand-in keeps that
skeleton at toy size, trained on the real Irish daily wind records (each station normalised by
its own training-period mean and standard deviation):

* the context ``(B, L)`` is cut into ``N = L / P`` patches ``(B, N, P)``;
* ``input_proj``: ``Linear(P, d)`` per patch, plus a learned positional embedding
  ``pos_embed`` ``(N, d)``;
* ``blocks.0`` ... ``blocks.{depth-1}``: causal pre-norm transformer blocks (token ``i`` sees
  patches ``0..i``);
* ``norm``: a final ``LayerNorm``;
* ``output_proj``: ``Linear(d, P)``: token ``i`` predicts patch ``i + 1``.

``forward(x)`` returns the next patch ``(B, P)`` after the context (from the last token);
:meth:`TimesFMLite.forward_all` returns every token's prediction ``(B, N, P)`` (the training
loss uses all of them). As a system it is wrapped in :class:`tqslite.WindowedSystem`: the
state is the context window, and one step drops the oldest ``P`` values and appends the ``P``
predicted ones.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import TransformerBlock

NAME = "timesfm_lite"
DATASET = "irish_wind"
LAYOUT = "series"
VARIABLES = ("wind_speed",)
ARCH = dict(context=64, patch=4, dim=64, depth=3, heads=4, mlp_ratio=2.0)
#: Training hyper-parameters (read by :mod:`tqslite.train`). One thread: on a shared 2-core
#: machine it is faster than two, and the run is bit-reproducible on the same machine.
TRAIN = dict(seed=0, steps=800, batch_size=64, lr=2e-3, weight_decay=1e-4, warmup=50, log_every=20, threads=1)


class TimesFMLite(nn.Module):
    """Patch projection -> causal transformer blocks -> next-patch projection.

    Parameters
    ----------
    context : int
        Context length ``L`` in time steps (days); a multiple of ``patch``.
    patch : int
        Patch length ``P``: values per input token and per predicted patch.
    dim, depth, heads, mlp_ratio
        Token width, number of blocks, attention heads, MLP width / ``dim``.
    """

    def __init__(self, context=64, patch=4, dim=64, depth=3, heads=4, mlp_ratio=2.0):
        super().__init__()
        if context % patch:
            raise ValueError(f"context={context} is not a multiple of patch={patch}.")
        self.context, self.patch, self.n_tokens = context, patch, context // patch
        self.input_proj = nn.Linear(patch, dim)
        self.pos_embed = nn.Parameter(0.02 * torch.randn(self.n_tokens, dim))
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio, causal=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.output_proj = nn.Linear(dim, patch)

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L) -> (B, N, P)``: token ``i``'s prediction of patch ``i + 1``."""
        if x.shape[-1] != self.context:
            raise ValueError(f"context of {x.shape[-1]} values; this model reads exactly {self.context}.")
        t = self.input_proj(x.reshape(-1, self.n_tokens, self.patch)) + self.pos_embed
        for block in self.blocks:
            t = block(t)
        return self.output_proj(self.norm(t))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L) -> (B, P)``: the patch that follows the context."""
        return self.forward_all(x)[:, -1]


def build(arch: dict | None = None) -> TimesFMLite:
    """A freshly initialised :class:`TimesFMLite` (default :data:`ARCH`; seed torch first)."""
    return TimesFMLite(**{**ARCH, **(arch or {})})
