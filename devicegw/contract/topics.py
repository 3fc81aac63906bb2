"""The versioned MQTT topic layout (documented in docs/mqtt.md).

``{prefix}/{site}/{gateway}/dose/{device}``       dose-completion events, QoS 1
``{prefix}/{site}/{gateway}/status``              gateway status, retained, last will
``{prefix}/{site}/{gateway}/device/{device}/status``  device status, retained, QoS 1
``{prefix}/{site}/{gateway}/telemetry/{device}``  live telemetry, QoS 0
``{prefix}/{site}/{gateway}/safety/{device}``     SpO2 safety alerts and post-dose summaries, QoS 1
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# One topic level: what the configuration allows for ids (devicegw.config.TopicSegment),
# or an AsyncAPI channel parameter such as "{device}" (docs/asyncapi.yaml). Checked again
# here, so nothing else (a device's serial, a file's content) can ever become a level,
# a wildcard or an extra "/".
_LEVEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}|\{[a-z_]{1,32}\}")


def level(value: str) -> str:
    """``value`` if it is a safe topic level; ValueError otherwise."""
    if not _LEVEL.fullmatch(value):
        raise ValueError(f"not a topic level: {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Topics:
    prefix: str
    site: str
    gateway: str

    def __post_init__(self) -> None:
        for part in self.prefix.split("/"):
            if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", part):
                raise ValueError(f"not a topic prefix: {self.prefix!r}")
        level(self.site)
        level(self.gateway)

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.site}/{self.gateway}"

    def dose(self, device_id: str) -> str:
        return f"{self.base}/dose/{level(device_id)}"

    def gateway_status(self) -> str:
        return f"{self.base}/status"

    def device_status(self, device_id: str) -> str:
        return f"{self.base}/device/{level(device_id)}/status"

    def safety(self, device_id: str) -> str:
        """Safety alerts and post-dose safety summaries of the nebulizer's subject."""
        return f"{self.base}/safety/{level(device_id)}"

    def telemetry(self, device_id: str) -> str:
        return f"{self.base}/telemetry/{level(device_id)}"

    def all_dose_events(self) -> str:
        """Subscription for every dose event of every gateway under the prefix."""
        return f"{self.prefix}/+/+/dose/+"
