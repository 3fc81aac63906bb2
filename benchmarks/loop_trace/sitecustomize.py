"""Which event-loop callbacks and iterations run long in a process (a benchmark aid).

Put this directory on ``PYTHONPATH`` and set ``LOOP_TRACE_MS``; every Python process
started so whose command line contains ``LOOP_TRACE_MATCH`` (default ``devicegw.cli``)
appends to ``LOOP_TRACE_DIR/loop-trace.<pid>.txt`` (default the temp dir):

- ``cb <s since start> <ms> <what>``: one callback that ran longer than the limit (a
  task is named by its coroutine, e.g. ``health supervised``);
- ``iter <s> <ms> n=<callbacks> <top five by time>``: one loop iteration longer than it.

    LOOP_TRACE_MS=10 PYTHONPATH=benchmarks/loop_trace \\
        .venv/bin/python benchmarks/scale.py --beds 500

It times every callback with two ``perf_counter`` calls (~0.2 us each): use it to find
a stall, not to take the figures. Found with it (issue 13): the health snapshot holding
the loop 15-23 ms every 2 s at 500 beds, and a lockstep group's 50 dose finishes in one
iteration.
"""

from __future__ import annotations

import asyncio.base_events
import asyncio.events
import os
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any


def _name(handle: asyncio.events.Handle) -> str:
    callback: Any = getattr(handle, "_callback", None)
    task = getattr(callback, "__self__", None)
    if isinstance(task, asyncio.Task):
        return f"{task.get_name()} {getattr(task.get_coro(), '__qualname__', '?')}"
    return str(getattr(callback, "__qualname__", type(callback).__name__))


def _install(limit_s: float, out_dir: str) -> None:
    out = open(  # noqa: SIM115 - open for the life of the process
        os.path.join(out_dir, f"loop-trace.{os.getpid()}.txt"), "a", buffering=1
    )
    out.write(f"# {' '.join(sys.orig_argv)}\n")
    start = time.monotonic()
    ran: list[tuple[str, float]] = []
    handle_run = asyncio.events.Handle._run
    run_once = asyncio.base_events.BaseEventLoop._run_once  # type: ignore[attr-defined]

    def timed_run(self: asyncio.events.Handle) -> None:
        t = time.perf_counter()
        handle_run(self)
        took = time.perf_counter() - t
        name = _name(self)
        ran.append((name, took))
        if took > limit_s:
            out.write(f"cb {time.monotonic() - start:.3f} {took * 1e3:.1f} {name}\n")

    def timed_once(self: asyncio.base_events.BaseEventLoop) -> None:
        ran.clear()
        t = time.perf_counter()
        run_once(self)
        took = time.perf_counter() - t
        if took > limit_s and ran:
            by_name: defaultdict[str, list[float]] = defaultdict(lambda: [0, 0.0])
            for name, d in ran:
                by_name[name][0] += 1
                by_name[name][1] += d
            top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:5]
            parts = "; ".join(f"{k} x{int(c)} {s * 1e3:.1f}" for k, (c, s) in top)
            out.write(
                f"iter {time.monotonic() - start:.3f} {took * 1e3:.1f} n={len(ran)} {parts}\n"
            )

    asyncio.events.Handle._run = timed_run  # type: ignore[method-assign]
    asyncio.base_events.BaseEventLoop._run_once = timed_once  # type: ignore[attr-defined]


_limit = os.environ.get("LOOP_TRACE_MS")
if _limit and os.environ.get("LOOP_TRACE_MATCH", "devicegw.cli") in " ".join(sys.orig_argv):
    _install(float(_limit) / 1e3, os.environ.get("LOOP_TRACE_DIR", tempfile.gettempdir()))
