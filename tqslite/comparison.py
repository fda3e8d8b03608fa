"""Does TQS win once the quantizer is fixed? Methods as (score, objective, quantizer) at matched size.

A **method** (SPEC section 5) is a triple -- a sensitivity *score*, the knapsack's *objective*
and the *quantizer* that prices the options and makes the weights -- written :class:`Method`:

* scores (:data:`SCORES`): ``tqs`` (gamma_gauss over the probe horizon), ``tqs_quant``
  (gamma_quant: the applied quantizer's own residual at 4 bits), ``one_step`` (TQS at ``T = 1``),
  ``hessian`` (HAWQ-V2 traces), ``range``, ``random``, and ``none`` (a uniform plan);
* quantizers (:data:`QUANTIZERS`): ``rtn``, ``gptq`` and ``qep`` (GPTQ with QEP's error
  propagation, ``alpha = 1``); ``priced_by`` prices the plan with another quantizer than the one
  applied (the quantizer gain at a fixed allocation); ``calibration="rollout"`` calibrates
  GPTQ on the float model's rollout of the probe states instead of training states;
* ``refine``: ``"closed_loop"`` refines the knapsack plan as :data:`tqslite.pipeline.CLOSED_LOOP`
  does (:func:`tqslite.pipeline.run`: the operating-point re-solve, then the search), and
  ``"operating_point"`` is its plan after the operating-point step alone.

The library's default pipeline (:data:`tqslite.pipeline.RECOMMENDED`) is the method
``tqs_quant+gptq``, labelled ``recommended``.

:func:`run` compares a list of methods on one :class:`~tqslite.benchmark.Benchmark` at each
budget (:data:`BUDGETS`: the stored size of uniform RTN at 2, 3, 4, 6 and 8 bits with one scale
per output channel or per group of 32) and shares the work: **one probe per score serves every
budget**, **one weight bank per quantizer and scale grid serves every plan** (the quantizer runs
once per option, :class:`~tqslite.bank.WeightBank`), one cost table per (score, objective,
quantizer, grid), and identical quantized models are rolled out once. The evaluation lead is
computed by the skill rule (:mod:`tqslite.skill`): the last lead at which the float model beats
climatology and persistence on the evaluation windows; the probe horizon ``T`` by the same rule
on the probe states. :func:`run_models` runs several models in parallel processes.

Reading the result -- tables, win tables of pairs of methods, the verdict -- is the job of
:mod:`tqslite.results`. Numbers from these functions are measurements on the shipped stand-ins,
not the paper's.
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from itertools import combinations

import numpy as np
import torch
import xarray as xr
from tqdm import tqdm

from .allocation import allocate, cost_table
from .bank import WeightBank
from .baselines.scores import hessian_scores, one_step_scores, random_scores, range_scores
from .benchmark import Benchmark, benchmark, float_skill, window_mse
from .config import Int, PerChannel, PerGroup, int_options
from .evaluation import forecast
from .gptq import GPTQ
from .pipeline import CLOSED_LOOP, RECOMMENDED, Pipeline, rollout_calibration
from .pipeline import run as run_pipeline
from .plans import plan_size, uniform_plan
from .probe import Gaussian, QuantResidual, probe
from .quantizers import RTN
from .stats import spearman_agreement
from .systems import swapped

#: Score sets (``none``: a uniform plan).
SCORES = ("tqs", "tqs_quant", "one_step", "hessian", "range", "random", "none")
#: The quantizers of the methods.
QUANTIZERS = {"rtn": RTN(), "gptq": GPTQ(), "qep": GPTQ(propagation=1.0)}
#: The budgets, as the uniform RTN settings that fix each size: (bits, grid).
BUDGETS = tuple((b, g) for g in ("channel", "group") for b in (2, 3, 4, 6, 8))
#: Group length of the ``group`` grid (tensors it does not divide keep per-channel scales).
GROUP_SIZE = 32
#: Integer widths the allocator may give a unit (plus float16 and float).
BITS = (2, 3, 4, 5, 6, 8)
#: Width of the quant probe's residual (``tqs_quant``).
PROBE_BITS = 4
#: Largest shortfall of a mixed plan's size below its budget, as a fraction.
MATCH_TOLERANCE = 0.01
#: The figure that matters (:func:`verdict`): the three stand-ins, at 3 and 4 bits per parameter.
STAND_INS = ("pangu_lite", "aurora_lite", "timesfm_lite")
HEADLINE_BITS = (3, 4)
#: The goal the issue set for it: at least this share of the counted cells won, at most this share lost.
GOAL = (0.70, 0.10)


@dataclass(frozen=True)
class Method:
    """A method: (score, objective, quantizer), and how its plan was priced, refined and calibrated.

    Parameters
    ----------
    score : str
        One of :data:`SCORES`.
    quantizer : str
        A key of :data:`QUANTIZERS`: what makes the weights.
    objective : str
        The knapsack's objective (ignored for ``none``).
    priced_by : str, optional
        The quantizer whose residuals priced the options (and, for ``tqs_quant``, whose
        residual the probe used); default: ``quantizer``.
    refine : str
        ``"none"``, ``"closed_loop"`` (:data:`tqslite.pipeline.CLOSED_LOOP`'s refinement of the
        knapsack plan) or ``"operating_point"`` (its plan after the operating-point step only).
    calibration : str
        ``"data"`` (training states) or ``"rollout"`` (the float rollout of the probe states)
        for a calibration-based quantizer.
    """

    score: str
    quantizer: str = "gptq"
    objective: str = "quadratic"
    priced_by: str | None = None
    refine: str = "none"
    calibration: str = "data"

    def __post_init__(self):
        if self.score not in SCORES:
            raise ValueError(f"score={self.score!r}: use one of {SCORES}.")
        for key in ("quantizer", "priced_by"):
            q = getattr(self, key)
            if q is not None and q not in QUANTIZERS:
                raise ValueError(f"{key}={q!r}: use one of {sorted(QUANTIZERS)}.")
        if self.refine not in ("none", "closed_loop", "operating_point"):
            raise ValueError(f"refine={self.refine!r}: use 'none', 'closed_loop' or 'operating_point'.")
        if self.calibration not in ("data", "rollout"):
            raise ValueError(f"calibration={self.calibration!r}: use 'data' or 'rollout'.")
        if self.score == "none" and self.refine != "none":
            raise ValueError("a uniform plan (score 'none') is not refined.")

    @property
    def pricing(self) -> str:
        return self.priced_by or self.quantizer

    @property
    def label(self) -> str:
        """``score[/objective]+quantizer[(plan priced by ...)][+refinement][@rollout]``.

        The library's default pipeline is ``recommended`` (``recommended+closed_loop``,
        ``recommended@rollout`` for its variants).
        """
        if replace(self, refine="none", calibration="data") == recommended_method():
            text = "recommended"
        else:
            text = self.score + ("" if self.objective == "quadratic" or self.score == "none" else f"/{self.objective}")
            text += f"+{self.quantizer}"
            if self.priced_by and self.priced_by != self.quantizer:
                text += f"({self.priced_by} plan)"
        if self.refine != "none":
            text += f"+{self.refine}"
        return text + ("@rollout" if self.calibration == "rollout" else "")


def recommended_method(calibration: str = "data", pipeline: Pipeline = RECOMMENDED) -> Method:
    """The recommended pipeline as a :class:`Method`: its score, objective and GPTQ, refined if it refines."""
    if not isinstance(pipeline.quantizer, GPTQ) or pipeline.quantizer != QUANTIZERS["gptq"]:
        raise ValueError(f"the comparison knows GPTQ with its defaults, not {pipeline.quantizer!r}.")
    score = "tqs_quant" if pipeline.perturbation == "quant" else "tqs"
    return Method(score, "gptq", pipeline.objective, refine="closed_loop" if pipeline.refine else "none",
                  calibration=calibration)


def uniform(quantizer: str = "gptq") -> Method:
    """Uniform plan, one quantizer."""
    return Method("none", quantizer)


def complete_methods() -> tuple:
    """Every method of ``make baselines``: each score under each quantizer, the linear objective,
    the quantizer gain at a fixed allocation, the recommended pipeline (closed loop and operating
    point only), and GPTQ calibrated on the model's own rollout."""
    out = [Method(s, q) for q in QUANTIZERS for s in SCORES]
    out += [Method("tqs", q, "linear") for q in ("rtn", "gptq")]
    out += [Method(s, "gptq", priced_by="rtn") for s in SCORES if s != "none"]
    rec = recommended_method()
    out += [rec, replace(rec, refine="operating_point"), replace(rec, refine="closed_loop"),
            Method("none", "gptq", calibration="rollout"), recommended_method("rollout")]
    return tuple(dict.fromkeys(out))


