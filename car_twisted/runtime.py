"""
Per-connection runtime state: registered tools, policies (global and per
policy session), and the key-value state store.

As in the reference daemon, each WebSocket connection is its own session:
none of this survives a disconnect.  Every collection is bounded.
"""

from __future__ import annotations

import secrets
from typing import Any, Iterator

from car_twisted.errors import InvalidParams, RpcError
from car_twisted.proposal.ir import ToolSchema
from car_twisted.proposal.rules import PolicyDefinition

__all__ = ["SessionRuntime", "StateStore", "TENANT_PREFIX"]

TENANT_PREFIX = "tenant:"
MAX_TOOLS = 1024
MAX_POLICIES = 1024
MAX_POLICY_SESSIONS = 256
MAX_STATE_KEYS = 100_000
MAX_KEY_LEN = 1024


class StateStore:
    """
    The state map, with per-tenant views: a tenant's keys are stored under
    ``tenant:<id>:`` and are invisible to other tenants and to unscoped
    callers (and the other way round).
    """

    def __init__(self, max_keys: int = MAX_STATE_KEYS) -> None:
        self._data: dict[str, Any] = {}
        self.max_keys = max_keys

    def view(self, tenant_id: str | None) -> "StateView":
        return StateView(self, f"{TENANT_PREFIX}{tenant_id}:" if tenant_id else None)


class StateView:
    """One tenant's (or the unscoped) slice of a ``StateStore``; a mapping."""

    def __init__(self, store: StateStore, prefix: str | None) -> None:
        self._store = store
        self._prefix = prefix

    def _full(self, key: str) -> str:
        if len(key) > MAX_KEY_LEN:
            raise InvalidParams("key", f"at most {MAX_KEY_LEN} characters")
        if self._prefix is None:
            return key
        return self._prefix + key

    def _mine(self, full: str) -> str | None:
        if self._prefix is None:
            return None if full.startswith(TENANT_PREFIX) else full
        return full[len(self._prefix) :] if full.startswith(self._prefix) else None

    def __getitem__(self, key: str) -> Any:
        return self._store._data[self._full(key)]

    def __contains__(self, key: object) -> bool:
        return type(key) is str and self._full(key) in self._store._data

    def get(self, key: str, default: Any = None) -> Any:
        return self._store._data.get(self._full(key), default)

    def set(self, key: str, value: Any) -> None:
        full = self._full(key)
        data = self._store._data
        if full not in data and len(data) >= self._store.max_keys:
            raise RpcError(f"state is full: at most {self._store.max_keys} keys per session")
        data[full] = value

    def delete(self, key: str) -> None:
        self._store._data.pop(self._full(key), None)

    def keys(self) -> list[str]:
        return [k for k in (self._mine(f) for f in self._store._data) if k is not None]

    def snapshot(self) -> dict[str, Any]:
        out = {}
        for full, value in self._store._data.items():
            key = self._mine(full)
            if key is not None:
                out[key] = value
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())


class SessionRuntime:
    """What ``tools.*``, ``policy.*``, ``state.*`` and proposals work on."""

    def __init__(self) -> None:
        self.session_id = f"sess-{secrets.token_hex(6)}"
        self.tools: dict[str, ToolSchema] = {}
        self.global_policies: list[PolicyDefinition] = []
        self.policy_sessions: dict[str, list[PolicyDefinition]] = {}
        self.state = StateStore()
        # Set by a terminal tool error: later proposals are refused until a
        # host clears it (session.clear_halt) or the client reconnects.
        self.halted: dict[str, str] | None = None

    # -- tools -------------------------------------------------------------------

    def register_tool(self, schema: ToolSchema) -> None:
        if schema.name not in self.tools and len(self.tools) >= MAX_TOOLS:
            raise RpcError(f"too many tools: at most {MAX_TOOLS} per session")
        self.tools[schema.name] = schema

    def unregister_tool(self, name: str) -> int:
        return 1 if self.tools.pop(name, None) is not None else 0

    def list_tools(self) -> list[ToolSchema]:
        return [self.tools[name] for name in sorted(self.tools)]

    # -- policies ----------------------------------------------------------------

    def policy_list(self, session_id: str | None) -> list[PolicyDefinition]:
        if session_id is None:
            return self.global_policies
        try:
            return self.policy_sessions[session_id]
        except KeyError:
            raise InvalidParams("session_id", f"no open policy session {session_id!r}") from None

    def policies_in_force(self, session_id: str | None) -> list[PolicyDefinition]:
        if session_id is None:
            return list(self.global_policies)
        return self.global_policies + self.policy_list(session_id)

    def add_policy(self, policy: PolicyDefinition, session_id: str | None) -> None:
        target = self.policy_list(session_id)
        if len(target) >= MAX_POLICIES:
            raise RpcError(f"too many policies: at most {MAX_POLICIES} per scope")
        target.append(policy)

    def remove_policies(self, name: str, session_id: str | None) -> int:
        target = self.policy_list(session_id)
        kept = [p for p in target if p.name != name]
        removed = len(target) - len(kept)
        target[:] = kept
        return removed

    def open_policy_session(self) -> str:
        if len(self.policy_sessions) >= MAX_POLICY_SESSIONS:
            raise RpcError(f"too many policy sessions: at most {MAX_POLICY_SESSIONS} per connection")
        session_id = f"psess-{secrets.token_hex(8)}"
        self.policy_sessions[session_id] = []
        return session_id

    def close_policy_session(self, session_id: str) -> bool:
        return self.policy_sessions.pop(session_id, None) is not None


def scope_label(session_id: str | None) -> Any:
    return "global" if session_id is None else {"session_id": session_id}
