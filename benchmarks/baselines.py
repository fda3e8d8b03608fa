"""Does TQS win once the quantizer is fixed? Every method at matched size on every shipped model.

Run:  .venv/bin/python benchmarks/baselines.py [--models pangu_lite,aurora_lite,timesfm_lite,lorenz96_emulator]
                                              [--smoke] [--methods complete|book] [--workers 2]
                                              [--out benchmarks/results]
      (or `make baselines`; `make baselines SMOKE=1` for the quick version)

For each model, :func:`tqslite.comparison.run` quantizes it with every method -- a (score,
objective, quantizer) triple: TQS with Gaussian noise and with the quantizer's own residual,
one-step, Hessian (HAWQ-V2), weight range, random and uniform plans, each under RTN, GPTQ and
GPTQ+QEP; the linear objective; RTN's plans under GPTQ; the recommended pipeline
(:data:`tqslite.pipeline.RECOMMENDED`: GPTQ, closed-loop refinement) and GPTQ calibrated on the
model's own rollout -- at 10 matched budgets (uniform RTN's size at 2, 3, 4, 6, 8 bits, per
channel and per group of 32), rolls every model out from the held-out evaluation windows to the
evaluation lead chosen by the skill rule (the last lead where the float model beats
climatology and persistence), and prints:

1. per model: the skill horizons, the size match, the RMSE against the float model per method
   and budget, and which methods are usable (added error at most the float model's own);
2. **the figure that matters**: the recommended pipeline against uniform GPTQ at 3 and 4 bits
   (both grids) on the three stand-ins, wins/ties/losses of the comparisons counted, with
   Holm's adjustment;
3. the allocation gain (each score against uniform, at a fixed quantizer), the quantizer gain
   (GPTQ against RTN at a fixed allocation; QEP against GPTQ), TQS against one-step and
   Hessian scores, the closed loop's gain and cost, and rollout against data calibration;
4. Spearman's rho of each score set's ranking against TQS's, and the cost of each shared step.

Files (netCDF, each written whole or not at all): ``OUT/comparison_MODEL.nc`` (every error,
size and timing) and ``OUT/wins_MODEL.nc`` (the win table of every pair above). The models run
in ``--workers`` parallel processes, one torch thread each. Numbers are measurements on the
stand-in models here, not the paper's.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import xarray as xr

from tqslite import comparison as C
from tqslite import results as R
from tqslite import wins as W
from tqslite.files import write_atomic
from tqslite.models import EMULATORS, MODELS

#: The three stand-ins and the bit widths of the headline figure (:func:`tqslite.results.verdict`).
STAND_INS, HEADLINE_BITS = C.STAND_INS, C.HEADLINE_BITS


def pairs_of(result: xr.Dataset) -> dict:
    """The book's comparisons, by table: ``{table: [(A, B), ...]}`` (those whose methods ran)."""
    return {"headline": R.headline_pairs(result), "allocation gain": R.allocation_gain_pairs(result),
            "quantizer gain": R.quantizer_gain_pairs(result), "scores": R.score_pairs(result)}


def wins_of(result: xr.Dataset, n_resamples: int, seed: int) -> xr.Dataset:
    """Every pair of :func:`pairs_of` in one win table, with the table each pair belongs to."""
    tables = pairs_of(result)
    pairs = list(dict.fromkeys(p for ps in tables.values() for p in ps))
    wins = R.head_to_head(result, pairs, n_resamples=n_resamples, seed=seed)
    kind = {f"{a} vs {b}": t for t, ps in tables.items() for a, b in ps}
    return wins.assign_coords(table=("pair", [kind[str(p)] for p in wins["pair"].values]))


def count_line(table: xr.Dataset) -> str:
    return W.describe(W.tally(table))