def book_methods() -> tuple:
    """Notebook 10's set: uniform RTN and GPTQ, TQS under RTN and RTN's TQS plan under GPTQ, TQS with
    Gaussian noise, one-step and Hessian scores under GPTQ, and the recommended pipeline."""
    return (uniform("rtn"), uniform("gptq"), Method("tqs", "rtn"), Method("tqs", "gptq", priced_by="rtn"),
            Method("tqs", "gptq"), Method("one_step", "gptq"), Method("hessian", "gptq"), recommended_method())


def closed_loop_methods() -> tuple:
    """Notebook 11's set: the recommended pipeline, its operating-point step and closed loop, and GPTQ
    calibrated on the model's own rollout (uniform and recommended) against on data."""
    rec = recommended_method()
    return (uniform("gptq"), rec, replace(rec, refine="operating_point"), replace(rec, refine="closed_loop"),
            Method("none", "gptq", calibration="rollout"), recommended_method("rollout"))


def smoke_settings(name: str) -> dict:
    """:func:`tqslite.benchmark.benchmark` keyword arguments of the quick SMOKE pass for model ``name``."""
    from .models import module_of
    layout = module_of(name).LAYOUT
    quick = dict(max_horizon=4, n_probe=4, n_eval=8, n_calibration=16, n_loss_batches=1, loss_batch_size=8)
    if layout == "series":
        quick |= dict(n_probe=32, n_eval=96, max_horizon=2)
    if layout == "vector":
        quick |= dict(max_horizon=6, n_eval=16)
    return quick


