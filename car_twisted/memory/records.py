"""
Checking what ``MemoryGraph.restore`` is given, and the arguments of
``add``, before anything changes.

A snapshot is ``{"version": 1, "facts": [record, ...], "utility":
{"utility_weight", "utility_exploration"}}`` (what ``snapshot`` makes);
``{"facts": [...]}`` without a version and the bare list ``[record,
...]`` are taken too (persistence files of other builds).  A record needs
``subject`` and ``body`` (strings); every other field of
``Fact.to_record()`` is optional and checked when present.  Anything
malformed is a ``ValueError`` naming the record and the field.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import attrs

from car_twisted.json_value import JsonValue

__all__ = [
    "MAX_FACT_ID_CHARS",
    "MAX_KIND_CHARS",
    "MAX_TAGS",
    "FactSpec",
    "SNAPSHOT_VERSION",
    "check_confidence",
    "check_fact_id",
    "check_kind",
    "check_tags",
    "parse_snapshot",
    "supersedes_ids",
]

SNAPSHOT_VERSION = 1
MAX_FACT_ID_CHARS = 256
MAX_KIND_CHARS = 64
MAX_TAGS = 64
MAX_TAG_CHARS = 256
STATUSES = ("valid", "superseded")


@attrs.frozen
class FactSpec:
    """One checked snapshot record; None where the record leaves a field out."""

    subject: str
    body: str
    fact_id: str | None = None
    kind: str = "pattern"
    constraint: bool = False
    confidence: float = 1.0
    tags: tuple[str, ...] = ()
    source: str = ""
    created_at: float | None = None
    updated_at: float | None = None
    uses: int = 0
    successes: int = 0
    failures: int = 0
    status: str = "valid"
    metadata: dict[str, JsonValue] = attrs.field(factory=dict)


def check_fact_id(value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_FACT_ID_CHARS:
        raise ValueError(f"a fact id must be a non-empty string of at most {MAX_FACT_ID_CHARS} characters")
    return value


def check_kind(value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_KIND_CHARS:
        raise ValueError(f"kind must be a non-empty string of at most {MAX_KIND_CHARS} characters")
    return value


def check_confidence(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError("confidence must be a number from 0 to 1")
    return float(value)


def check_tags(value: object) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError("tags must be a list of strings")
    tags = tuple(value)
    if len(tags) > MAX_TAGS:
        raise ValueError(f"at most {MAX_TAGS} tags")
    for tag in tags:
        if not isinstance(tag, str) or len(tag) > MAX_TAG_CHARS:
            raise ValueError(f"tags must be strings of at most {MAX_TAG_CHARS} characters")
    # Repeats dropped, first occurrence kept.
    return tuple(dict.fromkeys(tags))


def supersedes_ids(metadata: Mapping[str, JsonValue]) -> list[str]:
    """The ids a fact's ``metadata["supersedes"]`` names (a string or a list of strings)."""
    named = metadata.get("supersedes")
    if isinstance(named, str):
        return [named] if named else []
    if isinstance(named, list):
        return [item for item in named if isinstance(item, str) and item]
    return []


def _string(record: Mapping[str, JsonValue], name: str, default: str | None = None) -> str:
    value = record.get(name, default)
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string")
    return value


def _time(record: Mapping[str, JsonValue], name: str) -> float | None:
    value = record.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number")
    return float(value)


def _count(record: Mapping[str, JsonValue], name: str) -> int:
    value = record.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer")
    return value


def _record(record: object) -> FactSpec:
    if not isinstance(record, dict):
        raise ValueError("a record must be an object")
    for name in ("subject", "body"):
        if name not in record:
            raise ValueError(f"{name} is missing")
    fact_id = record.get("id")
    metadata = record.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ValueError("metadata must be an object")
    constraint = record.get("constraint", False)
    if not isinstance(constraint, bool):
        raise ValueError("constraint must be true or false")
    status = record.get("status", "valid")
    if status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}")
    assert isinstance(status, str)
    kind = check_kind(record.get("kind", "pattern"))
    return FactSpec(
        subject=_string(record, "subject"),
        body=_string(record, "body"),
        fact_id=None if fact_id is None else check_fact_id(fact_id),
        kind=kind,
        constraint=constraint or kind == "constraint",
        confidence=check_confidence(record.get("confidence", 1.0)),
        tags=check_tags(record.get("tags", [])),
        source=_string(record, "source", ""),
        created_at=_time(record, "created_at"),
        updated_at=_time(record, "updated_at"),
        uses=_count(record, "uses"),
        successes=_count(record, "successes"),
        failures=_count(record, "failures"),
        status=status,
        metadata=dict(metadata),
    )


def _utility(value: object) -> tuple[float | None, float | None]:
    if not isinstance(value, dict):
        raise ValueError("snapshot utility must be an object")
    out: list[float | None] = []
    for name in ("utility_weight", "utility_exploration"):
        number = value.get(name)
        if number is not None and (isinstance(number, bool) or not isinstance(number, (int, float))):
            raise ValueError(f"snapshot utility {name} must be a number")
        out.append(None if number is None else float(number))
    return out[0], out[1]


def parse_snapshot(snapshot: object, limit: int) -> tuple[list[FactSpec], tuple[float | None, float | None] | None]:
    """
    Check C{snapshot} whole.

    @return: its records, and its utility pair (None when it has none).
    @raise ValueError: anything malformed, more than C{limit} records, or
        two records with one id.
    """
    utility = None
    if isinstance(snapshot, list):
        records: object = snapshot
    elif isinstance(snapshot, dict):
        version = snapshot.get("version", SNAPSHOT_VERSION)
        if version != SNAPSHOT_VERSION or isinstance(version, bool):
            raise ValueError(f"unsupported snapshot version {version!r} (this build reads version {SNAPSHOT_VERSION})")
        if "facts" not in snapshot:
            raise ValueError("snapshot has no facts list")
        records = snapshot["facts"]
        if "utility" in snapshot:
            utility = _utility(snapshot["utility"])
    else:
        raise ValueError("a snapshot must be an object or a list of fact records")
    if not isinstance(records, list):
        raise ValueError("snapshot facts must be a list")
    if len(records) > limit:
        raise ValueError(f"snapshot has {len(records)} facts, more than this graph's limit of {limit}")
    specs: list[FactSpec] = []
    ids: set[str] = set()
    for position, record in enumerate(records):
        try:
            spec = _record(record)
        except ValueError as e:
            raise ValueError(f"snapshot fact {position}: {e}") from None
        if spec.fact_id is not None:
            if spec.fact_id in ids:
                raise ValueError(f"snapshot fact {position}: id {spec.fact_id!r} appears twice")
            ids.add(spec.fact_id)
        specs.append(spec)
    return specs, utility
