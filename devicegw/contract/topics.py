"""The versioned MQTT topic layout (documented in docs/mqtt.md).

``{prefix}/{site}/{gateway}/dose/{device}``       dose-completion events, QoS 1
``{prefix}/{site}/{gateway}/status``              gateway status, retained, last will
``{prefix}/{site}/{gateway}/device/{device}/status``  device status, retained, QoS 1
``{prefix}/{site}/{gateway}/telemetry/{device}``  live telemetry, QoS 0
``{prefix}/{site}/{gateway}/safety/{device}``     SpO2 safety alerts and post-dose summaries, QoS 1
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Topics:
    prefix: str
    site: str
    gateway: str

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.site}/{self.gateway}"

    def dose(self, device_id: str) -> str:
        return f"{self.base}/dose/{device_id}"

    def gateway_status(self) -> str:
        return f"{self.base}/status"

    def device_status(self, device_id: str) -> str:
        return f"{self.base}/device/{device_id}/status"

    def safety(self, device_id: str) -> str:
        """Safety alerts and post-dose safety summaries of the nebulizer's subject."""
        return f"{self.base}/safety/{device_id}"

    def telemetry(self, device_id: str) -> str:
        return f"{self.base}/telemetry/{device_id}"

    def all_dose_events(self) -> str:
        """Subscription for every dose event of every gateway under the prefix."""
        return f"{self.prefix}/+/+/dose/+"
