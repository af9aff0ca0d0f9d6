"""
``memory.*``: the memory graph of the connection's scope
(``car_twisted.memory.scopes``: a namespace's, an agent's, or the shared
one).

Results are what ``car-runtime`` insists on: ``memory.add_fact``,
``memory.fact_count``, ``memory.persist`` and ``memory.load`` answer bare
integers, ``memory.build_context(_fast)`` a bare string, ``memory.query``
an array.  A call on a graph not yet loaded waits for the load (off the
reactor thread); after that every call answers at once, and changes are
written back in the background.  ``memory.persist`` / ``memory.load``
paths are sandboxed under ``$CAR_HOME/memory/``
(``car_twisted.sandbox``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import attrs
from twisted.internet.defer import Deferred, ensureDeferred
from zope.interface import implementer

from car_twisted._util import off_reactor
from car_twisted.auth import write_secret_file
from car_twisted.errors import INVALID_PARAMS, InvalidParams, RpcError
from car_twisted.interfaces import IMemgine, IMethodProvider, ISessionFeature
from car_twisted.json_value import JsonValue
from car_twisted.memory import proactive
from car_twisted.memory.scopes import MemoryScope, MemoryScopes, scope_of
from car_twisted.private_files import FileTooLarge, read_private
from car_twisted.rpc.envelope import dumps
from car_twisted.rpc.registry import MethodSpec
from car_twisted.runtime import runtime_of
from car_twisted.sandbox import memory_path
from car_twisted.session import ClientSession

if TYPE_CHECKING:
    from car_twisted.state import ServerState

__all__ = ["MemoryMethods", "MemoryConnection", "DEFAULT_CONTEXT_TOKENS", "MAX_LOAD_BYTES"]

T = TypeVar("T")
DEFAULT_CONTEXT_TOKENS = 8192
MAX_K = 100
MAX_LOAD_BYTES = 256 * 1024 * 1024
_CONFIDENCE_WORDS = {"high": 0.9, "medium": 0.6, "low": 0.3}
_TEXT = {"max_len": 64 * 1024}
_NAME = {"max_len": 1024}
_ID = {"max_len": 256}


@attrs.frozen
class AddFactParams:
    subject: str = attrs.field(metadata=_NAME)
    body: str = attrs.field(metadata=_TEXT)
    kind: str = attrs.field(default="pattern", metadata={"max_len": 64})
    confidence: JsonValue = None
    fact_id: str | None = attrs.field(default=None, metadata=_ID)
    tags: list[str] | None = attrs.field(default=None, metadata={"max_len": 64})
    source: str | None = attrs.field(default=None, metadata=_ID)


@attrs.frozen
class QueryParams:
    query: str = attrs.field(metadata={"max_len": 16 * 1024})
    k: int = 5


@attrs.frozen
class ContextParams:
    query: str = attrs.field(metadata={"max_len": 16 * 1024})
    model_context_window: int | None = None


@attrs.frozen
class PathParams:
    path: str = attrs.field(metadata={"max_len": 4096})


@attrs.frozen
class IdParams:
    id: str = attrs.field(metadata=_ID)


@attrs.frozen
class SaveParams:
    subject: str = attrs.field(metadata=_NAME)
    body: str = attrs.field(metadata=_TEXT)
    id: str | None = attrs.field(default=None, metadata=_ID)
    tags: list[str] | None = attrs.field(default=None, metadata={"max_len": 64})
    confidence: JsonValue = None
    tenant_id: str | None = attrs.field(default=None, metadata=_ID)
    is_constraint: bool = False


@attrs.frozen
class StatusParams:
    body: str = attrs.field(metadata=_TEXT)
    tenant_id: str | None = attrs.field(default=None, metadata=_ID)


@attrs.frozen
class UtilitySetParams:
    utility_weight: float | None = None
    utility_exploration: float | None = None


@attrs.frozen
class InterveneParams:
    query: str | None = attrs.field(default=None, metadata={"max_len": 16 * 1024})
    recent: list[str] | None = attrs.field(default=None, metadata={"max_len": 64})
    trigger: dict[str, JsonValue] | None = None
    force: bool = False
    max_candidates: int = 8
    tenant_id: str | None = attrs.field(default=None, metadata=_ID)


@attrs.frozen
class EvaluateParams:
    cases: list[JsonValue] = attrs.field(metadata={"max_len": 1024})


@attrs.frozen
class MaintainParams:
    max_recent: int = 32
    tenant_id: str | None = attrs.field(default=None, metadata=_ID)


@implementer(ISessionFeature)
class MemoryConnection:
    """
    A connection's private proactive-memory status slots (one per tenant):
    never a graph fact, so no retrieval can expose them.
    """

    def __init__(self) -> None:
        self.statuses: dict[str, str] = {}

    def holds_client_state(self) -> bool:
        return bool(self.statuses)

    def close(self) -> None:
        self.statuses.clear()


def _status_id(tenant_id: str | None) -> str:
    return f"proactive-status:{tenant_id or 'global'}"


def _confidence(raw: JsonValue, field: str = "confidence") -> float:
    if raw is None:
        return 1.0
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise InvalidParams(field, "expected a number from 0 to 1, or high, medium or low")
    if isinstance(raw, str):
        word = _CONFIDENCE_WORDS.get(raw.strip().lower())
        if word is None:
            raise InvalidParams(field, "expected a number from 0 to 1, or high, medium or low")
        return word
    if not 0.0 <= float(raw) <= 1.0:
        raise InvalidParams(field, "expected a number from 0 to 1")
    return float(raw)


@contextmanager
def _refusal_is_invalid_params(field: str = "fact") -> Iterator[None]:
    """The engine refuses an argument with ValueError: that is the caller's params (-32602)."""
    try:
        yield
    except ValueError as e:
        raise InvalidParams(field, str(e)) from None


