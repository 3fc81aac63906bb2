"""The files in deploy/ agree with each other and with the gateway, as far as this machine can tell.

What runs for real elsewhere: the Mosquitto configs in tests/test_bridge.py,
sd_notify in tests/test_systemd_notify.py. Here: the systemd unit through
``systemd-analyze verify`` (no systemd runs as PID 1 here, so the unit is never
started), the udev rules through a small evaluator of the rule language (no
udevd here, and `udevadm verify` needs systemd >= 254), and the Dockerfile by
parsing it (no Docker engine here, so the image is never built): every COPY
source exists and is in the build context, the entrypoint is a valid devicegw
command line, the final stage runs as a non-root user and holds no build tools.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from devicegw.cli.main import build_parser
from devicegw.config import load_config
from devicegw.contract.topics import Topics
from tests.mqtt_helpers import require

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "devicegw.service"
RULES = DEPLOY / "udev" / "70-devicegw.rules"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
CONFIG = DEPLOY / "config" / "ward.toml"
WARD_CONF = DEPLOY / "mosquitto" / "devicegw-ward.conf"
WARD_ACL = DEPLOY / "mosquitto" / "devicegw-ward.acl"


def logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined, comments and blanks dropped."""
    out: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    assert not pending, "a continuation line ends the file"
    return out


