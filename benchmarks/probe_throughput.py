"""Probe throughput against plain inference, and the exact allocator's solve time.

Run:  .venv/bin/python benchmarks/probe_throughput.py [--windows 64] [--horizon 20] [--out DIR]

1. For a small MLP and a small transformer, the TQS probe's throughput in model-steps per second
   (one reference rollout plus one perturbed rollout per unit, every window, every lead) is
   compared with plain batched inference of the same model at the same batch size, timed in the
   same run. Perturbing and restoring weights should cost next to nothing: target ratio >= 0.8.
2. The exact (HiGHS) and greedy multiple-choice knapsack on 1000 units x 7 options, with the
   greedy's gap to the optimum.

Everything printed is measured here, now; results also go to DIR/probe_throughput.nc.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from torch import nn

import tqslite


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


def plain_rollouts(model, x0, horizon, repeats):
    with torch.no_grad():
        for _ in range(repeats):
            x = x0
            for _ in range(horizon):
                x = model(x)


def best_times(fns, repeat=5):
    """Best wall time of each function over ``repeat`` interleaved rounds (robust to passing load)."""
    best = [np.inf] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def throughput(name, model, x0, horizon):
    model.eval()
    n_units = len(list(model.parameters()))
    steps = x0.shape[0] * horizon * (n_units + 1)
    t_plain, t_probe = best_times([lambda: plain_rollouts(model, x0, horizon, n_units + 1),
                                   lambda: tqslite.probe(model, x0, horizon=horizon, progress=False)])
    return dict(model=name, units=n_units, params=sum(p.numel() for p in model.parameters()),
                plain=steps / t_plain, probe=steps / t_probe, ratio=t_plain / t_probe)


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
    for solver in ("milp", "greedy"):
        t0 = time.perf_counter()
        choice = tqslite.solve_mckp(costs, sizes, budget, solver)
        out[solver] = (time.perf_counter() - t0, costs[np.arange(units), choice].sum())
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=64, help="initial states per batch (default 64)")
    ap.add_argument("--horizon", type=int, default=20, help="rollout steps (default 20)")
    ap.add_argument("--out", default="benchmarks/results", help="folder for probe_throughput.nc")
    args = ap.parse_args()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)

    mlp = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 64))
    tr = TinyTransformer()
    rows = [throughput("mlp", mlp, torch.randn(args.windows, 64, generator=g), args.horizon),
            throughput("transformer", tr, torch.randn(args.windows, tr.tokens, 64, generator=g), args.horizon)]

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.windows} windows x {args.horizon} leads")
    print(f"{'model':<12}{'units':>6}{'params':>9}{'plain steps/s':>15}{'probe steps/s':>15}{'probe/plain':>13}")
    for r in rows:
        print(f"{r['model']:<12}{r['units']:>6}{r['params']:>9}{r['plain']:>15.0f}{r['probe']:>15.0f}{r['ratio']:>13.2f}")

    alloc = allocator_timing()
    (t_milp, c_milp), (t_greedy, c_greedy) = alloc["milp"], alloc["greedy"]
    print("\nallocator, 1000 units x 7 options, budget 4 bits/param:")
    print(f"  milp (exact)  {t_milp:8.3f} s   objective {c_milp:.6g}")
    print(f"  greedy        {t_greedy:8.3f} s   objective {c_greedy:.6g}   gap {100 * (c_greedy / c_milp - 1):.3f} %")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = xr.Dataset(
        {k: ("model", [r[k] for r in rows]) for k in ("units", "params", "plain", "probe", "ratio")},
        coords={"model": [r["model"] for r in rows]},
        attrs=dict(windows=args.windows, horizon=args.horizon, milp_seconds=t_milp, greedy_seconds=t_greedy,
                   greedy_gap=c_greedy / c_milp - 1, torch=torch.__version__),
    )
    ds.to_netcdf(out / "probe_throughput.nc")
    print(f"\nwritten {out / 'probe_throughput.nc'}")


if __name__ == "__main__":
    main()
