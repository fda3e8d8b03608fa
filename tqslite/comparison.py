"""Does TQS win? Every method at matched size on one model: rollout errors, win tables, costs.

One call of :func:`compare` runs the whole comparison of SPEC section 5 on one model:

1. **sensitivity passes**, each timed: the TQS probe over a trajectory of ``horizon`` steps,
   and the baselines' scores (:mod:`tqslite.baselines.scores`): one step only, HAWQ-V2
   Hessian traces, weight ranges and random;
2. **budgets**: uniform RTN at each ``(bits, grid)`` of ``budgets`` (default: 2, 3, 4, 6 and 8
   bits, one scale per output channel or per group of :data:`GROUP_SIZE`) fixes a stored size
   in bits per parameter, scales counted;
3. **quantized models** at each budget: ``rtn`` itself, ``gptq`` on the same grid (stored
   exactly like RTN, so the same size), ``qep`` (GPTQ with QEP's error propagation, ``alpha = 1``,
   :class:`tqslite.gptq.GPTQ`) likewise, and every score method through the same allocator
   (:func:`tqslite.allocate`, exact solver, RTN, the quadratic objective -- for the Hessian that
   is HAWQ-V2's own; and ``tqs_linear``, the TQS scores with the linear objective) at the RTN
   size on the same grid, never above it (how far below is recorded in ``size_shortfall``);
4. **rollout errors** at every lead, per evaluation window, against the float model (what
   quantization adds) and against the truth, per variable (grids) or per station (series);
5. **costs**: the wall time of each stage, and the time per Pareto point of each method.

:func:`win_table` then compares a reference method (TQS) with each other method at each budget
and variable, with a paired bootstrap over windows: a **win** when the whole interval of the
error ratio is below 1, a **loss** when it is above 1, a **tie** otherwise (same plan included).
:func:`ranking_stability` probes one model on different periods and data sets and reports
Spearman's rho between the rankings, with intervals.

Numbers from these functions are measurements on the shipped stand-in models, not the paper's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import torch
import xarray as xr
from tqdm import tqdm

from .allocation import allocate, cost_table
from .baselines.scores import hessian_scores, one_step_scores, random_scores, range_scores
from .config import Int, PerChannel, PerGroup, int_options
from .gptq import GPTQ
from .plans import apply_plan, plan_size, uniform_plan
from .evaluation import _mean, forecast
from .probe import Gaussian, QuantResidual, probe
from .stats import spearman_agreement
from .systems import as_system, rollout

#: Mixed-precision methods: their scores go through the same allocator.
MIXED = ("tqs", "tqs_linear", "one_step", "hessian", "range", "random")
#: The score set and objective of each mixed method (``None``: the library's default, ``quadratic``;
#: ``tqs_linear`` is the TQS scores with the linear objective).
SCORED_BY = {m: (m, None) for m in MIXED} | {"tqs_linear": ("tqs", "linear")}
#: Every method, in the order tables show them.
METHODS = (*MIXED, "gptq", "qep", "rtn")
#: Calibration-based methods, on the uniform RTN grid: GPTQ, and GPTQ with QEP's error propagation.
CALIBRATED = {"gptq": 0.0, "qep": 1.0}
#: The budgets, as the uniform RTN settings that fix each size: (bits, grid).
BUDGETS = tuple((b, g) for g in ("channel", "group") for b in (2, 3, 4, 6, 8))
#: Group length of the ``group`` grid (tensors it does not divide keep per-channel scales).
GROUP_SIZE = 32
#: Bit widths the allocator may give a unit.
OPTIONS = (2, 3, 4, 5, 6, 8, 16, 32)
#: Largest shortfall of a mixed plan's size below its budget, as a fraction.
MATCH_TOLERANCE = 0.01


#: A quick pass of the same code (notebook 10's SMOKE mode, ``benchmarks/baselines.py --smoke``):
#: a few windows, a short horizon, two budgets. Its numbers are rough.
SMOKE_BUDGETS = ((3, "channel"), (4, "group"))


def smoke_settings(name: str) -> dict:
    """:func:`benchmark` keyword arguments of the quick SMOKE pass for shipped model ``name``."""
    from .models import module_of
    quick = dict(horizon=4, n_probe=4, n_eval=8, n_calibration=16, n_loss_batches=1, loss_batch_size=8)
    return quick | (dict(n_probe=32, n_eval=96) if module_of(name).LAYOUT == "series" else {})


@dataclass
class Benchmark:
    """What a comparison needs for one model, in the model's normalised units.

    Attributes
    ----------
    name : str
        A label for tables (the model's name).
    system
        The float model as a system (:func:`tqslite.models.load`); never modified.
    x_probe : Tensor, ``(N, *S)``
        Initial states of the probes (e.g. from the validation period).
    x_eval : DataArray, ``(window, *S)``
        Initial states of the evaluation (e.g. from held-out data).
    truth : DataArray, ``(window, lead, *S)``
        The verifying states at leads ``1..horizon``.
    horizon : int
        Probe and evaluation horizon ``T``, in model steps.
    calibration : Tensor, ``(n, *input)``
        Inputs of ``system.module`` for GPTQ (training states).
    loss_batches : list of ``(x, y)``
        Training pairs for the Hessian traces; ``loss_fn(module, (x, y))`` is the training loss.
    loss_fn : callable
    view : callable
        DataArray -> DataArray: the part of a state that is scored (identity for the grids, the
        newest patch of a context window for the series).
    per : str
        ``"variable"`` (grids) or ``"station"`` (series, a coordinate of ``window``): the tables
        show one row per value of it.
    """

    name: str
    system: object
    x_probe: torch.Tensor
    x_eval: xr.DataArray
    truth: xr.DataArray
    horizon: int
    calibration: torch.Tensor
    loss_batches: list
    loss_fn: object
    view: object = field(default=lambda da: da)
    per: str = "variable"


def benchmark(name: str, horizon: int | None = None, n_probe: int | None = None, n_eval: int | None = None,
              n_calibration: int = 32, n_loss_batches: int = 4, loss_batch_size: int = 16, seed: int = 0,
              prep=None) -> Benchmark:
    """The :class:`Benchmark` of a shipped model, from its shipped data.

    Probe states come from the validation period, evaluation windows and truth from the held-out
    data, GPTQ calibration inputs and Hessian training pairs from the training period; the loss
    is the model's one-step training loss (:mod:`tqslite.train`). Defaults: grids ``T = 12``
    steps (3 days), 16 probe states, 32 evaluation windows; series ``T = 8`` patches (32 days),
    256 probe windows, 1200 evaluation windows (100 per station); 32 calibration states (for a
    grid model, 32 x 2048 grid points feed each convolution: ample for its ``H``, and half the
    time of 64 for ``aurora_lite``).
    """
    from .models import load, module_of
    from .train import calibration_states, heldout_windows, prepare, probe_states

    module = module_of(name)
    grid = module.LAYOUT == "grid"
    horizon = horizon or (12 if grid else 8)
    n_probe = n_probe or (16 if grid else 256)
    n_eval = n_eval or (32 if grid else 1200)
    prep = prep or prepare(name)
    system, _ = load(name)
    x_probe = torch.from_numpy(probe_states(name, "validation", n_probe, horizon, seed, prep).values)
    x_eval, truth = heldout_windows(name, n_eval, horizon, seed, prep)
    rng = np.random.default_rng(seed)
    train = torch.from_numpy(prep.train)
    calibration = calibration_states(name, n_calibration, seed, prep)
    if grid:
        x_eval, truth = x_eval.rename(channel="variable"), truth.rename(channel="variable")
        idx = rng.choice(len(train) - 1, (n_loss_batches, loss_batch_size), replace=False)
        batches = [(train[i], train[i + 1]) for i in idx]
        weight = torch.from_numpy(prep.loss_weight)

        def loss_fn(model, batch):  # the grid models' one-step training loss (tqslite.train)
            x, y = batch
            return ((model(x) - y) ** 2 * weight).mean()

        return Benchmark(name, system, x_probe, x_eval, truth, horizon, calibration, batches, loss_fn)
    ctx, patch = module.ARCH["context"], module.ARCH["patch"]
    idx = rng.choice(len(train), (n_loss_batches, loss_batch_size), replace=False)
    batches = [(train[i, :ctx], train[i, patch:ctx + patch]) for i in idx]

    def loss_fn(model, batch):  # the series model's training loss: every token's next patch
        x, y = batch
        return ((model.forward_all(x) - y.reshape(len(y), -1, patch)) ** 2).mean()

    return Benchmark(name, system, x_probe, x_eval, truth, horizon, calibration, batches, loss_fn,
                     view=lambda da: da.isel(dim_0=slice(-patch, None)), per="station")


# --------------------------------------------------------------------------------------------
# The stages
# --------------------------------------------------------------------------------------------

def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def sensitivities(bench: Benchmark, units="tensor", kind: str = "gauss", n_hutchinson: int = 16, seed: int = 0,
                  progress: bool = False, executor=None):
    """Scores of every mixed-precision method, and the wall seconds of each pass.

    Returns ``(scores, seconds)``: two dicts keyed by score set (``tqs``, ``one_step``,
    ``hessian``, ``range``, ``random``; ``tqs_linear`` uses ``tqs``'s). ``tqs`` is the probe of
    ``kind`` over ``bench.horizon`` steps; ``one_step`` the same probe over one step; the others
    come from :mod:`tqslite.baselines.scores`. ``executor`` goes to both probes.
    """
    common = dict(units=units)
    perturbation = Gaussian(seed=seed) if kind == "gauss" else QuantResidual(fallback=Gaussian(seed=seed))
    probe_kw = dict(perturbation=perturbation, progress=progress, executor=executor, **common)
    passes = {
        "tqs": lambda: probe(bench.system, bench.x_probe, horizon=bench.horizon, **probe_kw),
        "one_step": lambda: one_step_scores(bench.system, bench.x_probe, **probe_kw),
        "hessian": lambda: hessian_scores(bench.system, bench.loss_batches, n_hutchinson, seed, bench.loss_fn, **common),
        "range": lambda: range_scores(bench.system, **common),
        "random": lambda: random_scores(bench.system, seed, **common),
    }
    scores, seconds = {}, {}
    for method, run in passes.items():
        scores[method], seconds[method] = _timed(run)
    return scores, seconds


def _budget_label(bits: int, grid: str) -> str:
    return f"{bits}b/{grid}"


def quantized_models(bench: Benchmark, scores: dict, budgets=BUDGETS, group_size: int = GROUP_SIZE,
                     options=OPTIONS, gptq_kwargs=None, progress: bool = False):
    """Every method's quantized copy of the model at every budget.

    Returns ``(models, info)``: ``models[(method, budget_label)]`` is a system; ``info`` a
    Dataset with dims ``scheme`` (the methods) and ``budget`` holding ``bits_per_param``,
    ``quantize_seconds`` (applying a plan, or running GPTQ), ``solve_seconds`` (the allocator)
    and ``size_shortfall`` (``1 - size / budget``), and ``table_seconds(scheme, grid)`` (pricing
    the options of a score set, once per grid). ``gptq_kwargs`` go to
    :class:`tqslite.gptq.GPTQ` (e.g. ``act_order=False``).
    """
    system = bench.system
    budgets = [(int(b), str(g)) for b, g in budgets]
    labels = [_budget_label(b, g) for b, g in budgets]
    grids = sorted({g for _, g in budgets})
    scale = {g: PerGroup(group_size) if g == "group" else PerChannel() for g in grids}
    bits_options = [b for b in options if b <= 8]
    setting = {g: int_options(bits_options, scale[g], floats=any(b >= 16 for b in options)) for g in grids}
    shape = (len(METHODS), len(budgets))
    bpp, q_sec, s_sec = np.full(shape, np.nan), np.zeros(shape), np.zeros(shape)
    t_sec = np.zeros((len(METHODS), len(grids)))
    models = {}
    tables = {}
    for m in MIXED:
        key, objective = SCORED_BY[m]
        objective = objective or scores[key].attrs.get("objective", "quadratic")
        for j, g in enumerate(grids):
            tables[m, g], t_sec[METHODS.index(m), j] = _timed(cost_table, scores[key], system, setting[g], objective)
    bar = tqdm(total=len(METHODS) * len(budgets), desc=f"{bench.name}: quantized models", disable=not progress)
    for k, ((bits, g), label) in enumerate(zip(budgets, labels)):
        uniform = uniform_plan(system, Int(bits, scale[g]))
        budget_bits = plan_size(uniform, system).bits_per_param
        for i, m in enumerate(METHODS):
            if m in CALIBRATED:  # stored exactly like the uniform RTN plan of the same settings
                gptq = GPTQ(propagation=CALIBRATED[m], **(gptq_kwargs or {}))
                models[m, label], q_sec[i, k] = _timed(apply_plan, system, uniform, gptq, bench.calibration)
                bpp[i, k] = budget_bits
            else:
                plan = uniform
                if m != "rtn":
                    plan, s_sec[i, k] = _timed(allocate, tables[m, g], budget_bits=budget_bits)
                models[m, label], q_sec[i, k] = _timed(apply_plan, system, plan)
                bpp[i, k] = plan_size(plan, system).bits_per_param
            bar.update()
    bar.close()
    info = xr.Dataset(
        {
            "bits_per_param": (("scheme", "budget"), bpp, {"long_name": "stored bits per parameter, scales included"}),
            "quantize_seconds": (("scheme", "budget"), q_sec),
            "solve_seconds": (("scheme", "budget"), s_sec),
            "table_seconds": (("scheme", "grid"), t_sec),
        },
        coords={"scheme": list(METHODS), "budget": labels, "bits": ("budget", [b for b, _ in budgets]),
                "grid_of_budget": ("budget", [g for _, g in budgets]), "grid": grids},
    )
    info["budget_bits_per_param"] = ("budget", info["bits_per_param"].sel(scheme="rtn").values)
    shortfall = 1 - info["bits_per_param"] / info["budget_bits_per_param"]
    info["size_shortfall"] = shortfall
    info["size_shortfall"].attrs["long_name"] = "1 - size / budget (0: exactly matched)"
    return models, info


def rollout_errors(bench: Benchmark, models: dict, progress: bool = False) -> xr.DataArray:
    """Mean squared error per window of every model's rollout, against the float model and the truth.

    Returns a DataArray ``mse(scheme, budget, against, window, lead[, variable])``, the spatial
    mean (latitude-weighted on a grid) of the squared difference in normalised units;
    ``against`` is ``"float"`` or ``"truth"``. For a series the ``station`` of each window is a
    coordinate. RMSE over windows is ``sqrt(mse.mean("window"))``.
    """
    T = bench.horizon

    def run(system):
        return bench.view(forecast(system, bench.x_eval, T)).astype("float64")

    float_fc = run(bench.system)
    refs = {"float": float_fc, "truth": bench.view(bench.truth).astype("float64")}
    keep = ("window", *[d for d in ("variable",) if d in float_fc.dims])
    methods = list(dict.fromkeys(m for m, _ in models))
    labels = list(dict.fromkeys(b for _, b in models))
    out = None
    for (m, b), system in tqdm(models.items(), desc=f"{bench.name}: rollouts", disable=not progress):
        fc = run(system)
        for a, ref in refs.items():
            mse = _mean((fc - ref) ** 2, keep).transpose("window", "lead", ...)
            if out is None:
                out = xr.DataArray(np.full((len(methods), len(labels), 2, *mse.shape), np.nan),
                                   dims=("scheme", "budget", "against", *mse.dims),
                                   coords={"scheme": methods, "budget": labels, "against": list(refs), **mse.coords})
            out.loc[dict(scheme=m, budget=b, against=a)] = mse.values
    out.name = "mse"
    out.attrs = {"long_name": "mean squared rollout error per window (normalised units)", "horizon": T}
    return out


def compare(bench: Benchmark, budgets=BUDGETS, units="tensor", kind: str = "gauss",
            group_size: int = GROUP_SIZE, options=OPTIONS, n_hutchinson: int = 16, n_boot: int = 1000,
            seed: int = 0, progress: bool = False, executor=None) -> xr.Dataset:
    """The whole comparison on one model (see the module docstring); one Dataset, for netCDF.

    Returns
    -------
    xarray.Dataset
        ``mse(scheme, budget, against, window, lead[, variable])`` (:func:`rollout_errors`) and
        the float model's own ``float_mse(window, lead[, variable])`` against the truth;
        ``bits_per_param``, ``size_shortfall`` and the timings of :func:`quantized_models`;
        ``sensitivity_seconds(scheme)``, ``plain_seconds`` (one float rollout of the probe
        states over ``T``, best of 3), ``point_seconds(scheme)`` (everything a method spends for all
        budgets, divided by their number: its time per Pareto point) and ``point_vs_gptq``;
        ``gamma(scheme, unit)`` the scores (log sensitivities), ``n_params(unit)``, ``hessian_trace(unit)`` and
        ``hessian_floored(unit)`` (traces <= 0 that were floored), and ``rho_vs_tqs(scheme)`` with
        ``rho_lo``/``rho_hi``: Spearman's rho of each method's unit ranking against TQS's.
    """
    scores, sens_seconds = sensitivities(bench, units, kind, n_hutchinson=n_hutchinson, seed=seed,
                                         progress=progress, executor=executor)
    models, info = quantized_models(bench, scores, budgets, group_size, options, progress=progress)
    mse = rollout_errors(bench, models, progress)
    float_mse = rollout_errors(bench, {("float", "none"): bench.system}).sel(
        scheme="float", budget="none", against="truth", drop=True)
    system = as_system(bench.system)
    with system.evaluating():  # what the probe's reference rollout is: no labelling, best of 3
        plain = min(_timed(rollout, system, bench.x_probe, bench.horizon)[1] for _ in range(3))
    ds = info.assign(mse=mse, float_mse=float_mse)
    ds["float_mse"].attrs = {"long_name": "the float model's own mean squared error against the truth, per window"}
    sens = np.array([sens_seconds[SCORED_BY[m][0]] if m in SCORED_BY else 0.0 for m in METHODS])
    ds["sensitivity_seconds"] = ("scheme", sens, {"long_name": "wall seconds of the sensitivity pass"})
    ds["plain_seconds"] = ((), plain, {"long_name": "one float rollout of the probe states over T, best of 3"})
    total = sens + ds["table_seconds"].sum("grid") + ds["solve_seconds"].sum("budget") + ds["quantize_seconds"].sum("budget")
    ds["point_seconds"] = total / ds.sizes["budget"]
    ds["point_seconds"].attrs["long_name"] = "seconds per Pareto point (sensitivity, pricing, solving, quantizing)"
    ds["point_vs_gptq"] = ds["point_seconds"] / ds["point_seconds"].sel(scheme="gptq")
    units = scores["tqs"]["unit"].values
    ds["gamma"] = (("scheme", "unit"), np.array([[float(scores[m]["gamma"].sel(unit=u)) if m in scores else np.nan
                                                  for u in units] for m in METHODS]))
    ds = ds.assign_coords(unit=units)
    ds["n_params"] = ("unit", scores["tqs"]["n_params"].sel(unit=units).values)
    ds["hessian_trace"] = ("unit", scores["hessian"]["trace"].sel(unit=units).values,
                           {"long_name": "Hutchinson estimate of tr(H_u) of the training loss"})
    ds["hessian_floored"] = ("unit", scores["hessian"]["floored"].sel(unit=units).values,
                             {"long_name": "trace estimate <= 0, floored (tqslite.baselines.hessian_scores)"})
    rho = {m: spearman_agreement(scores["tqs"], scores[m], n_boot=n_boot, seed=seed) for m in scores if m != "tqs"}
    for key, name in (("rho", "rho_vs_tqs"), ("lo", "rho_lo"), ("hi", "rho_hi")):
        ds[name] = ("scheme", [rho[m][key] if m in rho else np.nan for m in METHODS])
    ds.attrs = dict(model=bench.name, horizon=bench.horizon, per=bench.per, units=str(units), kind=kind,
                    group_size=group_size, options=list(options), n_probe=len(bench.x_probe),
                    n_eval=bench.x_eval.sizes["window"], n_hutchinson=n_hutchinson, seed=seed,
                    torch_threads=torch.get_num_threads(),
                    note="measurements on a tqslite stand-in model, not the paper's numbers")
    return ds


# --------------------------------------------------------------------------------------------
# Reading the results
# --------------------------------------------------------------------------------------------

def _targets(per: str, mse: xr.DataArray):
    """``[(label, mse over the target's windows)]``: one per variable, or per station."""
    if per == "station":
        st = mse["station"].values.astype(str)
        return [(s, mse.isel(window=np.flatnonzero(st == s))) for s in dict.fromkeys(st)]
    if "variable" in mse.dims:
        return [(str(v), mse.sel(variable=v)) for v in mse["variable"].values]
    return [("all", mse)]


def _rmse_per_target(mse: xr.DataArray, per: str) -> xr.DataArray:
    """``sqrt`` of the mean over each target's windows, with the target as the last dim."""
    parts = [np.sqrt(m.mean("window")).expand_dims({per: [t]}) for t, m in _targets(per, mse)]
    return xr.concat(parts, per).transpose(..., per)


def rmse_table(result: xr.Dataset, against: str = "float", lead: int | None = None) -> xr.DataArray:
    """RMSE at ``lead`` (default: the horizon) per method, budget and variable (or station)."""
    mse = result["mse"].sel(against=against, lead=lead or result.attrs["horizon"])
    out = _rmse_per_target(mse, result.attrs.get("per", "variable")).transpose("scheme", "budget", ...)
    out.name = f"rmse_vs_{against}"
    return out


def float_rmse(result: xr.Dataset, lead: int | None = None) -> xr.DataArray:
    """The float model's own RMSE against the truth at ``lead``, per variable (or station)."""
    out = _rmse_per_target(result["float_mse"].sel(lead=lead or result.attrs["horizon"]),
                           result.attrs.get("per", "variable"))
    out.name = "float_rmse_vs_truth"
    return out


def win_table(result: xr.Dataset, reference: str = "tqs", against: str = "float", lead: int | None = None,
              n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> xr.Dataset:
    """The reference method against every other, per budget and variable (or station).

    The ratio is the reference's RMSE over the other's (below 1: the reference is better). Its
    interval is a percentile bootstrap over evaluation windows, resampled jointly for both
    methods (paired). The outcome is ``"win"`` when the interval lies below 1, ``"loss"`` when
    it lies above, ``"tie"`` otherwise -- including identical plans (ratio exactly 1).

    Returns a Dataset with dims ``budget``, ``baseline`` and the target dim: ``ratio``, ``lo``,
    ``hi``, ``outcome`` (strings), and the sizes ``bits_per_param(budget)`` of the reference.
    """
    mse = result["mse"].sel(against=against, lead=lead or result.attrs["horizon"])
    per = result.attrs.get("per", "variable")
    others = [m for m in result["scheme"].values if m != reference]
    rng = np.random.default_rng(seed)
    alpha = (1 - ci) / 2
    targets = _targets(per, mse)
    ratio, lo, hi = (np.full((mse.sizes["budget"], len(others), len(targets)), np.nan) for _ in range(3))
    for t, (_, m) in enumerate(targets):
        idx = rng.integers(0, m.sizes["window"], size=(n_boot, m.sizes["window"]))
        ref = m.sel(scheme=reference).transpose("budget", "window").values
        for o, other in enumerate(others):
            base = m.sel(scheme=other).transpose("budget", "window").values
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio[:, o, t] = np.sqrt(ref.mean(1) / base.mean(1))
                boot = np.sqrt(ref[:, idx].mean(-1) / base[:, idx].mean(-1))  # (budget, n_boot)
            lo[:, o, t], hi[:, o, t] = np.nanquantile(boot, [alpha, 1 - alpha], axis=1)
    outcome = np.where(hi < 1, "win", np.where(lo > 1, "loss", "tie"))
    outcome[np.isnan(ratio)] = "tie"
    dims = ("budget", "baseline", per)
    coords = {"budget": mse["budget"].values, "baseline": others, per: [t for t, _ in targets]}
    return xr.Dataset(
        {"ratio": (dims, ratio, {"long_name": f"RMSE {reference} / RMSE baseline"}), "lo": (dims, lo),
         "hi": (dims, hi), "outcome": (dims, outcome.astype(object)),
         "bits_per_param": ("budget", result["bits_per_param"].sel(scheme=reference).values)},
        coords=coords,
        attrs=dict(reference=reference, against=against, lead=int(lead or result.attrs["horizon"]), n_boot=n_boot,
                   ci=ci, seed=seed, model=result.attrs.get("model", "")),
    )


def tally(table: xr.Dataset) -> xr.Dataset:
    """Counts of ``win``, ``tie`` and ``loss`` of the reference per budget and baseline."""
    per = [d for d in table["outcome"].dims if d not in ("budget", "baseline")][0]
    return xr.Dataset({k: (table["outcome"] == k).sum(per) for k in ("win", "tie", "loss")})


def cost_summary(result: xr.Dataset) -> xr.Dataset:
    """The cost table of one comparison: per method, seconds and ratios measured in the same run.

    ``sensitivity_seconds`` (the TQS probe and each baseline's pass), ``probe_vs_plain`` (a
    pass over the wall time of one float rollout of the same states: what the probe costs in
    units of plain inference), ``quantize_seconds_mean`` (per budget: GPTQ per budget, or
    applying a plan), ``point_seconds`` and ``point_vs_gptq`` (time per Pareto point).
    """
    return xr.Dataset({
        "sensitivity_seconds": result["sensitivity_seconds"],
        "probe_vs_plain": (result["sensitivity_seconds"] / result["plain_seconds"]).where(
            result["sensitivity_seconds"] > 0),  # NaN: no sensitivity pass (GPTQ, QEP, RTN)
        "quantize_seconds_mean": result["quantize_seconds"].mean("budget"),
        "solve_seconds_mean": result["solve_seconds"].mean("budget"),
        "point_seconds": result["point_seconds"],
        "point_vs_gptq": result["point_vs_gptq"],
    }, attrs={"model": result.attrs.get("model", ""), "n_budgets": result.sizes["budget"],
              "plain_seconds": float(result["plain_seconds"])})


def ranking_stability(name: str, splits=("validation", "heldout", "train"), n: int | None = None,
                      horizon: int | None = None, units="tensor", kind: str = "gauss",
                      n_boot: int = 1000, seed: int = 0, progress: bool = False, prep=None) -> xr.Dataset:
    """Do TQS rankings of a shipped model hold on other data? Probe it on each split and compare.

    ``splits`` are periods of :func:`tqslite.train.probe_states`: for the grid models the
    validation period and the training period of the main simulation, and ``heldout``, an
    independent simulation (another data set); for the series model three periods of the
    station records. Same number of states on each, so the bootstrap resamples windows.

    Returns a Dataset: ``gamma(split, unit)`` and, for every pair of splits (dim ``pair``,
    e.g. ``"validation~heldout"``), ``rho``, ``lo``, ``hi`` (Spearman, percentile interval).
    """
    from .models import load, module_of
    from .train import prepare, probe_states

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


__all__ = ["BUDGETS", "Benchmark", "CALIBRATED", "GROUP_SIZE", "MATCH_TOLERANCE", "METHODS", "MIXED", "OPTIONS",
           "SCORED_BY", "SMOKE_BUDGETS", "benchmark", "compare", "cost_summary", "float_rmse", "quantized_models",
           "ranking_stability", "rmse_table", "rollout_errors", "sensitivities", "smoke_settings", "tally", "win_table"]
