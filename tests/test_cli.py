"""The command line, file to file, on the smallest shipped model."""

import pytest
import xarray as xr

from tqslite import Int, PerGroup, Plan, plan_size, uniform_plan
from tqslite.cli import main
from tqslite.models import load


def test_probe_allocate_quantize_evaluate_pareto(tmp_path, capsys):
    s, plan, q, e, f = (tmp_path / n for n in ("s.nc", "plan.json", "q.pt", "e.nc", "f.nc"))
    assert main(["probe", "timesfm_lite", "--horizon", "3", "--windows", "4", "--quiet", "--out", str(s)]) == 0
    scores = xr.load_dataset(s)
    assert scores.attrs["model"] == "timesfm_lite" and scores.sizes["lead"] == 3
    assert main(["allocate", str(s), "timesfm_lite", "--budget-bits", "4", "--out", str(plan)]) == 0
    system, _ = load("timesfm_lite")
    assert plan_size(Plan.load(plan), system).bits_per_param <= 4
    assert "stored bits/parameter" in capsys.readouterr().out
    assert main(["quantize", "timesfm_lite", str(plan), "--out", str(q)]) == 0 and q.stat().st_size > 0
    assert main(["evaluate", "timesfm_lite", str(plan), "--uniform", "4", "--horizon", "3", "--windows", "4",
                 "--out", str(e)]) == 0
    errors = xr.load_dataset(e)
    assert errors["plan"].values.tolist() == ["float", "plan", "uniform4"]
    assert float(errors["rmse_vs_float"].sel(plan="float").max()) == 0
    assert main(["pareto", str(s), "timesfm_lite", "--budgets", "3,4", "--out", str(f)]) == 0
    assert xr.load_dataset(f).sizes["budget"] == 2


def test_uniform_plans_need_no_probe_and_gptq_calibrates_on_training_states(tmp_path, capsys):
    u = tmp_path / "u.json"
    assert main(["uniform", "timesfm_lite", "--bits", "3", "--group-size", "16", "--out", str(u)]) == 0
    plan = Plan.load(u)
    system, _ = load("timesfm_lite")
    assert set(c.label for c in plan.values()) == {"int3/group16"}
    assert plan == uniform_plan(system, Int(3, PerGroup(16)))
    e = tmp_path / "e.nc"
    assert main(["evaluate", "timesfm_lite", str(u), "--quantizer", "gptq", "--horizon", "2", "--windows", "4",
                 "--out", str(e)]) == 0
    gptq = xr.load_dataset(e)
    assert main(["evaluate", "timesfm_lite", str(u), "--horizon", "2", "--windows", "4", "--out", str(e)]) == 0
    rtn = xr.load_dataset(e)
    assert gptq.attrs["quantizer"] == "gptq" and rtn.attrs["quantizer"] == "rtn"
    # the same plan, another quantizer: another model (GPTQ's weights are not RTN's)
    assert float(abs(gptq["rmse_vs_float"] - rtn["rmse_vs_float"]).sel(plan="u").max()) > 0


def test_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    s = tmp_path / "s.nc"
    assert main(["probe", "timesfm_lite", "--horizon", "2", "--windows", "2", "--quiet", "--out", str(s)]) == 0
    before = s.read_bytes()
    out = tmp_path / "p.json"
    assert main(["allocate", str(s), "timesfm_lite", "--budget-bits", "0.5", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "smallest feasible budget" in err and not out.exists()
    assert main(["probe", "nosuch", "--out", str(s)]) == 1
    assert "unknown model 'nosuch'" in capsys.readouterr().err and s.read_bytes() == before
    with pytest.raises(SystemExit) as e:
        main(["probe", "timesfm_lite", "--horizon", "x", "--out", str(s)])
    assert e.value.code == 2 and "invalid int value" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["allocate", str(tmp_path / "missing.nc"), "timesfm_lite", "--budget-bits", "4", "--out", str(out)])
    assert "no such file" in capsys.readouterr().err
