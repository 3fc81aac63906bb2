"""The gateway makes its own data directory (CI failure of stop 18).

With the store handed in from elsewhere (as the watchdog test and an embedding
caller do), nothing made ``data_dir``: the control socket's bind raised
FileNotFoundError whenever it started before the health writer had happened to
create the directory, and the supervisor counted a restart. No broker or device
is needed: the control socket, the witness and status.json live in data_dir.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from devicegw.config import parse_config
from devicegw.runtime.control_socket import request, socket_path
from devicegw.runtime.gateway import Gateway
from devicegw.storage.store import Store
from drivers.clock import SystemClock
from tests.mqtt_helpers import cancel_and_wait


async def test_a_missing_data_dir_is_made_before_any_task_needs_it(tmp_path: Path) -> None:
    data_dir = tmp_path / "not" / "yet" / "here"
    config = parse_config(
        {
            # Port 9 (discard) on loopback: nobody answers; the publisher just retries.
            "broker": {"host": "127.0.0.1", "port": 9, "reconnect_initial_s": 5.0},
            "gateway": {"id": "gw-dir", "site": "s1", "data_dir": str(data_dir)},
            "devices": [],
        }
    )
    store = Store(tmp_path / "elsewhere" / Store.FILE_NAME)
    try:
        gateway = Gateway(config, clock=SystemClock(), store=store)
        assert data_dir.is_dir()
        task = asyncio.create_task(gateway.run())
        try:
            for _ in range(200):
                if socket_path(data_dir).exists():
                    break
                await asyncio.sleep(0.025)
            reply = await asyncio.to_thread(request, data_dir, {"command": "nonsense"})
            assert reply["applied"] is False
            assert gateway.restarts.counts == {}
        finally:
            await cancel_and_wait(task)
            gateway.close()
    finally:
        store.close()
