"""Building blocks shared by the stand-in models: multi-head self-attention, an MLP, and a
pre-norm transformer block.

Attention is written out with plain ``Linear`` layers, ``matmul`` and ``softmax`` (no fused
kernel), so that the ONNX export is a readable graph whose weights keep their torch names:
``blocks.0.attn.qkv.weight``, ``blocks.0.attn.proj.weight``, ``blocks.0.mlp.fc1.weight``, ...
Tokens are ``(B, N, d)`` throughout.
"""

from __future__ import annotations

import torch
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention over tokens ``(B, N, d)``, optionally causal.

    Parameters
    ----------
    dim : int
        Token width ``d``; must be a multiple of ``heads``.
    heads : int
        Number of attention heads.
    causal : bool
        If True, token ``i`` attends only to tokens ``j <= i`` (decoder-only models).
    """

    def __init__(self, dim: int, heads: int, causal: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} is not a multiple of heads={heads}.")
        self.heads, self.causal = heads, causal
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                       # (B, heads, N, d / heads)
        att = (q @ k.transpose(-2, -1)) * self.scale          # (B, heads, N, N)
        if self.causal:
            mask = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
            att = att.masked_fill(mask, float("-inf"))
        y = (att.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj(y)


class MLP(nn.Module):
    """Two ``Linear`` layers with a GELU between: ``d -> hidden -> d``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    Submodules (and so parameter names): ``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``,
    ``mlp.fc1``, ``mlp.fc2``.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0, causal: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, causal)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())
