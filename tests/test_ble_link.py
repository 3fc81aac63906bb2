"""VM-1 over BLE with UNMODIFIED bleak against a user-space BlueZ on a private D-Bus bus.

The simulator registers a real GATT application and advertisement on bluezoo's
``hci0`` through the BlueZ D-Bus API; the gateway's :class:`Vm1BleLink` scans,
connects (bleak-retry-connector) and subscribes on ``hci1``. Nothing in bleak is
replaced or patched; bluezoo runs with the three BlueZ-fidelity fixes listed in
``tests/ble_fixtures.py`` (see ``docs/ble-testing.md``). A missing dbus-daemon
or bluezoo skips these tests locally and fails them under CI=true.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from devicegw.errors import TransportError
from drivers.backoff import Backoff
from drivers.clock import ScaledClock
from drivers.transport.ble_link import (
    BATTERY_LEVEL_UUID,
    MANUFACTURER_NAME_UUID,
    SERIAL_NUMBER_UUID,
    VM1_SERVICE_UUID,
    Vm1BleLink,
    vm1_local_name,
)
from drivers.vm1.codec import decode_payload, encode_payload
from drivers.vm1.messages import (
    Ack,
    AckResult,
    DeviceState,
    GetInfo,
    Ident,
    Message,
    Output,
    Ping,
    SessionStart,
    SetRate,
    Start,
    Status,
)
from simulators.scenario import Scenario, parse_scenario
from simulators.vm1_ble import MANUFACTURER, Vm1BleSimulator
from tests.ble_fixtures import (
    GATEWAY_ADAPTER,
    PERIPHERAL_ADAPTER,
    BluezooEnv,
    bluez,  # noqa: F401 - the fixture
)

pytestmark = pytest.mark.timeout(90)

SERIAL = "VM1-BLE001"
NAME = vm1_local_name(SERIAL)
SCALE = 10  # 1 s of device time = 100 ms


def scenario(**device: Any) -> Scenario:
    """Filled at power-on; the button is pressed only at 3000 s, so tests start it with START."""
    return parse_scenario(
        {
            "device": {"serial_no": SERIAL, "seed": 7, "mains": True, "last_session_no": 4}
            | device,
            "sessions": [{"fill_at_s": 0, "fill_ul": 600, "start_at_s": 3000, "rate_ul_min": 800}],
        },
        source="ble.toml",
    )


@pytest.fixture
async def sim(bluez: BluezooEnv) -> AsyncIterator[Vm1BleSimulator]:  # noqa: F811
    async with Vm1BleSimulator(
        scenario(), clock=ScaledClock(SCALE), adapter=PERIPHERAL_ADAPTER
    ) as simulator:
        yield simulator


def link(bluez: BluezooEnv, **kwargs: Any) -> Vm1BleLink:  # noqa: F811
    address = bluez.adapter_address(PERIPHERAL_ADAPTER)
    args: dict[str, Any] = {
        "allow": [address],
        "adapter": GATEWAY_ADAPTER,
        "scan_timeout_s": 8.0,
        "device_id": "neb-ble",
    }
    args.update(kwargs)
    return Vm1BleLink(**args)


async def collect(
    ble: Vm1BleLink, until: Any, timeout: float = 20.0, into: list[Message] | None = None
) -> list[Message]:
    out: list[Message] = [] if into is None else into

    async def run() -> None:
        while not until(out):
            out.append(decode_payload(await ble.read()))

    await asyncio.wait_for(run(), timeout)
    return out


# --------------------------------------------------------------------------- discovery


async def test_discovered_by_name_and_service(bluez: BluezooEnv, sim: Vm1BleSimulator) -> None:  # noqa: F811
    from bleak import BleakScanner

    found = await BleakScanner.discover(
        timeout=3.0, return_adv=True, bluez={"adapter": GATEWAY_ADAPTER}
    )
    matches = [(d, a) for d, a in found.values() if a.local_name == NAME]
    assert len(matches) == 1
    device, adv = matches[0]
    assert device.address == bluez.adapter_address(PERIPHERAL_ADAPTER)
    assert VM1_SERVICE_UUID in adv.service_uuids

    by_name = link(bluez, allow=[NAME], name=NAME)
    assert (await by_name.find()).address == device.address
    by_service = link(bluez)
    assert (await by_service.find()).address == device.address


async def test_discovered_by_address(bluez: BluezooEnv, sim: Vm1BleSimulator) -> None:  # noqa: F811
    address = bluez.adapter_address(PERIPHERAL_ADAPTER)
    device = await link(bluez, address=address.lower()).find()
    assert device.address == address
    assert device.name == NAME


async def test_device_not_on_allow_list_is_never_used(
    bluez: BluezooEnv,  # noqa: F811
    sim: Vm1BleSimulator,
) -> None:
    other = link(bluez, allow=["00:00:5E:00:53:99"], scan_timeout_s=3.0)
    with pytest.raises(TransportError, match="not found: no allow-listed device"):
        await other.open()
    with pytest.raises(ValueError, match="allow-list"):
        link(bluez, allow=["00:00:5E:00:53:99"], address=bluez.adapter_address("hci0"))
    with pytest.raises(ValueError, match="allow-list"):
        Vm1BleLink(allow=[])


# --------------------------------------------------------------------------- connected


async def test_connect_reads_ident_and_streams_notifications(
    bluez: BluezooEnv,  # noqa: F811
    sim: Vm1BleSimulator,
) -> None:
    ble = link(bluez)
    await ble.open()
    try:
        assert ble.connected_address == bluez.adapter_address(PERIPHERAL_ADAPTER)
        msgs = await collect(
            ble, lambda m: any(isinstance(x, Status) and x.state == DeviceState.READY for x in m)
        )
        await ble.write(encode_payload(Start(seq=1)))
        await collect(
            ble, lambda m: sum(isinstance(x, Output) for x in m) >= 20, timeout=30, into=msgs
        )
        first = msgs[0]
        assert isinstance(first, Ident), "the Ident read is the first payload"
        assert (first.model, first.serial_no, first.last_session_no) == ("VM-1", SERIAL, 4)
        assert any(isinstance(m, Status) for m in msgs)
        [start] = [m for m in msgs if isinstance(m, SessionStart)]  # an Events indication
        assert start.session_no == 5
        [ack] = [m for m in msgs if isinstance(m, Ack)]  # a Control point indication
        assert (ack.acked_seq, ack.cmd, ack.result) == (1, 0x83, AckResult.OK)
        assert msgs.index(ack) < msgs.index(start), "ACK before the command's consequences"
        # One device, one seq counter: once subscribed, nothing lost or reordered on the way.
        # (The power-up IDENT waited in Ident; what the device sent before we subscribed is lost.)
        seqs = [m.seq for m in msgs[1:]]
        assert seqs == [(seqs[0] + i) % 256 for i in range(len(seqs))]
    finally:
        await ble.close()


async def test_get_info_acked_on_control_point_then_ident(
    bluez: BluezooEnv,  # noqa: F811
    sim: Vm1BleSimulator,
) -> None:
    ble = link(bluez)
    await ble.open()
    try:
        msgs = await collect(ble, lambda m: any(isinstance(x, Ident) for x in m))
        await ble.write(encode_payload(GetInfo(seq=17)))
        after: list[Message] = []
        await collect(ble, lambda m: any(isinstance(x, Ident) for x in m), into=after)
        [ack] = [m for m in after if isinstance(m, Ack)]
        assert (ack.acked_seq, ack.cmd, ack.result) == (17, 0x81, AckResult.OK)
        ident_at = next(i for i, m in enumerate(after) if isinstance(m, Ident))
        assert after.index(ack) < ident_at, "IDENT follows its ACK, as on serial"
        # A bad argument is refused by the device, over the same path.
        await ble.write(encode_payload(SetRate(seq=18, hz=99)))
        rest = await collect(ble, lambda m: any(isinstance(x, Ack) for x in m))
        [nak] = [m for m in rest if isinstance(m, Ack)]
        assert (nak.acked_seq, nak.result) == (18, AckResult.BAD_ARGUMENT)
        assert sim.counters.commands_received == 2
        assert msgs
    finally:
        await ble.close()


async def test_device_information_and_battery(
    bluez: BluezooEnv,  # noqa: F811
    sim: Vm1BleSimulator,
) -> None:
    from bleak import BleakClient

    device = await link(bluez).find()
    async with BleakClient(device, bluez={"adapter": GATEWAY_ADAPTER}, timeout=10) as client:
        assert bytes(await client.read_gatt_char(MANUFACTURER_NAME_UUID)) == MANUFACTURER.encode()
        assert bytes(await client.read_gatt_char(SERIAL_NUMBER_UUID)) == SERIAL.encode()
        assert bytes(await client.read_gatt_char(BATTERY_LEVEL_UUID)) == b"\x64"  # mains: 100


# --------------------------------------------------------------------------- loss and reconnect


async def test_peripheral_goes_away_link_reports_loss_and_reconnects(
    bluez: BluezooEnv,  # noqa: F811
    sim: Vm1BleSimulator,
) -> None:
    backoff = Backoff(initial_s=0.2, max_s=1.0, rng=random.Random(3))
    ble = link(bluez, scan_timeout_s=2.0)
    await ble.open()
    msgs = await collect(ble, lambda m: len(m) >= 5)
    first_ident = msgs[0]
    assert isinstance(first_ident, Ident)

    await sim.go_away()
    with pytest.raises(TransportError, match="lost: disconnected"):
        await collect(ble, lambda m: False, timeout=10)
    await ble.close()

    # Reconnect loop, as NebulizerRunner runs it: fail, back off (capped, jittered), retry.
    failures: list[str] = []
    delays: list[float] = []

    async def reconnect() -> None:
        while True:
            try:
                await ble.open()
                return
            except TransportError as exc:
                failures.append(str(exc))
                delays.append(backoff.next_delay())
                if len(failures) == 2:
                    await sim.come_back()
                await asyncio.sleep(delays[-1])

    await asyncio.wait_for(reconnect(), 40)
    try:
        assert failures and all("not found" in f for f in failures)
        assert all(0.0 < d <= 1.0 for d in delays)
        again = await collect(ble, lambda m: sum(isinstance(x, Status) for x in m) >= 2)
        ident = again[0]
        assert isinstance(ident, Ident)
        assert ident.seq != first_ident.seq
        # Commands work on the new connection.
        await ble.write(encode_payload(Ping(seq=3)))
        acks = await collect(ble, lambda m: any(isinstance(x, Ack) for x in m))
        assert [a.acked_seq for a in acks if isinstance(a, Ack)] == [3]
        assert sim.counters.disconnects_forced == 1
    finally:
        await ble.close()


async def test_payloads_go_to_the_codec_once_as_the_device_sent_them(
    bluez: BluezooEnv,  # noqa: F811
    sim: Vm1BleSimulator,
) -> None:
    """A message link: each read is one bare payload (no frame, no CRC), so the
    payload decoder takes it as it is, and a write is one bare payload too."""
    from drivers.vm1.stream import encode_for_link, vm1_decoder

    ble = link(bluez)
    assert ble.unit == "message"
    await ble.open()
    try:
        decoder = vm1_decoder(ble.unit)
        msgs: list[Message] = []
        await ble.write(encode_for_link(dataclasses.replace(Ping(), seq=9), ble.unit))
        async with asyncio.timeout(15):
            while not any(isinstance(m, Ack) and m.acked_seq == 9 for m in msgs):
                chunk = await ble.read()
                assert chunk[0] != 0x7E  # not a serial frame: what the characteristic carried
                msgs += decoder.feed(chunk)
        assert isinstance(msgs[0], Ident)
        assert decoder.stats.frames_bad == 0 and decoder.stats.bad_payloads == 0
        assert decoder.stats.frames_ok == decoder.stats.messages == len(msgs)
    finally:
        await ble.close()


# --------------------------------------------------------------------------- missing parts


async def test_missing_adapter_is_a_clear_transport_error(bluez: BluezooEnv) -> None:  # noqa: F811
    ble = link(bluez, adapter="hci7", scan_timeout_s=1.0)
    with pytest.raises(TransportError, match="Bluetooth adapter hci7 not found"):
        await ble.open()


async def test_missing_device_is_a_clear_transport_error(bluez: BluezooEnv) -> None:  # noqa: F811
    ble = link(bluez, scan_timeout_s=1.5)
    with pytest.raises(TransportError, match=r"VM-1 \(by service\) not found"):
        await ble.open()


async def test_simulator_refuses_a_missing_adapter(bluez: BluezooEnv) -> None:  # noqa: F811
    sim = Vm1BleSimulator(scenario(), clock=ScaledClock(SCALE), adapter="hci5")
    with pytest.raises(TransportError, match="adapter hci5 not found"):
        await sim.start()
    await sim.close()


async def test_no_bluez_on_the_bus_is_a_clear_transport_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-such-bus")
    ble = Vm1BleLink(allow=[NAME], name=NAME, adapter=GATEWAY_ADAPTER, scan_timeout_s=1.0)
    with pytest.raises(TransportError, match="BlueZ is not reachable"):
        await ble.open()


# --------------------------------------------------------------------------- the gateway core


class ListSink:
    """GatewaySink that keeps what the gateway would publish."""

    def __init__(self) -> None:
        self.dose_records: list[Any] = []
        self.statuses: list[Any] = []
        self.got_dose_event = asyncio.Event()

    def dose_record(self, device_id: str, record: Any) -> None:
        self.dose_records.append(record)
        self.got_dose_event.set()

    def device_status(self, device_id: str, status: Any) -> None:
        self.statuses.append(status)

    def device_detail(self, device_id: str, detail: Any) -> None:
        pass

    def telemetry(self, device_id: str, telemetry: Any, detail: Any) -> None:
        pass


async def test_nebulizer_runner_over_ble_yields_the_dose_event(bluez: BluezooEnv) -> None:  # noqa: F811
    """The unchanged serial message path (NebulizerRunner -> Vm1Pipeline) over BLE."""
    from devicegw.config import parse_config
    from devicegw.runtime.nebulizer_runner import NebulizerRunner

    clock = ScaledClock(20)
    session = parse_scenario(
        {
            "device": {"serial_no": SERIAL, "seed": 3, "mains": True, "last_session_no": 8},
            "sessions": [{"fill_at_s": 0, "fill_ul": 400, "start_at_s": 60, "rate_ul_min": 1200}],
        },
        source="ble-session.toml",
    )
    config = parse_config(
        {
            "gateway": {"id": "gw1", "site": "site-042"},
            "devices": [
                {
                    "id": "neb-ble",
                    "type": "vm1",
                    "bed": "B01",
                    "subject_id": "CVD-042-0017",
                    "kit_number": "K-10234",
                    "expected_serial": SERIAL,
                    # Not used: the test hands the runner a BLE link factory.
                    "link": {"kind": "serial", "port": "/dev/null"},
                }
            ],
        }
    )
    sink = ListSink()
    runner = NebulizerRunner(
        config.devices[0],
        config,
        link_factory=lambda: link(bluez, scan_timeout_s=3.0),
        clock=clock,
        sink=sink,
    )
    async with Vm1BleSimulator(session, clock=clock, adapter=PERIPHERAL_ADAPTER) as sim:
        task = asyncio.create_task(runner.run(), name="runner")
        try:
            await asyncio.wait_for(sink.got_dose_event.wait(), 45)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    [record] = sink.dose_records
    event = record.event
    assert event.session_no == 9
    assert record.detail.end_reason == "COMPLETE"
    # A short 0.4 mL session, on purpose: the dose rules' verdict, not a link problem.
    assert event.verdict == "partial"
    assert event.reasons == ["duration_below_minimum", "delivered_below_minimum"]
    assert sim.counters.commands_received >= 2  # GET_INFO and SET_CLOCK of the handshake


async def test_a_ble_session_records_what_the_device_sent_and_replays_to_its_dose(
    bluez: BluezooEnv,  # noqa: F811
    tmp_path: Any,
) -> None:
    """A BLE device's recording holds the payloads as the characteristics carried them
    (no frame, no CRC the gateway made), and replaying it gives the live dose event."""
    from devicegw.cli.replay import Player
    from devicegw.config import parse_config
    from devicegw.recording.format import RX, TX, RecordingWriter, iter_records, show_lines
    from devicegw.runtime.link_factory import link_factory
    from devicegw.runtime.nebulizer_runner import NebulizerRunner

    clock = ScaledClock(20)
    session = parse_scenario(
        {
            "device": {"serial_no": SERIAL, "seed": 5, "mains": True, "last_session_no": 2},
            "sessions": [{"fill_at_s": 0, "fill_ul": 400, "start_at_s": 60, "rate_ul_min": 1200}],
        },
        source="ble-record.toml",
    )
    address = bluez.adapter_address(PERIPHERAL_ADAPTER)
    config = parse_config(
        {
            "gateway": {"id": "gw1", "site": "site-042"},
            "devices": [
                {
                    "id": "neb-ble",
                    "type": "vm1",
                    "bed": "B01",
                    "subject_id": "CVD-042-0017",
                    "kit_number": "K-10234",
                    "expected_serial": SERIAL,
                    "link": {"kind": "ble", "address": address, "adapter": GATEWAY_ADAPTER},
                }
            ],
        }
    )
    device = config.devices[0]
    writer = RecordingWriter(tmp_path / "rec", config, run_id="ble-run")
    sink = ListSink()
    runner = NebulizerRunner(
        device,
        config,
        link_factory=link_factory(device),  # the daemon's own: a Vm1BleLink
        clock=clock,
        sink=sink,
        observers=[writer],
    )
    async with Vm1BleSimulator(session, clock=clock, adapter=PERIPHERAL_ADAPTER):
        task = asyncio.create_task(runner.run(), name="runner")
        try:
            await asyncio.wait_for(sink.got_dose_event.wait(), 45)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    writer.close()
    [live] = sink.dose_records
    [path] = writer.paths()

    records = [r for r in iter_records(path) if r.kind in (RX, TX)]
    rx = [r.payload for r in records if r.kind == RX]
    tx = [r.payload for r in records if r.kind == TX]
    assert len(rx) > 10 and tx
    for payload in rx + tx:
        assert payload[0] != 0x7E  # a bare payload, not a frame
        decode_payload(payload)  # each record is exactly one payload
    assert any(isinstance(decode_payload(p), Ident) for p in rx)
    assert any("-> Ident(" in line for line in show_lines(path))

    replayed: list[Any] = []
    Player([path], emit=replayed.append, kinds=("dose",)).run()
    [again] = [e.payload for e in replayed]
    assert again == live.event
