"""Capped exponential backoff with full jitter, for every reconnect loop.

Jitter keeps a ward's worth of devices (or gateways) from reconnecting to a
restarted broker in lock-step.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from devicegw.clock import Clock
from devicegw.errors import TransportError


@dataclass(slots=True)
class Backoff:
    initial_s: float = 0.5
    max_s: float = 30.0
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0

    def next_delay(self) -> float:
        """Delay before the next attempt: uniform in [ceiling/2, ceiling], ceiling capped."""
        ceiling = min(self.max_s, self.initial_s * (self.factor**self.attempts))
        self.attempts += 1
        return ceiling / 2 + self.rng.random() * ceiling / 2

    def reset(self) -> None:
        self.attempts = 0


class Openable(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...


L = TypeVar("L", bound=Openable)


async def open_until_up(
    factory: Callable[[], L],
    *,
    clock: Clock,
    backoff: Backoff,
    log: logging.Logger,
    what: str,
    device_id: str,
    on_failure: Callable[[TransportError, bool], None] | None = None,
) -> L:
    """Open a fresh link from ``factory`` until one opens; back off between attempts.

    The first failure in a row is a WARNING, the retries DEBUG (one line per
    outage, not one per attempt); ``on_failure(exc, first)`` lets the caller
    record it.
    """
    first = True
    while True:
        link = factory()
        try:
            await link.open()
        except TransportError as exc:
            log.log(
                logging.WARNING if first else logging.DEBUG,
                "cannot open %s: %s",
                what,
                exc,
                extra={"device_id": device_id},
            )
            if on_failure is not None:
                on_failure(exc, first)
            first = False
            with contextlib.suppress(TransportError):
                await link.close()
            await clock.sleep(backoff.next_delay())
            continue
        return link
