"""Dose records at the edges a real ward produces (issue 10).

Every case here is fed to the pipeline as the serial frames a VM-1 sends
(tests/session_stream.py encodes each message with the production codec), and
the outcome is read from the published record: the blinded event the EDC keeps
and its restricted detail (docs/blinding.md).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from devicegw.config import Config, TrialSettings
from devicegw.contract.payloads import DoseRecord, dose_event_id
from devicegw.contract.vocabulary import REASON_FEED, Feed, TopicKind, Verdict
from devicegw.core.vm1_pipeline import Vm1Pipeline
from devicegw.edc.export import read_events, render
from devicegw.storage.journal import SessionJournal
from devicegw.storage.outbox import Outbox
from devicegw.storage.store import Store
from drivers.vm1.messages import AckResult, DeviceState, EndReason, GetSession, MsgType
from drivers.vm1.stream import encode_message_frame
from tests.session_stream import (
    T0,
    ListSink,
    StreamBuilder,
    device_log_record,
    feed,
    one_device_config,
)

UNKNOWN = 0xFFFF


def config(**rules: float) -> Config:
    return one_device_config(rules=rules)


def pipeline(sink: ListSink, cfg: Config | None = None) -> Vm1Pipeline:
    cfg = cfg or config()
    p = Vm1Pipeline(cfg.devices[0], cfg, sink)
    p.link_up(T0)
    return p


def stream(start_ms: int = 10_000) -> StreamBuilder:
    b = StreamBuilder(start_ms=start_ms)
    b.ident()
    b.status(DeviceState.READY)
    return b


def only_record(sink: ListSink) -> DoseRecord:
    assert len(sink.records) == 1, [r.event.session_no for r in sink.records]
    return sink.records[0]


def assert_blinded(record: DoseRecord) -> None:
    """The blinded event carries no restricted reason code."""
    for reason in record.event.reasons:
        assert REASON_FEED[reason] is Feed.BLINDED, reason


def run_session(
    b: StreamBuilder, *, fill: int, residual: int, seconds: float, rate: int = 400
) -> None:
    b.start(fill=fill)
    b.nebulize(seconds, rate=rate)
    b.end(EndReason.COMPLETE, residual=residual, neb_ms=round(seconds * 1000))


# -- plausibility of the readings that decide a verdict ---------------------------------


def test_unknown_fill_is_unknown_not_65_ml() -> None:
    """SESSION_START fill 0xFFFF: the level drop is unknown; the rate integral decides."""
    sink = ListSink()
    b = stream()
    run_session(b, fill=UNKNOWN, residual=105, seconds=435)
    feed(pipeline(sink), b)
    record = only_record(sink)
    assert record.detail.volume.fill_ml is None
    assert record.detail.volume.reservoir_drop_ml is None
    assert record.detail.volume.delivered_basis == "output_integral"
    assert record.event.volume.delivered_ml == pytest.approx(2.9, abs=0.01)
    assert record.event.verdict is Verdict.COMPLETE
    assert "reservoir_unknown" in record.detail.reasons
    assert "reservoir_unknown" in record.detail.volume.findings
    assert_blinded(record)


def test_unknown_residual_is_unknown() -> None:
    sink = ListSink()
    b = stream()
    run_session(b, fill=3000, residual=UNKNOWN, seconds=435)
    feed(pipeline(sink), b)
    record = only_record(sink)
    assert record.detail.volume.residual_ml is None
    assert record.detail.volume.delivered_basis == "output_integral"
    assert "reservoir_unknown" in record.detail.reasons
    assert record.event.verdict is Verdict.COMPLETE


def test_residual_above_fill_falls_back_to_the_rate_integral() -> None:
    """3.05 mL residual after a 3.0 mL fill, 2.8 mL by rate: not 'aborted, 0.0 mL'."""
    sink = ListSink()
    b = stream()
    run_session(b, fill=3000, residual=3050, seconds=420)  # 400 uL/min x 7 min = 2.8 mL
    feed(pipeline(sink), b)
    record = only_record(sink)
    assert record.detail.volume.delivered_basis == "output_integral"
    assert record.event.volume.delivered_ml == pytest.approx(2.8, abs=0.01)
    assert record.event.verdict is Verdict.COMPLETE
    assert "reservoir_implausible" in record.detail.reasons
    assert_blinded(record)


def test_drop_disagreeing_with_two_agreeing_rate_estimates_is_not_believed() -> None:
    """Fill 3.0, residual 2.0 (1.0 mL by level) while rate and device total say 2.8 mL."""
    sink = ListSink()
    b = stream()
    run_session(b, fill=3000, residual=2000, seconds=420)
    feed(pipeline(sink), b)
    record = only_record(sink)
    assert record.detail.volume.reservoir_drop_ml == pytest.approx(1.0)
    assert record.detail.volume.delivered_basis == "output_integral"
    assert "reservoir_implausible" in record.detail.volume.findings
    assert record.event.verdict is Verdict.COMPLETE


def test_fill_above_capacity_is_implausible() -> None:
    sink = ListSink()
    b = stream()
    run_session(b, fill=6500, residual=3605, seconds=435)  # IDENT: 6000 uL capacity
    feed(pipeline(sink), b)
    record = only_record(sink)
    assert "reservoir_implausible" in record.detail.reasons
    assert record.detail.volume.delivered_basis == "output_integral"


def test_overdose_is_a_deviation_not_complete() -> None:
    """A 6.0 mL fill against 3.0 mL prescribed, nearly all nebulized."""
    sink = ListSink()
    b = stream()
    run_session(b, fill=6000, residual=105, seconds=885)  # 5.9 mL at 400 uL/min
    feed(pipeline(sink), b)
    record = only_record(sink)
    assert record.event.volume.delivered_fraction == pytest.approx(1.965, abs=0.01)
    assert record.event.verdict is Verdict.DEVIATION
    assert "delivered_above_maximum" in record.event.reasons  # blinded: from the fraction
    assert "fill_above_prescribed" in record.detail.reasons  # restricted: a level reading
    assert "fill_above_prescribed" not in record.event.reasons
    assert record.event.rules.max_delivered_fraction == 1.15
    assert_blinded(record)


def test_under_fill_and_delivery_failure_are_told_apart() -> None:
    sink = ListSink()
    b = stream()
    run_session(b, fill=1500, residual=105, seconds=210)  # filled half, all delivered
    b.start(session_no=43, fill=3000)
    b.nebulize(210)
    b.end(EndReason.USER_STOP, residual=1600, neb_ms=210_000, session_no=43)  # stopped half-way
    feed(pipeline(sink), b)
    under_fill, stopped = sink.records
    assert under_fill.event.verdict is Verdict.PARTIAL
    assert stopped.event.verdict is Verdict.PARTIAL
    assert "fill_below_prescribed" in under_fill.detail.reasons
    assert "fill_below_prescribed" not in stopped.detail.reasons
    assert "ended_by_user" in stopped.event.reasons


def test_rate_faster_than_the_device_can_nebulize_is_not_believed() -> None:
    """The device log says 2.9 mL in 60 s of mesh time (nominal 400 uL/min): not complete."""
    sink = ListSink()
    b = stream()
    b.record(device_log_record(neb_ms=60_000))
    feed(pipeline(sink), b)
    record = only_record(sink)
    assert record.event.verdict is Verdict.INDETERMINATE
    assert record.event.data_source == "device_log"
    assert "delivery_implausible" in record.detail.reasons
    assert "duration_unknown" in record.event.reasons
    assert record.event.volume.delivered_ml is None
    assert record.detail.times.duration_at_least_s == 60.0
    assert_blinded(record)


def test_device_log_session_without_a_clock_is_judged_on_its_driven_time() -> None:
    """Clock never set: the mesh ran 45 minutes, so the session broke the 30-minute limit."""
    sink = ListSink()
    b = stream()
    b.record(device_log_record(neb_ms=2_700_000))
    feed(pipeline(sink), b)
    record = only_record(sink)
    assert record.event.verdict is Verdict.DEVIATION
    assert {"duration_unknown", "duration_above_maximum"} <= set(record.event.reasons)


def test_no_usable_estimate_is_indeterminate_from_real_input() -> None:
    """Reservoir unknown, no OUTPUT samples seen, device total 0: nothing to go on."""
    sink = ListSink()
    b = stream()
    b.start(fill=UNKNOWN)
    b.skip(300)
    b.end(EndReason.COMPLETE, residual=UNKNOWN, neb_ms=300_000)
    feed(pipeline(sink), b)
    record = only_record(sink)
    assert record.event.verdict is Verdict.INDETERMINATE
    assert "volume_unknown" in record.event.reasons


def test_device_total_is_the_basis_when_nothing_else_is_known() -> None:
    sink = ListSink()
    b = stream()
    b.start(fill=UNKNOWN)
    b.cum = 2900.0  # OUTPUT samples were all lost; the device's total arrives with the end
    b.skip(435)
    b.end(EndReason.COMPLETE, residual=UNKNOWN, neb_ms=435_000)
    feed(pipeline(sink), b)
    record = only_record(sink)
    assert record.detail.volume.delivered_basis == "device_cum"
    assert record.event.volume.delivered_ml == pytest.approx(2.9)


# -- device restarts ----------------------------------------------------------------------


def ask_for_record(p: Vm1Pipeline, b: StreamBuilder, session_no: int, seq: int = 7) -> None:
    """The gateway's GET_SESSION, as the runner writes it."""
    assert session_no in p.tracker._awaiting or p.tracker.open_session is not None
    p.sent(encode_message_frame(GetSession(seq=seq, dev_ms=0, session_no=session_no)))


