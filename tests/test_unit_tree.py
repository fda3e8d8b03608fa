"""The unit tree (tqslite.units.unit_tree): sizes, shares, honest block labels, the text and the command."""

import pytest
import torch
from torch import nn

from tqslite.adapters import BlockForecaster
from tqslite.cli import main
from tqslite.units import BlockUnits, format_unit_tree, make_units, unit_tree


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Parameter(torch.zeros(9, 64))           # directly on the head...
        self.mlp = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 9))   # ...and a deeper block


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.core = nn.Sequential(nn.Conv1d(2, 16, 5), nn.Conv1d(16, 16, 5, bias=False))
        self.head = Head()
        self.gain = nn.Parameter(torch.ones(1))


NAMES = [n for n, _ in Net().named_parameters()]
SIZES = {"gain": 1, "core.0.weight": 160, "core.0.bias": 16, "core.1.weight": 1280, "head.proj": 576,
         "head.mlp.0.weight": 4096, "head.mlp.0.bias": 64, "head.mlp.2.weight": 576, "head.mlp.2.bias": 9}
TOTAL = sum(SIZES.values())


def test_a_block_split_over_several_units_is_not_labelled_as_a_whole():
    d2 = {u.label: u.params for u in make_units(NAMES, BlockUnits(2))}
    assert d2 == {"gain": ("gain",), "core.0": ("core.0.weight", "core.0.bias"), "core.1": ("core.1.weight",),
                  "head.proj": ("head.proj",), "head.mlp": tuple(n for n in NAMES if n.startswith("head.mlp"))}
    d1 = {u.label for u in make_units(NAMES, BlockUnits(1))}
    assert d1 == {"gain", "core", "head"}   # at depth 1 the head is whole


def test_counts_shares_and_the_depths_at_which_each_node_is_a_unit():
    tree = unit_tree(Net())
    assert tree.loc["", "n_params"] == TOTAL and tree.loc["", "n_tensors"] == 9
    for name, n in SIZES.items():
        assert tree.loc[name, "n_params"] == n and tree.loc[name, "kind"] == "tensor"
    assert tree.loc["head", "n_params"] == 576 + 4096 + 64 + 576 + 9
    assert tree.loc["head.mlp.0", "type"] == "Linear" and tree.loc["core.1.weight", "type"] == "(16, 16, 5)"
    assert tree.loc["head", "share"] == pytest.approx(5321 / TOTAL)
    assert tree.attrs["max_depth"] == 3 and tree.attrs["units"] == {1: 3, 2: 5, 3: 6, "tensor": 9}
    # each block depth's units are exactly the rows marked as units at that depth, and their shares add to 1
    for d in (1, 2, 3):
        labels = {u.label for u in make_units(NAMES, BlockUnits(d))}
        rows = tree[(tree["unit_from"] > 0) & (tree["unit_from"] <= d) & (tree["unit_to"] >= d)]
        assert set(rows.index) == labels
        assert rows["share"].sum() == pytest.approx(1.0)
    assert (tree.loc["head", "unit_from"], tree.loc["head", "unit_to"]) == (1, 1)
    assert (tree.loc["head.proj", "unit_from"], tree.loc["head.proj", "unit_to"]) == (2, 3)
    assert (tree.loc["head.mlp", "unit_from"], tree.loc["head.mlp", "unit_to"]) == (2, 2)
    assert tree.loc["head.mlp.0.weight", "unit_from"] == 0
    assert list(tree.index[:5]) == ["", "gain", "core", "core.0", "core.0.weight"]   # model order, pre-order


def test_folded_at_a_depth_and_printed():
    tree = unit_tree(Net(), depth=2)
    assert set(tree.index[tree["unit"]]) == {u.label for u in make_units(NAMES, BlockUnits(2))}
    assert "head.mlp.0" not in tree.index and "core.0.weight" not in tree.index   # folded into their units
    text = format_unit_tree(tree)
    assert text.splitlines()[0] == f"Net: {TOTAL:,} parameters in 9 tensors"
    assert any(line.split()[-1] == "<" and "proj" in line for line in text.splitlines())
    assert "BlockUnits(depth=1):    3 units (head, 78.5%)" in text
    with pytest.raises(ValueError, match="depth=0"):
        unit_tree(Net(), depth=0)


def test_an_adapter_shows_the_wrapped_models_names():
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    tree = unit_tree(BlockForecaster(net, 8, 4))
    assert tree.loc["", "type"] == "Sequential" and "0.weight" in tree.index


def test_the_units_command(capsys):
    assert main(["units", "timesfm_lite", "--depth", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("TimesFMLite: ") and "blocks.0" not in out.splitlines()[0]
    assert "BlockUnits(depth=2):    7 units" in out
