"""HeldClock: a simulated device's time stands still until the gateway listens (devicegw demo)."""

from __future__ import annotations

import asyncio

from drivers.clock import HeldClock, ManualClock


async def test_held_clock_stands_still_then_runs_on_from_where_it_was() -> None:
    inner = ManualClock()
    held = HeldClock(inner)
    t0, utc0 = held.monotonic(), held.now()
    sleeper = asyncio.create_task(held.sleep(5.0))
    inner.advance(100.0)
    await asyncio.sleep(0)
    assert held.monotonic() == t0 and held.now() == utc0 and not held.released
    assert not sleeper.done()  # no time passes for it while held
    held.release()
    assert held.released and held.monotonic() == t0
    for _ in range(3):
        await asyncio.sleep(0)
    inner.advance(4.0)
    await asyncio.sleep(0)
    assert held.monotonic() == t0 + 4.0 and not sleeper.done()
    inner.advance(1.0)
    await asyncio.wait_for(sleeper, 1)
    assert held.monotonic() == t0 + 5.0
    assert (held.now() - utc0).total_seconds() == 5.0
    held.release()  # twice: no jump
    assert held.monotonic() == t0 + 5.0
