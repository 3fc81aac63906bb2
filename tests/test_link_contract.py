"""One contract suite for every link backend (STYLE.md #3): serial pty, BLE sandbox, in-memory twin.

Each backend is reached the way the gateway reaches it, with a VM-1 on the
other end: the pty simulator behind a real pseudo-terminal (real pyserial),
the BLE simulator on the user-space BlueZ sandbox (real bleak), and the
in-memory twin (:mod:`drivers.transport.memory`) with a VM-1 model answering
through the same codec. The same test functions run against all three; what
differs is only how each backend is built and how its device goes away.

The link contract (:mod:`drivers.transport.base`): ``unit`` says what a chunk
is, chunks decode with :func:`~drivers.vm1.stream.vm1_decoder` for that unit
and nothing is ever ``b""``; a command encoded with
:func:`~drivers.vm1.stream.encode_for_link` is answered; a device that goes
away makes ``read`` raise TransportError, again on every later read; ``close``
is idempotent; a closed link reads and writes TransportError; a new link opens
once the device is back. A missing BLE sandbox skips locally, fails under CI=true.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from devicegw.errors import TransportError
from drivers.clock import ScaledClock
from drivers.transport.base import Link
from drivers.transport.memory import MemoryPort
from drivers.transport.serial_link import SerialLink
from drivers.vm1.codec import decode_payload
from drivers.vm1.messages import Ack, AckResult, HostCommand, Ident, Message, Ping
from drivers.vm1.stream import encode_for_link, vm1_decoder
from simulators.scenario import Scenario, parse_scenario
from simulators.vm1_model import Vm1Model

pytestmark = pytest.mark.timeout(120)

SCALE = 10
SERIAL = "VM1-LNK001"


def scenario() -> Scenario:
    return parse_scenario(
        {
            "device": {"serial_no": SERIAL, "seed": 3, "mains": True, "last_session_no": 2},
            "sessions": [{"fill_at_s": 0, "fill_ul": 500, "start_at_s": 5000, "rate_ul_min": 800}],
        },
        source="contract.toml",
    )


@dataclasses.dataclass
class Backend:
    """One backend under test: how to make a link, and how its device leaves and returns."""

    name: str
    make: Callable[[], Link]
    go_away: Callable[[], Awaitable[None]]
    come_back: Callable[[], Awaitable[None]]


# --------------------------------------------------------------------------- backends


class _MemoryVm1:
    """A VM-1 model behind a MemoryPort: IDENT on open, answers to host commands."""

    def __init__(self, unit: Any) -> None:
        self.model = Vm1Model.from_scenario(scenario())
        self.port = MemoryPort(unit, name="vm1-twin", on_open=self._opened)
        self._task: asyncio.Task[None] | None = None

    def _opened(self, port: MemoryPort) -> None:
        port.send(encode_for_link(self.model.ident_message(0.0), port.unit))

    async def _serve(self) -> None:
        decoder = vm1_decoder(self.port.unit)
        while True:
            chunk = await self.port.receive()
            for cmd in decoder.feed(chunk):
                if isinstance(cmd, HostCommand):
                    for answer in self.model.handle_command(cmd, 0.0):
                        self.port.send(encode_for_link(answer, self.port.unit))

    async def __aenter__(self) -> _MemoryVm1:
        self._task = asyncio.create_task(self._serve(), name="memory-vm1")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


@pytest.fixture(params=["memory-stream", "memory-message", "serial-pty", "ble-sandbox"])
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Backend]:
    kind = request.param
    if kind.startswith("memory"):
        async with _MemoryVm1(kind.removeprefix("memory-")) as dev:

            async def away() -> None:
                dev.port.unplug()

            async def back() -> None:
                dev.port.plug()

            yield Backend(kind, lambda: dev.port.link(device_id="neb-mem"), away, back)
        return
    if kind == "serial-pty":
        from simulators.vm1_pty import Vm1PtySimulator

        async with Vm1PtySimulator(
            scenario(), clock=ScaledClock(SCALE), link_dir=tmp_path
        ) as pty_sim:
            await pty_sim.wait_link_up()

            async def pty_away() -> None:
                pty_sim.drop_link(3.0)  # 3 s of device time, 0.3 s real: the pty goes away

            async def pty_back() -> None:
                pass  # the pty comes back by itself; the reopen loop waits for it

            yield Backend(
                kind,
                lambda: SerialLink(str(pty_sim.path), device_id="neb-pty"),
                pty_away,
                pty_back,
            )
        return
    # BLE: as the ``bluez`` fixture does, skipped locally (failed under CI=true) without a sandbox.
    from drivers.transport.ble_link import Vm1BleLink
    from simulators.vm1_ble import Vm1BleSimulator
    from tests.ble_fixtures import (
        GATEWAY_ADAPTER,
        PERIPHERAL_ADAPTER,
        bluezoo_available,
        bluezoo_env,
        dbus_daemon_binary,
        require,
    )

    require(dbus_daemon_binary() is not None, "dbus-daemon is not installed (apt: dbus-daemon)")
    require(bluezoo_available(), "bluezoo is not installed (pip: bluezoo)")
    async with contextlib.AsyncExitStack() as stack:
        env = await stack.enter_async_context(bluezoo_env())
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", env.address)
        address = env.adapter_address(PERIPHERAL_ADAPTER)
        ble_sim = await stack.enter_async_context(
            Vm1BleSimulator(scenario(), clock=ScaledClock(SCALE), adapter=PERIPHERAL_ADAPTER)
        )

        def make_ble() -> Link:
            return Vm1BleLink(
                allow=[address],
                adapter=GATEWAY_ADAPTER,
                scan_timeout_s=8.0,
                device_id="neb-ble",
            )

        yield Backend(kind, make_ble, ble_sim.go_away, ble_sim.come_back)


# --------------------------------------------------------------------------- helpers


async def read_until(
    link: Link, until: Callable[[list[Message]], bool], timeout: float = 20.0
) -> list[Message]:
    """Read chunks, decoded for the link's unit, until ``until``; no chunk is ever empty."""
    decoder = vm1_decoder(link.unit)
    msgs: list[Message] = []
    async with asyncio.timeout(timeout):
        while not until(msgs):
            chunk = await link.read()
            assert isinstance(chunk, bytes) and chunk, "read never returns b''"
            if link.unit == "message":
                decode_payload(chunk)  # one whole payload per chunk, as the device sent it
            msgs += decoder.feed(chunk)
    assert decoder.stats.frames_bad == 0 and decoder.stats.bad_payloads == 0
    return msgs


