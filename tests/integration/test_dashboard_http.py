"""
The sibling HTTP endpoint on a real loopback socket, driven with treq and a
real WebSocket client: the Host check, login codes, the session cookie,
``/auth-token``, CSRF and Origin on POST, the dashboard socket, body
bounds, ``/health`` and ``/metrics``.
"""

from __future__ import annotations

import json
import os
import stat
from http.cookies import SimpleCookie
from typing import Any

import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer

from car_twisted.web.service import DashboardService
from support import WsTestClient, start_server, until


class Dashboard:
    def __init__(self, reactor: Any, server: Any, service: DashboardService, code_file: Any) -> None:
        self.reactor = reactor
        self.server = server
        self.service = service
        self.code_file = code_file
        assert service.port is not None
        self.port = service.port.getHost().port
        self.host = f"127.0.0.1:{self.port}"
        self.origin = f"http://{self.host}"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def request(self, method: str, path: str, headers: dict[str, str] | None = None, **kw: Any) -> tuple[Any, bytes]:
        sent = {"Host": self.host}
        sent.update(headers or {})
        response = await treq.request(method, self.url(path), headers=sent, allow_redirects=False, **kw)
        body = await response.content()
        return response, body

    def code(self) -> str:
        return self.code_file.read_text().strip()

    async def login(self) -> tuple[str, str]:
        """A fresh session: (cookie value, CSRF token)."""
        response, _ = await self.request("GET", f"/login?code={self.code()}")
        assert response.code == 303
        cookie = SimpleCookie(response.headers.getRawHeaders("set-cookie")[0])["car_dashboard"].value
        response, body = await self.request("GET", "/api/session", {"Cookie": f"car_dashboard={cookie}"})
        assert response.code == 200
        return cookie, json.loads(body)["csrf"]


@pytest.fixture
def dashboard(reactor, tmp_path):
    holder: dict[str, Any] = {}

    async def start() -> Dashboard:
        server = await start_server(reactor, tmp_path)
        code_file = tmp_path / "tokens" / "dashboard-code"
        service = DashboardService(server.state, reactor, "tcp:0:interface=127.0.0.1", code_file=lambda: code_file)
        service.startService()
        holder["dashboard"] = Dashboard(reactor, server, service, code_file)
        return holder["dashboard"]

    yield start

    found = holder.get("dashboard")
    if found is not None:
        pytest_twisted.blockon(defer.maybeDeferred(found.service.stopService))
        pytest_twisted.blockon(defer.ensureDeferred(found.server.stop()))


@pytest_twisted.ensureDeferred
async def test_a_foreign_host_header_gets_403_everywhere(dashboard):
    d = await dashboard()
    cookie, csrf = await d.login()
    code = d.code()
    other_port = d.port + 1 if d.port < 65535 else d.port - 1
    for host in ("evil.example", f"evil.example:{d.port}", f"localhost.evil.example:{d.port}", f"127.0.0.1:{other_port}", f"127.0.0.2:{d.port}", "127.0.0.1:"):
        for method, path, extra in (
            ("GET", "/health", {}),
            ("GET", "/metrics", {}),
            ("GET", f"/login?code={code}", {}),
            ("GET", "/", {"Cookie": f"car_dashboard={cookie}"}),
            ("GET", "/auth-token", {"Cookie": f"car_dashboard={cookie}"}),
            ("POST", "/logout", {"Cookie": f"car_dashboard={cookie}", "Origin": f"http://{host}", "X-CSRF-Token": csrf}),
        ):
            response, body = await d.request(method, path, {"Host": host, **extra})
            assert response.code == 403, (host, path, response.code)
            assert d.server.state.auth_token.encode() not in body
    # The code was not spent by the refused login, and the session still works.
    assert d.code() == code
    for host in (d.host, f"localhost:{d.port}", f"LOCALHOST:{d.port}"):
        response, _ = await d.request("GET", "/health", {"Host": host})
        assert response.code == 200, host
    response, _ = await d.request("GET", "/api/session", {"Cookie": f"car_dashboard={cookie}"})
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_health_is_open_and_holds_no_secret(dashboard):
    d = await dashboard()
    response, body = await d.request("GET", "/health")
    assert response.code == 200
    health = json.loads(body)
    assert set(health) == {"status", "version", "uptime_secs", "sessions", "agents"}
    assert health["status"] == "ok" and health["agents"] == 0
    state = d.server.state
    for secret in (state.auth_token, state.host_token, d.code()):
        assert secret.encode() not in body
    assert response.headers.getRawHeaders("server") is None  # no version banner
    assert response.headers.getRawHeaders("cache-control") == ["no-store"]


