"""``devicegw tail``: watch the MQTT contract live; the core the reference EDC client shares.

Two uses of one small core (the client itself: :mod:`devicegw.edc.client`):

- **tail** (people and scripts): subscribe to everything a gateway publishes
  and print each message as it arrives, checked against the contract's JSON
  Schemas and for per-gateway sequence gaps.
- **reference EDC client** (``--dose-events --ack-store FILE``): the pattern an
  EDC integration copies. Subscribe to the dose events with QoS 1 on a
  persistent session, keep the first copy of each ``event_id`` in an
  append-only file, write and fsync it *before* acknowledging the message to
  the broker. See "Reference EDC client" in docs/contract.md.

The core is I/O-free and tested directly: :class:`TailProcessor` turns
``(topic, payload bytes, retain)`` into a :class:`TailResult`;
:class:`AckStore` is the file. The aiomqtt loops at the bottom stay thin.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TextIO

import aiomqtt
from jsonschema import Draft202012Validator, FormatChecker
from rich.console import Console
from rich.text import Text

from devicegw.contract.base import TOPIC_VERSION
from devicegw.contract.schemas import MODELS, strict_schemas
from devicegw.contract.topics import topic_payloads
from devicegw.contract.vocabulary import PAYLOAD_FEED, Feed, PayloadKind
from devicegw.edc.ack_store import StoreOutcome
from devicegw.errors import TransportError
from devicegw.safe_text import printable
from drivers.clock import Clock, SystemClock

log = logging.getLogger(__name__)

DEFAULT_PREFIX = f"devicegw/{TOPIC_VERSION}"
ALL_TOPICS = f"{DEFAULT_PREFIX}/#"
EDC_CLIENT_ID = "edc-reference"
EXIT_TIMEOUT = 1


# -- schema validation -------------------------------------------------------------


def _is_date_time(value: object) -> bool:
    """RFC 3339 date-time (jsonschema only checks it with an optional extra package)."""
    if not isinstance(value, str):
        return True
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return False
    return "T" in value.upper() and parsed.tzinfo is not None


def _format_checker() -> FormatChecker:
    checker = Draft202012Validator.FORMAT_CHECKER
    checker = FormatChecker(formats=list(checker.checkers))
    checker.checks("date-time")(_is_date_time)
    return checker


def contract_validators() -> dict[str, Draft202012Validator]:
    """``event_type`` -> validator of the *strict* schemas the models generate.

    Strict: every object closed, so an undeclared field is reported (as an
    error, or as a warning for a consumer that ignores unknown fields). The
    published ``docs/schemas`` are the same with the objects left open (the
    test suite checks both); generated at run time so an installed package
    needs no data files.
    """
    checker = _format_checker()
    out: dict[str, Draft202012Validator] = {}
    for name, schema in strict_schemas().items():
        model, _ = MODELS[name]
        event_type = model.model_fields["event_type"].default
        out[str(event_type)] = Draft202012Validator(schema, format_checker=checker)
    return out


def feed_of(payload: Mapping[str, Any]) -> Feed | None:
    """The feed of a payload by its ``event_type`` (None when it has no known one)."""
    event_type = payload.get("event_type")
    try:
        return PAYLOAD_FEED[PayloadKind(event_type)] if isinstance(event_type, str) else None
    except ValueError:
        return None


def _short(message: str, limit: int = 160) -> str:
    return message if len(message) <= limit else message[: limit - 1] + "…"


# -- sequence gaps -----------------------------------------------------------------


def gateway_of(payload: Mapping[str, Any]) -> str | None:
    """The publishing gateway: ``gateway_id``, or ``gateway.id`` in a dose event."""
    gateway_id = payload.get("gateway_id")
    if isinstance(gateway_id, str):
        return gateway_id
    gateway = payload.get("gateway")
    if isinstance(gateway, Mapping) and isinstance(gateway.get("id"), str):
        return str(gateway["id"])
    return None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def sequence_of(payload: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """``(birth_seq, seq)`` of a payload; None where it has none.

    Read from the ``delivery`` block (``{birth_seq, seq, redelivery}``), or
    from top-level ``seq`` (with ``birth_seq`` on an online gateway status).
    """
    delivery = payload.get("delivery")
    if isinstance(delivery, Mapping) and "seq" in delivery:
        return _int(delivery.get("birth_seq")), _int(delivery.get("seq"))
    birth = None
    if payload.get("event_type") == PayloadKind.GATEWAY_STATUS and payload.get("online") is True:
        birth = _int(payload.get("birth_seq"))
    return birth, _int(payload.get("seq"))


def _is_last_will(payload: Mapping[str, Any]) -> bool:
    return (
        payload.get("event_type") == PayloadKind.GATEWAY_STATUS and payload.get("online") is False
    )


@dataclass(slots=True)
class _GatewaySeq:
    birth_seq: int | None = None
    expected: int | None = None  # the next live seq; None until a live message sets it


class SequenceChecker:
    """Per-gateway, per-feed ``seq`` counter: flags gaps in what this subscriber received.

    ``seq`` increases by one per message a gateway publishes on one feed
    (blinded and restricted are numbered apart, docs/blinding.md), so gaps are
    only meaningful when subscribed to *everything* of that feed; telemetry
    is QoS 0 and may legitimately be dropped. Payloads without ``seq`` or a
    gateway id are ignored. Retained copies replayed on subscribe are old
    snapshots: never a gap, and they set no baseline. A higher ``birth_seq``
    is a new birth (a new connection or a restart): the count restarts there;
    a message of an earlier birth (e.g. a last will published late) is ignored,
    and so is an offline gateway status out of step: the broker's copy of the
    last will carries the seq it was stamped with at connect.
    """

    def __init__(self) -> None:
        self._gateways: dict[str, _GatewaySeq] = {}

    def check(self, payload: Mapping[str, Any], *, retained: bool) -> str | None:
        gateway = gateway_of(payload)
        birth, seq = sequence_of(payload)
        if gateway is None or seq is None:
            return None
        state = self._gateways.setdefault(f"{gateway}/{feed_of(payload)}", _GatewaySeq())
        if birth is not None and state.birth_seq is not None and birth < state.birth_seq:
            return None
        if birth is not None and (state.birth_seq is None or birth > state.birth_seq):
            state.birth_seq = birth
            state.expected = None if retained else seq + 1
            return None
        if retained:
            return None
        expected = state.expected
        if _is_last_will(payload) and seq != expected:
            return None  # stamped when the gateway connected (seq 0), not when sent
        if expected is None or seq == expected:
            state.expected = seq + 1
            return None
        if seq > expected:
            state.expected = seq + 1
            return f"sequence gap: expected {expected}, got {seq}"
        return (
            f"sequence went back: expected {expected}, got {seq} "
            "(a repeated copy, or a restart whose birth message was missed)"
        )


# -- one message in, one result out -----------------------------------------------


@dataclass(frozen=True, slots=True)
class TailResult:
    """What ``devicegw tail`` knows about one received message."""

    topic: str
    retain: bool
    qos: int
    received_utc: datetime
    payload: Any  # the parsed JSON, or the text when it is not JSON
    event_type: str | None
    valid: bool
    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "retain": self.retain,
            "qos": self.qos,
            "received_utc": self.received_utc.isoformat().replace("+00:00", "Z"),
            "event_type": self.event_type,
            "valid": self.valid,
            "errors": list(self.errors),
            "warnings": list(self.warnings),
            "payload": self.payload,
        }


class TailProcessor:
    """Checks each message against the contract: schema, topic, sequence.

    ``unknown_fields="warn"`` is the consumer's reading of the versioning
    policy (ignore fields you do not know): a field the schema does not list
    is a warning, not an error. ``"error"`` checks the contract as written.
    """

    def __init__(
        self,
        *,
        check_sequence: bool = True,
        unknown_fields: Literal["error", "warn"] = "error",
        clock: Clock | None = None,
    ) -> None:
        self._validators = contract_validators()
        self._sequence = SequenceChecker() if check_sequence else None
        self._unknown_fields = unknown_fields
        self._clock = clock or SystemClock()

    def process(self, topic: str, payload: bytes, retain: bool, qos: int = 0) -> TailResult:
        errors: list[str] = []
        warnings: list[str] = []
        body: Any
        try:
            body = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            body = payload.decode("utf-8", errors="replace")
            errors.append(f"not JSON: {exc}")
        event_type = body.get("event_type") if isinstance(body, dict) else None
        if not isinstance(event_type, str):
            event_type = None
        if not errors:
            self._validate(body, event_type, errors, warnings)
        expected = topic_payloads(topic)
        if event_type and expected is not None and event_type not in expected:
            carried = " or ".join(sorted(expected))
            errors.append(f"topic carries {carried} payloads, got {event_type}")
        if self._sequence is not None and isinstance(body, dict):
            note = self._sequence.check(body, retained=retain)
            if note:
                warnings.append(note)
        return TailResult(
            topic=topic,
            retain=retain,
            qos=qos,
            received_utc=self._clock.now(),
            payload=body,
            event_type=event_type,
            valid=not errors,
            errors=tuple(errors),
            warnings=tuple(warnings),
        )

    def _validate(
        self, body: Any, event_type: str | None, errors: list[str], warnings: list[str]
    ) -> None:
        if not isinstance(body, dict):
            errors.append("payload is not a JSON object")
            return
        if event_type is None:
            errors.append("no event_type: cannot choose a schema")
            return
        validator = self._validators.get(event_type)
        if validator is None:
            errors.append(f"unknown event_type {event_type!r}")
            return
        for error in sorted(validator.iter_errors(body), key=lambda e: list(map(str, e.path))):
            where = "/".join(map(str, error.absolute_path)) or "(root)"
            text = f"{where}: {_short(error.message)}"
            if error.validator == "additionalProperties" and self._unknown_fields == "warn":
                warnings.append(f"{text} (ignored: unknown to this version)")
            else:
                errors.append(text)


def _summary(payload: Mapping[str, Any], event_type: str | None) -> str:
    """The few fields a person watching wants, per payload type."""

    def pick(*keys: str) -> str:
        parts = []
        for key in keys:
            value: Any = payload
            for part in key.split("."):
                value = value.get(part) if isinstance(value, Mapping) else None
            if value is not None:
                parts.append(f"{key.rsplit('.', 1)[-1]}={value}")
        return " ".join(parts)

    event = f" event={str(payload.get('event_id'))[:8]}" if payload.get("event_id") else ""
    if event_type == PayloadKind.DOSE_COMPLETION:
        return (
            pick(
                "subject_id",
                "kit_number",
                "verdict",
                "volume.delivered_ml",
                "volume.prescribed_ml",
            )
            + event
        )
    if event_type == PayloadKind.DOSE_DETAIL:
        return pick("device.device_id", "verdict", "volume.delivered_basis") + event
    if event_type == PayloadKind.DEVICE_STATUS:
        return pick("device_id", "connected", "state")
    if event_type == PayloadKind.DEVICE_DETAIL:
        return pick("device_id", "battery_pct", "reservoir_ml", "active_alarms")
    if event_type == PayloadKind.GATEWAY_STATUS:
        return pick("gateway_id", "site", "online", "version")
    if event_type == PayloadKind.TELEMETRY:
        return pick("device_id", "state", "elapsed_s")
    if event_type == PayloadKind.TELEMETRY_DETAIL:
        return pick("device_id", "delivered_ml", "rate_ul_min")
    return ""


class Printer:
    """One line per message: rich text for people, a JSON object for scripts."""

    def __init__(self, *, as_json: bool, out: TextIO | None = None) -> None:
        self.as_json = as_json
        self._out = out or sys.stdout
        self._console = Console(file=self._out, highlight=False, soft_wrap=True)
        self._err = Console(file=sys.stderr, highlight=False, soft_wrap=True)

    def info(self, message: str) -> None:
        self._err.print(Text(f"devicegw tail: {printable(message)}", style="dim"))

    def alarm(self, message: str) -> None:
        self._err.print(Text(f"devicegw tail: {printable(message)}", style="bold red"))

    def emit(self, result: TailResult, stored: StoreOutcome | None = None) -> None:
        if self.as_json:
            obj = result.to_json()
            if stored is not None:
                obj["store"] = stored.value
            self._out.write(json.dumps(obj, ensure_ascii=False) + "\n")
            self._out.flush()
            return
        line = Text()
        line.append(result.received_utc.strftime("%H:%M:%S "), style="dim")
        line.append(printable(result.topic), style="cyan")
        line.append(" retained" if result.retain else "", style="dim")
        line.append(f" {result.event_type or '?'}", style="bold")
        if isinstance(result.payload, Mapping):
            line.append(f" {printable(_summary(result.payload, result.event_type))}")
            birth, seq = sequence_of(result.payload)
            if seq is not None:
                line.append(f" seq={'' if birth is None else f'{birth}:'}{seq}", style="dim")
        if stored is not None:
            line.append(
                f" [{stored.value}]", style="red" if stored is not StoreOutcome.STORED else "green"
            )
        for error in result.errors:
            line.append(f"\n    INVALID {printable(error)}", style="bold red")
        for warning in result.warnings:
            line.append(f"\n    {printable(warning)}", style="yellow")
        self._console.print(line)


# -- the MQTT loops (thin) ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TailOptions:
    host: str
    port: int = 1883
    topics: tuple[str, ...] = (ALL_TOPICS,)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: Path | None = None
    count: int | None = None  # stop after this many messages
    timeout: float | None = None  # stop after this many seconds
    check_sequence: bool = True
    client_id: str = EDC_CLIENT_ID  # the EDC client's persistent session


def mqtt_client(options: TailOptions, **kwargs: Any) -> aiomqtt.Client:
    tls_context = None
    if options.tls or options.ca_file:
        tls_context = ssl.create_default_context(
            cafile=str(options.ca_file) if options.ca_file else None
        )
    return aiomqtt.Client(
        options.host,
        options.port,
        username=options.username,
        password=options.password,
        tls_context=tls_context,
        **kwargs,
    )


async def messages_until_count(
    client: aiomqtt.Client, options: TailOptions
) -> AsyncIterator[aiomqtt.Message]:
    """The client's messages, stopping after ``--count`` of them."""
    if options.count == 0:
        return
    seen = 0
    async for message in client.messages:
        yield message
        seen += 1
        if options.count is not None and seen >= options.count:
            return


