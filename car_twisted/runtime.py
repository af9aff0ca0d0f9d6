"""
Per-connection runtime state: registered tools, policies (global and per
policy session), and the key-value state store.

As in the reference daemon, each WebSocket connection is its own session:
none of this survives a disconnect.  Every collection is bounded, the
state store in bytes as well as keys.
"""

from __future__ import annotations

import collections
import secrets
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import orjson
from zope.interface import implementer

from car_twisted.budget import ByteBudget
from car_twisted.errors import InvalidParams, RpcError
from car_twisted.interfaces import ISessionFeature
from car_twisted.json_value import JsonValue
from car_twisted.proposal.ir import ActionResult, ToolSchema
from car_twisted.proposal.rules import PolicyDefinition
from car_twisted.rpc.envelope import dumps

if TYPE_CHECKING:
    from car_twisted.session import ClientSession

__all__ = ["SessionRuntime", "KeyValueStore", "KeyValueView", "DEFAULT_STATE_BYTES", "runtime_of"]

MAX_TOOLS = 1024
MAX_POLICIES = 1024
MAX_POLICY_SESSIONS = 256
MAX_STATE_KEYS = 100_000
MAX_KEY_LEN = 1024
DEFAULT_STATE_BYTES = 16 * 1024 * 1024
MAX_RECENT_TROUBLES = 256
# What one stored key costs beyond its key and value bytes (dict slot,
# the bytes object's header): counted so a flood of empty values is bounded.
_ENTRY_OVERHEAD = 96

_MISSING = object()


class KeyValueStore:
    """
    The state map: one table per tenant (``None`` for unscoped calls), so
    no key of one can name a key of another, whatever characters it holds.

    Values are kept JSON-encoded: the budget then counts what the memory
    really holds, ``state.get`` splices the stored bytes into its reply
    without re-encoding, and readers inside the daemon decode on read.
    """

    def __init__(self, budget: ByteBudget | None = None, max_keys: int = MAX_STATE_KEYS) -> None:
        self._tables: dict[str | None, dict[str, bytes]] = {}
        self._keys = 0
        self.max_keys = max_keys
        self.budget = budget if budget is not None else ByteBudget("connection state", DEFAULT_STATE_BYTES)

    def view(self, tenant_id: str | None) -> KeyValueView:
        return KeyValueView(self, tenant_id or None)

    def __len__(self) -> int:
        return self._keys

    def clear(self) -> None:
        """Drop everything and give the bytes back (the connection is gone)."""
        for table in self._tables.values():
            for key, encoded in table.items():
                self.budget.release(_cost(key, encoded))
        self._tables.clear()
        self._keys = 0

    # -- one tenant's table ----------------------------------------------------

    def _get(self, tenant: str | None, key: str) -> bytes | None:
        table = self._tables.get(tenant)
        return None if table is None else table.get(key)

    def _put(self, tenant: str | None, key: str, encoded: bytes) -> None:
        table = self._tables.setdefault(tenant, {})
        old = table.get(key)
        if old is None and self._keys >= self.max_keys:
            raise RpcError(
                f"state is full: at most {self.max_keys} keys per session",
                data={"reason": "state_keys", "limit": self.max_keys},
            )
        grow = _cost(key, encoded) - (_cost(key, old) if old is not None else 0)
        if grow > 0:
            self.budget.reserve(grow)
        else:
            self.budget.release(-grow)
        if old is None:
            self._keys += 1
        table[key] = encoded

    def _pop(self, tenant: str | None, key: str) -> None:
        table = self._tables.get(tenant)
        if table is None:
            return
        old = table.pop(key, None)
        if old is not None:
            self._keys -= 1
            self.budget.release(_cost(key, old))
            if not table:
                del self._tables[tenant]

    def _table(self, tenant: str | None) -> dict[str, bytes]:
        return self._tables.get(tenant, {})


def _cost(key: str, encoded: bytes) -> int:
    return len(key) + len(encoded) + _ENTRY_OVERHEAD


def _check_key(key: str) -> str:
    if len(key) > MAX_KEY_LEN:
        raise InvalidParams("key", f"at most {MAX_KEY_LEN} characters")
    return key


