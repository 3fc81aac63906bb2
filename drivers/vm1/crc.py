"""CRC-16/CCITT-FALSE, the checksum that closes every VM-1 serial frame (ICD section 1).

Polynomial 0x1021, initial value 0xFFFF, no reflection, no final XOR; the
check value for ASCII ``123456789`` is 0x29B1. That is exactly what the
standard library's ``binascii.crc_hqx(data, 0xFFFF)`` computes, in C: about
25x faster than a table in Python, which showed up as 6 % of replay time. The
tests check it against a bitwise reference written from the ICD's definition.
"""

from __future__ import annotations

from binascii import crc_hqx

__all__ = ["CRC16_INIT", "crc16_ccitt_false"]

CRC16_INIT = 0xFFFF


def crc16_ccitt_false(data: bytes | bytearray | memoryview, crc: int = CRC16_INIT) -> int:
    """CRC of ``data``; pass a previous result as ``crc`` to continue over split data."""
    return crc_hqx(data, crc & 0xFFFF)
