"""Scenario files: every shipped one loads and does what it says; bad ones name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from drivers.vm1.messages import AlarmCode, EndReason, Output, SessionEnd
from simulators.errors import ScenarioError
from simulators.scenario import Scenario, load_scenario, parse_scenario
from simulators.vm1_model import Vm1Model

SCENARIO_DIR = Path(__file__).resolve().parent.parent / "simulators" / "scenarios"
SHIPPED = sorted(SCENARIO_DIR.glob("*.toml"))

MINIMAL = """
[device]
serial_no = "VM1-000001"

[[sessions]]
fill_at_s = 1
fill_ul = 3000
start_at_s = 2
rate_ul_min = 400
"""


def test_the_expected_scenarios_are_shipped() -> None:
    names = {p.stem for p in SHIPPED}
    assert {
        "complete",
        "user_stop_half",
        "pause_2min",
        "corrupt_bytes",
        "link_drop",
        "demo",
    } <= names
    readme = (SCENARIO_DIR / "README.md").read_text()
    for name in names:
        assert f"`{name}.toml`" in readme


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_scenario_loads(path: Path) -> None:
    scenario = load_scenario(path)
    assert isinstance(scenario, Scenario)
    assert scenario.name == path.stem
    assert scenario.device.model == "VM-1"


def test_shipped_serial_numbers_are_distinct() -> None:
    serials = [load_scenario(p).device.serial_no for p in SHIPPED]
    assert len(serials) == len(set(serials))


# name -> (end reason, session length in s (+-5), true delivered uL (+-3 %))
EXPECTED = {
    "complete": (EndReason.COMPLETE, 438, 2895),
    "user_stop_half": (EndReason.USER_STOP, 217, 1445),
    "pause_2min": (EndReason.COMPLETE, 554, 2880),
    "corrupt_bytes": (EndReason.COMPLETE, 440, 2895),
    "link_drop": (EndReason.COMPLETE, 438, 2895),
    "demo": (EndReason.COMPLETE, 207, 2895),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_scenario_outcome(name: str) -> None:
    scenario = load_scenario(SCENARIO_DIR / f"{name}.toml")
    model = Vm1Model.from_scenario(scenario)
    msgs = model.advance(scenario.end_of_script_s + 45 * 60)
    reason, length_s, delivered_ul = EXPECTED[name]
    (summary,) = model.history
    assert summary.reason is reason
    assert summary.end_s - summary.start_s == pytest.approx(length_s, abs=5)
    assert summary.true_delivered_ul == pytest.approx(delivered_ul, rel=0.03)
    (end,) = [m for m in msgs if isinstance(m, SessionEnd)]
    # The gateway's three volume estimates agree within the ICD's accuracies.
    reservoir_drop = summary.fill_ul - summary.residual_ul
    integral = sum(m.rate_ul_min for m in msgs if isinstance(m, Output)) / 10 / 60
    assert abs(reservoir_drop - summary.true_delivered_ul) <= 200
    assert end.cum_ul == pytest.approx(summary.true_delivered_ul, rel=0.10)
    assert integral == pytest.approx(end.cum_ul, rel=0.02)
    assert model.scripted_done and not model.notes


def test_minimal_scenario_defaults(tmp_path: Path) -> None:
    path = tmp_path / "mini.toml"
    path.write_text(MINIMAL)
    s = load_scenario(path)
    assert s.name == "mini"
    d = s.device
    assert (d.model, d.firmware, d.nominal_rate_ul_min, d.reservoir_ul) == (
        "VM-1",
        "1.4.2",
        400,
        6000,
    )
    assert (d.mains, d.battery_pct, d.last_session_no) == (False, 100.0, 0)
    (sess,) = s.sessions
    assert (sess.rate_noise, sess.rate_bias, sess.residual_ul) == (0.05, 0.03, 105)
    assert sess.pauses == () and sess.alarms == () and sess.fault is None
    assert s.link_drops == () and s.corruption == ()


def test_alarm_codes_by_name_or_number(tmp_path: Path) -> None:
    text = (
        MINIMAL
        + """
