"""The gateway's one durable store: a SQLite file in the data directory.

WAL with ``synchronous=FULL``: a transaction that returned is on disk, even if
the gateway is killed or the power fails the next instant. The outbox, the
session journal and the audit trail keep their tables here, so one file (and
one backup) holds everything that makes a dose record.
"""

from __future__ import annotations

import contextlib
import errno
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from devicegw.errors import GatewayError


class StoreError(GatewayError):
    """The durable store cannot be opened or written."""


def is_disk_full(exc: BaseException) -> bool:
    """Is this SQLite (or OS) error a full disk or quota (SQLITE_FULL, ENOSPC, EDQUOT)?"""
    while exc is not None:
        if isinstance(exc, sqlite3.Error):
            code = getattr(exc, "sqlite_errorcode", None)
            if code is not None and code & 0xFF == sqlite3.SQLITE_FULL:
                return True
            if "disk is full" in str(exc) or "disk I/O error" in str(exc):
                return True
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__  # type: ignore[assignment]
    return False


class Store:
    FILE_NAME = "devicegw.sqlite3"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit mode: every statement outside an explicit BEGIN is its own transaction.
            self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self.conn.execute("PRAGMA busy_timeout=5000")
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the gateway store {self.path}: {exc}") from exc

    @classmethod
    def in_dir(cls, data_dir: str | Path) -> Store:
        return cls(Path(data_dir) / cls.FILE_NAME)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic, durable transaction (nested calls join the outer one)."""
        if self.conn.in_transaction:
            yield self.conn
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        self._meta_table()
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._meta_table()
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def _meta_table(self) -> None:
        self.conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")

    def quick_check(self, *, full: bool = False) -> list[str]:
        """SQLite's ``quick_check`` (or the full ``integrity_check``): the problems, [] if none.

        A damaged file that SQLite cannot even read is one problem, not an exception.
        """
        pragma = "integrity_check" if full else "quick_check"
        try:
            rows = self.conn.execute(f"PRAGMA {pragma}(100)").fetchall()
        except sqlite3.DatabaseError as exc:
            return [f"{pragma} could not read the file: {exc}"]
        problems = [str(r[0]) for r in rows]
        return [] if problems == ["ok"] else problems

    def repair_indexes(self) -> list[str]:
        """Rebuild every index from its table (a damaged index holds no data); problems left."""
        try:
            self.conn.execute("REINDEX")
        except sqlite3.DatabaseError as exc:
            return [f"REINDEX failed: {exc}"]
        return self.quick_check(full=True)

    def size_bytes(self) -> int:
        """Disk used by the store, WAL included."""
        total = 0
        for suffix in ("", "-wal", "-shm"):
            p = Path(str(self.path) + suffix)
            if p.exists():
                total += p.stat().st_size
        return total

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
