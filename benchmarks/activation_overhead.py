"""Compute and memory overhead of static, dynamic and probabilistic activation quantization.

Run:  .venv/bin/python benchmarks/activation_overhead.py [--batch 8] [--repeats 20] [--bits 8] [--threads 1] [--out DIR]

For each case-study model (the shipped checkpoint when it exists, else the same architecture
freshly initialised: the timings depend on shapes, not on weight values):

1. the whole model's forward pass with each strategy's hooks, against the float forward pass
   (best of ``--repeats`` interleaved rounds, ``tqslite.activations.overhead_timing``);
2. per layer, the time to find the range (dynamic: min and max of the output; probabilistic: the
   surrogate on the input) and the time of the fake quantization itself, summed over layers,
   against the time of the layers themselves;
3. the accounting of ``tqslite.activations.activation_costs``: the largest number of elements any
   layer holds beyond its own quantized output (per sample, and in float32 bytes for the batch),
   and the range arithmetic against the layers' arithmetic.

Everything printed is measured here, now (ratios within one run; run it on an idle machine);
results also go to DIR/activation_overhead.nc. The strategies are simulated in floating point, so
the timings measure the cost of finding ranges in PyTorch, not of an integer kernel.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from tqslite import activations as A
from tqslite import models


def model_and_states(name: str, batch: int, seed: int = 0):
    """The model (shipped checkpoint if present) and ``batch`` random states of its shape."""
    try:
        system, _ = models.load(name)
        source = "checkpoint"
    except Exception:  # no checkpoint yet: same architecture, fresh weights
        torch.manual_seed(seed)
        system = models.wrap(name, models.module_of(name).build())
        system.module.eval()
        source = "fresh initialisation"
    g = torch.Generator().manual_seed(seed)
    spec = models.module_of(name)
    if spec.LAYOUT == "grid":
        x = torch.randn(batch, len(spec.VARIABLES), *spec.ARCH["grid"], generator=g)
    else:
        x = torch.randn(batch, spec.ARCH["context"], generator=g)
    return system, x, source


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8, help="samples per forward pass (default 8)")
    ap.add_argument("--repeats", type=int, default=20, help="interleaved rounds, best kept (default 20)")
    ap.add_argument("--bits", type=int, default=8, help="activation bit width (default 8)")
    ap.add_argument("--k", type=float, default=3.0, help="probabilistic range: mean +- k std (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier ratios)")
    ap.add_argument("--out", default="benchmarks/results", help="folder for activation_overhead.nc")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    results = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch}, {args.bits}-bit "
          f"activations, best of {args.repeats}")
    for name in models.MODELS:
        system, x, source = model_and_states(name, args.batch)
        cal = A.calibrate(system, x)
        t = A.overhead_timing(system, x, cal, bits=args.bits, k=args.k, repeats=args.repeats)
        c = A.activation_costs(system, x)
        layers = float(t["layer_seconds"].sum())
        peak = c["extra_elements"].max("module")
        ds = xr.Dataset({
            "forward_ratio": t["forward_ratio"],
            "forward_seconds": t["forward_seconds"],
            "range_over_layers": t["range_seconds"].sum("module") / layers,
            "quantize_over_layers": float(t["quantize_seconds"].sum()) / layers,
            "peak_extra_elements_per_sample": peak,
            "peak_extra_bytes_batch": peak * 4 * args.batch,
            "range_flops_over_layer_flops": c["range_flops"].sum("module") / float(c["layer_flops"].sum()),
            "persistent_elements": c["persistent_elements"].sum("module"),
        }).expand_dims(model=[name])
        ds.attrs["source_" + name] = source
        results.append(ds)

        print(f"\n{name} ({source}), {c.sizes['module']} layers:")
        print(f"  {'strategy':<15}{'forward / float':>16}{'range time / layers':>21}{'range flop / layers':>21}"
              f"{'peak extra el./sample':>23}{'persistent el.':>16}")
        print(f"  {'float':<15}{1.0:>16.3f}")
        for s in A.MODES:
            print(f"  {s:<15}{float(t['forward_ratio'].sel(strategy=s)):>16.3f}"
                  f"{float(ds['range_over_layers'].sel(model=name, mode=s)):>21.3f}"
                  f"{float(ds['range_flops_over_layer_flops'].sel(model=name, mode=s)):>21.4f}"
                  f"{int(peak.sel(mode=s)):>23d}{int(ds['persistent_elements'].sel(model=name, mode=s)):>16d}")
        print(f"  fake quantization itself: {float(ds['quantize_over_layers'].squeeze()):.3f} x the layers' time "
              "(the same for every strategy)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    merged = xr.concat(results, dim="model", combine_attrs="drop")
    merged.attrs.update(batch=args.batch, repeats=args.repeats, bits=args.bits, k=args.k, torch=torch.__version__,
                        threads=torch.get_num_threads())
    for r in results:
        merged.attrs.update({k: v for k, v in r.attrs.items() if k.startswith("source_")})
    merged.to_netcdf(out / "activation_overhead.nc")
    print(f"\nwritten {out / 'activation_overhead.nc'}")
    return merged


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
