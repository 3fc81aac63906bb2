"""Keeps the gateway's long-running tasks alive: a bug in one is logged and the task restarted.

A device runner, the broker connection, the health writer and the SpO2 ticker
each run forever. An exception nobody expected (a bug, a database error, an
``OSError`` from a full disk) must not end the process and take every other
device with it: it is logged at ERROR with its traceback, counted, and the
task starts again after a capped backoff. Only cancellation (a clean
shutdown) ends a supervised task.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from drivers.backoff import Backoff
from drivers.clock import Clock

log = logging.getLogger(__name__)

#: A task that ran this long (clock seconds) before failing starts its backoff afresh.
HEALTHY_AFTER_S = 60.0


@dataclass(slots=True)
class Restarts:
    """How often each supervised task was restarted, and why last (for ``devicegw status``)."""

    counts: dict[str, int] = field(default_factory=dict)
    last_error: dict[str, str] = field(default_factory=dict)

    def record(self, name: str, error: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1
        self.last_error[name] = error


async def supervised(
    name: str,
    run: Callable[[], Awaitable[None]],
    *,
    clock: Clock,
    restarts: Restarts | None = None,
    backoff: Backoff | None = None,
) -> None:
    """Run ``run()`` until cancelled, restarting it whenever it fails or returns."""
    backoff = backoff or Backoff(1.0, 60.0)
    while True:
        started = clock.monotonic()
        try:
            await run()
            error = "returned"
            log.error("task %s returned unexpectedly; restarting it", name, extra={"task": name})
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.exception("task %s failed; restarting it", name, extra={"task": name})
        if restarts is not None:
            restarts.record(name, error)
        if clock.monotonic() - started >= HEALTHY_AFTER_S:
            backoff.reset()
        await clock.sleep(backoff.next_delay())


def spawn(
    tg: asyncio.TaskGroup,
    name: str,
    run: Callable[[], Awaitable[None]],
    *,
    clock: Clock,
    restarts: Restarts | None = None,
) -> asyncio.Task[None]:
    """A supervised task in ``tg``, named ``name``."""
    return tg.create_task(supervised(name, run, clock=clock, restarts=restarts), name=name)
