"""
``tools.*``: the connection's tool registry, and the detached-handle
methods.

The daemon's executor calls the client back (``tools.execute``) and cannot
start streaming or long-running invocations, so no tool handle ever
exists here: ``tools.poll`` answers ``null`` (unknown handle, as the
reference specifies), ``tools.cancel`` ``{cancelled: false}``, and
``tools.stream.subscribe`` subscribes to a stream that stays silent.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import attrs
from zope.interface import implementer

from car_twisted.errors import InvalidParams
from car_twisted.interfaces import IMethodProvider
from car_twisted.json_value import JsonValue
from car_twisted.proposal.ir import ToolSchema, parse_tool_schema
from car_twisted.rpc.registry import MethodSpec
from car_twisted.runtime import MAX_TOOLS, runtime_of
from car_twisted.session import ClientSession

if TYPE_CHECKING:
    from car_twisted.state import ServerState

__all__ = ["ToolMethods", "tool_definitions"]


@attrs.frozen
class NameParams:
    name: str = attrs.field(metadata={"max_len": 256})


@attrs.frozen
class HandleParams:
    handle: str = attrs.field(metadata={"max_len": 256})


def tool_definitions(raw: JsonValue, path: str = "params") -> list[ToolSchema]:
    """
    The shapes clients send: an array of schemas (``car-runtime``), an
    object ``{tools: [...]}``, or one schema object.
    """
    if type(raw) is dict and "tools" in raw and "name" not in raw:
        raw, path = raw["tools"], f"{path}.tools"
    if type(raw) is dict:
        raw, single = [raw], True
    else:
        single = False
    if type(raw) is not list:
        raise InvalidParams(path, "expected an array of tool definitions")
    if len(raw) > MAX_TOOLS:
        raise InvalidParams(path, f"at most {MAX_TOOLS} tools")
    return [parse_tool_schema(t, path if single else f"{path}[{i}]") for i, t in enumerate(raw)]


@implementer(IMethodProvider)
class ToolMethods:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    def methods(self) -> Iterable[MethodSpec]:
        return (
            MethodSpec("tools.register", self.register, description="Register tool schemas (an array) on this connection."),
            MethodSpec("tools.list", self.list, description="Tools in force on this connection, sorted by name, full schemas."),
            MethodSpec("tools.unregister", self.unregister, params=NameParams, description="Remove a tool by name."),
            MethodSpec("tools.poll", self.poll, params=HandleParams, description="Drain a detached tool handle (none exist here: null)."),
            MethodSpec("tools.cancel", self.cancel, params=HandleParams, description="Cancel a detached tool handle."),
            MethodSpec("tools.stream.subscribe", self.stream_subscribe, description="Subscribe to detached tool chunks."),
        )

    def register(self, session: ClientSession, params: JsonValue) -> int:
        schemas = tool_definitions(params)
        runtime = runtime_of(session)
        for schema in schemas:
            runtime.register_tool(schema)
        return len(schemas)

    def list(self, session: ClientSession, params: JsonValue) -> dict[str, object]:
        tools = [t.to_wire() for t in runtime_of(session).list_tools()]
        return {"tools": tools, "count": len(tools)}

    def unregister(self, session: ClientSession, p: NameParams) -> dict[str, object]:
        return {"unregistered": p.name, "removed": runtime_of(session).unregister_tool(p.name)}

    def poll(self, session: ClientSession, p: HandleParams) -> None:
        # Handles only come from detached invocations, which this daemon's
        # callback executor refuses at dispatch: every handle is unknown.
        return None

    def cancel(self, session: ClientSession, p: HandleParams) -> dict[str, bool]:
        return {"cancelled": False}

    def stream_subscribe(self, session: ClientSession, params: JsonValue) -> dict[str, bool]:
        return {"subscribed": True}
