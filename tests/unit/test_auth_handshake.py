"""session.auth and server.handshake on a fake sink with a Clock."""

import json

import pytest
from twisted.internet.task import Clock
from zope.interface import implementer

from car_twisted.errors import AgentAlreadyAttached
from car_twisted.interfaces import IAgentIdentities
from car_twisted.rpc.dispatch import Dispatcher
from support import HOST_TOKEN, TOKEN, FakeSink, make_state, request


class Conn:
    def __init__(self, state):
        self.state = state
        self.sink = FakeSink()
        self.session = state.open_session(self.sink)
        self.dispatcher = Dispatcher(state)

    def call(self, method, params=None, rid=1):
        self.dispatcher.dispatch_text(self.session, request(method, params, rid))
        out = self.sink.pop()
        return out[-1] if out else None


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def state(tmp_path, clock):
    return make_state(tmp_path, clock)


def test_token_auth(state):
    """The daemon token authenticates; the result is what the client expects."""
    c = Conn(state)
    assert c.call("session.auth", {"token": TOKEN}, 0) == {
        "jsonrpc": "2.0",
        "id": 0,
        "result": {"ok": True, "auth_enabled": True},
    }
    assert c.session.authenticated and c.session.role is None


def test_wrong_token_then_retry_on_same_socket(state):
    """A wrong token answers -32603 and stays open; a second session.auth (id 1) is accepted."""
    c = Conn(state)
    reply = c.call("session.auth", {"token": "old-token"}, 0)
    assert reply["error"] == {"code": -32603, "message": "auth failed: token mismatch"}
    assert not c.session.authenticated and c.sink.closed_with is None
    assert c.call("session.auth", {"token": TOKEN}, 1)["result"]["ok"] is True


def test_unauthenticated_call_is_refused_then_closed(state):
    """Any other method before auth answers -32001 and closes the connection."""
    c = Conn(state)
    reply = c.call("server.handshake", {"protocol_version": 3}, 2)
    assert reply["error"]["code"] == -32001 and reply["id"] == 2
    assert c.sink.closed_with == (1008, "auth required")


def test_unauthenticated_after_failed_auth_is_closed(state):
    c = Conn(state)
    c.call("session.auth", {"token": "bad"}, 0)
    assert c.call("capabilities.list", {}, 3)["error"]["code"] == -32001
    assert c.sink.closed_with is not None


def test_host_token_grants_host_role(state):
    """The host token authenticates with role host; the daemon token does not work as one."""
    c = Conn(state)
    assert c.call("session.auth", {"host_token": HOST_TOKEN, "memory_namespace": "ns"}, 0)["result"] == {
        "ok": True,
        "auth_enabled": True,
        "role": "host",
        "memory_namespace": "ns",
    }
    assert c.session.is_host and c.session.memory_namespace == "ns"
    d = Conn(state)
    assert d.call("session.auth", {"host_token": TOKEN}, 0)["error"]["code"] == -32603
    assert not d.session.is_host


def test_host_token_with_token_is_invalid_params(state):
    c = Conn(state)
    reply = c.call("session.auth", {"host_token": HOST_TOKEN, "token": TOKEN}, 0)
    assert reply["error"]["code"] == -32602 and reply["error"]["data"]["field"] == "host_token"


def test_memory_namespace_recorded(state):
    c = Conn(state)
    reply = c.call("session.auth", {"token": TOKEN, "memory_namespace": "myapp-1"}, 0)
    assert reply["result"]["memory_namespace"] == "myapp-1"
    assert c.session.memory_namespace == "myapp-1"


@pytest.mark.parametrize(
    "params,field",
    [({"token": 5}, "token"), ({"token": TOKEN, "memory_namespace": ""}, "memory_namespace"),
     ({"token": TOKEN, "memory_namespace": "x" * 300}, "memory_namespace"), ({}, "token")],
)
def test_bad_auth_params(state, params, field):
    c = Conn(state)
    reply = c.call("session.auth", params, 0)
    assert reply["error"]["code"] == -32602 and reply["error"]["data"]["field"] == field


def test_too_many_failures_close(state, clock):
    """Wrong tokens are bounded per connection: the fifth closes it after the reply."""
    c = Conn(state)
    for i in range(5):
        assert c.call("session.auth", {"token": f"bad-{i}"}, 0)["error"]["code"] == -32603
    assert c.sink.closed_with is None
    clock.advance(0)
    assert c.sink.closed_with == (1008, "too many auth failures")


@pytest.mark.parametrize(
    "bad",
    [{"token": 12345}, {"token": ["x"]}, {"host_token": {"a": 1}}, {"token": "t", "memory_namespace": ""}, ["a"]],
)
def test_malformed_auth_counts_as_a_wrong_token(state, clock, bad):
    """A session.auth of the wrong shape counts toward the limit too, and still answers -32602."""
    c = Conn(state)
    for i in range(5):
        reply = c.call("session.auth", bad, i)
        assert reply["error"]["code"] == -32602, reply
    clock.advance(0)
    assert c.sink.closed_with == (1008, "too many auth failures")
    assert not c.session.authenticated


