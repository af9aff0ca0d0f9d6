"""
Who may use the dashboard, and how a browser proves it.

- **Host header**: every request names a loopback host (``localhost``,
  ``127.0.0.1``, ``[::1]``) with the port the page is served on, so a page
  on another site that rebinds its DNS name to 127.0.0.1 gets 403.
- **Login**: one one-time code at a time, written 0600 beside the token
  files (``dashboard-code``) and printed in the log as a login URL.
  ``GET /login?code=…`` with the current code (compared in constant time)
  opens a session and mints the next code, so a code works once.
- **Session**: an ``HttpOnly; SameSite=Strict; Path=/`` cookie holding a
  random id; sessions are bounded in number and expire after
  ``SESSION_IDLE_SECS`` without a request.  A session acts with the host
  role.
- **State-changing requests** (POST) also need ``Origin`` equal to the
  page's own origin and the session's CSRF token in ``X-CSRF-Token``.
"""

from __future__ import annotations

import collections
import secrets
from collections.abc import Callable
from pathlib import Path

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from car_twisted.auth import tokens_equal, write_secret_file

__all__ = ["COOKIE", "DashboardAccess", "DashboardSession", "loopback_host"]

COOKIE = b"car_dashboard"
SESSION_IDLE_SECS = 12 * 3600.0
MAX_SESSIONS = 64
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def loopback_host(host: bytes | None, port: int | None) -> bool:
    """C{host} (a Host header) is a loopback name with C{port} (any port when None)."""
    if not host:
        return False
    try:
        text = host.decode("ascii").lower()
    except UnicodeDecodeError:
        return False
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return False
        name, rest = text[: end + 1], text[end + 1 :]
    else:
        name, colon, given = text.partition(":")
        rest = colon + given
    if rest and not rest.startswith(":"):
        return False
    given = rest[1:]
    if name not in _LOOPBACK_NAMES:
        return False
    if port is None:
        return True
    return given == str(port) or (given == "" and port == 80)


@attrs.define
class DashboardSession:
    id: str
    csrf: str
    created: float
    seen: float


class DashboardAccess:
    _log = Logger()

    def __init__(self, clock: IReactorTime, code_file: Path | None) -> None:
        self.clock = clock
        self.code_file = code_file
        self._code = ""
        #: Told every code minted after the first (the service logs its URL).
        self.on_new_code: Callable[[str], object] | None = None
        self._sessions: collections.OrderedDict[str, DashboardSession] = collections.OrderedDict()
        self.new_code()

    def publish(self, code_file: Path | None) -> None:
        """Keep the current (and every next) code in C{code_file}, 0600."""
        self.code_file = code_file
        if code_file is not None:
            write_secret_file(code_file, self._code)

    # -- the login code --------------------------------------------------------------

    @property
    def code(self) -> str:
        return self._code

    def new_code(self) -> str:
        """Mint the next one-time code (and write it 0600 beside the tokens)."""
        self._code = secrets.token_urlsafe(24)
        if self.code_file is not None:
            try:
                write_secret_file(self.code_file, self._code)
            except OSError:
                self._log.failure("the dashboard login code could not be written to {path}", path=str(self.code_file))
        if self.on_new_code is not None:
            self.on_new_code(self._code)
        return self._code

    def redeem(self, code: bytes | str | None) -> DashboardSession | None:
        """A session for the current code (which is then spent), else None."""
        given = code.decode("utf-8", "replace") if isinstance(code, bytes) else code
        if not given or not tokens_equal(given, self._code):
            return None
        self.new_code()
        return self._open()

    # -- sessions ------------------------------------------------------------------------

    def _open(self) -> DashboardSession:
        now = self.clock.seconds()
        self._expire(now)
        while len(self._sessions) >= MAX_SESSIONS:
            self._sessions.popitem(last=False)  # the least recently used goes
        session = DashboardSession(secrets.token_urlsafe(32), secrets.token_urlsafe(24), now, now)
        self._sessions[session.id] = session
        return session

    def session(self, cookie: bytes | None) -> DashboardSession | None:
        """The live session a cookie names, refreshed; else None."""
        if not cookie:
            return None
        now = self.clock.seconds()
        self._expire(now)
        key = cookie.decode("ascii", "replace")
        found = self._sessions.get(key)
        if found is None:
            return None
        found.seen = now
        self._sessions.move_to_end(key)
        return found

    def close(self, session: DashboardSession) -> None:
        self._sessions.pop(session.id, None)

    def _expire(self, now: float) -> None:
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if now - oldest.seen < SESSION_IDLE_SECS:
                return
            self._sessions.popitem(last=False)

    def csrf_ok(self, session: DashboardSession, given: bytes | None) -> bool:
        return given is not None and tokens_equal(given.decode("ascii", "replace"), session.csrf)
