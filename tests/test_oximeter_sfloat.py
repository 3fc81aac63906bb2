"""IEEE 11073 SFLOAT: golden codes, every 16-bit code round-tripped, float precision."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicegw.errors import ProtocolError
from drivers.oximeter.sfloat import (
    SFLOAT_NAN,
    SFLOAT_NEG_INF,
    SFLOAT_POS_INF,
    SFloatSpecial,
    decode_sfloat,
    encode_sfloat,
    sfloat_special,
    split_sfloat,
)

_DATA = tomllib.loads((Path(__file__).parent / "data" / "oximeter" / "sfloat.toml").read_text())
DECODE: list[dict[str, Any]] = _DATA["decode"]
ENCODE: list[dict[str, Any]] = _DATA["encode"]
MAX_VALUE = 2045e7


@pytest.mark.parametrize("vector", DECODE, ids=[v["name"] for v in DECODE])
def test_decode_golden(vector: dict[str, Any]) -> None:
    code = vector["code"]
    if "special" in vector:
        assert decode_sfloat(code) is None
        assert sfloat_special(code) is SFloatSpecial[vector["special"]]
    else:
        assert decode_sfloat(code) == vector["value"]
        assert sfloat_special(code) is None


@pytest.mark.parametrize(
    "vector", [v for v in DECODE if v.get("canonical")], ids=lambda v: v["name"]
)
def test_encode_gives_canonical_code(vector: dict[str, Any]) -> None:
    assert encode_sfloat(vector["value"]) == vector["code"]


@pytest.mark.parametrize("vector", ENCODE, ids=[v["name"] for v in ENCODE])
def test_encode_golden(vector: dict[str, Any]) -> None:
    code = encode_sfloat(vector["value"])
    assert code == vector["code"], hex(code)
    assert decode_sfloat(code) == vector["decodes_to"]


def test_exponent_and_mantissa_are_sign_extended() -> None:
    assert split_sfloat(0xF3CF) == (975, -1)
    assert split_sfloat(0x0803) == (-2045, 0)
    assert split_sfloat(0x7FFF) == (-1, 7)
    assert split_sfloat(0x8001) == (1, -8)


@pytest.mark.parametrize("raw", [-1, 0x10000])
def test_split_rejects_non_16_bit(raw: int) -> None:
    with pytest.raises(ProtocolError):
        split_sfloat(raw)


def test_integer_input_is_accepted() -> None:
    assert encode_sfloat(98) == encode_sfloat(98.0) == 0x0062


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (None, SFLOAT_NAN),
        (math.nan, SFLOAT_NAN),
        (math.inf, SFLOAT_POS_INF),
        (-math.inf, SFLOAT_NEG_INF),
    ],
)
def test_no_value_encodes_to_special_codes(value: float | None, code: int) -> None:
    assert encode_sfloat(value) == code
    assert decode_sfloat(code) is None


@pytest.mark.parametrize("value", [2.0455e10, -2.1e10, 1e30])
def test_out_of_range_is_refused(value: float) -> None:
    with pytest.raises(ProtocolError, match="out of SFLOAT range"):
        encode_sfloat(value)


def test_tiny_values_round_to_zero() -> None:
    assert encode_sfloat(1e-12) == 0x0000
    assert encode_sfloat(-0.0) == 0x0000


def test_every_code_round_trips_or_is_no_value() -> None:
    """All 65,536 codes: a number re-encodes to a code with the same value; the rest are None."""
    specials = 0
    for raw in range(0x10000):
        value = decode_sfloat(raw)
        if value is None:
            specials += 1
            assert sfloat_special(raw) is not None
            continue
        again = encode_sfloat(value)
        assert decode_sfloat(again) == value, hex(raw)
        if split_sfloat(raw)[1] == 0:
            assert again == raw  # exponent-0 codes are already canonical
    assert specials == 5 * 16  # five special mantissas under every exponent


@settings(max_examples=200)
@given(st.floats(min_value=-MAX_VALUE, max_value=MAX_VALUE, allow_nan=False))
def test_float_round_trip_within_precision(value: float) -> None:
    decoded = decode_sfloat(encode_sfloat(value))
    assert decoded is not None
    # 4 significant digits (mantissa >= ~205 once rounding is needed), 1e-8 resolution.
    assert abs(decoded - value) <= max(abs(value) * 0.0025, 0.5e-8) * (1 + 1e-9)


@settings(max_examples=200)
@given(st.integers(-2045, 2045), st.integers(-8, 7))
def test_exactly_representable_values_are_exact(mantissa: int, exponent: int) -> None:
    value = mantissa * 10**exponent if exponent >= 0 else mantissa / 10**-exponent
    assert decode_sfloat(encode_sfloat(value)) == value
