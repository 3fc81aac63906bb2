"""Gateway configuration: one TOML file, validated once at the edge.

Everything inward gets typed objects. A bad file produces one ``ConfigError``
whose message names the field and the problem, and the daemon does not start.
Blinding is enforced here too: device assignments carry a kit number and a
pseudonymous subject ID, and unknown keys (an "arm" column pasted from a
randomisation list, a patient name) are rejected rather than carried along.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import tomllib
import zoneinfo
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    StringConstraints,
    Tag,
    ValidationError,
    model_validator,
)

from devicegw.contract.base import TOPIC_VERSION
from devicegw.contract.spo2 import Spo2RulesOut
from devicegw.errors import ConfigError
from devicegw.safe_text import is_plain, printable

#: A configuration file larger than this is not a gateway's configuration.
MAX_FILE_BYTES = 1 << 20


def _matching(regex: str, what: str) -> AfterValidator:
    """A pattern check whose message says what is wanted, not the regular expression."""
    compiled = re.compile(regex)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise ValueError(f"must be {what}")
        return value

    return AfterValidator(check)


_NAME = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
Ident = Annotated[str, _matching(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", _NAME)]
TopicSegment = Annotated[str, _matching(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", _NAME)]
# Pseudonymous trial identifiers: letters, digits, dashes; no spaces, so no names.
SubjectId = Annotated[
    str,
    _matching(r"[A-Z0-9][A-Z0-9-]{2,31}", "a pseudonym: 3-32 upper-case letters, digits, '-'"),
]
KitNumber = Annotated[
    str, _matching(r"[A-Z0-9][A-Z0-9-]{0,31}", "a kit number: 1-32 upper-case letters, digits, '-'")
]
# MQTT topic levels under which everything is published: no wildcards, no empty
# level, no leading "$" (reserved for the broker), at most 8 levels.
TopicPrefix = Annotated[
    str,
    StringConstraints(max_length=200),
    _matching(
        r"[A-Za-z0-9._-]{1,64}(/[A-Za-z0-9][A-Za-z0-9._-]{0,63}){0,7}",
        "1-8 MQTT topic levels joined by '/', each letters, digits, '.', '_', '-'"
        " (no wildcard + or #, no empty level, no leading $ or /)",
    ),
]
# What a VM-1 sends as serial_no in IDENT: up to 12 printable ASCII characters.
Vm1Serial = Annotated[
    str,
    _matching(r"[!-~](?:[ -~]{0,10}[!-~])?", "a VM-1 serial number: 1-12 printable ASCII"),
]
EnvName = Annotated[str, _matching(r"[A-Za-z_][A-Za-z0-9_]{0,127}", "an environment variable name")]
ClientId = Annotated[
    str, _matching(r"[A-Za-z0-9._:-]{1,128}", "1-128 letters, digits, '.', '_', ':' or '-'")
]

#: The serial settings each device speaks (its vendor's interface document).
VM1_BAUDRATES = (115200,)  # ICD section 1: 115200 8N1
NONIN_BAUDRATES = (9600,)  # Nonin OEM III, data format #2: 9600 8N1

_HOSTNAME = re.compile(
    r"^(?=.{1,253}\.?$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)
_LOOPBACK_NAMES = ("localhost",)


def _host(value: str) -> str:
    """A DNS name or an IP address; nothing else reaches the MQTT client."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not _HOSTNAME.match(value):
            raise ValueError("must be a host name or an IP address") from None
    return value


def is_loopback(host: str) -> bool:
    """Is ``host`` this machine (127.0.0.0/8, ::1 or localhost)?"""
    if host.lower().rstrip(".") in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _no_control(value: str) -> str:
    if not is_plain(value):
        raise ValueError("must not contain control or invisible characters")
    if value != value.strip():
        raise ValueError("must not start or end with white space")
    return value


Host = Annotated[str, StringConstraints(min_length=1, max_length=253), AfterValidator(_host)]
# Human-readable strings: bounded, no control characters.
Username = Annotated[
    str, StringConstraints(min_length=1, max_length=128), AfterValidator(_no_control)
]
ShortText = Annotated[
    str, StringConstraints(min_length=1, max_length=64), AfterValidator(_no_control)
]


def _path_text(value: object) -> object:
    """A path as written in the file: a non-empty string with no control characters."""
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str):
        return value  # the type check below names the problem
    if not value:
        raise ValueError("must not be empty")
    if len(value) > 1024:
        raise ValueError("must be at most 1024 characters")
    _no_control(value)
    return value


