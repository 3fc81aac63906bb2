"""The versioned MQTT topic layout (documented in docs/mqtt.md and docs/blinding.md).

Blinded feed (the EDC, blinded staff):

``{prefix}/{site}/{gateway}/dose/{device}``       dose-completion events, QoS 1
``{prefix}/{site}/{gateway}/status``              gateway status, retained, last will
``{prefix}/{site}/{gateway}/device/{device}/status``  device status, retained, QoS 1
``{prefix}/{site}/{gateway}/telemetry/{device}``  live progress, QoS 0
``{prefix}/{site}/{gateway}/safety/{device}``     SpO2 safety alerts and post-dose summaries, QoS 1

Restricted feed (engineering roles only):

``{prefix}/{site}/{gateway}/dose-detail/{device}``          a dose's physical record, QoS 1
``{prefix}/{site}/{gateway}/device-detail/{device}/status`` reservoir and alarms, retained
``{prefix}/{site}/{gateway}/telemetry-detail/{device}``     live rate and reservoir, QoS 0
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from devicegw.contract.vocabulary import Feed, PayloadKind, TopicKind

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
        return f"{self.base}/{TopicKind.DOSE}/{level(device_id)}"

    def dose_correction(self, device_id: str) -> str:
        return f"{self.base}/{TopicKind.DOSE_CORRECTION}/{level(device_id)}"

    def dose_missed(self, device_id: str) -> str:
        return f"{self.base}/{TopicKind.DOSE_MISSED}/{level(device_id)}"

    def gateway_status(self) -> str:
        return f"{self.base}/status"

    def device_status(self, device_id: str) -> str:
        return f"{self.base}/device/{level(device_id)}/status"

    def safety(self, device_id: str) -> str:
        """Safety alerts and post-dose safety summaries of the nebulizer's subject."""
        return f"{self.base}/{TopicKind.SAFETY}/{level(device_id)}"

    def telemetry(self, device_id: str) -> str:
        return f"{self.base}/{TopicKind.TELEMETRY}/{level(device_id)}"

    # -- restricted ------------------------------------------------------------------

    def dose_detail(self, device_id: str) -> str:
        return f"{self.base}/{TopicKind.DOSE_DETAIL}/{level(device_id)}"

    def device_detail(self, device_id: str) -> str:
        return f"{self.base}/{TopicKind.DEVICE_DETAIL}/{level(device_id)}/status"

    def assign_commands(self) -> str:
        """What the gateway subscribes to: ``cmd/assign/{username}`` (docs/assignments.md)."""
        return f"{self.base}/cmd/assign/+"

    def assign_command(self, username: str) -> str:
        """Where the account ``username`` publishes its assign commands."""
        return f"{self.base}/cmd/assign/{level(username)}"

    def assign_response(self, username: str) -> str:
        """The only topic an assign command's answer goes to: the requester's own."""
        return f"{self.base}/cmd/assign-response/{level(username)}"

    def telemetry_detail(self, device_id: str) -> str:
        return f"{self.base}/{TopicKind.TELEMETRY_DETAIL}/{level(device_id)}"

    def all_dose_events(self) -> str:
        """Subscription for every dose event of every gateway under the prefix."""
        return f"{self.prefix}/+/+/{TopicKind.DOSE}/+"


def feed_subscriptions(prefix: str) -> dict[Feed, list[str]]:
    """Every topic filter of each feed under ``prefix`` (what an ACL grants, docs/blinding.md)."""
    any_gw = f"{prefix}/+/+"
    return {
        Feed.BLINDED: [
            f"{any_gw}/{TopicKind.DOSE}/+",
            f"{any_gw}/{TopicKind.DOSE_CORRECTION}/+",
            f"{any_gw}/{TopicKind.DOSE_MISSED}/+",
            f"{any_gw}/status",
            f"{any_gw}/device/+/status",
            f"{any_gw}/{TopicKind.TELEMETRY}/+",
            f"{any_gw}/{TopicKind.SAFETY}/+",
        ],
        Feed.RESTRICTED: [
            f"{any_gw}/{TopicKind.DOSE_DETAIL}/+",
            f"{any_gw}/{TopicKind.DEVICE_DETAIL}/+/status",
            f"{any_gw}/{TopicKind.TELEMETRY_DETAIL}/+",
        ],
    }


def topic_payloads(topic: str) -> frozenset[PayloadKind] | None:
    """The payloads a topic of this layout may carry (by its last levels), or None."""
    parts = topic.split("/")
    if len(parts) >= 3 and parts[-1] == "status":
        if parts[-3] == "device":
            return frozenset({PayloadKind.DEVICE_STATUS})
        if parts[-3] == TopicKind.DEVICE_DETAIL:
            return frozenset({PayloadKind.DEVICE_DETAIL})
    if len(parts) >= 2:
        by_level: dict[str, set[PayloadKind]] = {
            TopicKind.DOSE: {PayloadKind.DOSE_COMPLETION},
            TopicKind.DOSE_CORRECTION: {PayloadKind.DOSE_CORRECTION},
            TopicKind.DOSE_MISSED: {PayloadKind.DOSE_MISSED},
            "assign": {PayloadKind.ASSIGN_COMMAND},
            "assign-response": {PayloadKind.ASSIGN_ANSWER},
            TopicKind.TELEMETRY: {PayloadKind.TELEMETRY},
            TopicKind.SAFETY: {PayloadKind.SAFETY_ALERT, PayloadKind.POST_DOSE_SAFETY_SUMMARY},
            TopicKind.DOSE_DETAIL: {PayloadKind.DOSE_DETAIL},
            TopicKind.TELEMETRY_DETAIL: {PayloadKind.TELEMETRY_DETAIL},
        }
        kinds = by_level.get(parts[-2])
        if kinds is not None:
            return frozenset(kinds)
    if parts[-1] == "status":
        return frozenset({PayloadKind.GATEWAY_STATUS})
    return None
