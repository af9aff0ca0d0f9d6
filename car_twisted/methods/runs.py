"""
``runs.*``: agent run tracing.

``runs.start`` names only the connection's own agent (or an unbound
caller's ``agent_name``) and is bounded by the open-run caps and the store
quota; writes (``runs.record_turns``) are for the run's owning agent only;
reads (``runs.list``, ``runs.get_trace``, ``runs.subscribe``) for the
owning agent's connection or the host role.  See
``car_twisted.runs.registry`` and, for what the store keeps,
``car_twisted.runs.retention``.
"""

from __future__ import annotations

from collections.abc import Coroutine, Iterable
from typing import TYPE_CHECKING

import attrs
from zope.interface import implementer

from car_twisted.errors import InvalidParams
from car_twisted.interfaces import IMethodProvider
from car_twisted.json_value import JsonValue
from car_twisted.rpc.envelope import dumps
from car_twisted.rpc.registry import MethodSpec
from car_twisted.runs.registry import RunRegistry
from car_twisted.session import ClientSession

if TYPE_CHECKING:
    from car_twisted.state import ServerState

# What the registry's runs.* coroutines come to: the reply object.
Reply = Coroutine[object, object, dict[str, object]]

__all__ = ["RunMethods"]

_ID = {"max_len": 128}


@attrs.frozen
class StartParams:
    intent: str = attrs.field(metadata={"max_len": 16384})
    agent_id: str | None = attrs.field(default=None, metadata=_ID)
    agent_name: str | None = attrs.field(default=None, metadata={"max_len": 256})
    outcome_description: str | None = attrs.field(default=None, metadata={"max_len": 16384})
    idempotency_key: str | None = attrs.field(default=None, metadata=_ID)


@attrs.frozen
class CompleteParams:
    run_id: str = attrs.field(metadata=_ID)
    outcome: JsonValue = None


@attrs.frozen
class RunIdParams:
    run_id: str = attrs.field(metadata=_ID)


#: The most runs one ``runs.list`` page may ask for.
MAX_LIST_LIMIT = 1000


@attrs.frozen
class ListParams:
    agent_id: str | None = attrs.field(default=None, metadata=_ID)
    limit: int | None = None
    offset: int | None = None


@attrs.frozen
class TraceParams:
    run_id: str = attrs.field(metadata=_ID)
    cursor: int = 0


@implementer(IMethodProvider)
class RunMethods:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    @property
    def runs(self) -> RunRegistry:
        return self.state.runs

    def methods(self) -> Iterable[MethodSpec]:
        return (
            MethodSpec(
                "runs.start",
                self.start,
                params=StartParams,
                description="Open a run (within the open-run caps); answers {run_id, agent_id}.",
            ),
            MethodSpec("runs.record_turns", self.record_turns, description="Append turns to your own run."),
            MethodSpec("runs.complete", self.complete, params=CompleteParams, description="Record the run's outcome."),
            MethodSpec("runs.subscribe", self.subscribe, params=RunIdParams, description="Snapshot plus live runs.trace.event."),
            MethodSpec("runs.unsubscribe", self.unsubscribe, params=RunIdParams, description="Stop a run subscription."),
            MethodSpec(
                "runs.list",
                self.list,
                params=ListParams,
                description="An agent's runs (every agent's for the host role), newest first; limit/offset page them.",
            ),
            MethodSpec("runs.get_trace", self.get_trace, params=TraceParams, description="A run's stored records, paged."),
        )

    def start(self, session: ClientSession, p: StartParams) -> Reply:
        return self.runs.start(session, p)

    def record_turns(self, session: ClientSession, params: JsonValue) -> Reply:
        raw = params if type(params) is dict else {}
        return self.runs.record(session, raw.get("run_id"), raw.get("turns"))

    def complete(self, session: ClientSession, p: CompleteParams) -> Reply:
        if p.outcome is not None and len(dumps(p.outcome)) > 64 * 1024:
            raise InvalidParams("outcome", "at most 64 KiB")
        return self.runs.complete(session, p.run_id, p.outcome)

    def subscribe(self, session: ClientSession, p: RunIdParams) -> Reply:
        return self.runs.subscribe(session, p.run_id)

    def unsubscribe(self, session: ClientSession, p: RunIdParams) -> dict[str, object]:
        return self.runs.unsubscribe(session, p.run_id)

    def list(self, session: ClientSession, p: ListParams) -> Reply:
        if p.limit is not None and not 1 <= p.limit <= MAX_LIST_LIMIT:
            raise InvalidParams("limit", f"expected 1 to {MAX_LIST_LIMIT} runs")
        if p.offset is not None and p.offset < 0:
            raise InvalidParams("offset", "expected a non-negative index")
        return self.runs.list(session, p.agent_id, p.limit, p.offset)

    def get_trace(self, session: ClientSession, p: TraceParams) -> Reply:
        if p.cursor < 0:
            raise InvalidParams("cursor", "expected a non-negative index")
        return self.runs.get_trace(session, p.run_id, p.cursor)
