"""How the default pipeline was chosen: candidates compared on validation data only, never on evaluation windows.

Run:  .venv/bin/python benchmarks/pipeline_choice.py pangu_lite [--budgets 3/channel,4/channel,3/group,4/group]
                                                               [--light]

The measurements behind :data:`tqslite.pipeline.RECOMMENDED`, rerunnable. For one shipped model
and each budget (uniform RTN's size at ``bits/grid``), candidate pipelines are compared on
**development windows drawn at random from the validation period** (the probe states are the
validation period's evenly spaced states; the held-out evaluation windows are never touched):

* uniform GPTQ and uniform RTN;
* the knapsack plan of TQS with Gaussian noise (``gauss``), of the one-step score, and of TQS
  with GPTQ's own 4-bit residual (``quant_gptq``), each priced and quantized by GPTQ (and by RTN
  unless ``--light``);
* the closed loop of :mod:`tqslite.refine` from the Gaussian and the GPTQ-residual knapsack plans:
  the evolutionary search (``+refine``) and the operating-point re-solve (``+oppoint``), with
  their probe-state gain, cost in rollouts and seconds.

Printed per budget: each candidate's RMSE against the float model at the probe horizon on the
development windows (mean over the variables or stations), its ratio to uniform GPTQ's, and its
fitness on the probe states (GPTQ candidates). Rough timings on a shared machine.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

from tqslite import GPTQ, RTN, Gaussian, Int, PerChannel, PerGroup, QuantResidual, allocate, cost_table, int_options
from tqslite import data as D
from tqslite import plan_size, probe, uniform_plan
from tqslite.bank import WeightBank
from tqslite.benchmark import benchmark, float_skill, window_mse
from tqslite.evaluation import forecast
from tqslite.models import module_of
from tqslite.refine import Fidelity, Judge, operating_point, refine
from tqslite.systems import swapped
from tqslite.splits import prepare


def development_windows(name: str, prep, horizon: int, n: int, seed: int = 1):
    """``n`` initial states drawn at random (``seed``) from the validation period."""
    module = module_of(name)
    if module.LAYOUT == "series":
        ctx, p = module.ARCH["context"], module.ARCH["patch"]
        win = D.series_windows(prep.validation, ctx + horizon * p, n, "random", seed)
        return win.isel(step=slice(0, ctx)).rename(step="dim_0").drop_vars("dim_0", errors="ignore")
    x = D.time_windows(prep.validation, 1 + horizon, n, "random", seed).isel(step=0, drop=True)
    return x.rename(channel="variable") if module.LAYOUT == "grid" else x


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--budgets", default="3/channel,4/channel,3/group,4/group")
    p.add_argument("--light", action="store_true", help="GPTQ candidates only, closed loop from the quant plan only")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(1)
    budgets = [(int(x.split("/")[0]), x.split("/")[1]) for x in a.budgets.split(",")]
    prep = prepare(a.model)
    bench = benchmark(a.model, prep=prep)
    T = float_skill(bench, "probe").attrs["horizon"]
    layout = module_of(a.model).LAYOUT
    x_dev = development_windows(a.model, prep, T, 600 if layout == "series" else 32)
    ref = bench.view(forecast(bench.system, x_dev, T))
    print(f"{a.model}: probe horizon T = {T} (skill rule on the probe states); {len(bench.x_probe)} probe states, "
          f"{x_dev.sizes['window']} development windows from the validation period")

    def dev_rmse(weights):
        with swapped(bench.system, weights):
            fc = bench.view(forecast(bench.system, x_dev, T))
        return float(np.sqrt(window_mse(fc, ref).sel(lead=T).mean("window")).mean())

    x, system = bench.x_probe, bench.system
    t0 = time.perf_counter()
    scores = {"gauss": probe(system, x, horizon=T, perturbation=Gaussian(), progress=False),
              "one_step": probe(system, x, horizon=1, perturbation=Gaussian(), progress=False)}
    print(f"Gaussian and one-step probes: {time.perf_counter() - t0:.0f} s")
    for grid in sorted({g for _, g in budgets}):
        gran = PerChannel() if grid == "channel" else PerGroup(32)
        options = int_options((2, 3, 4, 5, 6, 8), gran)
        banks = {"gptq": WeightBank.build(system, options, GPTQ(), bench.calibration),
                 "rtn": WeightBank.build(system, options, RTN())}
        scores["quant_gptq"] = probe(system, x, horizon=T, perturbation=QuantResidual(Int(4, gran), banks["gptq"]),
                                     progress=False)
        judge = Judge(system, banks["gptq"], x, T)
        for bits in sorted(b for b, g in budgets if g == grid):
            budget = plan_size(uniform_plan(system, Int(bits, gran)), system).bits_per_param
            rows = {"uniform gptq": (uniform_plan(system, Int(bits, gran)), "gptq"),
                    "uniform rtn": (uniform_plan(system, Int(bits, gran)), "rtn")}
            tables = {}
            for s in ("gauss", "one_step", "quant_gptq"):
                for q in ("gptq",) if a.light else ("gptq", "rtn"):
                    table = cost_table(scores[s], system, options, quantizer=banks[q])
                    rows[f"{s}+{q}"] = (allocate(table, budget_bits=budget), q)
                    tables[s, q] = table
            out = {k: (dev_rmse(banks[q].dequantized(system, plan.tensor_configs())),
                       judge.fitness(plan) if q == "gptq" else np.nan) for k, (plan, q) in rows.items()}
            notes = []
            for s in ("quant_gptq",) if a.light else ("gauss", "quant_gptq"):
                plan = rows[f"{s}+gptq"][0]
                for step, fn, kw in (("refine", refine, dict(generations=15, offspring=12, survivors=3, seed=0)),
                                     ("oppoint", operating_point, dict(levels=2, fidelity=Fidelity(max(1, len(x) // 2)))
                                      )):
                    r = fn(judge, tables[s, "gptq"], plan, budget, **kw)
                    out[f"{s}+gptq+{step}"] = (dev_rmse(banks["gptq"].dequantized(system, r.plan.tensor_configs())),
                                               r.fitness)
                    notes.append(f"  {s}+gptq+{step}: probe fitness {r.start_fitness:.4g} -> {r.fitness:.4g}, "
                                 f"{r.rollouts:.0f} rollouts, {r.seconds:.0f} s")
            print(f"\n{a.model} {bits}b/{grid} (budget {budget:.3f} bits per parameter): RMSE against the float model "
                  f"at lead {T} on the development windows, its ratio to uniform GPTQ's, probe-state fitness")
            base = out["uniform gptq"][0]
            for k, (e, f) in out.items():
                print(f"  {k:28s} {e:.5f}  ratio {e / base:.3f}  fitness {f:.5f}")
            print("\n".join(notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
