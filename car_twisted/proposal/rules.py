"""
Built-in policy rules: ``deny_tool``, ``deny_tool_param``, ``require_state``.

Every action passes every policy in force (global, plus those of the
policy session the proposal names) before it dispatches; the first denial
rejects it with a reason naming the rule but never the offending value.
``deny_tool_param`` scans a parameter's text (strings as they are, other
values as JSON); ``ParamTexts`` serialises each parameter once per
execution however many policies look at it, and ``distinct_static`` and
``param_scans`` let the engine price the scanning before it starts.
``deny_tool_callback`` needs a callback inside the client process and is
refused by this daemon.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Literal, Protocol, overload

import attrs

from car_twisted.errors import InvalidParams
from car_twisted.json_value import JsonValue
from car_twisted.proposal.ir import Action, JsonObject

__all__ = [
    "PolicyDefinition",
    "ParamTexts",
    "StateReader",
    "parse_policy",
    "first_violation",
    "distinct_static",
    "param_scans",
    "SUPPORTED_RULES",
]

SUPPORTED_RULES = ("deny_tool", "deny_tool_param", "require_state")
_MAX = 1024

TextOf = Callable[[Action, str], str]


class StateReader(Protocol):
    """The state a proposal reads (a ``KeyValueView``): decoded values by key."""

    def __contains__(self, key: object) -> bool: ...

    def __getitem__(self, key: str) -> JsonValue: ...

    def get(self, key: str) -> JsonValue: ...


def _param_text(action: Action, key: str) -> str:
    value = action.parameters[key]
    return value if type(value) is str else json.dumps(value)


class ParamTexts:
    """
    The text ``deny_tool_param`` scans for each parameter, keyed by
    (action id, parameter key) and computed on first use, so a parameter
    is serialised once however many policies look at it.
    """

    def __init__(self) -> None:
        self._texts: dict[tuple[str, str], str] = {}

    def __call__(self, action: Action, key: str) -> str:
        text = self._texts.get((action.id, key))
        if text is None:
            text = self._texts[action.id, key] = _param_text(action, key)
        return text


@attrs.frozen
class PolicyDefinition:
    name: str
    rule: str
    target: str | None = None
    key: str | None = None
    pattern: str | None = None
    value: JsonValue = None

    @property
    def description(self) -> str:
        if self.rule == "deny_tool":
            return f"deny tool '{self.target}'"
        if self.rule == "deny_tool_param":
            return f"deny tool '{self.target}' when parameter '{self.key}' contains a denied pattern"
        return f"require state '{self.key}' == {json.dumps(self.value)}"

    def to_wire(self) -> dict[str, str]:
        out: dict[str, str] = {"name": self.name, "description": self.description, "rule": self.rule}
        for field in ("target", "key"):
            if getattr(self, field) is not None:
                out[field] = getattr(self, field)
        return out

    def violation(
        self, action: Action, state: StateReader, text_of: TextOf | None = None
    ) -> str | None:
        """
        The reason this policy denies C{action}, or None.

        @param text_of: where ``deny_tool_param`` gets a parameter's text
            (a ``ParamTexts``); without it the value is serialised here.
        """
        if self.rule == "deny_tool":
            if action.type == "tool_call" and action.tool == self.target:
                return f"deny_tool:{self.target}"
        elif self.rule == "deny_tool_param":
            if action.type == "tool_call" and action.tool == self.target and self.key in action.parameters:
                text = (text_of or _param_text)(action, self.key)
                if self.pattern and self.pattern in text:
                    return f"deny_tool_param:{self.target}.{self.key}"
        elif self.rule == "require_state":
            key = self.key  # parse_policy requires it for this rule
            if key is None or key not in state or state[key] != self.value:
                return f"require_state:{self.key}"
        return None


@overload
def _field(raw: JsonObject, key: str, required: Literal[True]) -> str: ...


@overload
def _field(raw: JsonObject, key: str, required: bool) -> str | None: ...


def _field(raw: JsonObject, key: str, required: bool) -> str | None:
    value = raw.get(key)
    if value is None:
        if required:
            raise InvalidParams(key, f"required for rule '{raw.get('rule')}'")
        return None
    if type(value) is not str or not value or len(value) > _MAX:
        raise InvalidParams(key, f"expected a non-empty string of at most {_MAX} characters")
    return value


def parse_policy(raw: JsonValue) -> PolicyDefinition:
    """
    A policy definition from the wire.  ``value`` may arrive as JSON
    (``value``) or as the client's encoded ``value_json`` string.

    @raise InvalidParams: naming the field.
    """
    if type(raw) is not dict:
        raise InvalidParams("params", "expected a policy object")
    name = _field(raw, "name", True)
    rule = raw.get("rule")
    if type(rule) is not str:
        raise InvalidParams("rule", "required")
    if rule == "deny_tool_callback":
        raise InvalidParams(
            "rule", "deny_tool_callback needs an in-process callback and is not supported by this daemon"
        )
    if rule not in SUPPORTED_RULES:
        raise InvalidParams("rule", "expected one of " + ", ".join(SUPPORTED_RULES))
    value = raw.get("value")
    value_json = raw.get("value_json")
    if value is None and type(value_json) is str:
        try:
            value = json.loads(value_json)
        except ValueError:
            raise InvalidParams("value_json", "not valid JSON") from None
    needs = {
        "deny_tool": ("target",),
        "deny_tool_param": ("target", "key", "pattern"),
        "require_state": ("key",),
    }[rule]
    return PolicyDefinition(
        name=name,
        rule=rule,
        target=_field(raw, "target", "target" in needs),
        key=_field(raw, "key", "key" in needs),
        pattern=_field(raw, "pattern", "pattern" in needs),
        value=value,
    )


def first_violation(
    policies: Iterable[PolicyDefinition],
    action: Action,
    state: StateReader,
    text_of: TextOf | None = None,
) -> tuple[PolicyDefinition, str] | None:
    """The first policy that denies C{action} and its reason, or None."""
    for policy in policies:
        reason = policy.violation(action, state, text_of)
        if reason is not None:
            return policy, reason
    return None


def distinct_static(policies: Iterable[PolicyDefinition]) -> list[PolicyDefinition]:
    """
    C{policies} in order without repeats of the same (rule, target, key,
    pattern): a static rule's verdict depends on nothing else, so a repeat
    can never be the first violation.
    """
    seen: set[tuple[str, str | None, str | None, str | None]] = set()
    out = []
    for p in policies:
        triple = (p.rule, p.target, p.key, p.pattern)
        if triple not in seen:
            seen.add(triple)
            out.append(p)
    return out


def param_scans(policies: Iterable[PolicyDefinition]) -> dict[str | None, dict[str | None, int]]:
    """
    How many ``deny_tool_param`` patterns scan each tool's parameter:
    C{{tool: {key: n}}}.  Pass policies through ``distinct_static`` first.
    """
    scans: dict[str | None, dict[str | None, int]] = {}
    for p in policies:
        if p.rule == "deny_tool_param" and p.pattern:
            per_tool = scans.setdefault(p.target, {})
            per_tool[p.key] = per_tool.get(p.key, 0) + 1
    return scans
