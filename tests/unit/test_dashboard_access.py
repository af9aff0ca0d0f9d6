"""Dashboard access rules (``web.access``) and the metrics collector (``web.metrics``), in memory."""

from __future__ import annotations

import os
import stat

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock

from car_twisted.web import access as access_module
from car_twisted.web.access import DashboardAccess, loopback_host
from car_twisted.web.metrics import metrics_registry, render_metrics
from support import make_state


@pytest.mark.parametrize(
    ("host", "port", "ok"),
    [
        (b"127.0.0.1:9101", 9101, True),
        (b"localhost:9101", 9101, True),
        (b"LocalHost:9101", 9101, True),
        (b"[::1]:9101", 9101, True),
        (b"127.0.0.1", 80, True),
        (b"127.0.0.1", 9101, False),  # the port must be named
        (b"127.0.0.1:9102", 9101, False),
        (b"127.0.0.1:", 9101, False),
        (b"127.0.0.2:9101", 9101, False),
        (b"evil.example:9101", 9101, False),
        (b"localhost.evil.example:9101", 9101, False),
        (b"127.0.0.1.nip.io:9101", 9101, False),
        (b"[::1", 9101, False),
        (b"[::1]x:9101", 9101, False),
        (b"[::2]:9101", 9101, False),
        (b"", 9101, False),
        (None, 9101, False),
        (b"\xff:9101", 9101, False),
        (b"localhost", None, True),  # a UNIX socket: any loopback name
        (b"evil.example", None, False),
    ],
)
def test_loopback_host(host, port, ok):
    assert loopback_host(host, port) is ok


def test_a_code_opens_one_session_and_is_replaced(tmp_path):
    clock = Clock()
    access = DashboardAccess(clock, None)
    announced = []
    access.on_new_code = announced.append
    path = tmp_path / "tokens" / "dashboard-code"
    access.publish(path)
    first = access.code
    assert path.read_text().strip() == first
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert access.redeem("wrong") is None and access.redeem(None) is None and access.redeem(b"") is None
    assert access.code == first  # a wrong code spends nothing
    session = access.redeem(first.encode())
    assert session is not None
    assert access.code != first and announced == [access.code]
    assert path.read_text().strip() == access.code
    assert access.redeem(first) is None
    assert access.session(session.id.encode()) is session
    assert access.csrf_ok(session, session.csrf.encode())
    assert not access.csrf_ok(session, None) and not access.csrf_ok(session, b"x" + session.csrf.encode())


def test_sessions_expire_when_idle_and_are_bounded(monkeypatch):
    clock = Clock()
    access = DashboardAccess(clock, None)
    session = access.redeem(access.code)
    assert session is not None
    clock.advance(access_module.SESSION_IDLE_SECS - 1)
    assert access.session(session.id.encode()) is session  # used: refreshed
    clock.advance(access_module.SESSION_IDLE_SECS - 1)
    assert access.session(session.id.encode()) is session
    clock.advance(access_module.SESSION_IDLE_SECS)
    assert access.session(session.id.encode()) is None

    monkeypatch.setattr(access_module, "MAX_SESSIONS", 3)
    opened = [access.redeem(access.code) for _ in range(4)]
    assert access.session(opened[0].id.encode()) is None  # the least recently used went
    assert all(access.session(s.id.encode()) is s for s in opened[1:])
    access.close(opened[1])
    assert access.session(opened[1].id.encode()) is None
    assert access.session(None) is None and access.session(b"unknown") is None


def test_the_collector_reads_the_daemon_counters(tmp_path):
    state = make_state(tmp_path, clock=Clock())
    stats = state.stats
    stats.request("state.get", "ok", 0.0003)
    stats.request("state.get", "ok", 0.02)
    stats.request("state.get", "-32602", 0.00005)
    stats.callback_timeouts = 2
    stats.run_turns = 7
    stats.agent_restarts = 1
    stats.subscriber_drops = 5
    stats.in_flight = 3
    text = render_metrics(metrics_registry(state)).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("car_requests_total", (("method", "state.get"), ("outcome", "ok")))] == 2
    assert samples[("car_requests_total", (("method", "state.get"), ("outcome", "-32602")))] == 1
    assert samples[("car_request_duration_seconds_bucket", (("le", "0.0001"), ("method", "state.get")))] == 1
    assert samples[("car_request_duration_seconds_bucket", (("le", "0.0005"), ("method", "state.get")))] == 2
    assert samples[("car_request_duration_seconds_bucket", (("le", "+Inf"), ("method", "state.get")))] == 3
    assert samples[("car_request_duration_seconds_sum", (("method", "state.get"),))] == pytest.approx(0.02035)
    assert samples[("car_requests_in_flight", ())] == 3
    assert samples[("car_callback_timeouts_total", ())] == 2
    assert samples[("car_run_turns_total", ())] == 7
    assert samples[("car_agent_restarts_total", ())] == 1
    assert samples[("car_subscriber_drops_total", ())] == 5
    # Each daemon has its own registry: another state's counters are apart.
    other = make_state(tmp_path / "other", clock=Clock())
    assert b"state.get" not in render_metrics(metrics_registry(other))
