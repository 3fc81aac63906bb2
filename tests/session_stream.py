"""Builds synthetic VM-1 message streams for the session and dose tests, and feeds
them to a pipeline as the serial frames a device would send."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from devicegw.config import Config, parse_config
from devicegw.contract.payloads import (
    DeviceDetail,
    DeviceStatus,
    DoseEvent,
    DoseRecord,
    Telemetry,
    TelemetryDetail,
)
from devicegw.core.session_tracker import Rx
from devicegw.core.vm1_pipeline import Vm1Pipeline
from drivers.vm1.messages import (
    Ack,
    AckResult,
    Alarm,
    DeviceMessage,
    DeviceState,
    EndReason,
    Ident,
    Output,
    SessionEnd,
    SessionRecord,
    SessionStart,
    Status,
)
from drivers.vm1.stream import encode_message_frame

T0 = datetime(2026, 11, 25, 8, 0, tzinfo=UTC)


class StreamBuilder:
    """Emits messages the way a VM-1 would, with device and gateway times in step."""

    def __init__(self, start_ms: int = 10_000) -> None:
        self.t_ms = start_ms
        self.seq = 0
        self.out: list[Rx] = []
        self.cum = 0.0

    def _rx(self, msg_cls: type[DeviceMessage], **fields: object) -> None:
        msg = msg_cls(seq=self.seq, dev_ms=self.t_ms % (1 << 32), **fields)  # type: ignore[arg-type]
        self.seq = (self.seq + 1) % 256
        self.out.append(
            Rx(msg=msg, utc=T0 + timedelta(milliseconds=self.t_ms), mono=self.t_ms / 1e3)
        )

    def ident(self, serial: str = "VM1-000123", last_session_no: int = 41) -> None:
        """The device's IDENT: the gateway uses nothing from a device before it."""
        self._rx(
            Ident,
            model="VM-1",
            serial_no=serial,
            firmware="1.4.2",
            nominal_rate_ul_min=400,
            reservoir_capacity_ul=6000,
            last_session_no=last_session_no,
        )

    def status(self, state: DeviceState, reservoir: int = 3000, flags: int = 0x09) -> None:
        level = None if reservoir == 0xFFFF else reservoir  # the ICD's "unknown"
        self._rx(Status, state=state, reservoir_ul=level, battery_pct=80, flags=flags)

    def start(self, session_no: int = 42, fill: int = 3000, wall_s: int = 1_795_507_200) -> None:
        self.cum = 0.0
        self._rx(SessionStart, session_no=session_no, fill_ul=fill, wall_s=wall_s)
        self.status(DeviceState.NEBULIZING, fill)

    def nebulize(
        self, seconds: float, rate: int = 400, hz: int = 10, state: DeviceState | None = None
    ) -> None:
        n = round(seconds * hz)
        for _ in range(n):
            self.t_ms += 1000 // hz
            self.cum += rate / 60.0 / hz
            self._rx(Output, rate_ul_min=rate, cum_ul=round(self.cum))

    def pause(self, seconds: float, hz: int = 10) -> None:
        self.status(DeviceState.PAUSED, flags=0x08)
        self.nebulize(seconds, rate=0, hz=hz)
        self.status(DeviceState.NEBULIZING)

    def alarm(self, code: int, active: bool) -> None:
        self._rx(Alarm, code=code, active=active)

    def end(self, reason: EndReason, residual: int, neb_ms: int, session_no: int = 42) -> None:
        self._rx(
            SessionEnd,
            session_no=session_no,
            reason=reason,
            neb_ms=neb_ms,
            cum_ul=round(self.cum),
            residual_ul=residual,
        )
        self.status(DeviceState.DONE, residual)

    def ack(self, acked_seq: int, cmd: int, result: AckResult = AckResult.OK) -> None:
        self._rx(Ack, acked_seq=acked_seq, cmd=cmd, result=result)

    def record(self, record: dict[str, int | EndReason]) -> None:
        """A SESSION_RECORD (reply to GET_SESSION) with these fields."""
        self._rx(SessionRecord, **record)

    def reboot(self, uptime_ms: int = 2_000) -> None:
        """The device restarts: uptime and its sequence numbers begin again."""
        self.t_ms = uptime_ms
        self.seq = 0

    def skip(self, seconds: float) -> None:
        self.t_ms += round(seconds * 1000)


def one_device_config(
    *, rules: dict[str, float] | None = None, sha256: str = "", **device: object
) -> Config:
    """A gateway with one VM-1 on bed B01 (``device`` overrides its settings)."""
    settings: dict[str, object] = {
        "id": "neb-bed01",
        "type": "vm1",
        "bed": "B01",
        "subject_id": "CVD-042-0017",
        "kit_number": "K-10234",
        "link": {"kind": "serial", "port": "/dev/ttyUSB0"},
        **device,
    }
    data: dict[str, object] = {"gateway": {"id": "gw1", "site": "site-042"}, "devices": [settings]}
    if rules:
        data["dose_rules"] = rules
    return parse_config(data, sha256=sha256)


def device_log_record(**fields: int | EndReason) -> dict[str, int | EndReason]:
    """A SESSION_RECORD's fields: session 42, 3.0 mL fill, 2.9 mL out, clock never set."""
    record: dict[str, int | EndReason] = {
        "session_no": 42,
        "start_wall_s": 0,
        "fill_ul": 3000,
        "reason": EndReason.COMPLETE,
        "neb_ms": 435_000,
        "cum_ul": 2900,
        "residual_ul": 100,
        "end_wall_s": 0,
    }
    record.update(fields)
    return record


class ListSink:
    """A GatewaySink that keeps what a pipeline sends (the daemon sends it to MQTT)."""

    def __init__(self) -> None:
        self.events: list[DoseEvent] = []
        self.records: list[DoseRecord] = []
        self.statuses: list[DeviceStatus] = []
        self.details: list[DeviceDetail] = []

    def dose_record(self, device_id: str, record: DoseRecord) -> None:
        self.events.append(record.event)
        self.records.append(record)

    def device_status(self, device_id: str, status: DeviceStatus) -> None:
        self.statuses.append(status)

    def device_detail(self, device_id: str, detail: DeviceDetail) -> None:
        self.details.append(detail)

    def telemetry(self, device_id: str, telemetry: Telemetry, detail: TelemetryDetail) -> None:
        pass


def feed(pipeline: Vm1Pipeline, b: StreamBuilder, start: int = 0) -> int:
    """Feed the builder's messages from ``start`` as serial frames; returns the new start."""
    for rx in b.out[start:]:
        pipeline.feed(encode_message_frame(rx.msg), rx.utc, rx.mono)
    return len(b.out)