@pytest.mark.parametrize(
    "frame",
    [
        b"not json",
        b'{"jsonrpc":"2.0","id":1,"method":"session.auth","params":"x"}',
        b'{"jsonrpc":"1.0","id":1,"method":"session.auth","params":{}}',
        b'{"jsonrpc":"2.0","id":[1],"method":"session.auth"}',
        b"[]",
        b"42",
    ],
)
def test_malformed_frames_before_auth_are_bounded(state, clock, frame):
    """Before auth each malformed frame is answered but counts like a wrong token: the fifth closes."""
    c = Conn(state)
    for _ in range(5):
        c.dispatcher.dispatch_text(c.session, frame)
        (reply,) = c.sink.pop()
        assert reply["error"]["code"] in (-32700, -32600), reply
    clock.advance(0)
    assert c.sink.closed_with == (1008, "too many auth failures")


def test_no_auth(tmp_path, clock):
    """With auth disabled every call works and session.auth answers auth_enabled false."""
    state = make_state(tmp_path, clock, auth_enabled=False)
    c = Conn(state)
    assert c.call("capabilities.list", {}, 3)["result"]["auth_enabled"] is False
    assert c.call("session.auth", {"token": "anything"}, 0)["result"] == {"ok": True, "auth_enabled": False}
    assert c.call("session.auth", {}, 0)["result"]["ok"] is True
    assert clock.getDelayedCalls() == []


def test_unknown_agent_is_a_plain_mismatch(state):
    """An agent the manifest does not know fails like a wrong token: nothing is revealed."""
    c = Conn(state)
    reply = c.call("session.auth", {"agent_id": "agent-7", "token": "agtok"}, 0)
    assert reply["error"] == {"code": -32603, "message": "auth failed: token mismatch"}
    assert not c.session.authenticated


@implementer(IAgentIdentities)
class Identities:
    def __init__(self):
        self.tokens = {"agent-7": "agtok-7"}
        self.attached = {}

    def verify(self, agent_id, token):
        return self.tokens.get(agent_id) == token

    def attach(self, agent_id, session):
        if agent_id in self.attached:
            raise AgentAlreadyAttached(agent_id)
        self.attached[agent_id] = session

    def detach(self, agent_id, session):
        if self.attached.get(agent_id) is session:
            del self.attached[agent_id]


def test_agent_binding_with_registry(tmp_path, clock):
    """An agent's own token binds it; a second connection is refused; disconnect releases."""
    identities = Identities()
    state = make_state(tmp_path, clock, agent_identities=identities)
    a, b = Conn(state), Conn(state)
    assert a.call("session.auth", {"agent_id": "agent-7", "token": TOKEN}, 0)["error"]["code"] == -32603
    ok = a.call("session.auth", {"agent_id": "agent-7", "token": "agtok-7"}, 1)
    assert ok["result"] == {"ok": True, "auth_enabled": True, "agent_id": "agent-7"}
    assert a.session.agent_id == "agent-7"
    refused = b.call("session.auth", {"agent_id": "agent-7", "token": "agtok-7"}, 0)
    assert "already attached on another connection" in refused["error"]["message"]
    state.close_session(a.session)
    assert "agent-7" not in identities.attached
    assert b.call("session.auth", {"agent_id": "agent-7", "token": "agtok-7"}, 1)["result"]["ok"]


# -- handshake --------------------------------------------------------------


@pytest.fixture
def authed(state):
    c = Conn(state)
    c.call("session.auth", {"token": TOKEN}, 0)
    return c


@pytest.mark.parametrize("version", [3, 2])
def test_handshake_versions(authed, version):
    """Protocol 3 (car-runtime 0.58.0) and 2 negotiate exactly."""
    reply = authed.call(
        "server.handshake",
        {"client_version": "0.58.0", "protocol_version": version, "required_capabilities": []},
        2,
    )
    result = reply["result"]
    assert result["protocol_version"] == version and result["client_protocol_version"] == version
    assert isinstance(result["server_version"], str)
    assert authed.session.protocol_version == version


@pytest.mark.parametrize(
    "params,needle",
    [
        ({}, "missing"),
        ({"protocol_version": "3"}, "must be a number"),
        ({"protocol_version": True}, "must be a number"),
        ({"protocol_version": 4}, "client speaks 4"),
        ({"protocol_version": 1}, "client speaks 1"),
        ({"protocol_version": 3, "required_capabilities": ["session", "teleport", "warp.drive"]}, "teleport, warp.drive"),
    ],
)
def test_handshake_mismatch(authed, params, needle):
    """Bad or unsupported versions and missing capabilities answer -32006 naming them."""
    reply = authed.call("server.handshake", params, 2)
    assert reply["error"]["code"] == -32006
    assert reply["error"]["message"].startswith("protocol version mismatch:")
    assert needle in reply["error"]["message"]
    assert authed.session.protocol_version is None


