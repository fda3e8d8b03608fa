"""Units of SPEC section 2: labels, depth, patterns, custom maps, and their errors."""

import pytest
import torch
from torch import nn

from tqslite.units import BlockUnits, TensorUnits, Unit, block_label, check_units, make_units, membership, units_of


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
    assert d1 == make_units(NAMES, BlockUnits(1))
    assert [u.label for u in d1] == ["pos", "embed", "blocks", "head"]  # model order
    assert dict((u.label, len(u.params)) for u in d1) == {"embed": 2, "blocks": 8, "head": 2, "pos": 1}
    d2 = {u.label: u.params for u in make_units(NAMES, BlockUnits(depth=2))}
    assert set(d2) == {"embed", "blocks.0", "blocks.1", "head", "pos"}
    assert d2["blocks.1"] == ("blocks.1.0.weight", "blocks.1.0.bias", "blocks.1.1.weight", "blocks.1.1.bias")
    assert block_label("a.b.c.weight", 5) == "a.b.c"


def test_units_partition_the_kept_parameters():
    for spec in [TensorUnits(), BlockUnits(1), BlockUnits(2), BlockUnits(3)]:
        units = make_units(NAMES, spec)
        flat = [p for u in units for p in u.params]
        assert sorted(flat) == sorted(NAMES)


def test_include_exclude_patterns():
    units = make_units(NAMES, TensorUnits(exclude=["*.bias", "blocks.*.0.*"]))
    assert [u.label for u in units] == ["pos", "embed.weight", "blocks.0.1.weight", "blocks.1.1.weight", "head.weight"]
    assert [u.label for u in make_units(NAMES, BlockUnits(include="head.*"))] == ["head"]


def test_custom_map():
    units = make_units(NAMES, {"io": ["embed.*", "head.*"], "core": ["blocks.*"]})
    assert [u.label for u in units] == ["io", "core"]
    assert len(units[0].params) == 4 and len(units[1].params) == 8
    with pytest.raises(ValueError, match="matches no parameter"):
        make_units(NAMES, {"x": ["nothing.*"]})
    with pytest.raises(ValueError, match="in two custom units"):
        make_units(NAMES, {"a": ["head.*"], "b": ["head.weight"]})


def test_empty_unit_set_and_bad_granularity():
    with pytest.raises(ValueError, match="unit set is empty"):
        make_units(NAMES, TensorUnits(exclude=["*"]))
    with pytest.raises(ValueError, match="units='layer'"):
        make_units(NAMES, "layer")
    with pytest.raises(ValueError, match="depth"):
        BlockUnits(0)
    with pytest.raises(ValueError, match="unknown parameter"):
        check_units([Unit("u", ("nope",))], NAMES)
    with pytest.raises(ValueError, match="unique"):
        check_units([Unit("u", ("pos",)), Unit("u", ("head.weight",))], NAMES)


def test_units_travel_through_a_dataset_and_netcdf(tmp_path):
    import xarray as xr
    units = make_units(NAMES, BlockUnits(2))
    ds = xr.Dataset({"gamma": ("unit", range(len(units)))}, coords={"unit": [u.label for u in units]})
    ds = ds.merge(membership(units))
    assert units_of(ds) == units
    ds.to_netcdf(tmp_path / "u.nc")
    assert units_of(xr.load_dataset(tmp_path / "u.nc")) == units
    assert units_of(ds.isel(unit=[2, 0])) == [units[2], units[0]]