#: The closed loop of a SMOKE run: :data:`tqslite.pipeline.CLOSED_LOOP`, short.
SMOKE_CLOSED_LOOP = replace(CLOSED_LOOP, generations=2, offspring=4, survivors=1, operating_point_levels=1)
#: The budgets of a SMOKE run.
SMOKE_BUDGETS = ((3, "channel"), (4, "group"))


def _budget_label(bits: int, grid: str) -> str:
    return f"{bits}b/{grid}"


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# Running the grid
# --------------------------------------------------------------------------------------------

class _Grid:
    """Shared work of one :func:`run`: score sets, banks, cost tables and plans, each made once."""

    def __init__(self, bench: Benchmark, probe_horizon: int, closed_loop: Pipeline, group_size: int, n_hutchinson: int,
                 seed: int, progress: bool):
        self.bench, self.T, self.closed_loop = bench, probe_horizon, closed_loop
        self.system = bench.system
        self.scale = {"channel": PerChannel(), "group": PerGroup(group_size)}
        self.n_hutchinson, self.seed, self.progress = n_hutchinson, seed, progress
        self.scores, self.banks, self.tables, self.plans, self.refined = {}, {}, {}, {}, {}
        self.seconds = {}  # stage -> seconds
        self._rollout_states = None

    def options(self, grid):
        return int_options(BITS, self.scale[grid])

    def _time(self, key, fn, *args, **kwargs):
        out, s = _timed(fn, *args, **kwargs)
        self.seconds[key] = self.seconds.get(key, 0.0) + s
        return out

    def calibration(self, kind):
        if kind == "data":
            return self.bench.calibration
        if self._rollout_states is None:
            self._rollout_states = rollout_calibration(self.system, self.bench.x_probe, self.T,
                                                       n=len(self.bench.calibration), seed=self.seed)
        return self._rollout_states

    def bank(self, quantizer, calibration, grid) -> WeightBank:
        key = (quantizer, calibration if quantizer != "rtn" else "data", grid)
        if key not in self.banks:
            self.banks[key] = self._time(f"bank {quantizer}@{key[1]}/{grid}", WeightBank.build, self.system,
                                         self.options(grid), QUANTIZERS[quantizer], self.calibration(key[1]))
        return self.banks[key]

    def score(self, method: Method, grid):
        s = method.score
        key = s if s != "tqs_quant" else (s, method.pricing, method.calibration, grid)
        if key in self.scores:
            return self.scores[key]
        b, x, gauss = self.bench, self.bench.x_probe, Gaussian(seed=self.seed)
        if s == "tqs":
            fn = lambda: probe(self.system, x, horizon=self.T, perturbation=gauss, progress=False)  # noqa: E731
        elif s == "tqs_quant":
            bank = self.bank(method.pricing, method.calibration, grid)
            pert = QuantResidual(Int(PROBE_BITS, self.scale[grid]), bank, fallback=gauss)
            fn = lambda: probe(self.system, x, horizon=self.T, perturbation=pert, progress=False)  # noqa: E731
        elif s == "one_step":
            fn = lambda: one_step_scores(self.system, x, perturbation=gauss, progress=False)  # noqa: E731
        elif s == "hessian":
            fn = lambda: hessian_scores(self.system, b.loss_batches, self.n_hutchinson, self.seed,  # noqa: E731
                                        b.loss_fn)
        elif s == "range":
            fn = lambda: range_scores(self.system)  # noqa: E731
        else:
            fn = lambda: random_scores(self.system, self.seed)  # noqa: E731
        self.scores[key] = self._time(f"score {key if isinstance(key, str) else '/'.join(key)}", fn)
        return self.scores[key]

    def table(self, method: Method, grid):
        key = (method.score, method.objective, method.pricing, method.calibration, grid)
        if key not in self.tables:
            scores = self.score(method, grid)
            bank = self.bank(method.pricing, method.calibration, grid)
            self.tables[key] = self._time("tables", cost_table, scores, self.system, self.options(grid),
                                          method.objective, quantizer=bank)
        return self.tables[key]

    def plan(self, method: Method, bits: int, grid: str, budget_bits: float):
        """The method's plan at one budget, and the refinement records (closed loop only)."""
        if method.score == "none":
            return uniform_plan(self.system, Int(bits, self.scale[grid]))
        key = (method.score, method.objective, method.pricing, method.calibration, grid, bits,
               "closed_loop" if method.refine != "none" else "none")
        if key not in self.plans:
            if method.refine == "none":
                self.plans[key] = self._time("solve", allocate, self.table(method, grid), budget_bits=budget_bits)
            else:
                bank = self.bank(method.pricing, method.calibration, grid)
                res = self._time("closed loop", run_pipeline, self.closed_loop, self.system, self.bench.x_probe,
                                 budget_bits, self.T, granularity=self.scale[grid], bank=bank,
                                 scores=self.score(method, grid))
                self.plans[key] = res.plan
                self.refined[key] = res
        if method.refine == "operating_point":
            steps = [r for r in self.refined[key].refined if "operating_point" in str(r.plan.info.get("refined by"))]
            return steps[0].plan if steps else self.refined[key].knapsack_plan
        return self.plans[key]


