"""Batched perturbed rollouts: ``K`` copies of one model, each with its own weights, in one pass.

The TQS probe rolls out one perturbed copy of the model per unit (:mod:`tqslite.probe`). Run one
after the other, every copy pays for every kernel launch and every Python call of the forward
pass on a batch of only ``B`` windows. Here ``K`` copies run together, as one forward pass on a
batch ``(K, B, *S)``:

* the tensors that any of the ``K`` units perturbs are stacked along a new leading dim of size
  ``K`` (copy ``k`` holds unit ``k``'s perturbed values and the original values of the tensors
  the other units perturb); every other tensor is shared, not copied;
* :func:`torch.vmap` maps the system's ``functional_step(params, x)`` (one step with some
  parameters replaced, by :func:`torch.func.functional_call`) over that dim: a ``Linear`` whose
  weight is shared runs as one matrix product on ``K * B`` rows, one whose weight is stacked as
  a batched product;
* the divergence from the unperturbed rollout is reduced on the device at every step, so a chunk
  never holds its ``K`` trajectories.

Each copy computes what the one-unit path computes, up to the order of floating-point operations
inside batched kernels: scores agree within float tolerance, not bit for bit.

**Memory.** A chunk of ``K`` units holds ``K`` copies of every tensor its units perturb, plus
``K`` times the activations of one step. :func:`plan_chunks` cuts the units into chunks that
fit a budget, the activations measured by :func:`step_memory` (the peak of the tensors alive
during one plain step, tracked op by op). A unit that does not fit even alone runs by itself,
its weights swapped in place (no copy).

**What it needs.** A system with ``functional_step`` (:class:`~tqslite.systems.TorchSystem`,
:class:`~tqslite.systems.WindowedSystem`) whose step :func:`torch.vmap` can map: no Python
branch on tensor values, no ``.item()``. :func:`check_batchable` tries one batched step and says
why not; the probe then runs one unit at a time, as it always does for ONNX graphs and systems
without ``functional_step``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import warnings
import weakref
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

#: PyTorch's message when an op has no batching rule and vmap runs it once per copy.
_SLOW_OP = re.compile(r"batching rule for (\S+)\.")
#: Budget on the CPU for a chunk's stacked weights and activations, in bytes, when batches are
#: asked for there (the probe's default on the CPU is one unit at a time).
CPU_BUDGET = 2**30


class NotBatchable(RuntimeError):
    """The system's step cannot be mapped by :func:`torch.vmap` (the reason is the message)."""


@dataclasses.dataclass(frozen=True)
class Vmap:
    """The probe's ``engine`` value for :func:`torch.func.vmap` over stacked copies of the perturbed
    parameters (:func:`batched_divergence`); :class:`tqslite.row_blocks.RowBlocks` is the other."""


def supports_batching(system) -> bool:
    """Whether ``system`` has a ``functional_step(params, x)`` that the batched engine can map."""
    return callable(getattr(system, "functional_step", None))


# --------------------------------------------------------------------------------------------
# K perturbed copies in one pass
# --------------------------------------------------------------------------------------------

def stack_perturbed(system, perturbed: Sequence[dict]) -> dict:
    """``{name: (K, *shape)}`` for every tensor any of the ``K`` perturbed weight sets replaces.

    Copy ``k`` holds ``perturbed[k][name]`` where unit ``k`` perturbs ``name``, the model's own
    values elsewhere.
    """
    names = list(dict.fromkeys(n for weights in perturbed for n in weights))
    return {n: torch.stack([w[n] if n in w else system.get_parameter(n) for w in perturbed]) for n in names}


