"""Interfaces, verifyObject for every implementation, and per-state adapters."""

import pytest
from autobahn.twisted.websocket import WebSocketServerProtocol
from twisted.internet.task import Clock
from zope.interface import Interface, implementer
from zope.interface.verify import verifyClass, verifyObject

from car_twisted import AdapterRegistration, MethodSpec, StaticMethods
from car_twisted.interfaces import IClientSession, IMethodProvider, ISessionFeature, IWsSink
from car_twisted.methods.server import ServerMethods
from car_twisted.methods.session import SessionMethods
from car_twisted.ws.protocol import CarServerProtocol
from support import FakeSink, make_state


class IGreeter(Interface):
    def greet():
        """Say hello."""


@implementer(IGreeter)
class Greeter:
    def __init__(self, session, word):
        self.session, self.word = session, word

    def greet(self):
        return f"{self.word} {self.session.client_id}"


def test_protocol_provides_ws_sink():
    """The Autobahn protocol is the transport-neutral sink."""
    verifyClass(IWsSink, CarServerProtocol)
    protocol = CarServerProtocol()
    verifyObject(IWsSink, protocol)
    assert issubclass(CarServerProtocol, WebSocketServerProtocol)
    assert protocol.writable is False  # not open yet: nothing can be written


def test_method_providers(tmp_path):
    state = make_state(tmp_path)
    for provider in (SessionMethods(state), ServerMethods(state), StaticMethods([MethodSpec("a.b", print)])):
        verifyObject(IMethodProvider, provider)


def test_client_session_provides_interface(tmp_path):
    state = make_state(tmp_path)
    session = state.open_session(FakeSink())
    verifyObject(IClientSession, session)


def test_session_sink_by_adaptation(tmp_path):
    """A session's sink is reached through the state's registry."""
    state = make_state(tmp_path)
    sink = FakeSink()
    session = state.open_session(sink)
    assert state.component(session, IWsSink) is sink


def test_two_states_carry_different_components(tmp_path):
    """Adapters are per state: no global registration, no leakage between daemons."""
    hello = make_state(tmp_path, adapters=[AdapterRegistration(IClientSession, IGreeter, lambda s: Greeter(s, "hello"))])
    hola = make_state(tmp_path, adapters=[AdapterRegistration(IClientSession, IGreeter, lambda s: Greeter(s, "hola"))])
    plain = make_state(tmp_path)
    s1, s2, s3 = (st.open_session(FakeSink()) for st in (hello, hola, plain))
    assert hello.component(s1, IGreeter).greet() == "hello c1"
    assert hola.component(s2, IGreeter).greet() == "hola c1"
    assert plain.component(s3, IGreeter) is None
    verifyObject(IGreeter, hello.component(s1, IGreeter))


def test_config_rejects_non_providers(tmp_path):
    """Component fields fail at construction when the object does not provide the interface."""
    with pytest.raises(TypeError):
        make_state(tmp_path, agent_identities=object())
    with pytest.raises(Exception):
        make_state(tmp_path, method_providers=[object()])


def test_embedder_methods_and_providers(tmp_path):
    """Extra methods come from the config (specs or providers) and register_method."""
    state = make_state(
        tmp_path,
        methods=[MethodSpec("x.one", lambda s, p: 1)],
        method_providers=[StaticMethods([MethodSpec("x.two", lambda s, p: 2)])],
    )
    state.register_method("x.three", lambda s, p: 3)
    assert {"x.one", "x.two", "x.three"} <= set(state.methods.names())
    assert "x" in state.capability_names()


def test_close_session_runs_cleanups_once(tmp_path):
    """Every registered cleanup runs exactly once, in reverse order, even if one fails."""
    state = make_state(tmp_path, clock=Clock())
    session = state.open_session(FakeSink())
    calls = []
    session.on_close(lambda: calls.append("first"))
    session.on_close(lambda: 1 / 0)
    session.on_close(lambda: calls.append("last"))
    state.close_session(session)
    state.close_session(session)
    assert calls == ["last", "first"]
    assert session.client_id not in state.sessions
    session.on_close(lambda: calls.append("late"))
    assert calls[-1] == "late"


# -- per-connection features ------------------------------------------------------


def test_session_features_provide_the_interface(tmp_path):
    from car_twisted.runs.registry import RunConnection
    from car_twisted.runtime import runtime_of

    state = make_state(tmp_path, Clock())
    session = state.open_session(FakeSink())
    verifyObject(ISessionFeature, runtime_of(session))
    verifyObject(ISessionFeature, state.runs.connection(session))
    assert isinstance(state.runs.connection(session), RunConnection)


@implementer(ISessionFeature)
class Notes:
    """A feature as a new namespace would add one: no field on the session."""

    def __init__(self, session):
        self.session = session
        self.notes = []
        self.closed = False

    def holds_client_state(self):
        return bool(self.notes)

    def close(self):
        self.closed = True


def test_a_feature_is_made_once_kept_and_closed_with_the_connection(tmp_path):
    state = make_state(tmp_path, Clock())
    session = state.open_session(FakeSink())
    assert session.existing_feature(Notes) is None
    notes = session.feature(Notes, Notes)
    assert session.feature(Notes, Notes) is notes and session.existing_feature(Notes) is notes
    assert not session.holds_client_state()
    notes.notes.append("kept")
    assert session.holds_client_state()  # so the idle sweep leaves it alone
    state.close_session(session)
    assert notes.closed


def test_a_feature_made_after_close_is_closed_at_once(tmp_path):
    state = make_state(tmp_path, Clock())
    session = state.open_session(FakeSink())
    state.close_session(session)
    assert session.feature(Notes, Notes).closed


def test_a_feature_must_provide_the_interface(tmp_path):
    session = make_state(tmp_path, Clock()).open_session(FakeSink())
    with pytest.raises(TypeError, match="ISessionFeature"):
        session.feature(object, lambda s: object())