@pytest_twisted.ensureDeferred
async def test_login_codes_work_once_and_the_cookie_is_strict(dashboard):
    d = await dashboard()
    assert stat.S_IMODE(os.stat(d.code_file).st_mode) == 0o600
    first = d.code()
    for wrong in ("", "nope", first[:-1], first + "x"):
        response, body = await d.request("GET", f"/login?code={wrong}")
        assert response.code == 403 and response.headers.getRawHeaders("set-cookie") is None
    response, _ = await d.request("GET", "/login")
    assert response.code == 403
    response, _ = await d.request("GET", f"/login?code={first}")
    assert response.code == 303 and response.headers.getRawHeaders("location") == ["/"]
    (raw,) = response.headers.getRawHeaders("set-cookie")
    morsel = SimpleCookie(raw)["car_dashboard"]
    assert morsel["httponly"] is True
    assert morsel["samesite"].lower() == "strict"
    assert morsel["path"] == "/"
    assert len(morsel.value) >= 40
    assert response.headers.getRawHeaders("referrer-policy") == ["no-referrer"]
    # Spent: the same code again is refused, and the next one is in the file (0600).
    response, _ = await d.request("GET", f"/login?code={first}")
    assert response.code == 403
    second = d.code()
    assert second != first and stat.S_IMODE(os.stat(d.code_file).st_mode) == 0o600
    response, _ = await d.request("GET", f"/login?code={second}")
    assert response.code == 303


@pytest_twisted.ensureDeferred
async def test_without_a_session_everything_but_the_open_paths_is_401(dashboard):
    d = await dashboard()
    for cookie in (None, "car_dashboard=forged", "car_dashboard="):
        headers = {"Cookie": cookie} if cookie else {}
        for path in ("/", "/app.js", "/api/session", "/api/stats", "/auth-token", "/ws"):
            response, body = await d.request("GET", path, headers)
            assert response.code == 401, (cookie, path)
            assert d.server.state.auth_token.encode() not in body
        response, _ = await d.request("POST", "/logout", {**headers, "Origin": d.origin})
        assert response.code == 401


@pytest_twisted.ensureDeferred
async def test_auth_token_needs_a_session_and_is_not_cached(dashboard):
    d = await dashboard()
    response, body = await d.request("GET", "/auth-token")
    assert response.code == 401 and body != d.server.state.auth_token.encode()
    cookie, _ = await d.login()
    response, body = await d.request("GET", "/auth-token", {"Cookie": f"car_dashboard={cookie}"})
    assert response.code == 200
    assert body.decode() == d.server.state.auth_token
    assert response.headers.getRawHeaders("cache-control") == ["no-store"]
    # The host token is never served.
    assert d.server.state.host_token.encode() not in body


@pytest_twisted.ensureDeferred
async def test_posts_need_the_page_origin_and_the_csrf_token(dashboard):
    d = await dashboard()
    cookie, csrf = await d.login()
    jar = {"Cookie": f"car_dashboard={cookie}"}
    for headers in (
        {"X-CSRF-Token": csrf},  # no Origin
        {"Origin": "http://evil.example", "X-CSRF-Token": csrf},  # cross-origin
        {"Origin": f"http://localhost:{d.port}", "X-CSRF-Token": csrf},  # another origin, same machine
        {"Origin": d.origin},  # no token
        {"Origin": d.origin, "X-CSRF-Token": csrf[:-1]},  # wrong token
    ):
        response, _ = await d.request("POST", "/logout", {**jar, **headers})
        assert response.code == 403, headers
    response, _ = await d.request("GET", "/api/session", jar)
    assert response.code == 200  # still logged in
    response, _ = await d.request("POST", "/logout", {**jar, "Origin": d.origin, "X-CSRF-Token": csrf})
    assert response.code == 200
    response, _ = await d.request("GET", "/api/session", jar)
    assert response.code == 401


@pytest_twisted.ensureDeferred
async def test_the_page_is_served_with_a_strict_policy(dashboard):
    d = await dashboard()
    cookie, _ = await d.login()
    response, body = await d.request("GET", "/", {"Cookie": f"car_dashboard={cookie}"})
    assert response.code == 200 and b"<html" in body
    (csp,) = response.headers.getRawHeaders("content-security-policy")
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert response.headers.getRawHeaders("x-frame-options") == ["DENY"]
    response, _ = await d.request("GET", "/app.js", {"Cookie": f"car_dashboard={cookie}"})
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/javascript")
    response, _ = await d.request("GET", "/../../etc/passwd", {"Cookie": f"car_dashboard={cookie}"})
    assert response.code == 404


