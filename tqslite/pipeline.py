"""The recommended TQS pipeline, written down once: probe, horizon rule, units, objective, quantizer, refinement.

:class:`Pipeline` is a small frozen recipe and :func:`run` applies it to a model at a size
budget; :data:`RECOMMENDED` (also :func:`recommended`) is the library's default, the one the
README recommends and notebook 10 judges against uniform GPTQ:

* **units**: every parameter tensor (biases and norm gains too: they are tiny, and the
  allocator can keep them in float for almost nothing);
* **probe**: gamma_quant with the residual of the quantizer that will be applied (GPTQ) at
  4 bits on the budget's scale granularity, over ``horizon`` steps;
* **horizon rule**: ``horizon`` is the last lead at which the float model beats climatology and
  persistence *on the probe states* (:mod:`tqslite.skill`; the caller passes it);
* **objective**: quadratic; options 2, 3, 4, 5, 6 and 8 bits, float16 and float;
* **quantizer**: GPTQ with its defaults, calibrated on training states;
* **closed loop**: off. :data:`CLOSED_LOOP` is the same recipe with it on.

Every field is a choice that can be changed (``dataclasses.replace(RECOMMENDED, refine=True)``).
The default was fixed on 2 December 2026 from measurements on probe states and validation
windows only, before the comparison ran on evaluation windows (the project's history has the
commit; the only earlier contact was a debugging run of the comparison code in SMOKE mode on 96
held-out windows of ``timesfm_lite``, which played no part in the choice).
``benchmarks/pipeline_choice.py MODEL`` reruns those measurements. On development windows of
the validation period, the knapsack plan of the GPTQ-residual probe had 0.60 to 0.68 times the
added RMSE of uniform GPTQ on ``pangu_lite`` (3 and 4 bits, both grids), 0.75 on
``aurora_lite`` and 0.46 on ``timesfm_lite`` (3 bits per channel, the one budget measured on
these two); with Gaussian noise 0.66 to 0.82, 0.90 and 0.40 (better there). The closed loop
removed up to 15 % more of the added RMSE (none on ``aurora_lite``), at 60 to 85 whole-model
rollouts per step and budget, while the probe is paid once for every budget. So the default
stays open loop, and the closed loop is the option notebook 11 measures.

The steps of :func:`run`:

1. **bank** -- the quantizer (GPTQ by default) runs once per integer option on the whole model
   (:class:`~tqslite.bank.WeightBank`); every later step assembles plans from it;
2. **probe** -- TQS over ``horizon`` steps from the probe states, with the applied quantizer's own
   residual at ``probe_bits`` on the budget's scale granularity (``gamma_quant``): GPTQ's
   residual is shaped to leave the layer outputs alone, so its amplification is not that of
   Gaussian noise of the same size;
3. **knapsack** -- a cost table priced with the same bank (``quadratic`` objective: the units'
   predicted errors add in quadrature) solved exactly at the budget;
4. **closed loop** (:mod:`tqslite.refine`) -- the operating-point re-solve (each unit's cost
   measured with the others already quantized) and the evolutionary search over whole plans,
   both judged by the measured rollout divergence on the probe states; never worse than the
   knapsack there, never over budget.

:func:`rollout_calibration` gives GPTQ calibration states from the float model's own rollout
of the probe states (no data beyond the probe's initial states).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .allocation import allocate, cost_table
from .bank import WeightBank
from .config import Granularity, Int, PerChannel, int_options
from .gptq import GPTQ
from .plans import Plan, apply_plan
from .probe import Gaussian, QuantResidual, probe
from .quantizers import Quantizer, as_quantizer
from .refine import Fidelity, Judge, operating_point, refine
from .systems import as_system, rollout


@dataclass(frozen=True)
class Pipeline:
    """A TQS recipe: how a model is probed, priced, allocated, quantized and refined.

    Parameters
    ----------
    units : str or unit spec
        The units that get one configuration each (``"tensor"``: every parameter tensor).
    perturbation : {"quant", "gauss"}
        ``"quant"``: the residual of the applied quantizer at ``probe_bits`` on the budget's
        granularity (gamma_quant); ``"gauss"``: relative Gaussian noise (gamma_gauss).
    probe_bits : int
        Bit width of the quant probe's residual.
    objective : str
        The knapsack's objective (:func:`tqslite.cost_table`).
    quantizer : Quantizer
        The quantizer that prices the options and makes the weights.
    bits : tuple of int
        Integer widths a unit may get (plus float16 and float when ``floats``).
    floats : bool
        Offer float16 and float as options.
    refine : bool
        Run the closed loop after the knapsack (off in :data:`RECOMMENDED`, on in
        :data:`CLOSED_LOOP`).
    operating_point_levels : int
        Options on either side of a unit's knapsack option measured by the operating-point step
        (0: skip it).
    generations, offspring, survivors : int
        The evolutionary search (:func:`tqslite.refine.refine`; 0 generations: skip it).
    seed : int
        Seeds the Gaussian probe (if used) and the search.
    """

    units: object = "tensor"
    perturbation: str = "quant"
    probe_bits: int = 4
    objective: str = "quadratic"
    quantizer: Quantizer = field(default_factory=GPTQ)
    bits: tuple = (2, 3, 4, 5, 6, 8)
    floats: bool = True
    refine: bool = False
    operating_point_levels: int = 2
    generations: int = 15
    offspring: int = 12
    survivors: int = 3
    seed: int = 0

    def __post_init__(self):
        if self.perturbation not in ("quant", "gauss"):
            raise ValueError(f"perturbation={self.perturbation!r}: use 'quant' or 'gauss'.")
        object.__setattr__(self, "quantizer", as_quantizer(self.quantizer))
        object.__setattr__(self, "bits", tuple(int(b) for b in self.bits))

    def options(self, granularity: Granularity | None = None) -> tuple:
        """The allocator's options on ``granularity`` (per channel by default)."""
        return int_options(self.bits, granularity or PerChannel(), floats=self.floats)


