"""
The proposal engine: validates an ``ActionProposal`` and executes it.

Validation happens before anything runs: unknown tools, missing required
parameters, static policy denials (``deny_tool``, ``deny_tool_param``),
dependency cycles and state dependencies nobody provides reject their
action; a rejected action whose ``failure_behavior`` is not ``skip``
aborts the whole proposal before any callback.

Execution follows the dependency graph (explicit ``dependencies`` by
action id, and ``state_dependencies`` on the keys other actions write):
independent actions run concurrently, dependent ones in order.  At
dispatch each action passes the state-dependent policies
(``require_state``) and its preconditions, then runs: a ``tool_call``
through the session's ``IToolExecutor`` (with ``retry`` up to
``max_retries`` more attempts, never after a terminal error), the state
actions directly.  ``abort`` stops launching new actions; ``skip`` lets
the rest go on, and the failed action's dependents are skipped.
"""

from __future__ import annotations

from typing import Any, Iterable

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from car_twisted._util import iso_utc
from car_twisted.interfaces import IToolExecutor
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
from car_twisted.proposal.rules import PolicyDefinition, first_violation

__all__ = ["ProposalEngine", "holds", "MAX_CONCURRENT_ACTIONS"]

MAX_CONCURRENT_ACTIONS = 64
_STATIC_RULES = ("deny_tool", "deny_tool_param")
_log = Logger()


def _number(value: Any) -> float | None:
    return float(value) if type(value) in (int, float) else None