def payload_bytes(message: aiomqtt.Message) -> bytes:
    payload = message.payload
    if isinstance(payload, bytes):
        return payload
    return b"" if payload is None else str(payload).encode()


async def bounded(run: Callable[[], Awaitable[int]], options: TailOptions, printer: Printer) -> int:
    """Run one MQTT loop under ``--timeout``; broker errors become TransportError."""
    try:
        async with asyncio.timeout(options.timeout):
            return await run()
    except TimeoutError:
        if options.count is not None:
            printer.alarm(f"timed out after {options.timeout:g} s before {options.count} messages")
            return EXIT_TIMEOUT
        return 0
    except aiomqtt.MqttError as exc:
        raise TransportError(f"broker {options.host}:{options.port}: {exc}") from exc


async def run_tail(options: TailOptions, printer: Printer) -> int:
    """Subscribe to ``options.topics`` and print every message, checked."""
    processor = TailProcessor(check_sequence=options.check_sequence)

    async def run() -> int:
        async with mqtt_client(options) as client:
            for topic in options.topics:
                await client.subscribe(topic, qos=1)
            printer.info(
                f"subscribed to {', '.join(options.topics)} on {options.host}:{options.port}"
            )
            async for message in messages_until_count(client, options):
                printer.emit(
                    processor.process(
                        str(message.topic), payload_bytes(message), message.retain, message.qos
                    )
                )
        return 0

    return await bounded(run, options, printer)
