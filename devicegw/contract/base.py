"""What every published payload shares: strict models and the delivery metadata."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

#: The contract's version (docs/contract.md); its major part is the topics' ``v2``.
SCHEMA_VERSION: Literal["2.0"] = "2.0"
#: The topic version segment that goes with it (the default prefix ends in it).
TOPIC_VERSION = "v2"


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
