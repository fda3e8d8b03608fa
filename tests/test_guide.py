"""The guide (book/guide.md) runs as printed: its Python blocks, in order, in one namespace."""

import re
from pathlib import Path

import numpy as np
import torch
import xarray as xr

import tqslite

GUIDE = Path(__file__).resolve().parents[1] / "book" / "guide.md"


def test_the_python_blocks_of_the_guide_run(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the guide writes scores.nc and plan.json where it runs
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)
    assert len(blocks) >= 6, "the guide shows the main calls in Python"
    namespace = {}
    for code in blocks:
        exec(compile(code, str(GUIDE), "exec"), namespace)
    ns = namespace
    assert tuple(ns["trajectory"].shape) == (10, 32, 8)                 # "(10, 32, 8)"
    assert ns["days"].shape == (2, 18)                                   # "(2, 18)"
    assert "stored bits per parameter" in capsys.readouterr().out
    # what it wrote reads back as what it had
    saved = xr.load_dataset(tmp_path / "scores.nc")
    np.testing.assert_array_equal(saved["gamma"].values, ns["scores"]["gamma"].values)
    assert tqslite.Plan.load(tmp_path / "plan.json") == ns["plan"]
    assert ns["size"].bits_per_param <= 4.0                              # budget_bits=4.0
    # quantize and apply_plan make copies: the model keeps its weights, the copies do not
    model = ns["model"]
    for copy in (ns["qm"].model, ns["small"]):
        assert copy is not model
        assert any(not torch.equal(a, b) for a, b in zip(copy.state_dict().values(), model.state_dict().values()))
    assert float(ns["errors"]["rmse_vs_float"].sel(plan="float").max()) == 0


def test_the_guide_is_linked_from_the_api_page_the_readme_and_the_toc():
    book = GUIDE.parent
    assert "(guide.md)" in (book / "api.md").read_text()
    assert "book/guide.md" in (book.parent / "README.md").read_text()
    toc = (book / "_toc.yml").read_text()
    assert toc.index("file: guide") < toc.index("file: api")
