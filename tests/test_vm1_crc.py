"""CRC-16/CCITT-FALSE: the ICD's check value, known vectors and a bitwise reference.

Production uses ``binascii.crc_hqx``; the reference here is the ICD's definition
(polynomial 0x1021, initial 0xFFFF, no reflection, no final XOR) bit by bit.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.vm1.crc import CRC16_INIT, crc16_ccitt_false


def test_icd_check_value() -> None:
    assert crc16_ccitt_false(b"123456789") == 0x29B1


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", 0xFFFF),  # no data: the initial value, no final XOR
        (b"\x00", 0xE1F0),
        (b"A", 0xB915),
        (bytes.fromhex("8100000000 00"), 0x9F90),  # ICD GET_INFO vector, CRC sent as 90 9f
    ],
)
def test_known_values(data: bytes, expected: int) -> None:
    assert crc16_ccitt_false(data) == expected


def test_default_initial_value() -> None:
    assert CRC16_INIT == 0xFFFF
    assert crc16_ccitt_false(b"xyz") == crc16_ccitt_false(b"xyz", 0xFFFF)


def test_accepts_bytearray_and_memoryview() -> None:
    data = b"123456789"
    assert crc16_ccitt_false(bytearray(data)) == 0x29B1
    assert crc16_ccitt_false(memoryview(data)) == 0x29B1


def reference_crc(data: bytes, crc: int = 0xFFFF) -> int:
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


@given(st.binary(max_size=128))
def test_matches_the_bitwise_reference(data: bytes) -> None:
    assert crc16_ccitt_false(data) == reference_crc(data)


@given(st.binary(max_size=64), st.binary(max_size=64))
def test_incremental_equals_one_shot(a: bytes, b: bytes) -> None:
    assert crc16_ccitt_false(b, crc16_ccitt_false(a)) == crc16_ccitt_false(a + b)


@given(st.binary(min_size=1, max_size=66), st.data())
def test_detects_every_single_bit_error(data: bytes, draw: st.DataObject) -> None:
    bit = draw.draw(st.integers(0, len(data) * 8 - 1))
    flipped = bytearray(data)
    flipped[bit // 8] ^= 1 << (bit % 8)
    assert crc16_ccitt_false(bytes(flipped)) != crc16_ccitt_false(data)
