"""Pulse oximeters over BLE, end to end: UNMODIFIED bleak against bluezoo on a private bus.

A PLX oximeter (Bluetooth SIG Pulse Oximeter Service) and a BerryMed BCI
oximeter, each simulated from the physiology model and registered as a real
GATT application + advertisement on its own bluezoo adapter (bluezoo reports
one advertisement per adapter): PLX on ``hci0``, BerryMed on ``hci2`` (added
at run time through bluezoo's ``org.bluezoo.Manager1.AddAdapter``); the
gateway's links scan and connect on ``hci1``. The ``bluez`` fixture is
``tests/ble_fixtures.py`` (the sandbox with its three BlueZ-fidelity patches is
``simulators/ble_sandbox.py``; see ``docs/ble-testing.md``).
A missing dbus-daemon or bluezoo skips these tests locally and fails them
under CI=true.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from devicegw.errors import TransportError
from devicegw.runtime.reconnect import open_until_up
from drivers.backoff import Backoff
from drivers.clock import ScaledClock
from drivers.oximeter import plx
from drivers.oximeter.berrymed import BERRYMED_SERVICE_UUID, BerryMedPacket
from drivers.oximeter.downsample import BerryMedDownsampler, ReceivedSample
from drivers.oximeter.sample import QualityFlag
from drivers.transport.ble_oximeter_link import (
    BerryMedBleLink,
    OximeterBleLink,
    PlxBleLink,
)
from simulators.errors import ScenarioError
from simulators.oximeter_ble import BerryMedBleSimulator, PlxBleSimulator
from simulators.oximeter_scenario import OximeterScenario, parse_oximeter_scenario
from tests.ble_fixtures import (
    ADAPTER_ADDRESSES,
    GATEWAY_ADAPTER,
    PERIPHERAL_ADAPTER,
    BluezooEnv,
    bluez,  # noqa: F401 - the fixture
)

pytestmark = pytest.mark.timeout(60)

SCALE = 5  # 1 s of device time = 200 ms
BERRYMED_ADAPTER = "hci2"
BERRYMED_ADDRESS = ADAPTER_ADDRESSES[2]  # the sandbox's address for hci2
PLX_NAME = "Nonin3230 PLX-0001"
MOTION = (20.0, 30.0)  # device seconds: motion artefact on both oximeters
BASELINE = {"plx": 96.0, "berrymed": 94.0}
#: Measured SpO2 of a trustworthy reading stays this close to the baseline
#: (noise SD 0.4 + drift SD 0.5: more than 4 SD).
SPO2_BAND = 4.0


def scenario(protocol: str) -> OximeterScenario:
    serial = "PLX-0001" if protocol == "plx" else "BM-0002"
    return parse_oximeter_scenario(
        {
            "bed": "B01",
            "subject_id": "CVD-042-0017",
            "oximeter": {"protocol": protocol, "model": "Nonin3230", "serial_no": serial}
            | {"seed": 11 if protocol == "plx" else 12},
            "subject": {"baseline_spo2": BASELINE[protocol], "baseline_pulse_bpm": 78},
            "motion": [{"at_s": MOTION[0], "duration_s": MOTION[1] - MOTION[0]}],
        },
        source=f"{protocol}.toml",
    )


async def add_adapter(env: BluezooEnv, name: str, address: str) -> None:
    """A third bluezoo adapter (powered: bluezoo runs with --auto-enable)."""
    from dbus_fast import BusType, Message, MessageType
    from dbus_fast.aio import MessageBus

    bus = await MessageBus(bus_address=env.address, bus_type=BusType.SYSTEM).connect()
    try:
        reply = await bus.call(
            Message(
                destination="org.bluez",
                path="/org/bluezoo",
                interface="org.bluezoo.Manager1",
                member="AddAdapter",
                signature="ys",
                body=[int(name.removeprefix("hci")), address],
            )
        )
        assert reply is not None and reply.message_type == MessageType.METHOD_RETURN, reply
    finally:
        bus.disconnect()


@pytest.fixture
def clock() -> ScaledClock:
    return ScaledClock(SCALE)


@pytest.fixture
async def plx_sim(bluez: BluezooEnv, clock: ScaledClock) -> AsyncIterator[PlxBleSimulator]:  # noqa: F811
    async with PlxBleSimulator(
        scenario("plx"), clock=clock, adapter=PERIPHERAL_ADAPTER, spot_check_interval_s=5.0
    ) as sim:
        yield sim


@pytest.fixture
async def berrymed_sim(
    bluez: BluezooEnv,  # noqa: F811
    clock: ScaledClock,
) -> AsyncIterator[BerryMedBleSimulator]:
    await add_adapter(bluez, BERRYMED_ADAPTER, BERRYMED_ADDRESS)
    # 23-byte notifications: packets straddle notifications, as the stream decoder must handle.
    async with BerryMedBleSimulator(
        scenario("berrymed"), clock=clock, adapter=BERRYMED_ADAPTER, chunk_bytes=23
    ) as sim:
        yield sim


def plx_link(bluez: BluezooEnv, clock: ScaledClock, **kwargs: Any) -> PlxBleLink:  # noqa: F811
    args: dict[str, Any] = {
        "allow": [PLX_NAME],
        "name": PLX_NAME,
        "adapter": GATEWAY_ADAPTER,
        "clock": clock,
        "scan_timeout_s": 8.0,
        "device_id": "ox-plx",
    }
    return PlxBleLink(**(args | kwargs))


def berrymed_link(clock: ScaledClock, **kwargs: Any) -> BerryMedBleLink:
    args: dict[str, Any] = {
        "allow": [BERRYMED_ADDRESS],
        "adapter": GATEWAY_ADAPTER,
        "clock": clock,
        "scan_timeout_s": 8.0,
        "device_id": "ox-bm",
    }
    return BerryMedBleLink(**(args | kwargs))


async def collect(
    link: OximeterBleLink,
    until: Callable[[list[ReceivedSample]], bool],
    timeout: float = 20.0,
    into: list[ReceivedSample] | None = None,
) -> list[ReceivedSample]:
    out: list[ReceivedSample] = [] if into is None else into

    async def run() -> None:
        while not until(out):
            out.extend(await link.read_samples())

    await asyncio.wait_for(run(), timeout)
    return out


def device_time(
    sim: PlxBleSimulator | BerryMedBleSimulator, clock: ScaledClock
) -> Callable[[float], float]:
    """Gateway receive time (clock.monotonic()) -> the simulator's scenario time."""
    t0 = clock.monotonic() - sim.device_time()
    return lambda t_s: t_s - t0


