"""One depth limit on the way in; a value that cannot be encoded on the way out fails its call cleanly."""

import gc

import pytest
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from car_twisted.errors import CallbackUnencodable, ClientRpcError
from car_twisted.proposal.ir import ToolCall, ToolError
from car_twisted.ws.tool_executor import WsToolExecutor
from car_twisted.testing import MemorySink
from car_twisted.ws.channel import WsChannel
from support import TOKEN, DispatchConn, make_state


def nested(depth):
    value = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.fixture
def conn(tmp_path):
    return DispatchConn(make_state(tmp_path, Clock()), {"token": TOKEN})


def test_too_deep_value_is_refused_not_stored(conn):
    """A value past the depth limit is -32602 and never stored; one inside it round-trips."""
    limit = conn.state.config.max_json_depth
    reply = conn.call("state.set", {"key": "deep", "value": nested(limit + 10)})
    assert reply["error"]["code"] == -32602
    assert reply["error"]["data"] == {"field": "params", "limit": limit}
    assert conn.result("state.keys", {}) == []
    ok = nested(limit - 5)
    assert conn.result("state.set", {"key": "ok", "value": ok}) == "ok"
    assert conn.result("state.get", {"key": "ok"}) == ok


def test_too_deep_answer_fails_its_callback(conn):
    """A client's answer nested past the limit fails the pending callback instead of being kept."""
    d = conn.session.channel.request("tools.execute", {"x": 1}, timeout=30)
    (sent,) = conn.sink.pop()
    frame = b'{"jsonrpc":"2.0","id":"%s","result":%s}' % (sent["id"].encode(), b"[" * 300 + b"]" * 300)
    conn.dispatcher.dispatch_text(conn.session, frame)
    failure = []
    d.addErrback(failure.append)
    assert failure and failure[0].check(ClientRpcError)
    assert "nested deeper" in failure[0].value.message
    assert conn.session.channel.pending_count() == 0


class UnencodableTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.sink = MemorySink()
        self.channel = WsChannel(self.sink, self.clock)

    def test_request_leaves_nothing_behind(self):
        """Params orjson cannot encode fail the request: nothing sent, nothing pending, no timer."""
        d = self.channel.request("tools.execute", {"p": nested(300)}, timeout=30)
        self.failureResultOf(d, CallbackUnencodable)
        assert self.sink.frames == [] and self.channel.pending_count() == 0
        assert self.clock.getDelayedCalls() == []

    def test_tool_call_fails_cleanly_without_unhandled_errors(self):
        """The executor turns it into a ToolError; no cancel is sent and no Deferred error goes unhandled."""
        events = []
        globalLogPublisher.addObserver(events.append)
        try:
            executor = WsToolExecutor(self.channel, self.clock)
            d = executor.execute(ToolCall("a1", "echo", {"p": nested(300)}, timeout_ms=1000))
            err = self.failureResultOf(d, ToolError).value
            assert err.kind == "unsupported" and "cannot be sent as JSON" in err.message
            assert self.sink.frames == [] and self.clock.getDelayedCalls() == []
            del d
            gc.collect()
        finally:
            globalLogPublisher.removeObserver(events.append)
        assert not [e for e in events if e.get("log_failure") is not None or "Unhandled" in str(e.get("log_format"))]

    def test_unencodable_notification_is_not_sent(self):
        assert self.channel.notify("x.event", {"p": nested(300)}) is False
        assert self.sink.frames == []
