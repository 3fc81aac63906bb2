"""What every published payload shares: strict models and the delivery metadata."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

SCHEMA_VERSION: Literal["1.0"] = "1.0"


class Payload(BaseModel):
    # Fields with defaults are always sent, so the published schemas require them.
    model_config = ConfigDict(
        extra="forbid", frozen=True, json_schema_serialization_defaults_required=True
    )


class Delivery(Payload):
    """Delivery metadata, stamped when a message is sent; never part of a record's identity.

    ``seq`` counts every message this gateway publishes within one broker
    connection (``birth_seq``), so a subscriber can detect gaps; ``redelivery``
    says how many times this very record was sent before without an
    acknowledgement. Two copies of a dose event differ only here.
    """

    birth_seq: int
    seq: int
    redelivery: int = 0
