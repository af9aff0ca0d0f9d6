"""
Public fakes for testing code built on car-twisted without sockets.

``MemorySink`` records what the daemon writes to one connection;
``FakeToolExecutor`` answers tool calls from a script and records them.
Both are verified against their interfaces by the project's own tests.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from car_twisted.interfaces import IToolExecutor, IWsSink
from car_twisted.json_value import JsonValue
from car_twisted.proposal.ir import ToolCall, ToolError

__all__ = ["MemorySink", "FakeToolExecutor"]


@implementer(IWsSink)
class MemorySink:
    """Records frames; ``close`` marks it closed like the real protocol."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.binary: list[bytes] = []
        self.closed_with: tuple[int, str] | None = None
        self.writable = True

    def send_text(self, payload: bytes) -> bool:
        if not self.writable:
            return False
        self.frames.append(payload)
        return True

    def send_binary(self, payload: bytes) -> bool:
        if not self.writable:
            return False
        self.binary.append(payload)
        return True

    def close(self, code: int, reason: str) -> None:
        if self.writable:
            self.closed_with = (code, reason)
            self.writable = False

    def messages(self) -> list[JsonValue]:
        """Every text frame so far, decoded."""
        return [json.loads(f) for f in self.frames]

    def pop(self) -> list[JsonValue]:
        """Decoded frames since the last pop."""
        out = self.messages()
        self.frames.clear()
        return out


@implementer(IToolExecutor)
class FakeToolExecutor:
    """
    An in-process executor: C{tools[name](call)} gives the output (or
    raises ``ToolError``); a tool named in C{hold} gets a Deferred the
    test fires itself (kept in C{held[action_id]}).
    """

    supports_detached = False

    def __init__(self, tools: dict[str, Callable[[ToolCall], JsonValue]] | None = None) -> None:
        self.tools = dict(tools or {})
        self.calls: list[ToolCall] = []
        self.hold: set[str] = set()
        self.held: dict[str, Deferred[JsonValue]] = {}

    def execute(self, call: ToolCall) -> Deferred[JsonValue]:
        self.calls.append(call)
        if call.tool in self.hold:
            d: Deferred[JsonValue] = Deferred()
            self.held[call.action_id] = d
            return d
        tool = self.tools.get(call.tool)
        if tool is None:
            return fail(ToolError(f"unknown tool '{call.tool}'", kind="unknown_tool", terminal=True))
        try:
            return succeed(tool(call))
        except ToolError as e:
            return fail(e)
