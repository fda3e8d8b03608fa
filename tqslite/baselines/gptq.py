"""GPTQ (Frantar et al., 2023): calibration-based post-training quantization, for comparison.

For one layer with weight ``W`` (``out x in``) and calibration inputs ``X`` (``in x n``), GPTQ
quantizes ``W`` one input column at a time and spreads each column's rounding error over the
columns not yet quantized, so as to minimise ``||W X - Q X||^2`` rather than ``||W - Q||^2``:

1. ``H = 2 X X^T / n`` plus dampening ``damp * mean(diag H)`` on the diagonal;
2. ``U = cholesky(H^-1)^T`` (upper); for column ``j``: ``q_j = RTN(w_j)``,
   ``err = (w_j - q_j) / U[j, j]``, ``W[:, j+1:] -= err U[j, j+1:]``;
3. optionally process columns in order of decreasing ``diag(H)`` (``act_order``).

The grid is tqslite's RTN grid (:mod:`tqslite.quantization`): per output channel, or per group
of ``group_size`` input columns with the scale fixed when the group starts, float16 scales
rounded up. So a GPTQ tensor is stored exactly like an RTN tensor of the same settings, and sizes
match RTN's. Layers are processed in module order, each calibrated on the inputs it receives
from the already-quantized layers before it (the sequential variant). ``nn.Linear`` and
``nn.Conv1d/2d`` weights (grouped convolutions group by group) get GPTQ; every other parameter
(biases, norms, embeddings, transposed convolutions) gets plain RTN at the same bits.

**Error propagation (QEP, Arai and Ichikawa, 2025).** Sequential GPTQ fits each layer to the
inputs ``X~`` the quantized layers before it give, but aims at ``W X~``, forgetting that the float
model would have given ``X``. With ``propagation=alpha`` the layer's target is first moved
towards what the float model computes, by the ridge least-squares step

``W* = W + alpha W (X - X~) X~^T (X~ X~^T + lambda I)^-1``

(``alpha = 1``: the ``W*`` that best maps ``X~`` to ``W X``; ``lambda`` is the same dampening),
and GPTQ then quantizes ``W*`` on ``X~``. ``alpha = 0`` is plain GPTQ.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..quantization import rtn_quantize
from ..systems import TorchSystem


def _layer_inputs(model: nn.Module, layer: nn.Module, batches) -> torch.Tensor:
    """Calibration inputs of ``layer`` as columns ``(in_features, n)`` (im2col for convolutions)."""
    cols = []

    def hook(mod, args):
        x = args[0].detach()
        if isinstance(mod, nn.Linear):
            cols.append(x.reshape(-1, x.shape[-1]).T)
        elif isinstance(mod, nn.Conv1d):
            x = x.unsqueeze(-1)
            u = nn.functional.unfold(x, (mod.kernel_size[0], 1), dilation=(mod.dilation[0], 1),
                                     padding=(mod.padding[0], 0), stride=(mod.stride[0], 1))
            cols.append(u.transpose(0, 1).reshape(u.shape[1], -1))
        else:
            u = nn.functional.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
            cols.append(u.transpose(0, 1).reshape(u.shape[1], -1))

    handle = layer.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        handle.remove()
    return torch.cat(cols, dim=1).double()


def _grid(cols: torch.Tensor, bits: int, symmetric: bool):
    """RTN scale and zero point of each row of ``cols`` ``(out, k)``: two ``(out,)`` float64 tensors."""
    _, scale, zero = _quantize_rows(cols.float(), bits, symmetric)
    return scale[:, 0].double(), zero[:, 0].double()


def gptq_layer(w: torch.Tensor, inputs: torch.Tensor, bits: int, group_size: int | None = None,
               act_order: bool = False, damp: float = 0.01, symmetric: bool = True) -> torch.Tensor:
    """GPTQ for one weight matrix.

    Parameters
    ----------
    w : Tensor, ``(out, in)``
        The weights (a conv weight flattened to ``(out, in * kh * kw)``).
    inputs : Tensor, ``(in, n)``
        Calibration inputs as columns.
    bits, group_size, symmetric
        The RTN grid (see :func:`tqslite.rtn_quantize`); ``group_size`` groups input columns.
        Without ``act_order`` a group's scale is set from the (updated) weights when the group
        starts; with it, from the original weights ("static groups"), since columns are then
        visited out of order.
    act_order : bool
        Quantize columns in order of decreasing ``diag(H)``.
    damp : float
        Dampening, relative to the mean of ``diag(H)``.

    Returns
    -------
    Tensor, ``(out, in)``, same dtype as ``w``: dequantized weights on the RTN grid.
    """
    bits = check_bits(bits, symmetric)
    if bits > 8:
        return rtn_quantize(w, bits)
    W = w.detach().double().clone()
    n_in = W.shape[1]
    if group_size is not None and n_in % group_size:
        raise ValueError(f"group_size={group_size} does not divide the {n_in} input columns.")
    if inputs.shape[0] != n_in:
        raise ValueError(f"calibration inputs have {inputs.shape[0]} features, the weight has {n_in} columns.")
    H = 2.0 * inputs @ inputs.T / inputs.shape[1]
    unused = torch.diag(H) == 0  # inputs that are always zero: their weights do not matter
    H[unused, unused] = 1.0
    W[:, unused] = 0.0
    if group_size is None:
        scale, zero = _grid(W, bits, symmetric)
    elif act_order:
        static = [_grid(W[:, g:g + group_size], bits, symmetric) for g in range(0, n_in, group_size)]
    order = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n_in)
    W, H = W[:, order], H[order][:, order]
    H += damp * torch.diag(H).mean() * torch.eye(n_in, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    qmin, qmax = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    Q = torch.zeros_like(W)
    for j in range(n_in):
        c = int(order[j])  # the column's place in the original layout
        if group_size is not None:
            if act_order:
                scale, zero = static[c // group_size]
            elif c % group_size == 0:
                scale, zero = _grid(W[:, j:j + group_size], bits, symmetric)
        Q[:, j] = (torch.clamp(torch.round(W[:, j] / scale) + zero, qmin, qmax) - zero) * scale
        err = (W[:, j] - Q[:, j]) / U[j, j]
        W[:, j + 1:] -= err[:, None] * U[j, j + 1:][None, :]
    return Q[:, torch.argsort(order)].to(w.dtype)


GPTQ_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def propagate_error(w: torch.Tensor, x_float: torch.Tensor, x_quant: torch.Tensor, alpha: float = 1.0,
                    damp: float = 0.01) -> torch.Tensor:
    """QEP's corrected target ``W + alpha W (X - X~) X~^T (X~ X~^T + lambda I)^-1`` (float64).

    ``w`` is ``(out, in)``, ``x_float`` and ``x_quant`` are ``(in, n)``: the inputs the layer gets
    from the float model and from the partly quantized one. ``lambda = damp * mean(diag(X~ X~^T))``.
    """
    W, X, Xq = w.detach().double(), x_float.double(), x_quant.double()
    H = Xq @ Xq.T
    lam = damp * float(torch.diag(H).mean())
    H += (lam if lam > 0 else 1.0) * torch.eye(H.shape[0], dtype=H.dtype)
    return W + alpha * torch.linalg.solve(H, Xq @ (X - Xq).T @ W.T).T


def gptq_quantize(model: nn.Module, calibration: torch.Tensor, bits: int, group_size: int | None = None,
                  act_order: bool = False, damp: float = 0.01, symmetric: bool = True,
                  batch_size: int = 64, propagation: float = 0.0) -> nn.Module:
    """A GPTQ-quantized copy of ``model`` (the model itself is untouched).

    Parameters
    ----------
    model : nn.Module
        Maps a batch of states to the next states (for a windowed model: the window module).
    calibration : Tensor, ``(n, *S)``
        Calibration states, e.g. initial states drawn from the training period.
    bits, group_size, act_order, damp, symmetric
        See :func:`gptq_layer`. Parameters that are not ``Linear``/``Conv`` weights get RTN at
        ``bits``. With ``group_size``, a tensor whose channels it does not divide keeps one
        scale per channel (:func:`tqslite.quantization.grid_for`, the rule plans use), so a
        GPTQ model is stored exactly like the uniform RTN plan of the same settings. A grouped
        convolution (e.g. depthwise) is solved group by group.
    batch_size : int
        Calibration states per forward pass.
    propagation : float
        QEP's ``alpha`` (see the module docstring): 0 is GPTQ, 1 corrects each layer's target
        fully for the error the quantized layers before it pass on.

    Returns
    -------
    nn.Module
        The quantized copy.
    """
    target = copy.deepcopy(model).eval()
    system = TorchSystem(target)
    gran = "group" if group_size else "channel"
    batches = list(torch.as_tensor(calibration).split(batch_size))
    layers = [(name, m) for name, m in target.named_modules() if isinstance(m, GPTQ_LAYERS)]
    for name, layer in layers:  # in module order: each sees the inputs the quantized layers before it give
        X = _layer_inputs(target, layer, batches)
        W = layer.weight.flatten(1).double()
        g = grid_for(tuple(W.shape), gran, 0, group_size)["group_size"]
        n_groups = getattr(layer, "groups", 1)  # a grouped conv: each group of outputs sees its own inputs
        rows, cols = W.shape[0] // n_groups, W.shape[1]
        parts = [(W[i * rows:(i + 1) * rows], X[i * cols:(i + 1) * cols]) for i in range(n_groups)]
        if propagation:
            X_float = _layer_inputs(model, model.get_submodule(name), batches)
            parts = [(propagate_error(w, X_float[i * cols:(i + 1) * cols], x, propagation, damp), x)
                     for i, (w, x) in enumerate(parts)]
        Q = torch.cat([gptq_layer(w, x, bits, g, act_order, damp, symmetric) for w, x in parts])
        with torch.no_grad():
            layer.weight.copy_(Q.reshape(layer.weight.shape))
    done = {f"{name}.weight" if name else "weight" for name, _ in layers}
    with torch.no_grad():
        for name, p in target.named_parameters():
            if name not in done:
                ax = system.channel_axis(name)
                p.copy_(rtn_quantize(p, bits, axis=ax, symmetric=symmetric,
                                     **grid_for(tuple(p.shape), gran, ax, group_size)))
    return target
