"""How late the event loop runs: the one figure that says whether ports are read on time.

Every device, the broker connection and the dashboard share one event loop, so
anything that blocks it (a slow disk commit, a large JSON dump) delays every
bed's frames at once. A sampler asks to wake every :data:`INTERVAL_S` and
records how late it woke. Real seconds, not the gateway clock: this is about
the process, whatever speed a simulation runs at (as the health writer).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

INTERVAL_S = 0.05
#: A wake-up this late is counted as a stall and logged (at most once a minute).
STALL_S = 1.0
_LOG_EVERY_S = 60.0


@dataclass(slots=True)
class LoopLag:
    """What the sampler saw since start; ``observers`` get every sample (the histogram)."""

    samples: int = 0
    max_s: float = 0.0
    over_50ms: int = 0
    stalls: int = 0
    observers: list[Callable[[float], None]] = field(default_factory=list)
    _logged_mono: float | None = None
    _unlogged: int = 0
    _unlogged_max_s: float = 0.0

    def observe(self, lag_s: float, now_mono: float) -> None:
        self.samples += 1
        self.max_s = max(self.max_s, lag_s)
        if lag_s > 0.05:
            self.over_50ms += 1
        for observer in self.observers:
            observer(lag_s)
        if lag_s >= STALL_S:
            self.stalls += 1
            self._unlogged += 1
            self._unlogged_max_s = max(self._unlogged_max_s, lag_s)
        if self._unlogged and (
            self._logged_mono is None or now_mono - self._logged_mono >= _LOG_EVERY_S
        ):
            log.warning(
                "the event loop stalled %d time(s) (the longest %.1f s): every device's "
                "frames waited meanwhile",
                self._unlogged,
                self._unlogged_max_s,
            )
            self._logged_mono = now_mono
            self._unlogged = 0
            self._unlogged_max_s = 0.0


async def run(lag: LoopLag, interval_s: float = INTERVAL_S) -> None:
    """Sample the loop's lateness until cancelled."""
    while True:
        due = time.monotonic() + interval_s
        await asyncio.sleep(interval_s)
        now = time.monotonic()
        lag.observe(max(0.0, now - due), now)
