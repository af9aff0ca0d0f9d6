"""
The proposal engine: validates an ``ActionProposal`` and executes it.

Validation happens before anything runs.  A proposal whose work is out
of bounds is refused whole with ``InvalidParams`` (field ``proposal``):
more than ``MAX_DEPENDENCY_EDGES`` dependency edges once
``state_dependencies`` are expanded, or ``deny_tool_param`` checks that
would scan more than ``MAX_POLICY_SCAN_CHARS`` characters of parameter
text (each distinct policy once; each parameter is serialised at most
once per execution).  Then unknown tools, missing required parameters,
static policy denials (``deny_tool``, ``deny_tool_param``), dependency
cycles and state dependencies nobody provides reject their action; a
rejected action whose ``failure_behavior`` is not ``skip`` aborts the
whole proposal before any callback.

Execution follows the dependency graph (explicit ``dependencies`` by
action id, and ``state_dependencies`` on the keys other actions write):
independent actions run concurrently (at most ``MAX_CONCURRENT_ACTIONS``),
dependent ones in order.  Each action keeps a count of its unfinished
dependencies; a success decrements its dependents' counts and queues
those that reach zero, first ready first launched, so scheduling is linear
in actions plus edges.  At dispatch each action passes the
state-dependent policies (``require_state``) and its preconditions, then
runs: a ``tool_call`` through the session's ``IToolExecutor`` (with
``retry`` up to ``max_retries`` more attempts, never after a terminal
error), the state actions directly.  ``abort`` stops launching new
actions; ``skip`` lets the rest go on, and the failed action's dependents
are skipped, transitively.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Protocol, cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from car_twisted._util import iso_utc
from car_twisted.errors import InvalidParams
from car_twisted.interfaces import IToolExecutor
from car_twisted.json_value import JsonValue
from car_twisted.proposal.ir import (
    Action,
    ActionProposal,
    ActionResult,
    Precondition,
    ProposalResult,
    ToolCall,
    ToolError,
    ToolSchema,
)
from car_twisted.proposal.rules import (
    ParamTexts,
    PolicyDefinition,
    StateReader,
    distinct_static,
    first_violation,
    param_scans,
)

__all__ = [
    "ProposalEngine",
    "StateStore",
    "holds",
    "MAX_CONCURRENT_ACTIONS",
    "MAX_DEPENDENCY_EDGES",
    "MAX_POLICY_SCAN_CHARS",
]

MAX_CONCURRENT_ACTIONS = 64
# Building and walking the graph costs one step per edge; 1 000 actions fully interlinked would be a million.
MAX_DEPENDENCY_EDGES = 100_000
# Every deny_tool_param pattern reads its parameter's whole text; this caps the reactor time one proposal can take.
MAX_POLICY_SCAN_CHARS = 64 * 1024 * 1024
_NONE: frozenset[str] = frozenset()
_NO_SCANS: dict[str | None, int] = {}
_STATIC_RULES = ("deny_tool", "deny_tool_param")
_log = Logger()


class StateStore(StateReader, Protocol):
    """The state a proposal reads and writes (a ``KeyValueView``)."""

    def set(self, key: str, value: JsonValue) -> None: ...

    def delete(self, key: str) -> None: ...


def _number(value: JsonValue) -> float | None:
    return float(value) if type(value) is int or type(value) is float else None


def holds(pre: Precondition, state: StateReader) -> bool:
    """Evaluate one precondition against a state mapping."""
    present = pre.key in state
    current = state.get(pre.key) if present else None
    op = pre.operator
    if op == "exists":
        return present
    if op == "not_exists":
        return not present
    if op == "eq":
        return present and current == pre.value
    if op == "neq":
        return not (present and current == pre.value)
    if op == "contains":
        if type(current) is str and type(pre.value) is str:
            return pre.value in current
        return type(current) is list and pre.value in current
    a, b = _number(current), _number(pre.value)
    if not present or a is None or b is None:
        return False
    return {"gt": a > b, "lt": a < b, "gte": a >= b, "lte": a <= b}[op]


class ProposalEngine:
    """
    One execution of one proposal.

    @param executor: runs the tool calls; None when the connection has
        none (an embedder's adapters gave none): tool calls then fail.
    @param state: the (tenant-scoped) state view actions read and write.
    @param tools: registered tool schemas by name.
    @param policies: the policies in force for this execution.
    """

    def __init__(
        self,
        clock: IReactorTime,
        executor: IToolExecutor | None,
        state: StateStore,
        tools: dict[str, ToolSchema],
        policies: Iterable[PolicyDefinition],
        session_id: str | None = None,
        max_concurrency: int = MAX_CONCURRENT_ACTIONS,
    ) -> None:
        self.clock = clock
        self.executor = executor
        self.state = state
        self.tools = tools
        self.policies = list(policies)
        self.session_id = session_id
        self.max_concurrency = max_concurrency
        self.tool_calls = 0
        self.retries = 0

    def run(self, proposal: ActionProposal) -> Deferred[ProposalResult]:
        """@return: a Deferred firing with the ``ProposalResult``."""
        return _Execution(self, proposal).start()


class _Execution:
    """The bookkeeping of one run of one proposal."""

    def __init__(self, engine: ProposalEngine, proposal: ActionProposal) -> None:
        self.engine = engine
        self.proposal = proposal
        self.actions = {a.id: a for a in proposal.actions}
        self.results = {a.id: ActionResult(a.id, "proposed") for a in proposal.actions}
        self.deps: dict[str, set[str]] = {}
        self.dependents: dict[str, list[str]] = {a.id: [] for a in proposal.actions}
        # Per action, how many of its dependencies have not succeeded yet.
        self.unmet: dict[str, int] = {}
        # Not yet launched nor skipped, in proposal order (a dict as an ordered set).
        self.waiting: dict[str, None] = {}
        self.ready: deque[str] = deque()
        self.running: dict[str, Deferred[None]] = {}
        self.aborted: str | None = None
        self.launching = False
        self.halted: dict[str, str] | None = None
        self.undo: dict[str, tuple[bool, JsonValue]] = {}
        self.texts = ParamTexts()
        self.started = engine.clock.seconds()
        self.done: Deferred[ProposalResult] = Deferred(self._cancel_all)

    # -- validation --------------------------------------------------------------

    def _reject(self, action_id: str, reason: str) -> None:
        res = self.results[action_id]
        res.status, res.error = "rejected", reason

    def _validate(self) -> None:
        engine = self.engine
        writers: dict[str, set[str]] = {}
        for a in self.proposal.actions:
            for key in a.writes():
                writers.setdefault(key, set()).add(a.id)
        self._bound_edges(writers)
        static = distinct_static(p for p in engine.policies if p.rule in _STATIC_RULES)
        scans = param_scans(static)
        scan_chars = 0
        to_check = []
        for a in self.proposal.actions:
            deps = {d for d in a.dependencies if d != a.id}
            for key in dict.fromkeys(a.state_dependencies):
                producers = writers.get(key, _NONE) - {a.id}
                if producers:
                    deps |= producers
                elif key not in engine.state:
                    self._reject(a.id, f"unsatisfied state dependency '{key}': no action writes it and it is not in state")
            self.deps[a.id] = deps
            for d in deps:
                self.dependents[d].append(a.id)
            if self.results[a.id].status == "rejected":
                continue
            if a.type == "tool_call":
                schema = engine.tools.get(a.tool or "")
                if schema is None:
                    self._reject(a.id, f"unknown tool '{a.tool}': register it with tools.register first")
                    continue
                required = schema.parameters.get("required")
                if type(required) is list:
                    missing = [k for k in required if type(k) is str and k not in a.parameters]
                    if missing:
                        self._reject(a.id, f"missing required parameter '{missing[0]}' for tool '{a.tool}'")
                        continue
                # Price the scanning before doing any: each pattern reads the whole text.
                for param, patterns in scans.get(a.tool, _NO_SCANS).items():
                    if param in a.parameters:
                        scan_chars += patterns * len(self.texts(a, param))
                        if scan_chars > MAX_POLICY_SCAN_CHARS:
                            raise InvalidParams(
                                "proposal",
                                f"too much policy scanning: deny_tool_param policies would scan more than "
                                f"{MAX_POLICY_SCAN_CHARS} characters of parameters (MAX_POLICY_SCAN_CHARS)",
                            )
            to_check.append(a)
        for a in to_check:
            hit = first_violation(static, a, engine.state, self.texts)
            if hit is not None:
                policy, reason = hit
                self._reject(a.id, f"denied by policy '{policy.name}' ({reason})")
        self._reject_cycles()
        for a in self.proposal.actions:
            if self.results[a.id].status == "rejected" and a.failure_behavior != "skip":
                self._abort(f"action '{a.id}' was rejected")
                return

    def _bound_edges(self, writers: dict[str, set[str]]) -> None:
        """
        Refuse a proposal with more than ``MAX_DEPENDENCY_EDGES`` edges,
        counted as expanded (each state dependency adds one edge per other
        writer of its key, before duplicates merge): that is the work
        building the graph costs, so it is checked before any is done.
        """
        edges = 0
        for i, a in enumerate(self.proposal.actions):
            explicit = set(a.dependencies)
            explicit.discard(a.id)
            for d in explicit:
                if d not in self.actions:
                    # parse_proposal refuses these; a proposal built in code may not have been parsed.
                    j = a.dependencies.index(d)
                    raise InvalidParams(f"proposal.actions[{i}].dependencies[{j}]", f"unknown action id {d!r}")
            edges += len(explicit)
            for key in set(a.state_dependencies):
                producers = writers.get(key)
                if producers:
                    edges += len(producers) - (a.id in producers)
            if edges > MAX_DEPENDENCY_EDGES:
                raise InvalidParams(
                    "proposal",
                    f"too many dependency edges: more than {MAX_DEPENDENCY_EDGES} after expanding "
                    f"state_dependencies into the actions that write those keys (MAX_DEPENDENCY_EDGES)",
                )

    def _reject_cycles(self) -> None:
        indegree = {aid: len(d) for aid, d in self.deps.items()}
        queue = [aid for aid, n in indegree.items() if n == 0]
        while queue:
            aid = queue.pop()
            for nxt in self.dependents[aid]:
                indegree[nxt] -= 1
                if indegree[nxt] == 0:
                    queue.append(nxt)
        for aid, n in indegree.items():
            if n > 0 and self.results[aid].status != "rejected":
                self._reject(aid, "dependency cycle")

    # -- scheduling ----------------------------------------------------------------

    def start(self) -> Deferred[ProposalResult]:
        try:
            self._validate()
        except InvalidParams:
            raise  # the client's mistake: the dispatcher answers -32602
        except Exception:
            _log.failure("proposal validation failed")
            raise
        if self.aborted is None:
            self._plan()
        self._launch()
        return self.done

    def _plan(self) -> None:
        """Count unmet dependencies, skip what a rejection blocks, queue what can start now."""
        for a in self.proposal.actions:
            self.unmet[a.id] = len(self.deps[a.id])
            if self.results[a.id].status == "proposed":
                self.waiting[a.id] = None
        for a in self.proposal.actions:
            if self.results[a.id].status == "rejected":
                self._skip_dependents(a.id)
        self.ready.extend(aid for aid in self.waiting if self.unmet[aid] == 0)

    def _abort(self, why: str) -> None:
        if self.aborted is None:
            self.aborted = why
            for res in self.results.values():
                if res.status == "proposed":
                    res.status, res.error = "skipped", f"proposal aborted: {why}"
        self.waiting.clear()
        self.ready.clear()

    def _skip(self, aid: str, why: str) -> None:
        res = self.results[aid]
        if res.status == "proposed":
            res.status, res.error = "skipped", why
        self.waiting.pop(aid, None)

    def _skip_dependents(self, bad: str) -> None:
        """Skip everything that (transitively) depends on C{bad}, each once."""
        stack = [bad]
        while stack:
            failed = stack.pop()
            for aid in self.dependents[failed]:
                if aid in self.waiting:
                    self._skip(aid, f"dependency '{failed}' did not succeed")
                    stack.append(aid)

    def _release(self, done: str) -> None:
        """C{done} succeeded: queue the dependents that now have everything they need."""
        for aid in self.dependents[done]:
            self.unmet[aid] -= 1
            if self.unmet[aid] == 0 and aid in self.waiting:
                self.ready.append(aid)

    def _launch(self) -> None:
        # Actions can finish synchronously while we launch them, which calls
        # back in here: the outer call's loop picks up what they released
        # instead of nesting.
        if self.launching:
            return
        self.launching = True
        try:
            self._launch_ready()
        finally:
            self.launching = False
        if not self.running and not self.done.called:
            for aid in list(self.waiting):
                self._skip(aid, "never became ready")
            self.done.callback(self._result())

    def _launch_ready(self) -> None:
        while self.ready and self.aborted is None and len(self.running) < self.engine.max_concurrency:
            aid = self.ready.popleft()
            if aid not in self.waiting:
                continue
            del self.waiting[aid]
            try:
                pending = self._run(self.actions[aid])
            except Exception:
                self._finished(Failure(), aid)
                continue
            if pending is None:
                self._finished(None, aid)  # a state action, or refused before any call
            else:
                self.running[aid] = pending
                pending.addBoth(self._finished, aid)

    def _finished(self, outcome: None | Failure, aid: str) -> None:
        self.running.pop(aid, None)
        res = self.results[aid]
        if isinstance(outcome, Failure):
            exc = outcome.value
            if not isinstance(exc, CancelledError):
                _log.failure("action {action_id} crashed", failure=outcome, action_id=aid)
            res.status = "failed"
            res.error = res.error or ("cancelled" if isinstance(exc, CancelledError) else "internal error")
        if self.halted is not None:
            self._abort(f"action '{aid}' hit a terminal tool error")
        elif res.status in ("failed", "rejected") and self.actions[aid].failure_behavior != "skip":
            self._abort(f"action '{aid}' {res.status}")
        if self.aborted is None:
            if res.status == "succeeded":
                self._release(aid)
            else:
                self._skip_dependents(aid)
        if not self.done.called:
            self._launch()

    def _write(self, key: str, value: JsonValue) -> None:
        """Every state write goes here, so a halt can roll the proposal back."""
        state = self.engine.state
        if key not in self.undo:
            self.undo[key] = (key in state, state.get(key))
        state.set(key, value)

    def _rollback(self) -> None:
        state = self.engine.state
        for key, (present, old) in self.undo.items():
            if present:
                state.set(key, old)
            else:
                state.delete(key)
        for res in self.results.values():
            res.state_changes = {}

    def _cancel_all(self, done: Deferred[ProposalResult]) -> None:
        self._abort("cancelled")
        for d in list(self.running.values()):
            d.cancel()

    def _result(self) -> ProposalResult:
        if self.halted is not None:
            self._rollback()
        results = tuple(self.results[a.id] for a in self.proposal.actions)
        counts = dict.fromkeys(("succeeded", "failed", "rejected", "skipped"), 0)
        for r in results:
            if r.status in counts:
                counts[r.status] += 1
        cost = {
            "tool_calls": self.engine.tool_calls,
            "actions_executed": counts["succeeded"] + counts["failed"],
            "actions_rejected": counts["rejected"],
            "actions_skipped": counts["skipped"],
            "total_duration_ms": round((self.engine.clock.seconds() - self.started) * 1000.0, 3),
            "retries": self.engine.retries,
        }
        return ProposalResult(self.proposal.id, results, cost, self.halted)

    # -- one action ------------------------------------------------------------------

    # Plain callbacks rather than a coroutine per action: a tool call is one
    # Deferred (the executor's) with this execution's callbacks on it, and
    # a state action or a refusal finishes without any.

    def _run(self, a: Action) -> Deferred[None] | None:
        """Run C{a}: None when it finished now, else the Deferred of its tool call."""
        engine, res = self.engine, self.results[a.id]
        began = engine.clock.seconds()
        res.timestamp = iso_utc(began)
        res.status = "executing"
        try:
            pending = self._execute(a, res)
        except BaseException:
            self._took(res, began)
            raise
        if pending is None:
            self._settled(None, a, res, began)
            return None
        return pending.addBoth(self._settled, a, res, began)

    def _took(self, res: ActionResult, began: float) -> None:
        res.duration_ms = round((self.engine.clock.seconds() - began) * 1000.0, 3)

    def _settled(self, outcome: None | Failure, a: Action, res: ActionResult, began: float) -> None | Failure:
        if outcome is None and res.status == "succeeded" and a.expected_effects:
            for key, value in a.expected_effects.items():
                self._write(key, value)
            res.state_changes = {**res.state_changes, **a.expected_effects}
        self._took(res, began)
        return outcome

    def _execute(self, a: Action, res: ActionResult) -> Deferred[None] | None:
        engine = self.engine
        state = engine.state
        hit = first_violation((p for p in engine.policies if p.rule not in _STATIC_RULES), a, state)
        if hit is not None:
            res.status, res.error = "rejected", f"denied by policy '{hit[0].name}' ({hit[1]})"
            return None
        failed_pre = next((p for p in a.preconditions if not holds(p, state)), None)
        if failed_pre is not None and a.type != "assertion":
            res.status, res.error = "rejected", f"precondition failed: {failed_pre.describe()}"
            return None
        if a.type == "tool_call":
            return self._tool_call(a, res)
        if a.type == "state_write":
            # Action.parse checks that state actions name a string key.
            key, value = cast(str, a.parameters["key"]), a.parameters.get("value")
            self._write(key, value)
            res.output, res.state_changes = value, {key: value}
            res.status = "succeeded"
        elif a.type == "state_read":
            res.output = state.get(cast(str, a.parameters["key"]))
            res.status = "succeeded"
        else:
            checks = list(a.preconditions)
            if "key" in a.parameters:
                checks.insert(0, Precondition.parse(a.parameters, f"actions.{a.id}.parameters"))
            bad = next((c for c in checks if not holds(c, state)), None)
            if bad is None:
                res.status, res.output = "succeeded", True
            else:
                res.status, res.error = "failed", f"assertion failed: {bad.describe()}"
        return None

    def _tool_call(self, a: Action, res: ActionResult) -> Deferred[None] | None:
        executor = self.engine.executor
        if a.invocation_mode != "one_shot" and not getattr(executor, "supports_detached", False):
            res.status = "failed"
            res.error = (
                f"tool executor does not support streaming/long-running invocation "
                f"('{a.invocation_mode}' for tool '{a.tool}')"
            )
            return None
        if executor is None:
            res.status = "failed"
            res.error = f"no tool executor serves this connection (tool '{a.tool}')"
            return None
        return self._attempt(executor, a, res, 1)

    def _attempt(self, executor: IToolExecutor, a: Action, res: ActionResult, attempt: int) -> Deferred[None]:
        engine = self.engine
        res.attempts = attempt
        if attempt > 1:
            engine.retries += 1
        engine.tool_calls += 1
        call = ToolCall(a.id, a.tool or "", a.parameters, a.timeout_ms, attempt, engine.session_id)
        d: Deferred[JsonValue] = executor.execute(call)
        return d.addCallbacks(
            _tool_succeeded, self._tool_failed, callbackArgs=(res,), errbackArgs=(executor, a, res, attempt)
        )

    def _tool_failed(
        self, failure: Failure, executor: IToolExecutor, a: Action, res: ActionResult, attempt: int
    ) -> Deferred[None] | None:
        failure.trap(ToolError)  # anything else (a cancel, a bug) ends the action as a crash
        e = cast(ToolError, failure.value)
        res.error = e.message
        if e.terminal:
            # The client says no retry can help: abort and roll the
            # proposal back whatever failure_behavior says, and halt the
            # session (see ProposalMethods).
            self.halted = {"action_id": a.id, "reason": e.message}
        elif e.kind != "disconnected" and attempt < a.attempts:
            return self._attempt(executor, a, res, attempt + 1)
        res.status = "failed"
        return None


def _tool_succeeded(output: JsonValue, res: ActionResult) -> None:
    res.output = output
    res.status, res.error = "succeeded", None
