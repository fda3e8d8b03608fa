"""GPTQ: rounding each layer's weights so that its *output* on calibration data stays close.

GPTQ (Frantar et al., 2023) quantizes one weight matrix ``W`` ``(out, in)`` column by column and
spreads each column's rounding error over the columns not yet quantized, so as to minimise the
layer's output error ``||W X - Q X||_F`` on its calibration inputs ``X`` ``(in, n)`` instead of
the weight error ``||W - Q||_F``. All it needs from the data is the layer's Hessian
``H = (2/n) X X^T``, accumulated in streaming batches (:class:`Hessian`). Then, as in the
reference implementation (``fasterquant`` in IST-DASLab/gptq):

1. inputs that are always zero ("dead" columns) get ``H[d, d] = 1`` and ``W[:, d] = 0``;
2. with ``act_order`` the columns are visited in order of decreasing ``diag(H)``;
3. ``H += damp * mean(diag H) * I``; ``U = cholesky(H^-1)`` (upper triangular);
4. for each column ``j``: ``q_j`` is ``w_j`` rounded onto the grid, ``e = (w_j - q_j) / U[j, j]``,
   ``W[:, j+1:] -= e U[j, j+1:]`` -- applied lazily: inside a block of ``block_size`` columns at
   once, to the columns after the block once per block.

The grid is tqslite's (:mod:`tqslite.quantization`): float16 scales rounded up, symmetric or
not, per tensor, per output channel or per group of ``g`` input columns, so a GPTQ tensor is
stored exactly like an RTN tensor of the same configuration. Per-tensor and per-channel scales
come from the whole weights at the start. Group scales come from the original weights before
any column moves (``static_groups``, the default), or are set when a group's first column comes
up, from the current, error-updated values of its columns. Groups are always the contiguous
columns of the stored layout, with or without ``act_order``.

**Sequential GPTQ on a model** (:meth:`GPTQ.quantize_weights`): layers are quantized in the order
they execute, each on the inputs the already-quantized layers before it produce. The model is
traced once (``torch.fx``, with the values of one calibration state carried along, so that
Python branches on shapes are decided) and the graph is run node by node over all calibration
batches; when a layer comes up its inputs are streamed into its Hessian, it is quantized, and
only then its outputs are computed: one pass through the model in all. A model that cannot be
traced is calibrated with hooks instead, one (partial) forward pass per layer, with a warning.

**Error propagation (QEP, Arai and Ichikawa, 2025).** A layer calibrated on the inputs ``X~`` of
the partly quantized model aims at ``W X~``, forgetting that the float model gives ``X``. With
``propagation=alpha`` its target is first moved towards the float model's output by the ridge
least-squares step ``W* = W + alpha W (X - X~) X~^T (X~ X~^T + lambda I)^-1`` (``alpha = 1``: the
``W*`` that best maps ``X~`` to ``W X``; ``lambda = damp * mean(diag X~ X~^T)``), and GPTQ then
quantizes ``W*``. The sums ``X X~^T`` and ``X~ X~^T`` are streamed like ``H``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils._pytree import tree_leaves
from tqdm import tqdm

from .config import Config, Int, PerChannel, PerGroup, PerTensor, as_config
from .quantization import QuantizedTensor, check_finite, grid_params, round_to_grid
from .quantizers import RTN, QuantizedWeights, Quantizer
from .systems import TorchSystem

#: The layers GPTQ calibrates (their own ``forward``, not a subclass's): grouped convolutions
#: are solved group by group.
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
_FORWARDS = {cls.forward for cls in LAYERS}
#: Elements per piece of unfolded convolution inputs (32 MiB in float64).
_PIECE = 2**22


def _is_layer(module: nn.Module) -> bool:
    return isinstance(module, LAYERS) and type(module).forward in _FORWARDS


# --------------------------------------------------------------------------------------------
# The Hessian of one layer, streamed
# --------------------------------------------------------------------------------------------

class Hessian:
    """Streaming ``H = (2/n) X X^T`` of one layer's inputs, in float64, one batch at a time.

    ``X`` holds the layer's input columns: the rows of a ``Linear`` input ``(..., in)``, or the
    image patches of a convolution (im2col, in the order of ``weight.flatten(1)``, with the
    layer's stride, padding, padding mode and dilation). A grouped convolution has one Hessian
    per group of channels. Each batch of ``m`` columns updates the running average as the
    reference does, ``H *= n / (n + m); H += (2 / (n + m)) X X^T``, so ``n`` counts columns and
    the result does not depend on how the calibration set was cut into batches; no batch is
    kept.

    Parameters
    ----------
    layer : nn.Linear, nn.Conv1d or nn.Conv2d

    Attributes
    ----------
    H : Tensor, float64, ``(groups, k, k)``
        ``k = in_features`` for ``Linear``, ``in_channels / groups * prod(kernel_size)`` for a
        convolution; ``groups = 1`` except for grouped convolutions.
    cross : Tensor, float64, ``(groups, k, k)``, or None
        ``(2/n) X_float X^T`` where float inputs were given (:meth:`add_batch`), for QEP.
    n : int
        Columns seen so far.
    """

    def __init__(self, layer: nn.Module):
        if not _is_layer(layer):
            raise ValueError(f"Hessian takes an nn.Linear, nn.Conv1d or nn.Conv2d, got {type(layer).__name__}.")
        self.layer = layer
        self.groups = getattr(layer, "groups", 1)
        k = layer.weight[0].numel()
        self.H = torch.zeros(self.groups, k, k, dtype=torch.float64, device=layer.weight.device)
        self.cross = None
        self.n = 0

    def _columns(self, x: torch.Tensor):
        """The input columns of a batch ``x``, in pieces: float64 ``(samples, groups, k, L)``, ``L`` columns each.

        A ``Linear``'s come as one piece; a convolution's image patches (im2col) a few samples
        at a time, so that no piece is large.
        """
        layer = self.layer
        if isinstance(layer, nn.Linear):
            yield x.reshape(-1, x.shape[-1]).to(torch.float64).T[None, None]
            return
        conv1d = isinstance(layer, nn.Conv1d)
        if x.ndim == (2 if conv1d else 3):  # an unbatched input
            x = x[None]
        padding = layer.padding
        if layer.padding_mode != "zeros" or isinstance(padding, str):  # pad as the layer does, then unfold
            mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
            x = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)
            padding = (0,) * len(layer.kernel_size)
        if conv1d:  # a Conv1d is a Conv2d on a (length, 1) image
            x = x[..., None]
            kernel, dilation, padding, stride = ((layer.kernel_size[0], 1), (layer.dilation[0], 1), (padding[0], 0),
                                                 (layer.stride[0], 1))
        else:
            kernel, dilation, stride = layer.kernel_size, layer.dilation, layer.stride
        step = max(1, _PIECE // max(1, x[0].numel() * math.prod(kernel)))
        for xs in x.split(step):
            u = F.unfold(xs, kernel, dilation=dilation, padding=padding, stride=stride)  # (b, C * kk, L)
            yield u.to(torch.float64).reshape(u.shape[0], self.groups, -1, u.shape[2])

    def add_batch(self, x: torch.Tensor, x_float: torch.Tensor | None = None) -> None:
        """Add a batch of inputs ``x`` (and, for QEP, what the float model gives the layer instead).

        ``x`` is what the layer receives: ``(..., in_features)`` for ``Linear``, ``(B, C, *spatial)``
        (or unbatched) for a convolution.
        """
        if x_float is not None and x_float.shape != x.shape:
            raise ValueError(f"the float inputs have shape {tuple(x_float.shape)}, the quantized ones {tuple(x.shape)}.")
        S, C, m = torch.zeros_like(self.H), torch.zeros_like(self.H), 0
        floats = self._columns(x_float) if x_float is not None else None
        for X in self._columns(x):
            S += (X @ X.transpose(2, 3)).sum(0)
            if floats is not None:
                C += (next(floats) @ X.transpose(2, 3)).sum(0)
            m += X.shape[0] * X.shape[3]
        if m == 0:
            return
        keep, add = self.n / (self.n + m), 2.0 / (self.n + m)
        self.H = keep * self.H + add * S
        if floats is not None:
            self.cross = add * C if self.cross is None else keep * self.cross + add * C
        self.n += m

    def propagated(self, w: torch.Tensor, alpha: float = 1.0, damp: float = 0.01) -> torch.Tensor:
        """QEP's target ``W + alpha W (X - X~) X~^T (X~ X~^T + lambda I)^-1``, same shape and dtype as ``w``.

        ``X~`` are the inputs streamed as ``x``, ``X`` those streamed as ``x_float``;
        ``lambda = damp * mean(diag X~ X~^T)`` (1 if that is 0). Computed in float64 from the
        streamed sums (their common factor ``2/n`` cancels).
        """
        if self.cross is None:
            raise ValueError("no float inputs were streamed: call add_batch(x, x_float) to use error propagation.")
        G, k = self.groups, self.H.shape[1]
        W = w.detach().reshape(G, -1, k).to(torch.float64)
        lam = damp * self.H.diagonal(dim1=1, dim2=2).mean(dim=1)
        lam = torch.where(lam > 0, lam, torch.ones_like(lam))
        A = self.H + lam[:, None, None] * torch.eye(k, dtype=torch.float64, device=W.device)
        # W (C - H) A^-1 = (A^-1 (C - H)^T W^T)^T, A symmetric; C = X X~^T and H = X~ X~^T up to 2/n
        step = torch.linalg.solve(A, (self.cross - self.H).transpose(1, 2) @ W.transpose(1, 2)).transpose(1, 2)
        return (W + alpha * step).reshape(w.shape).to(w.dtype)

    def error(self, delta: torch.Tensor) -> float:
        """``||delta X||_F`` over the streamed inputs, for a weight change ``delta`` (e.g. ``W - Q``)."""
        G, k = self.groups, self.H.shape[1]
        D = delta.detach().reshape(G, -1, k).to(torch.float64)
        return math.sqrt(max(0.0, 0.5 * self.n * float(((D @ self.H) * D).sum())))


# --------------------------------------------------------------------------------------------
# GPTQ on one weight matrix
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GPTQ(Quantizer):
    """GPTQ with lazy block updates, act-order and static groups (see the module docstring).

    Parameters
    ----------
    damp : float
        Dampening added to ``diag(H)``, relative to its mean (0.01: 1 %); also QEP's ridge.
    block_size : int
        Columns per lazy batch update (128 as in the reference; the result does not depend on
        it beyond rounding).
    act_order : bool
        Quantize the columns in order of decreasing ``diag(H)`` (the inputs with most energy first).
    static_groups : bool
        Per-group scales from the original weights, fixed before any column is quantized;
        otherwise each group's scales are set when its first column comes up, from the current
        (error-updated) values of its columns.
    propagation : float
        QEP's ``alpha`` in ``[0, 1]``: 0 is plain GPTQ, 1 corrects each layer's target fully for the
        error the quantized layers before it pass on.
    batch_size : int
        Calibration states per forward pass.
    """

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    static_groups: bool = True
    propagation: float = 0.0
    batch_size: int = 32
    name: ClassVar[str] = "gptq"
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self):
        def positive_int(v):
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1

        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 <= self.damp < math.inf:
            raise ValueError(f"damp={self.damp!r}: give a finite number >= 0, relative to mean(diag H) (0.01 is usual).")
        if not positive_int(self.block_size):
            raise ValueError(f"block_size={self.block_size!r}: give a positive integer (128 is usual).")
        if not positive_int(self.batch_size):
            raise ValueError(f"batch_size={self.batch_size!r}: give a positive number of states per forward pass.")
        for flag in ("act_order", "static_groups"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag}={getattr(self, flag)!r}: give True or False.")
        if isinstance(self.propagation, bool) or not isinstance(self.propagation, (int, float)) \
                or not 0 <= self.propagation <= 1:
            raise ValueError(f"propagation={self.propagation!r}: QEP's alpha lies in [0, 1] (0: plain GPTQ).")

    def quantize(self, w: torch.Tensor, fmt: Int, hessian=None) -> QuantizedTensor:
        """GPTQ of one layer's weights onto ``fmt``, given the layer's Hessian.

        Parameters
        ----------
        w : Tensor, ``(out, in)`` or a convolution's ``(out, in / groups, *kernel)``
            The weights; a convolution's are handled as ``w.flatten(1)``, the column order of
            :class:`Hessian`.
        fmt : Int
            Resolved (:meth:`tqslite.config.Int.resolve`) with its scales along the output rows:
            per tensor, ``PerChannel(0)`` or ``PerGroup(g, 0)``.
        hessian : Hessian or Tensor, ``(k, k)`` or ``(groups, k, k)``
            ``k = w[0].numel()``. With ``groups`` Hessians the rows of ``w`` are cut into
            ``groups`` equal parts, each with its own inputs (a grouped convolution).

        Returns
        -------
        QuantizedTensor
            In tqslite's row layout for ``fmt`` (:func:`tqslite.quantization.to_rows`). The
            rounding is done in float32, as RTN's (with ``H = I`` the codes are RTN's, bit for
            bit); the error updates are done in float64.
        """
        if hessian is None:
            raise ValueError("GPTQ needs the layer's Hessian (2/n X X^T of its calibration inputs, see "
                             "tqslite.gptq.Hessian); use GPTQ().quantize_weights(model, configs, calibration) for a "
                             "model, or RTN for a tensor without calibration data.")
        if not isinstance(fmt, Int):
            raise ValueError(f"{fmt!r}: GPTQ quantizes onto an integer format (Int); cast float formats instead.")
        g = fmt.granularity
        if not isinstance(g, PerTensor) and g.axis != 0:
            raise ValueError(f"{fmt.label} has its scales along axis {g.axis}; GPTQ rounds the columns of an "
                             "(out, in) matrix and needs scales along the output rows: axis 0, resolved.")
        if w.ndim < 2:
            raise ValueError(f"GPTQ quantizes a layer's weight matrix; got a tensor of shape {tuple(w.shape)}.")
        check_finite(w, "the weights")
        H = hessian.H if isinstance(hessian, Hessian) else hessian
        out, k = w.shape[0], w[0].numel()
        H = H.detach().to(device=w.device, dtype=torch.float64)
        H = H[None] if H.ndim == 2 else H
        if H.ndim != 3 or H.shape[1:] != (k, k) or out % H.shape[0]:
            raise ValueError(f"a Hessian of shape {tuple(hessian.shape if torch.is_tensor(hessian) else H.shape)} "
                             f"does not fit weights of shape {tuple(w.shape)}: give (k, k) or (groups, k, k) with "
                             f"k = {k} and groups dividing {out}.")
        gs = g.group_size if isinstance(g, PerGroup) else k
        if k % gs:
            raise ValueError(f"group_size={gs} does not divide the {k} columns; resolve the configuration first.")
        G = H.shape[0]
        W = w.detach().reshape(G, out // G, k).to(torch.float64)

        # per tensor and per channel: scales from the whole weights, before dead columns go (reference order)
        if isinstance(g, PerTensor):
            s, z = grid_params(W.reshape(1, -1), fmt)
            scale, zero = s.expand(G, out // G, 1).clone(), z.expand(G, out // G, 1).clone()
        elif isinstance(g, PerChannel):
            s, z = grid_params(W.reshape(out, k), fmt)
            scale, zero = s.reshape(G, -1, 1), z.reshape(G, -1, 1)
        H = H.clone()
        dead = H.diagonal(dim1=1, dim2=2) == 0  # inputs that are always zero: their weights do not matter
        H.diagonal(dim1=1, dim2=2)[dead] = 1.0
        W = W.masked_fill(dead[:, None, :], 0.0)
        known = torch.ones(G, k // gs, dtype=torch.bool, device=w.device)
        if isinstance(g, PerGroup):
            if self.static_groups:
                s, z = grid_params(W.reshape(-1, gs), fmt)
                scale, zero = s.reshape(G, -1, k // gs), z.reshape(G, -1, k // gs)
            else:
                scale = torch.ones(G, out // G, k // gs, device=w.device)
                zero = torch.zeros_like(scale)
                known[:] = False
        codes = self._solve(W, H, fmt, scale, zero, known, gs)
        rows = codes.reshape(out, k)
        if isinstance(g, PerTensor):
            return QuantizedTensor.from_rows(rows.reshape(1, -1), s, z, fmt, w.shape, w.dtype)
        return QuantizedTensor.from_rows(rows.reshape(-1, gs), scale.reshape(-1), zero.reshape(-1), fmt, w.shape,
                                         w.dtype)

    def _solve(self, W, H, fmt, scale, zero, known, gs) -> torch.Tensor:
        """The GPTQ loop on ``groups`` independent problems at once: codes ``(groups, r, k)``, float32.

        ``W`` ``(groups, r, k)`` and ``H`` ``(groups, k, k)`` are float64 with dead columns done;
        ``scale`` and ``zero`` ``(groups, r, k // gs)`` hold each row's grid per group of ``gs``
        columns, ``known`` ``(groups, k // gs)`` says which are set (the others are set here).
        """
        G, r, k = W.shape
        if self.act_order:
            perm = torch.argsort(H.diagonal(dim1=1, dim2=2), dim=1, descending=True, stable=True)
        else:
            perm = torch.arange(k, device=W.device).expand(G, k)
        inv = torch.argsort(perm, dim=1)
        W = torch.take_along_dim(W, perm[:, None, :], dim=2)
        H = torch.take_along_dim(torch.take_along_dim(H, perm[:, :, None], dim=1), perm[:, None, :], dim=2)
        diag = H.diagonal(dim1=1, dim2=2)
        diag += self.damp * diag.mean(dim=1, keepdim=True)
        L, info = torch.linalg.cholesky_ex(H)
        if bool((info > 0).any()):
            raise ValueError(f"the damped Hessian is not positive definite (damp={self.damp}); raise damp.")
        U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # upper factor of H^-1
        group = perm // gs  # the scale group (in the stored layout) of each visited column
        S = torch.take_along_dim(scale, group[:, None, :], dim=2)  # (G, r, k): the grid of each visited column
        Z = torch.take_along_dim(zero, group[:, None, :], dim=2)
        starts = {}  # groups whose scales are set on the way: at the position of their first column
        first = inv.reshape(G, -1, gs).amin(dim=2)
        for p, c in (~known).nonzero().tolist():
            starts.setdefault(int(first[p, c]), []).append((p, c))
        codes = torch.empty(G, r, k, device=W.device)
        for i1 in range(0, k, self.block_size):
            i2 = min(i1 + self.block_size, k)
            W1, U1 = W[:, :, i1:i2].clone(), U[:, i1:i2, i1:i2]
            E1 = torch.zeros_like(W1)
            for i in range(i2 - i1):
                j = i1 + i
                for p, c in starts.get(j, ()):  # a group starts: its scales from its columns' current values
                    pos = inv[p, c * gs:(c + 1) * gs]  # where its columns are visited: all at j or later
                    inside = pos < i2
                    current = torch.empty(r, gs, dtype=W.dtype, device=W.device)
                    current[:, inside] = W1[p][:, pos[inside] - i1]
                    later = pos[~inside]  # beyond the block: still owed this block's updates so far
                    current[:, ~inside] = W[p][:, later] - E1[p] @ U[p][i1:i2][:, later]
                    s, z = grid_params(current, fmt)
                    scale[p, :, c], zero[p, :, c] = s[:, 0], z[:, 0]
                    S[p][:, pos], Z[p][:, pos] = s, z
                w = W1[:, :, i]
                s, z = S[:, :, j], Z[:, :, j]
                code = round_to_grid(w.to(torch.float32), s, z, fmt)
                codes[:, :, j] = code
                err = (w - ((code - z) * s).to(torch.float64)) / U1[:, i, i, None]
                W1[:, :, i:] -= err[:, :, None] * U1[:, None, i, i:]
                E1[:, :, i] = err
            W[:, :, i2:] -= E1 @ U[:, i1:i2, i2:]
        return torch.take_along_dim(codes, inv[:, None, :], dim=2)

    # ----------------------------------------------------------------------------------------
    # A whole model
    # ----------------------------------------------------------------------------------------

    def quantize_weights(self, model, configs: Mapping[str, Config], calibration=None,
                         progress: bool = False) -> QuantizedWeights:
        """Sequential GPTQ of a torch model: every tensor of ``configs`` in its configuration.

        Parameters
        ----------
        model : nn.Module or a system with a ``module`` attribute
            Maps a batch of calibration states to its output. Read, never modified: the work is
            done on a deep copy, on the model's device, in eval mode.
        configs : mapping of str to Config
            ``{parameter name: configuration}``, e.g. a plan's; bits and granularities may differ
            per tensor. Parameters not in it stay as they are.
        calibration : Tensor, ``(n, *S)``
            States the module takes, e.g. drawn from the training period.
        progress : bool
            Show a progress bar over the layers.

        Returns
        -------
        QuantizedWeights
            ``methods[name]`` is ``"gptq"`` for the weights of ``Linear``, ``Conv1d`` and ``Conv2d``
            layers on an integer configuration, quantized in execution order on the inputs the
            quantized layers before them give; ``"float16"``/``"float"`` for float
            configurations; ``"rtn (fallback: <reason>)"`` for every other tensor (biases, norm
            gains, embeddings, bare parameters, transposed convolutions, scales not along the
            output rows, layers never called or shared) -- :attr:`QuantizedWeights.fallbacks`.

        Notes
        -----
        RTN and float tensors are applied first, so every layer is calibrated on the model as
        it will run. Layers come up in a ``torch.fx`` trace of the module run node by node over
        the calibration batches (a trace that does not reproduce the module on every batch is
        not used); a layer called several times is calibrated on all its calls when their
        inputs are all known at its first call, else it gets RTN. An untraceable model is
        calibrated with hooks, one partial forward pass per layer (a ``UserWarning`` names why).
        """
        module, system = _torch_module(model)
        if calibration is None:
            raise ValueError("GPTQ needs calibration states (n, *S) that the module takes, e.g. initial states from "
                             "the training period.")
        configs = {n: as_config(c) for n, c in configs.items()}
        params = dict(module.named_parameters())
        missing = [n for n in configs if n not in params]
        if missing:
            raise ValueError(f"{missing} are not parameters of the model.")
        for n in configs:
            check_finite(params[n], f"parameter {n!r}")
        device = params[next(iter(params))].device if params else torch.device("cpu")
        batches = list(torch.as_tensor(calibration, device=device).split(self.batch_size))
        work = copy.deepcopy(module).eval()
        ref = copy.deepcopy(module).eval() if self.propagation else None
        out = QuantizedWeights(quantizer=repr(self))
        fallback = {}           # name -> reason for RTN
        layers = {}             # module path -> parameter name, for layers GPTQ calibrates
        for name, config in configs.items():
            if isinstance(config, Int):
                reason = _why_not(work, name, config, system.channel_axis(name))
                if reason:
                    fallback[name] = reason
                else:
                    layers[name.rpartition(".")[0]] = name
        with torch.no_grad():
            try:
                graph = _trace(work, batches, set(layers))
            except _Untraceable as e:
                graph = None
                warnings.warn(f"GPTQ could not use a torch.fx trace of {type(module).__name__} ({e}); calibrating "
                              "layer by layer with hooks instead: one forward pass per layer, slower.", stacklevel=2)
            calls, reasons = _calls_by_graph(graph, layers) if graph is not None else \
                _calls_by_hooks(work, layers, batches)
            for path, reason in reasons.items():
                fallback[layers.pop(path)] = reason
            for name, config in configs.items():  # everything but the GPTQ layers, first
                if name in layers.values():
                    continue
                method = f"rtn (fallback: {fallback[name]})" if name in fallback else None
                out.add(name, params[name].detach(), config, system.channel_axis(name), RTN(), method=method)
                _set(work, name, out.tensors[name].dequantize() if name in out.tensors else out.floats[name])
            bar = tqdm(total=len(layers), desc="gptq: layers", disable=not progress)

            def quantize_layer(path, inputs):
                """GPTQ of layer ``path`` from its inputs, an iterable of (quantized-path, float-path) batches."""
                layer, name = work.get_submodule(path), layers[path]
                hessian = Hessian(layer)
                for x, x_float in inputs:
                    hessian.add_batch(x, x_float)
                w = layer.weight.detach()
                if self.propagation:
                    w = hessian.propagated(w, self.propagation, self.damp)
                try:
                    out.add(name, w, configs[name], 0, self, hessian=hessian)
                except ValueError as e:
                    raise ValueError(f"GPTQ of {name!r}: {e}") from e
                _set(work, name, out.tensors[name].dequantize())
                bar.update()

            if graph is not None:
                _run_graph(graph, work, batches, calls, quantize_layer, ref)
            else:
                _run_hooked(work, batches, calls, quantize_layer, ref)
            bar.close()
        order = list(configs)
        for attr in ("tensors", "floats", "configs", "methods"):  # the order of configs, not of execution
            d = getattr(out, attr)
            setattr(out, attr, {n: d[n] for n in order if n in d})
        return out


# --------------------------------------------------------------------------------------------
# Which tensors GPTQ can calibrate
# --------------------------------------------------------------------------------------------

def _torch_module(model):
    """``(nn.Module, system)`` for a module or a system with ``.module``; ``ValueError`` otherwise."""
    if isinstance(model, nn.Module):
        return model, TorchSystem(model)
    module = getattr(model, "module", None)
    if isinstance(module, nn.Module):
        return module, model
    raise ValueError(f"GPTQ needs a torch module (an nn.Module, or a system with a .module) to feed calibration "
                     f"inputs through its layers; {type(model).__name__} has none. RTN and MSE-clip work on any "
                     "system, e.g. an ONNX graph.")


def _why_not(module: nn.Module, name: str, config: Int, axis: int) -> str | None:
    """Why parameter ``name`` cannot get GPTQ (a short reason), or None if it can."""
    path, _, attr = name.rpartition(".")
    owner = module.get_submodule(path)
    kind = type(owner).__name__
    if not _is_layer(owner):
        return f"{attr} of {kind}, not a Linear/Conv1d/Conv2d weight"
    if attr != "weight":
        return f"{attr} of {kind}: GPTQ calibrates layer weights only"
    g = config.resolve(owner.weight.shape, axis).granularity
    if not isinstance(g, PerTensor) and g.axis != 0:
        return f"scales along axis {g.axis}; GPTQ needs them along axis 0, the output rows"
    return None


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    with torch.no_grad():
        module.get_parameter(name).copy_(value)


# --------------------------------------------------------------------------------------------
# The sequential pass: a traced graph run node by node
# --------------------------------------------------------------------------------------------

class _Untraceable(Exception):
    """The module cannot be run as a torch.fx graph."""


def _fetch(root: nn.Module, target: str):
    return functools.reduce(getattr, target.split("."), root)


def _run_node(node: fx.Node, root: nn.Module, value):
    """The value of ``node`` with ``root``'s modules and attributes, its inputs given by ``value(node)``."""
    args, kwargs = fx.node.map_arg(node.args, value), fx.node.map_arg(node.kwargs, value)
    if node.op == "get_attr":
        return _fetch(root, node.target)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "call_module":
        return root.get_submodule(node.target)(*args, **kwargs)
    raise AssertionError(node.op)


class _Tracer(fx.Tracer):
    """``torch.fx`` tracing that also runs one example state, so that Python branches on values
    (``if x.shape[-1] != L``) are decided, and buffers become graph attributes. The layers
    GPTQ calibrates are leaves, called as modules."""

    proxy_buffer_attributes = True

    def __init__(self, example, leaves):
        super().__init__()
        self.example, self.leaves, self.values, self.concrete = example, leaves, {}, False

    def is_leaf_module(self, m, qualname):  # torch.nn modules are leaves, unless GPTQ layers are inside
        return qualname in self.leaves or super().is_leaf_module(m, qualname) and not any(
            _is_layer(sub) for sub in m.modules())

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = proxy.node
        if kind == "placeholder":
            first = not any(n.op == "placeholder" for n in self.values)
            self.values[node] = self.example if first else (args[0] if args else None)
        else:  # while tracing, module calls and attributes are patched to come back here: run them plainly
            self.concrete = True
            try:
                self.values[node] = _run_node(node, self.root, self._value)
            finally:
                self.concrete = False
        return proxy

    def _value(self, node):  # constants tracing stored on the root come as get_attr nodes without a proxy
        return self.values[node] if node in self.values else _fetch(self.root, node.target)

    def call_module(self, m, forward, args, kwargs):
        return forward(*args, **kwargs) if self.concrete else super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        return attr_val if self.concrete else super().getattr(attr, attr_val, parameter_proxy_cache)

    def to_bool(self, obj):
        return bool(self.values[obj.node])

    def iter(self, obj):
        return iter([obj[i] for i in range(len(self.values[obj.node]))])


#: torch functions that make a tensor from sizes: ``torch.ones(n, n)`` with a traced ``n`` is
#: not traceable by torch.fx itself, so while tracing (and only then) they are replaced by
#: wrappers that record them as graph calls.
_FACTORIES = ("arange", "empty", "eye", "full", "ones", "zeros")


@contextlib.contextmanager
def _factories_take_proxies(tracer: fx.Tracer):
    saved = {f: getattr(torch, f) for f in _FACTORIES}

    def recorded(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            if any(isinstance(a, fx.Proxy) for a in tree_leaves((args, kwargs))):
                return tracer.create_proxy("call_function", fn, args, kwargs)
            return fn(*args, **kwargs)
        return call

    try:
        for f, fn in saved.items():
            setattr(torch, f, recorded(fn))
        yield
    finally:
        for f, fn in saved.items():
            setattr(torch, f, fn)


def _trace(module: nn.Module, batches, leaves) -> fx.Graph:
    """A graph of ``module`` that reproduces it on every calibration batch, or ``_Untraceable``."""
    tracer = _Tracer(batches[0][:1], leaves)
    try:
        with _factories_take_proxies(tracer):
            graph = tracer.trace(module)
    except Exception as e:  # noqa: BLE001 -- any failure of tracing means: use hooks
        raise _Untraceable(f"tracing failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if sum(n.op == "placeholder" for n in graph.nodes) != 1:
        raise _Untraceable("the module's forward takes more than the state")
    outputs = _run_graph(graph, module, batches)
    for k, (b, y) in enumerate(zip(batches, outputs)):
        ref, got = tree_leaves(module(b)), tree_leaves(y)
        same = [torch.is_tensor(r) and torch.is_tensor(t) and r.shape == t.shape
                and torch.allclose(r, t, rtol=1e-5, atol=1e-6, equal_nan=True)  # NaN: a masked gap in a state
                for r, t in zip(ref, got)]
        if len(ref) != len(got) or not all(same):
            raise _Untraceable(f"the traced graph does not reproduce the module on calibration batch {k} "
                               "(control flow that depends on the data)")
    return graph


def _calls_by_graph(graph: fx.Graph, layers: dict):
    """``({path: [call nodes]}, {path: reason})``: how each layer is called, or why it cannot get GPTQ."""
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    attrs = {n.target for n in nodes if n.op == "get_attr" and not _only_inspected(n)}
    calls, reasons = {}, {}
    for path in layers:
        found = [n for n in nodes if n.op == "call_module" and n.target == path]
        if f"{path}.weight" in attrs:
            reasons[path] = "weight also used outside its layer"
        elif not found:
            reasons[path] = "not called as a module in the forward pass"
        elif any(index[a] >= index[found[0]] for n in found for a in n.all_input_nodes):
            reasons[path] = f"called {len(found)} times, later calls depend on earlier ones"
        else:
            calls[path] = found
    return calls, reasons


def _only_inspected(node: fx.Node) -> bool:
    """Whether the value of ``node`` is only asked for its dtype, device or shape (``x.to(fc.weight.dtype)``)."""
    return all(u.op == "call_function" and u.target is getattr and u.args[1] in ("dtype", "device", "shape", "ndim")
               or u.op == "call_method" and u.target in ("size", "dim") for u in node.users)


def _layer_input(node: fx.Node):
    return node.args[0] if node.args else node.kwargs["input"]


def _run_graph(graph: fx.Graph, work, batches, calls=None, quantize_layer=None, ref=None):
    """Run ``graph`` node by node over all ``batches`` at once; returns the output for each batch.

    Each node's values (one per batch) live until their last use. When the first call of a
    layer in ``calls`` comes up, ``quantize_layer(path, inputs)`` gets the inputs of all its
    calls, batch by batch, before any output of the layer is computed. With ``ref`` (the float
    model, for QEP) the float model's values are carried along too, and paired with them.
    """
    nodes = list(graph.nodes)
    last_use = {a: i for i, node in enumerate(nodes) for a in node.all_input_nodes}
    first_call = {found[0]: path for path, found in (calls or {}).items()}
    env, env_float = {}, {}
    runs = [(work, env)] + ([(_FloatRoot(ref, work), env_float)] if ref is not None else [])

    def value(env, x, b):
        return env[x][b] if isinstance(x, fx.Node) else x

    def inputs(path):
        for x in (_layer_input(n) for n in calls[path]):
            for b in range(len(batches)):
                yield value(env, x, b), value(env_float, x, b) if ref is not None else None

    for i, node in enumerate(nodes):
        if node.op == "output":
            return [fx.node.map_arg(node.args[0], lambda a, b=b: env[a][b]) for b in range(len(batches))]
        if node in first_call:
            quantize_layer(first_call[node], inputs(first_call[node]))
        for root, values in runs:
            values[node] = list(batches) if node.op == "placeholder" else \
                [_run_node(node, root, lambda a, b=b: values[a][b]) for b in range(len(batches))]
            for a in node.all_input_nodes:
                if last_use[a] == i:
                    del values[a]
            if not node.users:
                del values[node]
    raise AssertionError("a graph without output")


class _FloatRoot:
    """The float model's modules and attributes, with the constants tracing added to the working copy."""

    def __init__(self, ref, work):
        self.ref, self.work = ref, work

    def get_submodule(self, target):
        return self.ref.get_submodule(target)

    def __getattr__(self, name):
        return getattr(self.ref, name) if hasattr(self.ref, name) else getattr(self.work, name)


# --------------------------------------------------------------------------------------------
# The fallback for untraceable models: hooks, one partial forward pass per layer
# --------------------------------------------------------------------------------------------

class _Stop(Exception):
    """Raised by a hook once it has the input it came for."""


def _calls_by_hooks(work: nn.Module, layers: dict, batches):
    """``([paths in execution order], {path: reason})`` from a forward pass on the first batch."""
    order = []
    hooks = [work.get_submodule(p).register_forward_pre_hook(lambda m, a, p=p: order.append(p)) for p in layers]
    try:
        work(batches[0])
    finally:
        for h in hooks:
            h.remove()
    reasons = {p: "not called as a module in the forward pass" for p in layers if p not in order}
    reasons |= {p: f"called {order.count(p)} times and the model could not be traced" for p in set(order)
                if order.count(p) > 1}
    return [p for p in order if p not in reasons], reasons


def _input_of(model: nn.Module, path: str, x: torch.Tensor) -> torch.Tensor:
    """What layer ``path`` of ``model`` receives when ``model`` runs on ``x`` (the pass stops there)."""
    got = []

    def hook(m, args, kwargs):
        got.append(args[0] if args else kwargs["input"])
        raise _Stop

    handle = model.get_submodule(path).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    return got[0]


def _run_hooked(work, batches, order, quantize_layer, ref=None) -> None:
    """Sequential GPTQ without a graph: the layers in execution ``order``, each on one pass per batch."""
    for path in order:
        quantize_layer(path, ((_input_of(work, path, b), _input_of(ref, path, b) if ref is not None else None)
                              for b in batches))


__all__ = ["GPTQ", "Hessian", "LAYERS"]
