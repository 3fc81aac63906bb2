"""The pure VM-1 model: treatment behaviour (ICD section 3) and commands, time passed in."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, TypeVar

import pytest

from drivers.vm1.messages import (
    FLAG_CLOCK_SET,
    FLAG_MAINS,
    FLAG_MESH_DRY,
    FLAG_MOUTHPIECE,
    Ack,
    AckResult,
    Alarm,
    AlarmCode,
    Breath,
    DeviceMessage,
    DeviceState,
    EndReason,
    GetInfo,
    GetSession,
    Ident,
    MsgType,
    Output,
    Ping,
    SessionEnd,
    SessionRecord,
    SessionStart,
    SetClock,
    SetRate,
    Start,
    Status,
    Stop,
)
from simulators.scenario import DeviceSpec, RebootSpec, SessionScript
from simulators.vm1_model import Vm1Model

M = TypeVar("M")

WALL = 1_795_507_200


def device(**kw: Any) -> DeviceSpec:
    kw.setdefault("serial_no", "VM1-000123")
    kw.setdefault("last_session_no", 41)
    kw.setdefault("seed", 7)
    return DeviceSpec(**kw)


def session(**kw: Any) -> SessionScript:
    kw.setdefault("fill_at_s", 5)
    kw.setdefault("fill_ul", 3000)
    kw.setdefault("start_at_s", 10)
    kw.setdefault("rate_ul_min", 400)
    return SessionScript(**kw)


def of(msgs: Sequence[DeviceMessage], cls: type[M]) -> list[M]:
    return [m for m in msgs if isinstance(m, cls)]


def one(msgs: Sequence[DeviceMessage], cls: type[M]) -> M:
    found = of(msgs, cls)
    assert len(found) == 1, found
    return found[0]


def statuses_at(msgs: Sequence[DeviceMessage], dev_ms: int) -> list[Status]:
    return [m for m in of(msgs, Status) if m.dev_ms == dev_ms]


# --------------------------------------------------------------------------- complete session


def test_complete_session_volumes_and_end() -> None:
    model = Vm1Model(device(), [session()])
    msgs = model.advance(1000)

    start = one(msgs, SessionStart)
    end = one(msgs, SessionEnd)
    assert start.session_no == end.session_no == 42
    assert start.dev_ms == 10_000 and start.wall_s == 0  # clock never set
    assert abs(start.fill_ul - 3000) <= 100  # level sensor: +-0.1 mL
    assert end.reason is EndReason.COMPLETE
    assert abs(end.residual_ul - 105) <= 100
    assert model.true_level_ul == pytest.approx(105, abs=0.01)
    summary = model.history[0]
    assert summary.true_delivered_ul == pytest.approx(2895, abs=0.01)
    # ~2895 uL at ~400 uL/min: ~7.2 min of output plus 3 s of dry mesh.
    duration_s = (end.dev_ms - start.dev_ms) / 1000
    assert 400 < duration_s < 480
    assert end.neb_ms == end.dev_ms - start.dev_ms  # never paused
    # The three estimates agree within the ICD's accuracies.
    assert abs((start.fill_ul - end.residual_ul) - 2895) <= 200
    assert abs(end.cum_ul - 2895) <= 0.10 * 2895
    outputs = of(msgs, Output)
    integral = sum(o.rate_ul_min for o in outputs) / 10 / 60  # 10 Hz samples, uL/min
    assert integral == pytest.approx(end.cum_ul, rel=0.01)
    assert outputs[-1].cum_ul <= end.cum_ul
    assert model.state is DeviceState.DONE
    assert model.scripted_done


def test_mesh_dry_flag_then_complete_three_seconds_later() -> None:
    model = Vm1Model(device(), [session()])
    msgs = model.advance(1000)
    end = one(msgs, SessionEnd)
    first_dry = next(
        s for s in of(msgs, Status) if s.flags & FLAG_MESH_DRY and s.state is DeviceState.NEBULIZING
    )
    assert end.dev_ms - first_dry.dev_ms == 3000
    # OUTPUT keeps coming while dry, with rate 0 and cum_ul frozen.
    dry_outputs = [o for o in of(msgs, Output) if first_dry.dev_ms < o.dev_ms < end.dev_ms]
    assert len(dry_outputs) >= 25
    assert {o.rate_ul_min for o in dry_outputs} == {0}
    assert len({o.cum_ul for o in dry_outputs}) == 1
    done = statuses_at(msgs, end.dev_ms)
    assert done[0].state is DeviceState.DONE and done[0].flags & FLAG_MESH_DRY
    assert msgs.index(end) < msgs.index(done[0])


def test_reported_rate_carries_the_session_bias() -> None:
    for bias in (-0.08, 0.0, 0.08):
        model = Vm1Model(device(), [session(rate_bias=bias)])
        end = one(model.advance(1000), SessionEnd)
        assert end.cum_ul / model.history[0].true_delivered_ul == pytest.approx(1 + bias, abs=0.01)


def test_output_and_status_timing_and_seq() -> None:
    model = Vm1Model(device(), [session()])
    msgs = model.advance(120)
    outputs = of(msgs, Output)
    assert [o.dev_ms for o in outputs[:3]] == [10_100, 10_200, 10_300]
    assert all(b.dev_ms - a.dev_ms == 100 for a, b in itertools.pairwise(outputs))
    periodic = sorted({s.dev_ms for s in of(msgs, Status)})
    assert periodic[:3] == [0, 1000, 2000]
    assert all(ms % 1000 == 0 for ms in periodic)  # on-change STATUS here fall on whole seconds
    assert [m.seq for m in msgs] == [i % 256 for i in range(len(msgs))]  # wraps 255 -> 0
    assert len(msgs) > 256
    assert all(b.dev_ms >= a.dev_ms for a, b in itertools.pairwise(msgs))


def test_status_at_once_on_change() -> None:
    model = Vm1Model(device(), [session(fill_at_s=2.25, start_at_s=4.5)])
    msgs = model.advance(6)
    assert [s.state for s in statuses_at(msgs, 2250)] == [DeviceState.READY]
    assert [s.state for s in statuses_at(msgs, 4500)] == [DeviceState.NEBULIZING]
    assert statuses_at(msgs, 4500)[0].flags & FLAG_MOUTHPIECE
    start = one(msgs, SessionStart)
    assert msgs.index(start) < msgs.index(statuses_at(msgs, 4500)[0])
    assert [s.dev_ms for s in of(msgs, Status)] == [
        0,
        1000,
        2000,
        2250,
        3000,
        4000,
        4500,
        5000,
        6000,
    ]


def test_advance_in_steps_equals_one_big_step() -> None:
    script = [session(pauses=[{"at_s": 60, "duration_s": 30}])]
    whole = Vm1Model(device(), script).advance(600)
    stepped_model = Vm1Model(device(), script)
    stepped: list[DeviceMessage] = []
    t = 0.0
    while t < 600:
        t = min(600.0, t + 0.737)
        stepped += stepped_model.advance(t)
    assert stepped == whole


def test_next_event_time_is_when_the_next_message_is_due() -> None:
    model = Vm1Model(device(), [session()])
    model.advance(10.05)
    assert model.next_event_time() == pytest.approx(10.1)
    assert model.advance(10.099) == []
    assert len(model.advance(10.1)) == 1


def test_same_seed_same_messages_other_seed_differs() -> None:
    a = Vm1Model(device(seed=1), [session()]).advance(100)
    b = Vm1Model(device(seed=1), [session()]).advance(100)
    c = Vm1Model(device(seed=2), [session()]).advance(100)
    assert a == b
    assert a != c


def test_ten_minute_session_at_ten_hz_is_six_thousand_outputs() -> None:
    model = Vm1Model(device(), [session(fill_ul=4100, rate_ul_min=400, residual_ul=100)])
    msgs = model.advance(700)
    end = one(msgs, SessionEnd)
    assert end.reason is EndReason.COMPLETE
    assert 5900 < len(of(msgs, Output)) < 6200


def test_breath_alternates_on_a_four_second_cycle() -> None:
    msgs = Vm1Model(device(), [session()]).advance(60)
    breaths = [o.breath for o in of(msgs, Output)]
    changes = sum(1 for a, b in itertools.pairwise(breaths) if a != b)
    assert set(breaths) == {Breath.INHALATION, Breath.EXHALATION}
    assert 20 <= changes <= 28  # 50 s at ~4 s per cycle, two changes per cycle


# --------------------------------------------------------------------------- ends and pauses


def test_user_stop_at_half_volume() -> None:
    model = Vm1Model(device(), [session(stop_at_s=10 + 217)])
    msgs = model.advance(1000)
    end = one(msgs, SessionEnd)
    assert end.reason is EndReason.USER_STOP
    assert end.dev_ms == 227_000
    assert model.history[0].true_delivered_ul == pytest.approx(1447, rel=0.05)
    assert abs(end.residual_ul - 1553) <= 150
    assert model.state is DeviceState.DONE


def test_two_minute_mouthpiece_pause() -> None:
    model = Vm1Model(device(), [session(pauses=[{"at_s": 100, "duration_s": 120}])])
    msgs = model.advance(1000)
    paused = statuses_at(msgs, 100_000)[0]
    assert paused.state is DeviceState.PAUSED
    assert not paused.flags & FLAG_MOUTHPIECE
    during = [o for o in of(msgs, Output) if 100_000 < o.dev_ms < 220_000]
    assert len(during) == 1199
    assert {o.rate_ul_min for o in during} == {0}
    assert {o.breath for o in during} == {Breath.UNKNOWN}
    assert len({o.cum_ul for o in during}) == 1
    resumed = statuses_at(msgs, 220_000)[0]
    assert resumed.state is DeviceState.NEBULIZING and resumed.flags & FLAG_MOUTHPIECE
    assert of(msgs, Output)[-1].rate_ul_min == 0  # dry
    end = one(msgs, SessionEnd)
    assert end.reason is EndReason.COMPLETE
    assert end.neb_ms == end.dev_ms - 10_000 - 120_000  # the pause is not driven time
    assert model.history[0].true_delivered_ul == pytest.approx(2895, abs=0.01)


def test_button_pause_keeps_mouthpiece_flag() -> None:
    model = Vm1Model(
        device(), [session(pauses=[{"at_s": 50, "duration_s": 10, "cause": "button"}])]
    )
    msgs = model.advance(55)
    paused = statuses_at(msgs, 50_000)[0]
    assert paused.state is DeviceState.PAUSED and paused.flags & FLAG_MOUTHPIECE
    assert of(msgs, Output)[-1].breath is not Breath.UNKNOWN


def test_pause_over_ten_minutes_ends_with_user_stop() -> None:
    model = Vm1Model(device(), [session(pauses=[{"at_s": 60, "duration_s": 900}])])
    msgs = model.advance(2000)
    end = one(msgs, SessionEnd)
    assert end.reason is EndReason.USER_STOP
    assert end.dev_ms == 60_000 + 600_000
    assert end.neb_ms == 50_000
    assert not [
        s for s in of(msgs, Status) if s.dev_ms > 660_000 and s.state is not DeviceState.DONE
    ]
    assert model.scripted_done  # the resume at 960 s found no session and was ignored


def test_timeout_forty_minutes_after_start() -> None:
    model = Vm1Model(device(), [session(rate_ul_min=50)])  # ~58 min of liquid
    msgs = model.advance(3000)
    end = one(msgs, SessionEnd)
    assert end.reason is EndReason.TIMEOUT
    assert end.dev_ms == 10_000 + 40 * 60_000


def test_fault_ends_session_and_holds_until_refill() -> None:
    scripts = [
        session(fault={"at_s": 100, "code": 0x31}),
        session(fill_at_s=300, start_at_s=310, fill_ul=500),
    ]
    model = Vm1Model(device(), scripts)
    msgs = model.advance(250)
    end = one(msgs, SessionEnd)
    assert end.reason is EndReason.FAULT and end.dev_ms == 100_000
    fault = statuses_at(msgs, 100_000)[0]
    assert fault.state is DeviceState.FAULT and fault.fault_code == 0x31
    assert of(msgs, Status)[-1].fault_code == 0x31
    later = model.advance(400)
    assert statuses_at(later, 300_000)[0].state is DeviceState.READY
    assert statuses_at(later, 300_000)[0].fault_code == 0
    assert one(later, SessionEnd).reason is EndReason.COMPLETE


# --------------------------------------------------------------------------- alarms and power


def test_alarms_including_unknown_code_and_tilt_stops_output() -> None:
    alarms = [
        {"at_s": 50, "code": "TILT", "duration_s": 5},
        {"at_s": 70, "code": 0x0901, "duration_s": 1},
        {"at_s": 80, "code": "OVER_TEMPERATURE"},
    ]
    model = Vm1Model(device(), [session(alarms=alarms)])
    msgs = model.advance(100)
    assert [(a.code, a.active, a.dev_ms) for a in of(msgs, Alarm)] == [
        (AlarmCode.TILT, True, 50_000),
        (AlarmCode.TILT, False, 55_000),
        (0x0901, True, 70_000),
        (0x0901, False, 71_000),
        (AlarmCode.OVER_TEMPERATURE, True, 80_000),
    ]
    tilted = [o for o in of(msgs, Output) if 50_000 < o.dev_ms < 55_000]
    assert {o.rate_ul_min for o in tilted} == {0}
    assert len({o.cum_ul for o in tilted}) == 1
    assert [s.reservoir_ul for s in of(msgs, Status) if 50_000 < s.dev_ms < 55_000] == [None] * 4
    assert next(o for o in of(msgs, Output) if o.dev_ms > 56_000).rate_ul_min > 300
    assert model.active_alarms == {AlarmCode.OVER_TEMPERATURE}
    end = one(model.advance(1000), SessionEnd)
    assert end.neb_ms == end.dev_ms - 10_000 - 5_000  # drive inhibited while tilted


def test_mesh_blocked_cuts_output() -> None:
    model = Vm1Model(
        device(), [session(alarms=[{"at_s": 50, "code": "MESH_BLOCKED", "duration_s": 20}])]
    )
    msgs = model.advance(80)
    blocked = [o.rate_ul_min for o in of(msgs, Output) if 51_000 < o.dev_ms < 70_000]
    assert max(blocked) < 80


def test_battery_low_alarm_and_low_battery_end() -> None:
    model = Vm1Model(
        device(battery_pct=16, battery_drain_pct_per_min=2.0), [session(rate_ul_min=200)]
    )
    msgs = model.advance(2000)
    low = one(msgs, Alarm)
    assert low.code == AlarmCode.BATTERY_LOW and low.active
    before = [s.battery_pct for s in of(msgs, Status) if s.dev_ms < low.dev_ms]
    assert before[-1] == 15
    end = one(msgs, SessionEnd)
    assert end.reason is EndReason.LOW_BATTERY
    assert end.neb_ms == pytest.approx(8 * 60_000, abs=200)  # 16 % at 2 %/min
    assert of(msgs, Status)[-1].battery_pct == 0


def test_mains_power() -> None:
    msgs = Vm1Model(device(mains=True), [session()]).advance(20)
    assert all(s.battery_pct is None and s.flags & FLAG_MAINS for s in of(msgs, Status))
    assert not of(msgs, Alarm)


def test_low_battery_at_power_on_raises_alarm() -> None:
    msgs = Vm1Model(device(battery_pct=10), [session()]).advance(1)
    assert one(msgs, Alarm).code == AlarmCode.BATTERY_LOW


# --------------------------------------------------------------------------- commands


def acks(msgs: Sequence[DeviceMessage]) -> list[tuple[int, int, AckResult]]:
    return [(a.acked_seq, a.cmd, a.result) for a in of(msgs, Ack)]


def test_get_info_acks_then_ident() -> None:
    model = Vm1Model(device(), [session()])
    model.advance(2.5)
    msgs = model.handle_command(GetInfo(seq=9), 3.2)
    assert isinstance(msgs[0], Status) and msgs[0].dev_ms == 3000  # due messages first
    ack, ident = msgs[1:]
    assert isinstance(ack, Ack) and (ack.acked_seq, ack.cmd, ack.result) == (9, 0x81, AckResult.OK)
    assert isinstance(ident, Ident)
    assert (ident.serial_no, ident.last_session_no, ident.dev_ms) == ("VM1-000123", 41, 3200)
    assert ident.seq == ack.seq + 1


def test_set_clock_sets_flag_and_wall_times() -> None:
    model = Vm1Model(device(), [session()])
    msgs = model.handle_command(SetClock(unix_s=WALL, seq=1), 2.0)
    assert acks(msgs)[-1] == (1, MsgType.SET_CLOCK, AckResult.OK)
    assert of(msgs, Status)[-1].flags & FLAG_CLOCK_SET  # flags changed: STATUS at once
    later = model.advance(1000)
    assert one(later, SessionStart).wall_s == WALL + 8
    end = one(later, SessionEnd)
    rec = one(model.handle_command(GetSession(session_no=42, seq=2), 1000), SessionRecord)
    assert rec.start_wall_s == WALL + 8
    assert rec.end_wall_s == WALL + (end.dev_ms - 2000) // 1000
    assert (rec.fill_ul, rec.neb_ms, rec.cum_ul, rec.residual_ul, rec.reason) == (
        one(later, SessionStart).fill_ul,
        end.neb_ms,
        end.cum_ul,
        end.residual_ul,
        EndReason.COMPLETE,
    )


def test_start_and_stop_state_rules() -> None:
    model = Vm1Model(device(), [session(fill_at_s=5, start_at_s=100)])
    assert acks(model.handle_command(Start(seq=1), 1)) == [(1, 0x83, AckResult.BAD_STATE)]  # IDLE
    assert acks(model.handle_command(Stop(seq=2), 2)) == [(2, 0x84, AckResult.BAD_STATE)]
    msgs = model.handle_command(Start(seq=3), 6)  # READY
    assert acks(msgs) == [(3, 0x83, AckResult.OK)]
    assert isinstance(msgs[-3], Ack) and isinstance(msgs[-2], SessionStart)
    assert isinstance(msgs[-1], Status) and msgs[-1].state is DeviceState.NEBULIZING
    assert one(msgs, SessionStart).session_no == 42
    assert acks(model.handle_command(Start(seq=4), 7)) == [(4, 0x83, AckResult.BAD_STATE)]
    msgs = model.handle_command(Stop(seq=5), 20)
    assert acks(msgs) == [(5, 0x84, AckResult.OK)]
    end = one(msgs, SessionEnd)
    assert end.reason is EndReason.HOST_STOP and end.neb_ms == 14_000
    assert model.state is DeviceState.DONE
    rest = model.advance(200)
    assert not of(rest, SessionStart)  # the scripted button press at 100 s found DONE
    assert any("ignored" in n for n in model.notes)


def test_host_start_resumes_a_pause() -> None:
    model = Vm1Model(device(), [session(pauses=[{"at_s": 30, "duration_s": 60}])])
    model.advance(40)
    msgs = model.handle_command(Start(seq=1), 40)
    assert acks(msgs) == [(1, 0x83, AckResult.OK)]
    status = of(msgs, Status)[-1]
    assert status.state is DeviceState.NEBULIZING and not status.flags & FLAG_MOUTHPIECE
    later = model.advance(95)
    assert statuses_at(later, 90_000)[0].flags & FLAG_MOUTHPIECE  # contact back at 90 s


def test_set_rate() -> None:
    model = Vm1Model(device(), [session()])
    model.advance(20)
    for bad in (0, 51):
        assert acks(model.handle_command(SetRate(hz=bad, seq=bad), 20)) == [
            (bad, 0x86, AckResult.BAD_ARGUMENT)
        ]
    assert model.telemetry_hz == 10
    assert acks(model.handle_command(SetRate(hz=50, seq=1), 20.05)) == [(1, 0x86, AckResult.OK)]
    outputs = of(model.advance(21), Output)
    assert [o.dev_ms for o in outputs[:3]] == [20_070, 20_090, 20_110]
    assert len(outputs) == 47
    model.handle_command(SetRate(hz=1, seq=2), 21)
    assert [o.dev_ms for o in of(model.advance(25), Output)] == [22_000, 23_000, 24_000, 25_000]


def test_ping() -> None:
    model = Vm1Model(device(), [session()])
    assert acks(model.handle_command(Ping(seq=200), 0.5)) == [(200, 0x85, AckResult.OK)]


def test_repeated_seq_is_executed_once_but_acked_again() -> None:
    model = Vm1Model(device(), [session(start_at_s=100)])
    model.advance(6)
    first = model.handle_command(Start(seq=7), 6)
    again = model.handle_command(Start(seq=7), 6.5)
    assert acks(first) == acks(again) == [(7, 0x83, AckResult.OK)]
    assert not of(again, SessionStart)
    assert model.last_session_no == 42
    # A new seq is a new command: START while nebulizing is BAD_STATE.
    assert acks(model.handle_command(Start(seq=8), 7)) == [(8, 0x83, AckResult.BAD_STATE)]
    # A resent query is answered again (its reply was most likely lost with the ACK).
    model.handle_command(GetInfo(seq=9), 8)
    assert len(of(model.handle_command(GetInfo(seq=9), 8.5), Ident)) == 1


def test_get_session_only_for_the_last_sixteen() -> None:
    scripts = [
        session(fill_at_s=60 * i + 1, start_at_s=60 * i + 2, fill_ul=300, rate_ul_min=600)
        for i in range(18)
    ]
    model = Vm1Model(device(), scripts)
    msgs = model.advance(60 * 18 + 10)
    ends = of(msgs, SessionEnd)
    assert [e.session_no for e in ends] == list(range(42, 60))
    assert {e.reason for e in ends} == {EndReason.COMPLETE}
    assert model.last_session_no == 59
    t = 60 * 18 + 10
    for seq, no in enumerate([41, 42, 43, 60]):  # before power-on, evicted twice, never ran
        assert acks(model.handle_command(GetSession(session_no=no, seq=seq), t)) == [
            (seq, 0x87, AckResult.BAD_ARGUMENT)
        ]
    for no in range(44, 60):
        msgs = model.handle_command(GetSession(session_no=no, seq=no), t)
        assert acks(msgs) == [(no, 0x87, AckResult.OK)]
        rec = one(msgs, SessionRecord)
        end = ends[no - 42]
        assert (rec.session_no, rec.neb_ms, rec.cum_ul, rec.residual_ul) == (
            no,
            end.neb_ms,
            end.cum_ul,
            end.residual_ul,
        )
    ident = one(model.handle_command(GetInfo(seq=1), t), Ident)
    assert ident.last_session_no == 59


def test_get_session_of_running_session_is_bad_argument() -> None:
    model = Vm1Model(device(), [session()])
    model.advance(30)
    assert acks(model.handle_command(GetSession(session_no=42, seq=1), 30)) == [
        (1, 0x87, AckResult.BAD_ARGUMENT)
    ]
    assert model.ident_message(30).last_session_no == 42


def test_reject_command_acks_with_given_result() -> None:
    model = Vm1Model(device(), [session()])
    msgs = model.reject_command(0x88, 3, AckResult.UNKNOWN_COMMAND, 0.2)
    assert acks(msgs) == [(3, 0x88, AckResult.UNKNOWN_COMMAND)]


def test_dev_ms_wraps_after_two_to_the_32_ms() -> None:
    # The device has been on for 2^32 ms minus 60 s when the scenario starts.
    model = Vm1Model(device(uptime_at_start_s=(2**32 - 60_000) / 1000), [session()])
    msgs = model.advance(70)
    outputs = of(msgs, Output)
    wrap = next(i for i, (a, b) in enumerate(itertools.pairwise(outputs)) if b.dev_ms < a.dev_ms)
    assert outputs[wrap].dev_ms == 2**32 - 100
    assert outputs[wrap + 1].dev_ms == 0
    assert one(msgs, SessionStart).dev_ms == 2**32 - 50_000
    assert all(0 <= m.dev_ms < 2**32 for m in msgs)


# -- level sensor faults and reboots (the issue-10 edge scenarios) -------------------


def test_blind_level_sensor_reads_unknown_from_fill_to_end() -> None:
    model = Vm1Model(device(), [session(level_sensor="blind")])
    out = model.advance(600)
    [start] = of(out, SessionStart)
    [end] = of(out, SessionEnd)
    assert start.fill_ul == end.residual_ul == 0xFFFF
    during = [m for m in of(out, Status) if start.dev_ms <= m.dev_ms <= end.dev_ms]
    assert during and all(m.reservoir_ul is None for m in during)
    assert model.session_summaries()[0].record().fill_ul == 0xFFFF
    assert end.cum_ul > 2500  # the rate estimate still works


def test_drifting_level_sensor_reports_its_residual() -> None:
    model = Vm1Model(device(), [session(residual_reading_ul=3050)])
    [end] = of(model.advance(600), SessionEnd)
    assert end.residual_ul == 3050


def test_reboot_restarts_uptime_seq_and_clock_and_loses_the_session() -> None:
    model = Vm1Model(
        device(uptime_at_start_s=2_200_000), [session()], reboots=[RebootSpec(at_s=70)]
    )
    model.handle_command(SetClock(unix_s=WALL, seq=0), 1.0)
    out = model.advance(100)
    [start] = of(out, SessionStart)
    assert start.dev_ms == 2_200_010_000 and start.wall_s != 0
    idents = of(out, Ident)
    assert [(i.dev_ms, i.seq, i.last_session_no) for i in idents] == [(0, 0, 42)]
    after = [m for m in out if m.dev_ms < 100_000 and not isinstance(m, Ident)]
    assert after and after[0].dev_ms == 0 and after[0].seq == 1
    status = of(out, Status)[-1]
    assert status.state is DeviceState.IDLE and not status.flags & FLAG_CLOCK_SET
    assert not of(out, SessionEnd)  # the session just stops: no SESSION_END
    assert all(m.dev_ms > 1_000_000 for m in of(out, Output))  # none after the reboot
    assert model.session_summaries() == []  # lost: GET_SESSION 42 gives BAD_ARGUMENT
    [ack] = of(model.handle_command(GetSession(session_no=42, seq=9), 101), Ack)
    assert ack.result is AckResult.BAD_ARGUMENT


def test_reboot_can_log_the_interrupted_session() -> None:
    model = Vm1Model(
        device(), [session()], reboots=[RebootSpec(at_s=70, records_interrupted_session=True)]
    )
    model.advance(100)
    [summary] = model.session_summaries()
    assert summary.session_no == 42 and summary.reason is EndReason.FAULT
    assert summary.neb_ms == 60_000


def test_board_swap_restarts_the_session_counter_and_erases_the_log() -> None:
    model = Vm1Model(
        device(),
        [session(), session(fill_at_s=560, start_at_s=570)],
        reboots=[RebootSpec(at_s=540, session_counter_to=41)],
    )
    out = model.advance(1100)
    assert [s.session_no for s in of(out, SessionStart)] == [42, 42]
    assert [s.session_no for s in model.session_summaries()] == [42]
    assert of(out, Ident)[0].last_session_no == 41
