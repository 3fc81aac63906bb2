from __future__ import annotations

import asyncio
import gc
import inspect
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.mqtt_helpers import MosquittoBroker, mosquitto_binary, require


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A real Mosquitto on a free loopback port, private to the test."""
    require(mosquitto_binary() is not None, "mosquitto is not installed")
    broker = MosquittoBroker(workdir=tmp_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


# -- hygiene: every test leaves the process as it found it ---------------------------


def _is_pytests(handler: logging.Handler) -> bool:
    return type(handler).__module__.startswith("_pytest")


@pytest.fixture(autouse=True)
def _hygiene(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fails a test that leaks asyncio tasks or unclosed resources; undoes its log handlers.

    - An async test gets :func:`_no_leaked_tasks` (below).
    - Unclosed files, sockets, transports: ``gc.collect()`` after the test makes their
      ``ResourceWarning`` fire inside the test, and ``filterwarnings = error`` (pyproject)
      fails it.
    - A handler the test installed on the root logger (``devicegw run`` in-process calls
      ``configure_logging``, bound to the test's captured stderr) is removed and closed,
      so it never writes to a closed stream later ("--- Logging error ---").
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    if inspect.iscoroutinefunction(getattr(request, "function", None)):
        request.getfixturevalue("_no_leaked_tasks")
    try:
        yield
        gc.collect()
    finally:
        for handler in list(root.handlers):
            if handler not in handlers and not _is_pytests(handler):
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers and not _is_pytests(handler):
                root.addHandler(handler)
        root.setLevel(level)


@pytest_asyncio.fixture
async def _no_leaked_tasks() -> AsyncIterator[None]:
    """Fails the test if any asyncio task it started is still running when it is over."""
    yield
    me = asyncio.current_task()
    for _ in range(20):  # let tasks that were just cancelled finish
        await asyncio.sleep(0)
    leaked = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    if leaked:
        for task in leaked:
            task.cancel()
        await asyncio.gather(*leaked, return_exceptions=True)
        pytest.fail(
            f"the test left {len(leaked)} asyncio task(s) running: "
            + ", ".join(sorted(t.get_name() for t in leaked))
        )
