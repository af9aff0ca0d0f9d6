"""
The Agent IR as frozen attrs types, parsed from the wire.

``parse_proposal`` and ``parse_tool_schema`` check a JSON value field by
field and raise ``InvalidParams`` with the full path of the first field
that does not fit (``proposal.actions[2].tool``).  Unknown fields are
ignored, as the IR's stability rules ask; a dependency on an action id the
proposal does not contain is not a field we can ignore, so it is refused.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Concatenate, ParamSpec, TypeVar

import attrs

from car_twisted.errors import InvalidParams
from car_twisted.json_value import JsonValue

__all__ = [
    "ActionProposal",
    "Action",
    "Precondition",
    "ToolSchema",
    "ToolCall",
    "ToolError",
    "ActionResult",
    "ProposalResult",
    "parse_proposal",
    "parse_tool_schema",
    "ACTION_TYPES",
    "FAILURE_BEHAVIORS",
    "OPERATORS",
    "MAX_ACTIONS",
    "DEFAULT_MAX_RETRIES",
]

ACTION_TYPES = frozenset({"tool_call", "state_write", "state_read", "assertion"})
FAILURE_BEHAVIORS = frozenset({"abort", "retry", "skip"})
OPERATORS = frozenset({"eq", "neq", "gt", "lt", "gte", "lte", "exists", "not_exists", "contains"})
INVOCATION_MODES = frozenset({"one_shot", "streaming", "long_running"})
MAX_ACTIONS = 1000
MAX_RETRIES_CAP = 100
DEFAULT_MAX_RETRIES = 3
MAX_NAME_LEN = 256
MAX_TIMEOUT_MS = 7 * 24 * 3600 * 1000

#: A JSON object from the wire.
JsonObject = dict[str, JsonValue]
P = ParamSpec("P")
T = TypeVar("T")


# -- field checks --------------------------------------------------------------


def _obj(value: JsonValue, path: str) -> JsonObject:
    if type(value) is not dict:
        raise InvalidParams(path, "expected an object")
    return value


def _str(value: JsonValue, path: str, max_len: int = MAX_NAME_LEN, empty: bool = False) -> str:
    if type(value) is not str:
        raise InvalidParams(path, "expected a string")
    if not empty and not value:
        raise InvalidParams(path, "must not be empty")
    if len(value) > max_len:
        raise InvalidParams(path, f"at most {max_len} characters")
    return value


def _opt(
    raw: JsonObject,
    key: str,
    path: str,
    check: Callable[Concatenate[JsonValue, str, P], T],
    *args: P.args,
    **kwargs: P.kwargs,
) -> T | None:
    value = raw.get(key)
    return None if value is None else check(value, f"{path}.{key}", *args, **kwargs)


def _uint(value: JsonValue, path: str, maximum: int) -> int:
    if type(value) is float and value.is_integer():
        value = int(value)
    if type(value) is not int or value < 0:
        raise InvalidParams(path, "expected a non-negative integer")
    if value > maximum:
        raise InvalidParams(path, f"at most {maximum}")
    return value


def _bool(value: JsonValue, path: str) -> bool:
    if type(value) is not bool:
        raise InvalidParams(path, "expected a boolean")
    return value


def _str_list(value: JsonValue, path: str) -> tuple[str, ...]:
    if type(value) is not list:
        raise InvalidParams(path, "expected an array of strings")
    if len(value) > MAX_ACTIONS:
        raise InvalidParams(path, f"at most {MAX_ACTIONS} entries")
    return tuple(_str(v, f"{path}[{i}]", 1024) for i, v in enumerate(value))


def _enum(value: JsonValue, path: str, allowed: frozenset[str]) -> str:
    if value not in allowed or type(value) is not str:
        raise InvalidParams(path, "expected one of " + ", ".join(sorted(allowed)))
    return value


# -- types -------------------------------------------------------------------------


@attrs.frozen
class Precondition:
    key: str
    operator: str = "eq"
    value: JsonValue = None
    description: str = ""

    @classmethod
    def parse(cls, raw: JsonValue, path: str) -> Precondition:
        raw = _obj(raw, path)
        key = _str(raw.get("key"), f"{path}.key", 1024) if "key" in raw else None
        if key is None:
            raise InvalidParams(f"{path}.key", "required")
        return cls(
            key=key,
            operator=_opt(raw, "operator", path, _enum, OPERATORS) or "eq",
            value=raw.get("value"),
            description=_opt(raw, "description", path, _str, 4096, True) or "",
        )

    def describe(self) -> str:
        if self.operator in ("exists", "not_exists"):
            return f"{self.key} {self.operator}"
        return f"{self.key} {self.operator} {self.value!r}"[:300]


@attrs.frozen
class Action:
    id: str
    type: str
    tool: str | None = None
    parameters: JsonObject = attrs.field(factory=dict)
    preconditions: tuple[Precondition, ...] = ()
    expected_effects: JsonObject = attrs.field(factory=dict)
    state_dependencies: tuple[str, ...] = ()
    dependencies: tuple[str, ...] = ()
    invocation_mode: str = "one_shot"
    idempotent: bool = False
    max_retries: int = DEFAULT_MAX_RETRIES
    failure_behavior: str = "abort"
    timeout_ms: int | None = None

    @classmethod
    def parse(cls, raw: JsonValue, path: str, index: int) -> Action:
        raw = _obj(raw, path)
        if "type" not in raw:
            raise InvalidParams(f"{path}.type", "required")
        kind = _enum(raw["type"], f"{path}.type", ACTION_TYPES)
        tool = _opt(raw, "tool", path, _str)
        if kind == "tool_call" and tool is None:
            raise InvalidParams(f"{path}.tool", "required when type is tool_call")
        pre = raw.get("preconditions")
        if pre is not None and type(pre) is not list:
            raise InvalidParams(f"{path}.preconditions", "expected an array")
        params = _opt(raw, "parameters", path, _obj) or {}
        if kind in ("state_write", "state_read"):
            if "key" not in params:
                raise InvalidParams(f"{path}.parameters.key", f"required for {kind}")
            _str(params["key"], f"{path}.parameters.key", 1024)
        elif kind == "assertion":
            if "key" in params:
                Precondition.parse(params, f"{path}.parameters")
            elif not pre:
                raise InvalidParams(f"{path}.parameters.key", "an assertion needs parameters.key or preconditions")
        return cls(
            id=_opt(raw, "id", path, _str) or f"action-{index}",
            type=kind,
            tool=tool,
            parameters=params,
            preconditions=tuple(
                Precondition.parse(p, f"{path}.preconditions[{i}]") for i, p in enumerate(pre or ())
            ),
            expected_effects=_opt(raw, "expected_effects", path, _obj) or {},
            state_dependencies=_opt(raw, "state_dependencies", path, _str_list) or (),
            dependencies=_opt(raw, "dependencies", path, _str_list) or (),
            invocation_mode=_opt(raw, "invocation_mode", path, _enum, INVOCATION_MODES) or "one_shot",
            idempotent=bool(_opt(raw, "idempotent", path, _bool)),
            max_retries=_uint(raw["max_retries"], f"{path}.max_retries", MAX_RETRIES_CAP)
            if raw.get("max_retries") is not None
            else DEFAULT_MAX_RETRIES,
            failure_behavior=_opt(raw, "failure_behavior", path, _enum, FAILURE_BEHAVIORS) or "abort",
            timeout_ms=_opt(raw, "timeout_ms", path, _uint, MAX_TIMEOUT_MS),
        )

    @property
    def attempts(self) -> int:
        """How many times the executor may run this action."""
        return self.max_retries + 1 if self.failure_behavior == "retry" else 1

    def writes(self) -> set[str]:
        """State keys this action writes (declared effects, state_write key)."""
        keys = set(self.expected_effects)
        key = self.parameters.get("key")
        if self.type == "state_write" and type(key) is str:
            keys.add(key)
        return keys


@attrs.frozen
class ActionProposal:
    id: str
    source: str
    actions: tuple[Action, ...]
    context: JsonObject = attrs.field(factory=dict)


def parse_proposal(raw: JsonValue, path: str = "proposal") -> ActionProposal:
    """
    @raise InvalidParams: naming the first field that does not fit.
    """
    raw = _obj(raw, path)
    actions = raw.get("actions")
    if actions is None:
        raise InvalidParams(f"{path}.actions", "required")
    if type(actions) is not list:
        raise InvalidParams(f"{path}.actions", "expected an array")
    if len(actions) > MAX_ACTIONS:
        raise InvalidParams(f"{path}.actions", f"at most {MAX_ACTIONS} actions")
    parsed = tuple(Action.parse(a, f"{path}.actions[{i}]", i) for i, a in enumerate(actions))
    seen: set[str] = set()
    for i, action in enumerate(parsed):
        if action.id in seen:
            raise InvalidParams(f"{path}.actions[{i}].id", f"duplicate action id {action.id!r}")
        seen.add(action.id)
    for i, action in enumerate(parsed):
        for j, dep in enumerate(action.dependencies):
            if dep not in seen:
                raise InvalidParams(f"{path}.actions[{i}].dependencies[{j}]", f"unknown action id {dep!r}")
    return ActionProposal(
        id=_opt(raw, "id", path, _str) or secrets.token_hex(6),
        source=_opt(raw, "source", path, _str, 1024, True) or "unknown",
        actions=parsed,
        context=_opt(raw, "context", path, _obj) or {},
    )


@attrs.frozen
class ToolSchema:
    name: str
    description: str = ""
    parameters: JsonObject = attrs.field(factory=dict)
    returns: JsonObject | None = None
    idempotent: bool = False
    cache_ttl_secs: int | None = None
    rate_limit: JsonObject | None = None

    def to_wire(self) -> JsonObject:
        out: JsonObject = {
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters,
            "idempotent": self.idempotent,
        }
        if self.returns is not None:
            out["returns"] = self.returns
        if self.cache_ttl_secs is not None:
            out["cache_ttl_secs"] = self.cache_ttl_secs
        if self.rate_limit is not None:
            out["rate_limit"] = self.rate_limit
        return out


def parse_tool_schema(raw: JsonValue, path: str) -> ToolSchema:
    raw = _obj(raw, path)
    if "name" not in raw:
        raise InvalidParams(f"{path}.name", "required")
    rate = _opt(raw, "rate_limit", path, _obj)
    if rate is not None:
        _uint(rate.get("max_calls"), f"{path}.rate_limit.max_calls", 2**32)
        interval = rate.get("interval_secs")
        if (type(interval) is not int and type(interval) is not float) or interval <= 0:
            raise InvalidParams(f"{path}.rate_limit.interval_secs", "expected a positive number")
    return ToolSchema(
        name=_str(raw["name"], f"{path}.name"),
        description=_opt(raw, "description", path, _str, 16384, True) or "",
        parameters=_opt(raw, "parameters", path, _obj) or {},
        returns=_opt(raw, "returns", path, _obj),
        idempotent=bool(_opt(raw, "idempotent", path, _bool)),
        cache_ttl_secs=_opt(raw, "cache_ttl_secs", path, _uint, 2**32),
        rate_limit=rate,
    )


# -- execution -----------------------------------------------------------------------


@attrs.frozen
class ToolCall:
    """One attempt at a tool call, as the executor sees it."""

    action_id: str
    tool: str
    parameters: JsonObject
    timeout_ms: int | None
    attempt: int = 1
    session_id: str | None = None


class ToolError(Exception):
    """
    A tool call that did not produce output.

    @ivar terminal: the client said retrying is pointless.
    @ivar kind: ``failed``, ``timeout``, ``unknown_tool``, ``disconnected``
        or ``unsupported``.
    """

    def __init__(self, message: str, kind: str = "failed", terminal: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.terminal = terminal


@attrs.define
class ActionResult:
    action_id: str
    status: str
    output: JsonValue = None
    error: str | None = None
    state_changes: JsonObject = attrs.field(factory=dict)
    duration_ms: float = 0.0
    timestamp: str = ""
    attempts: int = 0

    def to_wire(self) -> JsonObject:
        return {
            "action_id": self.action_id,
            "status": self.status,
            "output": self.output,
            "error": self.error,
            "state_changes": self.state_changes,
            "duration_ms": self.duration_ms,
            "timestamp": self.timestamp,
            "attempts": self.attempts,
        }


@attrs.frozen
class ProposalResult:
    """
    @ivar halted: set when a terminal tool error aborted the proposal:
        ``{action_id, reason}``; its state writes were rolled back.
    """

    proposal_id: str
    results: tuple[ActionResult, ...]
    cost: dict[str, float]
    halted: dict[str, str] | None = None

    def to_wire(self) -> dict[str, object]:
        out: dict[str, object] = {
            "proposal_id": self.proposal_id,
            "results": [r.to_wire() for r in self.results],
            "cost": self.cost,
        }
        if self.halted is not None:
            out["halted"] = self.halted
        return out
