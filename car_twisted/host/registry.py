"""
``HostRegistry``: the state behind ``host.*`` on ``ServerState``.

Agents, devices and approvals are owned by the connection that made them:
only the owner mutates its agent or device, and only the connection that
raised an approval resolves it; a system approval (the approval gate's)
resolves from any authenticated connection.  Reads are open to every
authenticated connection.  When an owner disconnects its rows stay,
marked ``orphaned`` (any connection may adopt or remove them), and its
pending approvals are cancelled: nobody could ever resolve them.

Every change is a ``HostEvent``: kept in a bounded history
(``host.events``) and sent as a ``host.event`` notification to each
subscriber through its own bounded backlog; a subscriber that does not
read loses events past the backlog and then gets one ``host.gap`` event
saying how many, and never holds anyone else up.
"""

from __future__ import annotations

import collections
import itertools
import os
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from car_twisted._util import iso_utc
from car_twisted._version import __version__
from car_twisted.errors import RpcError
from car_twisted.host.model import HostAgent, HostApproval, HostDevice, HostEvent
from car_twisted.interfaces import ISessionFeature
from car_twisted.json_value import JsonValue
from car_twisted.outbox import Outbox
from car_twisted.rpc.envelope import encode_notification

if TYPE_CHECKING:
    from car_twisted.session import ClientSession
    from car_twisted.stats import DaemonStats

__all__ = [
    "HostRegistry",
    "HostConnection",
    "ApprovalOutcome",
    "MAX_HOST_EVENTS",
    "MAX_HOST_AGENTS",
    "MAX_HOST_DEVICES",
    "MAX_PENDING_APPROVALS",
    "HOST_BACKLOG_BYTES",
]

MAX_HOST_EVENTS = 1000
MAX_HOST_AGENTS = 1024
MAX_HOST_DEVICES = 256
MAX_PENDING_APPROVALS = 1024
MAX_KEPT_APPROVALS = 1024
# host.event frames held for one subscriber while its output is backed up.
HOST_BACKLOG_BYTES = 1024 * 1024


class ApprovalOutcome:
    """How a parked call's approval ended: C{approved}, and why not."""

    def __init__(self, approval: HostApproval, approved: bool, reason: str) -> None:
        self.approval = approval
        self.approved = approved
        self.reason = reason


@implementer(ISessionFeature)
class HostConnection:
    """One connection's part in host state: closing it orphans its rows."""

    def __init__(self, registry: HostRegistry, session: ClientSession) -> None:
        self.registry = registry
        self.session = session

    def holds_client_state(self) -> bool:
        # A subscription, owned rows or a parked call: a reconnect would lose them.
        return self.registry.holds(self.session)

    def close(self) -> None:
        self.registry.session_closed(self.session)


class _Parked:
    """A gated call waiting on its system approval."""

    def __init__(self, approval: HostApproval, waiter: Deferred[ApprovalOutcome], timer: IDelayedCall, caller: str) -> None:
        self.approval = approval
        self.waiter = waiter
        self.timer = timer
        self.caller = caller