def run(bench: Benchmark, methods=None, budgets=BUDGETS, *, closed_loop: Pipeline = CLOSED_LOOP,
        group_size: int = GROUP_SIZE, n_hutchinson: int = 16, n_boot: int = 1000, seed: int = 0,
        progress: bool = False) -> xr.Dataset:
    """Every method at every budget on one benchmark: plans, sizes, rollout errors and costs.

    Parameters
    ----------
    bench : Benchmark
    methods : sequence of Method, optional
        Default :func:`complete_methods`.
    budgets : sequence of (bits, grid)
        Uniform RTN settings that fix each size (``grid`` ``"channel"`` or ``"group"``).
    closed_loop : Pipeline
        The refinement settings of ``refine="closed_loop"`` and ``"operating_point"`` methods
        (:data:`tqslite.pipeline.CLOSED_LOOP`).
    n_hutchinson : int
        Rademacher vectors per training batch of the Hessian scores.
    n_boot : int
        Bootstrap replicates of the Spearman intervals.

    Returns
    -------
    xarray.Dataset
        Dim ``scheme`` holds the methods' labels (:attr:`Method.label`; not ``method``, a keyword
        of xarray's ``sel``). ``mse(scheme, budget, against, window, lead[, variable])`` at leads
        ``1..L`` (``L`` the
        evaluation lead, ``attrs["eval_lead"]``; ``against`` is ``"float"`` or ``"truth"``);
        ``float_mse(window, lead[, variable])``, the float model's own error; the skill curves
        ``eval_skill(forecast, lead)`` and ``probe_skill(forecast, lead)`` (mean RMSE over
        targets); ``bits_per_param(scheme, budget)``, ``budget_bits_per_param(budget)``,
        ``size_shortfall``; the closed loop's ``start_fitness`` (the knapsack plan's),
        ``operating_point_fitness``, ``fitness``, ``refine_rollouts``
        and ``refine_seconds(scheme, budget)``; ``gamma(score_set, unit)`` and Spearman's
        ``rho_vs_tqs(score)`` with its interval; the Gaussian probes' curves ``tqs_curve(unit, tqs_lead)``
        and ``one_step_curve``; every plan as ``config(scheme, budget, plan_unit)`` (configuration
        labels; :func:`plan_of` rebuilds it); ``stage_seconds(stage)`` (every shared step,
        timed once) and ``eval_seconds``. ``attrs`` record the settings, ``probe_horizon`` and
        ``eval_lead``.
    """
    methods = list(complete_methods() if methods is None else methods)
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        raise ValueError(f"methods must be distinct; repeated: {sorted({x for x in labels if labels.count(x) > 1})}.")
    budgets = [(int(b), str(g)) for b, g in budgets]
    eval_skill, probe_skill = float_skill(bench, "eval"), float_skill(bench, "probe")
    L, T = eval_skill.attrs["horizon"], probe_skill.attrs["horizon"]
    lead, probe_T = max(L, 1), max(T, 1)  # no skill at all: still measured at lead 1, and flagged by the skill rule
    if not closed_loop.refine:
        raise ValueError("closed_loop must be a pipeline that refines (refine=True), e.g. tqslite.pipeline.CLOSED_LOOP.")
    grid = _Grid(bench, probe_T, closed_loop, group_size, n_hutchinson, seed, progress)
    system = bench.system
    x_eval, truth = bench.x_eval, bench.view(bench.truth.sel(lead=slice(1, lead)))
    t0 = time.perf_counter()
    float_fc = bench.view(forecast(system, x_eval, lead))
    eval_seconds = time.perf_counter() - t0
    refs = {"float": float_fc, "truth": truth}
    shape = (len(methods), len(budgets))
    bpp, budget_bpp = np.full(shape, np.nan), np.zeros(len(budgets))
    fit = {k: np.full(shape, np.nan) for k in ("start_fitness", "operating_point_fitness", "fitness",
                                               "refine_rollouts", "refine_seconds")}
    mse, cache, configs = None, {}, {}
    bar = tqdm(total=len(methods) * len(budgets), desc=f"{bench.name}: methods x budgets", disable=not progress)
    for k, (bits, g) in enumerate(budgets):
        budget_bpp[k] = plan_size(uniform_plan(system, Int(bits, grid.scale[g])), system).bits_per_param
        for i, m in enumerate(methods):
            plan = grid.plan(m, bits, g, budget_bpp[k])
            configs[i, k] = {u: c.label for u, c in plan.configs.items()}
            bpp[i, k] = plan_size(plan, system).bits_per_param
            if bpp[i, k] > budget_bpp[k] * (1 + 1e-12):
                raise AssertionError(f"{m.label} at {_budget_label(bits, g)} is over budget: {bpp[i, k]} bits per "
                                     f"parameter against {budget_bpp[k]}.")
            if m.refine == "closed_loop":
                key = (m.score, m.objective, m.pricing, m.calibration, g, bits, "closed_loop")
                res = grid.refined[key]
                steps = res.refined
                if steps:
                    fit["start_fitness"][i, k], fit["fitness"][i, k] = steps[0].start_fitness, steps[-1].fitness
                    fit["operating_point_fitness"][i, k] = steps[0].fitness if len(steps) > 1 else np.nan
                    fit["refine_rollouts"][i, k] = sum(r.rollouts for r in steps)
                    fit["refine_seconds"][i, k] = sum(r.seconds for r in steps)
            bank = grid.bank(m.quantizer, m.calibration, g)
            ident = (id(bank), tuple((u, c.label) for u, c in plan.configs.items()))
            if ident not in cache:
                weights = bank.dequantized(system, plan.tensor_configs())
                t0 = time.perf_counter()
                with swapped(system, weights):
                    fc = bench.view(forecast(system, x_eval, lead))
                eval_seconds += time.perf_counter() - t0
                cache[ident] = {a: window_mse(fc, r) for a, r in refs.items()}
            errs = cache[ident]
            if mse is None:
                e = errs["float"]
                mse = xr.DataArray(np.full((*shape, 2, *e.shape), np.nan),
                                   dims=("scheme", "budget", "against", *e.dims),
                                   coords={"scheme": labels, "budget": [_budget_label(b, q) for b, q in budgets],
                                           "against": ["float", "truth"], **e.coords})
            for a in ("float", "truth"):
                mse[i, k, ["float", "truth"].index(a)] = errs[a].values
            bar.update()
    bar.close()
    ds = _assemble(bench, methods, budgets, grid, mse, eval_skill, probe_skill, bpp, budget_bpp, fit, eval_seconds,
                   n_boot, seed, L, T, group_size, n_hutchinson, closed_loop)
    units = list(configs[0, 0])
    ds["config"] = xr.DataArray(
        np.array([[[configs[i, k][u] for u in units] for k in range(len(budgets))] for i in range(len(methods))],
                 dtype=object), dims=("scheme", "budget", "plan_unit"), coords={"plan_unit": units},
        attrs={"long_name": "each unit's configuration in the method's plan (tqslite.config labels)"})
    return ds


