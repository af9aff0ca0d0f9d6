"""
``host.*``: the agents, devices, approvals and events hosts see.

Reads are open to every authenticated connection; mutations follow the
owning connection (``car_twisted.host.registry``).  ``host.subscribe``
needs a negotiated protocol (``-32005`` before ``server.handshake``).
``host.agents`` merges the registered agents with the supervised agents
that advertise capabilities.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

import attrs
from zope.interface import implementer

from car_twisted.errors import InvalidParams
from car_twisted.host.model import AGENT_STATUSES
from car_twisted.host.registry import HostRegistry
from car_twisted.interfaces import IMethodProvider
from car_twisted.json_value import JsonValue
from car_twisted.rpc.registry import MethodSpec
from car_twisted.session import ClientSession

if TYPE_CHECKING:
    from car_twisted.state import ServerState

__all__ = ["HostMethods"]

_ID = {"max_len": 128}
_NAME = {"max_len": 256}
_TEXT = {"max_len": 4096}
_LIST = {"max_len": 64}


@attrs.frozen
class Empty:
    pass


@attrs.frozen
class EventsParams:
    limit: int = 100


@attrs.frozen
class RegisterAgentParams:
    name: str = attrs.field(metadata=_NAME)
    kind: str = attrs.field(default="agent", metadata=_NAME)
    id: str | None = attrs.field(default=None, metadata=_ID)
    capabilities: list[str] | None = attrs.field(default=None, metadata=_LIST)
    project: str | None = attrs.field(default=None, metadata=_TEXT)
    pid: int | None = None
    display: dict[str, JsonValue] | None = None
    metadata: dict[str, JsonValue] | None = None


@attrs.frozen
class AgentIdParams:
    agent_id: str = attrs.field(metadata=_ID)


@attrs.frozen
class StatusParams:
    agent_id: str = attrs.field(metadata=_ID)
    status: str = attrs.field(metadata=_NAME)
    current_task: str | None = attrs.field(default=None, metadata=_TEXT)
    message: str | None = attrs.field(default=None, metadata=_TEXT)
    payload: dict[str, JsonValue] | None = None


@attrs.frozen
class NotifyParams:
    kind: str = attrs.field(default="host.notification", metadata=_NAME)
    agent_id: str | None = attrs.field(default=None, metadata=_ID)
    message: str | None = attrs.field(default=None, metadata=_TEXT)
    payload: dict[str, JsonValue] | None = None


@attrs.frozen
class RegisterDeviceParams:
    name: str = attrs.field(metadata=_NAME)
    platform: str = attrs.field(metadata=_NAME)
    id: str | None = attrs.field(default=None, metadata=_ID)
    capabilities: list[str] | None = attrs.field(default=None, metadata=_LIST)
    status: str | None = attrs.field(default=None, metadata=_NAME)
    metadata: dict[str, JsonValue] | None = None


@attrs.frozen
class UpdateDeviceParams:
    device_id: str = attrs.field(metadata=_ID)
    name: str | None = attrs.field(default=None, metadata=_NAME)
    platform: str | None = attrs.field(default=None, metadata=_NAME)
    capabilities: list[str] | None = attrs.field(default=None, metadata=_LIST)
    status: str | None = attrs.field(default=None, metadata=_NAME)
    metadata: dict[str, JsonValue] | None = None


@attrs.frozen
class RequestApprovalParams:
    title: str = attrs.field(metadata=_TEXT)
    agent_id: str | None = attrs.field(default=None, metadata=_ID)
    description: str | None = attrs.field(default=None, metadata={"max_len": 16384})
    context: dict[str, JsonValue] | None = None
    required_approvals: int = 1


@attrs.frozen
class ResolveApprovalParams:
    approval_id: str = attrs.field(metadata=_ID)
    approved: bool
    notes: str | None = attrs.field(default=None, metadata=_TEXT)


_DAEMON_KINDS = ("agent.", "approval.", "device.", "host.gap")
_SUPERVISED_STATUS = {"running": "running", "starting": "running", "backoff": "errored", "errored": "errored", "stopped": "stopped"}


@implementer(IMethodProvider)
class HostMethods:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    @property
    def host(self) -> HostRegistry:
        return self.state.host

    def methods(self) -> Iterable[MethodSpec]:
        return (
            MethodSpec("host.subscribe", self.subscribe, params=Empty, requires_handshake=True,
                       description="Receive host.event notifications; answers the current snapshot and the daemon's identity."),
            MethodSpec("host.agents", self.agents, params=Empty,
                       description="Registered agents, and supervised agents that advertise capabilities."),
            MethodSpec("host.devices", self.devices, params=Empty, description="Linked host devices."),
            MethodSpec("host.events", self.events, params=EventsParams, description="The most recent host events (limit 100)."),
            MethodSpec("host.approvals", self.approvals, params=Empty, description="Every kept approval, pending ones first in time."),
            MethodSpec("host.register_agent", self.register_agent, params=RegisterAgentParams,
                       description="Register (or update your own) agent."),
            MethodSpec("host.unregister_agent", self.unregister_agent, params=AgentIdParams, description="Remove your own agent."),
            MethodSpec("host.set_status", self.set_status, params=StatusParams,
                       description="Set your agent's status; broadcasts agent.status_changed."),
            MethodSpec("host.notify", self.notify, params=NotifyParams, description="Record and broadcast a host event."),
            MethodSpec("host.register_device", self.register_device, params=RegisterDeviceParams,
                       description="Register (or update your own) device."),
            MethodSpec("host.update_device", self.update_device, params=UpdateDeviceParams,
                       description="Update your own device; broadcasts device.updated."),
            MethodSpec("host.request_approval", self.request_approval, params=RequestApprovalParams,
                       description="Ask for a person's approval; only this connection may resolve it."),
            MethodSpec("host.resolve_approval", self.resolve_approval, params=ResolveApprovalParams,
                       description="Approve or deny: your own approvals, or any system approval."),
        )

    # -- reads ---------------------------------------------------------------------------

    def subscribe(self, session: ClientSession, p: Empty) -> dict[str, JsonValue]:
        return self.host.subscribe(session)

    def agents(self, session: ClientSession, p: Empty) -> list[JsonValue]:
        registered = {a.id: a.to_wire() for a in self.host.agents.values()}
        merged: list[JsonValue] = list(registered.values())
        # Supervised agents do not register: those that advertise
        # capabilities are read from the supervisor (an explicit
        # registration of the same id wins).
        for managed in self.state.agents.list():
            spec = managed.get("spec")
            capabilities = spec.get("capabilities") if isinstance(spec, dict) else None
            agent_id = managed.get("id")
            if not capabilities or not isinstance(agent_id, str) or agent_id in registered:
                continue
            status = managed.get("status")
            merged.append(
                {
                    "id": agent_id,
                    "name": spec.get("name", agent_id) if isinstance(spec, dict) else agent_id,
                    "kind": "supervised",
                    "capabilities": capabilities,
                    "status": _SUPERVISED_STATUS.get(status, "idle") if isinstance(status, str) else "idle",
                    "pid": cast(JsonValue, managed.get("pid")),
                    "session_id": cast(JsonValue, managed.get("session_id")),
                    "attached": cast(JsonValue, managed.get("attached")),
                }
            )
        return merged

    def devices(self, session: ClientSession, p: Empty) -> list[JsonValue]:
        return [d.to_wire() for d in self.host.devices.values()]

    def events(self, session: ClientSession, p: EventsParams) -> dict[str, JsonValue]:
        if p.limit < 0:
            raise InvalidParams("limit", "expected a non-negative count")
        return {"events": [e.to_wire() for e in self.host.recent(p.limit)]}

    def approvals(self, session: ClientSession, p: Empty) -> dict[str, JsonValue]:
        return {"approvals": [a.to_wire() for a in self.host.approvals.values()]}

    # -- agents and devices ----------------------------------------------------------------

    def register_agent(self, session: ClientSession, p: RegisterAgentParams) -> dict[str, JsonValue]:
        return self.host.register_agent(
            session, p.id, p.name, p.kind, p.capabilities or (), p.project, p.pid, p.display, p.metadata
        ).to_wire()

    def unregister_agent(self, session: ClientSession, p: AgentIdParams) -> dict[str, JsonValue]:
        return {"ok": self.host.unregister_agent(session, p.agent_id)}

    def set_status(self, session: ClientSession, p: StatusParams) -> dict[str, JsonValue]:
        if p.status not in AGENT_STATUSES:
            raise InvalidParams("status", "expected one of " + ", ".join(AGENT_STATUSES))
        return self.host.set_status(session, p.agent_id, p.status, p.current_task, p.message, p.payload).to_wire()

    def notify(self, session: ClientSession, p: NotifyParams) -> dict[str, JsonValue]:
        # The daemon's own kinds report what the daemon did: a caller may
        # not forge them (an approval that "resolved", an agent that left).
        if p.kind.startswith(_DAEMON_KINDS):
            raise InvalidParams("kind", f"{p.kind!r} is reserved for the daemon's own events")
        return self.host.emit(p.kind, p.agent_id, p.message, p.payload).to_wire()

    def register_device(self, session: ClientSession, p: RegisterDeviceParams) -> dict[str, JsonValue]:
        return self.host.register_device(
            session, p.id, p.name, p.platform, p.capabilities or (), p.status, p.metadata
        ).to_wire()

    def update_device(self, session: ClientSession, p: UpdateDeviceParams) -> dict[str, JsonValue]:
        return self.host.update_device(
            session, p.device_id, p.name, p.platform, p.capabilities, p.status, p.metadata
        ).to_wire()

    # -- approvals ---------------------------------------------------------------------------

    def request_approval(self, session: ClientSession, p: RequestApprovalParams) -> dict[str, JsonValue]:
        if not 1 <= p.required_approvals <= 16:
            raise InvalidParams("required_approvals", "expected 1 to 16")
        return self.host.request_approval(
            session, p.agent_id, p.title, p.description, p.context, p.required_approvals
        ).to_wire()

    def resolve_approval(self, session: ClientSession, p: ResolveApprovalParams) -> dict[str, JsonValue]:
        return self.host.resolve_approval(session, p.approval_id, p.approved, p.notes).to_wire()