def acked(seq: int) -> Callable[[list[Message]], bool]:
    return lambda msgs: any(isinstance(m, Ack) and m.acked_seq == seq for m in msgs)


# --------------------------------------------------------------------------- the contract


async def test_identifies_and_answers_a_command(backend: Backend) -> None:
    link = backend.make()
    assert link.unit in ("stream", "message")
    assert isinstance(link.description, str) and link.description
    await link.open()
    try:
        first = await read_until(link, lambda m: any(isinstance(x, Ident) for x in m))
        ident = next(x for x in first if isinstance(x, Ident))
        assert ident.serial_no == SERIAL
        await link.write(encode_for_link(dataclasses.replace(Ping(), seq=41), link.unit))
        msgs = await read_until(link, acked(41))
        ack = next(m for m in msgs if isinstance(m, Ack) and m.acked_seq == 41)
        assert ack.result == AckResult.OK
    finally:
        await link.close()
        await link.close()  # idempotent


async def test_device_gone_is_a_lasting_transport_error_then_reopens(backend: Backend) -> None:
    link = backend.make()
    await link.open()
    try:
        await read_until(link, lambda m: any(isinstance(x, Ident) for x in m))
        await backend.go_away()
        with pytest.raises(TransportError):
            async with asyncio.timeout(20):
                while True:
                    await link.read()
        with pytest.raises(TransportError):  # and stays lost until closed and reopened
            await link.read()
    finally:
        await link.close()
    await backend.come_back()
    again = backend.make()
    async with asyncio.timeout(30):
        while True:
            try:
                await again.open()
                break
            except TransportError:
                await again.close()
                await asyncio.sleep(0.2)
    try:
        await read_until(again, lambda m: any(isinstance(x, Ident) for x in m))
    finally:
        await again.close()


async def test_closed_link_reads_and_writes_transport_errors(backend: Backend) -> None:
    link = backend.make()
    await link.open()
    await link.close()
    with pytest.raises(TransportError):
        await link.read()
    with pytest.raises(TransportError):
        await link.write(encode_for_link(dataclasses.replace(Ping(), seq=1), link.unit))
