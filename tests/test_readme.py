"""The README's code runs as printed, and does what its comments say: a newcomer's first contact."""

import re
import shutil
from pathlib import Path

import torch

import tqslite

README = Path(__file__).resolve().parents[1] / "README.md"


def state(model) -> dict:
    module = model if isinstance(model, torch.nn.Module) else tqslite.systems.as_system(model).module
    return {n: t.detach().clone() for n, t in module.state_dict().items()}


def test_the_python_blocks_of_the_readme_run_and_do_what_they_say():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 6, "the checks below follow the README's six Python blocks"
    spaces = []
    for code in blocks:
        spaces.append({})
        exec(compile(code, str(README), "exec"), spaces[-1])
    ten_lines, recommended, options, adapter, deployment, cluster = spaces

    # "budget_bits=4.0", "a quantized copy", "every stored bit counted"
    ns = ten_lines
    size = tqslite.plan_size(ns["plan"], ns["model"])
    assert 3.0 < size.bits_per_param <= 4.0
    assert ns["small"] is not ns["model"]
    changed = [n for n, t in state(ns["small"]).items() if not torch.equal(t, state(ns["model"])[n])]
    assert changed, "the quantized copy has other weights than the model"
    assert {c.label for c in ns["uniform"].values()} <= {"int4/group32", "float16", "float"}

    # the recommended pipeline: "within the budget"
    ns = recommended
    assert tqslite.plan_size(ns["result"].plan, ns["model"]).bits_per_param <= 4.0

    # the dask cluster: the same scores as one process
    ns = cluster
    alone = tqslite.probe(ns["model"], ns["x0"], horizon=20, progress=False)
    assert (ns["scores"]["gamma"].values == alone["gamma"].values).all()

    # "drop a width", "add one", "integer formats only"
    ns = options
    bits = lambda opts: {o.bits for o in opts if isinstance(o, tqslite.Int)}
    assert bits(ns["no_2_bits"]) == {3, 4, 5, 6, 8} and bits(ns["with_7_bits"]) == {2, 3, 4, 5, 6, 7, 8}
    assert all(isinstance(o, tqslite.Int) for o in ns["grouped"])

    # "half its size"; the adapter's own model is untouched
    ns = adapter
    bytes_ = tqslite.plan_size(ns["plan"], ns["system"]).stored_bits / 8
    assert bytes_ <= tqslite.budget_of(ns["vendor"]) / 2
    assert isinstance(ns["small"], tqslite.BlockForecaster) and ns["small"].model is not ns["system"].model

    # "weights bit-identical to qm.model's", "onnxruntime runs it"
    ns = deployment
    want, got = state(ns["qm"].model), state(ns["back"].model)
    assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want)
    assert Path(ns["ckpt"]).stat().st_size < Path(ns["graph"]).stat().st_size  # as the README says after it
    shutil.rmtree(ns["folder"])
