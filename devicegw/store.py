"""The gateway's one durable store: a SQLite file in the data directory.

WAL with ``synchronous=FULL``: a transaction that returned is on disk, even if
the gateway is killed or the power fails the next instant. The outbox, the
session journal and the audit trail keep their tables here, so one file (and
one backup) holds everything that makes a dose record.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import TracebackType

from devicegw.errors import GatewayError


class StoreError(GatewayError):
    """The durable store cannot be opened or written."""


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
