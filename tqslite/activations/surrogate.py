"""Per-sample moments of a layer's output: measured after it runs, or predicted from its input.

The probabilistic range (Santini, Paissan and Farella, 2025) is predicted before the layer runs:
for ``y = W x + b`` applied at many positions, the per-sample mean ``mu`` and variance ``v`` of each
input feature over positions give ``E[y_j] = W_j . mu + b_j`` (exact for a Linear) and
``Var[y_j] = (W_j * W_j) . v`` (if input features are independent; a convolution uses its kernel
summed over taps, which also assumes independent positions). :class:`Surrogate` holds what one
layer keeps for this prediction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import is_linear


def channel_moments(t: torch.Tensor, linear: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean and variance of each channel over positions: ``(B, channels)`` each.

    A Linear's tensor is ``(B, ..., d)`` (channels last), a conv's ``(B, C, *spatial)``. Two passes
    (mean, then mean squared deviation): stable, and much faster here than ``torch.var_mean``
    over a middle dim.
    """
    b = t.shape[0]
    v, dim = (t.reshape(b, -1, t.shape[-1]), 1) if linear else (t.reshape(b, t.shape[1], -1), 2)
    mean = v.mean(dim, keepdim=True)
    var = (v - mean).pow_(2).mean(dim)
    return mean.squeeze(dim), var


def measured_moments(module: nn.Module, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and standard deviation of a layer's output over positions.

    Parameters
    ----------
    module : nn.Linear, nn.Conv1d or nn.Conv2d
        The layer (it says where the channel axis is).
    y : Tensor
        Its output: ``(B, ..., d_out)`` for a Linear, ``(B, d_out, *spatial)`` for a conv.

    Returns
    -------
    mean, std : Tensor, shape ``(B, d_out)``
        Over the tokens / pixels of each sample (population standard deviation).
    """
    mean, var = channel_moments(y, is_linear(module))
    return mean, var.sqrt()


def input_moments(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean and variance of each input feature over positions: the surrogate's input.

    Returns
    -------
    mean, var : Tensor, shape ``(B, d_in)``
        ``O(d_in)`` numbers per sample, from one pass over the input.
    """
    return channel_moments(x, is_linear(module))


@dataclass
class Surrogate:
    """What the probabilistic quantizer of one layer keeps: weights for the mean and the variance."""

    w_mean: torch.Tensor      # Linear: W (d_out, d_in), the layer's own; conv: kernel summed over taps
    w_var: torch.Tensor       # W * W, summed over taps for a conv: the persistent extra memory
    bias: torch.Tensor | None
    groups: int
    linear: bool
    std_ratio: torch.Tensor | None = None   # (d_out,) fitted correction ("calibrated" surrogate)

    @classmethod
    def of(cls, module: nn.Module, std_ratio=None) -> "Surrogate":
        w = module.weight.detach()
        if is_linear(module):
            return cls(w, w * w, _detached(module.bias), 1, True, std_ratio)
        taps = tuple(range(2, w.ndim))
        return cls(w.sum(taps)[..., None], (w * w).sum(taps)[..., None], _detached(module.bias),
                   module.groups, False, std_ratio)

    @property
    def persistent_elements(self) -> int:
        """Elements stored beyond the layer's own weights."""
        n = self.w_var.numel() + (0 if self.linear else self.w_mean.numel())
        return n + (0 if self.std_ratio is None else self.std_ratio.numel())

    def moments(self, mean_in: torch.Tensor, var_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, d_in)`` input moments -> predicted ``(B, d_out)`` output mean and std."""
        if self.linear:
            mean = F.linear(mean_in, self.w_mean, self.bias)
            var = F.linear(var_in, self.w_var)
        else:
            mean = F.conv1d(mean_in[..., None], self.w_mean, self.bias, groups=self.groups)[..., 0]
            var = F.conv1d(var_in[..., None], self.w_var, groups=self.groups)[..., 0]
        std = var.clamp(min=0).sqrt()
        return mean, std if self.std_ratio is None else std * self.std_ratio

    def range(self, x: torch.Tensor, k: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted per-sample range ``(lo, hi)``, each ``(B,)``, from the layer's input ``x``."""
        mean, std = self.moments(*channel_moments(x, self.linear))
        return (mean - k * std).amin(1), (mean + k * std).amax(1)


def _detached(t):
    return None if t is None else t.detach()


def predicted_moments(module: nn.Module, x: torch.Tensor, std_ratio=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The surrogate's per-sample prediction of the output moments, before the layer runs.

    Parameters
    ----------
    module : nn.Linear, nn.Conv1d or nn.Conv2d
        The layer.
    x : Tensor
        Its input: ``(B, ..., d_in)`` for a Linear, ``(B, d_in, *spatial)`` for a conv.
    std_ratio : Tensor of shape ``(d_out,)``, optional
        Per-channel correction of the predicted std (from :func:`calibrate`).

    Returns
    -------
    mean, std : Tensor, shape ``(B, d_out)``
        ``E[y_j] = W_j . mu + b_j`` and ``sqrt((W_j * W_j) . v)`` (kernels summed over taps for a
        conv), with ``mu``, ``v`` from :func:`input_moments`. The mean is exact for a Linear layer;
        the std assumes independent input features (and, for a conv, independent positions).
    """
    with torch.no_grad():
        return Surrogate.of(module, std_ratio).moments(*input_moments(module, x))


def probabilistic_range(module: nn.Module, x: torch.Tensor, k: float = 3.0,
                        std_ratio=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-sample range the probabilistic quantizer sets, before the layer runs.

    Parameters
    ----------
    module : nn.Linear, nn.Conv1d or nn.Conv2d
        The layer.
    x : Tensor
        Its input (see :func:`predicted_moments`).
    k : float
        Predicted standard deviations on each side of the predicted mean.
    std_ratio : Tensor of shape ``(d_out,)``, optional
        Per-channel correction of the predicted std (from :func:`calibrate`).

    Returns
    -------
    lo, hi : Tensor, shape ``(B,)``
        ``min_j (mean_j - k std_j)`` and ``max_j (mean_j + k std_j)`` over output channels ``j``.
    """
    with torch.no_grad():
        return Surrogate.of(module, std_ratio).range(x, k)
