"""The ``tqslite`` command line: the library's main steps on the shipped models, file to file.

::

    tqslite units timesfm_lite --depth 2
    tqslite probe timesfm_lite --units block --horizon 8 --out scores.nc
    tqslite allocate scores.nc timesfm_lite --budget-bits 4 --quantizer gptq --out plan.json
    tqslite allocate scores.nc timesfm_lite --budget-of vendor_int8.pt --out matched.json
    tqslite uniform timesfm_lite --bits 4 --group-size 32 --out uniform4.json
    tqslite quantize timesfm_lite plan.json --quantizer gptq --out q.safetensors --onnx q.onnx
    tqslite forecast q.onnx --horizon 8 --windows 16 --out forecast.nc
    tqslite evaluate timesfm_lite plan.json uniform4.json --quantizer gptq --horizon 8 --out errors.nc
    tqslite pareto scores.nc timesfm_lite --budgets 3,4,5,6 --out front.nc
    tqslite run-notebook 06 -p bits 3 -p horizon 40 --out runs/pangu-b3
    tqslite book [--smoke]

``units`` prints the model's unit tree (modules and tensors, parameter counts, and the block
depths at which each is one unit) to choose ``--depth`` before probing. Every command that makes
a plan prints its stored bits per parameter (scales and float tensors included) next to its
nominal bits. Scores, fronts and errors are netCDF (xarray), plans JSON. Initial states come from each model's
held-out data (the same windows for the same ``--windows`` and ``--seed``). Files are written
only when a step succeeds, through a temporary file, so a failed run never leaves half a result
over a good one. Bad arguments get a one-line error and exit status 2; a failure of the step
itself exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .files import write_atomic


class CommandError(Exception):
    """A problem the user can fix; printed as one line."""


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


def _config(a):
    """The integer configuration of ``--bits`` (``--group-size``: per group instead of per channel)."""
    from .config import Int, PerChannel, PerGroup
    return Int(a.bits, PerGroup(a.group_size) if a.group_size else PerChannel())


def _options(a):
    """The allocator's options from ``--options`` and ``--group-size`` (None: the library's defaults)."""
    from .config import DEFAULT_OPTIONS, Float16, Int, KeepFloat, PerChannel, PerGroup
    if a.options is None and not a.group_size:
        return None
    gran = PerGroup(a.group_size) if a.group_size else PerChannel()
    bits = a.options or [c.bits for c in DEFAULT_OPTIONS]
    return [Float16() if b == 16 else KeepFloat() if b == 32 else Int(b, gran) for b in bits]


def _calibration(a, name):
    """Calibration states for a quantizer that needs them: ``--calibration FILE`` or the model's training states."""
    from .quantizers import as_quantizer
    if not as_quantizer(a.quantizer).needs_calibration:
        return None
    if a.calibration is not None:
        import numpy as np
        import torch
        import xarray as xr
        values = np.load(a.calibration) if a.calibration.suffix == ".npy" else xr.load_dataarray(a.calibration).values
        return torch.from_numpy(np.asarray(values, dtype=np.float32))
    from .splits import calibration_states
    return calibration_states(name, a.calibration_states, a.seed)


def _cmd_probe(a) -> None:
    import tqslite
    system, _ = _model(a.model, a.backend)
    from .splits import heldout_windows
    from .units import BlockUnits
    x0, _ = heldout_windows(a.model, a.windows, a.horizon, a.seed)
    if a.kind == "quant":
        perturbation = tqslite.QuantResidual(_config(a), a.quantizer, tqslite.Gaussian(a.sigma_rel, a.seed))
    else:
        perturbation = tqslite.Gaussian(a.sigma_rel, a.seed)
    units = BlockUnits(a.depth) if a.units == "block" else "tensor"
    scores = tqslite.probe(system, x0.values, horizon=a.horizon, perturbation=perturbation, units=units,
                           calibration=_calibration(a, a.model) if a.kind == "quant" else None, progress=not a.quiet)
    scores.attrs.update(model=a.model, backend=a.backend)
    write_atomic(a.out, scores.to_netcdf)
    print(f"scores of {scores.sizes['unit']} units written to {a.out}")


