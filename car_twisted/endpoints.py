"""
Where the daemon listens: endpoint strings made safe, the UNIX socket's
liveness, and ``ListenerEndpoint``, the endpoint every listener goes
through.

A ``unix:`` listener gets ``mode=600`` and ``lockfile=0`` unless it says
otherwise (Twisted's defaults are 0666 and a pid lock file), and before it
binds, a socket file nobody answers on is removed while one a daemon
answers on refuses the listen.  ``ListenerEndpoint`` may be given its
description as a callable, read only when it listens, so a description
that depends on start-up (which socket a secondary daemon takes) is
decided in order.
"""

from __future__ import annotations

import errno
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Union

from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from car_twisted.private_files import ensure_private_dir

__all__ = [
    "StartupError",
    "ListenerEndpoint",
    "Listen",
    "secure_endpoint_description",
    "unix_socket_description",
    "unix_path",
    "socket_answers",
    "clear_stale_socket",
    "listening_url",
]

_log = Logger()

#: What a listener is given: an endpoint string, a callable giving one at
#: listen time, or any stream server endpoint.
# (Union: an interface is not a type at run time, so it takes no ``|``.)
Listen = Union[str, Callable[[], str], IStreamServerEndpoint]  # noqa: UP007


class StartupError(Exception):
    """The daemon cannot start (its socket is taken, say); said in one line."""


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


def unix_path(description: str) -> Path | None:
    """The socket path of a ``unix:`` endpoint string, else None."""
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


def _prepare_unix_socket(path: Path) -> None:
    if not path.parent.exists():
        ensure_private_dir(path.parent)
    if clear_stale_socket(path):
        raise StartupError(f"socket {path} is in use by a running daemon")


@implementer(IStreamServerEndpoint)
class ListenerEndpoint:
    """
    The endpoint one listener binds through: C{target} read at listen
    time, a UNIX socket path prepared first, and the owner told where it
    listened (C{listening(description, port)}) or that it could not
    (C{failed(description, failure)}); the outcome still reaches the
    caller of ``listen``.
    """

    def __init__(
        self,
        reactor: object,
        target: Listen,
        listening: Callable[[str, IListeningPort], None],
        failed: Callable[[str, Failure], None],
    ) -> None:
        self.reactor = reactor
        self.target = target
        self._listening = listening
        self._failed = failed

    def describe(self) -> str:
        """What this listens on, for logs (a callable target: not yet known)."""
        if isinstance(self.target, str):
            return secure_endpoint_description(self.target)
        return repr(self.target)

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        target = self.target
        description = self.describe()
        try:
            if IStreamServerEndpoint.providedBy(target):
                endpoint = target
            else:
                raw = target if isinstance(target, str) else target()
                description = secure_endpoint_description(raw)
                path = unix_path(description)
                if path is not None:
                    _prepare_unix_socket(path)
                endpoint = serverFromString(self.reactor, description)
            d = endpoint.listen(protocolFactory)
        except Exception:
            d = fail()

        def listening(port: IListeningPort) -> IListeningPort:
            self._listening(description, port)
            return port

        def failed(failure: Failure) -> Failure:
            self._failed(description, failure)
            return failure

        return d.addCallbacks(listening, failed)


def listening_url(port: IListeningPort, scheme: str) -> str | None:
    """
    C{scheme}://host:port of a TCP listener (a wildcard address named as
    127.0.0.1, an IPv6 one bracketed); None for a UNIX socket.
    """
    address = port.getHost()
    host, number = getattr(address, "host", None), getattr(address, "port", None)
    if host is None or number is None:
        return None
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{number}"