def in_motion(t: float, margin: float = 0.0) -> bool:
    return MOTION[0] - margin <= t < MOTION[1] + margin


def assert_plx_follows_model(sim: PlxBleSimulator, samples: list[ReceivedSample]) -> int:
    """Continuous samples are consecutive model seconds, decoded exactly; returns the first k."""
    continuous = [s for s in samples if s.kind == "continuous"]
    assert continuous
    first = continuous[0].sample
    candidates = [
        k
        for k in range(0, 400)
        if (m := sim.sim.measurement(k)) is not None and plx.to_sample(m) == first
    ]
    assert candidates, "the first sample is not any second of the model"
    k0 = candidates[0]
    for i, got in enumerate(continuous):
        state = sim.model.value_at(k0 + i)
        s = got.sample
        if state.measured_spo2 is None:
            assert s.spo2 is None
            continue
        assert s.spo2 is not None and s.pulse_bpm is not None
        assert abs(s.spo2 - state.measured_spo2) <= 0.051, (i, s, state)
        assert state.measured_pulse_bpm is not None
        assert abs(s.pulse_bpm - state.measured_pulse_bpm) <= 0.051
        if state.motion:
            assert {QualityFlag.ERRATIC_SIGNAL, QualityFlag.ARTIFACT} <= s.quality
            assert QualityFlag.QUESTIONABLE in s.quality and not s.valid
        else:
            assert s.valid, (i, s)
            assert abs(s.spo2 - BASELINE["plx"]) <= SPO2_BAND
    return k0


# --------------------------------------------------------------------------- streaming


