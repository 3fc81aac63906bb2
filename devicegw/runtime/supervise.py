"""The runner contract: every long-running part of the gateway is supervised the same way.

Each device runner (serial or BLE, nebulizer or oximeter), each bed's SpO2
tick, the broker connection, the health writer and the systemd notifier is a
:class:`Runner`: a name and a ``run()`` that runs until cancelled. An exception
nobody expected (a bug, a database error, an ``OSError`` from a full disk)
must not end the process and take every other device with it: it is logged
once at ERROR with its traceback, counted, handed to the runner's
``crashed()`` (so its own health says so), and that runner alone starts again
after a capped backoff. Only cancellation (a clean shutdown) ends a supervised
runner. Expected trouble (a link that drops, a device that is refused) is the
runner's own business and never reaches here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from devicegw.runtime.log_summary import RepeatedLog
from drivers.backoff import Backoff
from drivers.clock import Clock

log = logging.getLogger(__name__)

#: A task that ran this long (clock seconds) before failing starts its backoff afresh.
HEALTHY_AFTER_S = 60.0


class Runner(Protocol):
    """What the gateway supervises: one device, one bed's tick, the publisher, ..."""

    @property
    def task_name(self) -> str:
        """Unique in the gateway; names the task, the log lines and the restart count."""
        ...

    async def run(self) -> None:
        """Run until cancelled; raise (or return) only when something unexpected happened."""
        ...

    def crashed(self, error: str) -> None:
        """Told after an unexpected failure, before the restart (already logged)."""
        ...


@dataclass(slots=True)
class Restarts:
    """How often each supervised task was restarted, and why last (for ``devicegw status``)."""

    counts: dict[str, int] = field(default_factory=dict)
    last_error: dict[str, str] = field(default_factory=dict)

    def count(self, name: str, error: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1
        self.last_error[name] = error


@dataclass(slots=True)
class Task:
    """A :class:`Runner` made of a name and a coroutine function (the gateway's own tasks)."""

    task_name: str
    body: Callable[[], Awaitable[None]]

    async def run(self) -> None:
        await self.body()

    def crashed(self, error: str) -> None:
        pass


async def supervised(
    runner: Runner,
    *,
    clock: Clock,
    restarts: Restarts | None = None,
    backoff: Backoff | None = None,
) -> None:
    """Run ``runner`` until cancelled, restarting it whenever it fails or returns."""
    name = runner.task_name
    backoff = backoff or Backoff(1.0, 60.0)
    # The same failure again (a task that crashes on every restart) is counted, not re-logged.
    repeats = RepeatedLog(log, clock.monotonic)
    while True:
        started = clock.monotonic()
        try:
            await runner.run()
            error = "returned"
            repeats.log(
                logging.ERROR,
                "task %s returned unexpectedly; restarting it",
                name,
                extra={"task": name},
            )
        except Exception as exc:  # noqa: BLE001  (logged with its traceback, via repeats)
            error = f"{type(exc).__name__}: {exc}"
            repeats.log(
                logging.ERROR,
                "task %s failed (%s); restarting it",
                name,
                error,
                extra={"task": name},
                exc_info=True,
            )
        if restarts is not None:
            restarts.count(name, error)
        try:
            runner.crashed(error)
        except Exception:
            log.exception("task %s: crashed() failed", name, extra={"task": name})
        if clock.monotonic() - started >= HEALTHY_AFTER_S:
            backoff.reset()
            repeats.flush()
        await clock.sleep(backoff.next_delay())


def spawn(
    tg: asyncio.TaskGroup,
    runner: Runner,
    *,
    clock: Clock,
    restarts: Restarts | None = None,
) -> asyncio.Task[None]:
    """``runner`` supervised in ``tg``, its task named ``runner.task_name``."""
    return tg.create_task(supervised(runner, clock=clock, restarts=restarts), name=runner.task_name)
