"""
``/ws``: the dashboard page's JSON-RPC WebSocket.

The same protocol, dispatcher and registries as the daemon's own listener,
reached only through ``DashboardRoot`` after its Host, session and Origin
checks.  The dashboard session is what authenticates the connection: it
opens with the host role, so the page never holds a token.  Logging out
closes the session's sockets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import server

from car_twisted.session import ROLE_HOST
from car_twisted.ws.protocol import CarServerFactory, CarServerProtocol

if TYPE_CHECKING:
    from car_twisted.state import ServerState
    from car_twisted.web.access import DashboardSession

__all__ = ["DashboardWsFactory", "DashboardWsProtocol", "DashboardWsResource"]


class DashboardWsProtocol(CarServerProtocol):
    factory: DashboardWsFactory
    dashboard_session: str | None = None

    def connectionMade(self) -> None:
        # Built and connected inside DashboardWsResource.render_for, for a checked session.
        self.dashboard_session = self.factory._granting
        super().connectionMade()

    def onOpen(self) -> None:
        super().onOpen()
        session = self.session
        if session is None or self.dashboard_session is None:
            self.dropConnection(abort=True)
            return
        state = self.factory.state
        if not session.authenticated and not state.admit_authenticated(session, agent=False):
            session.disconnect(1013, "server busy: too many connections")
            return
        session.role = ROLE_HOST
        session.operator = True
        session.authenticated = True
        if not self._promoted:
            self._promote()
        self.factory.opened(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.closed(self)
        super().connectionLost(reason)


class DashboardWsFactory(CarServerFactory):
    protocol = DashboardWsProtocol
    _granting: str | None = None

    def __init__(self, state: ServerState) -> None:
        super().__init__(state)
        self.by_session: dict[str, set[DashboardWsProtocol]] = {}

    def opened(self, protocol: DashboardWsProtocol) -> None:
        assert protocol.dashboard_session is not None
        self.by_session.setdefault(protocol.dashboard_session, set()).add(protocol)

    def closed(self, protocol: DashboardWsProtocol) -> None:
        key = protocol.dashboard_session
        if key is None:
            return
        protocols = self.by_session.get(key)
        if protocols is not None:
            protocols.discard(protocol)
            if not protocols:
                del self.by_session[key]

    def close_session(self, session_id: str) -> None:
        """The dashboard session ended: so do its sockets."""
        for protocol in list(self.by_session.pop(session_id, ())):
            protocol.close(1008, "logged out")


class DashboardWsResource(WebSocketResource):
    def __init__(self, factory: DashboardWsFactory) -> None:
        super().__init__(factory)
        self.factory = factory

    def render_for(self, request: server.Request, session: DashboardSession) -> bytes | int:
        # The upgraded connection is the WebSocket's now: the HTTP channel
        # must not time it out as an idle request.
        request.channel.setTimeout(None)
        # ... nor stay its producer: the protocol registers its own.
        transport = request.channel.transport
        if transport is not None:
            transport.unregisterProducer()  # type: ignore[attr-defined]  # a TCP or UNIX transport
        self.factory._granting = session.id
        try:
            result: bytes | int = self.render(request)
        finally:
            self.factory._granting = None
        return result