async def test_plx_and_berrymed_discovered_connected_streaming(
    bluez: BluezooEnv,  # noqa: F811
    clock: ScaledClock,
    plx_sim: PlxBleSimulator,
    berrymed_sim: BerryMedBleSimulator,
) -> None:
    plx_to_device = device_time(plx_sim, clock)
    bm_to_device = device_time(berrymed_sim, clock)
    ox_plx = plx_link(bluez, clock)  # by advertised name
    ox_bm = berrymed_link(clock)  # by service UUID, address on the allow-list
    await asyncio.gather(ox_plx.open(), ox_bm.open())
    try:
        assert ox_plx.connected_address == bluez.adapter_address(PERIPHERAL_ADAPTER)
        assert ox_bm.connected_address == BERRYMED_ADDRESS
        assert ox_plx.features == plx_sim.features
        assert ox_plx.features is not None
        assert plx.SupportedFeatures.TIMESTAMP_FOR_SPOT_CHECK in ox_plx.features.supported
        assert ox_plx.spot_check_subscribed

        def past_motion(to_device: Callable[[float], float]) -> Any:
            return lambda got: bool(got) and to_device(got[-1].t_s) > MOTION[1] + 4

        plx_samples, bm_samples = await asyncio.gather(
            collect(ox_plx, past_motion(plx_to_device), timeout=30),
            collect(ox_bm, past_motion(bm_to_device), timeout=30),
        )
    finally:
        await asyncio.gather(ox_plx.close(), ox_bm.close())

    # PLX: one Continuous Measurement per device second, the model's values, flagged in motion.
    assert_plx_follows_model(plx_sim, plx_samples)
    continuous = [s for s in plx_samples if s.kind == "continuous"]
    assert any(not s.sample.valid for s in continuous), "the motion period was streamed"
    spot = [s for s in plx_samples if s.kind == "spot_check"]
    assert spot, "spot-check indications arrive too"
    assert all(s.sample.source == "ble-plx" for s in plx_samples)
    assert all(s.utc.tzinfo is UTC for s in plx_samples)
    for s in spot:
        t = plx_to_device(s.t_s)
        assert abs(t / 5.0 - round(t / 5.0)) * 5.0 < 1.0, "spot-check every 5 s of device time"
        if not in_motion(t, margin=1.0):
            assert s.sample.valid
            assert s.sample.spo2 is not None
            assert abs(s.sample.spo2 - BASELINE["plx"]) <= SPO2_BAND
    rate = (len(continuous) - 1) / (continuous[-1].t_s - continuous[0].t_s)
    assert 0.8 < rate < 1.25, rate  # per second of the (shared, scaled) clock

    # BerryMed: ~100 packets/s through the byte-stream decoder, at most one sample per second.
    assert ox_bm.decoder.stats.resyncs <= 1  # at most joining the stream mid-packet
    starts = [b.window_start_s - a.window_start_s for a, b in itertools.pairwise(bm_samples)]
    assert min(starts) >= 1.0  # the promise: at most one window (sample) per second
    assert max(starts) < 3.0  # (a loaded machine may deliver a window late, never early)
    # t_s is each window's last packet: no later than the next window's first. (Receipt
    # times: a loaded machine bunches packets, so the gap between two t_s has no lower
    # bound -- 0.49 s was seen with the other core busy.)
    assert all(a.t_s <= b.window_start_s for a, b in itertools.pairwise(bm_samples))
    middle = bm_samples[1:-1]
    mean_packets = sum(s.packets for s in middle) / len(middle)
    assert 95 <= mean_packets <= 110, mean_packets  # ~100 packets per window
    for s in middle:
        assert len(s.sample.pleth) == s.packets
        assert s.window_start_s < s.t_s
    flagged = 0
    for s in bm_samples:
        start, end = bm_to_device(s.window_start_s), bm_to_device(s.t_s)
        if MOTION[0] + 0.5 <= start and end < MOTION[1]:  # the whole window in motion
            assert QualityFlag.SEARCHING in s.sample.quality and not s.sample.valid
            flagged += 1
        elif end < MOTION[0] - 0.5 or start > MOTION[1] + 0.5:  # clear of it
            assert s.sample.valid, s
            assert s.sample.spo2 is not None
            assert abs(s.sample.spo2 - BASELINE["berrymed"]) <= SPO2_BAND
            assert s.sample.signal_strength is not None and s.sample.signal_strength >= 6
    assert flagged >= 7, "about 10 s of motion"
    assert ox_bm.stats.malformed == 0 and ox_plx.stats.malformed == 0


# --------------------------------------------------------------------------- loss and reconnect