class HostRegistry:
    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        identity: Callable[[], dict[str, JsonValue]] | None = None,
        stats: DaemonStats | None = None,
    ) -> None:
        self.clock = clock
        self.stats = stats
        self._identity = identity or (lambda: {"manifest_path": None, "manifest_role": "none"})
        self.agents: dict[str, HostAgent] = {}
        self.devices: dict[str, HostDevice] = {}
        self.approvals: collections.OrderedDict[str, HostApproval] = collections.OrderedDict()
        self.events: collections.deque[HostEvent] = collections.deque(maxlen=MAX_HOST_EVENTS)
        self._subscribers: dict[str, Outbox] = {}
        self._parked: dict[str, _Parked] = {}
        self._event_ids = itertools.count(1)

    # -- connections -----------------------------------------------------------------

    def connection(self, session: ClientSession) -> HostConnection:
        return session.feature(HostConnection, self._new_connection)

    def _new_connection(self, session: ClientSession) -> HostConnection:
        session.channel.on_resume(lambda: self._drain(session))
        return HostConnection(self, session)

    def holds(self, session: ClientSession) -> bool:
        cid = session.client_id
        return (
            cid in self._subscribers
            or any(a.session_id == cid for a in self.agents.values())
            or any(d.session_id == cid for d in self.devices.values())
            or any(p.caller == cid for p in self._parked.values())
            or any(a.client_id == cid and a.pending for a in self.approvals.values())
        )

    def session_closed(self, session: ClientSession) -> None:
        cid = session.client_id
        self._subscribers.pop(cid, None)
        for agent in self.agents.values():
            if agent.session_id == cid:
                agent.session_id, agent.orphaned, agent.updated_at = None, True, self._now()
                self.emit("agent.status_changed", agent.id, "its connection closed", {"agent": agent.to_wire(), "orphaned": True})
        for device in self.devices.values():
            if device.session_id == cid:
                device.session_id, device.orphaned, device.updated_at = None, True, self._now()
                self.emit("device.updated", None, "its connection closed", {"device": device.to_wire(), "orphaned": True})
        for approval in list(self.approvals.values()):
            if approval.client_id == cid and approval.pending:
                self._finish(approval, "cancelled", None, "the requesting connection closed")
        for parked in [p for p in self._parked.values() if p.caller == cid]:
            # The caller is gone: release its wait (and with it the call's
            # own timers); the row stays, marked.
            del self._parked[parked.approval.id]
            if parked.timer.active():
                parked.timer.cancel()
            self._finish(parked.approval, "cancelled", None, "the waiting call's connection closed")
            parked.waiter.callback(ApprovalOutcome(parked.approval, False, "the connection closed"))

    # -- events ----------------------------------------------------------------------

    def _now(self) -> str:
        return iso_utc(self.clock.seconds())

    def emit(
        self,
        kind: str,
        agent_id: str | None = None,
        message: str | None = None,
        payload: dict[str, JsonValue] | None = None,
    ) -> HostEvent:
        """Record an event and send it to every subscriber."""
        event = HostEvent(f"event-{next(self._event_ids)}", self._now(), kind, agent_id, message, payload or {})
        self.events.append(event)
        if self._subscribers:
            frame = encode_notification("host.event", event.to_wire())
            for sub in list(self._subscribers.values()):
                sub.push(frame)
        return event

    def _drain(self, session: ClientSession) -> None:
        sub = self._subscribers.get(session.client_id)
        if sub is None:
            return
        dropped = sub.drain()
        if dropped:
            gap = HostEvent(
                f"event-{next(self._event_ids)}",
                self._now(),
                "host.gap",
                None,
                f"{dropped} events were dropped while this connection was not reading; read host.events to catch up",
                {"dropped": dropped},
            )
            session.channel.send(encode_notification("host.event", gap.to_wire()))

    def recent(self, limit: int) -> list[HostEvent]:
        return list(self.events)[-limit:] if limit > 0 else []

    # -- subscribe -------------------------------------------------------------------

    def subscribe(self, session: ClientSession) -> dict[str, JsonValue]:
        self.connection(session)
        if session.client_id not in self._subscribers:
            self._subscribers[session.client_id] = Outbox(session.channel, HOST_BACKLOG_BYTES, hold_after_drop=True, stats=self.stats)
        return {
            "subscribed": True,
            "agents": [a.to_wire() for a in self.agents.values()],
            "devices": [d.to_wire() for d in self.devices.values()],
            "approvals": [a.to_wire() for a in self.approvals.values()],
            "events": [e.to_wire() for e in self.recent(100)],
            "identity": {"version": __version__, "pid": os.getpid(), **self._identity()},
        }

    def subscriber_count(self) -> int:
        return len(self._subscribers)

    # -- agents ----------------------------------------------------------------------

    def _owned(self, session: ClientSession, row_owner: str | None, orphaned: bool, what: str) -> None:
        if row_owner != session.client_id and not orphaned:
            raise RpcError(f"{what} is owned by another session")

    def register_agent(
        self,
        session: ClientSession,
        agent_id: str | None,
        name: str,
        kind: str,
        capabilities: Iterable[str],
        project: str | None,
        pid: int | None,
        display: dict[str, JsonValue] | None,
        metadata: dict[str, JsonValue] | None,
    ) -> HostAgent:
        self.connection(session)
        agent_id = agent_id or f"agent-{uuid.uuid4().hex[:12]}"
        now = self._now()
        current = self.agents.get(agent_id)
        if current is not None:
            self._owned(session, current.session_id, current.orphaned, f"agent '{agent_id}'")
        elif len(self.agents) >= MAX_HOST_AGENTS:
            raise RpcError(f"too many host agents: at most {MAX_HOST_AGENTS}", data={"reason": "host_agents", "limit": MAX_HOST_AGENTS})
        agent = HostAgent(
            id=agent_id,
            name=name,
            kind=kind,
            session_id=session.client_id,
            registered_at=current.registered_at if current is not None else now,
            updated_at=now,
            capabilities=list(capabilities),
            project=project,
            pid=pid,
            display=display,
            metadata=metadata,
            status=current.status if current is not None else "idle",
        )
        self.agents[agent_id] = agent
        self.emit("agent.registered", agent_id, f"agent {name} registered", {"agent": agent.to_wire()})
        return agent

    def unregister_agent(self, session: ClientSession, agent_id: str) -> bool:
        agent = self.agents.get(agent_id)
        if agent is None:
            return False
        self._owned(session, agent.session_id, agent.orphaned, f"agent '{agent_id}'")
        del self.agents[agent_id]
        self.emit("agent.unregistered", agent_id, f"agent {agent.name} unregistered", {"agent_id": agent_id})
        return True

    def set_status(
        self,
        session: ClientSession,
        agent_id: str,
        status: str,
        current_task: str | None,
        message: str | None,
        payload: dict[str, JsonValue] | None,
    ) -> HostAgent:
        agent = self.agents.get(agent_id)
        if agent is None:
            raise RpcError(f"unknown host agent '{agent_id}'")
        self._owned(session, agent.session_id, False, f"agent '{agent_id}'")
        agent.status, agent.current_task, agent.message, agent.updated_at = status, current_task, message, self._now()
        self.emit("agent.status_changed", agent_id, message, {"agent": agent.to_wire(), **({"payload": payload} if payload else {})})
        return agent

    # -- devices -----------------------------------------------------------------------

    def register_device(
        self,
        session: ClientSession,
        device_id: str | None,
        name: str,
        platform: str,
        capabilities: Iterable[str],
        status: str | None,
        metadata: dict[str, JsonValue] | None,
    ) -> HostDevice:
        self.connection(session)
        device_id = device_id or f"device-{uuid.uuid4().hex[:12]}"
        current = self.devices.get(device_id)
        if current is not None:
            self._owned(session, current.session_id, current.orphaned, f"device '{device_id}'")
        elif len(self.devices) >= MAX_HOST_DEVICES:
            raise RpcError(f"too many host devices: at most {MAX_HOST_DEVICES}", data={"reason": "host_devices", "limit": MAX_HOST_DEVICES})
        device = HostDevice(
            id=device_id,
            name=name,
            platform=platform,
            session_id=session.client_id,
            updated_at=self._now(),
            capabilities=list(capabilities),
            status=status or "online",
            metadata=metadata,
        )
        self.devices[device_id] = device
        self.emit("device.updated", None, f"device {name} registered", {"device": device.to_wire()})
        return device

    def update_device(
        self,
        session: ClientSession,
        device_id: str,
        name: str | None,
        platform: str | None,
        capabilities: Iterable[str] | None,
        status: str | None,
        metadata: dict[str, JsonValue] | None,
    ) -> HostDevice:
        device = self.devices.get(device_id)
        if device is None:
            raise RpcError(f"unknown host device '{device_id}'")
        self._owned(session, device.session_id, False, f"device '{device_id}'")
        if name is not None:
            device.name = name
        if platform is not None:
            device.platform = platform
        if capabilities is not None:
            device.capabilities = list(capabilities)
        if status is not None:
            device.status = status
        if metadata is not None:
            device.metadata = metadata
        device.updated_at = self._now()
        self.emit("device.updated", None, f"device {device.name} updated", {"device": device.to_wire()})
        return device

    # -- approvals -------------------------------------------------------------------

    def _new_approval(self, approval: HostApproval) -> HostApproval:
        pending = sum(1 for a in self.approvals.values() if a.pending)
        if pending >= MAX_PENDING_APPROVALS:
            raise RpcError(
                f"too many pending approvals: at most {MAX_PENDING_APPROVALS}",
                data={"reason": "pending_approvals", "limit": MAX_PENDING_APPROVALS},
            )
        self.approvals[approval.id] = approval
        # Keep every pending row; forget the oldest resolved ones past the cap.
        resolved = [aid for aid, a in self.approvals.items() if not a.pending]
        for aid in resolved[: max(0, len(resolved) - MAX_KEPT_APPROVALS)]:
            del self.approvals[aid]
        self.emit(
            "approval.requested",
            approval.agent_id,
            approval.title,
            {"approval_id": approval.id, "approval": approval.to_wire()},
        )
        return approval

    def request_approval(
        self,
        session: ClientSession,
        agent_id: str | None,
        title: str,
        description: str | None,
        context: dict[str, JsonValue] | None,
        required_approvals: int,
    ) -> HostApproval:
        self.connection(session)
        approval = HostApproval(
            id=f"approval-{uuid.uuid4().hex[:16]}",
            title=title,
            created_at=self._now(),
            client_id=session.client_id,
            description=description,
            context=context,
            agent_id=agent_id,
            required_approvals=required_approvals,
        )
        self._new_approval(approval)
        agent = self.agents.get(agent_id) if agent_id is not None else None
        if agent is not None:
            agent.status, agent.updated_at = "waiting_for_approval", self._now()
            self.emit("agent.status_changed", agent.id, title, {"agent": agent.to_wire()})
        return approval

    def resolve_approval(self, session: ClientSession, approval_id: str, approved: bool, notes: str | None) -> HostApproval:
        approval = self.approvals.get(approval_id)
        if approval is None:
            raise RpcError(f"unknown approval '{approval_id}'")
        if approval.client_id is not None and approval.client_id != session.client_id:
            raise RpcError(f"approval '{approval_id}' was requested by another session")
        if not approval.pending:
            raise RpcError(f"approval '{approval_id}' is already {approval.status}")
        self._finish(approval, "approved" if approved else "denied", session.client_id, notes)
        parked = self._parked.pop(approval_id, None)
        if parked is not None:
            if parked.timer.active():
                parked.timer.cancel()
            reason = "approved" if approved else f"denied by {session.client_id}"
            parked.waiter.callback(ApprovalOutcome(approval, approved, reason))
        return approval

    def _finish(self, approval: HostApproval, status: str, by: str | None, notes: str | None) -> None:
        approval.status, approval.resolved_at, approval.resolved_by = status, self._now(), by
        if notes is not None:
            approval.notes = notes
        self.emit(
            "approval.resolved",
            approval.agent_id,
            f"{approval.title}: {status}",
            {"approval_id": approval.id, "approval": approval.to_wire()},
        )

    def park(self, session: ClientSession, method: str, preview: str, why: str, timeout: float) -> Deferred[ApprovalOutcome]:
        """
        Raise a system approval for a gated call of C{method} and wait for
        it: fires with the outcome on resolution, or not approved after
        C{timeout} seconds (the row is then marked ``expired``).
        """
        self.connection(session)
        approval = HostApproval(
            id=f"approval-{uuid.uuid4().hex[:16]}",
            title=f"Allow {method}?",
            created_at=self._now(),
            client_id=None,
            description=f"{why}; the call from {session.client_id} runs only if approved",
            context=cast(dict[str, JsonValue], {"method": method, "params_preview": preview, "caller": session.client_id}),
            action=f"ws.method:{method}",
        )
        self._new_approval(approval)

        def release(waiter: Deferred[ApprovalOutcome]) -> None:
            parked = self._parked.pop(approval.id, None)
            if parked is not None and parked.timer.active():
                parked.timer.cancel()

        waiter: Deferred[ApprovalOutcome] = Deferred(release)
        timer = self.clock.callLater(timeout, self._expire, approval.id, timeout)
        self._parked[approval.id] = _Parked(approval, waiter, timer, session.client_id)
        return waiter

    def _expire(self, approval_id: str, timeout: float) -> None:
        parked = self._parked.pop(approval_id, None)
        if parked is None:
            return
        self._finish(parked.approval, "expired", None, f"nobody resolved it within {timeout:g}s")
        parked.waiter.callback(ApprovalOutcome(parked.approval, False, f"not approved within {timeout:g}s"))

    def parked_count(self) -> int:
        return len(self._parked)
