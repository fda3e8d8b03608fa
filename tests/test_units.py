"""Units of SPEC section 2: labels, depth, patterns, custom maps, and their errors."""

import pytest
import torch
from torch import nn

from tqslite.units import Unit, block_label, check_units, make_units


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)) for _ in range(2)])
        self.head = nn.Linear(8, 4)
        self.pos = nn.Parameter(torch.randn(1, 8))  # sits on the root module


NAMES = [n for n, _ in Net().named_parameters()]


def test_tensor_units_are_every_named_parameter_including_1d():
    units = make_units(NAMES)
    assert [u.label for u in units] == NAMES
    assert "blocks.0.0.weight" in NAMES and "embed.bias" in NAMES  # norm gains and biases are units
    assert all(u.params == (u.label,) for u in units)


def test_block_units_by_depth_and_root_parameters():
    d1 = make_units(NAMES, "block")
    assert [u.label for u in d1] == ["pos", "embed", "blocks", "head"]  # model order
    assert dict((u.label, len(u.params)) for u in d1) == {"embed": 2, "blocks": 8, "head": 2, "pos": 1}
    d2 = {u.label: u.params for u in make_units(NAMES, "block", depth=2)}
    assert set(d2) == {"embed", "blocks.0", "blocks.1", "head", "pos"}
    assert d2["blocks.1"] == ("blocks.1.0.weight", "blocks.1.0.bias", "blocks.1.1.weight", "blocks.1.1.bias")
    assert block_label("a.b.c.weight", 5) == "a.b.c"


def test_units_partition_the_kept_parameters():
    for gran, depth in [("tensor", 1), ("block", 1), ("block", 2), ("block", 3)]:
        units = make_units(NAMES, gran, depth)
        flat = [p for u in units for p in u.params]
        assert sorted(flat) == sorted(NAMES)


def test_include_exclude_patterns():
    units = make_units(NAMES, exclude=["*.bias", "blocks.*.0.*"])
    assert [u.label for u in units] == ["pos", "embed.weight", "blocks.0.1.weight", "blocks.1.1.weight", "head.weight"]
    assert [u.label for u in make_units(NAMES, "block", include=["head.*"])] == ["head"]


def test_custom_map():
    units = make_units(NAMES, custom={"io": ["embed.*", "head.*"], "core": ["blocks.*"]})
    assert [u.label for u in units] == ["io", "core"]
    assert len(units[0].params) == 4 and len(units[1].params) == 8
    with pytest.raises(ValueError, match="matches no parameter"):
        make_units(NAMES, custom={"x": ["nothing.*"]})
    with pytest.raises(ValueError, match="in two custom units"):
        make_units(NAMES, custom={"a": ["head.*"], "b": ["head.weight"]})


def test_empty_unit_set_and_bad_granularity():
    with pytest.raises(ValueError, match="unit set is empty"):
        make_units(NAMES, exclude=["*"])
    with pytest.raises(ValueError, match="granularity"):
        make_units(NAMES, "layer")
    with pytest.raises(ValueError, match="unknown parameter"):
        check_units([Unit("u", ("nope",))], NAMES)
    with pytest.raises(ValueError, match="unique"):
        check_units([Unit("u", ("pos",)), Unit("u", ("head.weight",))], NAMES)
