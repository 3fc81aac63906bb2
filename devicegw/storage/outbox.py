"""The durable outbox: nothing that makes a dose record is lost between decision and broker.

A dose event or device status is committed here (SQLite, WAL,
synchronous=FULL) before any network I/O, and marked sent only after the
broker's PUBACK. Rows are published in insertion order (so per device in
order). Dose events are unique by ``event_id``: a second, different record for
the same session is refused and reported, never published. A dose event's
restricted detail (docs/blinding.md) is committed in the same transaction,
right after it, keyed ``<event_id>/detail``: both or neither, and a later
record differing in either half is a conflict. Device statuses are
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
Kind = Literal[TopicKind.DOSE, TopicKind.DOSE_DETAIL, TopicKind.STATUS, TopicKind.SAFETY]

#: The ``event_id`` column of a dose event's detail row: ``<event_id>`` + this.
DETAIL_KEY_SUFFIX = "/detail"

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
        detail: tuple[str, bytes] | None = None,
    ) -> AddResult:
        """Commit one record; ``detail`` is a dose event's restricted (topic, payload).

        The detail needs ``event_id``; it is inserted in the same transaction,
        with the same qos and retain flag, or not at all.
        """
        if detail is not None and event_id is None:
            raise ValueError("a detail record needs the event_id of its dose event")
        with self.store.transaction() as db:
            rows = [(kind, topic, payload, event_id)]
            if detail is not None and event_id is not None:
                rows.append(
                    (TopicKind.DOSE_DETAIL, detail[0], detail[1], event_id + DETAIL_KEY_SUFFIX)
                )
            if event_id is not None:
                stored = [
                    db.execute("SELECT payload FROM outbox WHERE event_id = ?", (key,)).fetchone()
                    for _, _, _, key in rows
                ]
                if any(
                    row is not None and bytes(row[0]) != new[2]
                    for row, new in zip(stored, rows, strict=True)
                ):
                    log.error(
                        "a different record for an already recorded dose was refused",
                        extra={"event_id": event_id, "device_id": device_id},
                    )
                    return AddResult(added=False, conflict=True)
                if stored[0] is not None:
                    # Recorded. A half pruned by retention is not published again.
                    return AddResult(added=False, conflict=False)
                rows = [new for row, new in zip(stored, rows, strict=True) if row is None]
            if kind == TopicKind.STATUS:
                db.execute("DELETE FROM outbox WHERE topic = ? AND sent_utc IS NULL", (topic,))
            for row_kind, row_topic, row_payload, row_key in rows:
                db.execute(
                    "INSERT INTO outbox (kind, device_id, topic, qos, retain, payload, event_id,"
                    " created_utc) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        row_kind,
                        device_id,
                        row_topic,
                        qos,
                        int(retain),
                        row_payload,
                        row_key,
                        now.isoformat(),
                    ),
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

    def depth(self) -> int:
        row = self.store.conn.execute(
            "SELECT COUNT(*) FROM outbox WHERE sent_utc IS NULL"
        ).fetchone()
        return int(row[0])

    def prune(self) -> int:
        """Drop the oldest sent dose events beyond the retention limit; never unsent ones.

        Details are not counted: a sent detail goes with its dose event.
        """
        with self.store.transaction() as db:
            events = db.execute(
                "DELETE FROM outbox WHERE sent_utc IS NOT NULL AND kind != ? AND id NOT IN"
                " (SELECT id FROM outbox WHERE sent_utc IS NOT NULL AND kind != ?"
                " ORDER BY id DESC LIMIT ?)",
                (TopicKind.DOSE_DETAIL, TopicKind.DOSE_DETAIL, self.keep_sent),
            ).rowcount
            details = db.execute(
                "DELETE FROM outbox WHERE kind = ? AND sent_utc IS NOT NULL"
                " AND substr(event_id, 1, length(event_id) - ?) NOT IN"
                " (SELECT event_id FROM outbox WHERE kind = ?)",
                (TopicKind.DOSE_DETAIL, len(DETAIL_KEY_SUFFIX), TopicKind.DOSE),
            ).rowcount
        return int(events + details)
