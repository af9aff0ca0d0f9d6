"""
``DashboardService``: the sibling HTTP endpoint as a service to parent
under the daemon (``twist car`` does, on ``port + 1``) or an embedder's
own application.

At start it listens, writes the one-time login code 0600 beside the
token files when given a path, and logs the login URL; every time a code
is spent the next URL is logged (and written) the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from car_twisted.auth import remove_if_ours
from car_twisted.endpoints import Listen, ListenerEndpoint, listening_url
from car_twisted.web.access import DashboardAccess
from car_twisted.web.site import DashboardSite, dashboard_site

if TYPE_CHECKING:
    from car_twisted.state import ServerState

__all__ = ["DashboardService", "dashboard_listen_description"]


def dashboard_listen_description(ws_port: int) -> str:
    """``port + 1`` of the WebSocket listener on loopback (any free port when that is 0)."""
    return f"tcp:{ws_port + 1 if ws_port else 0}:interface=127.0.0.1"


class DashboardService(MultiService):
    _log = Logger()

    def __init__(
        self,
        state: ServerState,
        reactor: object,
        listen: Listen,
        code_file: Callable[[], Path | None] | None = None,
    ) -> None:
        super().__init__()
        self.setName("dashboard")
        self.state = state
        self.access = DashboardAccess(state.clock, None)
        self.access.on_new_code = self._announce
        self.site: DashboardSite = dashboard_site(state, self.access)
        self.port: IListeningPort | None = None
        self._code_file = code_file
        self._published: Path | None = None
        endpoint = ListenerEndpoint(reactor, listen, self._listening, self._failed)
        listener = StreamServerEndpointService(endpoint, self.site)
        listener._raiseSynchronously = True
        listener.setServiceParent(self)

    def startService(self) -> None:
        path = self._code_file() if self._code_file is not None else None
        if path is not None:
            self.access.publish(path)
            self._published = path
        super().startService()
        self._announce(self.access.code)

    def stopService(self):  # type: ignore[no-untyped-def]
        d = super().stopService()
        if self._published is not None:
            remove_if_ours(self._published, self.access.code)
            self._published = None
        return d

    def login_url(self, code: str) -> str | None:
        """The URL that opens a dashboard session with C{code}, once listening on TCP."""
        base = listening_url(self.port, "http") if self.port is not None else None
        return f"{base}/login?code={code}" if base is not None else None

    def _announce(self, code: str) -> None:
        if not self.running:
            return
        url = self.login_url(code)
        if url is not None:
            self._log.info("dashboard: {url}", url=url)
        elif self.port is not None:
            self._log.info(
                "dashboard on {address}: log in at /login?code={code}",
                address=str(self.port.getHost()),
                code=code,
            )

    def _listening(self, description: str, port: IListeningPort) -> None:
        self.port = port
        self._log.info("dashboard listening on {description} ({address})", description=description, address=str(port.getHost()))

    def _failed(self, description: str, failure: Failure) -> None:
        self._log.warn(
            "dashboard listener {description} failed: {error}", description=description, error=failure.getErrorMessage()
        )