def _assemble(bench, methods, budgets, grid, mse, eval_skill, probe_skill, bpp, budget_bpp, fit, eval_seconds, n_boot,
              seed, L, T, group_size, n_hutchinson, closed_loop) -> xr.Dataset:
    labels = [m.label for m in methods]
    blabels = [_budget_label(b, g) for b, g in budgets]
    dims = ("scheme", "budget")
    ds = xr.Dataset({"mse": mse}, coords={"scheme": labels, "budget": blabels})
    ds["mse"].attrs = {"long_name": "mean squared rollout error per window (normalised units)"}
    ds["float_mse"] = eval_skill["model_mse"].sel(lead=slice(1, mse.sizes["lead"]))
    ds["float_mse"].attrs = {"long_name": "the float model's own mean squared error against the truth, per window"}
    ds["eval_skill"] = eval_skill["mean_rmse"].rename(lead="skill_lead")
    ds["probe_skill"] = probe_skill["mean_rmse"].rename(lead="skill_lead")
    ds["bits_per_param"] = (dims, bpp, {"long_name": "stored bits per parameter, scales included"})
    ds["budget_bits_per_param"] = ("budget", budget_bpp, {"long_name": "size of uniform RTN at the budget's setting"})
    ds["size_shortfall"] = 1 - ds["bits_per_param"] / ds["budget_bits_per_param"]
    ds["size_shortfall"].attrs["long_name"] = "1 - size / budget (0: exactly matched)"
    ds["bits"] = ("budget", [b for b, _ in budgets])
    ds["grid"] = ("budget", [g for _, g in budgets])
    for k, v in fit.items():
        ds[k] = (dims, v)
    ds["start_fitness"].attrs["long_name"] = "probe-state fitness of the knapsack plan (closed loop only)"
    ds["fitness"].attrs["long_name"] = "probe-state fitness after the closed loop (RMS divergence at T)"
    ds["operating_point_fitness"].attrs["long_name"] = "probe-state fitness after the operating-point step"
    ds["refine_rollouts"].attrs["long_name"] = "closed-loop cost in full rollouts of the probe states over T"
    for attr, name in (("score", "score"), ("quantizer", "quantizer"), ("objective", "objective"),
                       ("pricing", "priced_by"), ("refine", "refine"), ("calibration", "calibration")):
        ds[name] = ("scheme", [getattr(m, attr) for m in methods])
    stages = sorted(grid.seconds)
    ds["stage_seconds"] = xr.DataArray([grid.seconds[s] for s in stages], dims="stage", coords={"stage": stages},
                                       attrs={"long_name": "wall seconds of each shared step, summed over budgets"})
    ds["eval_seconds"] = ((), eval_seconds, {"long_name": "wall seconds of the evaluation rollouts"})
    gauss_sets = {k: v for k, v in grid.scores.items() if isinstance(k, str)}
    gauss_sets |= {"tqs_quant(" + "/".join(k[1:]) + ")": v for k, v in grid.scores.items() if not isinstance(k, str)}
    if gauss_sets:
        units = next(iter(gauss_sets.values()))["unit"].values
        names = list(gauss_sets)
        ds["gamma"] = xr.DataArray(np.array([gauss_sets[n]["gamma"].sel(unit=units).values for n in names]),
                                   dims=("score_set", "unit"), coords={"score_set": names, "unit": units})
        ds["n_params"] = ("unit", next(iter(gauss_sets.values()))["n_params"].sel(unit=units).values)
        for n in ("tqs", "one_step"):
            if n in gauss_sets:
                ds[f"{n}_curve"] = gauss_sets[n]["curve"].sel(unit=units).rename(lead=f"{n}_lead")
                ds[f"{n}_curve"].attrs["long_name"] = f"log-amplification Lambda_u(t) of the {n} probe"
        if "tqs" in gauss_sets:  # windows resampled for probe score sets, units for the others
            rho = {n: spearman_agreement(gauss_sets["tqs"], gauss_sets[n], n_boot=n_boot, seed=seed)
                   for n in names if n != "tqs"}
            for key, name in (("rho", "rho_vs_tqs"), ("lo", "rho_lo"), ("hi", "rho_hi")):
                ds[name] = ("score_set", [rho[n][key] if n in rho else np.nan for n in names])
    ds.attrs = dict(model=bench.name, per=bench.per, eval_lead=int(L), probe_horizon=int(T),
                    n_probe=int(len(bench.x_probe)), n_eval=int(bench.x_eval.sizes["window"]),
                    n_calibration=int(len(bench.calibration)), group_size=group_size, bits=list(BITS),
                    probe_bits=PROBE_BITS, n_hutchinson=n_hutchinson, seed=seed, recommended=repr(RECOMMENDED),
                    closed_loop=repr(closed_loop),
                    torch_threads=torch.get_num_threads(),
                    note="measurements on a tqslite stand-in model, not the paper's numbers")
    return ds


