"""Test-only look into the outbox table (the gateway itself never asks this)."""

from __future__ import annotations

from devicegw.storage.outbox import Outbox


def holds_event(outbox: Outbox, event_id: str) -> bool:
    """Whether the outbox has (or had, sent) a row for ``event_id``."""
    row = outbox.store.conn.execute(
        "SELECT 1 FROM outbox WHERE event_id = ?", (event_id,)
    ).fetchone()
    return row is not None
