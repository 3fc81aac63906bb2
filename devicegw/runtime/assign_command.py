"""Assignments pushed over MQTT by the site's IWRS/EDC (issue 11): ``cmd/assign``.

Who sent a command is something MQTT does not tell a subscriber, so the topic
carries it and the broker vouches for it: a client publishes to
``{prefix}/{site}/{gateway}/cmd/assign/{username}``, and the broker's ACL
(``pattern write .../cmd/assign/%u``) lets each authenticated account write only
the level that is its own username. The gateway applies a command only when that
level is on ``[broker] assign_users``; anything else is refused and audited.

Payload: one JSON object, the fields of ``devicegw assign``::

    {"bed": "B01", "subject_id": "CVD-042-0021", "kit_number": "K-0101",
     "operator": "iwrs", "reason": "randomised", "end": false, "override_reason": null}

The answer (MQTT 5 only: the request's response topic and correlation data) is
``{"applied": bool, "message": str}``. It is sent only to the requester's own
``.../cmd/assign-response/{username}`` (a response topic anywhere else is not
answered), so a command cannot make the gateway publish on a topic of the
requester's choosing.
"""

from __future__ import annotations

import json
import logging

from paho.mqtt.properties import Properties

from devicegw.contract.payloads import AssignAnswer
from devicegw.contract.topics import Topics
from devicegw.mqtt.publisher import encode
from devicegw.runtime.assignment_commands import AssignmentDesk, AssignResult, request_from
from devicegw.safe_text import printable

__all__ = ["AssignCommand"]

log = logging.getLogger(__name__)

MAX_PAYLOAD = 16 * 1024


class AssignCommand:
    """The ``cmd/assign`` handler the publisher calls for each command message."""

    def __init__(self, topics: Topics, desk: AssignmentDesk, allowed: list[str]) -> None:
        self.topics = topics
        self.desk = desk
        self.allowed = frozenset(allowed)
        self.commands = 0
        self.refused = 0

    @property
    def topic_filter(self) -> str:
        return self.topics.assign_commands()

    def __call__(
        self, topic: str, payload: bytes, properties: Properties | None
    ) -> tuple[str, bytes, bytes | None] | None:
        self.commands += 1
        username = topic.rsplit("/", 1)[-1]
        result = self._apply(username, payload)
        if not result.applied:
            self.refused += 1
        log.info(
            "assign command from %s: %s",
            printable(username, limit=64),
            "applied" if result.applied else f"refused: {result.message}",
        )
        response_topic = getattr(properties, "ResponseTopic", None) if properties else None
        if response_topic != self.topics.assign_response(username):
            return None  # no answer asked for, or asked for elsewhere: not answered
        correlation = getattr(properties, "CorrelationData", None)
        body = encode(AssignAnswer(applied=result.applied, message=result.message))
        return response_topic, body, correlation if isinstance(correlation, bytes) else None

    def _apply(self, username: str, payload: bytes) -> AssignResult:
        channel = f"mqtt ({printable(username, limit=64)})"
        if username not in self.allowed:
            # Audited like any refusal, so an account probing the gateway is on record.
            return self._refuse(channel, f"account {printable(username, limit=64)} may not assign")
        if len(payload) > MAX_PAYLOAD:
            return self._refuse(channel, "the command is larger than 16 KiB")
        try:
            data = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return self._refuse(channel, "not a JSON command")
        if not isinstance(data, dict):
            return self._refuse(channel, "the command is not a JSON object")
        parsed = request_from(data, channel)
        if isinstance(parsed, str):
            return self._refuse(channel, parsed)
        return self.desk.apply(parsed)

    def _refuse(self, channel: str, why: str) -> AssignResult:
        return self.desk.refuse(channel, why)
