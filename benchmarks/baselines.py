"""Does TQS-PTQ win, and what does a Pareto point cost? Every method at matched size, per model.

Run:  .venv/bin/python benchmarks/baselines.py [--models pangu_lite,aurora_lite,timesfm_lite]
                                              [--smoke] [--out benchmarks/results]
      (or `make baselines`; `make baselines SMOKE=1` for the quick version)

For each shipped model, :func:`tqslite.comparison.compare` makes a quantized copy per method
(TQS, one-step, Hessian/HAWQ-V2, range and random scores through the same allocator; GPTQ,
and GPTQ with QEP's error propagation; uniform RTN) at 10 matched budgets (2, 3, 4, 6, 8 bits with per-channel or per-group scales),
rolls every copy out on held-out data and times every stage, in one run. Printed, per model:

1. the size match (the largest shortfall of a mixed plan below its budget);
2. the RMSE against the float model at the horizon of every method and budget (mean over the
   variables or stations), with the lowest marked;
3. the win table of TQS against each method per budget: wins / ties / losses over the
   variables (grids) or stations (series), against the float model and against the truth,
   with paired bootstrap intervals over windows (a tie when the interval of the error ratio
   contains 1);
4. Spearman's rho of each method's unit ranking against TQS (Hessian included);
5. the stability of the TQS ranking across periods and data sets (rho with intervals);

and for all models: the cost table, wall seconds and ratios (probe against plain inference,
time per Pareto point against GPTQ) measured in this run.

Files (netCDF, each written whole or not at all): ``OUT/comparison_MODEL.nc`` (every error,
size and timing), ``OUT/wins_MODEL.nc``, ``OUT/stability_MODEL.nc`` and ``OUT/cost.nc``.
Numbers are measurements on the stand-in models here, not the paper's.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
import xarray as xr

from tqslite import comparison as C
from tqslite.cli import _write_atomic
from tqslite.models import MODELS


def run_model(name: str, smoke: bool, seed: int, progress: bool):
    """The comparison, its win tables and the ranking stability of one model."""
    kw = C.smoke_settings(name) if smoke else {}
    n_boot = 200 if smoke else 1000
    bench = C.benchmark(name, seed=seed, **kw)
    result = C.compare(bench, budgets=C.SMOKE_BUDGETS if smoke else C.BUDGETS, n_hutchinson=4 if smoke else 16,
                       n_boot=n_boot, seed=seed, progress=progress)
    wins = xr.concat([C.win_table(result, against=a, n_boot=n_boot, seed=seed) for a in ("float", "truth")],
                     dim=pd.Index(["float", "truth"], name="against"))
    stability = C.ranking_stability(name, n=kw.get("n_probe"), horizon=kw.get("horizon"), n_boot=n_boot, seed=seed,
                                    progress=progress)
    return result, wins, stability


def print_model(result, wins, stability) -> None:
    name, per = result.attrs["model"], result.attrs["per"]
    print(f"\n=== {name}: {result.attrs['n_eval']} held-out windows, lead T = {result.attrs['horizon']} ===")
    short = result["size_shortfall"].sel(scheme=list(C.MIXED))
    print(f"size match: every mixed plan within {100 * float(short.max()):.3f}% below its budget "
          f"(tolerance {100 * C.MATCH_TOLERANCE:.0f}%), never above")
    mean = C.rmse_table(result).mean(per).to_pandas().T  # (budget, scheme), normalised units
    print(f"\nRMSE against the float model at lead T, mean over {per}s (normalised units; * marks the lowest):")
    marked = pd.DataFrame([[f"{v:.4f}{'*' if v == row.min() else ' '}" for v in row] for _, row in mean.iterrows()],
                          index=mean.index, columns=mean.columns)
    print(marked.to_string())
    for against in ("float", "truth"):
        t = C.tally(wins.sel(against=against))
        table = pd.DataFrame({b: [f"{int(t['win'].sel(budget=k, baseline=b))}/{int(t['tie'].sel(budget=k, baseline=b))}/"
                                  f"{int(t['loss'].sel(budget=k, baseline=b))}" for k in t['budget'].values]
                              for b in t["baseline"].values}, index=pd.Index(t["budget"].values, name="budget"))
        table.insert(0, "bits/param", wins["bits_per_param"].sel(against=against).values.round(3))
        print(f"\nTQS vs each method, against the {against}: wins/ties/losses over {wins.sizes[per]} {per}s")
        print(table.to_string())
    rho = result[["rho_vs_tqs", "rho_lo", "rho_hi"]].to_dataframe().dropna()  # the other score sets
    print("\nSpearman rho of each method's unit ranking against TQS (95% interval):")
    print(rho[["rho_vs_tqs", "rho_lo", "rho_hi"]].round(3).to_string())
    st = stability[["rho", "lo", "hi"]].to_dataframe()
    print(f"\nStability of the TQS ranking across data ({stability.attrs['n']} states each):")
    print(st.round(3).to_string())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated shipped models")
    p.add_argument("--smoke", action="store_true", help="quick run: a few windows, 2 budgets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; the shipped models are {', '.join(MODELS)}")
    torch.set_num_threads(1)  # one thread: on a shared machine two can be several times slower
    t0 = time.perf_counter()
    costs = []
    for name in models:
        result, wins, stability = run_model(name, a.smoke, a.seed, not a.quiet)
        for stem, ds in (("comparison", result), ("wins", wins), ("stability", stability)):
            _write_atomic(a.out / f"{stem}_{name}.nc", ds.to_netcdf)
        print_model(result, wins, stability)
        costs.append(C.cost_summary(result).expand_dims(model=[name]))
    cost = xr.concat(costs, "model")
    cost.attrs = {"smoke": int(a.smoke), "torch_threads": 1, "n_budgets": costs[0].attrs["n_budgets"]}
    _write_atomic(a.out / "cost.nc", cost.to_netcdf)
    print(f"\nCost, measured in this run ({cost.attrs['n_budgets']} budgets per method, one torch thread):")
    for name in models:
        df = cost.sel(model=name).to_dataframe().drop(columns="model")
        print(f"\n{name}: plain rollout of the probe states {costs[models.index(name)].attrs['plain_seconds']:.3f} s")
        print(df.round(4).to_string())
    print(f"\nwritten to {a.out}/ in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