FilePath = Annotated[Path, Field(strict=False), BeforeValidator(_path_text)]

# Where the gateway must never keep its state: the system's own directories.
_SYSTEM_TREES = (
    "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/proc", "/sbin", "/sys", "/usr",
)  # fmt: skip
_SYSTEM_DIRS = frozenset(
    (
        "/", "/home", "/media", "/mnt", "/opt", "/root", "/run", "/srv", "/tmp", "/var",
        "/var/lib", "/var/log", "/var/tmp", *_SYSTEM_TREES,
    )
)  # fmt: skip


def _state_dir(value: Path) -> Path:
    """A data or recording directory: never a system directory (``/etc`` by accident)."""
    absolute = PurePosixPath(os.path.normpath(os.path.abspath(value)))
    text = str(absolute)
    if text in _SYSTEM_DIRS or any(
        text == tree or text.startswith(tree + "/") for tree in _SYSTEM_TREES
    ):
        raise ValueError(f"{printable(text)} is a system directory; give a directory of its own")
    return value


StateDir = Annotated[FilePath, AfterValidator(_state_dir)]


class FieldProblem(ValueError):
    """A cross-field problem that belongs to one field (named in the message)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


class _Strict(BaseModel):
    """No unknown keys, no string-to-number or bool-to-int coercion, finite floats, frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class GatewaySettings(_Strict):
    id: TopicSegment
    site: TopicSegment
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    data_dir: StateDir = Path("var/devicegw")
    # For simulations only: run the gateway's clock this many times faster than real time.
    time_scale: float = Field(default=1.0, gt=0, le=10_000)
    # Record every raw link event here (docs/recording-format.md); None: no recording.
    record_dir: StateDir | None = None


