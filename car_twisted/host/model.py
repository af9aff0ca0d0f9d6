"""
The rows of host state as ``host.*`` returns them: ``HostAgent``,
``HostDevice``, ``HostApproval`` and ``HostEvent``.

Each row remembers the connection that owns it (``session_id``: its client
id); when that connection goes, the row is kept and marked ``orphaned``
(``session_id`` null) so hosts still see it, and any connection may adopt
(re-register) or remove it.
"""

from __future__ import annotations

import attrs

from car_twisted.json_value import JsonValue

__all__ = [
    "AGENT_STATUSES",
    "APPROVAL_STATUSES",
    "HostAgent",
    "HostDevice",
    "HostApproval",
    "HostEvent",
]

AGENT_STATUSES = ("idle", "running", "waiting_for_approval", "paused", "completed", "errored", "stopped")
APPROVAL_STATUSES = ("pending", "approved", "denied", "expired", "cancelled")


@attrs.define(eq=False)
class HostAgent:
    id: str
    name: str
    kind: str
    session_id: str | None
    registered_at: str
    updated_at: str
    capabilities: list[str] = attrs.field(factory=list)
    project: str | None = None
    pid: int | None = None
    display: dict[str, JsonValue] | None = None
    metadata: dict[str, JsonValue] | None = None
    status: str = "idle"
    current_task: str | None = None
    message: str | None = None
    orphaned: bool = False

    def to_wire(self) -> dict[str, JsonValue]:
        return {
            "id": self.id,
            "name": self.name,
            "kind": self.kind,
            "capabilities": list(self.capabilities),
            "project": self.project,
            "pid": self.pid,
            "display": self.display,
            "metadata": self.metadata,
            "status": self.status,
            "current_task": self.current_task,
            "message": self.message,
            "session_id": self.session_id,
            "orphaned": self.orphaned,
            "registered_at": self.registered_at,
            "updated_at": self.updated_at,
        }


@attrs.define(eq=False)
class HostDevice:
    id: str
    name: str
    platform: str
    session_id: str | None
    updated_at: str
    capabilities: list[str] = attrs.field(factory=list)
    status: str = "online"
    metadata: dict[str, JsonValue] | None = None
    orphaned: bool = False

    def to_wire(self) -> dict[str, JsonValue]:
        return {
            "id": self.id,
            "name": self.name,
            "platform": self.platform,
            "capabilities": list(self.capabilities),
            "status": self.status,
            "session_id": self.session_id,
            "orphaned": self.orphaned,
            "updated_at": self.updated_at,
            "metadata": self.metadata,
        }


@attrs.define(eq=False)
class HostApproval:
    """
    @ivar client_id: the connection that raised it with
        ``host.request_approval`` (only it may resolve it), or None for a
        system approval (the approval gate): any authenticated connection
        may resolve those.
    """

    id: str
    title: str
    created_at: str
    client_id: str | None
    description: str | None = None
    context: dict[str, JsonValue] | None = None
    agent_id: str | None = None
    action: str | None = None
    required_approvals: int = 1
    status: str = "pending"
    resolved_at: str | None = None
    resolved_by: str | None = None
    notes: str | None = None

    @property
    def pending(self) -> bool:
        return self.status == "pending"

    def to_wire(self) -> dict[str, JsonValue]:
        return {
            "id": self.id,
            "title": self.title,
            "description": self.description,
            "context": self.context,
            "agent_id": self.agent_id,
            "action": self.action,
            "client_id": self.client_id,
            "required_approvals": self.required_approvals,
            "status": self.status,
            "created_at": self.created_at,
            "resolved_at": self.resolved_at,
            "resolved_by": self.resolved_by,
            "notes": self.notes,
        }


@attrs.frozen
class HostEvent:
    id: str
    timestamp: str
    kind: str
    agent_id: str | None = None
    message: str | None = None
    payload: dict[str, JsonValue] = attrs.field(factory=dict)

    def to_wire(self) -> dict[str, JsonValue]:
        return {
            "id": self.id,
            "timestamp": self.timestamp,
            "kind": self.kind,
            "agent_id": self.agent_id,
            "message": self.message,
            "payload": self.payload,
        }