class KeyValueView:
    """
    One tenant's (or the unscoped) table of a ``KeyValueStore``, as a
    mapping of decoded values for the proposal engine, plus the encoded
    forms ``state.*`` answers with.
    """

    def __init__(self, store: KeyValueStore, tenant: str | None) -> None:
        self._store = store
        self._tenant = tenant

    def __getitem__(self, key: str) -> JsonValue:
        encoded = self._store._get(self._tenant, _check_key(key))
        if encoded is None:
            raise KeyError(key)
        value: JsonValue = orjson.loads(encoded)
        return value

    def __contains__(self, key: object) -> bool:
        return type(key) is str and self._store._get(self._tenant, _check_key(key)) is not None

    def get(self, key: str, default: JsonValue = None) -> JsonValue:
        encoded = self._store._get(self._tenant, _check_key(key))
        if encoded is None:
            return default
        value: JsonValue = orjson.loads(encoded)
        return value

    def get_encoded(self, key: str) -> bytes | None:
        """The stored JSON of C{key}, or None."""
        return self._store._get(self._tenant, _check_key(key))

    def set(self, key: str, value: JsonValue) -> None:
        """
        @raise car_twisted.budget.BudgetExceeded: the value does not fit
            the connection's (or the daemon's) state budget.
        """
        self._store._put(self._tenant, _check_key(key), dumps(value))

    def delete(self, key: str) -> None:
        self._store._pop(self._tenant, _check_key(key))

    def keys(self) -> list[str]:
        return list(self._store._table(self._tenant))

    def encoded_items(self) -> list[tuple[str, bytes]]:
        return list(self._store._table(self._tenant).items())

    def snapshot(self) -> dict[str, JsonValue]:
        return {key: orjson.loads(encoded) for key, encoded in self.encoded_items()}

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())


@implementer(ISessionFeature)
class SessionRuntime:
    """
    What ``tools.*``, ``policy.*``, ``state.*`` and proposals work on: one
    connection's feature (``runtime_of(session)``).
    """

    def __init__(self, state_budget: ByteBudget | None = None) -> None:
        self.session_id = f"sess-{secrets.token_hex(6)}"
        self.tools: dict[str, ToolSchema] = {}
        self.global_policies: list[PolicyDefinition] = []
        self.policy_sessions: dict[str, list[PolicyDefinition]] = {}
        self.keyvalue = KeyValueStore(state_budget)
        # Set by a terminal tool error: later proposals are refused until a
        # host clears it (session.clear_halt) or the client reconnects.
        self.halted: dict[str, str] | None = None
        # The latest proposals' failed and retried actions, newest last
        # (what memory.maintain mines); bounded.
        self.recent_troubles: collections.deque[dict[str, JsonValue]] = collections.deque(maxlen=MAX_RECENT_TROUBLES)

    def note_troubles(self, proposal_id: str, results: Iterable[ActionResult], tools: dict[str, str]) -> None:
        """Keep the failed and retried actions of a finished proposal."""
        for res in results:
            if res.status == "failed" or res.attempts > 1:
                self.recent_troubles.append(
                    {
                        "kind": "action_failed" if res.status == "failed" else "action_retried",
                        "proposal_id": proposal_id,
                        "action_id": res.action_id,
                        "tool": tools.get(res.action_id, ""),
                        "error": (res.error or "")[:2048],
                        "attempts": res.attempts,
                    }
                )

    def holds_client_state(self) -> bool:
        """True once the client registered something a reconnect would lose."""
        return bool(self.tools or self.global_policies or self.policy_sessions or len(self.keyvalue))

    def close(self) -> None:
        """The connection is gone: give its state bytes back."""
        self.keyvalue.clear()

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


def runtime_of(session: ClientSession) -> SessionRuntime:
    """C{session}'s runtime, made on first use on the connection's own byte budget."""
    return session.feature(SessionRuntime, _new_runtime)


def _new_runtime(session: ClientSession) -> SessionRuntime:
    server = session.state
    budget = ByteBudget("connection state", server.config.max_state_bytes, parent=server.state_budget)
    return SessionRuntime(budget)


def scope_label(session_id: str | None) -> str | dict[str, str]:
    return "global" if session_id is None else {"session_id": session_id}