class TlsSettings(_Strict):
    enabled: bool = False
    ca_file: FilePath | None = None
    cert_file: FilePath | None = None
    key_file: FilePath | None = None
    # Only honoured for a loopback broker; logged loudly when used.
    insecure_skip_verify: bool = False

    @model_validator(mode="after")
    def _client_cert_pair(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        return self


class BrokerSettings(_Strict):
    host: Host = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    client_id: ClientId | None = None
    username: Username | None = None
    password_env: EnvName | None = None
    password_file: FilePath | None = None
    # A password to a broker that is not on this machine goes over TLS, unless this says
    # otherwise (then the gateway says so loudly at every start).
    allow_plaintext_password: bool = False
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    # Ends in the contract's major version (docs/contract.md); another version is refused.
    topic_prefix: TopicPrefix = f"devicegw/{TOPIC_VERSION}"
    # "auto" tries MQTT 5 and falls back to 3.1.1 if the broker refuses it.
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    tls: TlsSettings = TlsSettings()
    reconnect_initial_s: float = Field(default=0.5, gt=0, le=60)
    reconnect_max_s: float = Field(default=30.0, gt=0, le=3600)
    #: Broker accounts whose ``cmd/assign/{username}`` commands are applied (the site's
    #: IWRS/EDC); empty: the gateway does not listen. The broker's ACL must let each
    #: account write only its own level (docs/assignments.md, "Over MQTT").
    assign_users: list[Username] = Field(default_factory=list, max_length=64)

    @model_validator(mode="after")
    def _prefix_version(self) -> Self:
        for level in self.topic_prefix.split("/"):
            if re.fullmatch(r"v\d+", level) and level != TOPIC_VERSION:
                raise ValueError(
                    f"topic_prefix {self.topic_prefix!r} names contract {level}, but this gateway "
                    f"publishes contract {TOPIC_VERSION} (docs/contract.md, 'Migrating to v2')"
                )
        return self

    @model_validator(mode="after")
    def _one_password_source(self) -> Self:
        if self.password_env and self.password_file:
            raise ValueError("give password_env or password_file, not both")
        if self.tls.insecure_skip_verify and not is_loopback(self.host):
            raise ValueError("tls.insecure_skip_verify is only allowed for a loopback broker")
        if self.reconnect_initial_s > self.reconnect_max_s:
            raise FieldProblem(
                "broker.reconnect_initial_s", "must not be above broker.reconnect_max_s"
            )
        if self.plaintext_password and not self.allow_plaintext_password:
            raise FieldProblem(
                "broker.tls.enabled",
                f"a password would go in plain text to {printable(self.host)}, which is not this"
                " machine: enable [broker.tls], or set broker.allow_plaintext_password = true",
            )
        return self

    @property
    def plaintext_password(self) -> bool:
        """Would a password travel unencrypted to another machine?"""
        has_password = self.password_env is not None or self.password_file is not None
        return has_password and not self.tls.enabled and not is_loopback(self.host)

    def password(self) -> SecretStr | None:
        """The broker password from the environment or a file; never from the config itself."""
        if self.password_env:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ConfigError(
                    f"broker.password_env: environment variable {self.password_env} is not set",
                    field="broker.password_env",
                )
            return SecretStr(value)
        if self.password_file:
            try:
                return SecretStr(self.password_file.read_text(encoding="utf-8").strip())
            except (OSError, UnicodeDecodeError) as exc:
                why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise ConfigError(
                    f"broker.password_file: cannot read {printable(self.password_file)}: {why}",
                    field="broker.password_file",
                ) from exc
        return None


class DoseRules(_Strict):
    """The trial's rules for one nebulization; defaults are the protocol's.

    Ranges are what a VM-1 treatment can mean: a 6 mL reservoir, and a device
    that ends any treatment 40 minutes after its start (ICD section 3).
    """

    prescribed_volume_ml: float = Field(default=3.0, gt=0, le=6.0)
    min_delivered_fraction: float = Field(default=0.90, gt=0, le=1.0)
    # Below this fraction a session counts as aborted rather than partial.
    abort_below_fraction: float = Field(default=0.10, ge=0, le=1.0)
    # Above this fraction the dose is a deviation (delivered_above_maximum): an overdose.
    max_delivered_fraction: float = Field(default=1.15, ge=1.0, le=3.0)
    min_duration_s: float = Field(default=120.0, ge=0, le=2400)
    max_duration_s: float = Field(default=1800.0, gt=0, le=2400)
    max_total_pause_s: float = Field(default=600.0, ge=0, le=2400)
    # Reservoir drop and OUTPUT integral may differ by this much before the event flags it
    # (ICD: level sensor +-0.1 mL, rate estimate +-10 %).
    volume_tolerance_ml: float = Field(default=0.4, ge=0, le=6.0)
    # A silence in OUTPUT samples longer than this is reported as a telemetry gap.
    max_sample_gap_s: float = Field(default=1.0, gt=0, le=600)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.min_duration_s >= self.max_duration_s:
            raise ValueError("min_duration_s must be below max_duration_s")
        if self.abort_below_fraction >= self.min_delivered_fraction:
            raise ValueError("abort_below_fraction must be below min_delivered_fraction")
        return self


class TelemetrySettings(_Strict):
    enabled: bool = True
    interval_s: float = Field(default=1.0, ge=0.05, le=3600)


def _port_path(value: str) -> str:
    if not (value.startswith("/") or value.startswith("sim://")):
        raise ValueError("must be an absolute path (e.g. /dev/serial/by-id/...)")
    return _no_control(value)


#: A serial port: an absolute device path (``sim://`` is the replayer's virtual port).
PortPath = Annotated[
    str, StringConstraints(min_length=2, max_length=1024), AfterValidator(_port_path)
]


class SerialLinkSettings(_Strict):
    kind: Literal["serial"] = "serial"
    port: PortPath
    baudrate: Literal[VM1_BAUDRATES] = 115200  # type: ignore[valid-type]

    @property
    def port_name(self) -> str:
        """Where the device is reached, for messages, audit records and uniqueness checks."""
        return self.port


def _link_kind(value: object) -> str:
    """A link is serial unless it says otherwise (``kind`` may be left out for serial)."""
    kind = value.get("kind", "serial") if isinstance(value, dict) else getattr(value, "kind", None)
    return str(kind)


class BleLinkSettings(_Strict):
    """A VM-1 over Bluetooth LE (ICD section 4), found by address or advertised name.

    The address / name given is also the allow-list: no other device is used.
    """

    kind: Literal["ble"]
    address: str | None = Field(default=None, pattern=r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")
    name: ShortText | None = None
    adapter: str | None = Field(default=None, pattern=r"^hci[0-9]{1,3}$")
    scan_timeout_s: float = Field(default=10.0, gt=0, le=300)

    @model_validator(mode="after")
    def _identified(self) -> Self:
        if self.address is None and self.name is None:
            raise ValueError("a BLE link needs an address or an advertised name")
        return self

    @property
    def port_name(self) -> str:
        return f"ble:{self.address or self.name}"


class DeviceSettings(_Strict):
    id: TopicSegment
    type: Literal["vm1"]
    link: Annotated[
        Annotated[SerialLinkSettings, Tag("serial")] | Annotated[BleLinkSettings, Tag("ble")],
        Discriminator(_link_kind),
    ]
    bed: TopicSegment
    #: The bed's initial assignment (docs/assignments.md): used only while the bed has no
    #: assignment history in the store; afterwards `devicegw assign` and its kin decide.
    #: Both or neither: a bed may start unassigned.
    subject_id: SubjectId | None = None
    kit_number: KitNumber | None = None
    # Allow-list: a device answering with another serial number is refused.
    expected_serial: Vm1Serial | None = None
    output_rate_hz: int | None = Field(default=None, ge=1, le=50)

    @model_validator(mode="after")
    def _both_or_neither(self) -> Self:
        if (self.subject_id is None) != (self.kit_number is None):
            missing = "kit_number" if self.kit_number is None else "subject_id"
            raise FieldProblem(
                missing, "an initial assignment needs both subject_id and kit_number (or neither)"
            )
        return self


class OximeterSerialLinkSettings(_Strict):
    kind: Literal["serial"] = "serial"
    port: PortPath
    baudrate: Literal[NONIN_BAUDRATES] = 9600  # type: ignore[valid-type]

    @property
    def port_name(self) -> str:
        return self.port


class OximeterSettings(_Strict):
    """A pulse oximeter on a bed; it watches the subject of the nebulizer on the same bed."""

    id: TopicSegment
    # nonin_oem3: serial; plx (Bluetooth SIG Pulse Oximeter Service) and berrymed: BLE.
    type: Literal["nonin_oem3", "plx", "berrymed"]
    link: Annotated[
        Annotated[OximeterSerialLinkSettings, Tag("serial")]
        | Annotated[BleLinkSettings, Tag("ble")],
        Discriminator(_link_kind),
    ]
    bed: TopicSegment
    #: Must match the nebulizer's initial assignment on the same bed (or be absent).
    subject_id: SubjectId | None = None
    model: ShortText | None = None
    serial_no: ShortText | None = None

    @model_validator(mode="after")
    def _link_fits_type(self) -> Self:
        wants = "serial" if self.type == "nonin_oem3" else "ble"
        if self.link.kind != wants:
            raise ValueError(
                f"a {self.type} oximeter is reached over {wants}, not {self.link.kind}"
            )
        return self


class Spo2Rules(_Strict):
    """Thresholds of the SpO2 overlay; defaults are the protocol's."""

    #: Valid samples in this window before the session start make the baseline.
    baseline_window_s: float = Field(default=120.0, gt=0, le=3600)
    #: If there were none: the session's first this-many seconds (flagged first_minute).
    baseline_fallback_s: float = Field(default=60.0, gt=0, le=600)
    #: Monitoring continues this long after the session ends (SpO2 may dip ~30 min).
    observation_window_s: float = Field(default=1800.0, ge=0, le=6 * 3600)
    #: A drop of at least this many points below baseline is low ...
    drop_points: float = Field(default=4.0, gt=0, le=50)
    #: ... and so is SpO2 below this (%).
    absolute_threshold: float = Field(default=90.0, gt=50, le=100)
    #: Low for at least this long (on valid samples) is a desaturation: alert.
    sustain_s: float = Field(default=10.0, ge=0, le=600)
    #: Back above both thresholds for this long clears the alert.
    clear_s: float = Field(default=10.0, ge=0, le=600)
    #: A sample holds at most this long (coverage); longer silences are gaps.
    max_sample_gap_s: float = Field(default=5.0, gt=0, le=600)
    #: A baseline needs at least this many seconds covered by valid samples.
    baseline_min_valid_s: float = Field(default=30.0, ge=0, le=3600)
    #: A window is "monitored" only if valid samples cover at least this share of it.
    min_coverage_pct: float = Field(default=80.0, ge=0, le=100)

    def out(self) -> Spo2RulesOut:
        return Spo2RulesOut(**self.model_dump())


def _regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"not a regular expression: {exc}") from exc
    return pattern


def _known_zone(name: str) -> str:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"{name!r} is not an IANA time zone (e.g. Europe/Berlin)") from exc
    return name


