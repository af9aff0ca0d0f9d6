"""
The standalone daemon ``twist car`` runs: the embedder's ``CarService``
plus what only a daemon that owns a state root does.

``DaemonFilesService`` starts first and stops last: it checks the state
root, takes the primary lock, writes the token files (before any listener
binds, so a client that finds the port open never reads a crashed
daemon's stale token) and picks the UNIX socket: the shared one for the
primary, ``car-server-<port>.sock`` for a secondary.  With
C{exit_on_failure} a start-up failure is one line on stderr and a
non-zero exit, and so is a listener that fails later.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from twisted.application.service import MultiService, Service
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python.failure import Failure

from car_twisted.auth import PrimaryLock, remove_if_ours, write_secret_file
from car_twisted.endpoints import Listen, StartupError, socket_answers, unix_socket_description
from car_twisted.paths import ConfigError
from car_twisted.private_files import check_private_paths
from car_twisted.service import CarService, freeze_startup_heap
from car_twisted.web.service import DashboardService, dashboard_listen_description

if TYPE_CHECKING:
    from car_twisted.state import ServerState

__all__ = [
    "DEFAULT_TCP_PORT",
    "EXIT_CONFIG",
    "EXIT_STARTUP",
    "DaemonFilesService",
    "CarDaemonService",
    "make_daemon_service",
]

DEFAULT_TCP_PORT = 9100
EXIT_CONFIG = 2
EXIT_STARTUP = 1


class DaemonFilesService(Service):
    """
    The state root's checks, the primary lock and the token files, and the
    choice of UNIX socket; undone on stop (token files removed only if they
    still hold this launch's tokens).
    """

    _log = Logger()

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.paths = state.config.paths
        self.lock = PrimaryLock(self.paths.lock_file)
        self.primary = False
        self._published: list[tuple[Path, str]] = []
        self.setName("daemon-files")

    def startService(self) -> None:
        # Before anything is read or written there: a state root another
        # user prepared (or can change) is refused outright.
        check_private_paths([self.paths.home, self.paths.token_dir, self.paths.socket_dir])
        self.primary = self.lock.acquire() and not socket_answers(self.paths.shared_socket)
        if self.primary:
            self._log.info(
                "primary daemon for {home} (lock {lock})",
                home=str(self.paths.home),
                lock=str(self.paths.lock_file),
            )
            try:
                self._publish_tokens()
            except BaseException:
                self._undo()
                raise
        else:
            self.lock.release()
            self._log.warn(
                "another daemon is primary for {home}: not writing the token files; "
                "clients must be given this daemon's token (--auth-token / CAR_AUTH_TOKEN)",
                home=str(self.paths.home),
            )
        super().startService()

    def stopService(self) -> None:
        super().stopService()
        self._undo()

    def socket_description(self, tcp_port: int | None) -> str:
        """Our UNIX socket: the shared one for the primary, else one named after our TCP port."""
        if self.primary:
            path = self.paths.shared_socket
        else:
            path = self.paths.secondary_socket(tcp_port if tcp_port is not None else os.getpid())
            self._log.warn("secondary daemon: binding {path} instead of the shared socket", path=str(path))
        return unix_socket_description(path)

    def _publish_tokens(self) -> None:
        state = self.state
        if state.auth_token is not None:
            write_secret_file(self.paths.auth_token_file, state.auth_token)
            self._published.append((self.paths.auth_token_file, state.auth_token))
            self._log.info("auth token written to {path}", path=str(self.paths.auth_token_file))
        else:
            self._log.warn("auth is DISABLED (--no-auth): any local process can drive this daemon")
        write_secret_file(self.paths.host_token_file, state.host_token)
        self._published.append((self.paths.host_token_file, state.host_token))
        self._log.info("host token written to {path}", path=str(self.paths.host_token_file))

    def _undo(self) -> None:
        for path, content in self._published:
            remove_if_ours(path, content)
        self._published = []
        self.lock.release()


class CarDaemonService(MultiService):
    """
    ``DaemonFilesService``, then the embedder's ``CarService`` on C{listen}
    (by default TCP C{port} on 127.0.0.1 and our UNIX socket).

    @ivar exit_on_failure: ``twist car``'s mode: a failure to start is one
        line on stderr and exit status 2 (configuration) or 1; a listener
        failing later stops the reactor and exits 1.
    """

    _log = Logger()

    def __init__(
        self,
        state: ServerState,
        reactor: object,
        listen: Sequence[Listen] | None,
        port: int = DEFAULT_TCP_PORT,
        exit_on_failure: bool = False,
        exit: Callable[[int], object] = os._exit,
        http: Listen | None = None,
    ) -> None:
        super().__init__()
        self.state = state
        self.reactor = reactor
        self.exit_on_failure = exit_on_failure
        self._exit = exit
        self.files = DaemonFilesService(state)
        self.files.setServiceParent(self)
        if listen:
            targets: list[Listen] = list(listen)
        else:
            # The socket is decided when it binds: after the lock (primary
            # or not) and after the TCP port a secondary names it after.
            targets = [
                f"tcp:{port}:interface=127.0.0.1",
                lambda: self.files.socket_description(self.server.tcp_port()),
            ]
        self.server = CarService(state, reactor, targets, on_fatal=self._listener_failed)
        self.server.setServiceParent(self)
        # The sibling HTTP endpoint: port + 1 beside the default listeners,
        # else only where --http puts it.
        if http is None and not listen:
            http = dashboard_listen_description(port)
        self.dashboard: DashboardService | None = None
        if http is not None and http != "none":
            self.dashboard = DashboardService(state, reactor, http, code_file=self._dashboard_code_file)
            self.dashboard.setServiceParent(self)

    def _dashboard_code_file(self) -> Path | None:
        # Only the primary owns the shared file; a secondary logs its URL only.
        return self.files.paths.dashboard_code_file if self.files.primary else None

    @property
    def factory(self) -> object:
        return self.server.factory

    def startService(self) -> None:
        try:
            super().startService()
        except Exception as e:
            for child in reversed(list(self)):
                if child.running:
                    child.stopService()
            self.running = False
            if not self.exit_on_failure:
                raise
            # One clear line and a non-zero exit, not a traceback (which
            # still goes to the log for anything unexpected).
            if not isinstance(e, (ConfigError, StartupError, CannotListenError, OSError)):
                self._log.failure("daemon start-up failed")
            self._say(str(e) or type(e).__name__)
            raise SystemExit(EXIT_CONFIG if isinstance(e, ConfigError) else EXIT_STARTUP) from None
        freeze_startup_heap()

    def _listener_failed(self, failure: Failure) -> None:
        """A listener that failed after start-up: the daemon must not run deaf."""
        if not self.exit_on_failure:
            return
        self._say(f"a listener failed: {failure.getErrorMessage()}")
        reactor = self.reactor
        reactor.addSystemEventTrigger("after", "shutdown", self._exit, EXIT_STARTUP)  # type: ignore[attr-defined]
        reactor.stop()  # type: ignore[attr-defined]

    @staticmethod
    def _say(message: str) -> None:
        sys.stderr.write("twist car: " + " ".join(message.split()) + "\n")
        sys.stderr.flush()


def make_daemon_service(
    state: ServerState,
    reactor: object,
    listen: Sequence[Listen] | None = None,
    port: int = DEFAULT_TCP_PORT,
    exit_on_failure: bool = False,
    http: Listen | None = None,
) -> CarDaemonService:
    """
    The ``twist car`` service: listeners plus the daemon's own duties.
    Without C{listen}: TCP C{port} on 127.0.0.1 and the UNIX socket, and
    the dashboard on C{port} + 1; C{http} puts the dashboard on another
    endpoint (``"none"``: no dashboard).
    """
    return CarDaemonService(state, reactor, listen, port, exit_on_failure, http=http)
