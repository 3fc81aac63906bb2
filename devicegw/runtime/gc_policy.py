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
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


def freeze_startup_objects() -> int:
    """Collect, then move every tracked object out of the collector's sight; how many."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.debug("start-up objects frozen for the garbage collector", extra={"objects": frozen})
    return frozen
