"""Probe throughput against plain inference, TQS's time per Pareto point against GPTQ's, a cluster.

Run:  .venv/bin/python benchmarks/probe_throughput.py [--threads 1] [--quick] [--out DIR]

1. **Throughput.** For a small MLP, a small transformer and the three shipped stand-ins: the TQS
   probe's throughput in model-steps per second (one reference rollout plus one perturbed
   rollout per unit, every window, every lead) against plain batched inference of the same model
   at the same batch (``units + 1`` rollouts of the same windows), timed in the same run, best of
   ``--repeats`` interleaved rounds. The probe runs one unit at a time (``chunk_units=1``) and
   with batched units (:mod:`tqslite.row_blocks`: ``K`` copies as one plain pass on ``K x
   windows`` rows) at ``K`` = 2, 4 and every unit; the best ``K`` is printed. Also printed: the
   *ceiling* of any engine that runs ``K`` copies as one pass of ``K`` times the rows, measured
   on plain inference alone: ``max_K K * t(batch B) / t(batch K * B)``. A model whose step is
   compute-bound at batch ``B`` (the ceiling near 1) gains nothing from batching units.
2. **Time per Pareto point** on each stand-in, 10 budgets (2, 3, 4, 6 and 8 bits per channel and
   per group of 32, as :mod:`tqslite.comparison`): TQS = one probe (the comparison's settings) +
   one cost table per grid + 10 solves + 10 applications of the plan (RTN); GPTQ = 10 runs of
   ``tqslite.GPTQ()`` (its defaults: act-order, static groups, blocks of 128) on the uniform
   configuration of each budget, 32 calibration states. Also printed: the largest probe setting
   (windows x leads per unit) at which TQS would cost half of GPTQ per point on this machine,
   from the measured cost of one window-step.
3. **A cluster**: the probe of ``pangu_lite`` on a local dask cluster of 2 worker processes (one
   thread each, started with ``tqslite.sweep.WORKER_CONFIG``) through ``distributed.Client``, against
   the serial probe with one thread.
4. The multiple-choice knapsack on 1000 units x 7 options: both exact solvers (the pruned dynamic
   program, the default, and HiGHS) and the greedy rule.

Everything printed is measured here, now, on this machine; results go to DIR/probe_throughput.nc.
A shared machine skews the ratios: run it on an idle one.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import tqslite  # noqa: E402
from tqslite.comparison import BUDGETS, GROUP_SIZE  # noqa: E402
from tqslite.config import PerChannel, PerGroup, int_options  # noqa: E402
from tqslite.models import load  # noqa: E402
from tqslite.sweep import WORKER_CONFIG  # noqa: E402
from tqslite.splits import calibration_states, probe_states  # noqa: E402

STAND_INS = ("pangu_lite", "aurora_lite", "timesfm_lite")


class TinyTransformer(nn.Module):
    """A state-to-state transformer: (B, tokens, d) -> (B, tokens, d), residual update."""

    def __init__(self, d=64, heads=4, layers=2, tokens=16):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.blocks = nn.ModuleList(
            [nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True) for _ in range(layers)])
        self.out = nn.Linear(d, d)
        self.tokens = tokens

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return x + 0.1 * torch.tanh(self.out(h))


def best_times(fns, repeat):
    """Best wall time of each function over ``repeat`` interleaved rounds (robust to passing load)."""
    best = [np.inf] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def throughput(name, system, x0, horizon, repeat):
    """Model-steps per second: plain inference, the probe one unit at a time and batched; the ceiling."""
    system = tqslite.as_system(system)
    n_units = len(system.parameter_names())
    steps = x0.shape[0] * horizon * (n_units + 1)

    def plain():
        with system.evaluating():
            for _ in range(n_units + 1):
                tqslite.rollout(system, x0, horizon)

    kw = dict(horizon=horizon, progress=False)
    sizes = sorted({k for k in (2, 4, n_units) if k <= n_units})
    tqslite.probe(system, x0[:2], horizon=1, chunk_units=2, memory_budget="1GB", progress=False)  # warm-up
    times = best_times([plain, lambda: tqslite.probe(system, x0, chunk_units=1, **kw)]
                       + [lambda k=k: tqslite.probe(system, x0, chunk_units=k, memory_budget="4GB", **kw)
                          for k in sizes], repeat)
    t_plain, t_one, t_batched = times[0], times[1], dict(zip(sizes, times[2:]))
    best_k = min(t_batched, key=t_batched.get)
    with system.evaluating(), torch.no_grad():  # plain steps at K times the batch: what batching could gain
        step = [best_times([lambda k=k: system.step(x0.repeat(k, *[1] * (x0.ndim - 1)))], max(repeat, 3))[0]
                for k in (1, 2, 4, 8)]
    ceiling = max(k * step[0] / t for k, t in zip((1, 2, 4, 8), step))
    return dict(model=name, units=n_units, params=sum(system.get_parameter(p).numel() for p in
                                                      system.parameter_names()),
                windows=x0.shape[0], horizon=horizon, plain=steps / t_plain, one=steps / t_one,
                batched=steps / t_batched[best_k], best_k=best_k, ceiling=ceiling)


def probe_setting(name):
    """The comparison's probe settings for a stand-in: (windows, horizon)."""
    grid = tqslite.models.module_of(name).LAYOUT == "grid"
    return (16, 12) if grid else (256, 8)


