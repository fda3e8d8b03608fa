"""Perturbed copies as blocks of rows: ``K`` copies of a model in one ordinary forward pass.

The probe rolls out one perturbed copy of the model per unit. Copy ``k`` differs from the model
only in the tensors of unit ``k``, so ``K`` copies can share one forward pass of the model
itself on a batch of ``K * b`` rows (block ``k`` = copy ``k``'s ``b`` windows), as long as every
module that holds a perturbed tensor recomputes, for the rows of the copy that perturbs it, its
output with the perturbed values:

* a plain ``nn.Linear`` runs as one batched product with ``K`` weight matrices (copy ``k``'s own
  where it perturbs them, the module's elsewhere);
* any other module (its *hook point*) gets a forward hook that cuts block ``k`` out of the
  module's batch inputs (the ``k``-th of ``K`` equal slices along their leading dim), reruns the
  module on it with copy ``k``'s tensors and writes the result over block ``k`` of its output;
* everything else runs once, as the model's own kernels, on ``K * b`` rows: no ``torch.vmap``.

Copy ``k`` then computes exactly what the one-unit probe computes, up to the order of
floating-point operations in kernels of another batch size. What it assumes: the model treats
the rows of a batch independently and keeps them batch-major (a flattened ``(K * b * tokens, d)``
is fine, a sequence-first ``(tokens, K * b, d)`` is not), and a tensor is used by the module that
holds it or by one of its ancestors. Which inputs and outputs of a hook point are batch tensors
is measured, not guessed: those whose leading dim doubles when the step gets twice the windows. The hook point is the holder itself if the step calls it,
else its nearest ancestor that the step calls (a fused layer that reads its children's weights
directly, an attention module that reads ``out_proj.weight``). :func:`check` runs one step of
every copy both ways on one window and says which copies agree: the probe runs the others one
at a time, and falls back to :mod:`tqslite.batched` (``torch.vmap``) if none does.

The activation probe (:mod:`tqslite.activations.probe`) runs its layers as row blocks too: its
hooks add noise to copy ``k``'s rows at layer ``k`` only, and it shares :func:`step_rows`,
:func:`copy_windows` and :func:`agrees` with the weight probe.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .batched import NotBatchable, copies_divergence
from .systems import swapped

#: Agreement asked of a copy's first step, batched against one unit at a time: the gap at most
#: this fraction of the perturbation's own effect on the step, plus rounding (see :func:`check`).
AGREEMENT = 1e-2


@dataclass(frozen=True)
class RowBlocks:
    """The engine's one setting: which module reruns the copies of each tensor.

    ``points`` maps a parameter name (``system.parameter_names()``) to the dotted path of its hook
    point in ``system.module`` (``""``: the module itself). Built by :func:`hook_points`.
    """

    points: tuple[tuple[str, str], ...]
    #: Per hook point, which of its input tensors (positional, then keyword, in call order) and
    #: which of its outputs are batch tensors: ``(point, inputs, outputs)``, tuples of bools.
    layouts: tuple[tuple[str, tuple[bool, ...], tuple[bool, ...]], ...]


def supports_row_blocks(system) -> bool:
    """Whether ``system`` computes its step with an ``nn.Module`` (``system.module``) the hooks can reach."""
    return isinstance(getattr(system, "module", None), nn.Module)


def hook_points(system, names: Sequence[str], x: torch.Tensor) -> RowBlocks:
    """For every parameter in ``names``, the nearest module holding it that ``system.step`` calls.

    Runs two plain steps, on ``x`` ``(b, *S)`` and on twice as many windows, with a hook on the
    holder of each parameter and on every ancestor of it; keeps, per parameter, the deepest one
    that was called, and records which of its inputs and outputs grew with the windows. Raises
    :class:`~tqslite.batched.NotBatchable` if the step calls none of them (not even
    ``system.module``) or calls a hook point more than once per step (shared layers).
    """
    root = system.module
    holders = {n: n.rpartition(".")[0] for n in names}
    candidates = {p for h in holders.values() for p in _ancestors(h)}
    seen: list[dict] = []
    for states in (x, torch.cat([x, x])):
        shapes, handles = {}, []

        def record(module, args, kwargs, output, path):
            shapes.setdefault(path, []).append(([t.shape for t in _tensors((args, kwargs))],
                                                [t.shape for t in _tensors(output)]))
        try:
            for path in candidates:
                handles.append(root.get_submodule(path).register_forward_hook(
                    lambda m, a, kw, o, path=path: record(m, a, kw, o, path), with_kwargs=True))
            system.step(states)
        finally:
            for h in handles:
                h.remove()
        seen.append(shapes)
    points = []
    for name, holder in holders.items():
        reached = [p for p in _ancestors(holder) if p in seen[0]]
        if not reached:
            raise NotBatchable(f"the step never calls {type(root).__name__} or a submodule holding {name!r}")
        points.append((name, reached[0]))
    layouts = []
    for point in sorted({p for _, p in points}):
        calls = (seen[0][point], seen[1].get(point, []))
        if len(calls[0]) != 1 or len(calls[1]) != 1:
            raise NotBatchable(f"module {point or '(the model)'!r} is called {len(calls[0])} times per step")
        (ins1, outs1), (ins2, outs2) = calls[0][0], calls[1][0]
        if len(ins1) != len(ins2) or len(outs1) != len(outs2):
            raise NotBatchable(f"module {point or '(the model)'!r} takes other arguments for other batch sizes")
        layouts.append((point, tuple(_grew(a, b) for a, b in zip(ins1, ins2)),
                        tuple(_grew(a, b) for a, b in zip(outs1, outs2))))
    return RowBlocks(tuple(points), tuple(layouts))


def _grew(one: torch.Size, two: torch.Size) -> bool:
    """A batch tensor: the same shape but for a leading dim twice as long with twice the windows."""
    return len(one) > 0 and len(one) == len(two) and two[0] == 2 * one[0] and one[1:] == two[1:]


def _ancestors(path: str) -> list[str]:
    """``path`` and every module above it, deepest first: ``"a.b"`` -> ``["a.b", "a", ""]``."""
    parts = path.split(".") if path else []
    return [".".join(parts[:i]) for i in range(len(parts), -1, -1)]


class _Pass:
    """The hooks of one batched pass: ``K`` copies, each with its perturbed tensors ``{name: value}``."""

    def __init__(self, system, engine: RowBlocks, perturbed: Sequence[Mapping[str, torch.Tensor]]):
        self.k, self.rerunning = len(perturbed), False
        root, points = system.module, dict(engine.points)
        # per hook point: [(copy, {attribute path below the hook point: value})]
        self.copies: dict[str, list[tuple[int, dict]]] = {}
        for k, weights in enumerate(perturbed):
            # a copy whose tensors sit at nested hook points (a block unit) reruns them all at the
            # outermost: an inner point's rerun would run inside the outer one's as the plain layer
            own = {points[name] for name in weights}
            outer = {p: next(a for a in reversed(_ancestors(p)) if a in own) for p in own}
            by_point: dict[str, dict] = {}
            for name, value in weights.items():
                point = outer[points[name]]
                by_point.setdefault(point, {})[name[len(point) + 1:] if point else name] = value
            for point, values in by_point.items():
                self.copies.setdefault(point, []).append((k, values))
        self.modules = {point: root.get_submodule(point) for point in self.copies}
        self.layouts = {point: (ins, outs) for point, ins, outs in engine.layouts}

    @contextlib.contextmanager
    def hooked(self):
        """Install the pass on the model for the ``with`` block: a stacked forward on every plain
        ``Linear`` hook point, a forward hook on the others; everything is removed on exit."""
        handles, stacked = [], []
        try:
            for point, m in self.modules.items():
                if _plain_linear(m, self.copies[point]) and self.layouts[point] == ((True,), (True,)):
                    m.forward = self._stacked_linear(m, self.copies[point])
                    stacked.append(m)
                    # a hooked module, as in hook_points: torch's fused layers (TransformerEncoderLayer)
                    # skip their fast path, which reads the children's weights directly, when one is hooked
                    handles.append(m.register_forward_hook(_nothing))
                else:
                    handles.append(m.register_forward_hook(self._hook(point), with_kwargs=True))
            yield self
        finally:
            for h in handles:
                h.remove()
            for m in stacked:
                del m.forward  # the class's forward again

    def _stacked_linear(self, module: nn.Linear, copies):
        """``Linear.forward`` for ``K`` copies at once: one batched product with ``K`` weight matrices,
        copy ``k``'s own where it perturbs them, the module's elsewhere (``(K, in, out)``, built once)."""
        n = self.k
        wt = module.weight.detach().t().unsqueeze(0).repeat(n, 1, 1)
        bt = None if module.bias is None else module.bias.detach().reshape(1, 1, -1).repeat(n, 1, 1)
        for k, values in copies:
            if "weight" in values:
                wt[k] = values["weight"].t()
            if "bias" in values:
                bt[k, 0] = values["bias"]

        def forward(x):
            if self.rerunning:  # inside the rerun of an enclosing hook point: one copy, the plain layer
                return F.linear(x, module.weight, module.bias)
            y = torch.bmm(x.reshape(n, -1, x.shape[-1]), wt) if bt is None else \
                torch.baddbmm(bt, x.reshape(n, -1, x.shape[-1]), wt)
            return y.reshape(*x.shape[:-1], wt.shape[2])

        return forward

    def _hook(self, point: str):
        copies, (ins, outs) = self.copies[point], self.layouts[point]
        module = self.modules[point]
        weights = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}

        def hook(module, args, kwargs, output):
            if self.rerunning:  # a rerun of this or an enclosing module: the plain computation
                return None
            # the hook writes into the output: copy any of its tensors that share memory with an input or a weight
            protected = weights | {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
            out = _map(output, lambda t: t.clone() if t.untyped_storage().data_ptr() in protected else t)
            targets = [t for t, batch in zip(_tensors(out), outs) if batch]
            for k, values in copies:
                a, kw = _block((args, kwargs), ins, k, self.k)
                self.rerunning = True
                try:
                    out_k = _rerun(module, values, a, kw)
                finally:
                    self.rerunning = False
                for target, new in zip(targets, [t for t, batch in zip(_tensors(out_k), outs) if batch]):
                    per = target.shape[0] // self.k
                    if new.shape != (per, *target.shape[1:]):
                        raise NotBatchable(f"module {point or '(the model)'!r}: copy output {tuple(new.shape)} "
                                           f"does not fit its block of {tuple(target.shape)}")
                    target[k * per:(k + 1) * per] = new
            return out

        return hook

    def step(self, system, x: torch.Tensor) -> torch.Tensor:
        """One step of the ``K`` copies on states ``(K, b, *S)``."""
        return step_rows(system, x)


def step_rows(system, x: torch.Tensor) -> torch.Tensor:
    """One plain step of states ``(K, b, *S)`` as ``K * b`` rows: ``(K, b, *S)``."""
    k, b = x.shape[:2]
    return system.step(x.reshape(k * b, *x.shape[2:])).reshape(x.shape)


def _nothing(module, args, output):
    return None


def _plain_linear(module: nn.Module, copies) -> bool:
    """A ``Linear`` whose forward is torch's own, perturbed only in its weight and bias."""
    return type(module).forward is nn.Linear.forward and all(set(v) <= {"weight", "bias"} for _, v in copies)


