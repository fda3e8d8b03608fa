"""One definition of a win: paired bootstrap ratio of errors, Holm's adjustment, counts that say n."""

import numpy as np
import pytest
import xarray as xr

from tqslite import wins as W


def errors(n=40, seed=0):
    return np.random.default_rng(seed).uniform(0.5, 2.0, n)


def test_identical_errors_are_exactly_a_tie():
    a = errors()
    cell = W.compare(a, a.copy())
    assert cell == W.Cell(1.0, 1.0, 1.0, 1.0, "tie")


def test_known_ratios_win_and_lose_with_every_resample_on_one_side():
    a = errors()
    win = W.compare(a, 4 * a, n_resamples=999)        # RMSE ratio sqrt(1/4) in every resample
    assert (win.ratio, win.lo, win.hi, win.outcome) == (pytest.approx(0.5), pytest.approx(0.5), pytest.approx(0.5),
                                                        "win")
    assert win.p == pytest.approx(2 / 1000)            # (0 + 1) / (B + 1), two-sided
    loss = W.compare(4 * a, a, n_resamples=999)
    assert loss.outcome == "loss" and loss.lo == pytest.approx(2.0)


def test_a_noisy_difference_is_a_tie_and_its_p_value_is_large():
    a = errors()
    b = a * np.random.default_rng(1).uniform(0.7, 1.3, a.size)
    cell = W.compare(a, b)
    assert cell.lo < 1 < cell.hi and cell.outcome == "tie" and cell.p > 0.05


def test_pairing_matters_when_windows_differ_more_than_methods():
    # window errors span two orders of magnitude, A is 10 % better in every window (up to noise):
    # paired, the interval is tight below 1; resampling A and B apart would straddle 1
    rng = np.random.default_rng(2)
    base = np.exp(rng.normal(0, 1.5, 60))
    a, b = 0.81 * base * rng.uniform(0.95, 1.05, 60), base
    cell = W.compare(a, b)
    assert cell.outcome == "win" and cell.hi < 0.95
    boot = [np.sqrt(a[rng.integers(0, 60, 60)].mean() / b[rng.integers(0, 60, 60)].mean()) for _ in range(2000)]
    assert np.quantile(boot, 0.975) > 1  # the unpaired interval would have called it a tie


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="same windows"):
        W.compare([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="finite"):
        W.compare([1.0, np.inf], [1.0, 2.0])


def test_holm_on_known_p_values():
    # Holm (1979) by hand: sorted 0.005, 0.01, 0.03, 0.04 with m = 4 -> 0.02, 0.03, 0.06, 0.06
    reject, adj = W.holm([0.01, 0.04, 0.03, 0.005], alpha=0.05)
    np.testing.assert_allclose(adj, [0.03, 0.06, 0.06, 0.02])
    assert reject.tolist() == [True, False, False, True]
    # step-down stops at the first failure even if a later raw p-value would pass its own threshold
    reject, _ = W.holm([0.001, 0.03, 0.026], alpha=0.05)   # 0.003, then 0.026 * 2 = 0.052 > 0.05
    assert reject.tolist() == [True, False, False]
    reject, adj = W.holm([np.nan, 0.01], alpha=0.05)        # NaN is not in the family: m = 1
    assert reject.tolist() == [False, True] and np.isnan(adj[0]) and adj[1] == pytest.approx(0.01)


def table_inputs():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 2.0, size=(2, 40, 3))  # (budget, window, variable)
    coords = {"budget": ["3b", "4b"], "variable": ["x", "y", "z"]}
    a = xr.DataArray(base, dims=("budget", "window", "variable"), coords=coords)
    return a


def test_win_table_counts_every_comparison_and_says_how_many():
    a = table_inputs()
    b = a * 4
    b.loc[dict(variable="z")] = a.sel(variable="z")  # z: the same errors, a tie
    table = W.win_table(a, b, "variable", n_resamples=999)
    assert table["outcome"].dims == ("budget", "variable")
    assert (table["outcome"].sel(variable=["x", "y"]) == "win").all()
    assert (table["outcome"].sel(variable="z") == "tie").all()
    counts = W.tally(table)
    assert {k: int(counts[k]) for k in ("n", "win", "tie", "loss", "holm_win")} == dict(n=6, win=4, tie=2, loss=0,
                                                                                         holm_win=4)
    per_budget = W.tally(table, by="budget")
    assert per_budget["n"].values.tolist() == [3, 3]
    assert W.describe(counts).startswith("4 wins, 2 ties, 0 losses of 6 comparisons")


def test_holm_removes_marginal_wins():
    # one strong win and many marginal ones: unadjusted they are wins, after Holm only the strong one
    rng = np.random.default_rng(3)
    base = rng.uniform(0.5, 2.0, size=(12, 50))
    a = xr.DataArray(base, dims=("cell", "window"))
    b = a * rng.uniform(0.6, 1.6, size=(12, 50))    # A about 10 % better, noisily
    b[0] = a[0] * 5                                  # cell 0: A far better
    table = W.win_table(a, b, "all", n_resamples=1999)
    counts = W.tally(table)
    assert int(counts["win"]) > int(counts["holm_win"]) >= 1
    assert table["outcome"].sel(cell=0).item() == "win"
    p = np.sort(table["p"].values.ravel())           # Holm by hand: reject while p_(j) <= alpha / (m - j + 1)
    m = len(p)
    passed = np.cumprod(p <= 0.05 / (m - np.arange(m))).sum()
    assert int(counts["holm_win"]) == passed


def test_stations_are_cells_of_their_own_and_sizes_must_match():
    a = table_inputs().isel(variable=0, drop=True).assign_coords(station=("window", np.repeat(["S1", "S2"], 20)))
    b = a * 4
    b[:, 20:] = a[:, 20:]                         # station S2: identical errors
    table = W.win_table(a, b, "station", n_resamples=999)
    assert table["outcome"].dims == ("budget", "station")
    assert table["outcome"].sel(station="S1").values.tolist() == ["win", "win"]
    assert table["outcome"].sel(station="S2").values.tolist() == ["tie", "tie"]
    sizes = xr.DataArray([3.0, 4.0], dims="budget", coords={"budget": ["3b", "4b"]})
    unmatched = W.win_table(a, b, "station", size_a=sizes, size_b=sizes * xr.DataArray([1.005, 1.02], dims="budget",
                                                                                      coords={"budget": ["3b", "4b"]}),
                            n_resamples=999)
    assert unmatched["outcome"].sel(budget="3b").values.tolist() == ["win", "tie"]        # 0.5 % apart: matched
    assert (unmatched["outcome"].sel(budget="4b") == "unmatched").all()                   # 2 % apart: not counted
    assert int(W.tally(unmatched)["unmatched"]) == 2 and int(W.tally(unmatched)["n"]) == 2


def test_unusable_cells_are_reported_apart():
    a = table_inputs()
    usable = xr.DataArray([True, False], dims="budget", coords={"budget": ["3b", "4b"]})
    table = W.win_table(a, a * 4, "variable", usable=usable, n_resamples=999)
    assert (table["outcome"].sel(budget="4b") == "unusable").all()
    assert np.allclose(table["ratio"].sel(budget="4b"), 0.5)   # still computed, just not counted
    counts = W.tally(table)
    assert (int(counts["n"]), int(counts["win"]), int(counts["unusable"])) == (3, 3, 3)
    assert "not counted: 3 unusable" in W.describe(counts)


def test_won_tied_lost_counts_only_the_three_outcomes():
    assert W.won_tied_lost({"win": 3, "tie": 1, "loss": 2, "unusable": 7}) == "3 won, 1 tied, 2 lost of 6"
