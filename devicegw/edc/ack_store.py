"""The reference EDC client's store: the first copy of each dose event, on disk before the ack.

Append-only JSON lines, one per ``event_id``, fsynced (file and, when new, its
directory) before :mod:`devicegw.edc.client` acknowledges the message to the
broker. See "Reference EDC client" in docs/contract.md.
"""

from __future__ import annotations

import json
import logging
import os
from enum import StrEnum
from pathlib import Path
from typing import Any

from devicegw.edc.export import record_identity
from devicegw.errors import GatewayError
from drivers.clock import Clock, SystemClock

log = logging.getLogger(__name__)


class AckStoreError(GatewayError):
    """The ack-store file cannot be read back: a line is not a stored event."""

    def __init__(self, message: str, *, path: Path, line: int | None = None) -> None:
        self.path = path
        self.line = line
        super().__init__(message)


class StoreOutcome(StrEnum):
    STORED = "stored"  # first copy of this event_id: now on disk
    DUPLICATE = "duplicate"  # same event_id, same record: a redelivery, ignored
    CONFLICT = "conflict"  # same event_id, DIFFERENT content: must never happen
    REJECTED = "rejected"  # not a dose event we can key: kept in the rejects file


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AckStore:
    """Append-only JSON-lines file holding the first copy of each dose event.

    One line per ``event_id``, exactly as received. A later copy is a
    duplicate when it equals the stored one apart from ``delivery``, and a
    conflict otherwise (that must never happen). Everything else that was
    acknowledged (conflicting copies, payloads without an ``event_id``,
    schema-invalid events) goes to ``<FILE>.rejects`` with the reason, so
    nothing the broker considers delivered is silently lost.
    """

    def __init__(self, path: Path, *, clock: Clock | None = None) -> None:
        self.path = path
        self.rejects_path = path.with_name(path.name + ".rejects")
        self._clock = clock or SystemClock()
        self._events: dict[str, Any] = {}  # event_id -> parsed payload
        self._load()

    def __len__(self) -> int:
        return len(self._events)

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._events

    def _load(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        if data and not data.endswith(b"\n"):
            # A write torn by a crash: it was never fsynced, so never
            # acknowledged; the broker will deliver that message again.
            keep = data.rfind(b"\n") + 1
            log.warning("ack store %s: dropping a torn last line", self.path)
            with self.path.open("r+b") as f:
                f.truncate(keep)
                os.fsync(f.fileno())
            data = data[:keep]
        for number, line in enumerate(data.splitlines(), start=1):
            try:
                event = json.loads(line)
                event_id = event["event_id"]
            except (ValueError, TypeError, KeyError) as exc:
                raise AckStoreError(
                    f"{self.path}:{number}: not a stored dose event ({exc!r})",
                    path=self.path,
                    line=number,
                ) from exc
            if not isinstance(event_id, str):
                raise AckStoreError(
                    f"{self.path}:{number}: event_id is not a string", path=self.path, line=number
                )
            known = self._events.setdefault(event_id, event)
            if record_identity(known) != record_identity(event):
                raise AckStoreError(
                    f"{self.path}:{number}: event_id {event_id} is stored twice, differently",
                    path=self.path,
                    line=number,
                )

    def add(self, payload: bytes, *, topic: str) -> StoreOutcome:
        """Keep the first copy of each event_id; on disk (fsynced) before returning."""
        try:
            event = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return self.reject(payload, topic=topic, reason="not JSON")
        event_id = event.get("event_id") if isinstance(event, dict) else None
        if not isinstance(event_id, str) or not event_id:
            return self.reject(payload, topic=topic, reason="no event_id")
        known = self._events.get(event_id)
        if known is None:
            line = payload.strip()
            if b"\n" in line or b"\r" in line:  # keep it one line
                line = json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()
            self._append(self.path, line)
            self._events[event_id] = event
            return StoreOutcome.STORED
        if record_identity(known) == record_identity(event):
            return StoreOutcome.DUPLICATE
        log.error("event_id %s received again with DIFFERENT content", event_id)
        self.reject(
            payload, topic=topic, reason=f"event_id {event_id} already stored with other content"
        )
        return StoreOutcome.CONFLICT

    def reject(self, payload: bytes, *, topic: str, reason: str) -> StoreOutcome:
        record = {
            "received_utc": self._clock.now().isoformat().replace("+00:00", "Z"),
            "reason": reason,
            "topic": topic,
            "payload": payload.decode("utf-8", errors="replace"),
        }
        self._append(self.rejects_path, json.dumps(record, ensure_ascii=False).encode())
        return StoreOutcome.REJECTED

    @staticmethod
    def _append(path: Path, line: bytes) -> None:
        try:
            created = not path.exists()
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                data = memoryview(line + b"\n")
                while data:
                    data = data[os.write(fd, data) :]
                os.fsync(fd)  # on disk before the caller acknowledges the message
            finally:
                os.close(fd)
            if created:
                _fsync_dir(path.parent)  # and the new file's directory entry too
        except OSError as exc:
            # Not acknowledged: the broker keeps the message for the next run.
            raise AckStoreError(f"{path}: cannot write: {exc.strerror}", path=path) from exc


# -- output ------------------------------------------------------------------------
