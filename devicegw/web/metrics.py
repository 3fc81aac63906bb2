"""Prometheus metrics of one gateway (``/metrics``), with prometheus_client.

A private registry per gateway (several gateways in one test process do not
mix): a custom collector reads the gateway's typed snapshot at scrape time,
so nothing on the device path counts for Prometheus; only the publish latency
is observed as it happens (a histogram fed by the publisher). Process metrics
(CPU, memory, descriptors) come from prometheus_client's process collector.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from devicegw.runtime.gateway import Gateway

__all__ = ["GatewayMetrics"]

#: PUBLISH -> PUBACK seconds (a dose event is sent only after its fsync'ed commit).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Snapshot(Collector):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        gw = self.gateway
        snap = gw.snapshot()
        broker = snap.broker

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        yield gauge(
            "devicegw_broker_connected", "1 if connected to the broker", broker["connected"]
        )
        yield counter(
            "devicegw_broker_connects", "successful broker connections", broker["connects"]
        )
        yield counter(
            "devicegw_dose_events_published",
            "dose events acknowledged by the broker (PUBACK)",
            broker["dose_events_published"],
        )
        yield counter(
            "devicegw_telemetry_dropped", "telemetry messages dropped", broker["telemetry_dropped"]
        )
        yield gauge("devicegw_outbox_depth", "records waiting for the broker", snap.outbox_depth)
        oldest = gw.publisher.outbox.oldest_unsent_utc()
        age = 0.0 if oldest is None else (gw.clock.now() - oldest.astimezone(UTC)).total_seconds()
        yield gauge(
            "devicegw_outbox_oldest_unsent_age_seconds",
            "age of the oldest record waiting for the broker (0: none)",
            max(0.0, age),
        )
        yield gauge("devicegw_store_bytes", "size of the gateway store", snap.store_bytes)
        yield gauge(
            "devicegw_store_held_writes",
            "writes held in memory (full disk)",
            snap.store.held_writes,
        )

        labels = ["device"]
        up = GaugeMetricFamily(
            "devicegw_device_link_up", "1 if the device link is up", labels=labels
        )
        frames = CounterMetricFamily(
            "devicegw_device_frames_received", "good frames received", labels=labels
        )
        bad = CounterMetricFamily(
            "devicegw_device_bad_frames", "bad frames received", labels=labels
        )
        lost = CounterMetricFamily(
            "devicegw_device_frames_lost", "frames lost (device sequence gaps)", labels=labels
        )
        reconnects = CounterMetricFamily(
            "devicegw_device_connects", "link connections (reconnects + 1)", labels=labels
        )
        for device_id, d in sorted(snap.devices.items()):
            up.add_metric([device_id], 1.0 if d.connected else 0.0)
            frames.add_metric([device_id], d.frames_ok)
            bad.add_metric([device_id], d.frames_bad)
            lost.add_metric([device_id], d.frames_lost)
            reconnects.add_metric([device_id], d.connects)
        for ox_id, o in sorted(snap.oximeters.items()):
            up.add_metric([ox_id], 1.0 if o.connected else 0.0)
        yield from (up, frames, bad, lost, reconnects)

        started = CounterMetricFamily(
            "devicegw_sessions_started", "nebulization sessions started", labels=labels
        )
        finished = CounterMetricFamily(
            "devicegw_sessions_finished",
            "sessions finished, by verdict",
            labels=["device", "verdict"],
        )
        for runner in gw.runners:
            h = runner.health
            started.add_metric([runner.device.id], h.sessions_started)
            for verdict, n in sorted(h.verdicts.items()):
                finished.add_metric([runner.device.id, verdict], n)
        yield started
        yield finished

        alerts = CounterMetricFamily(
            "devicegw_spo2_alerts_raised", "SpO2 safety alerts raised", labels=["bed"]
        )
        for bed, monitor in sorted(gw.beds.items()):
            alerts.add_metric([bed], monitor.alerts_raised)
        yield alerts

        restarts = CounterMetricFamily(
            "devicegw_task_restarts", "supervised tasks restarted after a bug", labels=["task"]
        )
        for task, n in sorted(snap.task_restarts.items()):
            restarts.add_metric([task], n)
        yield restarts


class GatewayMetrics:
    """The registry ``/metrics`` serves, and the publish-latency histogram it holds."""

    def __init__(self, gateway: Gateway) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_Snapshot(gateway))
        ProcessCollector(registry=self.registry)
        self.publish_latency = Histogram(
            "devicegw_publish_latency_seconds",
            "seconds from PUBLISH to PUBACK, by record kind",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        gateway.publisher.latency_observers.append(self._observe)
        self.loop_lag = Histogram(
            "devicegw_event_loop_lag_seconds",
            "how late the event loop woke, sampled every 50 ms (every device waits meanwhile)",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        gateway.loop_lag.observers.append(self.loop_lag.observe)

    def _observe(self, kind: str, seconds: float) -> None:
        self.publish_latency.labels(kind).observe(seconds)