@pytest.mark.parametrize("uptime_before_ms", [10_000, 2_200_000_000])
def test_reboot_inside_a_session_never_gives_a_negative_or_wrapped_duration(
    uptime_before_ms: int,
) -> None:
    """Uptime resets mid-session (also from past 2^31 ms, once taken for a wrap)."""
    sink = ListSink()
    p = pipeline(sink)
    b = stream(start_ms=uptime_before_ms)
    b.start()
    b.nebulize(100)
    n = feed(p, b)
    b.reboot()
    b.ident()
    b.status(DeviceState.IDLE, reservoir=2300)
    result_fetch: list[int] = []
    for rx in b.out[n:]:
        result_fetch += p.feed(encode_message_frame(rx.msg), rx.utc, rx.mono).fetch
    n = len(b.out)
    assert 42 in result_fetch  # the gateway asks the device for its record of the session
    assert sink.records == []
    ask_for_record(p, b, 42)
    b.ack(7, int(MsgType.GET_SESSION), AckResult.BAD_ARGUMENT)  # the reboot lost it
    feed(p, b, n)
    record = only_record(sink)
    assert {"device_restarted", "session_record_unavailable"} <= set(record.event.reasons)
    assert record.event.times.duration_s is None
    assert record.detail.times.duration_at_least_s == pytest.approx(100.0, abs=0.2)
    assert record.detail.end_reason == "UNKNOWN"
    assert record.detail.times.nebulizing_s is None
    # What was seen: 100 s at 400 uL/min.
    assert record.event.volume.delivered_ml == pytest.approx(0.667, abs=0.01)
    assert record.detail.volume.delivered_basis == "output_integral"
    assert record.event.verdict is Verdict.PARTIAL
    assert_blinded(record)