def run_named(name: str, methods=None, budgets=BUDGETS, smoke: bool = False, seed: int = 0,
              progress: bool = False, **kwargs) -> xr.Dataset:
    """:func:`run` on a shipped model by name (full or SMOKE settings), with one torch thread."""
    torch.set_num_threads(1)
    bench = benchmark(name, seed=seed, **(smoke_settings(name) if smoke else {}))
    if smoke:
        kwargs = dict(closed_loop=SMOKE_CLOSED_LOOP, n_hutchinson=2, n_boot=100) | kwargs
    t0 = time.perf_counter()
    out = run(bench, methods, budgets, seed=seed, progress=progress, **kwargs)
    out.attrs["wall_seconds"] = time.perf_counter() - t0
    out.attrs["smoke"] = int(smoke)
    return out


def run_models(names, methods=None, budgets=BUDGETS, smoke: bool = False, seed: int = 0, workers: int = 2,
               **kwargs) -> dict:
    """:func:`run_named` for several models in ``workers`` parallel processes (one model each, one thread each).

    ``budgets`` is one list for every model, or ``{name: budgets}``. Models are submitted in the
    order given; put the slowest first. Returns ``{name: result}``.
    """
    per_model = budgets if isinstance(budgets, dict) else dict.fromkeys(names, budgets)
    if workers <= 1:
        return {n: run_named(n, methods, per_model[n], smoke, seed, **kwargs) for n in names}
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {n: pool.submit(run_named, n, methods, per_model[n], smoke, seed, **kwargs) for n in names}
        return {n: f.result() for n, f in futures.items()}