def print_model(result: xr.Dataset, wins: xr.Dataset) -> None:
    if "table" not in wins.coords:  # win tables written by notebook 10: label each pair with its table here
        kind = {f"{a} vs {b}": t for t, ps in pairs_of(result).items() for a, b in ps}
        wins = wins.assign_coords(table=("pair", [kind.get(str(p), "other") for p in wins["pair"].values]))
    name, tdim = result.attrs["model"], R.target_dim(result)
    per = {"variable": "variable", "station": "station"}.get(tdim, "target")
    L, T = result.attrs["eval_lead"], result.attrs["probe_horizon"]
    print(f"\n=== {name}: {result.attrs['n_eval']} held-out windows, {result.attrs['n_probe']} probe states ===")
    sk = result["eval_skill"]
    print(f"skill rule: the float model beats climatology and persistence up to lead {L} on the evaluation windows "
          f"(lead {L}: model {float(sk.sel(forecast='model', skill_lead=max(L, 1))):.3f}, climatology "
          f"{float(sk.sel(forecast='climatology', skill_lead=max(L, 1))):.3f}, persistence "
          f"{float(sk.sel(forecast='persistence', skill_lead=max(L, 1))):.3f}, mean RMSE over the {per}s); "
          f"on the probe states up to lead {T} (the probe horizon)")
    short = result["size_shortfall"].where(result["score"] != "none")
    print(f"size match: every mixed plan within {100 * float(short.max()):.3f}% below its budget "
          f"(tolerance {100 * C.MATCH_TOLERANCE:.0f}%), never above")
    rmse = R.rmse_table(result).mean(tdim).to_pandas()
    ok = R.usable_cells(result).all([d for d in R.usable_cells(result).dims if d not in ("scheme", "budget")])
    marked = pd.DataFrame([[f"{v:.4f}{'' if ok.sel(scheme=m, budget=b) else '!'}" for b, v in row.items()]
                           for m, row in rmse.iterrows()], index=rmse.index, columns=rmse.columns)
    print(f"\nRMSE against the float model at lead {L}, mean over the {per}s (normalised units; ! marks a method not "
          f"usable in some {per}: added error above the float model's own, "
          f"{', '.join(f'{v:.3f}' for v in R.float_rmse(result).values[:8])}{'...' if R.float_rmse(result).size > 8 else ''}):")
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(marked.to_string())
    for table in ("headline", "allocation gain", "quantizer gain", "scores"):
        if not (wins["table"] == table).any():
            continue
        sub = wins.isel(pair=np.flatnonzero(wins["table"].values == table))
        s = R.summarize(sub)
        rows = {str(p): [f"{int(s['win'].sel(pair=p))}/{int(s['tie'].sel(pair=p))}/{int(s['loss'].sel(pair=p))} of "
                         f"{int(s['n'].sel(pair=p))}", f"{int(s['holm_win'].sel(pair=p))}/{int(s['holm_loss'].sel(pair=p))}",
                         int(s["unusable"].sel(pair=p)), f"{float(s['median_ratio'].sel(pair=p)):.3f}"]
                for p in s["pair"].values}
        df = pd.DataFrame(rows, index=["win/tie/loss", "Holm win/loss", "unusable", "median ratio"]).T
        print(f"\n{table}: A vs B over every budget and {per} (ratio = RMSE A / RMSE B against the float model)")
        with pd.option_context("display.width", 250, "display.max_colwidth", 60):
            print(df.to_string())
        if table in ("allocation gain", "quantizer gain"):
            print(f"{table} per budget: median ratio over the {per}s (won/tied/lost; '-': no usable cell)")
            with pd.option_context("display.width", 250, "display.max_columns", 40, "display.max_colwidth", 40):
                print(per_budget(sub).to_string())
    closed = result["fitness"].notnull().any("budget")
    for m in result["scheme"].values[closed.values]:
        f0, f1 = result["start_fitness"].sel(scheme=m), result["fitness"].sel(scheme=m)
        print(f"\nclosed loop of {m}: probe-state fitness (RMS divergence at T = {T}) per budget, knapsack -> refined: "
              + "; ".join(f"{b} {float(a):.4g}->{float(c):.4g}" for b, a, c in zip(result["budget"].values, f0, f1)))
        print(f"  cost per budget: {float(result['refine_rollouts'].sel(scheme=m).mean()):.1f} full rollouts of the "
              f"probe states, {float(result['refine_seconds'].sel(scheme=m).mean()):.1f} s (mean over budgets)")
    if "rho_vs_tqs" in result:
        rho = result[["rho_vs_tqs", "rho_lo", "rho_hi"]].to_dataframe().dropna()
        print("\nSpearman rho of each score set's unit ranking against TQS's (gamma_gauss), 95% interval:")
        print(rho.round(3).to_string())
    st = result["stage_seconds"].to_pandas()
    print("\nwall seconds of the shared steps (one thread): " + "; ".join(f"{k} {v:.1f}" for k, v in st.items())
          + f"; evaluation rollouts {float(result['eval_seconds']):.1f}; whole model "
          f"{result.attrs.get('wall_seconds', float('nan')):.0f}")


