"""
``session.auth``: the token gate, the host role and agent binding.

Behaviour follows the real client: a wrong token answers ``-32603``
"auth failed: token mismatch" and leaves the connection open and
unauthenticated, so the client may retry once its token file changes;
after ``max_auth_failures`` wrong tokens the connection is closed.  With
auth disabled any daemon token is accepted (``auth_enabled: false``), but
a host token or an agent binding is always checked.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import attrs
from twisted.logger import Logger
from zope.interface import implementer

from car_twisted.auth import tokens_equal
from car_twisted.errors import AuthFailed, Forbidden, InvalidParams, RpcError
from car_twisted.interfaces import IAgentIdentities, IMethodProvider
from car_twisted.json_value import JsonValue
from car_twisted.methods.tools import tool_definitions
from car_twisted.proposal.rules import parse_policy
from car_twisted.rpc.params import parse_params
from car_twisted.rpc.registry import MethodSpec
from car_twisted.runtime import SessionRuntime, runtime_of
from car_twisted.session import ROLE_HOST, ClientSession

if TYPE_CHECKING:
    from car_twisted.state import ServerState

__all__ = ["SessionMethods", "AuthParams", "MAX_NAMESPACE_LEN"]

MAX_NAMESPACE_LEN = 256
MAX_AGENT_ID_LEN = 128


@attrs.frozen
class AuthParams:
    token: str | None = attrs.field(default=None, metadata={"max_len": 1024}, repr=False)
    host_token: str | None = attrs.field(default=None, metadata={"max_len": 1024}, repr=False)
    agent_id: str | None = attrs.field(default=None, metadata={"max_len": MAX_AGENT_ID_LEN})
    memory_namespace: str | None = attrs.field(
        default=None, metadata={"max_len": MAX_NAMESPACE_LEN}
    )


@attrs.frozen
class InitParams:
    tools: list[JsonValue] = attrs.field(factory=list, metadata={"max_len": 1024})
    policies: list[JsonValue] | None = attrs.field(default=None, metadata={"max_len": 1024})


@attrs.frozen
class ClearHaltParams:
    session_id: str | None = attrs.field(default=None, metadata={"max_len": 256})


@attrs.frozen
class PolicySessionParams:
    session_id: str = attrs.field(metadata={"max_len": 256})


@implementer(IMethodProvider)
class SessionMethods:
    _log = Logger()

    def __init__(self, state: ServerState) -> None:
        self.state = state

    def methods(self) -> Iterable[MethodSpec]:
        return (
            MethodSpec(
                "session.auth",
                self.auth,
                params=AuthParams,
                parse_at_edge=False,
                requires_auth=False,
                description="Authenticate this connection (token, host_token or agent_id + token).",
            ),
            MethodSpec("session.init", self.init, params=InitParams, description="Register tools and policies in one batch."),
            MethodSpec("session.policy.open", self.policy_open, description="Open a policy-scoping session."),
            MethodSpec(
                "session.policy.close",
                self.policy_close,
                params=PolicySessionParams,
                description="Close a policy session and drop its policies.",
            ),
            MethodSpec(
                "session.clear_halt",
                self.clear_halt,
                params=ClearHaltParams,
                description="Host only: let halted sessions submit proposals again.",
            ),
        )

    def clear_halt(self, session: ClientSession, p: ClearHaltParams) -> dict[str, object]:
        """A terminal tool error halts a session; a host lets it go on."""
        if not session.is_host:
            raise Forbidden("session.clear_halt needs the host role (session.auth with the host token)")
        cleared = []
        for other in self.state.sessions.values():
            runtime = other.existing_feature(SessionRuntime)
            if runtime is None or runtime.halted is None:
                continue
            if p.session_id in (None, other.client_id, runtime.session_id):
                runtime.halted = None
                cleared.append(other.client_id)
        return {"cleared": len(cleared), "client_ids": cleared}

    def init(self, session: ClientSession, p: InitParams) -> dict[str, object]:
        schemas = tool_definitions(p.tools, "tools")
        policies = []
        for i, raw in enumerate(p.policies or ()):
            try:
                policies.append(parse_policy(raw))
            except InvalidParams as e:
                raise InvalidParams(f"policies[{i}].{e.field}", e.problem) from None
        runtime = runtime_of(session)
        for schema in schemas:
            runtime.register_tool(schema)
        for policy in policies:
            runtime.add_policy(policy, None)
        return {
            "session_id": runtime.session_id,
            "tools_registered": len(schemas),
            "policies_registered": len(policies),
        }

    def policy_open(self, session: ClientSession, params: JsonValue) -> dict[str, str]:
        return {"session_id": runtime_of(session).open_policy_session()}

    def policy_close(self, session: ClientSession, p: PolicySessionParams) -> dict[str, bool]:
        return {"closed": runtime_of(session).close_policy_session(p.session_id)}

    def auth(self, session: ClientSession, raw: JsonValue) -> dict[str, object]:
        try:
            # Parsed here rather than at the edge so that a malformed
            # session.auth (a token of the wrong type, say) counts toward
            # the wrong tokens a connection may send.
            p = parse_params(AuthParams, raw)
            if p.memory_namespace is not None and not p.memory_namespace:
                raise InvalidParams("memory_namespace", "must not be empty")
            result = self._authenticate(session, p)
        except (AuthFailed, InvalidParams):
            if not session.authenticated:
                self.state.auth_failed(session)
            raise
        if not self.state.admit_authenticated(session, agent=session.agent_id is not None):
            limit = self.state.config.max_connections
            self.state.clock.callLater(0, session.disconnect, 1013, "server busy")
            raise RpcError(
                f"server busy: {limit} authenticated connections are open",
                data={"reason": "connections", "limit": limit},
            )
        session.authenticated = True
        if p.memory_namespace is not None:
            session.memory_namespace = p.memory_namespace
            result["memory_namespace"] = p.memory_namespace
        self._log.info(
            "client {client_id} authenticated (role={role}, agent={agent_id})",
            client_id=session.client_id,
            role=session.role,
            agent_id=session.agent_id,
        )
        return result

    def _authenticate(self, session: ClientSession, p: AuthParams) -> dict[str, object]:
        state = self.state
        enabled = state.auth_enabled
        if p.host_token is not None:
            if p.token is not None or p.agent_id is not None:
                raise InvalidParams("host_token", "give either host_token or token, not both")
            if not tokens_equal(p.host_token, state.host_token):
                raise AuthFailed()
            session.role = ROLE_HOST
            return {"ok": True, "auth_enabled": enabled, "role": ROLE_HOST}
        if p.agent_id is not None:
            return self._bind_agent(session, p)
        if not enabled:
            session.operator = True
            return {"ok": True, "auth_enabled": False}
        if p.token is None:
            raise InvalidParams("token", "required")
        if not tokens_equal(p.token, state.auth_token):
            raise AuthFailed()
        session.operator = True
        return {"ok": True, "auth_enabled": True}

    def _bind_agent(self, session: ClientSession, p: AuthParams) -> dict[str, object]:
        agent_id = p.agent_id
        assert agent_id is not None
        if not agent_id:
            raise InvalidParams("agent_id", "must not be empty")
        if p.token is None:
            raise InvalidParams("token", "required with agent_id (the agent's own token)")
        identities = IAgentIdentities(self.state.agent_identities)
        if session.agent_id is not None and session.agent_id != agent_id:
            raise AuthFailed(f"connection is already bound to agent '{session.agent_id}'")
        if not identities.verify(agent_id, p.token):
            raise AuthFailed()
        if session.agent_id is None:
            identities.attach(agent_id, session)
            session.agent_id = agent_id
            session.on_close(lambda: identities.detach(agent_id, session))
        return {"ok": True, "auth_enabled": self.state.auth_enabled, "agent_id": agent_id}