def ranking_stability(name: str, splits=("validation", "heldout", "train"), n: int | None = None,
                      horizon: int | None = None, units="tensor", kind: str = "gauss",
                      n_boot: int = 1000, seed: int = 0, progress: bool = False, prep=None) -> xr.Dataset:
    """Do TQS rankings of a shipped model hold on other data? Probe it on each split and compare.

    ``splits`` are periods of :func:`tqslite.splits.probe_states`. Returns a Dataset:
    ``gamma(split, unit)`` and, for every pair of splits (dim ``pair``), Spearman's ``rho``,
    ``lo`` and ``hi`` (percentile interval over windows).
    """
    from .models import load, module_of
    from .splits import prepare, probe_states

    if len(set(splits)) != len(splits) or len(splits) < 2:
        raise ValueError(f"splits={tuple(splits)}: give at least two different periods, none twice.")
    grid = module_of(name).LAYOUT == "grid"
    n = n or (16 if grid else 256)
    horizon = horizon or (12 if grid else 8)
    prep = prep or prepare(name)
    system, _ = load(name)
    runs = {}
    for s in splits:
        x0 = torch.from_numpy(probe_states(name, s, n, horizon, seed, prep).values)
        perturbation = Gaussian(seed=seed) if kind == "gauss" else QuantResidual(fallback=Gaussian(seed=seed))
        runs[s] = probe(system, x0, perturbation=perturbation, units=units, horizon=horizon, progress=progress)
    pairs = list(combinations(splits, 2))
    agree = [spearman_agreement(runs[a], runs[b], n_boot=n_boot, seed=seed) for a, b in pairs]
    units = runs[splits[0]]["unit"].values
    return xr.Dataset(
        {"gamma": (("split", "unit"), np.array([runs[s]["gamma"].values for s in splits])),
         **{k: ("pair", [g[k] for g in agree]) for k in ("rho", "lo", "hi")}},
        coords={"split": list(splits), "unit": units, "pair": [f"{a}~{b}" for a, b in pairs]},
        attrs=dict(model=name, n=n, horizon=horizon, units=str(units), kind=kind, n_boot=n_boot, seed=seed),
    )


__all__ = ["BITS", "BUDGETS", "GOAL", "GROUP_SIZE", "HEADLINE_BITS", "MATCH_TOLERANCE", "Method", "PROBE_BITS", "QUANTIZERS", "SCORES", "SMOKE_BUDGETS", "SMOKE_CLOSED_LOOP", "STAND_INS", "book_methods", "closed_loop_methods", "complete_methods", "ranking_stability", "recommended_method", "run", "run_models", "run_named", "smoke_settings", "uniform"]
