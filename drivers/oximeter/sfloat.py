"""IEEE 11073-20601 SFLOAT: the 16-bit medical float the Bluetooth PLX service uses.

Layout: bits 15-12 a signed 4-bit exponent (base 10), bits 11-0 a signed
12-bit mantissa; value = mantissa * 10**exponent. Little-endian on the wire.

Special values. The standard defines five codes, all with exponent 0:
NaN 0x07FF, NRes (not at this resolution) 0x0800, +INF 0x07FE, -INF 0x0802
and reserved 0x0801. They all decode to ``None`` ("no value"), never to a
number. Choice where sources differ: some decoders test the whole 16-bit
code, others only the mantissa. We treat a special mantissa (0x7FE, 0x7FF,
0x800, 0x801, 0x802) as "no value" *whatever the exponent*: a device that
puts a stray exponent on NaN must not turn into "204.7 bpm". The cost is that
the five mantissas are never numbers, which the encoder respects: legal
mantissas are -2045..2045.

Encoding picks the exponent that represents the value exactly, preferring
exponent 0, then finer resolutions (-1 ... -8), then coarser ones (1 ... 7)
for large values: 98 -> 0x0062, 97.5 -> 0xF3CF (975 x 10^-1). A value with
no exact representation is rounded (half to even) at the finest exponent
whose mantissa fits.
"""

from __future__ import annotations

import math
from decimal import ROUND_HALF_EVEN, Decimal
from enum import IntEnum

from drivers.errors import ProtocolError

__all__ = [
    "MANTISSA_MAX",
    "SFLOAT_NAN",
    "SFLOAT_NEG_INF",
    "SFLOAT_NRES",
    "SFLOAT_POS_INF",
    "SFLOAT_RESERVED",
    "SFloatSpecial",
    "decode_sfloat",
    "encode_sfloat",
    "sfloat_special",
    "split_sfloat",
]


class SFloatSpecial(IntEnum):
    """The reserved codes (exponent 0); value = the 16-bit code."""

    POS_INF = 0x07FE
    NAN = 0x07FF
    NRES = 0x0800
    RESERVED = 0x0801
    NEG_INF = 0x0802


SFLOAT_NAN = SFloatSpecial.NAN.value
SFLOAT_NRES = SFloatSpecial.NRES.value
SFLOAT_POS_INF = SFloatSpecial.POS_INF.value
SFLOAT_NEG_INF = SFloatSpecial.NEG_INF.value
SFLOAT_RESERVED = SFloatSpecial.RESERVED.value

MANTISSA_MAX = 2045  # 2046/2047 and -2048..-2046 are the special codes
_EXP_MIN, _EXP_MAX = -8, 7
# Exact-representation search order: integers first, then finer, then coarser.
_EXACT_ORDER = (0, -1, -2, -3, -4, -5, -6, -7, -8, 1, 2, 3, 4, 5, 6, 7)


def split_sfloat(raw: int) -> tuple[int, int]:
    """``(mantissa, exponent)`` of a 16-bit code, both sign-extended."""
    if not 0 <= raw <= 0xFFFF:
        raise ProtocolError(f"SFLOAT code {raw!r} is not a 16-bit value")
    mantissa = raw & 0x0FFF
    if mantissa >= 0x0800:
        mantissa -= 0x1000
    exponent = raw >> 12
    if exponent >= 0x8:
        exponent -= 0x10
    return mantissa, exponent


def sfloat_special(raw: int) -> SFloatSpecial | None:
    """Which special value ``raw`` is (by mantissa, any exponent), or None for a number."""
    code = raw & 0x0FFF
    try:
        return SFloatSpecial(code)
    except ValueError:
        return None


def decode_sfloat(raw: int) -> float | None:
    """Value of a 16-bit SFLOAT code; ``None`` for NaN, NRes, +/-INF and reserved."""
    mantissa, exponent = split_sfloat(raw)
    if sfloat_special(raw) is not None:
        return None
    if exponent >= 0:
        return float(mantissa * 10**exponent)
    # Dividing by an exact power of ten rounds once: 975 / 10 == 97.5 exactly,
    # whereas 975 * 0.1 == 97.50000000000001.
    return mantissa / float(10**-exponent)


def encode_sfloat(value: float | None) -> int:
    """16-bit SFLOAT code for ``value``; None and float NaN -> NaN, +/-inf -> +/-INF.

    Raises ProtocolError if ``|value|`` exceeds 2045e7, the largest SFLOAT.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return SFLOAT_NAN
    if math.isinf(value):
        return SFLOAT_POS_INF if value > 0 else SFLOAT_NEG_INF
    # repr() is the shortest string that round-trips, so 97.5 stays 97.5 here.
    dec = Decimal(value) if isinstance(value, int) else Decimal(repr(value))
    if dec == 0:
        return 0x0000
    for exponent in _EXACT_ORDER:
        mantissa = dec.scaleb(-exponent)
        if mantissa == mantissa.to_integral_value() and abs(mantissa) <= MANTISSA_MAX:
            return _pack(int(mantissa), exponent)
    for exponent in range(_EXP_MIN, _EXP_MAX + 1):
        rounded = int(dec.scaleb(-exponent).to_integral_value(rounding=ROUND_HALF_EVEN))
        if abs(rounded) <= MANTISSA_MAX:
            return _pack(rounded, exponent) if rounded else 0x0000
    raise ProtocolError(f"{value!r} is out of SFLOAT range (|value| <= {MANTISSA_MAX}e{_EXP_MAX})")


def _pack(mantissa: int, exponent: int) -> int:
    return ((exponent & 0xF) << 12) | (mantissa & 0x0FFF)
