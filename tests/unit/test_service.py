"""
The service layer on a memory reactor: Twisted's endpoint services under
the embedder's CarService, failures raised or fatal, listens cancellable,
and the daemon built as that service plus its files child.
"""

import pytest
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from zope.interface import implementer
from zope.interface.verify import verifyObject

from car_twisted.web.service import DashboardService
from car_twisted.daemon import CarDaemonService, DaemonFilesService
from car_twisted.endpoints import ListenerEndpoint
from car_twisted.service import CarService, EnginesService, make_car_service
from support import make_state


@implementer(IStreamServerEndpoint)
class LateEndpoint:
    """An endpoint whose listen answers only when the test says so."""

    def __init__(self):
        self.pending = None
        self.cancelled = False

    def listen(self, factory):
        self.pending = Deferred(lambda d: setattr(self, "cancelled", True))
        return self.pending


@implementer(IStreamServerEndpoint)
class BrokenEndpoint:
    def listen(self, factory):
        return fail(CannotListenError("127.0.0.1", 9, OSError("in use")))


@pytest.fixture
def logged():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def test_listener_endpoint_provides_the_interface():
    verifyObject(IStreamServerEndpoint, ListenerEndpoint(MemoryReactorClock(), "tcp:0", print, print))


def test_listeners_are_twisted_endpoint_services_then_engines(tmp_path):
    reactor = MemoryReactorClock()
    service = make_car_service(make_state(tmp_path, reactor), reactor, ["tcp:9100:interface=127.0.0.1", f"unix:{tmp_path}/s.sock"])
    kinds = [type(child).__name__ for child in service]
    assert kinds == ["StreamServerEndpointService", "StreamServerEndpointService", "EnginesService"]
    service.startService()
    try:
        assert service.tcp_port() == 9100 and service.daemon_url() == "ws://127.0.0.1:9100"
        assert service.state.agents.daemon_url == "ws://127.0.0.1:9100"
        (unix,) = reactor.unixServers
        assert unix[0] == f"{tmp_path}/s.sock" and unix[3] == 0o600 and unix[4] is False  # mode, no pid lock
    finally:
        service.stopService()


def test_a_bind_failure_raises_and_starts_nothing_more(tmp_path):
    reactor = MemoryReactorClock()
    service = CarService(make_state(tmp_path, reactor), reactor, ["tcp:9100", BrokenEndpoint()])
    with pytest.raises(CannotListenError):
        service.startService()
    assert not service.running and not any(child.running for child in service)
    engines = [c for c in service if isinstance(c, EnginesService)]
    assert engines and not engines[0].running


def test_stop_cancels_a_pending_listen(tmp_path, logged):
    reactor = MemoryReactorClock()
    late = LateEndpoint()
    service = CarService(make_state(tmp_path, reactor), reactor, [late])
    service.startService()
    assert late.pending is not None and not late.cancelled
    service.stopService()
    assert late.cancelled
    assert not [e for e in logged if e.get("log_level") is not None and e["log_level"].name in ("error", "critical")]


def test_late_failure_is_logged_for_embedders(tmp_path, logged):
    reactor = MemoryReactorClock()
    late = LateEndpoint()
    fatal = []
    service = CarService(make_state(tmp_path, reactor), reactor, [late], on_fatal=fatal.append)
    service.startService()
    late.pending.errback(CannotListenError("127.0.0.1", 9, OSError("gone")))
    (event,) = [e for e in logged if e.get("log_format", "").startswith("listener {description} failed")]
    assert event["log_level"].name == "critical" and "gone" in event["error"]
    assert len(fatal) == 1 and fatal[0].check(CannotListenError)
    service.stopService()


def test_daemon_exits_nonzero_when_a_listener_fails_late(tmp_path, capsys):
    """A listen that fails after start-up stops the reactor; once it has shut down the process exits 1."""
    reactor = MemoryReactorClock()
    late = LateEndpoint()
    exits = []
    state = make_state(tmp_path, reactor)
    daemon = CarDaemonService(state, reactor, [late], exit_on_failure=True, exit=exits.append)
    daemon.startService()
    assert daemon.running and not reactor.hasStopped
    late.pending.errback(CannotListenError("127.0.0.1", 9100, OSError("address in use")))
    assert reactor.hasStopped
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("twist car: a listener failed:") and "address in use" in err[0]
    (after,) = reactor.triggers["after"]["shutdown"]
    fn, args, kw = after
    fn(*args, **kw)
    assert exits == [1]
    daemon.stopService()


def test_daemon_is_files_then_the_embedders_service(tmp_path):
    """
    The daemon's children: the files service (started first, stopped last),
    then a CarService, then the dashboard on port + 1.
    """
    reactor = MemoryReactorClock()
    daemon = CarDaemonService(make_state(tmp_path, reactor), reactor, None, port=9100)
    first, second, third = list(daemon)
    assert isinstance(first, DaemonFilesService) and isinstance(second, CarService)
    assert isinstance(third, DashboardService)
    daemon.startService()
    try:
        assert first.primary
        ws, http = reactor.tcpServers
        (unix,) = reactor.unixServers
        assert ws[0] == 9100 and unix[0].endswith("run/car-server.sock")
        assert http[0] == 9101 and http[3] == "127.0.0.1"
    finally:
        daemon.stopService()
    assert not first.lock.held