def _load_scores(path: Path):
    import xarray as xr
    ds = xr.load_dataset(path)
    if "gamma" not in ds or "tensor_unit" not in ds:
        raise CommandError(f"{path} is not a tqslite scores file (no 'gamma'/'tensor_unit'); make one with "
                           "'tqslite probe'")
    return ds


def _sizes(plan, system) -> str:
    from .plans import plan_size
    size = plan_size(plan, system)
    return (f"{size.bits_per_param:.3f} stored bits/parameter (nominal {size.nominal_bits:.2f}), "
            f"{size.bytes} bytes, {size.compression:.2f}x against float32")


def _cmd_units(a) -> None:
    from .units import format_unit_tree, unit_tree
    system, _ = _model(a.model, a.backend)
    print(format_unit_tree(unit_tree(system, a.depth)))


def _cmd_allocate(a) -> None:
    import tqslite
    system, _ = _model(a.model, a.backend)
    budget_bytes = None
    if a.budget_of is not None:
        from .plans import release_size
        release = release_size(a.budget_of)
        budget_bytes = release.bytes
        print(f"budget of {a.budget_of}: {release.bytes} bytes, {release.bits_per_param:.3f} stored bits/parameter "
              f"(nominal {release.nominal_bits:.2f}) over its {release.n_params} parameters")
    plan = tqslite.allocate(_load_scores(a.scores), system, budget_bits=a.budget_bits, compression=a.compression,
                            budget_bytes=budget_bytes, options=_options(a), solver=a.solver, objective=a.objective,
                            bottom=a.bottom, fp_budget=a.fp_budget, quantizer=a.quantizer,
                            calibration=_calibration(a, a.model))
    write_atomic(a.out, plan.save)
    print(f"plan for {len(plan)} units ({_sizes(plan, system)}) written to {a.out}")


def _cmd_uniform(a) -> None:
    import tqslite
    from .units import BlockUnits
    system, _ = _model(a.model, a.backend)
    plan = tqslite.uniform_plan(system, _config(a), BlockUnits(a.depth) if a.units == "block" else "tensor")
    write_atomic(a.out, plan.save)
    print(f"uniform {_config(a).label} plan for {len(plan)} units ({_sizes(plan, system)}) written to {a.out}")


def _example_state(name: str):
    """One held-out state of a shipped model (``(1, *S)``): what an ONNX export traces."""
    import torch

    from .splits import heldout_windows
    x0, _ = heldout_windows(name, 1, 1)
    return torch.from_numpy(x0.values)


def _cmd_quantize(a) -> None:
    import os

    import torch

    import tqslite
    system, _ = _model(a.model)
    plan = tqslite.Plan.load(a.plan)
    qm = tqslite.quantize(system, plan, a.quantizer, _calibration(a, a.model))
    print(f"plan {a.plan.name}: {_sizes(plan, system)}")
    for name, reason in qm.weights.fallbacks.items():
        print(f"  {name}: RTN ({reason})")
    info = {"model": a.model, "plan": str(a.plan), "quantizer": a.quantizer}
    if a.out.suffix == ".pt":  # the fake-quant state_dict, as large as the float one
        write_atomic(a.out, lambda p: torch.save(qm.model.module.state_dict(), p))
        print(f"quantized state_dict written to {a.out} (weights dequantized on the {a.quantizer} grid, stored in "
              "float: as large as the original; use --out FILE.safetensors for the packed checkpoint)")
    else:
        from .checkpoint import checkpoint_sizes, save_checkpoint
        a.out.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(qm, a.out, info=info)
        sizes = checkpoint_sizes(a.out)
        print(f"packed checkpoint written to {a.out}: {sizes['file']} bytes ({sizes['data']} of tensors, "
              f"{sizes['header']} of header and quantization map); the plan stores {_sizes(plan, system)}")
    if a.onnx is not None:
        from .onnx_quant import export_quantized
        export_quantized(qm, _example_state(a.model), a.onnx, info=info)
        print(f"low-bit ONNX graph written to {a.onnx}: {os.path.getsize(a.onnx)} bytes")


