"""
Agent run tracing: the seed's ``RunMeta``, ``RecordRunTurnsOutcome`` and
constants, the turn bounding rules and ``StoredRun`` (a run as the store
holds it, for the retention policy).

A run is one ``runs.start`` / ``runs.complete`` bracket around an agent
loop, keyed by a durable ``run_id``.  Its records are ``started``, one
``turn`` per recorded turn (index stamped by the daemon) and ``ended``.
"""

from __future__ import annotations

import datetime
import re
from typing import TYPE_CHECKING

import attrs
import orjson
from twisted.internet.interfaces import IDelayedCall

from car_twisted.json_value import JsonValue

if TYPE_CHECKING:
    from car_twisted.session import ClientSession

__all__ = [
    "RECORD_TURNS_RUN_CEILING",
    "RUN_COMPLETE_GRACE",
    "MAX_TURNS_PER_BATCH",
    "MAX_TURN_BYTES",
    "MAX_TURN_STRING",
    "RunMeta",
    "RunRecord",
    "StoredRun",
    "Appended",
    "RunNotFound",
    "RunTerminal",
    "RunCeiling",
    "TurnTooLarge",
    "RecordRunTurnsOutcome",
    "bound_turn",
    "epoch_seconds",
    "valid_key",
]

# A runaway-loop backstop far above any healthy run, enforced where the
# append is reserved: a batch that would pass it is refused whole.
RECORD_TURNS_RUN_CEILING = 2000
# Seconds after a disconnect before a still-open run is marked incomplete:
# long enough for an in-flight runs.complete to land, short enough that an
# abandoned run shows promptly.
RUN_COMPLETE_GRACE = 2.0
MAX_TURNS_PER_BATCH = 256
MAX_TURN_BYTES = 256 * 1024
MAX_TURN_STRING = 16 * 1024
# Room for the daemon's own fields (index, record tag) within the cap.
_TURN_RESERVE = 256
_TRUNCATED = "…[truncated]"
_REPLACED = "…[truncated: turn exceeded 256 KiB]"
_KEY = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

#: One record of a run's log (``started``, ``turn``, ``ended``), or its summary.
RunRecord = dict[str, JsonValue]


def valid_key(value: object) -> bool:
    """Run ids and agent ids name files: a safe alphabet, never . or .."""
    return type(value) is str and bool(_KEY.match(value)) and value not in (".", "..")


@attrs.define(eq=False)
class RunMeta:
    """
    The daemon's record of one run.  ``turn_count`` counts turns reserved
    (checked against the ceiling and stamped) on the reactor thread, so it
    may run ahead of what the store has written by the batches in flight.
    """

    run_id: str
    agent_id: str
    intent: str
    started_at: str
    agent_name: str | None = None
    outcome_description: str | None = None
    status: str = "in_progress"
    turn_count: int = 0
    ended_at: str | None = None
    owner: ClientSession | None = attrs.field(default=None, repr=False)
    grace_timer: IDelayedCall | None = attrs.field(default=None, repr=False)
    # True while the run holds a pin on ``owner`` (from runs.start until
    # it is terminal or the owner's connection closes).
    pinned: bool = attrs.field(default=False, repr=False)

    @property
    def terminal(self) -> bool:
        return self.status != "in_progress"

    def started_record(self) -> RunRecord:
        record: RunRecord = {
            "record": "started",
            "run_id": self.run_id,
            "agent_id": self.agent_id,
            "intent": self.intent,
            "started_at": self.started_at,
        }
        if self.agent_name is not None:
            record["agent_name"] = self.agent_name
        if self.outcome_description is not None:
            record["outcome_description"] = self.outcome_description
        return record

    def summary(self) -> RunRecord:
        out: RunRecord = {
            "run_id": self.run_id,
            "agent_id": self.agent_id,
            "intent": self.intent,
            "started_at": self.started_at,
            "status": self.status,
            "turn_count": self.turn_count,
        }
        if self.ended_at is not None:
            out["ended_at"] = self.ended_at
        return out


@attrs.frozen
class StoredRun:
    """
    One run as the store holds it: what the retention policy weighs.

    @ivar bytes: everything the run takes in the store (its log and its
        summary).
    @ivar started: seconds since the epoch: the run's ``started_at``, else
        the time its log was last written.
    @ivar ended: its summary says it is no longer ``in_progress``.
    """

    agent_id: str
    run_id: str
    bytes: int
    started: float
    ended: bool


def epoch_seconds(stamp: object) -> float | None:
    """An RFC 3339 timestamp (``started_at``) as epoch seconds, or None."""
    if type(stamp) is not str:
        return None
    try:
        when = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


@attrs.frozen
class Appended:
    base_index: int
    count: int


@attrs.frozen
class RunNotFound:
    dropped = "run_not_found"


@attrs.frozen
class RunTerminal:
    dropped = "run_terminal"


@attrs.frozen
class RunCeiling:
    dropped = "run_turn_limit"


@attrs.frozen
class TurnTooLarge:
    dropped = "turn_too_large"


RecordRunTurnsOutcome = Appended | RunNotFound | RunTerminal | RunCeiling | TurnTooLarge


def _truncate(value: JsonValue) -> JsonValue:
    if type(value) is str:
        return value if len(value) <= MAX_TURN_STRING else value[:MAX_TURN_STRING] + _TRUNCATED
    if type(value) is list:
        return [_truncate(v) for v in value]
    if type(value) is dict:
        return {k: _truncate(v) for k, v in value.items()}
    return value


def bound_turn(turn: RunRecord) -> RunRecord | None:
    """
    The turn as it will be stored: long strings truncated, then the
    free-form fields replaced if the whole still passes the byte cap.
    @return: None when even that does not fit (``turn_too_large``).
    """
    out = {k: v for k, v in turn.items() if k not in ("index", "record")}
    for field in ("prompt", "output", "parameters"):
        if field in out:
            out[field] = _truncate(out[field])
    out.setdefault("verifier_verdict", "not_run")
    if len(orjson.dumps(out)) <= MAX_TURN_BYTES - _TURN_RESERVE:
        return out
    for field in ("parameters", "output", "prompt"):
        if field in out:
            out[field] = _REPLACED
    if len(orjson.dumps(out)) <= MAX_TURN_BYTES - _TURN_RESERVE:
        return out
    return None
