"""Strings from devices and files, made safe to show a person: the one helper for that.

A device's IDENT, a key in a config file, a row of the audit trail or a field
of the status file are data. Printed raw, ``\\x1b[2J`` clears an operator's
screen, a newline splits a table row into two records, and a right-to-left
override reorders what is read. :func:`printable` shows every such character
as a visible escape instead (``\\x1b``, ``\\n``, ``\\u202e``). It is idempotent
(a backslash stays a backslash), so a message made safe where it was built
can pass through it again where it is printed.

Terminal output goes through rich; data enters it as :class:`rich.text.Text`
(never parsed as markup) or, inside a markup string, through
:func:`devicegw.cli.terminal.markup` (rich's ``escape`` of :func:`printable`).
This module stays free of rich so that the configuration can use it.
"""

from __future__ import annotations

import unicodedata

__all__ = ["is_plain", "printable"]

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Control, format (bidi overrides, zero-width), surrogate, private-use, unassigned,
# line and paragraph separators.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def _visible(ch: str) -> str:
    named = _NAMED.get(ch)
    if named is not None:
        return named
    if ch.isprintable() and unicodedata.category(ch) not in _HIDDEN_CATEGORIES:
        return ch
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(value: object, *, limit: int | None = None) -> str:
    """``value`` as one line of visible characters; cut to ``limit`` characters with ``…``."""
    text = value if isinstance(value, str) else str(value)
    plain = text.isascii() and text.isprintable()  # the common case, fast
    out = text if plain else "".join(_visible(ch) for ch in text)
    if limit is not None and len(out) > limit:
        out = out[: max(0, limit - 1)] + "…"
    return out


def is_plain(text: str) -> bool:
    """True if ``text`` shows as itself (:func:`printable` would change nothing)."""
    return printable(text) == text