def _deployed(path: Path, model: str | None):
    """``(system, model name)`` for a forecast from a file: packed checkpoint, ONNX graph or state_dict."""
    import json

    from . import models
    suffix = path.suffix.lower()
    if suffix not in (".onnx", ".safetensors", ".pt"):
        raise CommandError(f"{path}: expected a .safetensors checkpoint, an .onnx graph or a .pt state_dict")
    if model is None and suffix == ".onnx":
        from .onnx_quant import read_info
        model = read_info(path).get("model")
    elif model is None and suffix == ".safetensors":
        from .checkpoint import read_metadata
        model = read_metadata(path)["info"].get("model")
    if model is None:
        raise CommandError(f"{path} does not say which model it is; add --model pangu_lite|aurora_lite|timesfm_lite")
    if model not in models.MODELS:
        raise CommandError(f"unknown model {model!r}; the shipped models are {', '.join(sorted(models.MODELS))}")
    if suffix == ".onnx":
        from .onnx_system import OnnxSystem
        return OnnxSystem(path, swappable=False), model
    meta = json.loads(models.checkpoint_path(model, ".json").read_text())
    system = models.wrap(model, models.build_from_meta(model, meta).eval())
    if suffix == ".safetensors":
        from .checkpoint import load_checkpoint
        load_checkpoint(path, system, inplace=True)
    else:
        import torch
        system.module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return system, model


def _cmd_forecast(a) -> None:
    import xarray as xr

    from .evaluation import forecast, rmse
    from .models import module_of
    from .splits import heldout_windows
    system, name = _deployed(a.file, a.model)
    x0, truth = heldout_windows(name, a.windows, a.horizon, a.seed)
    fc = forecast(system, x0, a.horizon)
    ds = xr.Dataset({"forecast": fc, "truth": truth.astype(fc.dtype)})
    ds.attrs.update(model=name, source=str(a.file), windows=a.windows, seed=a.seed,
                    runtime="onnxruntime" if a.file.suffix.lower() == ".onnx" else "torch")
    write_atomic(a.out, ds.to_netcdf)
    if module_of(name).LAYOUT == "grid":
        err = rmse(fc.isel(lead=-1), truth.isel(lead=-1), keep=())
    else:  # the state is the context window: score the newest patch
        patch = module_of(name).ARCH["patch"]
        err = rmse(fc.isel(lead=-1, dim_0=slice(-patch, None)), truth.isel(lead=-1, dim_0=slice(-patch, None)),
                   keep=())
    print(f"{a.windows} forecasts of {a.horizon} steps by {name} from {a.file} ({ds.attrs['runtime']}): RMSE vs truth "
          f"at lead {a.horizon} = {float(err):.4g} (normalised); written to {a.out}")


def _cmd_evaluate(a) -> None:
    import tqslite
    from .evaluation import compare_plans
    from .models import module_of
    from .splits import heldout_windows
    system, _ = _model(a.model, a.backend)
    x0, truth = heldout_windows(a.model, a.windows, a.horizon, a.seed)
    plans = {p.stem: tqslite.Plan.load(p) for p in a.plans}
    for bits in a.uniform or []:
        plans[f"uniform{bits}"] = tqslite.uniform_plan(system, bits)
    if module_of(a.model).LAYOUT == "grid":
        keep, view = ("channel",), None
    else:  # the state is the context window: score the newest patch only
        keep, patch = (), module_of(a.model).ARCH["patch"]
        view = lambda da: da.isel(dim_0=slice(-patch, None))  # noqa: E731
    res = compare_plans(system, plans, x0, a.horizon, truth=truth, keep=keep, view=view, quantizer=a.quantizer,
                        calibration=_calibration(a, a.model))
    res.attrs.update(model=a.model, windows=a.windows, seed=a.seed, quantizer=a.quantizer)
    write_atomic(a.out, res.to_netcdf)
    for name, plan in plans.items():
        print(f"{name}: {_sizes(plan, system)}")
    last = res["rmse_vs_truth"].isel(lead=-1)
    last = last.mean([d for d in last.dims if d != "plan"])
    print("RMSE vs truth at lead", a.horizon, "(normalised):",
          ", ".join(f"{p}={float(v):.4g}" for p, v in zip(res["plan"].values, last.values)))
    print(f"written to {a.out}")


