"""The runners' reconnect loop: open a fresh link until one opens, backing off between tries.

A port whose path is gone (unplugged) is not retried on a timer: the loop
waits for the path to come back and opens it at once (replug in well under a
second), then starts its backoff afresh.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Protocol, TypeVar

from devicegw.errors import PortAbsentError, TransportError
from drivers.backoff import Backoff
from drivers.clock import Clock
from drivers.transport.port_watch import wait_for_path


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
            if isinstance(exc, PortAbsentError):
                await wait_for_path(exc.path)
                log.info("%s is back: opening it", what, extra={"device_id": device_id})
                backoff.reset()
                continue
            await clock.sleep(backoff.next_delay())
            continue
        return link
