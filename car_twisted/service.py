"""
The service layer: listeners for any endpoint string, and the standalone
daemon's start-up duties (primary lock, token files, the UNIX socket).

Embedders call ``make_car_service(state, reactor, listen)`` and parent the
result under their own ``MultiService``.  ``twist car`` uses
``make_daemon_service``, which adds what only the standalone daemon does.
"""

from __future__ import annotations

import errno
import gc
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any, Sequence

from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from car_twisted.auth import PrimaryLock, remove_if_ours, write_secret_file
from car_twisted.paths import ConfigError
from car_twisted.private_files import check_private_paths, ensure_private_dir
from car_twisted.ws.protocol import CarServerFactory

__all__ = [
    "DEFAULT_TCP_PORT",
    "StartupError",
    "ListenerService",
    "CarDaemonService",
    "make_car_service",
    "make_daemon_service",
    "secure_endpoint_description",
    "freeze_startup_heap",
    "unix_socket_description",
    "socket_answers",
]

DEFAULT_TCP_PORT = 9100
EXIT_CONFIG = 2
EXIT_STARTUP = 1
_log = Logger()


class StartupError(Exception):
    """The daemon cannot start (its socket is taken, say); said in one line."""


def unix_socket_description(path: Path) -> str:
    """
    The endpoint string for our UNIX socket: 0600, and no lock file.
    Twisted's lock file names a pid, which outlives a ``kill -9`` as a
    zombie or a reused pid; whether a daemon answers on the socket is what
    decides (``clear_stale_socket``), and the primary's ``flock`` keeps
    two daemons from taking the shared socket at once.
    """
    escaped = str(path).replace("\\", "\\\\").replace(":", "\\:")
    return f"unix:{escaped}:mode=600:lockfile=0"


def _split(description: str) -> list[str]:
    return re.split(r"(?<!\\):", description)


def secure_endpoint_description(description: str) -> str:
    """
    A UNIX listener gets ``mode=600`` (Twisted's own default is 0666) and
    ``lockfile=0`` (Twisted's pid lock file is on by default; the socket's
    liveness decides instead) unless it says otherwise.  Other endpoints
    pass unchanged.
    """
    parts = _split(description)
    if parts[0].strip().lower() != "unix":
        return description
    if not any(p.startswith("mode=") for p in parts[2:]):
        description += ":mode=600"
    if not any(p.startswith("lockfile=") for p in parts[2:]):
        description += ":lockfile=0"
    return description


def unix_path(description: str) -> Path | None:
    parts = _split(description)
    if parts[0].strip().lower() != "unix" or len(parts) < 2:
        return None
    path = parts[1]
    if path.startswith("address="):
        path = path[len("address=") :]
    return Path(path.replace("\\:", ":").replace("\\\\", "\\"))


