"""Gateway configuration: one TOML file, validated once at the edge.

Everything inward gets typed objects. A bad file produces one ``ConfigError``
whose message names the field and the problem, and the daemon does not start.
Blinding is enforced here too: device assignments carry a kit number and a
pseudonymous subject ID, and unknown keys (an "arm" column pasted from a
randomisation list, a patient name) are rejected rather than carried along.
"""

from __future__ import annotations

import hashlib
import os
import tomllib
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    StringConstraints,
    Tag,
    ValidationError,
    model_validator,
)

from devicegw.contract.spo2 import Spo2RulesOut
from devicegw.errors import ConfigError

Ident = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
TopicSegment = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
# Pseudonymous trial identifiers: letters, digits, dashes; no spaces, so no names.
SubjectId = Annotated[str, StringConstraints(pattern=r"^[A-Z0-9][A-Z0-9-]{2,31}$")]
KitNumber = Annotated[str, StringConstraints(pattern=r"^[A-Z0-9][A-Z0-9-]{0,31}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GatewaySettings(_Strict):
    id: TopicSegment
    site: TopicSegment
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    data_dir: Path = Path("var/devicegw")
    # For simulations only: run the gateway's clock this many times faster than real time.
    time_scale: float = Field(default=1.0, gt=0, le=10_000)
    # Record every raw link event here (docs/recording-format.md); None: no recording.
    record_dir: Path | None = None


class TlsSettings(_Strict):
    enabled: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    # Only honoured for a loopback broker; logged loudly when used.
    insecure_skip_verify: bool = False

    @model_validator(mode="after")
    def _client_cert_pair(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        return self


class BrokerSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    client_id: str | None = None
    username: str | None = None
    password_env: str | None = None
    password_file: Path | None = None
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    topic_prefix: str = "devicegw/v1"
    # "auto" tries MQTT 5 and falls back to 3.1.1 if the broker refuses it.
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    tls: TlsSettings = TlsSettings()
    reconnect_initial_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _one_password_source(self) -> Self:
        if self.password_env and self.password_file:
            raise ValueError("give password_env or password_file, not both")
        if self.tls.insecure_skip_verify and self.host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError("tls.insecure_skip_verify is only allowed for a loopback broker")
        return self

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
            except OSError as exc:
                raise ConfigError(
                    f"broker.password_file: cannot read {self.password_file}: {exc.strerror}",
                    field="broker.password_file",
                ) from exc
        return None


class DoseRules(_Strict):
    """The trial's rules for one nebulization; defaults are the protocol's."""

    prescribed_volume_ml: float = Field(default=3.0, gt=0, le=6.0)
    min_delivered_fraction: float = Field(default=0.90, gt=0, le=1.0)
    # Below this fraction a session counts as aborted rather than partial.
    abort_below_fraction: float = Field(default=0.10, ge=0, le=1.0)
    min_duration_s: float = Field(default=120.0, ge=0)
    max_duration_s: float = Field(default=1800.0, gt=0)
    max_total_pause_s: float = Field(default=600.0, ge=0)
    # Reservoir drop and OUTPUT integral may differ by this much before the event flags it
    # (ICD: level sensor +-0.1 mL, rate estimate +-10 %).
    volume_tolerance_ml: float = Field(default=0.4, ge=0)
    # A silence in OUTPUT samples longer than this is reported as a telemetry gap.
    max_sample_gap_s: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.min_duration_s >= self.max_duration_s:
            raise ValueError("min_duration_s must be below max_duration_s")
        if self.abort_below_fraction >= self.min_delivered_fraction:
            raise ValueError("abort_below_fraction must be below min_delivered_fraction")
        return self


class TelemetrySettings(_Strict):
    enabled: bool = True
    interval_s: float = Field(default=1.0, gt=0)


class SerialLinkSettings(_Strict):
    kind: Literal["serial"] = "serial"
    port: str = Field(min_length=1)
    baudrate: int = 115200

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
    name: str | None = Field(default=None, min_length=1)
    adapter: str | None = Field(default=None, pattern=r"^hci[0-9]+$")
    scan_timeout_s: float = Field(default=10.0, gt=0)

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
    subject_id: SubjectId
    kit_number: KitNumber
    # Allow-list: a device answering with another serial number is refused.
    expected_serial: str | None = None
    output_rate_hz: int | None = Field(default=None, ge=1, le=50)


class OximeterSerialLinkSettings(_Strict):
    kind: Literal["serial"] = "serial"
    port: str = Field(min_length=1)
    baudrate: int = 9600  # Nonin OEM III: 9600 8N1, no flow control

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
    subject_id: SubjectId
    model: str | None = None
    serial_no: str | None = None

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

    def out(self) -> Spo2RulesOut:
        return Spo2RulesOut(**self.model_dump())


class Config(_Strict):
    gateway: GatewaySettings
    broker: BrokerSettings = BrokerSettings()
    dose_rules: DoseRules = DoseRules()
    spo2_rules: Spo2Rules = Spo2Rules()
    telemetry: TelemetrySettings = TelemetrySettings()
    devices: list[DeviceSettings] = Field(default_factory=list)
    oximeters: list[OximeterSettings] = Field(default_factory=list)
    # sha256 of the file's bytes, for the audit trail and the birth message.
    source_sha256: str = ""

    @model_validator(mode="after")
    def _unique(self) -> Self:
        seen: dict[str, str] = {}
        for d in self.devices:
            for key, label in ((d.id, "id"), (d.link.port_name, "link.port"), (d.bed, "bed")):
                tag = f"{label}:{key}"
                if tag in seen:
                    raise ValueError(f"two devices share {label} {key!r}")
                seen[tag] = d.id
        beds = {d.bed: d for d in self.devices}
        oximeter_beds: set[str] = set()
        for ox in self.oximeters:
            for key, label in ((ox.id, "id"), (ox.link.port_name, "link.port")):
                tag = f"{label}:{key}"
                if tag in seen:
                    raise ValueError(f"oximeter {ox.id} shares {label} {key!r} with another device")
                seen[tag] = ox.id
            if ox.bed in oximeter_beds:
                raise ValueError(f"two oximeters on bed {ox.bed!r}")
            oximeter_beds.add(ox.bed)
            neb = beds.get(ox.bed)
            if neb is not None and neb.subject_id != ox.subject_id:
                raise ValueError(
                    f"oximeter {ox.id} on bed {ox.bed} is assigned to subject {ox.subject_id}, "
                    f"but the nebulizer on that bed to {neb.subject_id}"
                )
        return self

    def oximeter_for(self, device: DeviceSettings) -> OximeterSettings | None:
        """The oximeter watching the subject of this nebulizer (same bed), if any."""
        return next((ox for ox in self.oximeters if ox.bed == device.bed), None)


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "(file)"


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem, each naming the field, e.g. ``devices[0].type: ...``."""
    lines = []
    for err in exc.errors(include_url=False):
        lines.append(f"{_loc(tuple(err['loc']))}: {err['msg']}")
    return "; ".join(lines)


def parse_config(data: dict[str, object], *, sha256: str = "", path: str | None = None) -> Config:
    try:
        cfg = Config.model_validate({**data, "source_sha256": sha256})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise ConfigError(
            f"invalid configuration{f' in {path}' if path else ''}: {format_validation_error(exc)}",
            path=path,
            field=_loc(tuple(first["loc"])),
        ) from None
    return cfg


def load_config(path: str | Path) -> Config:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {p}: {exc.strerror}", path=str(p)) from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p} is not valid TOML: {exc}", path=str(p)) from exc
    return parse_config(data, sha256=hashlib.sha256(raw).hexdigest(), path=str(p))
