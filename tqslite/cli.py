"""The ``tqslite`` command line: the library's main steps on the shipped models, file to file.

::

    tqslite probe timesfm_lite --granularity block --horizon 8 --out scores.nc
    tqslite allocate scores.nc timesfm_lite --budget-bits 4 --out plan.json
    tqslite quantize timesfm_lite plan.json --out timesfm_lite_q.pt
    tqslite evaluate timesfm_lite plan.json --horizon 8 --out errors.nc
    tqslite pareto scores.nc timesfm_lite --budgets 3,4,5,6 --out front.nc
    tqslite run-notebook 06 -p bits 3 -p horizon 40 --out runs/pangu-b3
    tqslite book [--smoke]

Scores, fronts and errors are netCDF (xarray), plans JSON. Initial states come from each model's
held-out data (the same windows for the same ``--windows`` and ``--seed``). Files are written
only when a step succeeds, through a temporary file, so a failed run never leaves half a result
over a good one. Bad arguments get a one-line error and exit status 2; a failure of the step
itself exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


class CommandError(Exception):
    """A problem the user can fix; printed as one line."""


def _write_atomic(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    return [int(x) for x in _floats(text)]


def _existing(path: str) -> Path:
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {path}")
    return Path(path)


def _model(name: str, backend: str = "torch"):
    from . import models
    if name not in models.MODELS:
        raise CommandError(f"unknown model {name!r}; the shipped models are {', '.join(sorted(models.MODELS))}")
    return models.load(name, backend=backend)


def _cmd_probe(a) -> None:
    import tqslite
    system, _ = _model(a.model, a.backend)
    from .train import heldout_windows
    x0, _ = heldout_windows(a.model, a.windows, a.horizon, a.seed)
    scores = tqslite.probe(system, x0.values, kind=a.kind, granularity=a.granularity, horizon=a.horizon,
                           bits=a.bits, sigma_rel=a.sigma_rel, seed=a.seed, depth=a.depth, progress=not a.quiet)
    scores.attrs.update(model=a.model, backend=a.backend)
    _write_atomic(a.out, scores.to_netcdf)
    print(f"scores of {scores.sizes['unit']} units written to {a.out}")


def _load_scores(path: Path):
    import xarray as xr
    ds = xr.load_dataset(path)
    if "gamma" not in ds or "members" not in ds:
        raise CommandError(f"{path} is not a tqslite scores file (no 'gamma'/'members'); make one with 'tqslite probe'")
    return ds


def _cmd_allocate(a) -> None:
    import tqslite
    system, _ = _model(a.model, a.backend)
    plan = tqslite.allocate(_load_scores(a.scores), system, budget_bits=a.budget_bits, compression=a.compression,
                            options=a.options, solver=a.solver, objective=a.objective, bottom=a.bottom,
                            fp_budget=a.fp_budget)
    _write_atomic(a.out, lambda p: Path(p).write_text(plan.to_json()))
    print(f"plan for {len(plan)} units at {plan.bits_per_param:.3f} bits/parameter written to {a.out}")


def _cmd_quantize(a) -> None:
    import torch

    import tqslite
    system, _ = _model(a.model)
    quantized = tqslite.apply_plan(system, tqslite.Plan.load(a.plan))
    _write_atomic(a.out, lambda p: torch.save(quantized.module.state_dict(), p))
    print(f"quantized state_dict written to {a.out} (weights dequantized on the RTN grid)")


def _cmd_evaluate(a) -> None:
    import tqslite
    from .evaluation import compare_plans
    from .models import module_of
    from .train import heldout_windows
    system, _ = _model(a.model, a.backend)
    x0, truth = heldout_windows(a.model, a.windows, a.horizon, a.seed)
    plans = {p.stem: tqslite.Plan.load(p) for p in a.plans}
    for bits in a.uniform or []:
        scores = tqslite.probe(system, x0.values[:1], horizon=1, progress=False)
        plans[f"rtn{bits}"] = tqslite.uniform_plan(scores, system, bits)
    if module_of(a.model).LAYOUT == "grid":
        keep, view = ("channel",), None
    else:  # the state is the context window: score the newest patch only
        keep, patch = (), module_of(a.model).ARCH["patch"]
        view = lambda da: da.isel(dim_0=slice(-patch, None))  # noqa: E731
    res = compare_plans(system, plans, x0, a.horizon, truth=truth, keep=keep, view=view)
    res.attrs.update(model=a.model, windows=a.windows, seed=a.seed)
    _write_atomic(a.out, res.to_netcdf)
    last = res["rmse_vs_truth"].isel(lead=-1)
    last = last.mean([d for d in last.dims if d != "plan"])
    print("RMSE vs truth at lead", a.horizon, "(normalised):",
          ", ".join(f"{p}={float(v):.4g}" for p, v in zip(res["plan"].values, last.values)))
    print(f"written to {a.out}")


def _cmd_pareto(a) -> None:
    import tqslite
    system, _ = _model(a.model, a.backend)
    front = tqslite.pareto(_load_scores(a.scores), system, budgets=a.budgets, solver=a.solver,
                           objective=a.objective, options=a.options)
    _write_atomic(a.out, front.to_netcdf)
    for b, bpp, err in zip(front["budget"].values, front["bits_per_param"].values, front["predicted_error"].values):
        print(f"budget {b:6.3f}  achieved {bpp:6.3f} bits/param  predicted error {err:.4g}")
    print(f"written to {a.out}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand (``--help`` of each is written for newcomers)."""
    p = argparse.ArgumentParser(prog="tqslite", description="Trajectory-based quantization sensitivity: "
                                "probe, allocate, quantize and evaluate the shipped models, or run the book.",
                                epilog="Run 'tqslite COMMAND --help' for the options of one command.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_args(q, backend=True):
        q.add_argument("model", help="a shipped model: pangu_lite, aurora_lite or timesfm_lite")
        if backend:
            q.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                           help="onnx: run pangu_lite as a black box through onnxruntime")

    def state_args(q, horizon):
        q.add_argument("--horizon", type=int, default=horizon, help=f"rollout steps (default {horizon})")
        q.add_argument("--windows", type=int, default=16, help="initial states from held-out data (default 16)")
        q.add_argument("--seed", type=int, default=0, help="seed of the noise and the windows (default 0)")

    def table_args(q):
        q.add_argument("--options", type=_ints, default=None, help="bit widths, e.g. 2,3,4,8,16,32")
        q.add_argument("--objective", choices=("linear", "quadratic", "paper"), default=None)
        q.add_argument("--solver", choices=("milp", "greedy"), default="milp")

    q = sub.add_parser("probe", help="score every unit of a model (netCDF)")
    model_args(q)
    state_args(q, 20)
    q.add_argument("--kind", choices=("gauss", "quant"), default="gauss", help="perturbation (default gauss)")
    q.add_argument("--granularity", choices=("tensor", "block"), default="block")
    q.add_argument("--depth", type=int, default=1, help="block depth (default 1)")
    q.add_argument("--bits", type=int, default=4, help="probe bit width for --kind quant (default 4)")
    q.add_argument("--sigma-rel", type=float, default=1e-2, help="Gaussian size for --kind gauss (default 0.01)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.add_argument("--out", type=Path, required=True, help="scores file (.nc)")
    q.set_defaults(run=_cmd_probe)

    q = sub.add_parser("allocate", help="choose bits per unit under a budget (JSON plan)")
    q.add_argument("scores", type=_existing, help="scores from 'tqslite probe'")
    model_args(q)
    budget = q.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-bits", type=float, help="average bits per parameter, scales included")
    budget.add_argument("--compression", type=float, help="compression ratio against float32")
    table_args(q)
    q.add_argument("--bottom", type=int, default=None, help="lowest bit width allowed")
    q.add_argument("--fp-budget", type=float, default=None, help="largest fraction of parameters at 16/32 bits")
    q.add_argument("--out", type=Path, required=True, help="plan file (.json)")
    q.set_defaults(run=_cmd_allocate)

    q = sub.add_parser("quantize", help="apply a plan: the quantized state_dict (.pt)")
    model_args(q, backend=False)
    q.add_argument("plan", type=_existing, help="plan from 'tqslite allocate'")
    q.add_argument("--out", type=Path, required=True, help="state_dict file (.pt)")
    q.set_defaults(run=_cmd_quantize)

    q = sub.add_parser("evaluate", help="rollout error of plans against float and truth (netCDF)")
    model_args(q)
    q.add_argument("plans", type=_existing, nargs="*", help="plans to compare (JSON)")
    q.add_argument("--uniform", type=_ints, default=None, help="also uniform RTN at these bits, e.g. 3,4")
    state_args(q, 20)
    q.add_argument("--out", type=Path, required=True, help="errors file (.nc)")
    q.set_defaults(run=_cmd_evaluate)

    q = sub.add_parser("pareto", help="plans for many budgets from one score set (netCDF)")
    q.add_argument("scores", type=_existing, help="scores from 'tqslite probe'")
    model_args(q)
    q.add_argument("--budgets", type=_floats, default=None, help="bits per parameter, e.g. 3,4,5,6 (default: 10)")
    table_args(q)
    q.add_argument("--out", type=Path, required=True, help="front file (.nc)")
    q.set_defaults(run=_cmd_pareto)

    for name, what in (("run-notebook", "execute one notebook with parameters (see its --help)"),
                       ("book", "execute every notebook and build the site")):
        q = sub.add_parser(name, help=what, add_help=False)
        q.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def main(argv=None) -> int:
    """Entry point of the ``tqslite`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("run-notebook", "book"):
        from . import book
        return book.main(["run" if argv[0] == "run-notebook" else "build", *argv[1:]])
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (CommandError, ValueError, TypeError, FileNotFoundError, KeyError) as err:
        print(f"tqslite {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
