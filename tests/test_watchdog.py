"""The gateway never dies of retrying (issue 14 item 1).

On main, attempt 1,024 of any reconnect loop raised ``OverflowError``
(``2.0 ** 1024`` in the backoff) and the process exited, taking every device
with it: a port that cannot be opened, a device refused on every connect, or
a broker down for ~6.4 h was enough.

Here the whole gateway (``Gateway.run``: the supervised device runners, the
publisher, the health writer) runs on a clock 10,000 times faster than real
time, with a port that cannot be opened (a regular file), a device that the
allow-list refuses on every connect, and a broker port nobody listens on,
until each loop has failed 10,000 times. Then a broker appears and a good
device finishes a session: its dose event is delivered, nothing was
restarted, and the gateway is still running.

The refused and the good device are in-memory links speaking the ICD's
frames (a pty simulator cannot keep up with a clock 10,000 times faster); the
failing port, the store and the broker are real. The store is on /dev/shm
when there is one, so 30,000 durable commits do not wait on a shared disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devicegw.config import DeviceSettings, parse_config
from devicegw.runtime.gateway import Gateway
from devicegw.runtime.link_factory import link_factory as real_link_factory
from devicegw.storage.store import Store
from drivers.clock import ScaledClock
from drivers.errors import TransportError
from drivers.transport.base import ByteLink, LinkUnit
from drivers.vm1.codec import decode_payload
from drivers.vm1.framing import Deframer
from drivers.vm1.messages import Ack, AckResult, EndReason, GetInfo, Ident, MsgType
from drivers.vm1.stream import encode_message_frame
from tests.mqtt_helpers import (
    MosquittoBroker,
    cancel_and_wait,
    collecting,
    free_port_outside_ephemeral,
    mosquitto_binary,
    require,
)
from tests.session_stream import StreamBuilder

pytestmark = pytest.mark.e2e

# 2,000 is well past attempt 1,024 (where main died); DEVICEGW_WATCHDOG_FAILURES=10000 for
# the full count (~10 min on an idle 2-core machine, much more when shared).
FAILURES = int(os.environ.get("DEVICEGW_WATCHDOG_FAILURES", "2000"))
SCALE = 10_000.0
WAIT_S = float(os.environ.get("DEVICEGW_WATCHDOG_WAIT_S", "900"))
GOOD_SERIAL = "VM1-000123"


def ident(serial: str, seq: int = 0) -> Ident:
    return Ident(
        model="VM-1",
        serial_no=serial,
        firmware="1.4.2",
        nominal_rate_ul_min=400,
        reservoir_capacity_ul=6000,
        last_session_no=41,
        seq=seq,
    )


class FakeVm1:
    """An in-memory VM-1: IDENT on open and for GET_INFO, ACK OK for every command."""

    def __init__(self, serial: str) -> None:
        self.serial = serial
        self.opens = 0
        self.pending: list[bytes] = []  # frames queued for the next connection
        self._rx: asyncio.Queue[bytes | None] | None = None
        self._seq = 0

    def link(self) -> ByteLink:
        return _FakeLink(self)

    def send(self, frames: list[bytes]) -> None:
        if self._rx is not None:
            for f in frames:
                self._rx.put_nowait(f)
        else:
            self.pending.extend(frames)

    def next_seq(self) -> int:
        self._seq = (self._seq + 1) % 256
        return self._seq


@dataclasses.dataclass
class _FakeLink:
    device: FakeVm1
    deframer: Deframer = dataclasses.field(default_factory=Deframer)

    @property
    def unit(self) -> LinkUnit:
        return "stream"  # serial frames, as a VM-1 on a port

    @property
    def description(self) -> str:
        return f"fake:{self.device.serial}"

    async def open(self) -> None:
        d = self.device
        d.opens += 1
        d._rx = asyncio.Queue()
        d._rx.put_nowait(encode_message_frame(ident(d.serial, d.next_seq())))  # port-open IDENT
        for f in d.pending:
            d._rx.put_nowait(f)
        d.pending.clear()

    async def read(self) -> bytes:
        q = self.device._rx
        if q is None:
            raise TransportError("closed")
        data = await q.get()
        if data is None:
            raise TransportError("closed")
        return data

    async def write(self, data: bytes) -> None:
        d = self.device
        for payload in self.deframer.feed(data):
            cmd = decode_payload(payload)
            ack = Ack(acked_seq=cmd.seq, cmd=int(MsgType[_name(cmd)]), result=AckResult.OK)
            frames = [encode_message_frame(dataclasses.replace(ack, seq=d.next_seq()))]
            if isinstance(cmd, GetInfo):
                frames.append(encode_message_frame(ident(d.serial, d.next_seq())))
            d.send(frames)

    async def close(self) -> None:
        q, self.device._rx = self.device._rx, None
        if q is not None:
            q.put_nowait(None)


def _name(cmd: object) -> str:
    return {
        "GetInfo": "GET_INFO",
        "SetClock": "SET_CLOCK",
        "SetRate": "SET_RATE",
        "GetSession": "GET_SESSION",
        "Start": "START",
        "Stop": "STOP",
        "Ping": "PING",
    }[type(cmd).__name__]


@contextlib.contextmanager
def fast_dir() -> Iterator[Path]:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="devicegw-watchdog-", dir=base) as d:
        yield Path(d)


def vanished(path: Path | None) -> bool:
    return path is not None and not path.exists()


async def until(
    condition: Callable[[], bool], timeout: float, what: object, *, needs: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        # Fail at once, not after WAIT_S, if the test's files vanish under it (seen when a
        # concurrent pytest run pruned a shared --basetemp).
        assert not vanished(needs), f"{needs} vanished while waiting for {what}"
        await asyncio.sleep(0.05)


class Progress:
    def __init__(self, describe: Callable[[], str]) -> None:
        self.describe = describe

    def __str__(self) -> str:
        return self.describe()


@pytest.mark.timeout(WAIT_S + 120)
async def test_ten_thousand_failures_of_every_kind_and_still_serving() -> None:
    # A private directory, not pytest's basetemp: twice a full CI run saw this test's
    # tmp_path vanish under it (broker and witness writes failing) after 10,000 failures.
    with tempfile.TemporaryDirectory(prefix="devicegw-watchdog-files-") as d:
        await _ten_thousand_failures(Path(d))


async def _ten_thousand_failures(tmp_path: Path) -> None:
    require(mosquitto_binary() is not None, "mosquitto is not installed")
    not_a_tty = tmp_path / "not-a-tty"
    not_a_tty.write_text("a regular file: exists, cannot be opened as a serial port\n")
    # Its port: nobody listens there yet, and outside the ephemeral range (10,000 connect
    # attempts to a closed ephemeral port once connected to themselves and took it).
    broker = MosquittoBroker(workdir=tmp_path, port=free_port_outside_ephemeral())
    config = parse_config(
        {
            "gateway": {"id": "gw-watchdog", "site": "s1", "data_dir": str(tmp_path / "d")},
            "broker": {
                "host": broker.host,
                "port": broker.port,
                "reconnect_initial_s": 0.5,
                "reconnect_max_s": 30.0,
            },
            "devices": [
                {
                    "id": "neb-noport",
                    "type": "vm1",
                    "bed": "B1",
                    "subject_id": "CVD-001",
                    "kit_number": "K-1",
                    "link": {"kind": "serial", "port": str(not_a_tty)},
                },
                {
                    "id": "neb-refused",
                    "type": "vm1",
                    "bed": "B2",
                    "subject_id": "CVD-002",
                    "kit_number": "K-2",
                    "expected_serial": "VM1-000187",
                    "link": {"kind": "serial", "port": "/dev/fake-refused"},
                },
                {
                    "id": "neb-good",
                    "type": "vm1",
                    "bed": "B3",
                    "subject_id": "CVD-003",
                    "kit_number": "K-3",
                    "expected_serial": GOOD_SERIAL,
                    "link": {"kind": "serial", "port": "/dev/fake-good"},
                },
            ],
        }
    )
    impostor, good = FakeVm1("VM1-999999"), FakeVm1(GOOD_SERIAL)

    def links(device: DeviceSettings) -> Callable[[], ByteLink]:
        if device.id == "neb-refused":
            return impostor.link
        if device.id == "neb-good":
            return good.link
        return real_link_factory(device)

    with fast_dir() as store_dir:
        store = Store(store_dir / Store.FILE_NAME)
        gateway = Gateway(config, clock=ScaledClock(SCALE), link_factory=links, store=store)
        noport, refused, serving = gateway.runners
        task = asyncio.create_task(gateway.run(), name="gateway-under-test")
        try:
            await until(
                lambda: (
                    noport.health.open_failures >= FAILURES
                    and refused.health.refusals >= FAILURES
                    and gateway.publisher.stats.connect_failures >= FAILURES
                ),
                WAIT_S,
                needs=not_a_tty,
                what=Progress(
                    lambda: (
                        f"{FAILURES} failures of each kind "
                        f"(open {noport.health.open_failures}, refused {refused.health.refusals}, "
                        f"broker {gateway.publisher.stats.connect_failures})"
                    )
                ),
            )
            assert not task.done()
            assert gateway.restarts.counts == {}  # nothing failed in a way it did not expect
            assert serving.health.identified and serving.health.connected
            assert not gateway.publisher.stats.connected

            # Still serving: the broker appears, the good device finishes a session.
            broker.start()
            try:
                everything = [f"{gateway.topics.base}/#"]
                async with collecting(broker.host, broker.port, everything) as col:
                    await until(lambda: gateway.publisher.stats.connected, 60, "broker connect")
                    b = StreamBuilder()
                    b.seq = 100
                    b.start()
                    b.nebulize(300)
                    b.end(EndReason.COMPLETE, residual=105, neb_ms=300_000)
                    good.send([encode_message_frame(rx.msg) for rx in b.out])
                    await col.wait_for(lambda m: any("/dose/neb-good" in x.topic for x in m), 60)
                    [event] = [m.json() for m in col.matching("/dose/neb-good")]
                    assert event["device"]["serial_no"] == GOOD_SERIAL
                    assert event["session_no"] == 42
            finally:
                broker.stop()
            assert not task.done()
            assert gateway.restarts.counts == {}
        finally:
            await cancel_and_wait(task)
            store.close()
    print(
        f"open failures {noport.health.open_failures}, refusals {refused.health.refusals}, "
        f"broker connect failures {gateway.publisher.stats.connect_failures}"
    )
