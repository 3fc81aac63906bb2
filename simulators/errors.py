"""The simulators' branch of the one exception tree (rooted in :mod:`drivers.errors`)."""

from __future__ import annotations

from drivers.errors import GatewayError


class ScenarioError(GatewayError):
    """A simulator scenario file is invalid."""
