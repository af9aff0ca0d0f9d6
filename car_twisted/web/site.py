"""
The sibling HTTP endpoint: ``/health``, ``/metrics`` and the dashboard.

``dashboard_site(state, access)`` is a ``twisted.web`` ``Site`` an
embedder can listen on anywhere (``DashboardService`` does that as a
service); it owns the root of its endpoint (the page's paths and its
cookie are absolute), and ``twist car`` serves it on ``port + 1``.  Every request names
a loopback ``Host`` (``access.loopback_host``); everything but
``/health``, ``/metrics`` and ``/login`` needs a dashboard session
cookie; POSTs also need the page's own ``Origin`` and the session's CSRF
token.  The page speaks JSON-RPC to the daemon over ``/ws``, a WebSocket
whose connections act with the host role because the session let them
in (``web.ws``): the page never sees a token.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

import orjson
from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.resource import Resource

from car_twisted._version import __version__
from car_twisted.stats import LATENCY_BUCKETS
from car_twisted.web.access import COOKIE, DashboardAccess, DashboardSession, loopback_host
from car_twisted.web.metrics import CONTENT_TYPE, metrics_registry, render_metrics
from car_twisted.web.ws import DashboardWsFactory, DashboardWsResource

if TYPE_CHECKING:
    from car_twisted.state import ServerState

__all__ = ["DashboardRoot", "MAX_BODY_BYTES", "dashboard_site"]

#: No endpoint here reads a request body; a larger one is refused (413).
MAX_BODY_BYTES = 16 * 1024
_STATIC = {
    b"": ("index.html", b"text/html; charset=utf-8"),
    b"app.js": ("app.js", b"text/javascript; charset=utf-8"),
    b"surface.js": ("surface.js", b"text/javascript; charset=utf-8"),
    b"rpc.js": ("rpc.js", b"text/javascript; charset=utf-8"),
    b"svg.js": ("svg.js", b"text/javascript; charset=utf-8"),
    b"dom.js": ("dom.js", b"text/javascript; charset=utf-8"),
    b"state.js": ("state.js", b"text/javascript; charset=utf-8"),
    b"agents.js": ("agents.js", b"text/javascript; charset=utf-8"),
    b"runs.js": ("runs.js", b"text/javascript; charset=utf-8"),
    b"approvals.js": ("approvals.js", b"text/javascript; charset=utf-8"),
    b"events.js": ("events.js", b"text/javascript; charset=utf-8"),
    b"chat.js": ("chat.js", b"text/javascript; charset=utf-8"),
    b"surfaces.js": ("surfaces.js", b"text/javascript; charset=utf-8"),
    b"metrics.js": ("metrics.js", b"text/javascript; charset=utf-8"),
    b"app.css": ("app.css", b"text/css; charset=utf-8"),
}
_CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"connect-src 'self' ws: wss:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def _common_headers(request: server.Request) -> None:
    request.responseHeaders.removeHeader(b"server")  # no version banner
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"x-frame-options", b"DENY")
    # The login URL carries the code: never let it out as a Referer.
    request.setHeader(b"referrer-policy", b"no-referrer")
    request.setHeader(b"cache-control", b"no-store")


def _json(request: server.Request, code: int, body: object) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    return orjson.dumps(body)


def _local_port(request: server.Request) -> int | None:
    port = getattr(request.getHost(), "port", None)
    return int(port) if port is not None else None


class BoundedRequest(server.Request):
    """A request whose body may not exceed ``MAX_BODY_BYTES`` (413, then closed)."""

    _received = 0
    _refused = False

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > MAX_BODY_BYTES:
            self._refuse()
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > MAX_BODY_BYTES:
            self._refuse()
            return
        super().handleContentChunk(data)

    def _refuse(self) -> None:
        self._refused = True
        channel = self.channel
        transport = channel.transport if channel is not None else None
        if transport is not None:
            transport.write(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            transport.loseConnection()


class DashboardRoot(Resource):
    """Every path of the sibling endpoint, behind the Host check."""

    isLeaf = True
    _log = Logger()

    def __init__(self, state: ServerState, access: DashboardAccess) -> None:
        super().__init__()
        self.state = state
        self.access = access
        self.registry = metrics_registry(state)
        self.ws_factory = DashboardWsFactory(state)
        self.ws = DashboardWsResource(self.ws_factory)
        self._files: dict[bytes, bytes] = {}

    # -- dispatch -------------------------------------------------------------------------

    def render(self, request: server.Request) -> bytes | int:
        _common_headers(request)
        if not loopback_host(request.getHeader(b"host"), _local_port(request)):
            # A page whose DNS name was rebound to 127.0.0.1 names its own host.
            return _json(request, http.FORBIDDEN, {"error": "the Host header must name this loopback address"})
        path = request.path
        method = request.method
        if path == b"/health" and method in (b"GET", b"HEAD"):
            return self.health(request)
        if path == b"/metrics" and method in (b"GET", b"HEAD"):
            request.setHeader(b"content-type", CONTENT_TYPE)
            return render_metrics(self.registry)
        if path == b"/login" and method == b"GET":
            return self.login(request)
        session = self.access.session(request.getCookie(COOKIE))
        if session is None:
            return self.unauthenticated(request)
        if method == b"POST":
            if not self._same_origin(request) or not self.access.csrf_ok(session, request.getHeader(b"x-csrf-token")):
                return _json(request, http.FORBIDDEN, {"error": "cross-origin or missing CSRF token"})
            if path == b"/logout":
                return self.logout(request, session)
            return _json(request, http.NOT_FOUND, {"error": "not found"})
        if method not in (b"GET", b"HEAD"):
            return _json(request, http.NOT_ALLOWED, {"error": "method not allowed"})
        if path == b"/ws":
            if not self._same_origin(request):
                return _json(request, http.FORBIDDEN, {"error": "the dashboard socket is for the dashboard's own page"})
            return self.ws.render_for(request, session)
        if path == b"/auth-token":
            return self.auth_token(request)
        if path == b"/api/session":
            return _json(
                request,
                http.OK,
                {"csrf": session.csrf, "version": __version__, "ws": "/ws", "auth_enabled": self.state.auth_enabled},
            )
        if path == b"/api/stats":
            return _json(request, http.OK, self.stats())
        if path.startswith(b"/") and path[1:] in _STATIC:
            return self.static(request, path[1:])
        return _json(request, http.NOT_FOUND, {"error": "not found"})

    def _same_origin(self, request: server.Request) -> bool:
        origin = request.getHeader(b"origin")
        host = request.getHeader(b"host")
        return origin is not None and host is not None and origin.lower() == b"http://" + host.lower()

    # -- the endpoints ---------------------------------------------------------------------

    def health(self, request: server.Request) -> bytes:
        state = self.state
        return _json(
            request,
            http.OK,
            {
                "status": "ok",
                "version": __version__,
                "uptime_secs": round(state.clock.seconds() - state.started_at, 3),
                "sessions": len(state.sessions),
                "agents": len(state.agents.list()),
            },
        )

    def stats(self) -> dict[str, object]:
        """The counters the page charts: totals since start and the latency histogram, summed over methods."""
        stats = self.state.stats
        buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        total_seconds = 0.0
        for per in stats.methods.values():
            for i, count in enumerate(per.buckets):
                buckets[i] += count
            total_seconds += per.total_seconds
        count, errors = stats.totals()
        return {
            "time": self.state.clock.seconds(),
            "requests": count,
            "errors": errors,
            "in_flight": stats.in_flight,
            "seconds": total_seconds,
            "bounds": list(LATENCY_BUCKETS),
            "buckets": buckets,
            "sessions": len(self.state.sessions),
            "callback_timeouts": stats.callback_timeouts,
            "run_turns": stats.run_turns,
            "agent_restarts": stats.agent_restarts,
            "subscriber_drops": stats.subscriber_drops,
        }

    def login(self, request: server.Request) -> bytes:
        codes = request.args.get(b"code") or [b""]
        session = self.access.redeem(codes[0])
        if session is None:
            self._log.warn("dashboard login refused (wrong or spent code)")
            request.setResponseCode(http.FORBIDDEN)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return (
                b"This login code is wrong or has been used. Open the dashboard URL the daemon "
                b"logged, or the code in the dashboard-code file beside its token files.\n"
            )
        self._log.info("dashboard session opened")
        request.addCookie(COOKIE, session.id.encode(), path=b"/", httpOnly=True, sameSite="strict")
        request.setResponseCode(http.SEE_OTHER)
        request.setHeader(b"location", b"/")
        return b""

    def logout(self, request: server.Request, session: DashboardSession) -> bytes:
        self.access.close(session)
        self.ws_factory.close_session(session.id)
        request.addCookie(COOKIE, b"", path=b"/", httpOnly=True, sameSite="strict", max_age=b"0")
        return _json(request, http.OK, {"ok": True})

    def unauthenticated(self, request: server.Request) -> bytes:
        if request.path == b"/" and request.method in (b"GET", b"HEAD"):
            request.setResponseCode(http.UNAUTHORIZED)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"Log in with the dashboard URL the daemon logged at start-up (it carries a one-time code).\n"
        return _json(request, http.UNAUTHORIZED, {"error": "log in first (the dashboard URL in the daemon's log)"})

    def auth_token(self, request: server.Request) -> bytes:
        token = self.state.auth_token
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return (token or "").encode()

    def static(self, request: server.Request, name: bytes) -> bytes:
        filename, content_type = _STATIC[name]
        body = self._files.get(name)
        if body is None:
            # Small files in the package, read once (at the first page load).
            body = self._files[name] = resources.files("car_twisted.web").joinpath("static").joinpath(filename).read_bytes()
        request.setHeader(b"content-type", content_type)
        if filename == "index.html":
            request.setHeader(b"content-security-policy", _CSP)
        return body


class DashboardSite(server.Site):
    """No access log: the login URL carries a code, and it must not reach a log."""

    noisy = False
    displayTracebacks = False

    def log(self, request: http.Request) -> None:
        pass


def dashboard_site(state: ServerState, access: DashboardAccess) -> DashboardSite:
    """The sibling endpoint for C{state}, to listen on any stream endpoint."""
    return DashboardSite(DashboardRoot(state, access), requestFactory=BoundedRequest)