def test_reboot_inside_a_session_is_finished_from_the_device_record_when_it_has_one() -> None:
    sink = ListSink()
    p = pipeline(sink)
    b = stream(start_ms=2_200_000_000)
    b.start()
    b.nebulize(300)
    b.reboot()
    b.ident()
    b.record(
        device_log_record(
            start_wall_s=1_795_507_200,
            reason=EndReason.FAULT,
            neb_ms=300_000,
            cum_ul=2000,
            residual_ul=1000,
            end_wall_s=1_795_507_500,
        )
    )
    feed(p, b)
    record = only_record(sink)
    assert "device_restarted" in record.event.reasons
    assert record.event.times.duration_s == 300.0
    assert record.event.volume.delivered_ml == pytest.approx(2.0)


def test_genuine_uptime_wrap_is_not_a_reboot() -> None:
    sink = ListSink()
    b = stream(start_ms=(1 << 32) - 60_000)
    run_session(b, fill=3000, residual=105, seconds=435)
    feed(pipeline(sink), b)
    record = only_record(sink)
    assert record.event.times.duration_s == pytest.approx(435.1, abs=0.2)
    assert "device_restarted" not in record.event.reasons
    assert record.event.verdict is Verdict.COMPLETE


def test_a_record_asked_for_a_running_session_does_not_end_it() -> None:
    """BAD_ARGUMENT for a session the device is still in (no end missed) changes nothing."""
    sink = ListSink()
    p = pipeline(sink)
    b = stream()
    b.start()
    b.nebulize(30)
    n = feed(p, b)
    p.sent(encode_message_frame(GetSession(seq=3, dev_ms=0, session_no=42)))
    b.ack(3, int(MsgType.GET_SESSION), AckResult.BAD_ARGUMENT)
    b.nebulize(405)
    b.end(EndReason.COMPLETE, residual=105, neb_ms=435_000)
    feed(p, b, n)
    record = only_record(sink)
    assert record.event.verdict is Verdict.COMPLETE
    assert "session_record_unavailable" not in record.event.reasons