async def test_plx_goes_away_link_reports_loss_and_reconnects(
    bluez: BluezooEnv,  # noqa: F811
    clock: ScaledClock,
    berrymed_sim: BerryMedBleSimulator,
) -> None:
    async with PlxBleSimulator(scenario("plx"), clock=clock, adapter=PERIPHERAL_ADAPTER) as sim:
        ox_plx = plx_link(bluez, clock, scan_timeout_s=1.5)
        ox_bm = berrymed_link(clock)
        await asyncio.gather(ox_plx.open(), ox_bm.open())
        try:
            assert not ox_plx.spot_check_subscribed, "not offered, not subscribed"
            before = await collect(ox_plx, lambda got: len(got) >= 3)

            await sim.go_away()
            with pytest.raises(TransportError, match="lost: disconnected") as lost:
                await collect(ox_plx, lambda got: False, timeout=10)
            assert lost.value.device_id == "ox-plx"
            with pytest.raises(TransportError, match="lost"):  # and stays lost
                await ox_plx.read_samples()
            # The other oximeter is not affected.
            await collect(ox_bm, lambda got: len(got) >= 2, timeout=10)

            # The runners' reconnect loop: capped, jittered backoff on the clock; the device
            # returns meanwhile.
            delays: list[float] = []
            failures: list[TransportError] = []

            class RecordedBackoff(Backoff):
                def next_delay(self) -> float:
                    delays.append(super().next_delay())
                    return delays[-1]

            def failed(exc: TransportError, first: bool) -> None:
                failures.append(exc)
                if len(failures) == 2:
                    asyncio.get_running_loop().create_task(sim.come_back())

            backoff = RecordedBackoff(initial_s=1.0, max_s=2.0, rng=random.Random(5))
            await ox_plx.close()
            reopened = await asyncio.wait_for(
                open_until_up(
                    lambda: ox_plx,
                    clock=clock,
                    backoff=backoff,
                    log=logging.getLogger("test"),
                    what="oximeter link",
                    device_id="ox-plx",
                    on_failure=failed,
                ),
                30,
            )
            assert reopened is ox_plx
            assert len(failures) >= 2
            assert all("PLX oximeter 'Nonin3230 PLX-0001' not found" in str(f) for f in failures)
            assert len(delays) == len(failures)
            assert all(0.5 <= d <= 2.0 for d in delays)

            after = await collect(ox_plx, lambda got: len(got) >= 4)
            k_before = assert_plx_follows_model(sim, before)
            k_after = assert_plx_follows_model(sim, after)
            assert k_after > k_before + len(before), "a gap: values sent while away are lost"
            assert sim.counters.disconnects_forced == 1
            assert sim.counters.values_lost > 0
            assert ox_plx.stats.connections == 2
            await collect(ox_bm, lambda got: len(got) >= 1, timeout=10)
        finally:
            await asyncio.gather(ox_plx.close(), ox_bm.close())


async def test_berrymed_loss_delivers_the_partial_window_first(
    clock: ScaledClock,
    berrymed_sim: BerryMedBleSimulator,
) -> None:
    ox_bm = berrymed_link(clock, window_s=4.0)
    await ox_bm.open()
    try:
        await collect(ox_bm, lambda got: len(got) >= 1)
        await asyncio.sleep(0.3)  # > 1 s of device time into the next 4 s window
        await berrymed_sim.go_away()
        got: list[ReceivedSample] = []
        with pytest.raises(TransportError, match="lost: disconnected"):
            await collect(ox_bm, lambda _: False, timeout=10, into=got)
        assert got, "the window in progress is delivered before the loss"
        assert got[-1].packets < 400  # a partial 4 s window (100 packets/s)
    finally:
        await ox_bm.close()


# --------------------------------------------------------------------------- allow-list, errors


async def test_devices_not_on_the_allow_list_are_never_used(
    bluez: BluezooEnv,  # noqa: F811
    clock: ScaledClock,
    plx_sim: PlxBleSimulator,
    berrymed_sim: BerryMedBleSimulator,
) -> None:
    # Both advertise and are seen by the scan...
    found = await berrymed_link(clock, allow=[BERRYMED_ADDRESS, PLX_NAME]).find()
    assert found.address == BERRYMED_ADDRESS
    plx_address = bluez.adapter_address(PERIPHERAL_ADAPTER)
    by_address = plx_link(bluez, clock, allow=[plx_address], name=None, address=plx_address.lower())
    assert (await by_address.find()).name == PLX_NAME
    # ...but neither is connected to unless allow-listed.
    other = berrymed_link(clock, allow=["00:00:5E:00:53:99"], scan_timeout_s=1.5)
    with pytest.raises(TransportError, match=r"BerryMed oximeter \(by service\) not found"):
        await other.open()
    plx_other = plx_link(bluez, clock, allow=["00:00:5E:00:53:98"], name=None, scan_timeout_s=1.5)
    with pytest.raises(TransportError, match="no allow-listed device"):
        await plx_other.open()
    # An allow-listed device that does not offer the wanted service is not taken either.
    wrong = berrymed_link(clock, allow=[bluez.adapter_address(PERIPHERAL_ADAPTER)])
    wrong.central.scan_timeout_s = 1.5
    with pytest.raises(TransportError, match="not found"):
        await wrong.open()
    assert plx_sim.counters.notifications_sent == 0
    assert berrymed_sim.counters.notifications_sent == 0
    with pytest.raises(ValueError, match="allow-list"):
        plx_link(bluez, clock, allow=[PLX_NAME], name="Somebody else")
    with pytest.raises(ValueError, match="allow-list"):
        berrymed_link(clock, address="00:00:5E:00:53:99")
    with pytest.raises(ValueError, match="allow-list"):
        PlxBleLink(allow=[])


