"""Bounded logs for errors that repeat: the first one is logged, the rest counted and summarised.

A port that fails on every read, a device refused on every connect, a task that
crashes on every restart: each would otherwise write one line per attempt, for
as long as it lasts (issue 13 saw 711,621 lines in a minute). The runners log
such messages through a :class:`RepeatedLog`: the first occurrence of a message
is logged as usual; while it keeps coming it is only counted, and at most once
per window (60 s of the injected clock) one line says "... (repeated N times in
the last 60 s)". :meth:`RepeatedLog.flush` (called when the link is healthy
again) writes what is still counted and forgets, so the next failure is logged
in full again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["WINDOW_S", "RepeatedLog"]

#: How often (clock seconds) a message that keeps repeating is summarised.
WINDOW_S = 60.0
#: Distinct messages remembered at once; the oldest is summarised and forgotten beyond this.
MAX_KEYS = 64


@dataclass(slots=True)
class _Seen:
    level: int
    msg: str
    extra: Mapping[str, Any] | None
    since: float
    count: int = 0


class RepeatedLog:
    """One logger's repeating messages: logged once, then counted and summarised per window."""

    def __init__(
        self,
        logger: logging.Logger,
        monotonic: Callable[[], float],
        *,
        window_s: float = WINDOW_S,
    ) -> None:
        self._log = logger
        self._monotonic = monotonic
        self._window_s = window_s
        self._seen: dict[str, _Seen] = {}

    def log(
        self,
        level: int,
        msg: str,
        *args: object,
        extra: Mapping[str, Any] | None = None,
        exc_info: bool = False,
    ) -> bool:
        """Log ``msg % args`` unless the same text is repeating; True if a line was written."""
        text = msg % args if args else msg
        now = self._monotonic()
        seen = self._seen.get(text)
        if seen is None:
            if len(self._seen) >= MAX_KEYS:
                oldest = next(iter(self._seen))
                self._summarise(self._seen.pop(oldest), now)
            self._seen[text] = _Seen(level, text, extra, now)
            self._log.log(level, "%s", text, extra=dict(extra or {}), exc_info=exc_info)
            return True
        seen.count += 1
        if now - seen.since >= self._window_s:
            self._summarise(seen, now)
            seen.since, seen.count = now, 0
            return True
        return False

    def flush(self) -> None:
        """Summarise what is still counted and forget every message (the trouble is over)."""
        now = self._monotonic()
        for seen in self._seen.values():
            self._summarise(seen, now)
        self._seen.clear()

    def _summarise(self, seen: _Seen, now: float) -> None:
        if seen.count == 0:
            return
        span = max(1, round(now - seen.since))
        self._log.log(
            seen.level,
            "%s (repeated %d times in the last %d s)",
            seen.msg,
            seen.count,
            span,
            extra={**(seen.extra or {}), "repeated": seen.count, "window_s": span},
        )
