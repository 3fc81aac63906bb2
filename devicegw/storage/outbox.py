"""The durable outbox: nothing that makes a dose record is lost between decision and broker.

A dose event or device status is committed here (SQLite, WAL,
synchronous=FULL) before any network I/O, and marked sent only after the
broker's PUBACK. Rows are published in insertion order (so per device in
order). Dose events are unique by ``event_id``: a second, different record for
the same session is refused and reported, never published. Device statuses are
latest-wins per topic. Sent statuses are deleted; sent dose events are kept
(they are the gateway's record of what it delivered, and the dedupe key) up to
a retention limit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from devicegw.contract.vocabulary import TopicKind
from devicegw.storage.store import Store

log = logging.getLogger(__name__)

#: What the outbox holds: every durable kind (telemetry never enters it).
Kind = Literal[TopicKind.DOSE, TopicKind.STATUS, TopicKind.SAFETY]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    device_id TEXT,
    topic TEXT NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    payload BLOB NOT NULL,
    event_id TEXT UNIQUE,
    created_utc TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    sent_utc TEXT
);
CREATE INDEX IF NOT EXISTS outbox_unsent ON outbox(id) WHERE sent_utc IS NULL;
"""


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    kind: Kind
    device_id: str | None
    topic: str
    qos: int
    retain: bool
    payload: bytes
    event_id: str | None
    attempts: int


@dataclass(frozen=True, slots=True)
class AddResult:
    added: bool
    conflict: bool  # same event_id already stored with different content


class Outbox:
    def __init__(self, store: Store, *, keep_sent_dose_events: int = 200_000) -> None:
        self.store = store
        self.keep_sent = keep_sent_dose_events
        store.conn.executescript(_SCHEMA)

    def add(
        self,
        kind: Kind,
        topic: str,
        payload: bytes,
        *,
        qos: int,
        retain: bool,
        now: datetime,
        device_id: str | None = None,
        event_id: str | None = None,
    ) -> AddResult:
        with self.store.transaction() as db:
            if event_id is not None:
                row = db.execute(
                    "SELECT payload FROM outbox WHERE event_id = ?", (event_id,)
                ).fetchone()
                if row is not None:
                    conflict = bytes(row[0]) != payload
                    if conflict:
                        log.error(
                            "a different record for an already recorded dose was refused",
                            extra={"event_id": event_id, "device_id": device_id},
                        )
                    return AddResult(added=False, conflict=conflict)
            if kind == TopicKind.STATUS:
                db.execute("DELETE FROM outbox WHERE topic = ? AND sent_utc IS NULL", (topic,))
            db.execute(
                "INSERT INTO outbox (kind, device_id, topic, qos, retain, payload, event_id,"
                " created_utc) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (kind, device_id, topic, qos, int(retain), payload, event_id, now.isoformat()),
            )
        return AddResult(added=True, conflict=False)

    def pending(self, *, after_id: int = 0, limit: int = 100) -> list[OutboxRow]:
        rows = self.store.conn.execute(
            "SELECT id, kind, device_id, topic, qos, retain, payload, event_id, attempts"
            " FROM outbox WHERE sent_utc IS NULL AND id > ? ORDER BY id LIMIT ?",
            (after_id, limit),
        ).fetchall()
        return [
            OutboxRow(r[0], r[1], r[2], r[3], r[4], bool(r[5]), bytes(r[6]), r[7], r[8])
            for r in rows
        ]

    def mark_attempt(self, row_id: int) -> None:
        self.store.conn.execute("UPDATE outbox SET attempts = attempts + 1 WHERE id = ?", (row_id,))

    def mark_sent(self, row: OutboxRow, now: datetime) -> None:
        if row.kind == TopicKind.STATUS:
            self.store.conn.execute("DELETE FROM outbox WHERE id = ?", (row.id,))
        else:
            self.store.conn.execute(
                "UPDATE outbox SET sent_utc = ? WHERE id = ?", (now.isoformat(), row.id)
            )

    def has_event(self, event_id: str) -> bool:
        return (
            self.store.conn.execute(
                "SELECT 1 FROM outbox WHERE event_id = ?", (event_id,)
            ).fetchone()
            is not None
        )

    def depth(self) -> int:
        row = self.store.conn.execute(
            "SELECT COUNT(*) FROM outbox WHERE sent_utc IS NULL"
        ).fetchone()
        return int(row[0])

    def prune(self) -> int:
        """Drop the oldest sent dose events beyond the retention limit; never unsent ones."""
        cur = self.store.conn.execute(
            "DELETE FROM outbox WHERE sent_utc IS NOT NULL AND id NOT IN"
            " (SELECT id FROM outbox WHERE sent_utc IS NOT NULL ORDER BY id DESC LIMIT ?)",
            (self.keep_sent,),
        )
        return cur.rowcount