async def test_missing_adapter_and_device_are_clear_transport_errors(
    bluez: BluezooEnv,  # noqa: F811
    clock: ScaledClock,
) -> None:
    with pytest.raises(TransportError, match="Bluetooth adapter hci7 not found"):
        await plx_link(bluez, clock, adapter="hci7", scan_timeout_s=1.0).open()
    with pytest.raises(TransportError, match="PLX oximeter 'Nonin3230 PLX-0001' not found"):
        await plx_link(bluez, clock, scan_timeout_s=1.0).open()
    sim = PlxBleSimulator(scenario("plx"), clock=clock, adapter="hci5")
    with pytest.raises(TransportError, match="adapter hci5 not found"):
        await sim.start()
    await sim.close()
    with pytest.raises(ScenarioError, match="speaks 'berrymed'"):
        BerryMedBleSimulator(scenario("plx"), clock=clock)


async def test_no_bluez_on_the_bus_is_a_clear_transport_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, clock: ScaledClock
) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-such-bus")
    with pytest.raises(TransportError, match="BlueZ is not reachable"):
        await berrymed_link(clock, scan_timeout_s=1.0).open()


# --------------------------------------------------------------------------- downsampling (pure)


def _packet(spo2: int | None, pr: int | None = 80, **flags: Any) -> BerryMedPacket:
    fields: dict[str, Any] = {
        "signal_strength": 7,
        "no_signal": False,
        "probe_unplugged": False,
        "pulse_beep": False,
        "pleth": 50,
        "bargraph": 5,
        "no_finger": False,
        "searching": False,
        "pulse_rate": pr,
        "spo2": spo2,
    }
    return BerryMedPacket(**(fields | flags))


def test_downsampler_median_of_valid_values_and_union_of_flags() -> None:
    utc = datetime(2026, 1, 1, tzinfo=UTC)
    ds = BerryMedDownsampler(1.0)
    out = [ds.add(i / 100, utc, _packet(95 + i % 3, pleth=i)) for i in range(100)]
    assert out == [None] * 100
    # One "searching" packet with a bogus value in the second window.
    out = [ds.add(1.0 + i / 100, utc, _packet(97, 90 + (i % 2))) for i in range(99)]
    first = out[0]
    assert first is not None and out[1:] == [None] * 98
    assert (first.packets, first.window_start_s, first.t_s) == (100, 0.0, 0.99)
    assert first.sample.spo2 == 96.0 and first.sample.pulse_bpm == 80.0
    assert first.sample.valid and first.sample.pleth == tuple(range(100))
    assert ds.add(1.995, utc, _packet(70, 140, searching=True)) is None
    second = ds.flush()
    assert second is not None and second.packets == 100
    assert second.sample.spo2 == 97.0, "the bogus value does not move the median"
    assert second.sample.pulse_bpm == 90.0  # 50 x 90, 49 x 91
    assert QualityFlag.SEARCHING in second.sample.quality and not second.sample.valid
    assert ds.flush() is None
    # No valid packet: the present values' median, flagged; no values at all: None.
    ds.add(5.0, utc, _packet(None, None, no_finger=True))
    ds.add(5.1, utc, _packet(80, 120, searching=True))
    ds.add(5.2, utc, _packet(82, 124, searching=True))
    third = ds.flush()
    assert third is not None
    assert (third.sample.spo2, third.sample.pulse_bpm) == (81.0, 122.0)
    assert {QualityFlag.NO_FINGER, QualityFlag.SEARCHING} <= third.sample.quality
    ds.add(6.0, utc, _packet(None, None, probe_unplugged=True, no_signal=True))
    fourth = ds.flush()
    assert fourth is not None and fourth.sample.spo2 is None and fourth.sample.pulse_bpm is None
    with pytest.raises(ValueError):
        BerryMedDownsampler(0)


def test_received_sample_window_start_defaults_to_receive_time() -> None:
    from drivers.oximeter.sample import OximeterSample

    s = ReceivedSample(OximeterSample(spo2=97, pulse_bpm=70, source="x"), 12.5, datetime.now(UTC))
    assert s.window_start_s == 12.5 and s.packets == 1 and s.kind == "continuous"
    assert not math.isnan(s.window_start_s)
    assert BERRYMED_SERVICE_UUID == BerryMedBleLink.SERVICE_UUID
