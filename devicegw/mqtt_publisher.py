"""Publishes the gateway's payloads to the broker, reconnecting by itself.

aiomqtt does not reconnect, so this owns the loop: a fresh client per
connection, capped jittered backoff, the gateway's last will set on every
connect. Dose events are kept until the broker's PUBACK and re-sent after a
reconnect (byte-identical; subscribers keep the first of each ``event_id``).
Device statuses are latest-wins and re-published on reconnect. Telemetry is
best effort: a bounded buffer that drops the oldest and counts the drops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Literal

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel

from devicegw.backoff import Backoff
from devicegw.clock import Clock
from devicegw.config import BrokerSettings
from devicegw.errors import ConfigError

log = logging.getLogger(__name__)

_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def encode(payload: BaseModel) -> bytes:
    """The one JSON encoding of every payload (stable key order, UTC ISO times)."""
    return payload.model_dump_json().encode("utf-8")


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    payload: bytes
    qos: Literal[0, 1]
    retain: bool = False


@dataclass(slots=True)
class PublisherStats:
    connected: bool = False
    connects: int = 0
    connect_failures: int = 0
    dose_events_published: int = 0
    statuses_published: int = 0
    telemetry_published: int = 0
    telemetry_dropped: int = 0
    protocol: str = ""
    last_error: str | None = None
    pending_dose_events: int = 0


def build_tls_context(settings: BrokerSettings) -> ssl.SSLContext | None:
    tls = settings.tls
    if not tls.enabled:
        return None
    try:
        ctx = ssl.create_default_context(
            cafile=str(tls.ca_file) if tls.ca_file else None,
        )
        if tls.cert_file and tls.key_file:
            ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"broker.tls: cannot load certificates: {exc}", field="broker.tls"
        ) from exc
    if tls.insecure_skip_verify:
        if settings.host not in _LOOPBACK:
            raise ConfigError(
                "broker.tls.insecure_skip_verify is only allowed for a loopback broker",
                field="broker.tls.insecure_skip_verify",
            )
        log.warning("TLS certificate verification is OFF for loopback broker %s", settings.host)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


@dataclass(slots=True)
class _Queues:
    dose: deque[Outgoing] = field(default_factory=deque)
    status: OrderedDict[str, Outgoing] = field(default_factory=OrderedDict)
    telemetry: deque[Outgoing] = field(default_factory=deque)


class MqttPublisher:
    """Owns the broker connection; producers call the ``publish_*`` methods and never block."""

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        client_id: str,
        clock: Clock,
        will: Outgoing,
        birth: Outgoing,
        protocol: Literal["auto", "5", "3.1.1"] = "auto",
        telemetry_buffer: int = 256,
    ) -> None:
        self._settings = settings
        self._client_id = client_id
        self._clock = clock
        self._will = will
        self._birth = birth
        self._protocol_pref = protocol
        self._use_v5 = protocol != "3.1.1"
        self._q = _Queues()
        self._retained: dict[str, Outgoing] = {}
        self._telemetry_max = telemetry_buffer
        self._wake = asyncio.Event()
        self._connected = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self.stats = PublisherStats()
        self._tls = build_tls_context(settings)
        self._password = settings.password()

    # -- producer side ---------------------------------------------------------

    def publish_dose(self, topic: str, payload: BaseModel) -> None:
        """Queue a dose event; kept until the broker acknowledges it (QoS 1)."""
        self._q.dose.append(Outgoing(topic, encode(payload), qos=1))
        self.stats.pending_dose_events = len(self._q.dose)
        self._wake.set()

    def publish_status(self, topic: str, payload: BaseModel) -> None:
        """Retained status; only the latest per topic is kept and re-sent after reconnect."""
        self._q.status[topic] = Outgoing(topic, encode(payload), qos=1, retain=True)
        self._retained[topic] = self._q.status[topic]
        self._wake.set()

    def publish_telemetry(self, topic: str, payload: BaseModel) -> None:
        if len(self._q.telemetry) >= self._telemetry_max:
            self._q.telemetry.popleft()
            self.stats.telemetry_dropped += 1
        self._q.telemetry.append(Outgoing(topic, encode(payload), qos=0))
        self._wake.set()

    def set_birth(self, birth: Outgoing) -> None:
        self._birth = birth

    @property
    def connected(self) -> asyncio.Event:
        return self._connected

    @property
    def pending_dose_events(self) -> int:
        return len(self._q.dose)

    def is_drained(self) -> bool:
        """True when every queued dose event and status has been acknowledged."""
        return not (self._q.dose or self._q.status)

    # -- connection loop -------------------------------------------------------

    def _make_client(self) -> aiomqtt.Client:
        s = self._settings
        return aiomqtt.Client(
            hostname=s.host,
            port=s.port,
            username=s.username,
            password=self._password.get_secret_value() if self._password else None,
            identifier=self._client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if self._use_v5 else aiomqtt.ProtocolVersion.V311,
            will=aiomqtt.Will(self._will.topic, self._will.payload, qos=1, retain=True),
            keepalive=s.keepalive_s,
            tls_context=self._tls,
            timeout=10,
            max_queued_outgoing_messages=1000,
        )

    async def run(self) -> None:
        """Run until cancelled; on cancellation publish the offline status if connected."""
        backoff = Backoff(self._settings.reconnect_initial_s, self._settings.reconnect_max_s)
        first_failure = True
        while True:
            client = self._make_client()
            try:
                async with client:
                    self._client = client
                    self.stats.connected = True
                    self.stats.connects += 1
                    self.stats.protocol = "5" if self._use_v5 else "3.1.1"
                    self.stats.last_error = None
                    self._connected.set()
                    backoff.reset()
                    first_failure = True
                    log.info(
                        "connected to broker",
                        extra={
                            "broker": f"{self._settings.host}:{self._settings.port}",
                            "mqtt_protocol": self.stats.protocol,
                        },
                    )
                    try:
                        await self._send_loop(client)
                    except asyncio.CancelledError:
                        await self._say_goodbye(client)
                        raise
            except aiomqtt.MqttError as exc:
                # Disconnecting while being cancelled: the stop wins over a retry.
                _raise_if_cancelling()
                self.stats.last_error = str(exc)
                self.stats.connect_failures += 1
                if (
                    self._protocol_pref == "auto"
                    and self._use_v5
                    and not self.stats.connected
                    and _looks_like_protocol_refusal(exc)
                ):
                    log.warning("broker refused MQTT 5; falling back to 3.1.1")
                    self._use_v5 = False
                    continue
                level = logging.WARNING if first_failure else logging.DEBUG
                log.log(
                    level,
                    "broker connection failed: %s",
                    exc,
                    extra={"broker": f"{self._settings.host}:{self._settings.port}"},
                )
                first_failure = False
            finally:
                self._client = None
                self.stats.connected = False
                self._connected.clear()
            await self._clock.sleep(backoff.next_delay())

    async def _say_goodbye(self, client: aiomqtt.Client) -> None:
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            await asyncio.wait_for(
                client.publish(self._will.topic, self._will.payload, qos=1, retain=True), 2.0
            )

    async def _send_loop(self, client: aiomqtt.Client) -> None:
        await client.publish(self._birth.topic, self._birth.payload, qos=1, retain=True)
        # A fresh connection re-announces every device's latest status.
        for topic, out in self._retained.items():
            self._q.status.setdefault(topic, out)
        while True:
            self._wake.clear()
            while self._q.dose:
                out = self._q.dose[0]
                await client.publish(out.topic, out.payload, qos=1, timeout=30)
                self._q.dose.popleft()
                self.stats.dose_events_published += 1
                self.stats.pending_dose_events = len(self._q.dose)
            while self._q.status:
                topic, out = next(iter(self._q.status.items()))
                await client.publish(out.topic, out.payload, qos=1, retain=True, timeout=30)
                if self._q.status.get(topic) is out:
                    del self._q.status[topic]
                self.stats.statuses_published += 1
            while self._q.telemetry and not self._q.dose:
                out = self._q.telemetry.popleft()
                props = None
                if self._use_v5:
                    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                    props.MessageExpiryInterval = 60
                await client.publish(out.topic, out.payload, qos=0, properties=props)
                self.stats.telemetry_published += 1
            _raise_if_cancelling()
            if not (self._q.dose or self._q.status or self._q.telemetry):
                await self._wake.wait()


def _raise_if_cancelling() -> None:
    """Python 3.11's ``asyncio.wait_for`` (used inside aiomqtt) can swallow a
    cancellation that arrives as its future completes; re-raise it here."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _looks_like_protocol_refusal(exc: aiomqtt.MqttError) -> bool:
    if isinstance(exc, aiomqtt.MqttCodeError):
        rc = exc.rc
        value = getattr(rc, "value", rc)
        # 3.1.1 CONNACK 1 = unacceptable protocol version; v5 reason 132 = unsupported version.
        return value in (1, 132)
    return "protocol" in str(exc).lower()
