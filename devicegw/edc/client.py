"""The reference EDC client (``devicegw tail --dose-events``): what an EDC integration copies.

Subscribe to the dose events with QoS 1 on a persistent session, keep the first
copy of each ``event_id`` in an append-only file (:mod:`devicegw.edc.ack_store`),
write and fsync it *before* acknowledging the message to the broker. See
"Reference EDC client" in docs/contract.md. The message checks are the ones
``devicegw tail`` uses (:mod:`devicegw.edc.tail`).
"""

from __future__ import annotations

from collections.abc import Callable

import aiomqtt
import paho.mqtt.client as paho

from devicegw.edc.ack_store import AckStore, StoreOutcome
from devicegw.edc.tail import (
    DEFAULT_PREFIX,
    Printer,
    TailOptions,
    TailProcessor,
    bounded,
    messages_until_count,
    mqtt_client,
    payload_bytes,
)
from devicegw.errors import GatewayError
from devicegw.mqtt.publisher import no_delay

DOSE_TOPICS = f"{DEFAULT_PREFIX}/+/+/dose/+"
EXIT_CONFLICT = 3


def _manual_acks(client: aiomqtt.Client) -> paho.Client:
    """Switch off paho's automatic PUBACK, so we acknowledge only what is on disk.

    aiomqtt (2.x) has no option for it, but keeps the paho client it wraps in
    ``_client``; paho's ``manual_ack_set`` / ``ack(mid, qos)`` are public.
    Must be called before connecting: a persistent session's queued messages
    arrive right after CONNACK.
    """
    inner = getattr(client, "_client", None)
    if not isinstance(inner, paho.Client):
        raise GatewayError("this aiomqtt version hides its paho client: cannot ack manually")
    inner.manual_ack_set(True)
    return inner


async def run_edc_client(
    options: TailOptions,
    printer: Printer,
    *,
    store: AckStore,
    on_subscribed: Callable[[], None] | None = None,
) -> int:
    """The reference EDC client: keep the first of each event_id, durably, then ack.

    Run it under a supervisor that restarts it (systemd ``Restart=always``):
    it does not reconnect by itself, and needs not: on a persistent session
    the broker keeps every dose event that was not acknowledged and sends it
    again on the next connect.
    """
    # Dose topics only: seq counts every message a gateway publishes, so the
    # gaps between dose events are expected. Unknown fields are tolerated
    # (docs/contract.md: consumers ignore fields they do not know).
    processor = TailProcessor(check_sequence=False, unknown_fields="warn")
    conflicts = 0
    printer.info(f"{len(store)} dose events already in {store.path}")

    async def run() -> int:
        nonlocal conflicts
        client = mqtt_client(options, identifier=options.client_id, clean_session=False)
        acks = _manual_acks(client)
        async with client:
            no_delay(client)  # each PUBACK out at once: the broker's in-flight window moves on
            await client.subscribe(DOSE_TOPICS, qos=1)
            printer.info(f"subscribed to {DOSE_TOPICS} as {options.client_id}")
            if on_subscribed:
                on_subscribed()
            async for message in messages_until_count(client, options):
                raw = payload_bytes(message)
                result = processor.process(str(message.topic), raw, message.retain, message.qos)
                # 1. Write it down (fsync inside) ...
                if result.valid:
                    outcome = store.add(raw, topic=result.topic)
                else:
                    outcome = store.reject(raw, topic=result.topic, reason="; ".join(result.errors))
                # 2. ... and only then tell the broker we have it.
                acks.ack(message.mid, message.qos)
                printer.emit(result, outcome)
                if outcome is StoreOutcome.CONFLICT:
                    conflicts += 1
                    printer.alarm(
                        f"CONFLICT: event_id {result.payload.get('event_id')} arrived with "
                        f"different content; first copy kept, this one in {store.rejects_path}"
                    )
        return EXIT_CONFLICT if conflicts else 0

    return await bounded(run, options, printer)
