"""GPTQ's cost per budget on each stand-in: the old implementation against :mod:`tqslite.gptq`.

Run:  .venv/bin/python benchmarks/gptq_speed.py [--bits 3] [--repeats 2] [--models pangu_lite ...]

BEFORE is ``tqslite.baselines.gptq.gptq_quantize`` as of commit ``7d7e836`` (one full forward
pass per layer, a column loop without blocks), taken from this repository's history at run time
(``git archive 7d7e836 tqslite``) and run in a subprocess with that copy first on the path. AFTER
is :class:`tqslite.gptq.GPTQ` with its defaults (act-order, static groups, blocks of 128) on the
uniform configuration of the same bits, per channel and per group of 32, for every tensor. Both
get the same 32 calibration states, drawn from the training period as
:func:`tqslite.benchmark.benchmark` draws them; one thread; best of ``--repeats`` runs.

The sanity lines give the output error ``||W X - Q X||_F`` summed over the GPTQ layers, ``X``
being each layer's inputs in the float model on the calibration states, for RTN, the old GPTQ
and the new one.

The last table is a **mixed GPTQ plan against its budget**: TQS scores (Gaussian probe, tensor
units, 8 validation states, 4 steps), a cost table priced with GPTQ's own residuals at 2-8 bits
per channel (plus float16 and float), the exact allocator at 3 and 4 bits per parameter, then
GPTQ applied with each unit's configuration. It prints the plan's size against the budget, the
bits the quantizer actually stored (codes, scales and zero points counted tensor by tensor from
its output, float tensors at their width), the mix of bit widths, and what GPTQ left to RTN.
Everything printed is measured here, now.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tqslite import allocate, cost_table, plan_size, probe, quantize  # noqa: E402
from tqslite.config import Int, PerChannel, PerGroup, int_options  # noqa: E402
from tqslite.gptq import LAYERS, GPTQ, Hessian  # noqa: E402
from tqslite.models import load  # noqa: E402
from tqslite.quantization import rtn_codes  # noqa: E402
from tqslite.splits import calibration_states, probe_states  # noqa: E402

OLD_COMMIT = "7d7e836"
MODELS = ("pangu_lite", "aurora_lite", "timesfm_lite")
GRIDS = {"channel": None, "group32": 32}

# Run inside the subprocess, with the old package first on the path.
OLD_RUNNER = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    from tqslite.baselines.gptq import gptq_quantize
    from tqslite.models import load
    name, bits, repeats, calib_file, out_file = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    system, _ = load(name)
    calibration = torch.load(calib_file)
    result = {}
    for grid, group_size in (("channel", None), ("group32", 32)):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            q = gptq_quantize(system.module, calibration, bits, group_size=group_size)
            times.append(time.perf_counter() - t)
        result[grid] = (min(times), {k: v.clone() for k, v in q.state_dict().items()})
    torch.save(result, out_file)
""")


