"""The command line, file to file, on the smallest shipped model."""

import json

import pytest
import xarray as xr

from tqslite.cli import main


def test_probe_allocate_quantize_evaluate_pareto(tmp_path, capsys):
    s, plan, q, e, f = (tmp_path / n for n in ("s.nc", "plan.json", "q.pt", "e.nc", "f.nc"))
    assert main(["probe", "timesfm_lite", "--horizon", "3", "--windows", "4", "--quiet", "--out", str(s)]) == 0
    scores = xr.load_dataset(s)
    assert scores.attrs["model"] == "timesfm_lite" and scores.sizes["lead"] == 3
    assert main(["allocate", str(s), "timesfm_lite", "--budget-bits", "4", "--out", str(plan)]) == 0
    assert json.loads(plan.read_text())["bits_per_param"] <= 4
    assert main(["quantize", "timesfm_lite", str(plan), "--out", str(q)]) == 0 and q.stat().st_size > 0
    assert main(["evaluate", "timesfm_lite", str(plan), "--uniform", "4", "--horizon", "3", "--windows", "4",
                 "--out", str(e)]) == 0
    errors = xr.load_dataset(e)
    assert errors["plan"].values.tolist() == ["float", "plan", "rtn4"]
    assert float(errors["rmse_vs_float"].sel(plan="float").max()) == 0
    assert main(["pareto", str(s), "timesfm_lite", "--budgets", "3,4", "--out", str(f)]) == 0
    assert xr.load_dataset(f).sizes["budget"] == 2


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