@pytest_twisted.ensureDeferred
async def test_request_bodies_are_bounded(dashboard):
    d = await dashboard()
    cookie, csrf = await d.login()
    headers = {"Cookie": f"car_dashboard={cookie}", "Origin": d.origin, "X-CSRF-Token": csrf}
    response, _ = await d.request("POST", "/logout", headers, data=b"x" * (1024 * 1024))
    assert response.code == 413
    response, _ = await d.request("GET", "/api/session", {"Cookie": f"car_dashboard={cookie}"})
    assert response.code == 200  # the refused request did nothing


@pytest_twisted.ensureDeferred
async def test_the_dashboard_socket_acts_as_host_for_its_session_only(dashboard, reactor):
    d = await dashboard()
    cookie, csrf = await d.login()
    endpoint = f"tcp:127.0.0.1:{d.port}"
    url = f"ws://127.0.0.1:{d.port}/ws"
    # Without the session, or from another origin: refused before any frame.
    for headers in ({"Origin": d.origin}, {"Cookie": f"car_dashboard={cookie}", "Origin": "http://evil.example"},
                    {"Cookie": f"car_dashboard={cookie}"}):
        with pytest.raises(ConnectionError):
            await WsTestClient.connect(reactor, endpoint, url=url, headers=headers)
    client = await WsTestClient.connect(reactor, endpoint, url=url, headers={"Cookie": f"car_dashboard={cookie}", "Origin": d.origin})
    # No session.auth: host-only methods answer (after the protocol handshake every host makes).
    reply = await client.call("server.handshake", {"protocol_version": 3})
    assert "error" not in reply, reply
    reply = await client.call("host.subscribe", {})
    assert "error" not in reply, reply
    sessions = [s for s in d.server.state.sessions.values() if s.is_host]
    assert len(sessions) == 1 and sessions[0].authenticated
    # Logging out closes the session's sockets.
    response, _ = await d.request("POST", "/logout", {"Cookie": f"car_dashboard={cookie}", "Origin": d.origin, "X-CSRF-Token": csrf})
    assert response.code == 200
    code = await client.closed
    assert code == 1008
    await until(reactor, lambda: not any(s.is_host for s in d.server.state.sessions.values()), "the host session gone")


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


@pytest_twisted.ensureDeferred
async def test_metrics_parse_and_move_with_requests(dashboard):
    d = await dashboard()
    response, body = await d.request("GET", "/metrics")
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/plain; version=0.0.4")
    before = _samples(body.decode())
    assert before[("car_connections", (("state", "authenticated"),))] == 0

    client = await d.server.client()
    await client.call("session.auth", {"token": d.server.state.auth_token})
    for _ in range(3):
        await client.call("state.set", {"key": "k", "value": 1})
    await client.call("no.such.method", {})
    await client.call("state.get", {})  # invalid params

    response, body = await d.request("GET", "/metrics")
    after = _samples(body.decode())
    ok = ("car_requests_total", (("method", "state.set"), ("outcome", "ok")))
    assert after[ok] - before.get(ok, 0) == 3
    assert after[("car_requests_total", (("method", "state.get"), ("outcome", "-32602")))] >= 1
    assert after[("car_requests_total", (("method", "(unknown method)"), ("outcome", "-32601")))] >= 1
    assert after[("car_request_duration_seconds_count", (("method", "state.set"),))] == 3
    assert after[("car_request_duration_seconds_bucket", (("le", "+Inf"), ("method", "state.set")))] == 3
    assert after[("car_connections", (("state", "authenticated"),))] == 1
    cookie, _ = await d.login()
    response, body = await d.request("GET", "/api/stats", {"Cookie": f"car_dashboard={cookie}"})
    assert response.code == 200
    stats = json.loads(body)
    assert stats["requests"] >= 6 and stats["errors"] >= 2 and sum(stats["buckets"]) == stats["requests"]
    assert len(stats["buckets"]) == len(stats["bounds"]) + 1
    for name in ("car_requests_in_flight", "car_callback_timeouts_total", "car_run_turns_total",
                 "car_agent_restarts_total", "car_subscriber_drops_total"):
        assert (name, ()) in after, name
    client.drop()