#: The library's default pipeline (see the module docstring).
RECOMMENDED = Pipeline()
#: The default pipeline with the closed loop on: the operating-point re-solve, then the search.
CLOSED_LOOP = replace(RECOMMENDED, refine=True)


def recommended() -> Pipeline:
    """The default TQS pipeline, :data:`RECOMMENDED`."""
    return RECOMMENDED


@dataclass
class PipelineResult:
    """What :func:`run` made, and what each step cost.

    Attributes
    ----------
    plan : Plan
        The final plan (refined if the pipeline refines).
    model
        The quantized copy of the model, of the kind passed in (weights from the bank).
    knapsack_plan : Plan
        The plan before the closed loop.
    scores : xarray.Dataset
        The probe's scores.
    table : xarray.Dataset
        The cost table the knapsack solved.
    bank : WeightBank
    refined : list of Refined
        The closed-loop steps, in order (empty if none ran).
    seconds : dict
        Wall seconds of each step.
    """

    plan: Plan
    model: object
    knapsack_plan: Plan
    scores: object
    table: object
    bank: WeightBank
    refined: list
    seconds: dict


def run(pipeline: Pipeline, model, x_probe, budget_bits: float, horizon: int, *, granularity=None,
        calibration=None, bank: WeightBank | None = None, scores=None, progress: bool = False) -> PipelineResult:
    """Apply ``pipeline`` to ``model`` at ``budget_bits`` bits per parameter (see the module docstring).

    Parameters
    ----------
    pipeline : Pipeline
    model : nn.Module or system
        Never modified.
    x_probe : Tensor ``(N, *S)``
        Probe states: the probe's initial states and the closed loop's judges.
    budget_bits : float
        Stored bits per parameter, scales and float tensors included.
    horizon : int
        The probe's and the closed loop's lead ``T`` (the book takes the last lead at which the
        float model beats climatology and persistence on the probe states: :mod:`tqslite.skill`).
    granularity : Granularity, optional
        Scale granularity of the integer options (per channel by default).
    calibration : Tensor, optional
        Calibration states for a calibration-based quantizer.
    bank, scores : optional
        A bank of ``pipeline.quantizer`` on these options and the probe's scores, if already at
        hand (one bank and one probe serve every budget of a granularity).
    """
    seconds = {}
    system = as_system(model)
    options = pipeline.options(granularity)
    if bank is None:
        t0 = time.perf_counter()
        bank = WeightBank.build(system, options, pipeline.quantizer, calibration, progress=progress)
        seconds["bank"] = time.perf_counter() - t0
    if scores is None:
        t0 = time.perf_counter()
        scores = probe_scores(pipeline, system, x_probe, horizon, bank, granularity, progress)
        seconds["probe"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    table = cost_table(scores, system, options, pipeline.objective, quantizer=bank)
    plan = allocate(table, budget_bits=budget_bits)
    seconds["knapsack"] = time.perf_counter() - t0
    knapsack_plan, refined = plan, []
    if pipeline.refine:
        judge = Judge(system, bank, x_probe, horizon)
        if pipeline.operating_point_levels > 0:
            t0 = time.perf_counter()
            r = operating_point(judge, table, plan, budget_bits, levels=pipeline.operating_point_levels,
                                fidelity=Fidelity(max(1, len(x_probe) // 2)), progress=progress)
            refined.append(r)
            plan = r.plan
            seconds["operating_point"] = time.perf_counter() - t0
        if pipeline.generations > 0:
            t0 = time.perf_counter()
            r = refine(judge, table, plan, budget_bits, generations=pipeline.generations,
                       offspring=pipeline.offspring, survivors=pipeline.survivors, seed=pipeline.seed,
                       progress=progress)
            refined.append(r)
            plan = r.plan
            seconds["search"] = time.perf_counter() - t0
    return PipelineResult(plan, apply_plan(model, plan, bank), knapsack_plan, scores, table, bank, refined, seconds)


def probe_scores(pipeline: Pipeline, model, x_probe, horizon: int, bank: WeightBank, granularity=None,
                 progress: bool = False):
    """The pipeline's probe: gamma_quant with the bank's residual at ``probe_bits``, or gamma_gauss."""
    if pipeline.perturbation == "quant":
        perturbation = QuantResidual(Int(pipeline.probe_bits, granularity or PerChannel()), bank,
                                     fallback=Gaussian(seed=pipeline.seed))
    else:
        perturbation = Gaussian(seed=pipeline.seed)
    return probe(model, x_probe, horizon=horizon, perturbation=perturbation, units=pipeline.units, progress=progress)


def rollout_calibration(model, x0, horizon: int, n: int | None = None, seed: int = 0) -> torch.Tensor:
    """Calibration states from the float model's own rollout: leads ``1..horizon`` from ``x0``.

    GPTQ's Hessians then come from the states the model visits when it forecasts from the probe
    states, with no data beyond those initial states. ``n`` of the ``N * horizon`` states are
    kept (evenly over windows and leads after a seeded shuffle; all when ``n`` is None), shape
    ``(n, *S)``.
    """
    system = as_system(model)
    x0 = torch.as_tensor(x0).to(system.dtype)
    with system.evaluating():
        states = rollout(system, x0, horizon).flatten(0, 1)  # (T * N, *S)
    if n is None or n >= len(states):
        return states
    pick = np.sort(np.random.default_rng(seed).choice(len(states), n, replace=False))
    return states[torch.from_numpy(pick)]


__all__ = ["CLOSED_LOOP", "Pipeline", "PipelineResult", "RECOMMENDED", "probe_scores", "recommended", "rollout_calibration", "run"]