TimeZoneName = Annotated[str, AfterValidator(_known_zone)]
StudyId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$")]


class TrialSettings(_Strict):
    """The study the records belong to: what the exports need (docs/contract.md, "Exports")."""

    #: SDTM STUDYID; the FHIR output references the study by it.
    study_id: StudyId
    #: The site's IANA time zone: SDTM dates are given as local times with their offset.
    time_zone: TimeZoneName
    #: Other sites' zones, by ``gateway.site``, for an export over several sites.
    site_time_zones: dict[TopicSegment, TimeZoneName] = Field(default_factory=dict)
    #: The IWRS kit list (CSV ``kit_number,subject_id``; never an arm): a kit not listed
    #: for the subject is refused at assignment (docs/assignments.md).
    kit_list: FilePath | None = None
    #: Subject ids must match this regular expression in full (e.g. ``CVD-042-\\d{4}``).
    subject_pattern: Annotated[str, AfterValidator(_regex)] | None = None

    def zone_for(self, site: str) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.site_time_zones.get(site, self.time_zone))


class ScheduleSettings(_Strict):
    """The dosing schedule (docs/assignments.md, "Schedule"): trial default BID for 5 days."""

    doses_per_day: int = Field(default=2, ge=1, le=24)
    days: int = Field(default=5, ge=1, le=366)
    #: Planned time between doses; the subject's first dose is slot 1.
    interval_h: float = Field(default=12.0, gt=0, le=24 * 7)
    #: A dose within +- this of its planned time is in its window.
    window_h: float = Field(default=3.0, ge=0, le=24 * 3)
    #: How often the gateway looks for windows closed without a dose.
    check_interval_s: float = Field(default=60.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _windows_apart(self) -> Self:
        if 2 * self.window_h >= self.interval_h:
            raise FieldProblem(
                "window_h", "two windows would overlap: it must be under half of interval_h"
            )
        return self


class HttpSettings(_Strict):
    """The ward dashboard, /metrics and the health endpoints (README "Ward dashboard")."""

    #: ``host:port``. Off loopback the dashboard requires ``tls_cert``/``tls_key`` and
    #: ``users_file`` (a login); on loopback both are optional.
    listen: str = "127.0.0.1:8080"
    #: Without ``users_file`` (loopback only): the role everyone on this machine gets,
    #: with no login. ``viewer`` (blinded, read-only) by default; ``nurse`` may assign;
    #: ``engineer`` sees the restricted physical detail. Ignored when users_file is set.
    loopback_role: Literal["viewer", "nurse", "engineer"] = "viewer"
    #: TOML file of dashboard users and their argon2 password hashes
    #: (``devicegw web-user``); set: every page needs a login, loopback included.
    users_file: FilePath | None = None
    #: PEM certificate chain and private key: the dashboard is served over HTTPS.
    tls_cert: FilePath | None = None
    tls_key: FilePath | None = None
    #: A login session ends after this long without a request, and at most this long
    #: after the login (seconds, the gateway's clock).
    session_idle_s: float = Field(default=1800.0, gt=0)
    session_max_s: float = Field(default=12 * 3600.0, gt=0)
    #: Failed logins allowed per user name and per client address in a window of
    #: ``login_lockout_s`` before further attempts are refused (429) until it passes.
    login_max_failures: int = Field(default=5, ge=1)
    login_lockout_s: float = Field(default=900.0, gt=0)

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def login_required(self) -> bool:
        return self.users_file is not None

    @model_validator(mode="after")
    def _secured_off_loopback(self) -> Self:
        host, sep, port = self.listen.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
            raise FieldProblem("listen", "must be host:port, e.g. 127.0.0.1:8080 (port 0: any)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise FieldProblem("tls_cert", "tls_cert and tls_key go together")
        if not is_loopback(host.strip("[]")) and (self.tls_cert is None or not self.users_file):
            raise FieldProblem(
                "listen",
                "off loopback (127.0.0.1, ::1) the dashboard needs TLS (tls_cert, tls_key) "
                "and a login (users_file)",
            )
        return self


class Config(_Strict):
    gateway: GatewaySettings
    # Optional for the daemon; required by `devicegw export`.
    trial: TrialSettings | None = None
    broker: BrokerSettings = BrokerSettings()
    dose_rules: DoseRules = DoseRules()
    spo2_rules: Spo2Rules = Spo2Rules()
    telemetry: TelemetrySettings = TelemetrySettings()
    #: Absent: doses carry no dose number and no dose is reported missed.
    schedule: ScheduleSettings | None = None
    #: Absent: no dashboard, no /metrics.
    http: HttpSettings | None = None
    devices: list[DeviceSettings] = Field(default_factory=list)
    oximeters: list[OximeterSettings] = Field(default_factory=list)
    # sha256 of the file's bytes, for the audit trail and the birth message.
    source_sha256: str = ""

    @model_validator(mode="after")
    def _unique(self) -> Self:
        """One device per id, port and bed; one bed per subject and kit; serials not shared."""
        owners: dict[tuple[str, str], str] = {}

        def claim(kind: str, key: str | None, where: str, field: str) -> None:
            if key is None:
                return
            first = owners.setdefault((kind, key), where)
            if first != where:
                raise FieldProblem(
                    f"{where}.{field}", f"{printable(key)!r} is already used by {first}"
                )

        for i, d in enumerate(self.devices):
            where = f"devices[{i}]"
            claim("id", d.id, where, "id")
            claim("port", d.link.port_name, where, "link.port")
            claim("bed", d.bed, where, "bed")
            claim("subject", d.subject_id, where, "subject_id")
            claim("kit", d.kit_number, where, "kit_number")
            claim("vm1-serial", d.expected_serial, where, "expected_serial")
        beds = {d.bed: (i, d) for i, d in enumerate(self.devices)}
        subject_beds = {d.subject_id: d.bed for d in self.devices if d.subject_id is not None}
        for i, ox in enumerate(self.oximeters):
            where = f"oximeters[{i}]"
            claim("id", ox.id, where, "id")
            claim("port", ox.link.port_name, where, "link.port")
            claim("oximeter-bed", ox.bed, where, "bed")
            claim("oximeter-serial", ox.serial_no, where, "serial_no")
            neb = beds.get(ox.bed)
            if neb is not None and neb[1].subject_id != ox.subject_id:
                raise FieldProblem(
                    f"{where}.subject_id",
                    f"oximeter {ox.id} on bed {ox.bed} is assigned to subject {ox.subject_id}, "
                    f"but the nebulizer on that bed (devices[{neb[0]}]) to {neb[1].subject_id}",
                )
            other_bed = (
                ox.bed if ox.subject_id is None else subject_beds.setdefault(ox.subject_id, ox.bed)
            )
            if other_bed != ox.bed:
                raise FieldProblem(
                    f"{where}.subject_id",
                    f"subject {ox.subject_id} is on bed {other_bed}, not on bed {ox.bed}",
                )
        return self

    def oximeter_for(self, device: DeviceSettings) -> OximeterSettings | None:
        """The oximeter watching the subject of this nebulizer (same bed), if any."""
        return next((ox for ox in self.oximeters if ox.bed == device.bed), None)


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    previous: int | str | None = None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif previous == "link" and part in ("serial", "ble"):
            pass  # the discriminator's tag, not a key of the file
        else:
            out += ("." if out else "") + printable(part, limit=80)
        previous = part
    return out


def _problems(exc: ValidationError) -> list[tuple[str, str]]:
    """(field, message) for each problem; cross-field problems name their own field."""
    out = []
    for err in exc.errors(include_url=False):
        where = _loc(tuple(err["loc"]))
        message = err["msg"]
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, ValueError):
            message = str(cause)
            if isinstance(cause, FieldProblem):
                where = cause.field
        out.append((where or "(file)", printable(message, limit=300)))
    return out


def format_validation_error(exc: ValidationError) -> str:
    """All problems on one line, each naming the field, e.g. ``devices[0].type: ...``."""
    return "; ".join(f"{where}: {message}" for where, message in _problems(exc))


def parse_config(data: dict[str, object], *, sha256: str = "", path: str | None = None) -> Config:
    where = f" in {printable(path)}" if path else ""
    try:
        cfg = Config.model_validate({**data, "source_sha256": sha256})
    except ValidationError as exc:
        raise ConfigError(
            f"invalid configuration{where}: {format_validation_error(exc)}",
            path=path,
            field=_problems(exc)[0][0],
        ) from None
    except RecursionError:
        raise ConfigError(f"invalid configuration{where}: nested too deeply", path=path) from None
    return cfg


def load_config(path: str | Path) -> Config:
    """Read and validate a configuration file; every problem is one ``ConfigError``."""
    p = Path(path)
    shown = printable(p)
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        why = f"cannot read configuration {shown}: {exc.strerror}"
        raise ConfigError(why, path=str(p)) from exc
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(
            f"{shown} is larger than {MAX_FILE_BYTES // 1024} KiB: not a gateway configuration",
            path=str(p),
        )
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{shown} is not valid TOML: {printable(exc, limit=200)}", path=str(p)
        ) from exc
    except RecursionError:
        raise ConfigError(f"{shown} is not valid TOML: nested too deeply", path=str(p)) from None
    return parse_config(data, sha256=hashlib.sha256(raw).hexdigest(), path=str(p))
