"""
``a2ui.*``: agent-published UI surfaces (``car_twisted.a2ui.store``), the
A2A routes that continue a surface's task when the user acts on it
(``car_twisted.a2ui.route`` / ``continuation``), and the ``a2ui.event``
subscribers.

Every change is validated whole before it is stored; only then is it
answered, broadcast as ``a2ui.event`` to subscribers and recorded as a
``host.event``.  Route credentials live in the ``RouteVault`` only: no
reply, event, log line or error names them.  Subscribers get events
through a bounded ``Outbox`` each (a reader that stops gets one
``a2ui.gap`` event once it drains) and are dropped with their connection.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from car_twisted.a2ui.continuation import DEFAULT_TIMEOUT, RouteOutcome, send_continuation
from car_twisted.a2ui.ingest import find_envelopes
from car_twisted.a2ui.route import NO_AUTH, A2aRouteAuth, RouteVault, check_endpoint
from car_twisted.a2ui.store import A2uiError, ApplyResult, Surface, SurfaceOwner, SurfaceStore
from car_twisted.errors import InvalidParams
from car_twisted.interfaces import IMethodProvider
from car_twisted.json_value import JsonValue
from car_twisted.outbox import Outbox
from car_twisted.rpc.envelope import dumps, encode_notification
from car_twisted.rpc.registry import MethodSpec
from car_twisted.session import ClientSession

if TYPE_CHECKING:
    from car_twisted.state import ServerState

__all__ = ["A2uiMethods", "A2UI_BACKLOG_BYTES"]

A2UI_EVENT = "a2ui.event"
#: a2ui.event frames held for one subscriber while its output is backed up.
A2UI_BACKLOG_BYTES = 4 * 1024 * 1024
MAX_REPORT_BYTES = 64 * 1024
MAX_ACTION_BYTES = 64 * 1024


def _surface_id(params: JsonValue) -> str:
    if isinstance(params, dict):
        value = params.get("surface_id", params.get("surfaceId"))
        if isinstance(value, str) and value:
            return value
    raise InvalidParams("surface_id", "expected { surface_id } or { surfaceId }: a non-empty string")


def _object(params: JsonValue, what: str) -> dict[str, JsonValue]:
    if not isinstance(params, dict):
        raise InvalidParams("params", f"{what} must be an object")
    return params


@implementer(IMethodProvider)
class A2uiMethods:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.store = SurfaceStore(state.clock)
        self.vault = RouteVault()
        self.subscribers: dict[str, Outbox] = {}

    def methods(self) -> Iterable[MethodSpec]:
        m = MethodSpec
        return (
            m("a2ui.capabilities", self.capabilities, description="Catalogs, components and the server's limits."),
            m("a2ui.apply", self.apply, description="Apply one A2UI v0.9 message (or { envelope })."),
            m("a2ui.ingest", self.ingest, description="Apply every A2UI envelope found in an A2A payload; record its owner and route."),
            m("a2ui.reap", self.reap, description="Remove expired surfaces and their routes."),
            m("a2ui.surfaces", self.surfaces, description="Every surface."),
            m("a2ui.get", self.get, description="One surface, or null."),
            m("a2ui/replay", self.get, description="One surface, or null (after a2ui/subscribe, for late joiners)."),
            m("a2ui.action", self.action, description="A user acted on a surface: broadcast, recorded, and sent to its A2A owner.",
              deadline=lambda params: DEFAULT_TIMEOUT + 5.0),
            m("a2ui.render_report", self.render_report, description="A renderer's report: broadcast and recorded."),
            m("a2ui/subscribe", self.subscribe, description="Receive a2ui.event notifications on this connection."),
            m("a2ui/unsubscribe", self.unsubscribe, description="Stop them (idempotent)."),
        )

    # -- events --------------------------------------------------------------------

    def _broadcast(self, kind: str, result: dict[str, JsonValue]) -> None:
        if not self.subscribers:
            return
        frame = encode_notification(A2UI_EVENT, {"kind": kind, "result": result})
        for outbox in list(self.subscribers.values()):
            outbox.push(frame)

    def _changed(self, result: ApplyResult) -> dict[str, JsonValue]:
        wire = result.to_wire()
        kind = "a2ui.surface_deleted" if result.deleted else "a2ui.surface_updated"
        if result.deleted:
            self.vault.discard(result.surface_id)
        self._broadcast(kind, wire)
        self.state.host.emit(kind, payload={"surfaceId": result.surface_id, "deleted": result.deleted})
        return wire

    def subscribe(self, session: ClientSession, params: JsonValue) -> dict[str, JsonValue]:
        cid = session.client_id
        if cid not in self.subscribers:
            self.subscribers[cid] = Outbox(session.channel, A2UI_BACKLOG_BYTES, hold_after_drop=True, stats=self.state.stats)
            session.activity.pin()
            session.channel.on_resume(lambda: self._drain(session))
            session.on_close(lambda: self._forget(session))
        return {"subscribed": True}

    def unsubscribe(self, session: ClientSession, params: JsonValue) -> dict[str, JsonValue]:
        self._forget(session)
        return {"subscribed": False}

    def _forget(self, session: ClientSession) -> None:
        if self.subscribers.pop(session.client_id, None) is not None:
            session.activity.unpin()

    def _drain(self, session: ClientSession) -> None:
        outbox = self.subscribers.get(session.client_id)
        if outbox is None:
            return
        dropped = outbox.drain()
        if dropped:
            gap = {"kind": "a2ui.gap", "result": {"dropped": dropped,
                   "message": f"{dropped} a2ui events were dropped while this connection was not reading; "
                              "use a2ui.surfaces or a2ui/replay to catch up"}}
            session.channel.send(encode_notification(A2UI_EVENT, gap))

    # -- surfaces --------------------------------------------------------------------

    def capabilities(self, session: ClientSession, params: JsonValue) -> dict[str, JsonValue]:
        return self.store.capabilities()

    def apply(self, session: ClientSession, params: JsonValue) -> dict[str, JsonValue]:
        return self._changed(self.store.apply(params))

    def ingest(self, session: ClientSession, params: JsonValue) -> dict[str, JsonValue]:
        wrapped = isinstance(params, dict) and "payload" in params
        options: dict[str, JsonValue] = params if wrapped and isinstance(params, dict) else {}
        payload = options.get("payload") if wrapped else params
        allow = options.get("allowUntrustedEndpoint", False)
        if not isinstance(allow, bool):
            raise InvalidParams("allowUntrustedEndpoint", "expected true or false")
        raw_endpoint = options.get("endpoint")
        endpoint = check_endpoint(raw_endpoint, allow) if raw_endpoint is not None else None
        auth = A2aRouteAuth.parse(options["routeAuth"]) if options.get("routeAuth") is not None else NO_AUTH
        given = SurfaceOwner.from_wire(options["owner"]) if options.get("owner") is not None else None
        if given is not None and given.endpoint is not None:
            endpoint = check_endpoint(given.endpoint, allow, field="owner.endpoint")
        found = find_envelopes(payload, self.store.limits.max_ingest_envelopes, self.store.limits.max_ingest_depth)
        if not found.envelopes:
            raise A2uiError("invalid_message", "no A2UI envelope found in the payload")
        applied: list[JsonValue] = []
        for item in found.envelopes:
            owner = given if given is not None else item.owner_hint(endpoint)
            if owner is not None and endpoint is not None and owner.endpoint is None:
                owner = SurfaceOwner(owner.kind, owner.task_id, owner.context_id, endpoint, owner.session)
            result = self.store.apply(item.envelope, owner)
            if not result.deleted and owner is not None and owner.kind == "a2a" and owner.endpoint and owner.task_id:
                self.vault.set(result.surface_id, owner.endpoint, auth)
            applied.append(self._changed(result))
        return {"applied": applied}

    def reap(self, session: ClientSession, params: JsonValue) -> dict[str, JsonValue]:
        removed = self.store.reap()
        self.vault.discard_many(removed)
        for surface_id in removed:
            self._broadcast("a2ui.surface_deleted", {"surfaceId": surface_id, "deleted": True})
        return {"removed": list(removed)}

    def surfaces(self, session: ClientSession, params: JsonValue) -> list[JsonValue]:
        return [surface.to_wire() for surface in self.store.surfaces()]

    def get(self, session: ClientSession, params: JsonValue) -> JsonValue:
        surface = self.store.get(_surface_id(params))
        return surface.to_wire() if surface is not None else None

    # -- actions and reports -----------------------------------------------------------

    def action(self, session: ClientSession, params: JsonValue) -> Deferred[dict[str, JsonValue]]:
        raw = _object(params, "an action")
        if len(dumps(raw)) > MAX_ACTION_BYTES:
            raise InvalidParams("params", f"an action is at most {MAX_ACTION_BYTES} bytes")
        name = raw.get("name", raw.get("action"))
        if not isinstance(name, str) or not name:
            raise InvalidParams("name", "expected the action's name (or its alias action): a non-empty string")
        surface_id = raw.get("surfaceId", raw.get("surface_id"))
        if not isinstance(surface_id, str) or not surface_id:
            raise InvalidParams("surfaceId", "expected a non-empty string")
        surface = self.store.get(surface_id)
        if surface is None:
            raise A2uiError("unknown_surface", f"no surface {surface_id!r}", surfaceId=surface_id)
        action: dict[str, JsonValue] = {k: v for k, v in raw.items() if k != "action"}
        action["name"] = name
        owner = surface.owner.to_wire() if surface.owner is not None else None
        self._broadcast("a2ui.action", {"surfaceId": surface_id, "action": action, "owner": owner})
        return self._route(surface, action).addCallback(self._acted, surface_id, action, owner)

    def _route(self, surface: Surface, action: dict[str, JsonValue]) -> Deferred[dict[str, JsonValue]]:
        owner = surface.owner
        route = self.vault.get(surface.surface_id)
        if owner is None or owner.kind != "a2a" or route is None or not owner.task_id:
            return succeed({"kind": "none", "delivered": False})
        sent: Deferred[RouteOutcome] = send_continuation(
            self.state.clock, route.endpoint, route.auth, owner.task_id, owner.context_id, action
        )
        return sent.addCallback(lambda outcome: {"kind": "a2a", "endpoint": route.endpoint, **outcome.to_wire()})

    def _acted(
        self, route: dict[str, JsonValue], surface_id: str, action: dict[str, JsonValue], owner: JsonValue
    ) -> dict[str, JsonValue]:
        event = self.state.host.emit(
            "a2ui.action", payload={"surfaceId": surface_id, "action": action, "owner": owner, "route": route}
        )
        return {"event": event.to_wire(), "route": route}

    def render_report(self, session: ClientSession, params: JsonValue) -> dict[str, JsonValue]:
        report = _object(params, "a render report")
        if len(dumps(report)) > MAX_REPORT_BYTES:
            raise InvalidParams("params", f"a render report is at most {MAX_REPORT_BYTES} bytes")
        self._broadcast("a2ui.render_report", report)
        event = self.state.host.emit("a2ui.render_report", payload=report)
        return {"recorded": True, "event": event.to_wire()}
