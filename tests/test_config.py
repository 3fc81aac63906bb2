"""Configuration: one clear error naming the field; blinding and identifiers enforced."""

from __future__ import annotations

from pathlib import Path

import pytest

from devicegw.config import load_config
from devicegw.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "ward.toml"

GOOD = """
[gateway]
id = "gw1"
site = "site-042"

[[devices]]
id = "neb-bed01"
type = "vm1"
bed = "B01"
subject_id = "CVD-042-0017"
kit_number = "K-10234"
link = { kind = "serial", port = "/dev/ttyUSB0" }
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "gw.toml"
    p.write_text(text)
    return p


def test_example_config_is_valid() -> None:
    cfg = load_config(EXAMPLE)
    assert [d.id for d in cfg.devices] == ["neb-bed01", "neb-bed02"]
    assert cfg.dose_rules.prescribed_volume_ml == 3.0
    assert cfg.dose_rules.min_delivered_fraction == 0.90
    assert len(cfg.source_sha256) == 64


def test_good_config_has_trial_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.broker.port == 1883
    assert cfg.dose_rules.prescribed_volume_ml == 3.0


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (('type = "vm1"', 'type = "vm9"'), "devices[0].type"),
        (('kit_number = "K-10234"', 'kit_number = "K-10234"\narm = "A"'), "devices[0].arm"),
        (('subject_id = "CVD-042-0017"', 'subject_id = "John Smith"'), "devices[0].subject_id"),
        (('site = "site-042"', 'site = "site/042"'), "gateway.site"),
        (
            ("[gateway]", "[dose_rules]\nmin_duration_s = 900\nmax_duration_s = 600\n[gateway]"),
            "dose_rules",
        ),
    ],
)
def test_bad_config_names_the_field(tmp_path: Path, change: tuple[str, str], field: str) -> None:
    old, new = change
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, GOOD.replace(old, new)))
    assert field in str(info.value)


def test_malformed_toml_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, GOOD + "\n[[devices]\n"))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


def test_duplicate_ports_rejected(tmp_path: Path) -> None:
    second = GOOD.split("[[devices]]")[1].replace("neb-bed01", "neb-bed02").replace("B01", "B02")
    with pytest.raises(ConfigError, match=r"link\.port"):
        load_config(write(tmp_path, GOOD + "[[devices]]" + second))


def test_password_from_environment_never_in_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(write(tmp_path, GOOD + '\n[broker]\npassword_env = "GW_TEST_PW"\n'))
    with pytest.raises(ConfigError, match="GW_TEST_PW"):
        cfg.broker.password()
    monkeypatch.setenv("GW_TEST_PW", "s3cret")
    pw = cfg.broker.password()
    assert pw is not None
    assert pw.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(pw)


def test_insecure_tls_only_for_loopback(tmp_path: Path) -> None:
    text = GOOD + '\n[broker]\nhost = "mqtt.example.org"\n[broker.tls]\nenabled = true\n'
    text += "insecure_skip_verify = true\n"
    with pytest.raises(ConfigError, match="loopback"):
        load_config(write(tmp_path, text))


def test_ble_link_needs_an_address_or_name(tmp_path: Path) -> None:
    text = GOOD.replace(
        'link = { kind = "serial", port = "/dev/ttyUSB0" }', 'link = { kind = "ble" }'
    )
    with pytest.raises(ConfigError, match=r"devices\[0\]\.link"):
        load_config(write(tmp_path, text))


def test_ble_link_builds_a_ble_message_link(tmp_path: Path) -> None:
    from devicegw.runtime.link_factory import link_factory
    from drivers.transport.ble_link import Vm1BleLink

    text = GOOD.replace(
        'link = { kind = "serial", port = "/dev/ttyUSB0" }',
        'link = { kind = "ble", name = "VM-1 VM1-000123", adapter = "hci1" }',
    )
    cfg = load_config(write(tmp_path, text))
    link = link_factory(cfg.devices[0])()
    assert isinstance(link, Vm1BleLink) and link.unit == "message"
    assert "VM-1 VM1-000123" in cfg.devices[0].link.port_name


def test_oximeter_must_watch_the_subject_of_its_bed(tmp_path: Path) -> None:
    ox = (
        '\n[[oximeters]]\nid = "ox1"\ntype = "nonin_oem3"\nbed = "B01"\n'
        'subject_id = "CVD-042-0099"\nlink = { port = "/dev/ttyUSB9" }\n'
    )
    with pytest.raises(ConfigError, match="CVD-042-0017"):
        load_config(write(tmp_path, GOOD + ox))
    cfg = load_config(write(tmp_path, GOOD + ox.replace("CVD-042-0099", "CVD-042-0017")))
    assert cfg.oximeter_for(cfg.devices[0]) is not None
    assert cfg.oximeters[0].link.baudrate == 9600


def test_ble_oximeters_in_the_config(tmp_path: Path) -> None:
    from devicegw.runtime.link_factory import oximeter_source_factory
    from drivers.clock import ManualClock
    from drivers.transport.adapters import NoninSerialSource
    from drivers.transport.ble_oximeter_link import OximeterBleLink

    plx = (
        '\n[[oximeters]]\nid = "ox1"\ntype = "plx"\nbed = "B01"\nsubject_id = "CVD-042-0017"\n'
        'link = { kind = "ble", name = "PLX 0017", adapter = "hci1" }\n'
    )
    cfg = load_config(write(tmp_path, GOOD + plx))
    source = oximeter_source_factory(cfg.oximeters[0], ManualClock())()
    assert isinstance(source, OximeterBleLink)
    with pytest.raises(ConfigError, match="reached over ble"):
        load_config(
            write(
                tmp_path,
                GOOD
                + plx.replace(
                    'kind = "ble", name = "PLX 0017", adapter = "hci1"', 'port = "/dev/x"'
                ),
            )
        )
    nonin = plx.replace('"plx"', '"nonin_oem3"').replace(
        'kind = "ble", name = "PLX 0017", adapter = "hci1"', 'port = "/dev/ttyUSB3"'
    )
    cfg = load_config(write(tmp_path, GOOD + nonin))
    assert isinstance(oximeter_source_factory(cfg.oximeters[0], ManualClock())(), NoninSerialSource)


REMOTE_WITH_PASSWORD = GOOD + (
    '\n[broker]\nhost = "mqtt.ward3.example.org"\npassword_env = "GW_TEST_PW"\n'
)


def test_plaintext_password_to_a_remote_broker_is_refused(tmp_path: Path) -> None:
    """Issue 14 item 9: a password off loopback without TLS needs an explicit yes."""
    with pytest.raises(ConfigError, match="allow_plaintext_password") as info:
        load_config(write(tmp_path, REMOTE_WITH_PASSWORD))
    assert info.value.field == "broker.tls.enabled"
    yes = REMOTE_WITH_PASSWORD.replace("[broker]\n", "[broker]\nallow_plaintext_password = true\n")
    allowed = load_config(write(tmp_path, yes))
    assert allowed.broker.plaintext_password
    # TLS on, or a broker on this machine: no question to ask.
    tls = REMOTE_WITH_PASSWORD + "[broker.tls]\nenabled = true\n"
    assert not load_config(write(tmp_path, tls)).broker.plaintext_password
    for host in ("127.0.0.1", "127.0.0.53", "::1", "localhost"):
        local = REMOTE_WITH_PASSWORD.replace("mqtt.ward3.example.org", host)
        assert not load_config(write(tmp_path, local)).broker.plaintext_password


def test_allowed_plaintext_password_is_said_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """check-config prints it; run logs it at WARNING before it starts anything.

    ``run`` would connect to the configured remote broker, which a test must not do, so
    the Gateway is replaced by a stand-in that stops at once (the only mock here).
    """
    import contextlib
    import io

    import devicegw.runtime.gateway as gateway_module
    from devicegw.cli.main import main
    from devicegw.errors import GatewayError

    monkeypatch.setenv("GW_TEST_PW", "s3cret")
    text = REMOTE_WITH_PASSWORD.replace("[broker]\n", "[broker]\nallow_plaintext_password = true\n")
    text = text.replace("[gateway]\n", f'[gateway]\ndata_dir = "{tmp_path / "d"}"\n')
    cfg = write(tmp_path, text)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["check-config", str(cfg)]) == 0
    assert "WARNING: the broker password goes in PLAIN TEXT to mqtt.ward3.example.org" in (
        out.getvalue()
    )

    class NoGateway:
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise GatewayError("stand-in: not started")

    monkeypatch.setattr(gateway_module, "Gateway", NoGateway)
    import sys

    run_command = sys.modules["devicegw.cli.commands.run"]
    monkeypatch.setattr(run_command, "configure_logging", lambda *a: None)
    with caplog.at_level("WARNING"), contextlib.redirect_stderr(io.StringIO()):
        assert main(["run", "--config", str(cfg)]) == 1
    assert any(
        r.levelname == "WARNING" and "INSECURE" in r.getMessage() and "PLAIN TEXT" in r.getMessage()
        for r in caplog.records
    )


def test_config_strings_are_bounded_and_plain(tmp_path: Path) -> None:
    for line, field in (
        ('client_id = "' + "c" * 70_000 + '"', "broker.client_id"),
        ('host = ""', "broker.host"),
        ('topic_prefix = "a/#"', "broker.topic_prefix"),
        ("port = true", "broker.port"),
        ('port = "57185"', "broker.port"),
    ):
        with pytest.raises(ConfigError) as info:
            load_config(write(tmp_path, GOOD + f"\n[broker]\n{line}\n"))
        assert info.value.field == field
        assert len(str(info.value)) < 400


# -- contract version and trial (exports) ------------------------------------------------


def test_the_topic_prefix_must_be_the_contracts_version(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, GOOD)).broker.topic_prefix == "devicegw/v2"
    old = GOOD + '[broker]\ntopic_prefix = "devicegw/v1"\n'
    with pytest.raises(ConfigError, match="names contract v1, but this gateway publishes") as info:
        load_config(write(tmp_path, old))
    assert info.value.field == "broker"
    ours = GOOD + '[broker]\ntopic_prefix = "hospital/trials/devicegw/v2"\n'
    assert load_config(write(tmp_path, ours)).broker.topic_prefix.endswith("/v2")


def test_trial_section(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, GOOD)).trial is None  # the daemon does not need it
    text = GOOD + (
        '[trial]\nstudy_id = "CVD-042"\ntime_zone = "Europe/Berlin"\n'
        '[trial.site_time_zones]\nsite-043 = "America/New_York"\n'
    )
    trial = load_config(write(tmp_path, text)).trial
    assert trial is not None
    assert (trial.study_id, trial.zone_for("site-042").key) == ("CVD-042", "Europe/Berlin")
    assert trial.zone_for("site-043").key == "America/New_York"
    example = load_config(EXAMPLE).trial
    assert example is not None and example.study_id == "CVD-042"


@pytest.mark.parametrize(
    ("trial", "field"),
    [
        ('time_zone = "Europe/Berlin"', "trial.study_id"),
        ('study_id = "CVD-042"', "trial.time_zone"),
        ('study_id = "CVD-042"\ntime_zone = "CET+1"', "trial.time_zone"),
        ('study_id = "CVD-042"\ntime_zone = "../../etc/passwd"', "trial.time_zone"),
        ('study_id = "CVD 042"\ntime_zone = "UTC"', "trial.study_id"),
        ('study_id = "CVD-042"\ntime_zone = "UTC"\narm = "A"', "trial.arm"),
    ],
)
def test_bad_trial_section_names_the_field(tmp_path: Path, trial: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, GOOD + "[trial]\n" + trial + "\n"))
    assert info.value.field == field