def pareto_cost(name, repeat):
    """Seconds of TQS (probe, tables, 10 solves, 10 applications) and of 10 GPTQ runs, one stand-in."""
    system, _ = load(name)
    windows, horizon = probe_setting(name)
    x0 = torch.from_numpy(probe_states(name, "validation", windows, horizon).values)
    calibration = calibration_states(name, 32)
    scale = {"channel": PerChannel(), "group": PerGroup(GROUP_SIZE)}
    options = {g: int_options((2, 3, 4, 5, 6, 8), scale[g]) for g in scale}

    def tqs():
        t = {}
        t0 = time.perf_counter()
        scores = tqslite.probe(system, x0, horizon=horizon, progress=False)
        t["probe"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        tables = {g: tqslite.cost_table(scores, system, options[g]) for g in scale}
        t["tables"] = time.perf_counter() - t0
        t["solves"] = t["applications"] = 0.0
        for bits, grid in BUDGETS:
            budget = tqslite.plan_size(tqslite.uniform_plan(system, tqslite.Int(bits, scale[grid])), system)
            t0 = time.perf_counter()
            plan = tqslite.allocate(tables[grid], budget_bits=budget.bits_per_param)
            t["solves"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            tqslite.apply_plan(system, plan)
            t["applications"] += time.perf_counter() - t0
        return t

    def gptq():
        t0 = time.perf_counter()
        for bits, grid in BUDGETS:
            tqslite.apply_plan(system, tqslite.uniform_plan(system, tqslite.Int(bits, scale[grid])), tqslite.GPTQ(),
                               calibration)
        return time.perf_counter() - t0

    best_tqs, best_gptq = None, np.inf
    for _ in range(repeat):
        t = tqs()
        if best_tqs is None or sum(t.values()) < sum(best_tqs.values()):
            best_tqs = t
        best_gptq = min(best_gptq, gptq())
    n_units = len(system.parameter_names())
    with system.evaluating():
        t_step = min(best_times([lambda: tqslite.rollout(system, x0, horizon)], repeat)) / (windows * horizon)
    fixed = best_tqs["tables"] + best_tqs["solves"] + best_tqs["applications"]
    # TQS per point <= GPTQ per point / 2  <=>  (n_units + 1) * W * T * t_step + fixed <= best_gptq / 2
    break_even = max(0.0, (best_gptq / 2 - fixed) / ((n_units + 1) * t_step))
    return dict(model=name, windows=windows, horizon=horizon, **{f"tqs_{k}": v for k, v in best_tqs.items()},
                tqs_point=sum(best_tqs.values()) / len(BUDGETS), gptq_point=best_gptq / len(BUDGETS),
                window_steps_at_half=break_even)


def cluster_speedup(repeat):
    """Serial probe of pangu_lite (one thread) against a local dask cluster of 2 single-thread workers."""
    import dask
    import distributed

    system, _ = load("pangu_lite")
    windows, horizon = probe_setting("pangu_lite")
    x0 = torch.from_numpy(probe_states("pangu_lite", "validation", windows, horizon).values)
    kw = dict(horizon=horizon, progress=False, chunk_units=1)
    serial = tqslite.probe(system, x0, **kw)
    # timed before the cluster starts: its scheduler and client share this process
    (t_serial,) = best_times([lambda: tqslite.probe(system, x0, **kw)], repeat)
    with dask.config.set(WORKER_CONFIG), \
            distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                     silence_logs=logging.ERROR) as cluster, \
            distributed.Client(cluster) as client:
        tqslite.probe(system, x0[:1], horizon=1, executor=client, chunk_units=1, progress=False)  # workers import torch
        (t_cluster,) = best_times([lambda: tqslite.probe(system, x0, executor=client, **kw)], repeat)
        same = bool(tqslite.probe(system, x0, executor=client, **kw).identical(serial))
    return t_serial, t_cluster, same


def allocator_timing(units=1000, options=(2, 3, 4, 5, 6, 8, 16), seed=0):
    rng = np.random.default_rng(seed)
    n = rng.integers(1_000, 500_000, size=units)
    bits = np.asarray(options, float)
    scales = np.where(bits[None, :] <= 8, 16 * np.ceil(n / 256)[:, None], 0)  # one float16 scale per 256 weights
    sizes = n[:, None] * bits[None, :] + scales
    lam = rng.normal(0, 2, size=units)
    costs = np.exp(lam)[:, None] * 2.0 ** -bits[None, :] * rng.uniform(0.8, 1.2, size=(units, len(options)))
    budget = 4.0 * n.sum()
    out = {}
    for solver in ("exact", "milp", "greedy"):
        t0 = time.perf_counter()
        choice = tqslite.solve_mckp(costs, sizes, budget, solver)
        out[solver] = (time.perf_counter() - t0, costs[np.arange(units), choice].sum())
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=64, help="windows of the MLP and the transformer (default 64)")
    ap.add_argument("--horizon", type=int, default=20, help="their rollout steps (default 20)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds, best kept (default 3)")
    ap.add_argument("--quick", action="store_true", help="one round, no stand-in throughput, no cluster")
    ap.add_argument("--out", default="benchmarks/results", help="folder for probe_throughput.nc")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="torch.vmap has no batching rule")  # the transformer's fused layer
    repeat = 1 if args.quick else args.repeats
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    mlp = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 64))
    tr = TinyTransformer()
    cases = [("mlp", mlp, torch.randn(args.windows, 64, generator=g), args.horizon),
             ("transformer", tr, torch.randn(args.windows, tr.tokens, 64, generator=g), args.horizon)]
    if not args.quick:
        for name in STAND_INS:
            windows, horizon = probe_setting(name)
            cases.append((name, load(name)[0], torch.from_numpy(probe_states(name, "validation", windows,
                                                                              horizon).values), horizon))
    rows = [throughput(name, model, x0, horizon, repeat) for name, model, x0, horizon in cases]

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), best of {repeat}")
    print("\n1. probe throughput, model-steps per second (windows x leads x (units + 1)), same batch as plain;")
    print("   ceiling: the most any engine running K copies as one pass on K x the batch could gain (plain steps)")
    print(f"{'model':<14}{'units':>6}{'params':>9}{'windows':>8}{'leads':>6}{'plain':>10}{'one unit':>10}"
          f"{'batched':>10}{'K':>4}{'one/plain':>11}{'batched/plain':>15}{'ceiling':>9}")
    for r in rows:
        print(f"{r['model']:<14}{r['units']:>6}{r['params']:>9}{r['windows']:>8}{r['horizon']:>6}{r['plain']:>10.0f}"
              f"{r['one']:>10.0f}{r['batched']:>10.0f}{r['best_k']:>4}{r['one'] / r['plain']:>11.2f}"
              f"{r['batched'] / r['plain']:>15.2f}{r['ceiling']:>9.2f}")

    costs = [pareto_cost(name, repeat) for name in STAND_INS]
    print("\n2. time per Pareto point, 10 budgets; TQS = probe + cost tables + 10 solves + 10 applications (RTN);")
    print("   GPTQ = 10 runs of tqslite.GPTQ() (act-order, static groups, blocks of 128), 32 calibration states")
    print(f"{'model':<14}{'probe':>9}{'tables':>8}{'solves':>8}{'apply':>8}{'TQS/pt':>9}{'GPTQ/pt':>9}"
          f"{'TQS/GPTQ':>10}   probe setting    setting at 0.5x")
    for c in costs:
        print(f"{c['model']:<14}{c['tqs_probe']:>8.2f}s{c['tqs_tables']:>7.2f}s{c['tqs_solves']:>7.2f}s"
              f"{c['tqs_applications']:>7.2f}s{c['tqs_point']:>8.3f}s{c['gptq_point']:>8.3f}s"
              f"{c['tqs_point'] / c['gptq_point']:>10.2f}   {c['windows']:>3} x {c['horizon']:<2} leads"
              f"   {c['window_steps_at_half']:>6.1f} window-steps")

    cluster = None
    if not args.quick:
        t_serial, t_cluster, same = cluster_speedup(repeat)
        cluster = (t_serial, t_cluster)
        print(f"\n3. pangu_lite probe on a local dask cluster (2 workers x 1 thread) vs serial (1 thread): "
              f"{t_serial:.1f} s / {t_cluster:.1f} s = {t_serial / t_cluster:.2f}x; scores identical: {same}")

    alloc = allocator_timing()
    (t_exact, c_exact), (t_milp, c_milp), (t_greedy, c_greedy) = alloc["exact"], alloc["milp"], alloc["greedy"]
    print("\n4. allocator, 1000 units x 7 options, budget 4 bits/param:")
    print(f"  exact (dynamic program) {t_exact:8.3f} s   objective {c_exact:.6g}")
    print(f"  milp (exact, HiGHS)     {t_milp:8.3f} s   objective {c_milp:.6g}   "
          f"differs by {abs(c_milp / c_exact - 1):.1e}")
    print(f"  greedy                  {t_greedy:8.3f} s   objective {c_greedy:.6g}   "
          f"gap {100 * (c_greedy / c_exact - 1):.3f} %")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = xr.Dataset(
        {k: ("model", [r[k] for r in rows]) for k in ("units", "params", "windows", "horizon", "plain", "one",
                                                       "batched", "best_k", "ceiling")},
        coords={"model": [r["model"] for r in rows]},
        attrs=dict(exact_seconds=t_exact, milp_seconds=t_milp, greedy_seconds=t_greedy,
                   greedy_gap=c_greedy / c_exact - 1,
                   torch=torch.__version__, threads=torch.get_num_threads()),
    )
    pts = xr.Dataset({f"point_{k}": ("stand_in", [c[k] for c in costs]) for k in costs[0] if k != "model"},
                     coords={"stand_in": [c["model"] for c in costs]})
    ds = ds.merge(pts)
    if cluster is not None:
        ds.attrs.update(cluster_serial_seconds=cluster[0], cluster_seconds=cluster[1])
    ds.to_netcdf(out / "probe_throughput.nc")
    print(f"\nwritten {out / 'probe_throughput.nc'}")


if __name__ == "__main__":
    main()
