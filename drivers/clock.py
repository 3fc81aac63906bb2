"""The one clock everything asks for time, so replays and simulators outrun real time.

Nothing in the gateway, the drivers or the simulators calls ``time`` or
``asyncio.sleep`` for domain time directly: they ask a :class:`Clock`.
``SystemClock`` is real time; ``ScaledClock`` runs N times faster than real time
(a simulator and a daemon sharing the scale agree on durations); ``ManualClock``
only moves when told to (tests and as-fast-as-possible replay).
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """Time source injected into every component."""

    def monotonic(self) -> float:
        """Seconds on a monotonic scale; only differences are meaningful."""
        ...

    def now(self) -> datetime:
        """Current UTC time (timezone-aware)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait for ``seconds`` of this clock's time."""
        ...

    @property
    def scale(self) -> float:
        """How many clock seconds pass per real second (1.0 for real time)."""
        ...


class SystemClock:
    """Real time."""

    scale = 1.0

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class ScaledClock:
    """Real time sped up ``scale`` times.

    UTC time is scaled from the start of the current UTC day (or ``start``):
    ``utc = anchor + (real_utc - anchor) * scale``. Two processes sharing a
    scale (a simulator and a gateway, or a gateway and its restarted self)
    therefore agree on the time, while durations shrink ``scale`` times.
    """

    def __init__(self, scale: float, *, start: datetime | None = None) -> None:
        if scale <= 0:
            raise ValueError("clock scale must be positive")
        self._scale = float(scale)
        self._real0 = time.monotonic()
        real_now = datetime.now(UTC)
        if start is None:
            anchor = real_now.replace(hour=0, minute=0, second=0, microsecond=0)
            start = anchor + (real_now - anchor) * self._scale
        self._utc0 = start

    @property
    def scale(self) -> float:
        return self._scale

    def monotonic(self) -> float:
        return (time.monotonic() - self._real0) * self._scale

    def now(self) -> datetime:
        return self._utc0 + timedelta(seconds=self.monotonic())

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds) / self._scale)


class HeldClock:
    """Another clock, standing still until :meth:`release`, then running on from there.

    For a simulated device that must not begin its script before the gateway
    is listening (``devicegw demo``): its device time stays at power-on, and its
    sleeps wait, until the gateway has identified it. Afterwards it runs at the
    inner clock's rate, behind it by however long it was held.
    """

    def __init__(self, inner: Clock) -> None:
        self._inner = inner
        self._held_at = inner.monotonic()
        self._behind: float | None = None  # set by release()
        self._released = asyncio.Event()

    @property
    def scale(self) -> float:
        return self._inner.scale

    @property
    def released(self) -> bool:
        return self._behind is not None

    def release(self) -> None:
        if self._behind is None:
            self._behind = self._inner.monotonic() - self._held_at
            self._released.set()

    def _lag(self) -> float:
        if self._behind is None:
            return self._inner.monotonic() - self._held_at
        return self._behind

    def monotonic(self) -> float:
        return self._inner.monotonic() - self._lag()

    def now(self) -> datetime:
        return self._inner.now() - timedelta(seconds=self._lag())

    async def sleep(self, seconds: float) -> None:
        await self._released.wait()
        await self._inner.sleep(seconds)


class ManualClock:
    """A clock that only moves when :meth:`advance` is called.

    ``sleep`` returns once the clock has been advanced far enough, so a driver
    loop can run a whole simulated day without waiting.
    """

    scale = float("inf")

    def __init__(self, start: datetime | None = None) -> None:
        self._t = 0.0
        self._utc0 = start if start is not None else datetime(2026, 1, 1, tzinfo=UTC)
        self._waiters: list[tuple[float, asyncio.Future[None]]] = []

    def monotonic(self) -> float:
        return self._t

    def now(self) -> datetime:
        return self._utc0 + timedelta(seconds=self._t)

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock cannot go backwards")
        self.set(self._t + seconds)

    def set(self, t: float) -> None:
        """Move to absolute monotonic time ``t`` and wake the sleepers it reaches."""
        if t < self._t:
            raise ValueError("a clock cannot go backwards")
        self._t = t
        due = [w for w in self._waiters if w[0] <= t]
        self._waiters = [w for w in self._waiters if w[0] > t]
        for _, fut in due:
            if not fut.done():
                fut.set_result(None)

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((self._t + seconds, fut))
        await fut
