"""A VM-1's bytes -> sessions -> dose events; no link, no clock and no database of its own.

It reads nothing and opens nothing: the caller hands it bytes and clock
readings. Its outputs do cause I/O, through what the runtime injects: the
sink (dose records, statuses, telemetry -> the outbox, SQLite), the session
journal and the audit trail (SQLite), all reached only through the small
protocols of :mod:`devicegw.core.ports` and :class:`GatewaySink`.

The live runner (``nebulizer_runner.py``) and the replayer feed the same
pipeline with received bytes and the gateway's clock readings at receipt, so a
replayed recording yields byte-identical dose events. Outputs go to a
:class:`GatewaySink`; requests for the device (fetch a session record) and
ACKs are returned to the caller, who owns the link.

Identity before data: nothing a device sends becomes part of a session until
an IDENT has been received on that connection and accepted by the allow-list.
Messages before it are held (at most ``PRE_IDENT_HOLD``, the oldest dropped
and counted) and replayed, in order, once the IDENT arrives; a refused IDENT
discards them. So a dose event always names the device that delivered it, and
a session that starts just before the IDENT is kept (docs/vm1-interface-notes.md).
"""

from __future__ import annotations

import logging
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import NamedTuple, NoReturn, Protocol

from devicegw.config import Config, DeviceSettings
from devicegw.contract.payloads import (
    DeviceDetail,
    DeviceStatus,
    DoseRecord,
    Telemetry,
    TelemetryDetail,
    dose_event_id,
)
from devicegw.contract.spo2 import Spo2Summary, UnavailableReason
from devicegw.contract.vocabulary import DataSource, Reason
from devicegw.core.bed_monitor import BedMonitor
from devicegw.core.dose_check import assess
from devicegw.core.dose_event import build_dose_record, device_identity
from devicegw.core.ports import (
    Attribution,
    Attributor,
    AuditKind,
    AuditLog,
    DoseSchedule,
    RecordedDose,
    SessionJournalPort,
    StaticAttributor,
)
from devicegw.core.session_tracker import (
    AlarmChanged,
    FetchSessionRecord,
    FinishedSession,
    Rx,
    SessionFinished,
    SessionStarted,
    SessionTracker,
    wall_to_utc,
)
from devicegw.core.spo2_monitor import unavailable_summary
from devicegw.errors import TransportError
from drivers.link_unit import LinkUnit
from drivers.vm1.messages import (
    Ack,
    AckResult,
    DeviceMessage,
    GetInfo,
    GetSession,
    Ident,
    MsgType,
    Output,
    Ping,
    SetClock,
    SetRate,
    Start,
    Status,
    Stop,
    alarm_name,
)
from drivers.vm1.stream import Vm1StreamDecoder, vm1_decoder

log = logging.getLogger(__name__)

HOST_COMMAND_TYPES = (GetInfo, SetClock, SetRate, GetSession, Start, Stop, Ping)
_HOST_COMMAND_CLASSES: frozenset[type] = frozenset(HOST_COMMAND_TYPES)
_NO_ALARMS: frozenset[int] = frozenset()
_new_tuple = tuple.__new__
GET_SESSION = int(MsgType.GET_SESSION)


class GatewaySink(Protocol):
    """Where a device's outputs go (MQTT in the daemon; a list in tests and replays).

    Each blinded message has a restricted counterpart (docs/blinding.md): a dose
    record is both, committed together; telemetry comes as a pair at the same
    cadence; device status and device detail are sent each when its own content
    changes, so nothing restricted (an alarm) shows as a blinded message.
    """

    def dose_record(self, device_id: str, record: DoseRecord) -> None: ...

    def device_status(self, device_id: str, status: DeviceStatus) -> None: ...

    def device_detail(self, device_id: str, detail: DeviceDetail) -> None: ...

    def telemetry(self, device_id: str, telemetry: Telemetry, detail: TelemetryDetail) -> None: ...


class UnexpectedDeviceError(TransportError):
    """The device on a configured port is not the one on the allow-list."""


