"""Closed-loop refinement: improve a knapsack plan by measuring whole quantized models (SPEC section 3).

The knapsack (:func:`tqslite.allocate`) adds up independent per-unit costs, each predicted by
linear response from one unit perturbed alone. Whole plans break both assumptions at low bit
widths: errors of different units interact, and the prediction is only first order (notebook 05
measured the linear sum over-predicting whole-plan errors about twofold). Refinement starts from
the knapsack's plan and judges whole configurations by what they do: the **fitness** of a plan
is the RMS, over the probe states, of the divergence at the horizon between the rollout of the
whole quantized model and the float model's rollout (the probe's divergence, SPEC section 2) --
measured on the probe states only, never on evaluation windows. Two ways:

* :func:`refine` -- an evolutionary search over whole plans at the same size, after EvoPress
  (Sieberling et al., 2024): each generation mutates the current plan into ``offspring``
  candidates by moving bits between units (one unit up one option, paid for by others going
  down, so that the size stays within the budget), screens them cheaply (few windows, a short
  horizon: :class:`Fidelity`), and measures only the survivors on every probe state at the full
  horizon. A candidate replaces the current plan only if its full fitness is lower, so the
  result is never worse than the start on the probe states, and never over budget.
* :func:`operating_point` -- each unit's cost measured where the plan operates: every unit moved
  to each of its nearby options with all the others already quantized as in the plan, the
  squared fitness of that whole model taken as the unit's cost, and the knapsack solved again;
  repeated for ``rounds``. Its plan is kept only if it measures better than the start.

Both work with any quantizer through a :class:`~tqslite.bank.WeightBank` (every tensor
quantized once per option: a candidate plan costs one rollout, no quantizer run), and both
report what they cost: candidate evaluations per fidelity, model rollouts in units of one full
rollout of every probe state over the horizon, and seconds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import xarray as xr
from tqdm import tqdm

from .allocation import allocate, plan_from_rows
from .bank import WeightBank
from .plans import Plan, plan_size
from .systems import as_system, rollout, swapped


@dataclass(frozen=True)
class Fidelity:
    """How carefully a plan is measured: the first ``n_windows`` probe states over ``horizon`` steps.

    ``None`` means all of them (every probe state; the judge's full horizon).
    """

    n_windows: int | None = None
    horizon: int | None = None

    def __post_init__(self):
        for key in ("n_windows", "horizon"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{key}={v!r}: give a positive integer, or None for all.")


#: Every probe state at the full horizon.
FULL = Fidelity()


class Judge:
    """Measures the fitness of whole plans of one model on its probe states.

    Parameters
    ----------
    model : nn.Module or system
        The float model. Its weights are swapped for a plan's during a measurement and restored
        bit for bit afterwards.
    bank : WeightBank or None
        The quantized weights every plan is assembled from (``None``: only
        :meth:`fitness_of` weights made elsewhere can be measured).
    x0 : Tensor, ``(N, *S)``
        Probe states (never evaluation windows).
    horizon : int
        The lead ``T`` whose divergence is the fitness.
    batch_size : int, optional
        Windows per forward call.

    Attributes
    ----------
    state_steps : int
        Model steps run so far, summed over windows (the cost; a full measurement is ``N * T``).
    evaluations : dict
        Measurements so far, per fidelity ``(n_windows, horizon)``.
    """

    def __init__(self, model, bank: WeightBank | None, x0: torch.Tensor, horizon: int, batch_size: int | None = None):
        if bank is not None and not isinstance(bank, WeightBank):
            raise ValueError(f"bank={bank!r}: pass a WeightBank (WeightBank.build(model, options, quantizer, "
                             "calibration)), so that a candidate plan needs no quantizer run.")
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"horizon={horizon!r}: give the lead of the fitness, an integer >= 1.")
        self.system = as_system(model)
        self.bank = bank
        self.x0 = torch.as_tensor(x0).to(self.system.dtype)
        self.horizon = horizon
        self.batch_size = batch_size
        with self.system.evaluating():
            self.reference = rollout(self.system, self.x0, horizon, batch_size)  # (T, N, *S), computed once
        self.state_steps = 0
        self.evaluations: dict = {}

    @property
    def n_windows(self) -> int:
        return len(self.x0)

    @property
    def full_rollouts(self) -> float:
        """The cost so far in full rollouts (every probe state over the horizon)."""
        return self.state_steps / (self.n_windows * self.horizon)

    def _resolve(self, fidelity: Fidelity) -> tuple[int, int]:
        n = min(fidelity.n_windows or self.n_windows, self.n_windows)
        h = min(fidelity.horizon or self.horizon, self.horizon)
        return n, h

    def divergence(self, plan: Plan, fidelity: Fidelity = FULL) -> np.ndarray:
        """RMS divergence ``(window,)`` at the fidelity's horizon of the plan's model from the float model."""
        if self.bank is None:
            raise ValueError("this judge has no bank: measure weights with fitness_of, or pass a WeightBank.")
        return self.divergence_of(self.bank.dequantized(self.system, plan.tensor_configs()), fidelity)

    def divergence_of(self, weights: dict, fidelity: Fidelity = FULL) -> np.ndarray:
        """:meth:`divergence` of the model with ``weights`` ``{name: tensor}`` swapped in (from any quantizer)."""
        n, h = self._resolve(fidelity)
        with self.system.evaluating(), swapped(self.system, weights):
            traj = rollout(self.system, self.x0[:n], h, self.batch_size)
        diff = (traj[h - 1] - self.reference[h - 1, :n]).flatten(1).double()
        d = torch.linalg.vector_norm(diff, dim=1).numpy() / math.sqrt(diff.shape[1])
        self.state_steps += n * h
        self.evaluations[n, h] = self.evaluations.get((n, h), 0) + 1
        return np.where(np.isfinite(d), d, np.inf)

    def fitness(self, plan: Plan, fidelity: Fidelity = FULL) -> float:
        """``sqrt(mean over windows of d**2)``: the RMS divergence at the horizon (lower is better)."""
        return self._rms(self.divergence(plan, fidelity))

    def fitness_of(self, weights: dict, fidelity: Fidelity = FULL) -> float:
        """:meth:`fitness` of the model with ``weights`` swapped in (e.g. GPTQ run anew on a mixed plan)."""
        return self._rms(self.divergence_of(weights, fidelity))

    @staticmethod
    def _rms(d: np.ndarray) -> float:
        return float(np.sqrt(np.mean(d**2))) if np.isfinite(d).all() else math.inf


@dataclass
class Refined:
    """What a refinement returns.

    Attributes
    ----------
    plan : Plan
        The best plan found (the start if nothing measured better).
    start_fitness, fitness : float
        Full fitness of the start and of ``plan`` on the probe states.
    history : list of dict
        Per generation (or round): the best full fitness so far and whether a candidate was taken.
    evaluations : dict
        Measurements per fidelity ``"n_windows x horizon"``.
    rollouts : float
        Cost in full rollouts (every probe state over the horizon).
    seconds : float
        Wall time.
    """

    plan: Plan
    start_fitness: float
    fitness: float
    history: list = field(default_factory=list)
    evaluations: dict = field(default_factory=dict)
    rollouts: float = 0.0
    seconds: float = 0.0

    @property
    def gain(self) -> float:
        """``1 - fitness / start_fitness``: the fraction of the start's divergence removed (>= 0)."""
        return 1.0 - self.fitness / self.start_fitness if self.start_fitness > 0 else 0.0


def _levels(table: xr.Dataset) -> list[np.ndarray]:
    """Per unit, its allowed option indices in increasing size (ties: increasing nominal bits)."""
    size, allowed, bits = table["size"].values, table["allowed"].values, table["bits"].values
    return [np.array(sorted(np.flatnonzero(allowed[i]), key=lambda k: (size[i, k], bits[k])))
            for i in range(len(size))]


def _rows(plan: Plan, table: xr.Dataset) -> np.ndarray:
    labels = [str(o) for o in table["option"].values]
    try:
        return np.array([labels.index(plan[str(u)].label) for u in table["unit"].values])
    except (KeyError, ValueError):
        raise ValueError("the plan does not match the table: every unit of the table needs a plan entry among the "
                         f"table's options {labels}.") from None


def _budget(table: xr.Dataset, budget_bits: float) -> float:
    return float(budget_bits) * float(table.attrs["n_params_total"]) - float(table.attrs["outside_bits"])


def _size(table: xr.Dataset, rows: np.ndarray) -> float:
    return float(table["size"].values[np.arange(len(rows)), rows].sum())


def _mutate(rows, levels, sizes, limit, floor, rng, max_moves: int):
    """A neighbour of ``rows`` between ``floor`` and ``limit`` bits: up to ``max_moves`` units one option up, paid by
    others going down; slack below ``floor`` is filled by raising other units that still fit (else ``None``)."""
    rows = rows.copy()
    pos = [int(np.flatnonzero(lv == r)[0]) for lv, r in zip(levels, rows)]
    raised, lowered = set(), set()
    for _ in range(int(rng.integers(1, max_moves + 1))):
        can_rise = [i for i in range(len(rows)) if pos[i] + 1 < len(levels[i]) and i not in raised]
        if not can_rise:
            break
        i = int(rng.choice(can_rise))
        pos[i] += 1
        rows[i] = levels[i][pos[i]]
        raised.add(i)
    total = sum(sizes[i, r] for i, r in enumerate(rows))
    while total > limit:
        can_fall = [j for j in range(len(rows)) if pos[j] > 0 and j not in raised]
        if not can_fall:
            return None
        saving = np.array([sizes[j, rows[j]] - sizes[j, levels[j][pos[j] - 1]] for j in can_fall], float)
        if not (saving > 0).any():
            return None
        j = can_fall[int(rng.choice(len(can_fall), p=saving / saving.sum()))]  # big savings first: few moves
        total -= saving[can_fall.index(j)]
        pos[j] -= 1
        rows[j] = levels[j][pos[j]]
        lowered.add(j)
    for i in rng.permutation(len(rows)):  # fill the slack: the budget is a size to match, not only a ceiling
        if total >= floor:
            break
        if i in lowered or pos[i] + 1 >= len(levels[i]):
            continue
        extra = sizes[i, levels[i][pos[i] + 1]] - sizes[i, rows[i]]
        if total + extra <= limit:
            total += extra
            pos[i] += 1
            rows[i] = levels[i][pos[i]]
    return rows if total >= floor else None


def refine(judge: Judge, table: xr.Dataset, plan: Plan, budget_bits: float, *, generations: int = 20,
           offspring: int = 16, survivors: int = 4, screen: Fidelity | None = None, max_moves: int = 2,
           min_fill: float = 0.99, patience: int | None = None, seed: int = 0, progress: bool = False) -> Refined:
    """An evolutionary search over whole plans at the same size, from ``plan`` (see the module docstring).

    Parameters
    ----------
    judge : Judge
        Measures plans on the probe states.
    table : xarray.Dataset
        The cost table ``plan`` was solved from (:func:`tqslite.cost_table`): its options, sizes and
        allowed options per unit; its costs are not used.
    plan : Plan
        The start, e.g. the knapsack's plan.
    budget_bits : float
        The size budget in bits per parameter (scales and outside parameters included): no
        candidate above it is ever measured.
    generations : int
        Rounds of mutation and selection.
    offspring : int
        Candidates per generation, screened at ``screen`` fidelity.
    survivors : int
        Candidates per generation measured at full fidelity.
    screen : Fidelity, optional
        The cheap fidelity (default: a quarter of the probe states, a third of the horizon).
    max_moves : int
        At most this many units go one option up in a mutation.
    min_fill : float
        Every candidate stores at least this fraction of the budget (or as much as ``plan``, if
        less), so that it stays a matched-size competitor of methods at the budget.
    patience : int, optional
        Stop after this many generations without improvement.
    seed : int
        Seeds the mutations.
    progress : bool
        A progress bar over generations.

    Returns
    -------
    Refined
        Never over budget, never below ``min_fill`` of it (unless the start was), never a worse
        full fitness than ``plan``'s.
    """
    t0 = time.perf_counter()
    steps0 = judge.state_steps
    evals0 = dict(judge.evaluations)
    screen = screen or Fidelity(max(1, judge.n_windows // 4), max(1, judge.horizon // 3))
    rng = np.random.default_rng(seed)
    levels, sizes = _levels(table), table["size"].values
    limit = _budget(table, budget_bits)
    rows = _rows(plan, table)
    start_size = _size(table, rows)
    if start_size > limit * (1 + 1e-12):
        raise ValueError(f"the start plan is over the budget of {budget_bits} bits per parameter.")
    outside = float(table.attrs["outside_bits"])
    floor = min(start_size, min_fill * (limit + outside) - outside)
    best = judge.fitness(plan)
    start, best_plan, history, stale = best, plan, [], 0
    for g in tqdm(range(generations), desc="refine", disable=not progress):
        kids, seen = [], {tuple(rows)}
        for _ in range(offspring * 10):
            if len(kids) == offspring:
                break
            k = _mutate(rows, levels, sizes, limit, floor, rng, max_moves)
            if k is not None and tuple(k) not in seen:
                seen.add(tuple(k))
                kids.append(k)
        if not kids:
            break
        plans = [plan_from_rows(table, k, {}) for k in kids]
        cheap = np.array([judge.fitness(p, screen) for p in plans])
        keep = np.argsort(cheap, kind="stable")[:survivors]
        full = [(judge.fitness(plans[i]), i) for i in keep if np.isfinite(cheap[i])]
        taken = False
        if full:
            f, i = min(full)
            if f < best:
                best, rows, best_plan, taken = f, kids[i], plans[i], True
        stale = 0 if taken else stale + 1
        history.append(dict(generation=g, fitness=best, taken=taken))
        if patience is not None and stale >= patience:
            break
    info = dict(plan.info, **{"refined by": "refine", "generations": len(history), "offspring": offspring,
                              "survivors": survivors, "seed": seed, "start fitness": start, "fitness": best})
    best_plan = Plan(best_plan.configs, best_plan.members, best_plan.shapes, info)
    return _finish(judge, best_plan, start, best, history, evals0, steps0, t0)


def operating_point(judge: Judge, table: xr.Dataset, plan: Plan, budget_bits: float, *, levels: int = 2,
                    rounds: int = 1, fidelity: Fidelity = FULL, progress: bool = False) -> Refined:
    """Re-solve the knapsack with each unit's cost measured with the other units already quantized.

    For each unit and each allowed option within ``levels`` steps (in size order) of the unit's
    option in the current plan, the whole model with that one unit changed is measured at
    ``fidelity``; its squared fitness is the unit's cost of that option (the others are left
    out of the new table). The knapsack is solved again under ``budget_bits`` and the new plan
    measured at full fidelity; it replaces the current one only if it is better. ``rounds``
    repeats this from the current plan. Cost: about ``units * 2 * levels`` measurements a round.

    Returns
    -------
    Refined
        Never over budget, never a worse full fitness than ``plan``'s.
    """
    t0 = time.perf_counter()
    steps0 = judge.state_steps
    evals0 = dict(judge.evaluations)
    order = _levels(table)
    best = judge.fitness(plan)
    start, best_plan, history = best, plan, []
    rows = _rows(plan, table)
    U = len(rows)
    for r in range(rounds):
        base = judge.fitness(best_plan, fidelity) if fidelity != FULL else best
        cost = np.full(table["cost"].shape, np.inf)
        allowed = np.zeros(table["allowed"].shape, bool)
        bar = tqdm(total=U, desc=f"operating point, round {r + 1}", disable=not progress)
        for i in range(U):
            p = int(np.flatnonzero(order[i] == rows[i])[0])
            near = order[i][max(0, p - levels):p + levels + 1]
            for k in near:
                if k == rows[i]:
                    cost[i, k] = base**2
                else:
                    trial = rows.copy()
                    trial[i] = k
                    cost[i, k] = judge.fitness(plan_from_rows(table, trial, {}), fidelity) ** 2
                allowed[i, k] = np.isfinite(cost[i, k])
            bar.update()
        bar.close()
        measured = table.copy()
        measured["cost"] = (("unit", "option"), np.where(allowed, cost, 0.0))
        measured["allowed"] = (("unit", "option"), allowed)
        new = allocate(measured, budget_bits=budget_bits)
        f = judge.fitness(new)
        taken = f < best
        if taken:
            best, best_plan, rows = f, new, _rows(new, table)
        history.append(dict(round=r, fitness=best, taken=taken))
        if not taken:
            break
    info = dict(plan.info, **{"refined by": "operating_point", "rounds": len(history), "levels": levels,
                              "start fitness": start, "fitness": best})
    best_plan = Plan(best_plan.configs, best_plan.members, best_plan.shapes, info)
    return _finish(judge, best_plan, start, best, history, evals0, steps0, t0)


def _finish(judge, plan, start, best, history, evals0, steps0, t0) -> Refined:
    evals = {f"{n} x {h}": c - evals0.get((n, h), 0) for (n, h), c in judge.evaluations.items()
             if c - evals0.get((n, h), 0) > 0}
    rollouts = (judge.state_steps - steps0) / (judge.n_windows * judge.horizon)
    return Refined(plan, start, best, history, evals, rollouts, time.perf_counter() - t0)


def within_budget(plan: Plan, model, budget_bits: float) -> bool:
    """Whether ``plan`` stores at most ``budget_bits`` bits per parameter on ``model`` (every bit counted)."""
    return plan_size(plan, model).bits_per_param <= budget_bits * (1 + 1e-12)


__all__ = ["FULL", "Fidelity", "Judge", "Refined", "operating_point", "refine", "within_budget"]
