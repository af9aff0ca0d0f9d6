"""
A fact of the memory graph, as the engine keeps it and ``memory.*``
answers it.

``kind`` says what a fact is (``pattern``, ``constraint``, ``knowledge``,
``procedural``, ``conversation``, ``identity``, ``environment``,
``unknown``, ...); ``constraint`` marks facts that must always reach the
model (``kind: "constraint"`` sets it).  ``uses`` / ``successes`` /
``failures`` are the outcome record behind a fact's utility posterior.
A fact ingested over the WebSocket gets the ``ws-`` provenance prefix on
its ``source``.
"""

from __future__ import annotations

import attrs
import orjson

from car_twisted.errors import RpcError
from car_twisted.json_value import JsonValue

__all__ = ["Fact", "FACT_KINDS", "FACT_OVERHEAD_BYTES", "WS_SOURCE_PREFIX", "MemoryFull"]

#: What a stored fact costs beyond its text (objects, index entries): counted
#: so a flood of empty facts is bounded in bytes too.
FACT_OVERHEAD_BYTES = 512

FACT_KINDS = (
    "pattern",
    "constraint",
    "knowledge",
    "procedural",
    "conversation",
    "identity",
    "environment",
    "unknown",
)
WS_SOURCE_PREFIX = "ws-"


class MemoryFull(RpcError):
    """A graph at its fact cap: nothing was added."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"memory graph is full: at most {limit} facts (delete or consolidate some)",
            data={"reason": "memory_full", "limit": limit},
        )


@attrs.define(eq=False)
class Fact:
    id: str
    subject: str
    body: str
    kind: str = "pattern"
    constraint: bool = False
    confidence: float = 1.0
    tags: tuple[str, ...] = ()
    source: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    uses: int = 0
    successes: int = 0
    failures: int = 0
    # valid, or superseded (kept out of retrieval; consolidate expires it).
    status: str = "valid"
    metadata: dict[str, JsonValue] = attrs.field(factory=dict)

    @property
    def valid(self) -> bool:
        return self.status == "valid"

    def size(self) -> int:
        """The bytes a byte budget counts for this fact: its text, tags and metadata, plus overhead."""
        n = len(self.subject.encode()) + len(self.body.encode()) + len(self.source.encode())
        n += len(self.id) + len(self.kind) + sum(len(tag.encode()) for tag in self.tags)
        if self.metadata:
            n += len(orjson.dumps(self.metadata))
        return n + FACT_OVERHEAD_BYTES

    def to_wire(self) -> dict[str, JsonValue]:
        """What ``memory.query`` answers for one fact."""
        return {
            "subject": self.subject,
            "body": self.body,
            "kind": self.kind,
            "confidence": self.confidence,
            "fact_id": self.id,
            "tags": list(self.tags),
            "source": self.source,
        }

    def to_record(self) -> dict[str, JsonValue]:
        """The fact in a snapshot (``memory.persist``, the scope files)."""
        return {
            "id": self.id,
            "subject": self.subject,
            "body": self.body,
            "kind": self.kind,
            "constraint": self.constraint,
            "confidence": self.confidence,
            "tags": list(self.tags),
            "source": self.source,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "uses": self.uses,
            "successes": self.successes,
            "failures": self.failures,
            "status": self.status,
            "metadata": self.metadata,
        }
