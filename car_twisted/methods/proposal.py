"""
``proposal.submit``: run an Agent IR proposal through the engine.

Its handler deadline is derived from the proposal's own budgets, so an
in-budget proposal is never cut off: the sum over actions of
``timeout_ms`` (else the daemon's tool budget) times the attempts the
engine may make, plus a 15 s transport grace, and never less than the
daemon's default handler deadline.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import attrs
from twisted.internet.defer import Deferred, ensureDeferred
from zope.interface import implementer

from car_twisted.errors import InvalidParams, RpcError
from car_twisted.interfaces import IMethodProvider, IToolExecutor
from car_twisted.json_value import JsonValue
from car_twisted.proposal.engine import ProposalEngine
from car_twisted.proposal.ir import DEFAULT_MAX_RETRIES, JsonObject, ProposalResult, parse_proposal
from car_twisted.rpc.registry import MethodSpec
from car_twisted.runtime import runtime_of
from car_twisted.session import ClientSession

if TYPE_CHECKING:
    from car_twisted.state import ServerState

__all__ = ["ProposalMethods", "PROPOSAL_DEADLINE_GRACE_SECS"]

PROPOSAL_DEADLINE_GRACE_SECS = 15.0


@attrs.frozen
class SubmitParams:
    proposal: JsonObject
    session_id: str | None = attrs.field(default=None, metadata={"max_len": 256})
    scope: JsonObject | None = None


def _budget_ms(action: JsonValue, default_ms: int) -> float:
    if type(action) is not dict:
        return 0.0
    timeout = action.get("timeout_ms")
    budget = timeout if type(timeout) is int and timeout >= 0 else default_ms
    attempts = 1
    if action.get("failure_behavior") == "retry":
        retries = action.get("max_retries")
        attempts = 1 + (retries if type(retries) is int and 0 <= retries <= 100 else DEFAULT_MAX_RETRIES)
    return float(budget) * attempts


@implementer(IMethodProvider)
class ProposalMethods:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    def methods(self) -> Iterable[MethodSpec]:
        return (
            MethodSpec(
                "proposal.submit",
                self.submit,
                params=SubmitParams,
                deadline=self.deadline,
                description="Validate and execute an ActionProposal; tool calls go back to the client.",
            ),
        )

    def deadline(self, p: SubmitParams) -> float:
        config = self.state.config
        actions = p.proposal.get("actions")
        if type(actions) is not list:
            return config.handler_timeout
        total_ms = sum(_budget_ms(a, config.tool_timeout_ms) for a in actions[:1000])
        return max(config.handler_timeout, total_ms / 1000.0 + PROPOSAL_DEADLINE_GRACE_SECS)

    def submit(self, session: ClientSession, p: SubmitParams) -> Deferred[ProposalResult]:
        proposal = parse_proposal(p.proposal)
        runtime = runtime_of(session)
        if runtime.halted is not None:
            raise RpcError(
                f"session halted: a terminal tool error in action '{runtime.halted['action_id']}' "
                f"({runtime.halted['reason']}); reconnect, or have a host call session.clear_halt",
                data={"halted": runtime.halted},
            )
        tenant = None
        if p.scope is not None:
            named = p.scope.get("tenantId", p.scope.get("tenant_id"))
            if named is not None:
                if type(named) is not str or len(named) > 256:
                    raise InvalidParams("scope.tenantId", "expected a string")
                tenant = named
        policies = runtime.policies_in_force(p.session_id)
        engine = ProposalEngine(
            clock=self.state.clock,
            executor=session.component(IToolExecutor),
            state=runtime.keyvalue.view(tenant or None),
            tools=runtime.tools,
            policies=policies,
            session_id=p.session_id,
        )
        def finish(result: ProposalResult) -> ProposalResult | Deferred[ProposalResult]:
            if result.halted is not None:
                runtime.halted = result.halted
            runtime.note_troubles(result.proposal_id, result.results, {a.id: a.tool or a.type for a in proposal.actions})
            # Record into the session's current run before answering, so
            # the trace is complete by the time the client sees the result.
            # Without a run there is nothing to wait for.
            runs = self.state.runs
            if runs.current_run(session) is None:
                return result
            d = ensureDeferred(runs.record_proposal(session, proposal, result))
            return d.addCallback(lambda _: result)

        return engine.run(proposal).addCallback(finish)
