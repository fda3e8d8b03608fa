"""How the probe's cost grows with the model: from the 100k-parameter stand-in to a 100M+ one.

Run:  .venv/bin/python benchmarks/probe_scaling.py [--windows 4] [--horizon 4] [--largest 768x25] [--sizes 768x25] [--out DIR]

The architecture is the ``timesfm_lite`` decoder-only patch transformer
(:func:`tqslite.models.timesfm_lite.build`, a context of 64 values in 16 patches, causal
attention, wrapped as a :class:`tqslite.WindowedSystem`), widened and deepened: ``dim x depth``
from the shipped ``64 x 3`` (0.1M parameters, 43 tensor units) to ``768 x 25`` (118M parameters,
307 units), plus a width-only and a depth-only series so that parameters and units can be told
apart. Weights are random (seeded): the timing does not depend on training, the scores would.

For every size, each in a fresh process (so its peak memory is its own):

* **plain inference**: window-steps per second of one rollout of ``--windows`` windows;
* **probe**: :func:`tqslite.probe` with the Gaussian perturbation and tensor units, ``--windows``
  windows x ``--horizon`` leads, chunk size ``--chunk-units`` (1 on the CPU: one unit at a time,
  weights swapped in place, no copy of the model) -- seconds, and the peak resident memory of
  the process (``ru_maxrss``: the model itself included), and its cost in plain rollouts;
* **GPTQ**: seconds of one ``tqslite.GPTQ().quantize_weights`` run (its defaults) on ``Int(4)``
  for every tensor, 32 calibration states: GPTQ's cost per budget;
* **time per Pareto point** of 10 budgets: TQS = (probe + one RTN cost table + 10 solves + 10
  applications) / 10, against GPTQ's one run per budget.

Then the growth exponents, by log-log least squares over all sizes: probe seconds against
parameters and units together (``t ~ P^a U^b``), and plain and GPTQ seconds against parameters.
Everything printed is measured here, now; DIR/probe_scaling.nc keeps it. A shared machine
slows every number: run it on an idle one.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import time
from pathlib import Path

import numpy as np
import xarray as xr

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

#: (dim, depth, heads): the shipped size, a width series at depth 3, a depth series at width
#: 128, and the ladder up to 118M parameters. ``--largest`` replaces the last.
SIZES = [(64, 3, 4), (128, 3, 4), (256, 3, 4), (512, 3, 8), (128, 6, 4), (128, 12, 4), (128, 24, 4),
         (256, 12, 8), (512, 18, 8), (768, 25, 12)]


def measure(dim: int, depth: int, heads: int, windows: int, horizon: int, chunk_units: int, threads: int,
            with_pareto: bool) -> dict:
    """One size, in this process: plain inference, probe, GPTQ and the Pareto-point costs."""
    import torch

    import tqslite
    from tqslite.comparison import BUDGETS
    from tqslite.config import PerChannel, PerGroup, int_options
    from tqslite.models import timesfm_lite

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    system = tqslite.WindowedSystem(timesfm_lite.build(dict(dim=dim, depth=depth, heads=heads)).eval())
    names = system.parameter_names()
    params = sum(system.get_parameter(n).numel() for n in names)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(windows, 64, generator=g)
    calibration = torch.randn(32, 64, generator=g)
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    with system.evaluating():
        tqslite.rollout(system, x0, 1)  # warm-up
        best = np.inf
        for _ in range(2):
            t0 = time.perf_counter()
            tqslite.rollout(system, x0, horizon)
            best = min(best, time.perf_counter() - t0)
    plain_rollout = best

    t0 = time.perf_counter()
    scores = tqslite.probe(system, x0, horizon=horizon, chunk_units=chunk_units, progress=False)
    probe_seconds = time.perf_counter() - t0
    rss_probe = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # (freshly initialised norm biases are all zero: their Gaussian perturbation is zero, "unmeasured")
    assert not scores["nonfinite"].any(), "a perturbed rollout turned non-finite; use smaller states"

    t0 = time.perf_counter()
    tqslite.GPTQ().quantize_weights(system, {n: tqslite.Int(4) for n in names}, calibration)
    gptq_seconds = time.perf_counter() - t0

    out = dict(dim=dim, depth=depth, heads=heads, params=params, units=len(names), plain_rollout=plain_rollout,
               plain_steps_per_second=windows * horizon / plain_rollout, probe_seconds=probe_seconds,
               probe_in_rollouts=probe_seconds / plain_rollout, peak_rss_probe=rss_probe, rss_model=rss_model,
               model_bytes=sum(system.get_parameter(n).nbytes for n in names), gptq_seconds=gptq_seconds,
               table_seconds=np.nan, solve_seconds=np.nan, apply_seconds=np.nan)
    if with_pareto:
        scale = {"channel": PerChannel(), "group": PerGroup(32)}
        t0 = time.perf_counter()
        tables = {grid: tqslite.cost_table(scores, system, int_options((2, 3, 4, 5, 6, 8), s)) for grid, s in
                  scale.items()}
        out["table_seconds"] = time.perf_counter() - t0
        out["solve_seconds"] = out["apply_seconds"] = 0.0
        for bits, grid in BUDGETS:
            budget = tqslite.plan_size(tqslite.uniform_plan(system, tqslite.Int(bits, scale[grid])), system)
            t0 = time.perf_counter()
            plan = tqslite.allocate(tables[grid], budget_bits=budget.bits_per_param)
            out["solve_seconds"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            tqslite.apply_plan(system, plan)
            out["apply_seconds"] += time.perf_counter() - t0
    return out


def in_fresh_process(*args) -> dict:
    pool = multiprocessing.get_context("spawn").Pool(1)
    try:
        return pool.apply(measure, args)
    finally:
        pool.close()
        pool.join()


def fit(y, *xs):
    """Exponents of ``y ~ c * prod(x_i ** e_i)`` by least squares on logs; returns ``(e_1, ..., e_k)``."""
    a = np.column_stack([np.log(x) for x in xs] + [np.ones(len(y))])
    coef, *_ = np.linalg.lstsq(a, np.log(y), rcond=None)
    return coef[:-1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=4, help="probe windows (default 4)")
    ap.add_argument("--horizon", type=int, default=4, help="probe leads (default 4)")
    ap.add_argument("--chunk-units", type=int, default=1, help="units per batched pass (default 1: one at a time)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--largest", default="768x25", help="DIMxDEPTH of the largest model (default 768x25: 118M)")
    ap.add_argument("--quick", action="store_true", help="the four smallest sizes only")
    ap.add_argument("--sizes", default=None,
                    help="comma-separated DIMxDEPTH sizes to run instead of the ladder, e.g. 768x25 (the largest "
                         "alone: no exponents)")
    ap.add_argument("--out", default="benchmarks/results", help="folder for probe_scaling.nc")
    args = ap.parse_args()
    dim, depth = (int(v) for v in args.largest.split("x"))
    sizes = SIZES[:-1] + [(dim, depth, max(1, dim // 64))]
    if args.quick:
        sizes = sizes[:4]
    if args.sizes:
        sizes = [(d, n, max(1, d // 64)) for d, n in (map(int, v.split("x")) for v in args.sizes.split(","))]
    rows = []
    print(f"timesfm_lite widened and deepened, random weights; probe: {args.windows} windows x {args.horizon} leads, "
          f"Gaussian, tensor units, chunk_units={args.chunk_units}, {args.threads} thread(s); each size in its own "
          "process", flush=True)
    head = (f"{'dim x depth':>12}{'params':>11}{'units':>6}{'plain w-s/s':>12}{'probe s':>9}{'probe/rollout':>14}"
            f"{'peak RSS':>10}{'weights':>9}{'GPTQ s':>8}{'TQS/pt':>9}{'GPTQ/pt':>9}{'ratio':>7}")
    print(head, flush=True)
    for d, n, h in sizes:
        r = in_fresh_process(d, n, h, args.windows, args.horizon, args.chunk_units, args.threads, True)
        r["tqs_point"] = (r["probe_seconds"] + r["table_seconds"] + r["solve_seconds"] + r["apply_seconds"]) / 10
        rows.append(r)
        print(f"{f'{d} x {n}':>12}{r['params'] / 1e6:>10.2f}M{r['units']:>6}{r['plain_steps_per_second']:>12.1f}"
              f"{r['probe_seconds']:>9.1f}{r['probe_in_rollouts']:>14.1f}{r['peak_rss_probe'] / 2**30:>8.2f}GB"
              f"{r['model_bytes'] / 2**20:>7.0f}MB{r['gptq_seconds']:>8.1f}{r['tqs_point']:>8.2f}s"
              f"{r['gptq_seconds']:>8.2f}s{r['tqs_point'] / r['gptq_seconds']:>7.2f}", flush=True)

    big = max(rows, key=lambda r: r["params"])
    largest = (f"\nlargest: {big['params'] / 1e6:.1f}M parameters, {big['units']} units, probed in "
               f"{big['probe_seconds'] / 60:.1f} min ({args.windows} windows x {args.horizon} leads, chunk_units="
               f"{args.chunk_units}, {args.threads} thread(s)); peak resident memory "
               f"{big['peak_rss_probe'] / 2**30:.2f} GB (the model's weights: {big['model_bytes'] / 2**30:.2f} GB)")
    if len(rows) < 3:  # too few sizes to fit exponents
        print(largest)
        return
    P = np.array([r["params"] for r in rows], float)
    U = np.array([r["units"] for r in rows], float)
    t_probe = np.array([r["probe_seconds"] for r in rows])
    a, b = fit(t_probe, P, U) if np.ptp(np.log(U)) > 0 else (fit(t_probe, P)[0], np.nan)
    (p_plain,) = fit(np.array([r["plain_rollout"] for r in rows]), P)
    (p_gptq,) = fit(np.array([r["gptq_seconds"] for r in rows]), P)
    (p_gptq_u,) = fit(np.array([r["gptq_seconds"] for r in rows]), U) if np.ptp(np.log(U)) > 0 else (np.nan,)
    (p_point,) = fit(np.array([r["tqs_point"] / r["gptq_seconds"] for r in rows]), P)
    print("\ngrowth exponents (log-log least squares over the sizes above):")
    print(f"  probe seconds ~ params^{a:.2f} x units^{b:.2f}   (one rollout per unit, each costing ~ params)")
    print(f"  plain rollout seconds ~ params^{p_plain:.2f};  GPTQ seconds ~ params^{p_gptq:.2f} (~ units^{p_gptq_u:.2f})")
    print(f"  TQS/GPTQ time per Pareto point ~ params^{p_point:.2f}")
    print(largest)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keys = [k for k in rows[0] if k not in ("dim", "depth", "heads")]
    ds = xr.Dataset({k: ("size", [r[k] for r in rows]) for k in keys},
                    coords={"size": [f"{r['dim']}x{r['depth']}" for r in rows],
                            "dim": ("size", [r["dim"] for r in rows]), "depth": ("size", [r["depth"] for r in rows])},
                    attrs=dict(windows=args.windows, horizon=args.horizon, chunk_units=args.chunk_units,
                               threads=args.threads, exponent_probe_params=a, exponent_probe_units=b,
                               exponent_plain_params=p_plain, exponent_gptq_params=p_gptq,
                               note="random weights; timings of this machine, not the paper's"))
    ds.to_netcdf(out / "probe_scaling.nc")
    print(f"\nwritten {out / 'probe_scaling.nc'}")


if __name__ == "__main__":
    main()