class SerialClaims:
    """Which configured device is using each VM-1 identity (model, serial) now.

    One per gateway, shared by its pipelines. Two devices reporting the same serial
    number would give their sessions the same event ids (the id is built from model,
    serial and session number), so the second to identify itself is refused while the
    first is connected, and the first bed's dose events stay its own (issue 13).
    """

    def __init__(self) -> None:
        self._holder: dict[tuple[str, str], str] = {}
        self._held: dict[str, tuple[str, str]] = {}

    def claim(self, model: str, serial_no: str, device_id: str) -> str | None:
        """Take (model, serial) for ``device_id``; the device holding it already, if not."""
        key = (model, serial_no)
        holder = self._holder.get(key)
        if holder is not None and holder != device_id:
            return holder
        self.release(device_id)  # a device holds one identity at a time
        self._holder[key] = device_id
        self._held[device_id] = key
        return None

    def release(self, device_id: str) -> None:
        key = self._held.pop(device_id, None)
        if key is not None and self._holder.get(key) == device_id:
            del self._holder[key]


@dataclass(slots=True)
class DeviceHealth:
    connected: bool = False
    connects: int = 0
    last_frame_mono: float | None = None
    frames_ok: int = 0
    frames_bad: int = 0
    frames_lost: int = 0
    refused: str | None = None
    last_error: str | None = None
    open_failures: int = 0  # attempts to open the link that failed
    refusals: int = 0  # connections refused by the allow-list
    #: An IDENT was received and accepted on the current connection.
    identified: bool = False
    #: Messages held because they came before the connection's IDENT, and of those the
    #: ones dropped because the device did not identify itself in time.
    held_before_ident: int = 0
    dropped_before_ident: int = 0
    #: Why the device is not (yet) in use, when it is connected but has not identified;
    #: or what is wrong with its identification (an IDENT flood) while it is in use.
    identity_note: str | None = None
    #: IDENTs repeating the connection's identity within IDENT_REPEAT_MIN_S: not processed.
    idents_ignored: int = 0
    sessions_started: int = 0
    #: Finished sessions by verdict (what /metrics counts).
    verdicts: dict[str, int] = field(default_factory=dict)


class PipelineResult(NamedTuple):  # immutable; one per chunk fed, so cheap to build
    acks: list[Ack]
    fetch: list[int]  # session numbers whose record must be fetched (GET_SESSION)
    identified: bool = False  # this feed carried the connection's first accepted IDENT


JOURNAL_INTERVAL_S = 5.0
#: A VM-1 sends IDENT at power-up, on port open and in answer to GET_INFO: a few a minute.
#: Repeats of the same identity closer together than this are counted, not processed.
IDENT_REPEAT_MIN_S = 1.0
#: Ignored repeats on one connection before the device is reported as flooding IDENT.
IDENT_FLOOD_REPORT = 20
RECONCILE_MAX = 16  # the device keeps its last 16 sessions
#: Messages held until a connection's IDENT: ~45 s of a VM-1 at 10 Hz OUTPUT + 1 Hz STATUS.
PRE_IDENT_HOLD = 512


