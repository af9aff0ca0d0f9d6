"""JSON values as orjson decodes them, and as replies carry them."""

from __future__ import annotations

from typing import TypeAlias

__all__ = ["JsonValue", "JsonContainer"]

#: A JSON value as orjson decodes it (and as replies may carry it).
JsonValue: TypeAlias = None | bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"]
#: A JSON container, the only values ``nested_deeper_than`` walks.
JsonContainer: TypeAlias = list[JsonValue] | dict[str, JsonValue]