# -- systemd -------------------------------------------------------------------


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values in order]}} (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for line in logical_lines(path.read_text()):
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, f"{line!r} outside a section"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_unit_runs_the_gateway_as_a_notify_service_with_watchdog() -> None:
    service = read_unit(UNIT)["Service"]
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert int(service["WatchdogSec"][0]) >= 10
    assert service["Restart"] == ["on-failure"]
    # The daemon's command lines are ones devicegw accepts.
    for key in ("ExecStart", "ExecStartPre"):
        argv = shlex.split(service[key][0])
        assert Path(argv[0]).name == "devicegw"
        args = build_parser().parse_args(argv[1:])
        assert "/etc/devicegw/" in str(args.config)
    assert shlex.split(service["ExecStart"][0])[1] == "run"
    # The config's exit status for a bad file (2) is not restarted in a loop.
    assert service["RestartPreventExitStatus"] == ["2"]


def test_unit_user_may_open_serial_ports_and_talk_to_bluez() -> None:
    service = read_unit(UNIT)["Service"]
    assert service["User"] == ["devicegw"]
    assert set(service["SupplementaryGroups"][0].split()) >= {"dialout", "bluetooth"}
    # Hardened, but the serial devices stay reachable ...
    assert service.get("PrivateDevices", ["no"]) == ["no"]
    assert service["DevicePolicy"] == ["closed"]
    allowed = {v.split()[0] for v in service["DeviceAllow"]}
    assert {"char-ttyUSB", "char-ttyACM"} <= allowed
    # ... and so is D-Bus (a unix socket) for BlueZ, and the broker.
    families = set(service["RestrictAddressFamilies"][0].split())
    assert {"AF_UNIX", "AF_INET"} <= families
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["ProtectSystem"] == ["strict"]
    # State where the deploy config keeps it.
    assert service["StateDirectory"] == ["devicegw"]
    assert str(load_config(CONFIG).gateway.data_dir) == "/var/lib/devicegw"


def test_sysusers_matches_the_unit() -> None:
    entries = [
        line.split()
        for line in (DEPLOY / "systemd" / "devicegw.sysusers").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    service = read_unit(UNIT)["Service"]
    user = service["User"][0]
    assert ["u", user] == entries[0][:2]
    member_of = {e[2] for e in entries if e[0] == "m" and e[1] == user}
    assert member_of == set(service["SupplementaryGroups"][0].split())


def test_systemd_sysusers_accepts_the_user_entry(tmp_path: Path) -> None:
    """systemd-sysusers parses the file and would create the user (dry run, private root)."""
    sysusers = shutil.which("systemd-sysusers")
    require(sysusers is not None, "systemd-sysusers is not installed (Debian package systemd)")
    assert sysusers is not None
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "group").write_text("root:x:0:\ndialout:x:20:\n")
    (tmp_path / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    res = subprocess.run(
        [
            sysusers,
            "--dry-run",
            f"--root={tmp_path}",
            str(DEPLOY / "systemd" / "devicegw.sysusers"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "Creating user 'devicegw'" in out
    assert "ignoring" not in out.lower() and "fail" not in out.lower(), out


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    """systemd's own parser accepts every line (it warns on unknown keys or bad values)."""
    analyze = shutil.which("systemd-analyze")
    require(analyze is not None, "systemd-analyze is not installed (Debian package systemd)")
    assert analyze is not None
    devicegw = Path(sys.executable).with_name("devicegw")
    assert devicegw.exists()
    # verify checks that the binaries exist: point them at this checkout's devicegw.
    unit = tmp_path / "devicegw.service"
    unit.write_text(UNIT.read_text().replace("/opt/devicegw/current/bin/devicegw", str(devicegw)))
    res = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == "", res.stderr


# -- udev ----------------------------------------------------------------------

RULE_TOKEN = re.compile(
    r'\s*(?P<key>[A-Z_]+(?:\{[^}]*\})?)\s*(?P<op>==|!=|\+=|-=|:=|=)\s*"(?P<value>[^"]*)"\s*,?'
)
KNOWN_KEYS = {
    "ACTION",
    "SUBSYSTEM",
    "SUBSYSTEMS",
    "KERNEL",
    "ENV",
    "ATTRS",
    "IMPORT",
    "SYMLINK",
    "GROUP",
    "MODE",
    "GOTO",
    "LABEL",
    "TAG",
}


def parse_rules(text: str) -> list[list[tuple[str, str, str]]]:
    rules = []
    for line in logical_lines(text):
        tokens = []
        pos = 0
        while pos < len(line):
            m = RULE_TOKEN.match(line, pos)
            assert m is not None, f"cannot parse udev rule at {line[pos:]!r}"
            tokens.append((m["key"], m["op"], m["value"]))
            pos = m.end()
        rules.append(tokens)
    return rules


@dataclass
class UdevDevice:
    """What the evaluator knows of a device: its properties after 60-serial.rules."""

    env: dict[str, str]
    subsystem: str = "tty"
    action: str = "add"
    symlinks: list[str] = field(default_factory=list)
    group: str | None = None
    mode: str | None = None


def _glob(value: str, pattern: str) -> bool:
    return any(fnmatch.fnmatchcase(value, alt) for alt in pattern.split("|"))


def apply_rules(rules: list[list[tuple[str, str, str]]], dev: UdevDevice) -> UdevDevice:
    """The subset of udev's rule language the shipped file uses, evaluated like udevd."""
    labels = {tokens[0][2]: i for i, tokens in enumerate(rules) if tokens[0][0] == "LABEL"}
    i = 0
    while i < len(rules):
        tokens, goto = rules[i], None
        matches = True
        for key, op, value in tokens:
            if op in ("==", "!="):
                if key == "ACTION":
                    actual = dev.action
                elif key in ("SUBSYSTEM", "SUBSYSTEMS"):
                    actual = dev.subsystem if key == "SUBSYSTEM" else "usb"
                elif key.startswith("ENV{"):
                    actual = dev.env.get(key[4:-1], "")
                else:
                    raise AssertionError(f"evaluator does not know match key {key}")
                if _glob(actual, value) != (op == "=="):
                    matches = False
                    break
        if matches:
            for key, op, value in tokens:
                if op in ("==", "!="):
                    continue
                expanded = re.sub(r"\$env\{(\w+)\}", lambda m: dev.env.get(m[1], ""), value)
                if key == "SYMLINK":
                    dev.symlinks.append(expanded)
                elif key == "GROUP":
                    dev.group = expanded
                elif key == "MODE":
                    dev.mode = expanded
                elif key.startswith("ENV{"):
                    dev.env[key[4:-1]] = expanded
                elif key == "GOTO":
                    goto = labels[expanded]
        i = goto if goto is not None else i + 1
    return dev


def usb_tty(vendor: str, model: str, serial: str) -> UdevDevice:
    return UdevDevice(
        {"ID_BUS": "usb", "ID_VENDOR": vendor, "ID_MODEL": model, "ID_SERIAL_SHORT": serial}
    )


def test_udev_rules_parse_with_known_keys_only() -> None:
    rules = parse_rules(RULES.read_text())
    assert rules
    for tokens in rules:
        for key, _op, _value in tokens:
            assert key.split("{")[0] in KNOWN_KEYS, key


def test_udev_names_each_device_by_its_serial() -> None:
    rules = parse_rules(RULES.read_text())
    vm1 = apply_rules(rules, usb_tty("VM-1", "VM-1", "VM1-000123"))
    assert vm1.symlinks == ["devicegw/vm1-VM1-000123"]
    assert (vm1.group, vm1.mode) == ("dialout", "0660")
    assert vm1.env["ID_MM_DEVICE_IGNORE"] == "1"  # ModemManager keeps off
    nonin = apply_rules(rules, usb_tty("Nonin", "OEM_III", "502012345"))
    assert nonin.symlinks == ["devicegw/nonin-502012345"]
    assert (nonin.group, nonin.mode) == ("dialout", "0660")


@pytest.mark.parametrize("serial", ["../../etc/x", "VM1 000123", "VM1-00$(x)", "", "VM1\x1b[2J"])
def test_udev_never_makes_a_name_from_a_hostile_serial(serial: str) -> None:
    dev = apply_rules(parse_rules(RULES.read_text()), usb_tty("VM-1", "VM-1", serial))
    assert dev.symlinks == []


def test_udev_leaves_other_devices_alone() -> None:
    rules = parse_rules(RULES.read_text())
    assert apply_rules(rules, usb_tty("FTDI", "FT232R_USB_UART", "A10K3XYZ")).symlinks == []
    removed = usb_tty("VM-1", "VM-1", "VM1-000123")
    removed.action = "remove"
    assert apply_rules(rules, removed).symlinks == []
    not_usb = UdevDevice({"ID_MODEL": "VM-1", "ID_SERIAL_SHORT": "VM1-000123"})
    assert apply_rules(rules, not_usb).symlinks == []


def test_deploy_config_names_the_udev_links() -> None:
    config = load_config(CONFIG)
    rules = parse_rules(RULES.read_text())
    for device in config.devices:
        assert device.expected_serial is not None
        dev = apply_rules(rules, usb_tty("VM-1", "VM-1", device.expected_serial))
        assert device.link.port_name == "/dev/" + dev.symlinks[0]
    for ox in config.oximeters:
        assert ox.serial_no is not None
        dev = apply_rules(rules, usb_tty("Nonin", "OEM_III", ox.serial_no))
        assert ox.link.port_name == "/dev/" + dev.symlinks[0]


# -- the ward broker and the gateway's config ------------------------------------


def conf_directives(path: Path) -> list[tuple[str, str]]:
    out = []
    for line in logical_lines(path.read_text()):
        key, _, value = line.partition(" ")
        out.append((key, value.strip()))
    return out


def test_gateway_config_fits_the_ward_broker() -> None:
    config = load_config(CONFIG)
    directives = conf_directives(WARD_CONF)
    listener = next(v for k, v in directives if k == "listener").split()
    assert (config.broker.host, config.broker.port) == (listener[1], int(listener[0]))
    assert config.broker.username is not None
    assert config.broker.password_file is not None
    assert str(config.broker.password_file).startswith("/etc/devicegw/")
    # The ACL lets the gateway's user write its whole tree, last will included.
    acl = WARD_ACL.read_text().split("\nuser ")
    gateway_block = next(b for b in acl if b.startswith(config.broker.username + "\n"))
    assert f"topic write {config.broker.topic_prefix}/#" in gateway_block


def _mqtt_match(pattern: str, topic: str) -> bool:
    """MQTT topic filter matching: + is one level, # the rest."""
    levels = topic.split("/")
    for i, part in enumerate(pattern.split("/")):
        if part == "#":
            return True
        if i >= len(levels) or part not in ("+", levels[i]):
            return False
    return len(pattern.split("/")) == len(levels)


def test_bridge_carries_every_topic_of_the_contract_at_its_qos() -> None:
    config = load_config(CONFIG)
    topics = Topics(config.broker.topic_prefix, config.gateway.site, config.gateway.id)
    bridged = [v.split() for k, v in conf_directives(WARD_CONF) if k == "topic"]
    want = {
        topics.dose("neb-bed01"): 1,
        topics.safety("neb-bed01"): 1,
        topics.gateway_status(): 1,
        topics.device_status("neb-bed01"): 1,
        topics.telemetry("neb-bed01"): 0,
        # the restricted feed (docs/blinding.md), for engineering accounts centrally
        topics.dose_detail("neb-bed01"): 1,
        topics.device_detail("neb-bed01"): 1,
        topics.telemetry_detail("neb-bed01"): 0,
    }
    for topic, qos in want.items():
        routes = [b for b in bridged if _mqtt_match(b[0], topic)]
        assert len(routes) == 1, f"{topic} bridged by {routes}"
        assert routes[0][1:] == ["out", str(qos)], topic
    directives = dict(conf_directives(WARD_CONF))
    assert directives["cleansession"] == "false"
    assert directives["local_cleansession"] == "false"
    assert directives["persistence"] == "true"
    # Debian's main mosquitto.conf sets the location; a second one is a start-up error.
    assert "persistence_location" not in directives
    assert directives["bridge_insecure"] == "false"
    assert {"bridge_cafile", "bridge_certfile", "bridge_keyfile"} <= directives.keys()
    assert int(directives["max_queued_messages"]) > 1000  # not the default that drops
    assert directives["listener"].split()[1] == "127.0.0.1"


# -- Docker --------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def read_dockerfile(path: Path) -> list[Stage]:
    stages: list[Stage] = []
    for line in logical_lines(path.read_text()):
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        elif stages:
            stages[-1].instructions.append((op, rest.strip()))
        else:
            assert op == "ARG", f"{op} before the first FROM"
    return stages


def exec_form(value: str) -> list[str]:
    argv = json.loads(value)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), value
    return argv


def dockerignore_allows(patterns: list[str], path: str) -> bool:
    allowed = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatchcase(path, pat) or fnmatch.fnmatchcase(path, pat.replace("**/", "")):
            allowed = negate
    return allowed


def test_dockerfile_is_multi_stage_and_non_root() -> None:
    stages = read_dockerfile(DOCKERFILE)
    assert len(stages) >= 2
    final = stages[-1]
    users = [v for op, v in final.instructions if op == "USER"]
    assert users, "the final stage sets no USER (it would run as root)"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    # Build tools stay in the build stage.
    final_runs = " ".join(v for op, v in final.instructions if op == "RUN")
    for tool in ("gcc", "build-essential", "make ", "apt-get install", "pip install"):
        assert tool not in final_runs, tool
    names = {s.name for s in stages[:-1]}
    for op, value in final.instructions:
        if op == "COPY" and value.startswith("--from="):
            assert value.split()[0].removeprefix("--from=") in names


def test_dockerfile_copies_what_the_wheel_needs_from_the_build_context() -> None:
    stages = read_dockerfile(DOCKERFILE)
    ignore = [
        line.strip()
        for line in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied: set[str] = set()
    for stage in stages:
        for op, value in stage.instructions:
            if op not in ("COPY", "ADD") or value.startswith("--from="):
                continue
            *sources, _dest = value.split()
            for src in sources:
                assert (ROOT / src).exists(), f"COPY source {src} does not exist"
                assert dockerignore_allows(ignore, src), f"{src} is excluded from the context"
                copied.add(src)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    needed |= set(pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"])
    assert needed <= copied, f"the build stage lacks {needed - copied}"
    # Nothing local leaks into the context.
    for private in (".venv", ".git", "var", "tests", "config"):
        assert not dockerignore_allows(ignore, private), private


def test_dockerfile_entrypoint_and_healthcheck_are_devicegw_commands() -> None:
    final = read_dockerfile(DOCKERFILE)[-1]
    ops = dict(final.instructions)
    argv = exec_form(ops["ENTRYPOINT"]) + exec_form(ops["CMD"])
    assert argv[0] == "devicegw"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "run"
    assert str(args.config) == "/etc/devicegw/ward.toml"
    health = ops["HEALTHCHECK"]
    check = exec_form(health[health.index("CMD") + 3 :].strip())
    assert check[0] == "devicegw"
    assert build_parser().parse_args(check[1:]).command == "status"
    # State where the deploy config (and the systemd unit) keep it.
    assert exec_form(ops["VOLUME"]) == [str(load_config(CONFIG).gateway.data_dir)]