class Vm1Pipeline:
    def __init__(
        self,
        device: DeviceSettings,
        config: Config,
        sink: GatewaySink,
        *,
        journal: SessionJournalPort | None = None,
        audit: AuditLog | None = None,
        bed: BedMonitor | None = None,
        attributor: Attributor | None = None,
        schedule: DoseSchedule | None = None,
        claims: SerialClaims | None = None,
        telemetry: bool = True,
    ) -> None:
        """``telemetry=False``: build no telemetry at all, for a sink that would drop it
        (a replay not asked for it); everything else comes out the same."""
        self.device = device
        self._telemetry = telemetry
        self.schedule = schedule
        self.claims = claims
        self.bed = bed
        # Whose dose a session is: the bed's assignment at its start (docs/assignments.md);
        # without an assignment service, the configured one.
        self.attributor: Attributor = attributor or StaticAttributor(
            device.subject_id, device.kit_number
        )
        self.config = config
        self.sink = sink
        self.journal = journal
        self.audit = audit
        self._identified: tuple[str, str, str] | None = None
        #: Session-counter resets of the identified device (0: never): part of event ids.
        self._epoch = 0
        self.tracker = SessionTracker()
        self._journaled: tuple[int, float] | None = None  # (session_no, mono of last save)
        if journal is not None:
            saved = journal.load(device.id)
            if saved is not None:
                state, since = saved
                session_no = self.tracker.restore(state, down_since=since)
                log.warning(
                    "resuming a session left open by a gateway restart",
                    extra={"device_id": device.id, "session_no": session_no},
                )
        self.health = DeviceHealth()
        # What one chunk fed to this pipeline is: a slice of the serial byte stream, or
        # one VM-1 payload as a BLE characteristic carried it (ICD section 4). From the
        # configuration, so a replay of a BLE recording decodes what the device sent.
        self.link_unit: LinkUnit = "message" if device.link.kind == "ble" else "stream"
        self._decoder: Vm1StreamDecoder = vm1_decoder(self.link_unit)
        self._bad_seen = 0
        self._lost_seen = 0
        self._last_telemetry = float("-inf")
        self._last_status_key: tuple[object, ...] | None = None
        self._last_detail_key: tuple[object, ...] | None = None
        self._utc: datetime | None = None
        self._held: deque[Rx] = deque()
        self._host_decoder = vm1_decoder(self.link_unit)  # what the gateway sent (GET_SESSION)
        self._asked: dict[int, int] = {}  # host seq -> session_no of a GET_SESSION
        self._ident_mono = float("-inf")  # when the last processed IDENT arrived
        self._ident_repeats = 0  # ignored on this connection

    # -- link lifecycle ----------------------------------------------------------

    def link_up(self, utc: datetime, unit: LinkUnit | None = None) -> None:
        """A link opened; ``unit`` says what its chunks are (default: by the configuration)."""
        if unit is not None:
            self.link_unit = unit
        self._decoder = vm1_decoder(self.link_unit)  # nothing half-received survives a reopen
        self._host_decoder = vm1_decoder(self.link_unit)
        self._asked.clear()
        self._bad_seen = self._lost_seen = 0
        self._ident_mono, self._ident_repeats = float("-inf"), 0
        self._held.clear()
        self.health.identified = False  # whoever is on the port must say who it is again
        self.health.identity_note = None
        self.health.connected = True
        self.health.connects += 1
        self.health.last_error = None
        self.tracker.link_up(utc)

    def link_down(self, utc: datetime, *, error: str | None = None) -> None:
        """The link closed; ``error`` (e.g. why the device was refused) stays in the status:
        a later status must not hide it before it was sent (statuses are latest-wins)."""
        self._held.clear()
        self.health.identified = False
        if self.claims is not None:
            self.claims.release(self.device.id)
        if self.health.connected:
            self.health.connected = False
            self.tracker.link_down(utc)
            self._utc = utc
            self.publish_status(error=error)

    # -- bytes in ----------------------------------------------------------------

    def feed(self, data: bytes, utc: datetime, mono: float) -> PipelineResult:
        """Decode one link chunk received at (``utc``, ``mono``); may raise UnexpectedDeviceError.

        A chunk goes to the codec once: deframed if the link is a byte stream, as a
        payload if it is a message link (:func:`drivers.vm1.stream.vm1_decoder`).
        """
        self._utc = utc
        messages = self._decoder.feed(data)
        stats = self._decoder.stats
        bad = stats.frames_bad + stats.bad_payloads
        if bad != self._bad_seen:
            self.tracker.bad_frames(bad - self._bad_seen)
            self.health.frames_bad += bad - self._bad_seen
            self._bad_seen = bad
        if stats.frames_lost != self._lost_seen:
            # One count of lost frames (every device message, ACKs too) for health and events.
            self.health.frames_lost += stats.frames_lost - self._lost_seen
            self.tracker.frames_lost(stats.frames_lost - self._lost_seen)
            self._lost_seen = stats.frames_lost
        acks: list[Ack] = []
        fetch: list[int] = []
        identified = False
        health = self.health
        for message in messages:
            # By exact class (the codec makes exactly these): one set lookup instead of
            # isinstance against seven host command classes for every device message.
            cls = type(message)
            if cls in _HOST_COMMAND_CLASSES:
                continue  # a host command echoed back is not from the device
            msg: DeviceMessage = message  # type: ignore[assignment]  # (cast() is a call)
            health.frames_ok += 1
            health.last_frame_mono = mono
            if (cls is Status or cls is Output) and health.identified:
                self._on_message(msg, utc, mono, fetch)  # nearly every frame: the chain skipped
            elif isinstance(msg, Ack):
                acks.append(msg)  # transport level: the handshake needs them before IDENT
                if health.identified:
                    self._on_ack(msg, utc, mono)
            elif isinstance(msg, Ident) and not health.identified:
                self._identify(msg, utc, mono, fetch)
                identified = True
            elif not health.identified:
                self._hold(Rx(msg, utc, mono))
            elif isinstance(msg, Ident) and self._repeated_ident(msg, mono):
                continue
            else:
                self._on_message(msg, utc, mono, fetch)
        if self.journal is not None:
            self._journal(utc, mono)
        return _new_tuple(PipelineResult, (acks, fetch, identified))  # no Python-level __new__

    def _repeated_ident(self, ident: Ident, mono: float) -> bool:
        """An IDENT flood (issue 13): the same identity again within IDENT_REPEAT_MIN_S is
        counted and dropped, so that a device repeating it thousands of times a second
        costs a comparison each, not an allow-list check, a reconciliation and a status.
        Reported once per connection (log and status note); a changed identity is always
        processed (allow-list, audit)."""
        known = self.tracker.identity
        if (
            known is None
            or (ident.model, ident.serial_no, ident.firmware)
            != (known.model, known.serial_no, known.firmware)
            or mono - self._ident_mono >= IDENT_REPEAT_MIN_S
        ):
            self._ident_mono = mono
            return False
        self._ident_repeats += 1
        self.health.idents_ignored += 1
        if self._ident_repeats == IDENT_FLOOD_REPORT:
            note = (
                f"device repeats its IDENT many times a second; repeats within "
                f"{IDENT_REPEAT_MIN_S:g} s are ignored (its data is still used)"
            )
            self.health.identity_note = note
            log.warning(note, extra={"device_id": self.device.id})
        return True

    def sent(self, chunk: bytes) -> None:
        """A chunk the gateway wrote to the device (a frame, or a payload over BLE): the
        GET_SESSION requests are kept by seq, so that the device's BAD_ARGUMENT answer
        can be matched to its session."""
        for msg in self._host_decoder.feed(chunk):
            if isinstance(msg, GetSession):
                self._asked[msg.seq] = msg.session_no

    def _on_ack(self, ack: Ack, utc: datetime, mono: float) -> None:
        session_no = self._asked.pop(ack.acked_seq, None) if ack.cmd == GET_SESSION else None
        if session_no is None or ack.result != AckResult.BAD_ARGUMENT:
            return
        # The device no longer holds (or never logged) a session known to be over:
        # it is finished from what was seen rather than kept waiting forever.
        for event in self.tracker.record_unavailable(session_no, utc):
            if isinstance(event, SessionFinished):
                self._emit_dose(event, mono)

    @property
    def identified(self) -> bool:
        """Has the device on the current connection identified itself (and been accepted)?"""
        return self.health.identified

    def _hold(self, rx: Rx) -> None:
        """Keep a message until the connection's IDENT; beyond the bound, drop the oldest."""
        if len(self._held) >= PRE_IDENT_HOLD:
            self._held.popleft()
            dropped = self.health.dropped_before_ident = self.health.dropped_before_ident + 1
            if dropped == 1 or dropped % 1000 == 0:
                log.warning(
                    "device has not identified itself: %d message(s) before its IDENT dropped",
                    dropped,
                    extra={"device_id": self.device.id},
                )
        self._held.append(rx)
        self.health.held_before_ident += 1

    def _identify(self, ident: Ident, utc: datetime, mono: float, fetch: list[int]) -> None:
        """The connection's first IDENT: allow-list, then what was held, then the IDENT itself."""
        held, self._held = self._held, deque()
        self._check_allowed(ident)  # raises UnexpectedDeviceError: the held messages go with it
        self.health.identified = True
        self.health.identity_note = None
        self.health.refused = None
        # Sessions the held messages finish are this device's: its identity is known now.
        self.tracker.identity = ident
        if held:
            log.info(
                "device identified; replaying %d message(s) received before its IDENT",
                len(held),
                extra={"device_id": self.device.id},
            )
        for rx in held:
            self._on_message(rx.msg, rx.utc, rx.mono, fetch)
        self._ident_mono = mono
        self._on_message(ident, utc, mono, fetch)

    def _journal(self, utc: datetime, mono: float) -> None:
        """Keep the open session's state on disk, at least every JOURNAL_INTERVAL_S."""
        o = self.tracker.open_session
        if self.journal is None or o is None:
            return
        last = self._journaled
        if last is not None and last[0] == o.session_no and mono - last[1] < JOURNAL_INTERVAL_S:
            return
        snapshot = self.tracker.snapshot()
        if snapshot is not None:
            self.journal.save(self.device.id, o.session_no, snapshot, utc)
            self._journaled = (o.session_no, mono)

    def _event_id(self, ident: Ident, session_no: int) -> uuid.UUID:
        return dose_event_id(ident.model, ident.serial_no, session_no, self._epoch)

    def _counter_reset(self, ident: Ident, session_no: int, why: str, recorded_up_to: int) -> None:
        """The device's session counter started again (board swap, re-flash): sessions from
        here get ids of a new epoch, so none is taken for an earlier dose and dropped."""
        assert self.journal is not None
        self._epoch = self.journal.start_counter_epoch(ident.model, ident.serial_no, session_no)
        self.tracker.counter_reset()
        log.warning(
            "device session counter reset (%s): new sessions recorded in epoch %d",
            why,
            self._epoch,
            extra={"device_id": self.device.id, "session_no": session_no},
        )
        if self.audit is not None:
            self.audit.append(
                AuditKind.device_counter_reset,
                device_id=self.device.id,
                session_no=session_no,
                body={
                    "serial_no": ident.serial_no,
                    "why": why,
                    "recorded_up_to": recorded_up_to,
                    "device_last_session_no": ident.last_session_no,
                    "epoch": self._epoch,
                },
            )

    def _reconcile(self, ident: Ident, fetch: list[int]) -> None:
        """Sessions the device logged while the gateway was not listening: fetch them."""
        if self.journal is None:
            return
        self._epoch = self.journal.counter_epoch(ident.model, ident.serial_no)
        mark = self.journal.watermark(ident.model, ident.serial_no)
        last = ident.last_session_no
        if mark is None:
            # A device seen for the first time: its earlier sessions are not this gateway's.
            self.journal.raise_watermark(ident.model, ident.serial_no, last)
            return
        open_no = self.tracker.open_session_no
        if last < mark and (open_no is None or open_no > last):
            self._counter_reset(ident, last, "IDENT last_session_no below the recorded", mark)
            return
        for n in range(max(mark + 1, last - RECONCILE_MAX + 1), last + 1):
            if n == open_no or n in fetch:
                continue
            if not self.journal.is_recorded(str(self._event_id(ident, n))):
                log.info(
                    "reconciling a session from the device log",
                    extra={"device_id": self.device.id, "session_no": n},
                )
                fetch.append(n)
                if self.audit is not None:
                    self.audit.append(
                        AuditKind.reconciliation,
                        device_id=self.device.id,
                        session_no=n,
                        body={
                            "serial_no": ident.serial_no,
                            "recorded_up_to": mark,
                            "device_last_session_no": last,
                            "why": "session logged by the device while the gateway was away",
                        },
                    )

    def _on_message(self, msg: DeviceMessage, utc: datetime, mono: float, fetch: list[int]) -> None:
        if isinstance(msg, Ident):
            self._check_allowed(msg)
            self._audit_identity(msg)
            self._reconcile(msg, fetch)
        # Rx(...) without its Python-level __new__ (a message each): the same tuple.
        for event in self.tracker.feed(_new_tuple(Rx, (msg, utc, mono))):
            if isinstance(event, SessionStarted):
                self.health.sessions_started += 1
                who = self._subject_at(utc)
                self._spo2_session_started(event.session_no, utc, mono, who.subject_id)
                if self.audit is not None:
                    self.audit.append(
                        AuditKind.session_started,
                        device_id=self.device.id,
                        subject_id=who.subject_id,
                        session_no=event.session_no,
                        body={
                            "fill_ml": None if event.fill_ul is None else event.fill_ul / 1000.0,
                            "gateway_utc": utc.isoformat(),
                            "device_uptime_ms": msg.dev_ms,
                            "kit_number": who.kit_number,
                        },
                        sync_later=True,  # per session, on the loop: fsync'ed off it
                    )
                log.info(
                    "session started",
                    extra={
                        "device_id": self.device.id,
                        "session_no": event.session_no,
                        "fill_ul": event.fill_ul,
                    },
                )
            elif isinstance(event, SessionFinished):
                self._emit_dose(event, mono)
            elif isinstance(event, FetchSessionRecord):
                fetch.append(event.session_no)
            elif isinstance(event, AlarmChanged):
                log.warning(
                    "device alarm %s %s",
                    alarm_name(event.code),
                    "raised" if event.active else "cleared",
                    extra={"device_id": self.device.id, "alarm_code": event.code},
                )
                self.publish_status()
        if isinstance(msg, Output):
            self._maybe_telemetry(msg, utc, mono)
        elif isinstance(msg, (Ident, Status)):
            self.publish_status()

    def _audit_identity(self, ident: Ident) -> None:
        key = (ident.model, ident.serial_no, ident.firmware)
        if self.audit is None or key == self._identified:
            return
        self._identified = key
        self.audit.append(
            AuditKind.device_identified,
            device_id=self.device.id,
            subject_id=self.device.subject_id,
            body={
                "port": self.device.link.port_name,
                "model": ident.model,
                "serial_no": ident.serial_no,
                "firmware": ident.firmware,
            },
            sync_later=True,  # per connection (500 at a ward's start): fsync'ed off the loop
        )

    def _check_allowed(self, ident: Ident) -> None:
        """The allow-list, then no other device reporting the same identity (issue 13)."""
        expected = self.device.expected_serial
        if expected is not None and ident.serial_no != expected:
            self._refuse(
                ident,
                f"expected {expected!r}",
                {"expected_serial": expected, "serial_no": ident.serial_no},
            )
        if self.claims is None:
            return
        holder = self.claims.claim(ident.model, ident.serial_no, self.device.id)
        if holder is not None:
            self._refuse(
                ident,
                f"which device {holder} is already reporting (two devices with one serial number)",
                {"serial_no": ident.serial_no, "in_use_by": holder},
            )

    def _refuse(self, ident: Ident, why: str, body: dict[str, str]) -> NoReturn:
        port = self.device.link.port_name
        if self.audit is not None:
            self.audit.append(
                AuditKind.device_refused, device_id=self.device.id, body={"port": port, **body}
            )
        raise UnexpectedDeviceError(
            f"port {port} answered with serial {ident.serial_no!r}, {why}; device not used",
            device_id=self.device.id,
        )

    def _emit_dose(self, event: SessionFinished, mono: float) -> None:
        session = event.session
        ident = self.tracker.identity
        if ident is None:  # unreachable: nothing becomes a session before an accepted IDENT
            raise RuntimeError("a session finished on a device that has not identified itself")
        if self.journal is not None:
            recorded = self.journal.recorded_dose(str(self._event_id(ident, session.session_no)))
            if recorded is not None and _is_another_dose(session, recorded):
                self._counter_reset(
                    ident,
                    session.session_no,
                    "a recorded session number started again after it had ended",
                    session.session_no,
                )
            elif recorded is not None:
                # Recorded before a restart or by an earlier fetch: the first record stands.
                log.info(
                    "session already recorded; not recorded again",
                    extra={"device_id": self.device.id, "session_no": session.session_no},
                )
                self.journal.clear(self.device.id, session.session_no)
                return
        if self._epoch and Reason.DEVICE_COUNTER_RESET not in session.flags:
            # Its session number is not the device's only name for it any more.
            session = replace(session, flags=(*session.flags, Reason.DEVICE_COUNTER_RESET))
        session, who = self._attribute(session)
        assessment = assess(session, self.config.dose_rules)
        placement = None
        if self.schedule is not None and who.subject_id is not None:
            placement = self.schedule.place(
                who.subject_id,
                self._event_id(ident, session.session_no),
                self._start_of(session),
                bed=self.device.bed,
                device_id=self.device.id,
            )
        record = build_dose_record(
            session,
            assessment,
            device=self.device,
            ident=ident,
            config=self.config,
            epoch=self._epoch,
            attribution=who,
            placement=placement,
        )
        dose = record.event
        dose = dose.model_copy(update={"spo2": self._spo2_summary(session, dose.event_id, mono)})
        verdicts = self.health.verdicts
        verdicts[dose.verdict] = verdicts.get(dose.verdict, 0) + 1
        record = DoseRecord(event=dose, detail=record.detail)
        log.info(
            "session finished",
            extra={
                "device_id": self.device.id,
                "session_no": session.session_no,
                "verdict": dose.verdict,
                "reasons": ",".join(record.detail.reasons),
                "delivered_ml": dose.volume.delivered_ml,
                "event_id": str(dose.event_id),
            },
        )
        if self.journal is None:
            self.sink.dose_record(self.device.id, record)
            self._kit_used(record)
            return
        journal, audit, device_id = self.journal, self.audit, self.device.id

        def commit() -> None:
            # One transaction: the record, its audit entry, the watermark and the kit's
            # use stand or fall together (and share one fsync, off the loop).
            with journal.finishing(device_id, session.session_no):
                self.sink.dose_record(device_id, record)
                if audit is not None:
                    audit.record_session_finished(record)
                journal.raise_watermark(ident.model, ident.serial_no, session.session_no)
                self._kit_used(record)

        # On a full disk the decided record is held in memory and committed when space
        # returns (README "Disk"); it is never lost while the gateway runs.
        if not journal.commit_decided(str(dose.event_id), commit):
            log.error(
                "session finished but the disk is full: its record is held in memory",
                extra={"device_id": device_id, "event_id": str(dose.event_id)},
            )

    def _attribute(self, session: FinishedSession) -> tuple[FinishedSession, Attribution]:
        """The assignment in force at the session's start (device clock if set, else the
        gateway's receipt); an unassigned bed or a change during the session is flagged."""
        start = self._start_of(session)
        end = wall_to_utc(session.device_end_wall_s) or session.gateway_end_utc
        who = self.attributor.attribute(self.device.bed, start, max(start, end))
        flags = list(session.flags)
        if who.subject_id is None and Reason.UNASSIGNED not in flags:
            flags.append(Reason.UNASSIGNED)
        if who.changed and Reason.ASSIGNMENT_CHANGED_DURING_SESSION not in flags:
            flags.append(Reason.ASSIGNMENT_CHANGED_DURING_SESSION)
        return replace(session, flags=tuple(flags)), who

    @staticmethod
    def _start_of(session: FinishedSession) -> datetime:
        """When a session started: the device's clock if set, else the gateway's receipt."""
        return (
            wall_to_utc(session.device_start_wall_s)
            or session.gateway_start_utc
            or session.gateway_end_utc
        )

    def _subject_at(self, utc: datetime) -> Attribution:
        """The bed's assignment now (for audit records and the SpO2 overlay's payloads)."""
        return self.attributor.attribute(self.device.bed, utc, utc)

    def _kit_used(self, record: DoseRecord) -> None:
        kit = record.event.kit_number
        if kit is not None:
            self.attributor.kit_used(kit, str(record.event.event_id))

    def _spo2_summary(
        self, session: FinishedSession, event_id: uuid.UUID, mono: float
    ) -> Spo2Summary:
        """What the bed's oximeter saw during the session, or why nothing can be said."""
        rules = self.config.spo2_rules
        if session.data_source == "device_log":
            return unavailable_summary(event_id, "reconciled_from_device_log", rules)
        if self.bed is None:
            return unavailable_summary(event_id, "no_oximeter_assigned", rules)
        summary = self.bed.session_ended(mono, event_id)
        if summary is None:
            reason: UnavailableReason = (
                "gateway_restart" if "gateway_restart" in session.flags else "no_samples"
            )
            return unavailable_summary(event_id, reason, rules)
        return summary

    def _spo2_session_started(
        self, session_no: int, utc: datetime, mono: float, subject_id: str | None
    ) -> None:
        ident = self.tracker.identity
        if self.bed is None or ident is None:
            return
        self.bed.session_started(mono, self._event_id(ident, session_no), utc, subject_id)

    # -- outputs -------------------------------------------------------------------

    def _maybe_telemetry(self, msg: Output, utc: datetime, mono: float) -> None:
        tcfg = self.config.telemetry
        if not self._telemetry or not tcfg.enabled or mono - self._last_telemetry < tcfg.interval_s:
            return
        self._last_telemetry = mono
        o = self.tracker.open_session
        status = self.tracker.status
        session_no = o.session_no if o else None
        self.sink.telemetry(
            self.device.id,
            Telemetry(
                gateway_id=self.config.gateway.id,
                device_id=self.device.id,
                utc=utc,
                state=status.state.name if status else None,
                session_no=session_no,
                elapsed_s=round(o.last_dev - o.start_dev, 3) if o else None,
            ),
            TelemetryDetail(
                gateway_id=self.config.gateway.id,
                device_id=self.device.id,
                utc=utc,
                session_no=session_no,
                rate_ul_min=msg.rate_ul_min,
                delivered_ml=round(msg.cum_ul / 1000.0, 3),
                reservoir_ml=_ml(status.reservoir_ul if status else None),
                battery_pct=status.battery_pct if status else None,
            ),
        )

    def publish_status(self, *, error: str | None = None) -> None:
        """Send the device status / detail if anything its audience cares about changed."""
        t = self.tracker
        status = t.status
        connected = self.health.connected
        identity = t.identity
        if status is None:
            state = battery = fault = None
        else:  # (called for every STATUS a device sends: the keys are built cheaply)
            state, battery, fault = status.state, status.battery_pct, status.fault_code
        key = (connected, state, None if identity is None else identity.serial_no, error)
        if key != self._last_status_key:
            self._last_status_key = key
            self.sink.device_status(
                self.device.id,
                DeviceStatus(
                    gateway_id=self.config.gateway.id,
                    device_id=self.device.id,
                    connected=connected,
                    state=None if state is None else state.name,
                    identity=device_identity(self.device, identity),
                    last_seen_utc=self._utc if self.health.last_frame_mono is not None else None,
                    error=error,
                ),
            )
        active = t.active_alarms
        detail_key = (connected, battery, fault, frozenset(active) if active else _NO_ALARMS)
        if detail_key != self._last_detail_key:
            self._last_detail_key = detail_key
            self.sink.device_detail(
                self.device.id,
                DeviceDetail(
                    gateway_id=self.config.gateway.id,
                    device_id=self.device.id,
                    connected=connected,
                    battery_pct=battery,
                    on_mains=status.on_mains if status else None,
                    reservoir_ml=_ml(status.reservoir_ul if status else None),
                    fault_code=fault,
                    active_alarms=sorted(alarm_name(c) for c in active),
                ),
            )


def _is_another_dose(session: FinishedSession, recorded: RecordedDose) -> bool:
    """A session followed live that started after the recorded one with its number ended:
    the device's counter started again (the same session fetched again starts before)."""
    start, end = session.gateway_start_utc, recorded.gateway_end_utc
    return (
        session.data_source == DataSource.LIVE
        and start is not None
        and end is not None
        and start > end
    )


def _ml(ul: int | None) -> float | None:
    return None if ul is None else round(ul / 1000.0, 3)