def holds(pre: Precondition, state: Any) -> bool:
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

    @param state: the (tenant-scoped) state view actions read and write.
    @param tools: registered tool schemas by name.
    @param policies: the policies in force for this execution.
    """

    def __init__(
        self,
        clock: IReactorTime,
        executor: IToolExecutor,
        state: Any,
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

    def run(self, proposal: ActionProposal) -> Deferred:
        """@return: a Deferred firing with the ``ProposalResult``."""
        return _Execution(self, proposal).start()


class _Execution:
    def __init__(self, engine: ProposalEngine, proposal: ActionProposal) -> None:
        self.engine = engine
        self.proposal = proposal
        self.actions = {a.id: a for a in proposal.actions}
        self.results = {a.id: ActionResult(a.id, "proposed") for a in proposal.actions}
        self.deps: dict[str, set[str]] = {}
        self.waiting: list[str] = []
        self.running: dict[str, Deferred] = {}
        self.aborted: str | None = None
        self.launching = False
        self.relaunch = False
        self.halted: dict[str, str] | None = None
        self.undo: dict[str, tuple[bool, Any]] = {}
        self.started = engine.clock.seconds()
        self.done: Deferred = Deferred(self._cancel_all)

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
        static = [p for p in engine.policies if p.rule in _STATIC_RULES]
        for a in self.proposal.actions:
            deps = {d for d in a.dependencies if d != a.id}
            for key in a.state_dependencies:
                producers = writers.get(key, set()) - {a.id}
                if producers:
                    deps |= producers
                elif key not in engine.state:
                    self._reject(a.id, f"unsatisfied state dependency '{key}': no action writes it and it is not in state")
            self.deps[a.id] = deps
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
            hit = first_violation(static, a, engine.state)
            if hit is not None:
                policy, reason = hit
                self._reject(a.id, f"denied by policy '{policy.name}' ({reason})")
        self._reject_cycles()
        for a in self.proposal.actions:
            if self.results[a.id].status == "rejected" and a.failure_behavior != "skip":
                self._abort(f"action '{a.id}' was rejected")
                return

    def _reject_cycles(self) -> None:
        indegree = {aid: len(d) for aid, d in self.deps.items()}
        dependents: dict[str, list[str]] = {aid: [] for aid in self.deps}
        for aid, deps in self.deps.items():
            for d in deps:
                dependents[d].append(aid)
        queue = [aid for aid, n in indegree.items() if n == 0]
        while queue:
            aid = queue.pop()
            for nxt in dependents[aid]:
                indegree[nxt] -= 1
                if indegree[nxt] == 0:
                    queue.append(nxt)
        for aid, n in indegree.items():
            if n > 0 and self.results[aid].status != "rejected":
                self._reject(aid, "dependency cycle")

    # -- scheduling ----------------------------------------------------------------

    def start(self) -> Deferred:
        try:
            self._validate()
        except Exception:
            _log.failure("proposal validation failed")
            raise
        self.waiting = [a.id for a in self.proposal.actions if self.results[a.id].status == "proposed"]
        self._launch()
        return self.done

    def _abort(self, why: str) -> None:
        if self.aborted is None:
            self.aborted = why
        for aid in self.waiting:
            self._skip(aid, f"proposal aborted: {why}")
        self.waiting = []
        for res in self.results.values():
            if res.status == "proposed":
                res.status, res.error = "skipped", f"proposal aborted: {why}"

    def _skip(self, aid: str, why: str) -> None:
        res = self.results[aid]
        if res.status == "proposed":
            res.status, res.error = "skipped", why

    def _launch(self) -> None:
        # Actions can finish synchronously while we launch them, which calls
        # back in here: the outer call loops instead of nesting.
        if self.launching:
            self.relaunch = True
            return
        self.launching = True
        try:
            self.relaunch = True
            while self.relaunch and self.aborted is None:
                self.relaunch = False
                self._launch_ready()
        finally:
            self.launching = False
        if not self.running and not self.done.called:
            for aid in self.waiting:
                self._skip(aid, "never became ready")
            self.done.callback(self._result())

    def _launch_ready(self) -> None:
        for aid in list(self.waiting):
            if aid not in self.waiting or self.aborted is not None:
                continue
            if len(self.running) >= self.engine.max_concurrency:
                return
            statuses = [self.results[d].status for d in self.deps[aid]]
            if any(s in ("failed", "rejected", "skipped") for s in statuses):
                bad = next(d for d in self.deps[aid] if self.results[d].status != "succeeded")
                self.waiting.remove(aid)
                self._skip(aid, f"dependency '{bad}' did not succeed")
                self.relaunch = True
            elif all(s == "succeeded" for s in statuses):
                self.waiting.remove(aid)
                d = Deferred.fromCoroutine(self._run(self.actions[aid]))
                self.running[aid] = d
                d.addBoth(self._finished, aid)

    def _finished(self, outcome: Any, aid: str) -> None:
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
        if not self.done.called:
            self._launch()

    def _write(self, key: str, value: Any) -> None:
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

    def _cancel_all(self, done: Deferred) -> None:
        self.aborted = self.aborted or "cancelled"
        self.waiting = []
        for d in list(self.running.values()):
            d.cancel()

    def _result(self) -> ProposalResult:
        if self.halted is not None:
            self._rollback()
        results = tuple(self.results[a.id] for a in self.proposal.actions)
        counts = {s: sum(1 for r in results if r.status == s) for s in ("succeeded", "failed", "rejected", "skipped")}
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

    async def _run(self, a: Action) -> None:
        engine, res = self.engine, self.results[a.id]
        state = engine.state
        began = engine.clock.seconds()
        res.timestamp = iso_utc(began)
        res.status = "executing"
        try:
            hit = first_violation(
                (p for p in engine.policies if p.rule not in _STATIC_RULES), a, state
            )
            if hit is not None:
                res.status, res.error = "rejected", f"denied by policy '{hit[0].name}' ({hit[1]})"
                return
            failed_pre = next((p for p in a.preconditions if not holds(p, state)), None)
            if failed_pre is not None and a.type != "assertion":
                res.status, res.error = "rejected", f"precondition failed: {failed_pre.describe()}"
                return
            if a.type == "tool_call":
                await self._tool_call(a, res)
            elif a.type == "state_write":
                key, value = a.parameters["key"], a.parameters.get("value")
                self._write(key, value)
                res.output, res.state_changes = value, {key: value}
                res.status = "succeeded"
            elif a.type == "state_read":
                res.output = state.get(a.parameters["key"])
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
            if res.status == "succeeded" and a.expected_effects:
                for key, value in a.expected_effects.items():
                    self._write(key, value)
                res.state_changes = {**res.state_changes, **a.expected_effects}
        finally:
            res.duration_ms = round((engine.clock.seconds() - began) * 1000.0, 3)

    async def _tool_call(self, a: Action, res: ActionResult) -> None:
        engine = self.engine
        if a.invocation_mode != "one_shot" and not getattr(engine.executor, "supports_detached", False):
            res.status = "failed"
            res.error = (
                f"tool executor does not support streaming/long-running invocation "
                f"('{a.invocation_mode}' for tool '{a.tool}')"
            )
            return
        for attempt in range(1, a.attempts + 1):
            res.attempts = attempt
            if attempt > 1:
                engine.retries += 1
            engine.tool_calls += 1
            call = ToolCall(a.id, a.tool or "", a.parameters, a.timeout_ms, attempt, engine.session_id)
            try:
                res.output = await engine.executor.execute(call)
            except ToolError as e:
                res.error = e.message
                if e.terminal:
                    # The client says no retry can help: abort and roll the
                    # proposal back whatever failure_behavior says, and halt
                    # the session (see ProposalMethods).
                    self.halted = {"action_id": a.id, "reason": e.message}
                    break
                if e.kind == "disconnected":
                    break
                continue
            res.status, res.error = "succeeded", None
            return
        res.status = "failed"