def run_old(name: str, bits: int, repeats: int, calibration: torch.Tensor, tmp: Path) -> dict:
    """``{grid: (seconds, state_dict)}`` from the old implementation, in a subprocess."""
    old = tmp / "old"
    if not (old / "tqslite").exists():
        old.mkdir(exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", OLD_COMMIT, "tqslite"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    calib_file, out_file = tmp / f"{name}_calibration.pt", tmp / f"{name}_old.pt"
    torch.save(calibration, calib_file)
    env = dict(os.environ, PYTHONPATH=str(old), TQSLITE_DATA=str(REPO / "data"), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", OLD_RUNNER, name, str(bits), str(repeats), str(calib_file), str(out_file)],
                   check=True, env=env, cwd=tmp)
    return torch.load(out_file)


def run_new(system, bits: int, group_size, repeats: int, calibration: torch.Tensor):
    """``(seconds, dequantized weights)`` of :class:`tqslite.gptq.GPTQ` on the uniform configuration."""
    gran = PerChannel() if group_size is None else PerGroup(group_size)
    configs = {n: Int(bits, gran) for n in system.parameter_names()}
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        qw = GPTQ().quantize_weights(system, configs, calibration)
        times.append(time.perf_counter() - t)
    return min(times), qw.dequantized()


def layer_hessians(module, calibration) -> dict:
    """``{layer name: Hessian}`` of every GPTQ layer on the float model's inputs from ``calibration``."""
    hessians = {n: Hessian(m) for n, m in module.named_modules() if isinstance(m, LAYERS)}
    hooks = [module.get_submodule(n).register_forward_pre_hook(lambda m, a, h=h: h.add_batch(a[0]))
             for n, h in hessians.items()]
    with torch.no_grad():
        for x in calibration.split(32):
            module(x)
    for h in hooks:
        h.remove()
    return hessians


def output_error(module, hessians: dict, weights: dict) -> float:
    """``sum over layers of ||(W - Q) X||_F``, with ``weights`` ``{parameter name: Q}``."""
    return sum(h.error(module.get_submodule(n).weight.detach() - weights[f"{n}.weight"]) for n, h in hessians.items())


def rtn_weights(module, bits, group_size) -> dict:
    gran = PerChannel() if group_size is None else PerGroup(group_size)
    return {f"{n}.weight": rtn_codes(m.weight.detach(), Int(bits, gran).resolve(m.weight.shape, 0)).dequantize()
            for n, m in module.named_modules() if isinstance(m, LAYERS)}


def mixed_plans(name: str, budgets=(3.0, 4.0)) -> list:
    """Rows ``(model, budget, plan bits/param, stored bits/param, bit mix, RTN fallbacks, seconds)``."""
    system, _ = load(name)
    calibration = calibration_states(name)
    x0 = torch.from_numpy(probe_states(name, "validation", 8, 4).values)
    scores = probe(system, x0, horizon=4, progress=False)
    t0 = time.perf_counter()
    table = cost_table(scores, system, int_options(), quantizer=GPTQ(), calibration=calibration)
    rows = []
    for budget in budgets:
        plan = allocate(table, budget_bits=budget)
        qm = quantize(system, plan, GPTQ(), calibration)
        stored = sum(qt.nbits for qt in qm.weights.tensors.values()) + sum(
            w.numel() * (16 if qm.weights.configs[n].bits == 16 else torch.finfo(w.dtype).bits)
            for n, w in qm.weights.floats.items())
        n_params = sum(system.get_parameter(p).numel() for p in system.parameter_names())
        mix = {}
        for u, c in plan.items():
            mix[c.label] = mix.get(c.label, 0) + plan.n_params[u]
        mix = ", ".join(f"{k} {100 * v / n_params:.1f}%" for k, v in sorted(mix.items(), key=lambda kv: -kv[1]))
        rows.append((name, budget, plan_size(plan, system).bits_per_param, stored / n_params, mix,
                     len(qm.weights.fallbacks), time.perf_counter() - t0))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows, sanity = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            system, _ = load(name)
            calibration = calibration_states(name)
            old = run_old(name, args.bits, args.repeats, calibration, Path(tmp))
            hessians = layer_hessians(system.module, calibration)
            for grid, group_size in GRIDS.items():
                new_s, new_w = run_new(system, args.bits, group_size, args.repeats, calibration)
                old_s, old_w = old[grid]
                rows.append((name, grid, old_s, new_s))
                errs = [output_error(system.module, hessians, w)
                        for w in (rtn_weights(system.module, args.bits, group_size), old_w, new_w)]
                sanity.append((name, grid, *errs))
                print(f"  done: {name} {grid}", file=sys.stderr, flush=True)
    print(f"\nGPTQ seconds per budget ({args.bits} bits, 32 calibration states, 1 thread, best of {args.repeats})\n")
    print(f"{'model':<14}{'grid':<10}{'old (7d7e836)':>15}{'new':>10}{'old/new':>10}")
    for name, grid, old_s, new_s in rows:
        print(f"{name:<14}{grid:<10}{old_s:>15.2f}{new_s:>10.2f}{old_s / new_s:>10.1f}")
    print("\nSanity: output error ||W X - Q X||_F summed over the GPTQ layers (float model's layer inputs)\n")
    print(f"{'model':<14}{'grid':<10}{'RTN':>10}{'old GPTQ':>10}{'new GPTQ':>10}{'new/RTN':>10}")
    for name, grid, rtn, old, new in sanity:
        print(f"{name:<14}{grid:<10}{rtn:>10.3g}{old:>10.3g}{new:>10.3g}{new / rtn:>10.2f}")
    print("\nA mixed GPTQ plan against its budget (TQS scores, cost table priced with GPTQ, exact allocator)\n")
    print(f"{'model':<14}{'budget':>7}{'plan':>8}{'stored':>8}  {'RTN fallbacks':>13}  bit widths (share of parameters)")
    for name in args.models:
        for model, budget, planned, stored, mix, fallbacks, _ in mixed_plans(name):
            print(f"{model:<14}{budget:>7.2f}{planned:>8.3f}{stored:>8.3f}  {fallbacks:>13}  {mix}")


if __name__ == "__main__":
    main()