[[sessions.alarms]]
at_s = 5
code = "tilt"
[[sessions.alarms]]
at_s = 6
code = 0x0901
[[sessions.alarms]]
at_s = 7
code = "0x0A01"
"""
    )
    path = tmp_path / "alarms.toml"
    path.write_text(text)
    codes = [a.code for a in load_scenario(path).sessions[0].alarms]
    assert codes == [AlarmCode.TILT, 0x0901, 0x0A01]


def _error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    message = str(info.value)
    assert message.startswith(str(path))
    return message


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("rate_ul_min = 400", "rate_ul_min = -3", "sessions[0].rate_ul_min"),
        ("rate_ul_min = 400", 'rate_ul_min = "400"', "sessions[0].rate_ul_min"),
        ("rate_ul_min = 400", "rate_ul_min = 400\nrate_bias = 0.2", "sessions[0].rate_bias"),
        ("rate_ul_min = 400", "rate_ul_min = 400\nspeed = 3", "sessions[0].speed"),
        ("start_at_s = 2", "start_at_s = 0.5", "sessions[0].start_at_s"),
        ("fill_ul = 3000", "fill_ul = 7000", "sessions[0].fill_ul"),
        ('serial_no = "VM1-000001"', 'serial_no = "VM1-0000000001"', "device.serial_no"),
        (
            'serial_no = "VM1-000001"',
            'serial_no = "VM1-000001"\nmains = true\nbattery_pct = 50',
            "device.battery_pct",
        ),
        ('serial_no = "VM1-000001"', "", "device.serial_no"),
        ("rate_ul_min = 400", "rate_ul_min = 400\nresidual_ul = 500", "sessions[0].residual_ul"),
    ],
)
def test_bad_field_is_named(tmp_path: Path, old: str, new: str, field: str) -> None:
    assert old in MINIMAL
    message = _error(tmp_path, MINIMAL.replace(old, new))
    assert f": {field}: " in message


def test_bad_nested_tables_are_named(tmp_path: Path) -> None:
    pause = MINIMAL + "[[sessions.pauses]]\nat_s = 1\nduration_s = 60\n"
    assert "sessions[0].pauses[0].at_s" in _error(tmp_path, pause)
    cause = MINIMAL + '[[sessions.pauses]]\nat_s = 10\nduration_s = 60\ncause = "cough"\n'
    assert "sessions[0].pauses[0].cause" in _error(tmp_path, cause)
    alarm = MINIMAL + '[[sessions.alarms]]\nat_s = 10\ncode = "SMOKE"\n'
    message = _error(tmp_path, alarm)
    assert "sessions[0].alarms[0].code" in message and "TILT" in message
    corruption = MINIMAL + '[[corruption]]\nat_s = 10\nkind = "noise"\ncount = 3\n'
    assert "corruption[0].kind" in _error(tmp_path, corruption)
    drops = (
        MINIMAL
        + "[[link_drops]]\nat_s = 10\nduration_s = 30\n[[link_drops]]\nat_s = 20\nduration_s = 5\n"
    )
    assert "link_drops[1].at_s" in _error(tmp_path, drops)
    two = (
        MINIMAL
        + "[[sessions]]\nfill_at_s = 1.5\nfill_ul = 500\nstart_at_s = 3\nrate_ul_min = 400\n"
    )
    assert "sessions[1].fill_at_s" in _error(tmp_path, two)
    assert "sessions" in _error(tmp_path, '[device]\nserial_no = "X"\n')


def test_unreadable_or_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "missing.toml")
    assert "not valid TOML" in _error(tmp_path, "[device\nserial_no = 1")


def test_parse_scenario_from_data() -> None:
    data = {
        "device": {"serial_no": "VM1-9", "mains": True},
        "sessions": [{"fill_at_s": 1, "fill_ul": 500, "start_at_s": 2, "rate_ul_min": 300}],
    }
    s = parse_scenario(data, source="inline.toml")
    assert s.name == "inline" and s.device.mains
    with pytest.raises(ScenarioError, match=r"^inline\.toml: device\.mains"):
        parse_scenario({**data, "device": {"serial_no": "X", "mains": "yes"}}, source="inline.toml")
