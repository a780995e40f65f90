"""QuantSpec and granularity objects: validation, serialization, descriptions."""

import dataclasses
import json

import pytest

from ditq.errors import DitqError
from ditq.quant import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec, integer_range


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"bits": 1}, ["bits=1", "2..8", "16"]),
        ({"bits": 9}, ["bits=9", "2..8", "16"]),
        ({"bits": 32}, ["bits=32", "unquantized"]),
        ({"fmt": "nf4"}, ["fmt='nf4'", "fp8_e4m3"]),
        ({"fmt": "fp8_e4m3", "bits": 4, "symmetric": True}, ["bits=4", "bits=8", "fmt='int'"]),
        ({"fmt": "fp8_e4m3"}, ["zero point", "symmetric=True"]),
        ({"granularity": "per_tensor"}, ["not a granularity", "PerTensor()"]),
        ({"granularity": PerToken()}, ["PerToken", "dynamic=True", "PerTensor()"]),
        ({"range_method": "kl"}, ["range_method='kl'", "minmax"]),
        ({"dynamic": True, "range_method": "mse"}, ["dynamic", "range_method='minmax'"]),
        (
            {"dynamic": True, "range_method": "percentile"},
            ["live tensor", "dynamic=False"],
        ),
        ({"percentile": 40.0}, ["percentile=40.0", "(50, 100]"]),
        ({"percentile": 100.5}, ["percentile=100.5", "99.99"]),
        ({"mse_grid": 0}, ["mse_grid=0", "at least 1"]),
        ({"mse_norm": 0.0}, ["mse_norm=0.0", "positive"]),
    ],
)
def test_invalid_spec_raises_helpful_error(kwargs, expected):
    with pytest.raises(DitqError) as info:
        QuantSpec(**kwargs)
    for text in expected:
        assert text in str(info.value)


@pytest.mark.parametrize(
    ("group_size", "expected"),
    [(0, ["group_size=0", "positive"]), (-4, ["group_size=-4"]), ("8", ["int", "PerGroup(128)"])],
)
def test_invalid_group_size_raises(group_size, expected):
    with pytest.raises(DitqError) as info:
        PerGroup(group_size)
    for text in expected:
        assert text in str(info.value)


def test_check_divides_names_layer_and_suggests_divisor():
    spec = QuantSpec(bits=4, granularity=PerGroup(256))
    spec.check_divides(1152 * 4 // 2)  # 2304 = 9 * 256: fine
    with pytest.raises(DitqError) as info:
        spec.check_divides(384, layer="blocks.0.mlp.fc1")
    message = str(info.value)
    for text in ("group size 256", "384", "blocks.0.mlp.fc1", "192", "--w-granularity channel"):
        assert text in message
    QuantSpec(granularity=PerChannel()).check_divides(383)  # not grouped: nothing to check


def test_valid_specs_and_flags():
    assert QuantSpec().enabled and QuantSpec().needs_calibration
    assert not QuantSpec(bits=16).enabled and not QuantSpec(bits=16).needs_calibration
    dynamic = QuantSpec(granularity=PerToken(), dynamic=True)
    assert dynamic.enabled and not dynamic.needs_calibration
    QuantSpec(bits=8, fmt="fp8_e4m3", symmetric=True, granularity=PerChannel())
    QuantSpec(bits=2, symmetric=True, range_method="mse", mse_grid=1)


def test_specs_are_frozen_and_hashable():
    spec = QuantSpec(bits=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.bits = 8  # type: ignore[misc]
    assert len({QuantSpec(bits=4), QuantSpec(bits=4), PerGroup(8), PerGroup(8)}) == 2


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(),
        QuantSpec(bits=16),
        QuantSpec(bits=4, granularity=PerGroup(128), range_method="mse", mse_norm=2.4),
        QuantSpec(bits=8, symmetric=True, granularity=PerChannel(), range_method="percentile"),
        QuantSpec(bits=8, granularity=PerToken(), dynamic=True),
        QuantSpec(bits=8, fmt="fp8_e4m3", symmetric=True),
    ],
)
def test_dict_round_trip_through_json(spec):
    data = json.loads(json.dumps(spec.to_dict()))
    assert QuantSpec.from_dict(data) == spec


def test_from_dict_rejects_unknown_keys_and_types():
    with pytest.raises(DitqError, match=r"unknown keys \['bitz'\]"):
        QuantSpec.from_dict({"bitz": 4})
    with pytest.raises(DitqError, match="granularity type 'per_row' is unknown"):
        QuantSpec.from_dict({"granularity": {"type": "per_row"}})
    with pytest.raises(DitqError, match="bad parameters for per_group"):
        QuantSpec.from_dict({"granularity": {"type": "per_group"}})
    assert QuantSpec.from_dict({"bits": 4}) == QuantSpec(bits=4)


@pytest.mark.parametrize(
    ("spec", "text"),
    [
        (QuantSpec(bits=4, granularity=PerGroup(128)), "int4 asym per-group(128) minmax"),
        (
            QuantSpec(bits=8, symmetric=True, granularity=PerChannel()),
            "int8 sym per-channel minmax",
        ),
        (QuantSpec(granularity=PerToken(), dynamic=True), "int8 asym per-token dynamic"),
        (QuantSpec(range_method="percentile"), "int8 asym per-tensor percentile(99.99)"),
        (QuantSpec(bits=3, range_method="mse"), "int3 asym per-tensor mse(p=2, grid=80)"),
        (QuantSpec(fmt="fp8_e4m3", symmetric=True), "fp8_e4m3 per-tensor minmax"),
        (QuantSpec(bits=16), "16-bit (not quantized)"),
    ],
)
def test_describe(spec, text):
    assert spec.describe() == text


def test_integer_range():
    assert integer_range(8, symmetric=True) == (-128, 127)
    assert integer_range(8, symmetric=False) == (0, 255)
    assert integer_range(4, symmetric=True) == (-8, 7)
    assert integer_range(2, symmetric=False) == (0, 3)


def test_granularity_descriptions():
    assert [g.describe() for g in (PerTensor(), PerChannel(), PerGroup(64), PerToken())] == [
        "per-tensor",
        "per-channel",
        "per-group(64)",
        "per-token",
    ]
