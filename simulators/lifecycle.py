"""What every simulator shares: one run-loop task on an injected clock, used as ``async with``.

The serial (pty) and BLE simulators differ in how they reach the gateway, not
in how they start, stop and keep device time; that part lives here once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from abc import ABC, abstractmethod
from types import TracebackType
from typing import Self

from drivers.clock import Clock

__all__ = ["MIN_REAL_SLEEP_S", "ClockedSimulator"]

#: Shortest real-time sleep of a run loop: at high clock scales messages go out in batches
#: (each with its exact device time) instead of waking the event loop thousands of times a second.
MIN_REAL_SLEEP_S = 0.002


class ClockedSimulator(ABC):
    """Device time, task cancellation and ``async with`` for a simulator's run loop."""

    _clock: Clock
    _t0: float
    _task: asyncio.Task[None] | None

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def device_time(self) -> float:
        """Seconds since power-on (:meth:`start`) on the injected clock."""
        return self._clock.monotonic() - self._t0

    def _min_sleep(self) -> float:
        """:data:`MIN_REAL_SLEEP_S` in clock seconds (0 on a clock that does not sleep)."""
        scale = self._clock.scale
        return MIN_REAL_SLEEP_S * scale if math.isfinite(scale) else 0.0

    async def _stop_task(self) -> None:
        """Cancel the run loop and wait for it; a crash of the loop propagates."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