def _tags(raw: list[str] | None) -> tuple[str, ...]:
    tags = tuple(raw or ())
    for i, tag in enumerate(tags):
        if not tag or len(tag) > 256:
            raise InvalidParams(f"tags[{i}]", "expected a non-empty string of at most 256 characters")
    return tags


def _bad_file(message: str) -> RpcError:
    """A memory.load file that is missing or not a graph: the caller's path (-32602)."""
    return RpcError(message, data={"field": "path"}, code=INVALID_PARAMS)


@implementer(IMethodProvider)
class MemoryMethods:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    @property
    def scopes(self) -> MemoryScopes:
        return self.state.memory

    def methods(self) -> Iterable[MethodSpec]:
        m = MethodSpec
        return (
            m("memory.add_fact", self.add_fact, params=AddFactParams,
              description="Add a fact; answers the fact count (a bare integer)."),
            m("memory.query", self.query, params=QueryParams,
              description="Personalized PageRank retrieval: [{subject, body, kind, confidence, fact_id, tags, source}]."),
            m("memory.fact_count", self.fact_count, description="The graph's fact count (a bare integer)."),
            m("memory.build_context", self.build_context, params=ContextParams,
              description="The assembled context (a bare string)."),
            m("memory.build_context_fast", self.build_context, params=ContextParams, description="As memory.build_context."),
            m("memory.consolidate", self.consolidate, description="Merge duplicates, expire superseded facts; a report."),
            m("memory.persist", self.persist, params=PathParams, description="Write the whole graph under $CAR_HOME/memory/."),
            m("memory.load", self.load, params=PathParams, description="Replace the graph from a file under $CAR_HOME/memory/."),
            m("memory.delete", self.delete, params=IdParams, description="Remove a fact, or clear a proactive status slot."),
            m("memory.save_knowledge", self.save_knowledge, params=SaveParams, description="Save a knowledge fact."),
            m("memory.save_procedural", self.save_procedural, params=SaveParams, description="Save a procedural fact."),
            m("memory.update_status", self.update_status, params=StatusParams,
              description="This connection's private status slot."),
            m("memory.utility_get", self.utility_get, description="{utility_weight, utility_exploration}."),
            m("memory.utility_set", self.utility_set, params=UtilitySetParams,
              description="Set either (clamped); answers the applied pair."),
            m("memory.intervene", self.intervene, params=InterveneParams,
              description="At most one grounded reminder, or silence."),
            m("memory.evaluate", self.evaluate, params=EvaluateParams,
              description="Selective intervention against the baselines."),
            m("memory.maintain", self.maintain, params=MaintainParams,
              description="Mine recent failed and retried actions into facts."),
        )

    # -- the connection's graph ---------------------------------------------------------

    def _scope(self, session: ClientSession) -> MemoryScope:
        return scope_of(session.memory_namespace, session.agent_id)

    def _on_graph(self, session: ClientSession, work: Callable[[IMemgine], T], mutates: bool = False) -> T | Deferred[T]:
        """
        Run C{work} on the session's graph: at once when loaded, else after
        the load.  A change is answered once it is on disk (the journal).
        """
        scope = self._scope(session)

        def run(graph: IMemgine) -> T | Deferred[T]:
            result = work(graph)
            if mutates:
                saved = self.scopes.changed(scope, wait=True)
                if saved is not None:
                    return saved.addCallback(lambda _: result)
            return result

        graph = self.scopes.loaded(scope)
        if graph is not None:
            return run(graph)
        return self.scopes.graph(scope).addCallback(run)

    # -- facts ---------------------------------------------------------------------------

    def add_fact(self, session: ClientSession, p: AddFactParams) -> int | Deferred[int]:
        confidence = _confidence(p.confidence)
        tags = _tags(p.tags)

        def add(graph: IMemgine) -> int:
            with _refusal_is_invalid_params():
                graph.add(
                    p.subject,
                    p.body,
                    p.kind,
                    fact_id=p.fact_id or None,
                    confidence=confidence,
                    tags=tags,
                    source=f"ws-{p.source}" if p.source else "ws",
                )
            return int(graph.count())

        return self._on_graph(session, add, mutates=True)

    def query(self, session: ClientSession, p: QueryParams) -> list[JsonValue] | Deferred[list[JsonValue]]:
        if not 1 <= p.k <= MAX_K:
            raise InvalidParams("k", f"expected 1 to {MAX_K}")
        return self._on_graph(session, lambda g: [f.to_wire() for f in g.query(p.query, p.k)])

    def fact_count(self, session: ClientSession, params: JsonValue) -> int | Deferred[int]:
        return self._on_graph(session, lambda g: int(g.count()))

    def build_context(self, session: ClientSession, p: ContextParams) -> str | Deferred[str]:
        budget = DEFAULT_CONTEXT_TOKENS
        if p.model_context_window is not None:
            if not 256 <= p.model_context_window <= 10_000_000:
                raise InvalidParams("model_context_window", "expected 256 to 10000000 tokens")
            # A quarter of the window for remembered context, the rest for the conversation.
            budget = max(256, p.model_context_window // 4)
        return self._on_graph(session, lambda g: str(g.build_context(p.query, budget)))

    def consolidate(self, session: ClientSession, params: JsonValue) -> JsonValue | Deferred[JsonValue]:
        return self._on_graph(session, lambda g: g.consolidate(), mutates=True)

    def delete(self, session: ClientSession, p: IdParams) -> dict[str, JsonValue] | Deferred[dict[str, JsonValue]]:
        if p.id.startswith("proactive-status:"):
            conn = session.feature(MemoryConnection, lambda s: MemoryConnection())
            tenant = p.id.split(":", 1)[1]
            removed = conn.statuses.pop(tenant, None) is not None
            return self._on_graph(session, lambda g: {"id": p.id, "deleted": removed, "kind": "status", "fact_count": g.count()})

        def delete(graph: IMemgine) -> dict[str, JsonValue]:
            fact = graph.delete(p.id)
            return {"id": p.id, "deleted": fact is not None, "kind": fact.kind if fact is not None else None, "fact_count": graph.count()}

        return self._on_graph(session, delete, mutates=True)

    def _save(self, session: ClientSession, p: SaveParams, kind: str) -> dict[str, JsonValue] | Deferred[dict[str, JsonValue]]:
        confidence = _confidence(p.confidence)
        tags = _tags(p.tags)
        metadata: dict[str, JsonValue] = {"proactive": True}
        if p.tenant_id:
            metadata["tenant_id"] = p.tenant_id

        def save(graph: IMemgine) -> dict[str, JsonValue]:
            with _refusal_is_invalid_params():
                fact = graph.add(
                    p.subject,
                    p.body,
                    kind,
                    fact_id=p.id or None,
                    confidence=confidence,
                    tags=tags,
                    source="ws",
                    constraint=True if p.is_constraint else None,
                    metadata=metadata,
                )
            return {"id": fact.id, "kind": kind, "fact_count": graph.count()}

        return self._on_graph(session, save, mutates=True)

    def save_knowledge(self, session: ClientSession, p: SaveParams) -> dict[str, JsonValue] | Deferred[dict[str, JsonValue]]:
        return self._save(session, p, "knowledge")

    def save_procedural(self, session: ClientSession, p: SaveParams) -> dict[str, JsonValue] | Deferred[dict[str, JsonValue]]:
        return self._save(session, p, "procedural")

    def update_status(self, session: ClientSession, p: StatusParams) -> dict[str, JsonValue]:
        conn = session.feature(MemoryConnection, lambda s: MemoryConnection())
        conn.statuses[p.tenant_id or "global"] = p.body
        out: dict[str, JsonValue] = {"id": _status_id(p.tenant_id), "body": p.body}
        if p.tenant_id:
            out["tenant_id"] = p.tenant_id
        return out

    # -- utility -----------------------------------------------------------------------

    def utility_get(self, session: ClientSession, params: JsonValue) -> dict[str, JsonValue] | Deferred[dict[str, JsonValue]]:
        def read(graph: IMemgine) -> dict[str, JsonValue]:
            weight, exploration = graph.utility()
            return {"utility_weight": weight, "utility_exploration": exploration}

        return self._on_graph(session, read)

    def utility_set(self, session: ClientSession, p: UtilitySetParams) -> dict[str, JsonValue] | Deferred[dict[str, JsonValue]]:
        def write(graph: IMemgine) -> dict[str, JsonValue]:
            weight, exploration = graph.set_utility(p.utility_weight, p.utility_exploration)
            return {"utility_weight": weight, "utility_exploration": exploration}

        return self._on_graph(session, write, mutates=True)

    # -- proactive memory ------------------------------------------------------------------

    def intervene(self, session: ClientSession, p: InterveneParams) -> JsonValue | Deferred[JsonValue]:
        if not 1 <= p.max_candidates <= 64:
            raise InvalidParams("max_candidates", "expected 1 to 64")

        def decide(graph: IMemgine) -> JsonValue:
            with _refusal_is_invalid_params("trigger"):
                return proactive.intervene(graph, p.query, list(p.recent or ()), dict(p.trigger or {}), p.force, p.max_candidates)

        return self._on_graph(session, decide, mutates=True)

    def evaluate(self, session: ClientSession, p: EvaluateParams) -> JsonValue | Deferred[JsonValue]:
        def measure(graph: IMemgine) -> JsonValue:
            with _refusal_is_invalid_params("cases"):
                return proactive.evaluate(graph, p.cases)

        return self._on_graph(session, measure)

    def maintain(self, session: ClientSession, p: MaintainParams) -> Deferred[JsonValue]:
        if not 1 <= p.max_recent <= 256:
            raise InvalidParams("max_recent", "expected 1 to 256")
        return ensureDeferred(self._maintain(session, p.max_recent))

    async def _maintain(self, session: ClientSession, max_recent: int) -> JsonValue:
        events: list[dict[str, JsonValue]] = list(runtime_of(session).recent_troubles)
        run_id = self.state.runs.current_run(session)
        meta = self.state.runs.runs.get(run_id) if run_id is not None else None
        if meta is not None:
            records = await self.state.runs.store.read(meta.agent_id, meta.run_id) or []
            for record in records:
                if record.get("record") == "turn" and record.get("status") in ("failed", "rejected"):
                    events.append({"kind": "turn", "run_id": meta.run_id, **{k: v for k, v in record.items() if k != "record"}})
        graph = await self.scopes.graph(self._scope(session))
        report = proactive.maintain(graph, events[-max_recent:], max_recent)
        self.scopes.changed(self._scope(session))
        return report

    # -- files -----------------------------------------------------------------------------

    @property
    def _base(self) -> Path:
        return self.state.config.paths.home / "memory"

    def persist(self, session: ClientSession, p: PathParams) -> Deferred[int]:
        scope = self._scope(session)

        async def go() -> int:
            graph = await self.scopes.graph(scope)
            snapshot = graph.snapshot()
            count = int(graph.count())
            body = dumps(snapshot).decode()

            def write() -> None:
                target = memory_path(self._base, p.path, "memory.persist", create_dirs=True)
                write_secret_file(target, body)

            await off_reactor(self.state.clock, write)
            return count

        return ensureDeferred(go())

    def load(self, session: ClientSession, p: PathParams) -> Deferred[int]:
        scope = self._scope(session)

        async def go() -> int:
            def read() -> JsonValue:
                target = memory_path(self._base, p.path, "memory.load", create_dirs=False)
                try:
                    raw = read_private(target, MAX_LOAD_BYTES)
                except FileNotFoundError:
                    raise _bad_file(f"memory.load: no such file {p.path!r} under the memory directory") from None
                except FileTooLarge:
                    raise _bad_file(f"memory.load: the file is larger than {MAX_LOAD_BYTES} bytes") from None
                try:
                    return json.loads(raw)  # type: ignore[no-any-return]
                except ValueError as e:
                    raise _bad_file(f"memory.load: not a memory file ({e})") from None

            snapshot = await off_reactor(self.state.clock, read)
            await self.scopes.graph(scope)  # loaded, so it can be replaced
            try:
                # A full replace; the engine checks everything first and
                # changes nothing when the file is not a graph.
                count = self.scopes.replace(scope, lambda g: int(g.restore(snapshot)))
            except ValueError as e:
                raise _bad_file(f"memory.load: not a memory file ({e})") from None
            return count

        return ensureDeferred(go())
