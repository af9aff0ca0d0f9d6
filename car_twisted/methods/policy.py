"""``policy.register`` / ``unregister`` / ``list``, global or per policy session."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import attrs
from zope.interface import implementer

from car_twisted.errors import InvalidParams
from car_twisted.interfaces import IMethodProvider
from car_twisted.json_value import JsonValue
from car_twisted.proposal.rules import parse_policy
from car_twisted.rpc.registry import MethodSpec
from car_twisted.runtime import runtime_of, scope_label
from car_twisted.session import ClientSession

if TYPE_CHECKING:
    from car_twisted.state import ServerState

__all__ = ["PolicyMethods"]


@attrs.frozen
class UnregisterParams:
    name: str = attrs.field(metadata={"max_len": 1024})
    session_id: str | None = attrs.field(default=None, metadata={"max_len": 256})


@attrs.frozen
class ListParams:
    session_id: str | None = attrs.field(default=None, metadata={"max_len": 256})


def _session_id(raw: JsonValue) -> str | None:
    value = raw.get("session_id") if type(raw) is dict else None
    if value is not None and (type(value) is not str or len(value) > 256):
        raise InvalidParams("session_id", "expected a string")
    return value


@implementer(IMethodProvider)
class PolicyMethods:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    def methods(self) -> Iterable[MethodSpec]:
        return (
            MethodSpec("policy.register", self.register, description="Register one policy (deny_tool, deny_tool_param, require_state)."),
            MethodSpec("policy.unregister", self.unregister, params=UnregisterParams, description="Remove every policy under a name."),
            MethodSpec("policy.list", self.list, params=ListParams, description="Policies in force, in registration order."),
        )

    def register(self, session: ClientSession, params: JsonValue) -> dict[str, object]:
        policy = parse_policy(params)
        session_id = _session_id(params)
        runtime_of(session).add_policy(policy, session_id)
        return {"name": policy.name, "registered": policy.name, "scope": scope_label(session_id)}

    def unregister(self, session: ClientSession, p: UnregisterParams) -> dict[str, object]:
        removed = runtime_of(session).remove_policies(p.name, p.session_id)
        return {"unregistered": p.name, "removed": removed, "scope": scope_label(p.session_id)}

    def list(self, session: ClientSession, p: ListParams) -> dict[str, object]:
        policies = [q.to_wire() for q in runtime_of(session).policy_list(p.session_id)]
        return {"policies": policies, "scope": scope_label(p.session_id)}