# -- pauses and outages -----------------------------------------------------------------


def test_link_drop_during_a_pause_is_not_pause_time() -> None:
    """A 20 s pause, then 1,600 s without a link: not a 1,600 s pause and no deviation."""
    sink = ListSink()
    p = pipeline(sink)
    b = stream()
    b.start()
    b.nebulize(200)
    b.status(DeviceState.PAUSED, flags=0x08)
    b.nebulize(20, rate=0)
    feed(p, b)
    p.link_down(b.out[-1].utc)
    b.skip(1600)  # the device resumed and nebulized while the gateway could not hear it
    b.out.clear()
    b.ident()  # every connection identifies itself first
    b.status(DeviceState.NEBULIZING)
    b.nebulize(30)
    b.end(EndReason.COMPLETE, residual=105, neb_ms=435_000)
    p.link_up(b.out[0].utc)
    feed(p, b)
    record = only_record(sink)
    assert record.detail.pauses.total_s == pytest.approx(20.0, abs=0.2)
    assert record.detail.pauses.items[0].cut_by_link is True
    assert "pause_above_maximum" not in record.event.reasons
    assert "pause_state_unknown" in record.event.reasons
    assert record.detail.link.down_s == pytest.approx(1600, abs=1)


# -- one frame-loss count -------------------------------------------------------------------


def test_an_ack_mid_session_is_not_a_lost_frame() -> None:
    """ACKs consume device sequence numbers: the event and health agree there was no loss."""
    sink = ListSink()
    p = pipeline(sink)
    b = stream()
    b.start()
    b.nebulize(100)
    b.ack(0, int(MsgType.PING))
    b.nebulize(335)
    b.end(EndReason.COMPLETE, residual=105, neb_ms=435_000)
    feed(p, b)
    record = only_record(sink)
    assert record.detail.link.frames_lost == 0 == p.health.frames_lost


# -- session-counter resets -------------------------------------------------------------


class OutboxSink(ListSink):
    """Commits each dose record to a real outbox, as the daemon's publisher does."""

    def __init__(self, outbox: Outbox) -> None:
        super().__init__()
        self.outbox = outbox

    def dose_record(self, device_id: str, record: DoseRecord) -> None:
        super().dose_record(device_id, record)
        self.outbox.add(
            TopicKind.DOSE,
            f"dose/{device_id}",
            record.event.model_dump_json().encode(),
            qos=1,
            retain=False,
            now=record.event.times.gateway_end_utc,
            device_id=device_id,
            event_id=str(record.event.event_id),
            detail=(f"dose-detail/{device_id}", record.detail.model_dump_json().encode()),
        )


def stored_pipeline(tmp_path: Path) -> tuple[Vm1Pipeline, OutboxSink, Store]:
    store = Store(tmp_path / "gw.sqlite3")
    sink = OutboxSink(Outbox(store))
    cfg = config()
    p = Vm1Pipeline(cfg.devices[0], cfg, sink, journal=SessionJournal(store))
    p.link_up(T0)
    return p, sink, store