def socket_answers(path: Path) -> bool:
    """Whether a listener accepts connections on the UNIX socket C{path}."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def clear_stale_socket(path: Path) -> bool:
    """
    Remove a socket file nobody answers on (a crashed daemon's), and the
    pid lock file an earlier version kept beside it.
    @return: True if a live listener holds it.
    """
    if socket_answers(path):
        return True
    for stale in (path, path.with_name(path.name + ".lock")):
        try:
            os.lstat(stale)
        except FileNotFoundError:
            continue
        try:
            stale.unlink()
            _log.info("removed stale socket file {path}", path=str(stale))
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
    return False


def freeze_startup_heap() -> None:
    """
    Move everything allocated at start-up (modules, Twisted, Autobahn) out
    of the collector's reach.  Full collections then only scan objects made
    while serving, which keeps their pauses short under load (measured:
    proposal p99 at 16x4 fell from ~38 ms to ~14 ms).
    """
    gc.collect()
    gc.freeze()


class ListenerService(Service):
    """
    Listen on one endpoint string; log where.  A failure to bind raises
    from ``startService`` so ``twist`` exits instead of running deaf.
    """

    _log = Logger()

    def __init__(self, reactor: Any, description: str, factory: Any) -> None:
        self.reactor = reactor
        self.description = secure_endpoint_description(description)
        self.factory = factory
        self.port: Any = None
        self.setName(self.description)

    def startService(self) -> None:
        super().startService()
        path = unix_path(self.description)
        if path is not None:
            if not path.parent.exists():
                ensure_private_dir(path.parent)
            if clear_stale_socket(path):
                raise StartupError(f"socket {path} is in use by a running daemon")
        endpoint = serverFromString(self.reactor, self.description)
        failures: list[Any] = []
        d = endpoint.listen(self.factory)
        d.addCallbacks(self._listening, failures.append)
        if failures:
            failures[0].raiseException()

    def _listening(self, port: Any) -> None:
        self.port = port
        address = port.getHost()
        agents = getattr(getattr(self.factory, "state", None), "agents", None)
        if agents is not None and agents.daemon_url is None and hasattr(address, "port"):
            # Supervised agents reach the daemon over its first TCP listener.
            host = address.host if address.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
            if ":" in host:
                host = f"[{host}]"
            agents.daemon_url = f"ws://{host}:{address.port}"
        self._log.info(
            "CAR daemon listening on {description} ({address})",
            description=self.description,
            address=str(port.getHost()),
        )

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


class EnginesService(Service):
    """
    Starts and stops what runs beside the listeners: auto-starts the
    manifest's agents, and at shutdown stops every child and cancels the
    run grace timers (open runs then read as incomplete).
    """

    def __init__(self, state: Any) -> None:
        self.state = state
        self.setName("engines")

    def startService(self) -> None:
        super().startService()
        self.state.agents.load()
        self.state.agents.boot()

    def stopService(self) -> Any:
        super().stopService()
        self.state.runs.shutdown()
        return self.state.agents.shutdown()


def make_car_service(state: Any, reactor: Any, listen: Sequence[str]) -> MultiService:
    """
    The CAR server on every endpoint string in C{listen}, plus the agent
    engines (agent supervisor, run registry), as one ``MultiService`` to parent under an application's own.
    """
    factory = CarServerFactory(state, reactor=reactor)
    top = MultiService()
    for description in listen:
        ListenerService(reactor, description, factory).setServiceParent(top)
    EnginesService(state).setServiceParent(top)
    return top


class CarDaemonService(MultiService):
    """
    The standalone daemon: takes the primary lock of its state root,
    publishes the token files (primary only), picks its UNIX socket, then
    starts the listeners; undoes all of it on a graceful stop.
    """

    _log = Logger()

    def __init__(
        self,
        state: Any,
        reactor: Any,
        listen: Sequence[str] | None,
        port: int = DEFAULT_TCP_PORT,
        exit_on_failure: bool = False,
    ) -> None:
        super().__init__()
        self.state = state
        self.reactor = reactor
        self.exit_on_failure = exit_on_failure
        self.paths = state.config.paths
        self.explicit_listen = list(listen) if listen else None
        self.port = port
        self.factory = CarServerFactory(state, reactor=reactor)
        self.lock = PrimaryLock(self.paths.lock_file)
        self.primary = False
        self._published: list[tuple[Path, str]] = []

    def startService(self) -> None:
        try:
            self._start()
        except Exception as e:
            if not self.exit_on_failure:
                raise
            # twist car: one clear line and a non-zero exit, not a
            # traceback (which still goes to the log for anything odd).
            if not isinstance(e, (ConfigError, StartupError, CannotListenError, OSError)):
                self._log.failure("daemon start-up failed")
            sys.stderr.write(f"twist car: {_one_line(e)}\n")
            sys.stderr.flush()
            raise SystemExit(EXIT_CONFIG if isinstance(e, ConfigError) else EXIT_STARTUP)

    def _start(self) -> None:
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
        else:
            self.lock.release()
            self._log.warn(
                "another daemon is primary for {home}: not writing the token files; "
                "clients must be given this daemon's token (--auth-token / CAR_AUTH_TOKEN)",
                home=str(self.paths.home),
            )
        if self.explicit_listen is not None:
            listen = self.explicit_listen
        else:
            listen = [f"tcp:{self.port}:interface=127.0.0.1", "unix-default"]
        try:
            # Tokens first: a client that sees the port open must never read
            # a stale token file left behind by a daemon that crashed.
            self._publish_tokens()
            for description in listen:
                if description == "unix-default":
                    description = self._default_socket_description()
                ListenerService(self.reactor, description, self.factory).setServiceParent(self)
                # setServiceParent on a running parent starts the child; the
                # parent is not running yet, so start it here in order (the
                # secondary's socket name needs the bound TCP port).
                self.getServiceNamed(
                    secure_endpoint_description(description)
                ).startService()
            engines = EnginesService(self.state)
            engines.setServiceParent(self)
            engines.startService()
            freeze_startup_heap()
        except Exception:
            for child in list(self):
                child.stopService()
            self._stop_sync()
            raise
        Service.startService(self)

    def _default_socket_description(self) -> str:
        if self.primary:
            path = self.paths.shared_socket
        else:
            tcp_ports = [
                s.port.getHost().port
                for s in self
                if s.port is not None and hasattr(s.port.getHost(), "port")
            ]
            port = tcp_ports[0] if tcp_ports else self.port
            path = self.paths.secondary_socket(port)
            self._log.warn(
                "secondary daemon: binding {path} instead of the shared socket", path=str(path)
            )
        return unix_socket_description(path)

    def _publish_tokens(self) -> None:
        state = self.state
        if not self.primary:
            return
        if state.auth_token is not None:
            write_secret_file(self.paths.auth_token_file, state.auth_token)
            self._published.append((self.paths.auth_token_file, state.auth_token))
            self._log.info("auth token written to {path}", path=str(self.paths.auth_token_file))
        else:
            self._log.warn("auth is DISABLED (--no-auth): any local process can drive this daemon")
        write_secret_file(self.paths.host_token_file, state.host_token)
        self._published.append((self.paths.host_token_file, state.host_token))
        self._log.info("host token written to {path}", path=str(self.paths.host_token_file))

    def _stop_sync(self) -> None:
        for path, content in self._published:
            remove_if_ours(path, content)
        self._published = []
        self.lock.release()

    def stopService(self) -> Any:
        d = super().stopService()
        self._stop_sync()
        return d


def make_daemon_service(
    state: Any,
    reactor: Any,
    listen: Sequence[str] | None = None,
    port: int = DEFAULT_TCP_PORT,
    exit_on_failure: bool = False,
) -> CarDaemonService:
    """
    The ``twist car`` service: listeners plus the daemon's own duties.
    Without C{listen}: TCP C{port} on 127.0.0.1 and the UNIX socket.
    With C{exit_on_failure}, a start-up failure prints one line to stderr
    and exits (2 for configuration, 1 otherwise) instead of raising.
    """
    return CarDaemonService(state, reactor, listen, port, exit_on_failure)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text
