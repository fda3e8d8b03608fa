"""Methods as (score, objective, quantizer) at matched size: sizes, errors, shared work, win tables, the command."""

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import same_weights, snapshot
from torch import nn

import tqslite
from tqslite import comparison as C
from tqslite import results as R
from tqslite.benchmark import Benchmark, float_skill
from tqslite.evaluation import forecast
from tqslite.pipeline import run as run_pipeline

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = ((2, "channel"), (4, "channel"), (3, "group"))
CLOSED = replace(C.SMOKE_CLOSED_LOOP, generations=2)


def small_benchmark(seed=0):
    """A tiny forecaster of an 8-variable state. The truth is the float rollout plus noise of RMS
    0.05 * lead, and the climatology forecast errs by exactly 0.175 everywhere, so the float model
    has skill up to lead 3 (0.15 < 0.175 < 0.20); persistence, a whole step off, never binds."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 8)).double()
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(80, 8, generator=g, dtype=torch.float64)
    rng = np.random.default_rng(seed)

    def windows(x, horizon=5):
        x = xr.DataArray(x.numpy(), dims=("window", "variable"), coords={"variable": list("abcdefgh")})
        fc = forecast(model, x, horizon)
        truth = fc + 0.05 * np.arange(1, horizon + 1)[None, :, None] * rng.normal(size=fc.shape)
        clim = truth + 0.175
        pers = xr.zeros_like(truth) + x.values[:, None]
        return x, truth, xr.concat([clim, pers], xr.DataArray(["climatology", "persistence"], dims="forecast"))

    xp, tp, rp = windows(states[:8])
    xe, te, re = windows(states[8:32])
    batches = [(states[32:48], model(states[32:48]).detach() + 0.05)]
    return Benchmark("mlp", tqslite.TorchSystem(model), xp, tp, rp, xe, te, re, states[48:],
                     batches, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), per="variable")


METHODS = (C.uniform("rtn"), C.uniform("gptq"), C.Method("tqs", "rtn"), C.Method("tqs", "gptq", priced_by="rtn"),
           C.Method("tqs_quant", "rtn"), C.Method("one_step", "gptq"), C.Method("hessian", "gptq"),
           C.Method("range", "qep"), C.Method("random", "gptq"), C.recommended_method(),
           replace(C.recommended_method(), refine="operating_point"), replace(C.recommended_method(), refine="closed_loop"),
           C.Method("none", "gptq", calibration="rollout"))


@pytest.fixture(scope="module")
def compared():
    bench = small_benchmark()
    before = snapshot(bench.system.module)
    result = C.run(bench, METHODS, BUDGETS, closed_loop=CLOSED, group_size=16, n_hutchinson=2, n_boot=50)
    return bench, before, result


def test_sizes_match_and_the_float_model_is_untouched(compared):
    bench, before, result = compared
    assert same_weights(bench.system.module, before)
    bpp = result["bits_per_param"]
    budget = result["budget_bits_per_param"]
    uniform = result["score"] == "none"
    assert (bpp.where(uniform) == budget).sum() == int(uniform.sum()) * len(BUDGETS)   # uniform: the budget exactly
    assert float(result["size_shortfall"].min()) >= 0                                  # nobody above the budget
    assert list(result["budget"].values) == ["2b/channel", "4b/channel", "3b/group"]


def test_the_evaluation_lead_is_the_skill_horizon_of_the_evaluation_windows(compared):
    bench, _, result = compared
    L = float_skill(bench, "eval").attrs["horizon"]
    assert result.attrs["eval_lead"] == L == result.sizes["lead"]
    assert result.attrs["probe_horizon"] == float_skill(bench, "probe").attrs["horizon"]
    assert L == 3       # known: the model's 0.05 * lead crosses the climatology's 0.175 after lead 3


def test_errors_are_those_of_the_quantized_rollouts(compared):
    bench, _, result = compared
    L = result.attrs["eval_lead"]
    ref = forecast(bench.system, bench.x_eval, L)
    plan = tqslite.uniform_plan(bench.system, 4)
    for label, q, cal in (("none+rtn", None, None), ("none+gptq", tqslite.GPTQ(), bench.calibration)):
        fc = forecast(tqslite.apply_plan(bench.system, plan, q, cal), bench.x_eval, L)   # GPTQ run anew, not the bank
        for against, target in (("float", ref), ("truth", bench.truth.sel(lead=slice(1, L)))):
            expected = ((fc - target) ** 2).transpose("window", "lead", "variable").values
            got = result["mse"].sel(scheme=label, budget="4b/channel", against=against).values
            np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(R.float_rmse(result).values,
                               np.sqrt(((ref - bench.truth) ** 2).sel(lead=L).mean("window").values), rtol=1e-12)


def test_the_same_plan_and_quantizer_give_the_same_model_and_an_exact_tie(compared):
    _, _, result = compared
    # at 2 bits every knapsack plan is uniform (the options start at 2 bits): identical models
    mse = result["mse"].sel(budget="2b/channel")
    for m in ("recommended", "one_step+gptq", "hessian+gptq", "random+gptq", "recommended+closed_loop"):
        assert np.array_equal(mse.sel(scheme=m), mse.sel(scheme="none+gptq")), m
    table = R.head_to_head(result, [("recommended", "none+gptq")], budgets=["2b/channel"], n_resamples=99)
    cell = table.sel(pair="recommended vs none+gptq")
    assert np.allclose(cell["ratio"], 1.0) and np.allclose(cell["lo"], 1.0) and np.allclose(cell["hi"], 1.0)
    assert set(cell["outcome"].values.ravel()) <= {"tie", "unusable"}


@pytest.mark.parametrize("label", ["recommended", "recommended+closed_loop"])
def test_the_recommended_method_is_the_library_pipeline(compared, label):
    bench, _, result = compared
    from tqslite.bank import WeightBank
    from tqslite.pipeline import RECOMMENDED
    pipeline = RECOMMENDED if label == "recommended" else CLOSED
    T = result.attrs["probe_horizon"]
    options = pipeline.options(tqslite.PerGroup(16))
    bank = WeightBank.build(bench.system, options, tqslite.GPTQ(), bench.calibration)
    budget = float(result["budget_bits_per_param"].sel(budget="3b/group"))
    res = run_pipeline(pipeline, bench.system, bench.x_probe, budget, T, granularity=tqslite.PerGroup(16), bank=bank)
    fc = forecast(res.model, bench.x_eval, result.attrs["eval_lead"])
    ref = forecast(bench.system, bench.x_eval, result.attrs["eval_lead"])
    got = result["mse"].sel(scheme=label, budget="3b/group", against="float").values
    np.testing.assert_allclose(got, ((fc - ref) ** 2).transpose("window", "lead", "variable").values, rtol=1e-12)
    if label != "recommended":  # the closed loop never made the probe-state fitness worse; its cost is recorded
        f0, f1 = result["start_fitness"].sel(scheme=label), result["fitness"].sel(scheme=label)
        assert (f1 <= f0).all() and (result["refine_rollouts"].sel(scheme=label) > 0).all()


def test_head_to_head_flags_unusable_and_counts_the_rest(compared):
    _, _, result = compared
    pairs = R.allocation_gain_pairs(result) + R.headline_pairs(result) + R.quantizer_gain_pairs(result)
    assert ("tqs+rtn", "none+rtn") in pairs and ("none+gptq", "none+rtn") in pairs
    assert ("recommended", "none+gptq") in pairs and ("none+gptq@rollout", "none+gptq") in pairs
    assert ("recommended+closed_loop", "recommended") in pairs
    table = R.head_to_head(result, pairs, n_resamples=99)
    ok = R.usable_cells(result)
    for p, a, b in zip(table["pair"].values, table["a"].values, table["b"].values):
        both = (ok.sel(scheme=str(a)) & ok.sel(scheme=str(b))).values
        out = table["outcome"].sel(pair=p).values
        assert ((out == "unusable") == ~both).all()
        assert (table["usable_a"].sel(pair=p).values == ok.sel(scheme=str(a)).values).all()
        assert (table["usable_b"].sel(pair=p).values == ok.sel(scheme=str(b)).values).all()
    s = R.summarize(table)
    assert (s["n"] + s["unusable"] + s["unmatched"] == table.sizes["budget"] * table.sizes["variable"]).all()
    with pytest.raises(ValueError, match="not methods of this result"):
        R.head_to_head(result, [("nope", "none+rtn")])


def test_method_labels_and_checks():
    assert C.recommended_method().label == "recommended" == C.Method("tqs_quant", "gptq").label
    assert replace(C.recommended_method(), refine="closed_loop").label == "recommended+closed_loop"
    assert C.recommended_method("rollout").label == "recommended@rollout"
    assert C.Method("tqs", "gptq", "linear").label == "tqs/linear+gptq"
    assert C.Method("tqs", "gptq", priced_by="rtn").label == "tqs+gptq(rtn plan)"
    assert C.Method("none", "gptq", calibration="rollout").label == "none+gptq@rollout"
    labels = [m.label for m in C.complete_methods()]
    assert len(labels) == len(set(labels)) and "recommended" in labels
    with pytest.raises(ValueError, match="score"):
        C.Method("tqs2")
    with pytest.raises(ValueError, match="not refined"):
        C.Method("none", refine="closed_loop")


def test_probe_states_of_every_split():
    from tqslite.splits import prepare, probe_states
    prep = prepare("timesfm_lite")
    for split in ("train", "validation", "heldout"):
        x = probe_states("timesfm_lite", split, 5, horizon=2, prep=prep)
        assert x.shape == (5, 64) and np.isfinite(x.values).all()
    with pytest.raises(ValueError, match="split"):
        probe_states("timesfm_lite", "test", 5, prep=prep)


def test_ranking_stability_reports_the_rank_correlation_of_the_splits_scores():
    from tqslite.stats import spearman
    st = C.ranking_stability("timesfm_lite", splits=("validation", "heldout", "train"), n=8, horizon=2, n_boot=100)
    assert list(st["pair"].values) == ["validation~heldout", "validation~train", "heldout~train"]
    for pair in st["pair"].values:
        a, b = str(pair).split("~")
        rho = st.sel(pair=pair)
        assert float(rho["rho"]) == pytest.approx(spearman(st["gamma"].sel(split=a), st["gamma"].sel(split=b)))
        assert -1 <= float(rho["lo"]) <= float(rho["rho"]) <= float(rho["hi"]) <= 1
    with pytest.raises(ValueError, match="twice"):
        C.ranking_stability("timesfm_lite", splits=("validation", "validation"), n=8, horizon=2)


def test_the_benchmark_command_prints_the_headline_and_writes_tables(tmp_path):
    """The command that produces every table, from a clean checkout (SMOKE mode, the notebooks' methods)."""
    out = tmp_path / "results"
    run = subprocess.run([sys.executable, "benchmarks/baselines.py", "--smoke", "--quiet", "--methods", "book",
                          "--models", "timesfm_lite,lorenz96_emulator", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "The figure that matters" in run.stdout and "allocation gain" in run.stdout
    for name in ("timesfm_lite", "lorenz96_emulator"):
        wins = xr.load_dataset(out / f"wins_{name}.nc")
        assert set(np.unique(wins["outcome"].values)) <= {"win", "tie", "loss", "unusable", "unmatched"}
        assert "recommended vs none+gptq" in wins["pair"].values
        result = xr.load_dataset(out / f"comparison_{name}.nc")
        short = result["size_shortfall"].where(result["score"] != "none")
        assert 0 <= float(short.min()) and float(short.max()) <= C.MATCH_TOLERANCE  # matched within 1 %


def test_the_verdict_counts_the_headline_pair_per_model_and_bit_width(tmp_path):
    # hand-made win tables: known outcomes per budget and variable; a second pair that must be ignored
    budgets = ["3b/channel", "3b/group", "4b/channel", "8b/channel"]
    head, other = R.headline_pair(), "tqs+rtn vs none+rtn"
    outcome = np.array([[["win", "win", "tie"], ["loss", "unusable", "unusable"], ["win", "tie", "unmatched"],
                         ["loss", "loss", "loss"]],
                        [["loss"] * 3] * 4], dtype=object)
    p = np.where(outcome == "win", 1e-4, np.where(outcome == "loss", 0.04, 0.5))
    ratio = np.where(outcome == "win", 0.5, np.where(outcome == "loss", 1.5, 1.0))
    dims = ("pair", "budget", "variable")
    usable_a = outcome != "unusable"
    usable_a[0, 1, 1] = True                                  # 3b/group, y: only the pipeline is usable
    usable_b = outcome != "unusable"
    table = xr.Dataset({"outcome": (dims, outcome.astype(str)), "p": (dims, p), "ratio": (dims, ratio),
                        "usable_a": (dims, usable_a), "usable_b": (dims, usable_b)},
                       coords={"pair": [head, other], "budget": budgets, "variable": list("xyz")},
                       attrs={"ci": 0.95})
    v = R.verdict({"pangu_lite": table}, bits=(3, 4))
    assert v["model"].values.tolist() == ["pangu_lite"] and v["bits"].values.tolist() == [3, 4]
    got = {k: v[k].sel(model="pangu_lite").values.tolist() for k in ("n", "win", "tie", "loss", "unusable",
                                                                       "unmatched", "holm_win", "holm_loss",
                                                                       "only_a_usable", "only_b_usable")}
    # 3 bits: 2 wins, 1 tie, 1 loss counted, 2 unusable; Holm over 4 p-values: 4e-4, 4e-4 reject, 0.04*2 > 0.05 not
    assert got == dict(n=[4, 2], win=[2, 1], tie=[1, 1], loss=[1, 0], unusable=[2, 0], unmatched=[0, 1],
                       holm_win=[2, 1], holm_loss=[0, 0], only_a_usable=[1, 0], only_b_usable=[0, 0])
    table.to_netcdf(tmp_path / "wins_pangu_lite.nc")
    again = R.verdict(tmp_path, bits=(3, 4))                  # the same counts from the saved table
    assert all((again[k] == v[k]).all() for k in got)
    text = R.verdict_sentence(v)
    assert "won 3, tied 2 and lost 1 of 6 cells counted" in text and "2 more cells were not counted" in text
    assert "not met" in text                                  # 50% won
    assert "in 1 of the 2 the default pipeline is usable and uniform GPTQ is not, in 0 the reverse" in text
    with pytest.raises(ValueError, match="baselines"):
        R.verdict(tmp_path / "nothing")