def test_handshake_repeat_is_idempotent_and_exact(authed):
    assert authed.call("server.handshake", {"protocol_version": 3}, 2)["result"]["protocol_version"] == 3
    assert authed.call("server.handshake", {"protocol_version": 3}, 3)["result"]["protocol_version"] == 3
    reply = authed.call("server.handshake", {"protocol_version": 2}, 4)
    assert reply["error"]["code"] == -32006
    assert authed.session.protocol_version == 3


def test_required_capabilities_that_exist(authed):
    reply = authed.call("server.handshake", {"protocol_version": 3, "required_capabilities": ["session.auth", "server"]}, 2)
    assert reply["result"]["protocol_version"] == 3


def test_handshake_gate(authed, state):
    """A method declared requires_handshake answers -32005 before negotiation, then runs."""
    state.register_method("app.watch", lambda s, p: "watching", requires_handshake=True)
    assert authed.call("app.watch", {}, 3)["error"]["code"] == -32005
    authed.call("server.handshake", {"protocol_version": 3}, 2)
    assert authed.call("app.watch", {}, 4)["result"] == "watching"


def test_capabilities_and_schema(authed, state):
    """capabilities.list and server.schema report what is registered, embedder methods included."""
    state.register_method("app.hello", lambda s, p: "hi")
    caps = authed.call("capabilities.list", {}, 3)["result"]
    assert "app.hello" in caps["methods"] and "app" in caps["namespaces"]
    assert caps["protocol_versions"] == [2, 3]
    schema = authed.call("server.schema", {}, 4)["result"]
    assert schema["methods"]["session.auth"]["params"]["token"] == {"type": "string | null", "required": False}
    assert schema["methods"]["session.auth"]["requires_auth"] is False
    json.dumps(schema)


# -- idle connections ---------------------------------------------------------


def test_idle_sessions_are_reaped(tmp_path, clock):
    """Silent authenticated connections close after idle_timeout; busy, pinned and agent ones stay."""
    state = make_state(tmp_path, clock, idle_timeout=100.0, agent_identities=Identities())
    quiet, chatty, pinned, waiting, agent = (Conn(state) for _ in range(5))
    for c in (quiet, chatty, pinned, waiting):
        c.call("session.auth", {"token": TOKEN}, 0)
    agent.call("session.auth", {"agent_id": "agent-7", "token": "agtok-7"}, 0)
    pinned.session.activity.pin()
    waiting.session.channel.request("tools.execute", {}, timeout=None)
    for _ in range(5):
        clock.advance(30)
        chatty.session.activity.active = True  # what the protocol does on every frame
        state.reap_idle()
    assert quiet.sink.closed_with == (1000, "idle timeout")
    for c in (chatty, pinned, waiting, agent):
        assert c.sink.closed_with is None
    pinned.session.activity.unpin()
    clock.advance(200)
    state.reap_idle()
    state.reap_idle()
    assert pinned.sink.closed_with == (1000, "idle timeout")


@pytest.mark.parametrize(
    "registers",
    [
        ("tools.register", [{"name": "echo"}]),
        ("policy.register", {"name": "p", "rule": "deny_tool", "target": "x"}),
        ("session.policy.open", {}),
        ("state.set", {"key": "k", "value": 1}),
        ("runs.start", {"intent": "work", "agent_name": "loop"}),
    ],
)
def test_connections_holding_client_state_are_never_reaped(tmp_path, clock, registers):
    """A connection holding anything its client registered outlives any idle window; only bare ones go."""
    state = make_state(tmp_path, clock, idle_timeout=100.0)
    holder, bare = Conn(state), Conn(state)
    for c in (holder, bare):
        c.call("session.auth", {"token": TOKEN}, 0)
    method, params = registers
    assert "result" in holder.call(method, params, 5)
    for _ in range(40):
        clock.advance(30)
        state.reap_idle()
    assert bare.sink.closed_with == (1000, "idle timeout")
    assert holder.sink.closed_with is None


def test_idle_timeout_option(tmp_path):
    """--idle-timeout sets the window; 0 turns reaping off; a negative value is refused."""
    from car_twisted.tap import Options

    opts = Options()
    opts.parseOptions(["--car-home", str(tmp_path / "h"), "--idle-timeout", "42"])
    assert opts.config_kwargs["idle_timeout"] == 42.0
    with pytest.raises(SystemExit) as e:
        Options().parseOptions(["--car-home", str(tmp_path / "h"), "--idle-timeout", "-1"])
    assert e.value.code == 2
