"""Deployment: bytes on disk, onnxruntime speed and memory of the low-bit graphs, checkpoint load time.

Run:  .venv/bin/python benchmarks/deployment.py [--models pangu_lite,...] [--batch 16] [--out DIR] [--smoke]

1. **Sizes on disk** (``os.path.getsize``), for every stand-in at uniform 2, 3, 4 and 8 bits (one
   float16 scale per output channel) and at a mixed TQS plan (3.5 bits per parameter on average):
   the plan's size (:func:`tqslite.plan_size`), the packed checkpoint (header and tensors apart),
   the low-bit ONNX graph (codes, scales, graph structure apart), and both against the float
   files (``state_dict`` ``.pt`` and the float graph written the same way).
2. **onnxruntime, per rollout step** (CPU, one thread, a batch of ``--batch`` states), float
   graph against the 4-bit graph and the mixed graph, interleaved best-of rounds in one process:
   latency ratios. Peak memory: each graph runs in a fresh subprocess that reads its resident set
   size before creating the session and its peak (``VmHWM``) after the rollout; the difference is
   what the session and the run added. Each quantized graph also runs "folded"
   (``session.disable_quant_qdq=1``: onnxruntime constant-folds ``DequantizeLinear`` at load, so
   those weights live in float in memory). Which operators dequantize at run time is read from
   onnxruntime's optimized graph, and the kernel time per operator from its profiler.
3. **Load time** of the packed checkpoint (:func:`tqslite.checkpoint.load_checkpoint`) against
   ``torch.load`` + ``load_state_dict`` of the float ``.pt``, best of 5.

``--scaled`` (default on, off with ``--smoke``) adds ``pangu_lite`` at 8x its width (``dim=512``,
random weights, about 9.6 M parameters), stepped one state at a time: the stand-ins weigh half a
megabyte, too little for their weights to show in a process's memory; this one shows what the
formats do at a size where weights matter. Its numbers say nothing about forecast skill.

Everything printed is measured here, now (timings on a shared machine are rough: rerun on an
idle one); results also go to DIR/deployment.nc.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


# --------------------------------------------------------------------------------------------
# The memory worker: a fresh process per graph (only numpy and onnxruntime imported)
# --------------------------------------------------------------------------------------------

def _rss() -> dict:
    """Resident set size now and its peak (``VmRSS``, ``VmHWM`` of /proc/self/status), bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, value = line.split(":", 1)
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def worker(path: str, shape: tuple, steps: int, fold: bool) -> dict:
    import onnxruntime as ort
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if fold:
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    base = _rss()["VmRSS"]
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    loaded = _rss()["VmRSS"]
    name = session.get_inputs()[0].name
    for _ in range(steps):
        x = session.run(None, {name: x})[0]
    return {"after_load": loaded - base, "peak": _rss()["VmHWM"] - base}