def per_budget(table: xr.Dataset) -> pd.DataFrame:
    """Median ratio and won/tied/lost of each pair (rows) at each budget (columns), over the counted targets."""
    cols = {}
    for b in table["budget"].values:
        s = R.summarize(table.sel(budget=[b]))
        cols[str(b)] = [f"{float(s['median_ratio'].sel(pair=p)):.2f} ({int(s['win'].sel(pair=p))}/"
                        f"{int(s['tie'].sel(pair=p))}/{int(s['loss'].sel(pair=p))})" if int(s["n"].sel(pair=p)) else "-"
                        for p in table["pair"].values]
    return pd.DataFrame(cols, index=[str(p) for p in table["pair"].values])


def print_headline(results: dict, wins: dict) -> None:
    """The recommended pipeline against uniform GPTQ at 3 and 4 bits on the three stand-ins (:func:`R.verdict`)."""
    present = [n for n in STAND_INS if n in wins and R.headline_pair() in wins[n]["pair"].values]
    if not present:
        return
    v = R.verdict(wins, models=present, bits=HEADLINE_BITS)
    print(f"\n=== The figure that matters: {C.recommended_method().label} (the default pipeline, {C.RECOMMENDED!r}) "
          f"against uniform GPTQ, at {' and '.join(map(str, HEADLINE_BITS))} bits (channel and group grids), against "
          "the float model at each model's evaluation lead ===")
    table = v.to_dataframe()[["n", "win", "tie", "loss", "holm_win", "holm_loss", "unusable", "only_a_usable",
                              "only_b_usable", "unmatched", "budgets"]]
    table.insert(0, "lead", [results[m].attrs["eval_lead"] for m, _ in table.index])
    with pd.option_context("display.width", 250):
        print(table.rename(columns={"n": "counted", "holm_win": "Holm win", "holm_loss": "Holm loss",
                                    "only_a_usable": "of which only TQS usable",
                                    "only_b_usable": "only uniform usable"}).to_string())
    print("  " + R.verdict_sentence(v).replace("`", ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join([*MODELS, *EMULATORS]), help="comma-separated shipped models")
    p.add_argument("--smoke", action="store_true", help="quick run: a few windows, 2 budgets, a short closed loop")
    p.add_argument("--methods", choices=("complete", "book"), default="complete",
                   help="every method (default) or the notebooks' smaller set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="parallel processes, one model each")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--print-only", action="store_true",
                   help="print the tables of the results already in --out (comparison_MODEL.nc, wins_MODEL.nc)")
    a = p.parse_args(argv)
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    known = [*MODELS, *EMULATORS]
    unknown = [m for m in models if m not in known]
    if unknown:
        p.error(f"unknown model(s) {unknown}; the shipped models are {', '.join(known)}")
    torch.set_num_threads(1)  # one thread per process: on a shared machine two can be several times slower
    methods = C.complete_methods() if a.methods == "complete" else C.book_methods()
    budgets = C.SMOKE_BUDGETS if a.smoke else C.BUDGETS
    n_resamples = 999 if a.smoke else 9999
    slow_first = sorted(models, key=lambda m: ["aurora_lite", "pangu_lite"].index(m) if m in ("aurora_lite", "pangu_lite")
                        else 2)
    t0 = time.perf_counter()
    results, wins = {}, {}
    if a.print_only:
        for name in models:
            results[name] = xr.load_dataset(a.out / f"comparison_{name}.nc")
            wins[name] = xr.load_dataset(a.out / f"wins_{name}.nc")
        for name in models:
            print_model(results[name], wins[name])
        print_headline(results, wins)
        return 0
    with ProcessPoolExecutor(max_workers=max(1, a.workers)) as pool:
        futures = {pool.submit(C.run_named, name, methods, budgets, a.smoke, a.seed, not a.quiet): name
                   for name in slow_first}
        for f in as_completed(futures):
            name = futures[f]
            results[name] = f.result()
            wins[name] = wins_of(results[name], n_resamples, a.seed)
            write_atomic(a.out / f"comparison_{name}.nc", results[name].to_netcdf)
            write_atomic(a.out / f"wins_{name}.nc", wins[name].to_netcdf)
            print(f"{name}: done after {time.perf_counter() - t0:.0f} s", flush=True)
    for name in models:
        print_model(results[name], wins[name])
    print_headline(results, wins)
    print(f"\n{'SMOKE run: rough numbers. ' if a.smoke else ''}written to {a.out}/ in {time.perf_counter() - t0:.0f} s "
          f"({a.workers} processes, one torch thread each)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