def _cmd_pareto(a) -> None:
    import tqslite
    from .plans import plan_from_configs, plan_size
    from .units import units_of
    system, _ = _model(a.model, a.backend)
    scores = _load_scores(a.scores)
    front = tqslite.pareto(scores, system, budgets=a.budgets, solver=a.solver,
                           objective=a.objective, options=_options(a), quantizer=a.quantizer,
                           calibration=_calibration(a, a.model))
    write_atomic(a.out, front.to_netcdf)
    units, labels = units_of(scores), [str(u) for u in front["unit"].values]
    for i, (b, err) in enumerate(zip(front["budget"].values, front["predicted_rss"].values)):
        plan = plan_from_configs(system, dict(zip(labels, front["config"].values[i])), units)
        size = plan_size(plan, system)
        print(f"budget {b:6.3f}  achieved {size.bits_per_param:6.3f} stored bits/param (nominal "
              f"{size.nominal_bits:5.2f})  predicted error {err:.4g}")
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
        q.add_argument("--options", type=_ints, default=None,
                       help="bit widths a unit may take, e.g. 2,3,4,8,16,32 (default 2,3,4,5,6,8,16,32)")
        q.add_argument("--group-size", type=int, default=None,
                       help="integer options per group of this many elements (default: per output channel)")
        q.add_argument("--objective", choices=("quadratic", "linear", "paper"), default=None,
                       help="cost of an option (default quadratic: errors add in quadrature)")
        q.add_argument("--solver", choices=("exact", "milp", "greedy"), default="exact")

    def quantizer_args(q, what="the quantizer that prices and applies the plan"):
        q.add_argument("--quantizer", choices=("rtn", "mse", "gptq"), default="rtn", help=f"{what} (default rtn)")
        q.add_argument("--calibration", type=_existing, default=None,
                       help="GPTQ calibration states, .npy or netCDF (default: the model's training states)")
        q.add_argument("--calibration-states", type=int, default=32,
                       help="number of training states GPTQ calibrates on (default 32)")

    def unit_args(q, default="block"):
        q.add_argument("--units", choices=("tensor", "block"), default=default,
                       help=f"unit granularity: one unit per tensor or per module subtree (default {default})")
        q.add_argument("--depth", type=int, default=1, help="block depth (default 1)")

    q = sub.add_parser("units", help="the model's unit tree: modules, tensors, sizes, and their block depths")
    model_args(q)
    q.add_argument("--depth", type=int, default=None,
                   help="fold the tree at the units of this block depth and mark them (default: the whole tree)")
    q.set_defaults(run=_cmd_units)

    q = sub.add_parser("probe", help="score every unit of a model (netCDF)")
    model_args(q)
    state_args(q, 20)
    q.add_argument("--kind", choices=("gauss", "quant"), default="gauss", help="perturbation (default gauss)")
    unit_args(q)
    q.add_argument("--bits", type=int, default=4, help="probe bit width for --kind quant (default 4)")
    q.add_argument("--group-size", type=int, default=None, help="--kind quant per group (default per channel)")
    quantizer_args(q, "the quantizer whose residual --kind quant measures")
    q.add_argument("--sigma-rel", type=float, default=1e-2, help="Gaussian size for --kind gauss (default 0.01)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.add_argument("--out", type=Path, required=True, help="scores file (.nc)")
    q.set_defaults(run=_cmd_probe)

    q = sub.add_parser("allocate", help="choose a configuration per unit under a budget (JSON plan)")
    q.add_argument("scores", type=_existing, help="scores from 'tqslite probe'")
    model_args(q)
    budget = q.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-bits", type=float, help="average bits per parameter, scales included")
    budget.add_argument("--compression", type=float, help="compression ratio against float32")
    budget.add_argument("--budget-of", type=_existing, metavar="FILE",
                        help="the size of another quantized model (a torch.save state dict: torch quantized tensors "
                             "or plain (codes, scale, zero_point)): a plan of the same bytes")
    table_args(q)
    quantizer_args(q)
    q.add_argument("--seed", type=int, default=0, help="seed of the calibration states (default 0)")
    q.add_argument("--bottom", type=int, default=None, help="lowest bit width allowed")
    q.add_argument("--fp-budget", type=float, default=None, help="largest fraction of parameters at 16/32 bits")
    q.add_argument("--out", type=Path, required=True, help="plan file (.json)")
    q.set_defaults(run=_cmd_allocate)

    q = sub.add_parser("uniform", help="a uniform plan: every unit on one configuration, no probe (JSON plan)")
    model_args(q)
    q.add_argument("--bits", type=int, required=True, help="integer bit width, 2-8")
    q.add_argument("--group-size", type=int, default=None, help="one scale per group of this size (default per channel)")
    unit_args(q, "tensor")
    q.add_argument("--out", type=Path, required=True, help="plan file (.json)")
    q.set_defaults(run=_cmd_uniform)

    q = sub.add_parser("quantize", help="apply a plan: a packed checkpoint (.safetensors), a low-bit ONNX graph")
    model_args(q, backend=False)
    q.add_argument("plan", type=_existing, help="plan from 'tqslite allocate' or 'tqslite uniform'")
    quantizer_args(q, "the quantizer that applies the plan")
    q.add_argument("--seed", type=int, default=0, help="seed of the calibration states (default 0)")
    q.add_argument("--out", type=Path, required=True,
                   help="packed checkpoint (.safetensors: codes at their bit width); a .pt name writes the "
                        "fake-quant state_dict instead (float, full size)")
    q.add_argument("--onnx", type=Path, default=None, help="also write the low-bit ONNX graph (.onnx)")
    q.set_defaults(run=_cmd_quantize)

    q = sub.add_parser("forecast", help="roll out a quantized file (.safetensors or .onnx) from held-out states (netCDF)")
    q.add_argument("file", type=_existing, help="a packed checkpoint (.safetensors), a graph (.onnx) or a .pt state_dict")
    q.add_argument("--model", default=None,
                   help="the shipped model the file belongs to (default: read from the file's metadata)")
    state_args(q, 20)
    q.add_argument("--out", type=Path, required=True, help="forecast file (.nc): forecast and truth")
    q.set_defaults(run=_cmd_forecast)

    q = sub.add_parser("evaluate", help="rollout error of plans against float and truth (netCDF)")
    model_args(q)
    q.add_argument("plans", type=_existing, nargs="*", help="plans to compare (JSON)")
    q.add_argument("--uniform", type=_ints, default=None, help="also uniform plans at these bits, e.g. 3,4")
    quantizer_args(q, "the quantizer that applies every plan")
    state_args(q, 20)
    q.add_argument("--out", type=Path, required=True, help="errors file (.nc)")
    q.set_defaults(run=_cmd_evaluate)

    q = sub.add_parser("pareto", help="plans for many budgets from one score set (netCDF)")
    q.add_argument("scores", type=_existing, help="scores from 'tqslite probe'")
    model_args(q)
    q.add_argument("--budgets", type=_floats, default=None, help="bits per parameter, e.g. 3,4,5,6 (default: 10)")
    table_args(q)
    quantizer_args(q)
    q.add_argument("--seed", type=int, default=0, help="seed of the calibration states (default 0)")
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