def memory(path, shape, steps, fold=False) -> dict:
    """Run :func:`worker` in a fresh interpreter; its JSON answer."""
    cmd = [sys.executable, __file__, "--worker", str(path), "--shape", ",".join(map(str, shape)),
           "--steps", str(steps)] + (["--fold"] if fold else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Latency and what onnxruntime runs
# --------------------------------------------------------------------------------------------

def sessions(paths: dict, fold_too: set, profile: bool = False):
    import onnxruntime as ort
    out = {}
    for key, path in paths.items():
        for fold in ((False, True) if key in fold_too else (False,)):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            if fold:
                opts.add_session_config_entry("session.disable_quant_qdq", "1")
            if profile:
                opts.enable_profiling = True
                opts.profile_file_prefix = str(Path(tempfile.gettempdir()) / f"tqslite_deployment_{os.getpid()}")
            out[key + (" folded" if fold else "")] = ort.InferenceSession(str(path), opts,
                                                                           providers=["CPUExecutionProvider"])
    return out


def step_latency(sess: dict, x: np.ndarray, steps: int, rounds: int) -> dict:
    """Best seconds per rollout step of each session, over ``rounds`` interleaved rounds."""
    best = dict.fromkeys(sess, np.inf)
    for s in sess.values():  # warm-up (pre-packing, arena growth)
        s.run(None, {s.get_inputs()[0].name: x})
    for _ in range(rounds):
        for key, s in sess.items():
            name, y = s.get_inputs()[0].name, x
            t0 = time.perf_counter()
            for _ in range(steps):
                y = s.run(None, {name: y})[0]
            best[key] = min(best[key], (time.perf_counter() - t0) / steps)
    return best


def kernel_times(path, x, steps) -> dict:
    """``{op type: milliseconds per step}`` from onnxruntime's profiler."""
    s = next(iter(sessions({"g": path}, set(), profile=True).values()))
    name, y = s.get_inputs()[0].name, x
    for _ in range(steps):
        y = s.run(None, {name: y})[0]
    trace = s.end_profiling()
    events = json.loads(Path(trace).read_text())
    Path(trace).unlink()
    per_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"] / 1e3 / steps
    return dict(per_op)


# --------------------------------------------------------------------------------------------
# The models and their files
# --------------------------------------------------------------------------------------------

def mixed_plan(name, system, smoke):
    import tqslite
    from tqslite.splits import probe_states
    x0 = probe_states(name, n=4 if smoke else 8)
    scores = tqslite.probe(system, x0.values, horizon=4 if smoke else 8, units=tqslite.BlockUnits(depth=2),
                           progress=False)
    return tqslite.allocate(scores, system, budget_bits=3.5, options=tqslite.int_options((2, 3, 4, 8)))


def scaled_pangu():
    import torch

    from tqslite.models import pangu_lite, wrap
    torch.manual_seed(0)
    return wrap("pangu_lite", pangu_lite.build({"dim": 512, "heads": 8}).eval())


def files_for(label, system, example, plans, folder: Path):
    """Write the float files and, per plan, the checkpoint and the graph; the sizes of each."""
    import torch

    import tqslite
    from tqslite.checkpoint import checkpoint_sizes, save_checkpoint
    from tqslite.onnx_quant import export_quantized, onnx_sizes
    float_pt = folder / f"{label}.pt"
    torch.save(system.module.state_dict(), float_pt)
    float_onnx = export_quantized(system, example, folder / f"{label}_float.onnx")
    rows, graphs = [], {"float": float_onnx}
    for plan_name, plan in plans.items():
        qm = tqslite.quantize(system, plan)
        ckpt = save_checkpoint(qm, folder / f"{label}_{plan_name}.safetensors")
        graph = export_quantized(qm, example, folder / f"{label}_{plan_name}.onnx")
        graphs[plan_name] = graph
        size, cs, gs = tqslite.plan_size(plan, system), checkpoint_sizes(ckpt), onnx_sizes(graph)
        rows.append(dict(model=label, plan=plan_name, bits_per_param=size.bits_per_param, plan_bytes=size.bytes,
                         ckpt_bytes=cs["file"], ckpt_header=cs["header"], ckpt_data=cs["data"],
                         onnx_bytes=gs["file"], onnx_codes=gs["codes"], onnx_scales=gs["scales"] + gs["zero_points"],
                         onnx_float=gs["float"], onnx_graph=gs["graph"], float_pt=os.path.getsize(float_pt),
                         float_onnx=os.path.getsize(float_onnx)))
    return rows, graphs, float_pt


def load_times(system, ckpt, float_pt, repeats=5):
    import copy

    import torch

    from tqslite.checkpoint import load_checkpoint
    target = copy.deepcopy(system)
    best = {"packed": np.inf, "float": np.inf}
    for _ in range(repeats):
        t0 = time.perf_counter()
        load_checkpoint(ckpt, target, inplace=True)
        best["packed"] = min(best["packed"], time.perf_counter() - t0)
        t0 = time.perf_counter()
        target.module.load_state_dict(torch.load(float_pt, map_location="cpu", weights_only=True))
        best["float"] = min(best["float"], time.perf_counter() - t0)
    return best


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="pangu_lite,aurora_lite,timesfm_lite")
    ap.add_argument("--batch", type=int, default=16, help="states per onnxruntime call (default 16)")
    ap.add_argument("--steps", type=int, default=20, help="rollout steps per timing (default 20)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds, best kept (default 5)")
    ap.add_argument("--scaled", action=argparse.BooleanOptionalAction, default=None,
                    help="add pangu_lite at 8x width, random weights (default: on, off with --smoke)")
    ap.add_argument("--smoke", action="store_true", help="a quick pass: 4-bit and mixed plans only, fewer rounds")
    ap.add_argument("--out", default="benchmarks/results", help="folder for deployment.nc")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--fold", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, tuple(int(s) for s in a.shape.split(",")), a.steps, a.fold)))
        return

    import onnxruntime as ort
    import torch
    import xarray as xr

    import tqslite
    from tqslite.models import load
    from tqslite.onnx_quant import runtime_ops
    from tqslite.splits import heldout_windows
    torch.set_num_threads(1)
    scaled = (not a.smoke) if a.scaled is None else a.scaled
    rounds, steps = (2, 5) if a.smoke else (a.rounds, a.steps)
    bits = (4,) if a.smoke else (2, 3, 4, 8)
    models = [m for m in a.models.split(",") if m] + (["pangu_lite_x8"] if scaled else [])
    size_rows, speed_rows, load_rows = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for label in models:
            name = "pangu_lite" if label == "pangu_lite_x8" else label
            system = scaled_pangu() if label == "pangu_lite_x8" else load(name)[0]
            batch = 1 if label == "pangu_lite_x8" else a.batch  # one state: the weights, not the batch, dominate
            x0 = torch.from_numpy(heldout_windows(name, batch, 1)[0].values)
            plans = {f"int{b}": tqslite.uniform_plan(system, b) for b in bits}
            if label != "pangu_lite_x8":
                plans["mixed"] = mixed_plan(name, system, a.smoke)
            rows, graphs, float_pt = files_for(label, system, x0[:1], plans, folder)
            size_rows += rows
            lt = load_times(system, folder / f"{label}_int4.safetensors", float_pt)
            load_rows.append(dict(model=label, packed_ms=1e3 * lt["packed"], float_ms=1e3 * lt["float"]))
            timed = {k: graphs[k] for k in ("float", "int4", "mixed") if k in graphs}
            x = x0.numpy()
            lat = step_latency(sessions(timed, {"int4", "mixed"}), x, steps, rounds)
            for key, path in timed.items():
                for fold in ((False, True) if key != "float" else (False,)):
                    variant = key + (" folded" if fold else "")
                    mem = memory(path, x.shape, steps, fold)
                    ops = runtime_ops(path) if not fold else {}
                    kt = kernel_times(path, x, steps) if not fold else {}
                    speed_rows.append(dict(model=label, graph=variant, batch=batch, step_ms=1e3 * lat[variant],
                                           vs_float=lat[variant] / lat["float"], mem_after_load=mem["after_load"],
                                           mem_peak=mem["peak"], dq_nodes=ops.get("DequantizeLinear", 0),
                                           nbits_nodes=ops.get("MatMulNBits", 0),
                                           dq_ms=kt.get("DequantizeLinear", 0.0), nbits_ms=kt.get("MatMulNBits", 0.0),
                                           conv_ms=kt.get("Conv", 0.0), matmul_ms=kt.get("MatMul", 0.0)
                                           + kt.get("FusedMatMul", 0.0)))
            print(f"  measured {label}", file=sys.stderr)

    mb = 2.0**20
    print(f"onnxruntime {ort.__version__}, torch {torch.__version__}; one thread; batch {a.batch}; "
          f"{steps} steps x best of {rounds} rounds")
    print("\n1. Bytes on disk (os.path.getsize). ckpt = packed safetensors; onnx = low-bit graph; "
          "x = compression against the float file of the same kind")
    print(f"{'model':<15}{'plan':<7}{'bits/p':>7}{'plan B':>9}{'ckpt B':>9}{'header':>8}{'data-plan':>10}"
          f"{'x .pt':>7}{'onnx B':>9}{'codes':>8}{'scales':>8}{'graph':>8}{'x .onnx':>8}")
    for r in size_rows:
        print(f"{r['model']:<15}{r['plan']:<7}{r['bits_per_param']:>7.2f}{r['plan_bytes']:>9}{r['ckpt_bytes']:>9}"
              f"{r['ckpt_header']:>8}{r['ckpt_data'] - r['plan_bytes']:>10}{r['float_pt'] / r['ckpt_bytes']:>7.2f}"
              f"{r['onnx_bytes']:>9}{r['onnx_codes']:>8}{r['onnx_scales']:>8}{r['onnx_graph']:>8}"
              f"{r['float_onnx'] / r['onnx_bytes']:>8.2f}")
    print("   'data-plan': tensor bytes of the checkpoint minus the plan's size (bytes rounded up per array). "
          "The ONNX graph stores 3-bit codes in 4 bits, scales in float32,\n   and its nodes and names ('graph'); "
          "'codes' of a 2-bit plan hold 4-bit DequantizeLinear tensors (biases, norms, convolutions).")

    print("\n2. onnxruntime per rollout step; memory = what the session and the run added to a fresh process "
          "(peak RSS minus RSS before the session)")
    print(f"   (batch {a.batch}; the scaled model one state at a time)")
    print(f"{'model':<15}{'graph':<14}{'ms/step':>9}{'x float':>8}{'MB load':>8}{'MB peak':>8}{'DQ nodes':>9}"
          f"{'NBits':>6}{'DQ ms':>7}{'NBits ms':>9}{'Conv ms':>8}{'MatMul ms':>10}")
    for r in speed_rows:
        ops = "" if r["graph"].endswith("folded") else (
            f"{r['dq_nodes']:>9}{r['nbits_nodes']:>6}{r['dq_ms']:>7.2f}{r['nbits_ms']:>9.2f}{r['conv_ms']:>8.2f}"
            f"{r['matmul_ms']:>10.2f}")
        print(f"{r['model']:<15}{r['graph']:<14}{r['step_ms']:>9.2f}{r['vs_float']:>8.2f}{r['mem_after_load'] / mb:>8.2f}"
              f"{r['mem_peak'] / mb:>8.2f}{ops}")
    for r in speed_rows:
        if r["graph"] in ("int4", "mixed") and r["vs_float"] > 1.05:
            f = next(s for s in speed_rows if s["model"] == r["model"] and s["graph"] == "float")
            why = []
            if r["dq_nodes"]:
                why.append(f"{r['dq_nodes']} DequantizeLinear nodes dequantize at every step ({r['dq_ms']:.2f} ms)")
            if r["conv_ms"] > f["conv_ms"]:
                why.append(f"convolutions whose weights come from DequantizeLinear are not constants, so onnxruntime "
                           f"does not pre-pack them (Conv {r['conv_ms']:.2f} ms per step, float {f['conv_ms']:.2f})")
            if r["nbits_ms"] + r["matmul_ms"] > f["matmul_ms"]:
                why.append(f"MatMulNBits and MatMul take {r['nbits_ms'] + r['matmul_ms']:.2f} ms per step, the float "
                           f"graph's MatMul {f['matmul_ms']:.2f}")
            print(f"   {r['model']} {r['graph']} is {r['vs_float']:.2f}x the float step: " + "; ".join(why)
                  + ". (Timings on a busy machine vary: rerun on an idle one.)")
    print("   'folded': DequantizeLinear constant-folded at load (session.disable_quant_qdq=1): float weights in "
          "memory for those tensors, MatMulNBits still reads its low-bit codes.\n   Operator columns (nodes in "
          "onnxruntime's optimized graph, kernel ms per step from its profiler) are left out for the folded runs.")

    print("\n3. Load time of the int4 packed checkpoint against torch.load + load_state_dict of the float .pt")
    for r in load_rows:
        print(f"   {r['model']:<15} packed {r['packed_ms']:7.2f} ms   float {r['float_ms']:7.2f} ms   "
              f"ratio {r['packed_ms'] / r['float_ms']:.2f}")

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    def columns(prefix, rows):
        return {f"{prefix}_{k}": (f"{prefix}_row", [r[k] for r in rows]) for k in rows[0]}
    ds = xr.Dataset(columns("size", size_rows) | columns("speed", speed_rows) | columns("load", load_rows),
                    attrs=dict(onnxruntime=ort.__version__, torch=torch.__version__, batch=a.batch, steps=steps,
                               rounds=rounds, threads=1))
    ds.to_netcdf(out / "deployment.nc")
    print(f"\nwritten {out / 'deployment.nc'}")


if __name__ == "__main__":
    main()
