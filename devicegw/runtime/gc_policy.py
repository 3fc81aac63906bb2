"""Garbage collection that does not stall every bed at once.

A full (generation 2) collection walks every object the process tracks. At 500
beds that took 65-136 ms, about every 3 s, and found nothing to free (issue 13,
``benchmarks/scale.py``): the event loop -- every port, the broker link, the
dashboard -- waited meanwhile, and those pauses were the p99 latencies. Almost
all of those objects are made once at start (configuration, device pipelines,
contract models, imported modules) and live as long as the process.

So the daemon, once built, collects once and freezes what is left
(:func:`gc.freeze`): the collector stops walking it, and later collections see
only what sessions create. Reference counting still frees frozen objects that
are dropped; only a frozen reference cycle would stay, and start-up objects are
not dropped. Used by ``devicegw run`` only (tests use the collector to find
leaks).

What start-up leaves unfrozen is the devices' own long-lived state: the runners'
tasks, coroutines, serial links, decoders, backoffs, made once the loop runs. At
500 beds that was ~65,000 objects, and every full collection still walked them
(20-45 ms, every ~14 s, at the worst moments of ``benchmarks/scale.py``). So
:func:`keep_frozen` freezes again once the devices are up, and then every few
minutes unfreezes, collects everything and freezes afresh: a reference cycle that
became garbage while frozen (a device's old task after a reconnect) is collected
then, so memory stays bounded, and the collector pauses fully once per interval
instead of every few seconds.
"""

from __future__ import annotations

import gc
import logging
import time

from drivers.clock import Clock

log = logging.getLogger(__name__)


def freeze_startup_objects() -> int:
    """Collect, then move every tracked object out of the collector's sight; how many."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.debug("start-up objects frozen for the garbage collector", extra={"objects": frozen})
    return frozen


def refreeze(*, full: bool) -> tuple[int, float]:
    """Freeze what is tracked now: (objects frozen, seconds taken).

    ``full``: unfreeze and collect everything first (a full pause, which frees cycles
    that became garbage while frozen); otherwise only the young generations are
    collected (a few ms) and what the old one holds is frozen as it is.
    """
    started = time.perf_counter()
    if full:
        gc.unfreeze()
        gc.collect()
    else:
        gc.collect(1)
    gc.freeze()
    return gc.get_freeze_count(), time.perf_counter() - started


async def keep_frozen(clock: Clock, *, settle_s: float = 30.0, interval_s: float = 600.0) -> None:
    """Freeze ``settle_s`` after start (the devices are up), then refreeze every ``interval_s``."""
    await clock.sleep(settle_s)
    full = False
    while True:
        frozen, took_s = refreeze(full=full)
        log.debug(
            "garbage collector: long-lived objects frozen",
            extra={"objects": frozen, "took_ms": round(took_s * 1000, 1), "full": full},
        )
        full = True
        await clock.sleep(interval_s)
