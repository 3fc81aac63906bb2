"""The ICD's golden frames (tests/data/vm1/icd_vectors.toml) as bytes and typed messages."""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from enum import IntEnum
from pathlib import Path
from typing import Any

import drivers.vm1.messages as m

VECTORS_FILE = Path(__file__).parent / "data" / "vm1" / "icd_vectors.toml"


def build_message(vector: dict[str, Any]) -> m.Message:
    cls = getattr(m, vector["type"])
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {name: None for name in vector.get("none_fields", [])}
    for name, value in vector["fields"].items():
        hint = hints[name]
        if isinstance(hint, type) and issubclass(hint, IntEnum) and isinstance(value, str):
            value = hint[value]
        kwargs[name] = value
    # The data file must spell out every field, so no default hides a mistake.
    assert set(kwargs) == {f.name for f in dataclasses.fields(cls)}, vector["name"]
    msg: m.Message = cls(**kwargs)
    return msg


RAW_VECTORS: list[dict[str, Any]] = tomllib.loads(VECTORS_FILE.read_text())["vector"]
