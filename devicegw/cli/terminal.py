"""Device and file strings on the terminal: the command line's side of :mod:`devicegw.safe_text`.

Data never reaches rich as markup. It goes in as :class:`~rich.text.Text`
(``text()``), or, where a line mixes our own markup with data, through
``markup()``: rich's ``escape`` of the visible form. Either way control
characters are shown as escapes (``\\x1b``), never sent to the terminal.
"""

from __future__ import annotations

import sys

from rich.markup import escape
from rich.text import Text

from devicegw.safe_text import printable

__all__ = ["error", "markup", "printable", "text"]


def markup(value: object, *, limit: int | None = None) -> str:
    """``value`` for use inside a rich markup string."""
    return escape(printable(value, limit=limit))


def text(value: object, style: str = "", *, limit: int | None = None) -> Text:
    """``value`` as a rich ``Text`` (no markup), control characters visible."""
    return Text(printable(value, limit=limit), style=style)


def error(message: object) -> None:
    """One line on stderr: ``devicegw: <message>``."""
    print(f"devicegw: {printable(message)}", file=sys.stderr)