def batched_divergence(system, x0: torch.Tensor, ref: torch.Tensor, batch_size: int,
                       perturbed: Sequence[dict]) -> np.ndarray:
    """RMS divergence ``(K, window, lead)`` of ``K`` perturbed copies of ``system`` from ``ref``.

    Parameters
    ----------
    system
        Has ``functional_step(params, x)``.
    x0 : Tensor, ``(N, *S)``
        Initial states, on the system's device.
    ref : Tensor, ``(T, N, *S)``
        The unperturbed rollout.
    batch_size : int
        Windows per pass: each pass is ``(K, batch_size, *S)``.
    perturbed : sequence of dict
        ``K`` weight sets ``{name: tensor}``, one per copy.

    Returns
    -------
    ndarray, float64, ``(K, N, T)``
        Raw divergences (NaN where a copy's rollout turned non-finite); raises
        :class:`NotBatchable` if ``torch.vmap`` cannot map the step.
    """
    params = stack_perturbed(system, perturbed)
    step = torch.vmap(system.functional_step, in_dims=({n: 0 for n in params}, 0))
    return copies_divergence(lambda x: step(params, x), len(perturbed), x0, ref, batch_size)[0]


def copies_divergence(step: Callable, k: int, x0: torch.Tensor, ref: torch.Tensor, batch_size: int):
    """Roll ``k`` copies out together with ``step`` and reduce their divergence from ``ref``.

    Both engines use it: ``step`` (vmapped here, row blocks in :mod:`tqslite.row_blocks`) maps
    states ``(k, b, *S)`` to the next states, or to ``(next states, aux)`` with
    ``aux`` a tensor ``(k, ...)`` (collected, one per window batch and step, in that order).
    Returns ``(divergence, aux)``: float64 ``(k, N, T)`` on the CPU, and the list of ``aux``.
    Where ``ref`` is NaN (a missing value in the reference rollout of a system that masks missing
    values), the copies count as not different, as in the one-unit probe; NaN anywhere else
    makes that copy's divergence NaN.
    Any error of the step (what ``torch.vmap`` or the row blocks refuse) is raised as :class:`NotBatchable`.
    """
    horizon, n = ref.shape[0], x0.shape[0]
    div = torch.empty((horizon, k, n), dtype=torch.float64, device=ref.device)
    missing = torch.isnan(ref)  # a value missing from the reference (a system that masks NaN): no difference
    has_missing = bool(missing.any())
    aux = []
    for i in range(0, n, batch_size):
        x = x0[i:i + batch_size]
        x = x.expand(k, *x.shape)
        for t in range(horizon):
            try:
                out = step(x)
            except torch.OutOfMemoryError:  # the caller splits the chunk
                raise
            except Exception as e:  # noqa: BLE001 -- whatever vmap refuses, the one-unit path can run
                raise NotBatchable(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
            if isinstance(out, tuple):
                out, extra = out
                aux.append(extra)
            x = out
            diff = x - ref[t, i:i + batch_size]
            if has_missing:
                diff = torch.where(missing[t, i:i + batch_size], torch.zeros_like(diff), diff)
            diff = diff.flatten(2)
            div[t, :, i:i + batch_size] = torch.linalg.vector_norm(diff, dim=2, dtype=torch.float64) / math.sqrt(
                diff.shape[2])
    return div.permute(1, 2, 0).cpu().numpy(), aux


def check_batchable(system, x: torch.Tensor, perturbed: Sequence[dict]) -> list[str]:
    """Try one batched step of ``system`` on states ``x`` ``(b, *S)``; the ops vmap ran copy by copy.

    Raises :class:`NotBatchable` (with PyTorch's reason) if the step cannot be mapped. Returns the
    names of the operators that have no batching rule: PyTorch runs them once per copy (exact,
    but without the batched speed-up).
    """
    if not supports_batching(system):
        raise NotBatchable(f"{type(system).__name__} has no functional_step(params, x)")
    params = stack_perturbed(system, perturbed)
    step = torch.vmap(system.functional_step, in_dims=({n: 0 for n in params}, 0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            step(params, x.expand(len(perturbed), *x.shape))
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001
            raise NotBatchable(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    slow = set()
    for w in caught:
        match = _SLOW_OP.search(str(w.message))
        if match:
            slow.add(match.group(1))
        else:  # not ours to swallow
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return sorted(slow)


@contextlib.contextmanager
def quiet_slow_ops():
    """Silence PyTorch's "no batching rule" warning, which it repeats at every call (reported once instead)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"There is a performance drop because we have not yet implemented "
                                                  r"the batching rule")
        yield


# --------------------------------------------------------------------------------------------
# Memory: how many units fit in one pass
# --------------------------------------------------------------------------------------------

class _LiveBytes(TorchFunctionMode):
    """Tracks the bytes of the tensors torch functions return while they are alive, and their peak.

    Storages are counted once, however many views share them, and released when the last tensor
    seen on them is garbage collected.
    """

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts: not counted
            return
        key = storage.data_ptr()
        if key == 0:
            return
        if key in self.live:
            self.live[key][1] += 1
        else:
            self.live[key] = [storage.nbytes(), 1]
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
        weakref.finalize(t, self._release, key)

    def _release(self, key) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]


def step_memory(step: Callable, x: torch.Tensor) -> int:
    """Peak bytes of the tensors alive during ``step(x)``, beyond ``x`` and the weights (op by op).

    What one more copy of the model adds to a batched pass on a batch like ``x``: its
    activations. Measured on any device, the same way, so chunks do not depend on it.
    """
    tracker = _LiveBytes()
    with torch.no_grad(), tracker:
        y = step(x)
    del y
    return int(tracker.peak)


def default_memory_budget(device: torch.device) -> int:
    """Bytes a chunk may use: half the free memory of a CUDA device, :data:`CPU_BUDGET` elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 2)
    return CPU_BUDGET


def parse_bytes(value) -> int:
    """A number of bytes from an int or a string such as ``"512MB"``, ``"2 GiB"`` or ``"1.5GB"``."""
    if isinstance(value, bool):
        raise ValueError(f"memory_budget={value!r}: give bytes (an int) or a size such as '2GB'.")
    if isinstance(value, (int, float)) and value > 0 and math.isfinite(value):
        return int(value)
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(value))
    if not match or not match.group(1).replace(".", "", 1).isdigit():
        raise ValueError(f"memory_budget={value!r}: give bytes (an int) or a size such as '512MB' or '2GiB'.")
    number, prefix, binary = float(match.group(1)), match.group(2).upper(), match.group(3)
    scale = (1024 if binary else 1000) ** " KMGT".index(prefix or " ")
    if number <= 0:
        raise ValueError(f"memory_budget={value!r}: the budget must be positive.")
    return int(number * scale)


def plan_chunks(units: Sequence[Sequence[str]], tensor_bytes: dict, activation_bytes: int, budget: int,
                max_units: int | None = None) -> list[list[int]]:
    """Cut units into consecutive chunks whose batched pass fits ``budget`` bytes.

    A chunk of ``K`` units needs ``K * (sum of the bytes of the tensors its units perturb +
    activation_bytes)``: ``K`` stacked copies of each perturbed tensor and ``K`` copies' activations.
    Units are taken in order; a chunk closes when the next unit would break the budget or
    ``max_units``. A unit that does not fit alone gets a chunk of its own (run one at a time,
    in place).

    Returns the chunks as lists of indices into ``units``.
    """
    chunks, current, names = [], [], set()
    for i, params in enumerate(units):
        grown = names | set(params)
        k = len(current) + 1
        need = k * (sum(tensor_bytes[n] for n in grown) + activation_bytes)
        if current and (need > budget or (max_units is not None and k > max_units)):
            chunks.append(current)
            current, grown = [], set(params)
        current.append(i)
        names = grown
    if current:
        chunks.append(current)
    return chunks


__all__ = ["CPU_BUDGET", "NotBatchable", "Vmap", "batched_divergence", "check_batchable", "copies_divergence",
           "default_memory_budget", "parse_bytes", "plan_chunks", "quiet_slow_ops", "stack_perturbed", "step_memory",
           "supports_batching"]