def _rerun(module: nn.Module, values: dict, args, kwargs):
    """``module(*args, **kwargs)`` with the tensors ``values`` (attribute paths) in place of its own."""
    forward = type(module).forward
    if not kwargs and len(args) == 1 and set(values) <= {"weight", "bias"}:  # common layers, without functional_call
        w, bias = values.get("weight", module.weight), values.get("bias", getattr(module, "bias", None))
        if forward in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward):
            return module._conv_forward(args[0], w, bias)
        if forward is nn.LayerNorm.forward:
            return F.layer_norm(args[0], module.normalized_shape, w, bias, module.eps)
    return functional_call(module, values, args, kwargs)


def _block(obj, flags: Sequence[bool], k: int, n_copies: int):
    """``obj`` with every batch tensor (``flags``, in :func:`_tensors` order) cut to copy ``k``'s rows."""
    it = iter(flags)

    def cut(t):
        per = t.shape[0] // n_copies
        return t[k * per:(k + 1) * per] if next(it, False) else t

    return _map(obj, cut)


def _map(obj, fn):
    """``obj`` (tensors in nested tuples, named tuples, lists and dicts) with ``fn`` applied to each
    tensor, in :func:`_tensors` order."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple takes its fields as arguments
        return type(obj)(*(_map(o, fn) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {key: _map(o, fn) for key, o in obj.items()}
    return obj


def _tensors(obj) -> list[torch.Tensor]:
    """The tensors in ``obj`` (nested tuples, lists and dicts), depth first."""
    found = []
    _map(obj, found.append)
    return found


def divergence(system, engine: RowBlocks, x0: torch.Tensor, ref: torch.Tensor, batch_size: int,
               perturbed: Sequence[Mapping[str, torch.Tensor]]) -> np.ndarray:
    """RMS divergence ``(K, window, lead)`` of ``K`` perturbed copies of ``system`` from ``ref``.

    ``x0`` ``(N, *S)`` and ``ref`` ``(T, N, *S)`` as in :func:`tqslite.batched.batched_divergence`;
    each pass is one step of the model on ``K * batch_size`` rows. Returns float64 ``(K, N, T)``
    (NaN where a copy's rollout turned non-finite); raises
    :class:`~tqslite.batched.NotBatchable` if a hook point's output is not batch-major.
    """
    run = _Pass(system, engine, perturbed)
    with run.hooked():
        return copies_divergence(lambda x: run.step(system, x), run.k, x0, ref, batch_size)[0]


def check(system, engine: RowBlocks, x: torch.Tensor, perturbed: Sequence[Mapping[str, torch.Tensor]]) -> np.ndarray:
    """Which of ``K`` copies step as the one-unit probe does: bool ``(K,)``.

    Copy ``k`` starts from window ``k mod n`` of ``x`` ``(n, *S)`` (different windows, so that a
    model that mixes the rows of a batch mixes visibly different copies), one window each: one
    batched step of the ``K`` copies against ``K`` single steps with the weights swapped in.
    Copy ``k`` agrees if ``max |batched - single| <= AGREEMENT * max |single - plain| + 64 * eps *
    max |plain|`` (``plain``: the unperturbed step from the same window, ``eps``: the dtype's
    resolution), i.e. the batched pass reproduces the copy's own perturbation, not another
    copy's or none. Raises :class:`~tqslite.batched.NotBatchable` if the batched step fails
    altogether.
    """
    states = copy_windows(x, len(perturbed))
    run = _Pass(system, engine, perturbed)
    try:
        with run.hooked():
            batched = run.step(system, states)
    except (torch.OutOfMemoryError, NotBatchable):
        raise
    except Exception as e:  # noqa: BLE001 -- whatever the hooks break, the one-unit path runs
        raise NotBatchable(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    agree = np.zeros(len(perturbed), dtype=bool)
    for k, weights in enumerate(perturbed):
        plain = system.step(states[k])
        with swapped(system, weights):
            single = system.step(states[k])
        agree[k] = agrees(batched[k], single, plain)
    return agree


def copy_windows(x: torch.Tensor, k: int) -> torch.Tensor:
    """States ``(k, 1, *S)`` for a check of ``k`` copies: copy ``j`` starts from window ``j mod n`` of ``x`` ``(n, *S)``."""
    return x[torch.arange(k, device=x.device) % x.shape[0]].unsqueeze(1)


def agrees(batched: torch.Tensor, single: torch.Tensor, plain: torch.Tensor) -> bool:
    """Whether a copy's batched step reproduces its step alone: ``max |batched - single| <= AGREEMENT *
    max |single - plain| + 64 * eps * max |plain|`` (``plain``: the unperturbed step, ``eps``: the
    dtype's resolution)."""
    tiny = 64 * torch.finfo(plain.dtype).eps * float(plain.abs().max())
    effect = float((single - plain).abs().max())
    gap = float((batched - single).abs().max())
    return math.isfinite(gap) and gap <= AGREEMENT * effect + tiny


__all__ = ["AGREEMENT", "RowBlocks", "agrees", "check", "copy_windows", "divergence", "hook_points", "step_rows",
           "supports_row_blocks"]