def test_counter_reset_seen_in_ident_gives_new_ids_and_drops_nothing(tmp_path: Path) -> None:
    p, sink, store = stored_pipeline(tmp_path)
    b = StreamBuilder()
    b.ident(last_session_no=41)
    run_session(b, fill=3000, residual=105, seconds=435)  # session 42
    n = feed(p, b)
    p.link_down(b.out[-1].utc)
    # Board swapped: the device's counter starts again from 0.
    b.reboot()
    b.ident(last_session_no=0)
    b.start(session_no=1)
    b.nebulize(435)
    b.end(EndReason.COMPLETE, residual=105, neb_ms=435_000, session_no=1)
    p.link_up(b.out[n].utc)
    feed(p, b, n)
    first, second = sink.records
    assert first.event.event_id == dose_event_id("VM-1", "VM1-000123", 42)  # unchanged
    assert second.event.event_id == dose_event_id("VM-1", "VM1-000123", 1, epoch=1)
    assert "device_counter_reset" in second.event.reasons
    assert "device_counter_reset" not in first.event.reasons
    store.close()


def test_recorded_session_number_starting_again_is_a_new_dose(tmp_path: Path) -> None:
    """The device reports session 42 again, after 42 was recorded: published, not dropped."""
    p, sink, store = stored_pipeline(tmp_path)
    b = StreamBuilder()
    b.ident(last_session_no=41)
    run_session(b, fill=3000, residual=105, seconds=435)
    b.status(DeviceState.READY)
    b.skip(3600)
    run_session(b, fill=3000, residual=1605, seconds=220)  # 42 again: another dose
    feed(p, b)
    first, second = sink.records
    assert first.event.event_id != second.event.event_id
    assert second.event.event_id == dose_event_id("VM-1", "VM1-000123", 42, epoch=1)
    assert "device_counter_reset" in second.event.reasons
    assert second.event.verdict is Verdict.PARTIAL
    store.close()


def test_the_same_session_fetched_again_is_still_recorded_once(tmp_path: Path) -> None:
    """Not a reset: the device's record of a session already recorded live."""
    p, sink, store = stored_pipeline(tmp_path)
    b = StreamBuilder()
    b.ident(last_session_no=41)
    run_session(b, fill=3000, residual=105, seconds=435)
    b.record(
        device_log_record(start_wall_s=1_795_507_200, residual_ul=105, end_wall_s=1_795_507_635)
    )
    feed(p, b)
    assert len(sink.records) == 1
    store.close()


# -- to the export ------------------------------------------------------------------------


def test_edge_records_export_honestly() -> None:
    """An indeterminate dose has no ECDOSE and asks a query; a dose finished from what was
    seen after a device restart is exported with what is known, its reasons blinded."""
    indeterminate = ListSink()
    b = stream()
    b.record(device_log_record(neb_ms=60_000))
    feed(pipeline(indeterminate), b)
    overdose = ListSink()
    b = stream()
    b.start(session_no=43, fill=6000)
    b.nebulize(885)
    b.end(EndReason.COMPLETE, residual=105, neb_ms=885_000, session_no=43)
    feed(pipeline(overdose), b)
    events = [*indeterminate.events, *overdose.events]
    lines = [e.model_dump_json() for e in events]
    trial = TrialSettings(study_id="CVD-042", time_zone="Europe/Berlin")
    files = render(read_events(lines), "sdtm-ec", trial=trial)
    ec = list(csv.DictReader(io.StringIO(files["ec.csv"])))
    supp = list(csv.DictReader(io.StringIO(files["suppec.csv"])))
    by_ref = {row["ECSPID"]: row for row in ec}
    unknown = by_ref[str(indeterminate.events[0].event_id)]
    assert unknown["ECDOSE"] == "" and unknown["ECOCCUR"] == ""
    queried = {r["IDVARVAL"] for r in supp if r["QNAM"] == "QUERYFL" and r["QVAL"] == "Y"}
    assert unknown["ECSEQ"] in queried
    over = by_ref[str(overdose.events[0].event_id)]
    assert over["ECDOSE"] == "5.9" or over["ECDOSE"].startswith("5.9")
    text = files["ec.csv"] + files["suppec.csv"]
    for restricted in ("delivery_implausible", "fill_above_prescribed", "reservoir"):
        assert restricted not in text.lower()
