"""The case-study steps on tiny hand-made inputs with known answers."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import xarray as xr  # noqa: E402

from tqslite import casestudy as cs  # noqa: E402
from tqslite import casestudy_plans as cpl  # noqa: E402
from tqslite import casestudy_plots as cfig  # noqa: E402
from tqslite import BlockUnits, probe, uniform_plan  # noqa: E402

ROLES = {"0": "input", "4": "output"}


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_lead_text_in_days():
    assert cs.lead_text(4, 0.25) == "1 day"
    assert cs.lead_text(2, 0.25) == "0.5 days"
    assert cs.lead_text(3, 4) == "12 days"


def test_unit_table_counts_tensors_parameters_and_roles(mlp):
    t = cs.unit_table(mlp, ROLES)
    assert list(t.index) == ["0", "2", "4"]
    assert list(t["role"]) == ["input", "inner", "output"]
    assert list(t["tensors"]) == [2, 2, 2]
    assert list(t["parameters"]) == [8 * 32 + 32, 32 * 32 + 32, 32 * 8 + 8]
    assert list(t["module"]) == ["Linear"] * 3
    share = cs.role_share(t)
    assert share["inner"] == pytest.approx(100 * 1056 / (288 + 1056 + 264))
    assert share.sum() == pytest.approx(100)


RECORDED = {"leads": [1, 2, 3], "n_windows": 5,
            "rmse_normalised": {"model": [0.1, 0.5, 0.9], "persistence": [0.3, 0.4, 1.0],
                                "climatology": [0.8, 0.8, 0.8]}}


def skill_of(model, clim, pers):
    return xr.Dataset({"rmse": (("forecast", "lead"), np.array([model, clim, pers]))},
                      coords={"forecast": ["model", "climatology", "persistence"],
                              "lead": np.arange(1, len(model) + 1)})


def test_skill_check_and_leading_runs():
    skill = skill_of([0.1, 0.5 + 1e-3, 0.9], [0.8, 0.8, 0.8], [0.3, 0.4, 1.0])
    table, gap = cs.skill_check(RECORDED, skill, horizon=2)
    assert list(table.columns) == [1, 2]  # leads up to the horizon only
    assert gap == pytest.approx(1e-3)
    assert cs.leading_run(RECORDED, "persistence") == 1  # 0.5 > 0.4 at lead 2
    assert cs.leading_run(RECORDED, "climatology") == 2  # 0.9 > 0.8 at lead 3
    worse = dict(RECORDED, rmse_normalised=dict(RECORDED["rmse_normalised"], model=[0.9, 0.9, 0.9]))
    assert cs.leading_run(worse, "climatology") is None
    lines = cs.skill_lines(RECORDED, gap, 1.0, 0.25)
    assert lines[1] == "below persistence: at every recorded lead up to 1 (0.25 days)"


def test_evaluation_lead_is_the_skill_rule():
    # beats both at leads 1 and 2, loses to persistence at lead 3
    assert cs.evaluation_lead(skill_of([0.1, 0.2, 0.9], [1, 1, 1], [0.5, 0.5, 0.5])) == 2
    assert cs.evaluation_lead(skill_of([2.0, 0.2], [1, 1], [1, 1])) == 0
    bad = skill_of([0.1, 0.2], [1, 1], [1, 1]).assign_coords(lead=[0, 1])
    with pytest.raises(ValueError, match="leads must be 1, 2"):
        cs.evaluation_lead(bad)
    assert "$L$ = 2" in cs.skill_sentence(2, 4, 0.25)
    assert "none is counted" in cs.skill_sentence(0, 4, 0.25)


def boot_table(gammas, los, his, roles):
    return pd.DataFrame({"role": roles, "g": gammas, "95% low": los, "95% high": his},
                        index=pd.Index([f"u{i}" for i in range(len(gammas))], name="unit"))


def test_ranking_of_blocks():
    t = boot_table([0.5, 0.1, 0.3, np.nan, 0.2], [0.45, 0.0, 0.2, np.nan, 0.1], [0.55, 0.2, 0.4, np.nan, 0.3],
                   ["inner", "input", "inner", "inner", "output"])
    r = cs.Ranking(t, "g")
    assert list(r.ranked.index) == ["u0", "u2", "u4", "u1"]  # the non-finite score is left out
    assert (r.top, r.second, r.least) == ("u0", "u2", "u1")
    assert r.clear  # 0.45 lies above every other high (0.4)
    # inner scores 0.5 and 0.3 against input/output 0.1 and 0.2: all four pairs inner-higher
    assert (r.n_pairs, r.inner_above) == (4, 4)
    assert r.by_role.to_dict() == pytest.approx({"inner": 0.4, "input": 0.1, "output": 0.2})
    assert r.with_ci("u2") == "0.300 [0.200, 0.400]"
    t2 = t.copy()
    t2.loc["u2", "95% high"] = 0.5
    assert not cs.Ranking(t2, "g").clear


@pytest.fixture
def scores(mlp, x0):
    return {"block": probe(mlp, x0, horizon=3, units=BlockUnits(depth=2), progress=False)}


def test_matched_plans_have_matched_sizes_and_known_rows(mlp, scores):
    plans, match = cpl.matched_plans(mlp, scores, [3, 4], options=[2, 3, 4, 5, 6, 8, 16, 32])
    assert list(plans) == ["uniform 3", "TQS block @ 3", "uniform 4", "TQS block @ 4"]
    assert list(match.index) == [(3, "block"), (4, "block")]
    for b in (3, 4):
        u, t = plans[f"uniform {b}"], plans[f"TQS block @ {b}"]
        assert set(u.bits.values()) == {b}
        row = match.loc[(b, "block")]
        assert row["uniform bits/param"] == cpl.bits_per_param(u, mlp)
        assert row["TQS bits/param"] <= row["uniform bits/param"]  # never over the budget
        assert abs(row["size difference %"]) <= 1.0


def test_matched_plans_refuse_sizes_that_cannot_match(mlp, scores):
    with pytest.raises(ValueError, match="differ in size by"):
        cpl.matched_plans(mlp, scores, [3], options=[2])  # only 2 bits: far below the 3-bit size


def test_unit_params_bit_share_and_file_names(mlp):
    plan = uniform_plan(mlp, 4, units=BlockUnits(depth=2))
    assert cpl.unit_params(plan) == {"0": 288, "2": 1056, "4": 264}
    share = cpl.bit_share({"uniform 4": plan}, 288 + 1056 + 264)
    assert share.loc[4, "uniform 4"] == pytest.approx(100)
    assert cpl.plan_file("TQS block @ 3") == "TQS_block_at_3.json"
    tensor_plan = uniform_plan(mlp, 3)
    per_block = cpl.bits_per_block({2.5: tensor_plan})
    assert per_block["budget 2.5"].to_dict() == {"0": 3.0, "2": 3.0, "4": 3.0}


def hand_made_errors():
    """Three variables: TQS error 0.25 x uniform on a (win), equal on b (tie), 4 x on c (loss)."""
    rng = np.random.default_rng(0)
    u = rng.uniform(1, 2, size=(20, 3))
    t = u * np.array([0.25, 1.0, 4.0])
    coords = {"variable": ["a", "b", "c"]}
    da = lambda v: xr.DataArray(v, dims=("window", "variable"), coords=coords)  # noqa: E731
    mse = {"TQS block @ 3": {"float": da(t), "truth": da(t)}, "uniform 3": {"float": da(u), "truth": da(u)}}
    return mse, da(np.full((20, 3), 100.0)), {"TQS block @ 3": 3.0, "uniform 3": 3.0}


def test_win_tables_of_a_hand_made_pair():
    mse, own, sizes = hand_made_errors()
    ratios, rows, tables = cpl.win_tables(mse, own, sizes, 2, [3], ["block"], "variable", "float", seed=0)
    assert list(rows["outcome"]) == ["win", "tie", "loss"]
    assert list(rows["winner"]) == ["TQS", "tie", "uniform"]
    assert ratios["TQS block / uniform, 3 bits"].to_numpy() == pytest.approx([0.5, 1.0, 2.0])
    assert rows["95% low"].to_numpy() == pytest.approx([0.5, 1.0, 2.0])  # an exact ratio in every resample
    lines = cpl.count_lines(tables, [3], ["block"], 2, "variable")
    assert lines == ["- 3 bits, TQS block units, against the float model at lead 2: TQS wins 1, ties 1 and loses 1 "
                     "of 3 variables counted (paired bootstrap over windows)."]


def test_win_tables_leave_out_unusable_plans_and_models_without_skill():
    mse, own, sizes = hand_made_errors()
    own = own.copy()
    own[:, 2] = 1e-3  # on c the uniform plan adds far more error than the float model's own
    _, rows, tables = cpl.win_tables(mse, own, sizes, 2, [3], ["block"], "variable", "float")
    assert list(rows["outcome"]) == ["win", "tie", "unusable"]
    assert list(rows["winner"]) == ["TQS", "tie", "not counted"]
    assert "1 variables not counted" in cpl.count_lines(tables, [3], ["block"], 2, "variable")[0]
    _, rows, _ = cpl.win_tables(mse, own, sizes, 0, [3], ["block"], "variable", "float")
    assert set(rows["outcome"]) == {"unusable"}
    sizes["uniform 3"] = 3.1  # 3.3% apart
    _, rows, _ = cpl.win_tables(*hand_made_errors()[:2], sizes, 2, [3], ["block"], "variable", "float")
    assert set(rows["outcome"]) == {"unmatched"}


def errors_by_plan():
    lead = np.arange(1, 5)
    return xr.DataArray(np.array([lead * 1.0, lead * 2.0, lead * 3.0]), dims=("plan", "lead"),
                        coords={"plan": ["float", "uniform 3", "TQS block @ 3"], "lead": lead})


def test_plot_errors_draws_the_plans_and_marks_the_evaluation_lead():
    fig, ax = plt.subplots()
    cfig.plot_errors(ax, errors_by_plan(), 0.25, 3, [3, 4], with_float=False)
    labels = [ln.get_label() for ln in ax.lines]
    assert labels[:2] == ["uniform 3", "TQS block @ 3"]  # no float line
    marker = ax.lines[-1]
    assert list(marker.get_xdata()) == [0.75, 0.75]  # lead 3 of 0.25 days
    assert ax.get_yscale() == "log"
    assert ax.lines[0].get_linestyle() == "--" and ax.lines[1].get_linestyle() == ":"
    fig, ax = plt.subplots()
    cfig.plot_errors(ax, errors_by_plan(), 0.25, 3, [3, 4], with_float=True, float_marker="o")
    assert [ln.get_label() for ln in ax.lines][0] == "float model"
    assert ax.lines[0].get_marker() == "o" and ax.lines[1].get_marker() == "None"


def test_plan_style_colours_by_bit_width():
    assert cfig.plan_style("uniform 4", [3, 4])["color"] == "C1"
    assert cfig.plan_style("TQS tensor @ 3", [3, 4]) == dict(color="C0", ls="-", lw=2, label="TQS tensor @ 3")
    assert cfig.plan_style("float", [3, 4])["label"] == "float model"


def test_error_panels_one_panel_per_entry_and_one_legend():
    panels = [(errors_by_plan(), "a"), (errors_by_plan(), "b"), (errors_by_plan(), "mean")]
    fig = cfig.error_panels(panels, 0.25, 2, [3], with_float=True, title="t", ncol=2)
    axes = fig.axes
    assert [ax.get_title() for ax in axes[:3]] == ["a", "b", "mean"]
    assert not axes[3].axison  # the fourth cell of the 2 x 2 grid is switched off
    assert len(fig.legends) == 1 and len(fig.legends[0].get_texts()) == 3


def test_curves_and_gamma_figures(mlp, scores):
    block = scores["block"]
    fig, ax = plt.subplots()
    cfig.plot_curves(ax, block, ROLES)
    assert [ln.get_label() for ln in ax.lines] == ["0 (input)", "2 (inner)", "4 (output)"]
    assert [ln.get_linestyle() for ln in ax.lines] == ["--", "-", ":"]
    boot = xr.Dataset({"gamma": ("unit", [0.3, np.nan, 0.1]), "gamma_lo": ("unit", [0.2, np.nan, 0.0]),
                       "gamma_hi": ("unit", [0.4, np.nan, 0.2])}, coords={"unit": ["0", "2", "4"]})
    fig, ax = plt.subplots()
    cfig.plot_gamma(ax, boot, ROLES, horizon=3)
    bars = ax.patches
    assert len(bars) == 2  # the non-finite score is not drawn
    assert [b.get_height() for b in bars] == pytest.approx([0.3, 0.1])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["input", "inner", "output"]


def test_log_axis_labels_plain_numbers():
    fig, ax = plt.subplots()
    ax.plot([1, 2], [0.02, 0.05])
    cfig.log_axis(ax)
    fmt = ax.yaxis.get_minor_formatter()
    assert fmt(0.03, 0) == "0.03" and fmt(0.07, 0) == ""
    assert ax.yaxis.get_major_formatter()(0.01, 0) == "0.01"


def test_win_report_against_both_references_and_its_rows():
    mse, own, sizes = hand_made_errors()
    mse["TQS block @ 3"]["truth"] = mse["uniform 3"]["truth"]  # against the truth both plans are alike
    report = cpl.win_report(mse, own, sizes, 2, [3], ["block"], "variable")
    assert list(report["float"].rows["outcome"]) == ["win", "tie", "loss"]
    assert list(report["truth"].rows["outcome"]) == ["tie", "tie", "tie"]
    rows = cpl.win_rows(report)
    assert list(rows["against"]) == ["float model"] * 3 + ["truth"] * 3
    float_line, truth_line = cpl.win_sentences(report, [3], ["block"], 2, 0.25, "variable")
    assert float_line.startswith("- Against the float model, at lead 2 (0.5 days), one comparison per variable: "
                                 "3 bits, TQS block units: TQS 1 win, 1 tie, 1 loss of 3 comparisons")
    assert "0 wins, 3 ties, 0 losses of 3 comparisons" in truth_line


def test_global_rms_is_latitude_weighted_and_checked_against_the_report():
    lat = np.array([0.0, 60.0])  # weights cos(lat): 1 and 1/2
    maps = xr.Dataset({"TQS": (("variable", "lat", "lon"), np.array([[[1.0, 1.0], [4.0, 4.0]]]))},
                      coords={"variable": ["z"], "lat": lat, "lon": [0.0, 180.0]})
    expected = np.sqrt((1 * 1 + 0.5 * 16) / 1.5)
    rms = cpl.global_rms(maps)
    assert float(rms["TQS"].sel(variable="z")) == pytest.approx(expected)
    reported = xr.DataArray([[expected]], dims=("plan", "variable"), coords={"plan": ["p"], "variable": ["z"]})
    cpl.global_rms(maps, reported, {"TQS": "p"})
    with pytest.raises(AssertionError, match="differs from the reported"):
        cpl.global_rms(maps, reported * 1.01, {"TQS": "p"})


def test_physical_skill_reads_the_recorded_lead():
    recorded = {"leads": [1, 2], "rmse_normalised": {"model": [0, 0], "persistence": [0, 0]},
                "rmse_physical": {"z": {"model": [10.0, 20.0], "persistence": [30.0, 40.0]}}}
    t = cs.physical_skill(recorded, ["z"], {"z": "m"}, 2)
    assert t.loc["z"].to_dict() == {"units": "m", "model": 20.0, "persistence": 40.0}


def test_summary_lines_from_hand_made_results():
    mse, own, sizes = hand_made_errors()
    report = cpl.win_report(mse, own, sizes, 2, [3], ["block"], "variable")
    rank = cs.Ranking(boot_table([0.5, 0.1], [0.4, 0.0], [0.6, 0.2], ["inner", "input"]), "g")
    match = pd.DataFrame({"size difference %": [-0.25, 0.5]})
    lines = cpl.summary_lines("m", 1234, 5e-7, rank, match, report["float"].tables, [3], ["block"], 2, "variable",
                              {"block": 1.2}, 3.4, 56.0, True)
    assert lines[0] == "- `m`: 1,234 parameters; recorded and recomputed skill differ by at most 5.0e-07."
    assert lines[1].startswith("- Most sensitive block: `u0` (inner), g = 0.500 [0.400, 0.600]; least: `u1`")
    assert lines[2] == "- Sizes of TQS and uniform plans agree within 0.50%."
    assert "TQS wins 1, ties 1 and loses 1 of 3 variables" in lines[3]
    assert lines[-1] == "- Probe: block 1 s; evaluation rollouts 3 s; the whole notebook 56 s (SMOKE run)."
