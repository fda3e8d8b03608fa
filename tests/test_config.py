"""The configuration vocabulary (SPEC section 4): validation, labels, resolution per tensor, sizes."""

import pytest
import torch

from tqslite.config import (DEFAULT_OPTIONS, Float16, Int, KeepFloat, PerChannel, PerGroup, PerTensor, as_config,
                            int_options, parse)

CONFIGS = [Int(4), Int(3, PerGroup(32)), Int(2, PerTensor(), symmetric=False), Int(1, symmetric=False),
           Int(8, PerChannel(1)), Int(5, PerGroup(16, axis=1), symmetric=False), Float16(), KeepFloat()]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label)
def test_labels_parse_back_to_the_same_configuration(config):
    assert parse(config.label) == config
    assert as_config(config.label) == config


def test_labels_read_as_a_reader_expects():
    assert Int(4).label == "int4/channel"
    assert Int(3, PerGroup(32)).label == "int3/group32"
    assert Int(8, PerTensor(), symmetric=False).label == "int8/tensor/asym"
    assert Int(4, PerChannel(1)).label == "int4/channel@1"
    assert (Float16().label, KeepFloat().label) == ("fp16", "float")


def test_int_shorthands():
    assert as_config(4) == Int(4, PerChannel(), True)
    assert as_config(16) == Float16() and as_config(32) == KeepFloat()
    assert [c.label for c in DEFAULT_OPTIONS] == ["int2/channel", "int3/channel", "int4/channel", "int5/channel",
                                                  "int6/channel", "int8/channel", "fp16", "float"]
    assert [c.label for c in int_options((2, 4), PerGroup(8), floats=False)] == ["int2/group8", "int4/group8"]


@pytest.mark.parametrize("bad", [0, 9, 2.5, True, "4"])
def test_bad_bit_widths_are_refused(bad):
    with pytest.raises(ValueError, match="bits="):
        Int(bad)


def test_one_bit_is_asymmetric_only_and_other_bad_values():
    with pytest.raises(ValueError, match="asymmetric"):
        Int(1)
    with pytest.raises(ValueError, match="group_size"):
        PerGroup(0)
    with pytest.raises(ValueError, match="axis"):
        PerChannel(1.5)
    with pytest.raises(ValueError, match="granularity"):
        Int(4, "channel")
    with pytest.raises(ValueError, match="not a configuration label"):
        parse("int4/row")
    with pytest.raises(ValueError, match="not a configuration"):
        as_config(4.0)


def test_codes_range():
    assert (Int(4).qmin, Int(4).qmax) == (-7, 7)
    assert (Int(4, symmetric=False).qmin, Int(4, symmetric=False).qmax) == (0, 15)
    assert (Int(2).qmin, Int(2).qmax) == (-1, 1)


def test_configurations_are_frozen_values():
    with pytest.raises(Exception):
        Int(4).bits = 3
    assert len({Int(4), Int(4), Int(4, PerGroup(32))}) == 2


def test_resolution_per_tensor():
    g = Int(4, PerGroup(32))
    assert g.resolve((64, 64), 0).granularity == PerGroup(32, 0)
    assert g.resolve((64, 25), 0).granularity == PerChannel(0)  # 25 taps: one scale per channel
    with pytest.raises(ValueError, match="does not divide the 25 elements"):
        g.resolve((64, 25), 0, strict=True)
    assert g.resolve((64,), 0).granularity == PerGroup(32, 0)  # a 1-D tensor is one channel
    assert g.resolve((7,), 0).granularity == PerTensor()
    assert Int(4).resolve((10,), 0).granularity == PerTensor()
    assert Int(4).resolve((), 0).granularity == PerTensor()
    assert Int(4).resolve((8, 3, 5, 5), 1).granularity == PerChannel(1)  # the model's axis when left open
    assert Int(4, PerChannel(-1)).resolve((8, 3), 0).granularity == PerChannel(1)  # an explicit axis wins


@pytest.mark.parametrize("config,shape,expected", [
    (Int(4), (16, 24), 16 * 24 * 4 + 16 * 16),
    (Int(3, PerGroup(8)), (16, 24), 16 * 24 * 3 + 16 * 48),
    (Int(2, PerTensor(), symmetric=False), (16, 24), 16 * 24 * 2 + 16 + 2),
    (Int(4, symmetric=False), (16, 24), 16 * 24 * 4 + (16 + 4) * 16),
    (Int(4, PerGroup(32)), (64, 25), 64 * 25 * 4 + 16 * 64),
    (Float16(), (10, 10), 1600),
    (KeepFloat(), (10, 10), 3200),
], ids=lambda x: getattr(x, "label", None) or str(x))
def test_storage_bits_by_hand(config, shape, expected):
    assert config.storage_bits(shape, 0) == expected


def test_kept_float_counts_the_dtype():
    assert KeepFloat().storage_bits((10,), 0, torch.float64) == 640
    assert KeepFloat().storage_bits((10,), 0, torch.bfloat16) == 160
