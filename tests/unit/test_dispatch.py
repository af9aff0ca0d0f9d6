"""The dispatcher over a fake sink: every error code, gates, batches, deadlines."""

import json

import attrs
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from zope.interface import implementer
from zope.interface.verify import verifyObject

from car_twisted.config import AdapterRegistration
from car_twisted.errors import RpcError
from car_twisted.interfaces import IBinaryReceiver, IClientSession
from car_twisted.rpc.dispatch import Dispatcher
from support import TOKEN, FakeSink, make_state, request, stray_timers


@attrs.frozen
class EchoParams:
    text: str
    times: int = 1


class Harness:
    def __init__(self, tmp_path, authed=True, negotiated=True, **overrides):
        self.clock = Clock()
        self.state = make_state(tmp_path, self.clock, **overrides)
        self.sink = FakeSink()
        self.session = self.state.open_session(self.sink)
        self.dispatcher = Dispatcher(self.state)
        self.waiting = {}
        self.state.register_method("t.echo", lambda s, p: p.text * p.times, params=EchoParams)
        self.state.register_method("t.raw", lambda s, p: p)
        self.state.register_method("t.wait", self._wait)
        self.state.register_method("t.boom", self._boom)
        self.state.register_method("t.rpcerr", self._rpcerr)
        self.state.register_method("t.async", self._async)
        self.state.register_method("t.quick", lambda s, p: p, deadline=lambda p: p["secs"])
        if authed:
            self.send(request("session.auth", {"token": TOKEN}, 0))
        if negotiated:
            self.send(request("server.handshake", {"protocol_version": 3}, 2))
        self.sink.frames.clear()

    def _wait(self, session, params):
        d = Deferred()
        self.waiting[params["key"]] = d
        return d

    def _boom(self, session, params):
        raise KeyError("secret-internal-detail")

    def _rpcerr(self, session, params):
        raise RpcError("custom failure", data={"why": 1}, code=-32050)

    async def _async(self, session, params):
        value = await self._wait(session, params)
        return {"got": value}

    def send(self, payload):
        if not isinstance(payload, bytes):
            payload = json.dumps(payload).encode()
        self.dispatcher.dispatch_text(self.session, payload)

    def replies(self):
        return self.sink.pop()


@pytest.fixture
def h(tmp_path):
    return Harness(tmp_path)


def error_code(reply):
    return reply["error"]["code"]


def test_result_echoes_integer_id(h):
    """A result carries the request's id with its JSON type unchanged."""
    h.send(request("t.echo", {"text": "ab", "times": 2}, 7))
    assert h.replies() == [{"jsonrpc": "2.0", "id": 7, "result": "abab"}]
    h.send(request("t.echo", {"text": "x"}, "7"))
    assert h.replies()[0]["id"] == "7"


def test_parse_error(h):
    """Malformed JSON answers -32700 with a null id."""
    h.send(b'{"jsonrpc": "2.0", "id": 1, "method"')
    (reply,) = h.replies()
    assert error_code(reply) == -32700 and reply["id"] is None


@pytest.mark.parametrize(
    "msg",
    [
        {"jsonrpc": "2.0", "id": 1},
        {"jsonrpc": "1.0", "id": 1, "method": "t.raw"},
        {"id": 1, "method": "t.raw"},
        {"jsonrpc": "2.0", "id": 1, "method": 5},
        {"jsonrpc": "2.0", "id": 1, "method": ""},
        {"jsonrpc": "2.0", "id": 1, "method": "t.raw", "params": "str"},
        {"jsonrpc": "2.0", "id": {"a": 1}, "method": "t.raw"},
        {"jsonrpc": "2.0", "id": 1.5, "method": "t.raw"},
        {"jsonrpc": "2.0", "id": True, "method": "t.raw"},
        {"jsonrpc": "2.0", "id": "x" * 300, "method": "t.raw"},
        {"jsonrpc": "2.0", "id": 2**70, "method": "t.raw"},
        7,
        "str",
    ],
)
def test_invalid_request(h, msg):
    """Structurally wrong requests answer -32600."""
    h.send(msg)
    (reply,) = h.replies()
    assert error_code(reply) == -32600


def test_unknown_method(h):
    """An unknown method answers -32601 naming it."""
    h.send(request("no.such", {}, 3))
    (reply,) = h.replies()
    assert error_code(reply) == -32601
    assert reply["error"]["message"] == "method not found: no.such"
    assert reply["error"]["data"] == {"method": "no.such"}


@pytest.mark.parametrize("method", ["infer", "embed", "mail.send", "coder.start", "browser.run", "models.list"])
def test_out_of_scope_method(h, method):
    """Methods outside scope say they are not implemented by this daemon."""
    h.send(request(method, {}, 3))
    (reply,) = h.replies()
    assert error_code(reply) == -32601
    assert "not implemented by this daemon" in reply["error"]["message"]


def test_invalid_params_name_the_field(h):
    """Params of the wrong shape answer -32602 naming the field."""
    h.send(request("t.echo", {"text": 5}, 1))
    h.send(request("t.echo", {}, 2))
    h.send(request("t.echo", [1, 2], 3))
    h.send(request("t.echo", {"text": "a", "times": "x"}, 4))
    replies = h.replies()
    assert [error_code(r) for r in replies] == [-32602] * 4
    assert [r["error"]["data"]["field"] for r in replies] == ["text", "text", "params", "times"]


def test_internal_error_is_logged_not_leaked(h):
    """An unexpected exception answers -32603 without its detail and logs the traceback."""
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        h.send(request("t.boom", {}, 1))
    finally:
        globalLogPublisher.removeObserver(events.append)
    (reply,) = h.replies()
    assert error_code(reply) == -32603
    assert "secret-internal-detail" not in json.dumps(reply)
    failures = [e for e in events if e.get("log_failure") is not None]
    assert failures and failures[0]["log_failure"].check(KeyError)
    assert failures[0]["method"] == "t.boom"


def test_rpc_error_keeps_its_code(h):
    """An RpcError raised by a handler reaches the client as it is."""
    h.send(request("t.rpcerr", {}, 1))
    (reply,) = h.replies()
    assert reply["error"] == {"code": -32050, "message": "custom failure", "data": {"why": 1}}


def test_concurrent_requests_answer_out_of_order(h):
    """A slow handler does not block later requests; replies come as work finishes."""
    h.send(request("t.wait", {"key": "slow"}, 1))
    h.send(request("t.async", {"key": "second"}, 2))
    h.send(request("t.raw", {"fast": True}, 3))
    assert [r["id"] for r in h.replies()] == [3]
    assert h.session.in_flight == 2
    h.waiting["second"].callback(42)
    h.waiting["slow"].callback("done")
    assert h.replies() == [
        {"jsonrpc": "2.0", "id": 2, "result": {"got": 42}},
        {"jsonrpc": "2.0", "id": 1, "result": "done"},
    ]
    assert h.session.in_flight == 0


def test_handler_deadline(tmp_path):
    """A handler past CAR_HANDLER_TIMEOUT answers -32004 and is cancelled."""
    h = Harness(tmp_path, handler_timeout=10.0)
    h.send(request("t.async", {"key": "k"}, 1))
    h.clock.advance(9.9)
    assert [r for r in h.replies() if "id" in r] == []
    h.clock.advance(0.2)
    (reply,) = h.replies()
    assert error_code(reply) == -32004
    assert reply["error"]["data"] == {"method": "t.async", "deadline_secs": 10.0}
    assert h.waiting["k"].called  # cancelled
    assert h.session.in_flight == 0
    assert stray_timers(h.clock) == []


def test_per_method_deadline(tmp_path):
    """A method may derive its own deadline from its params."""
    h = Harness(tmp_path, handler_timeout=1000.0)
    h.state.register_method("t.budget", h._wait, deadline=lambda p: p["secs"])
    h.send(request("t.budget", {"key": "k", "secs": 3}, 1))
    h.clock.advance(3.1)
    assert error_code(h.replies()[0]) == -32004


def test_in_flight_limit(tmp_path):
    """Past max_in_flight a request is refused with a busy error, not queued forever."""
    h = Harness(tmp_path, max_in_flight=2)
    for i in range(3):
        h.send(request("t.wait", {"key": i}, i))
    (reply,) = h.replies()
    assert reply["id"] == 2 and reply["error"]["data"]["reason"] == "busy"
    h.waiting[0].callback(None)
    h.send(request("t.wait", {"key": 9}, 9))
    assert [r["id"] for r in h.replies()] == [0]


def test_notification_gets_no_reply(h):
    """Client notifications run but are never answered, even when they fail."""
    h.send({"jsonrpc": "2.0", "method": "t.raw", "params": {}})
    h.send({"jsonrpc": "2.0", "method": "no.such"})
    h.send({"jsonrpc": "2.0", "method": "t.echo", "params": {}})
    assert h.replies() == []


def test_batch(h):
    """Batches answer one entry per request, none for notifications, async ones included."""
    h.send(
        [
            request_obj("t.echo", {"text": "a"}, 1),
            {"jsonrpc": "2.0", "method": "t.raw"},
            request_obj("t.wait", {"key": "w"}, 2),
            5,
            request_obj("no.such", {}, 3),
        ]
    )
    assert h.replies() == []
    h.waiting["w"].callback("late")
    (batch,) = h.replies()
    assert [r.get("id") for r in batch] == [1, 2, None, 3]
    assert batch[1]["result"] == "late"
    assert error_code(batch[2]) == -32600 and error_code(batch[3]) == -32601


def test_batch_of_notifications_sends_nothing(h):
    h.send([{"jsonrpc": "2.0", "method": "t.raw"}, {"jsonrpc": "2.0", "method": "t.raw"}])
    assert h.replies() == []


def test_empty_and_oversized_batches(tmp_path):
    """An empty batch and one past max_batch each get one -32600."""
    h = Harness(tmp_path, max_batch=3)
    h.send([])
    h.send([request_obj("t.raw", {}, i) for i in range(4)])
    replies = h.replies()
    assert [error_code(r) for r in replies] == [-32600, -32600]
    assert "exceeds the limit of 3" in replies[1]["error"]["message"]


def test_client_response_routes_to_pending_request(h):
    """A client's response frame resolves the matching server-to-client request."""
    d = h.session.channel.request("tools.execute", {}, timeout=5)
    (sent,) = h.replies()
    h.send({"jsonrpc": "2.0", "id": sent["id"], "result": {"v": 1}})
    assert d.result == {"v": 1}
    h.send({"jsonrpc": "2.0", "id": "unknown", "result": 1})
    assert h.replies() == []


def test_response_too_large(tmp_path):
    """A reply beyond the message cap becomes a -32603 error instead of a 1009 close."""
    h = Harness(tmp_path, max_message_bytes=1000)
    h.send(request("t.echo", {"text": "x" * 600, "times": 2}, 1))
    (reply,) = h.replies()
    assert error_code(reply) == -32603 and "too large" in reply["error"]["message"]


def test_binary_frame_without_stream(h):
    """A binary frame with no receiver gets a clear error, no crash."""
    h.dispatcher.dispatch_binary(h.session, b"\x01\x02")
    (reply,) = h.replies()
    assert reply["id"] is None and "binary frame refused" in reply["error"]["message"]


@implementer(IBinaryReceiver)
class Recorder:
    def __init__(self, session):
        self.got = []

    def receive(self, payload):
        self.got.append(payload)


def test_binary_frames_reach_the_sessions_receiver(tmp_path):
    """A receiver adapted from the session (the daemon's registry) gets each binary message."""
    h = Harness(tmp_path, adapters=[AdapterRegistration(IClientSession, IBinaryReceiver, Recorder)])
    verifyObject(IBinaryReceiver, Recorder(None))
    h.dispatcher.dispatch_binary(h.session, b"\x03")
    h.dispatcher.dispatch_binary(h.session, b"\x04")
    assert h.session.component(IBinaryReceiver).got == [b"\x03", b"\x04"] and h.replies() == []


def test_unserializable_result_is_internal_error(h):
    h.state.register_method("t.bad", lambda s, p: object())
    h.send(request("t.bad", {}, 1))
    assert error_code(h.replies()[0]) == -32603


def request_obj(method, params, rid):
    return {"jsonrpc": "2.0", "id": rid, "method": method, "params": params}


def pulses(replies):
    return [r["params"]["id"] for r in replies if r.get("method") == "infer.progress"]


def test_pending_requests_hear_a_progress_pulse(tmp_path):
    """
    A request still waiting is named in ``infer.progress`` every 9 s (the
    client's silence limit is 30 s); an answered one is not, a notification
    never is, and the timer stops when nothing is pending.
    """
    h = Harness(tmp_path, handler_timeout=100.0)
    h.send(request("t.wait", {"key": "a"}, 1))
    h.send(request("t.async", {"key": "b"}, "two"))
    h.send({"jsonrpc": "2.0", "method": "t.wait", "params": {"key": "note"}})
    h.clock.advance(8.9)
    assert h.replies() == []
    h.clock.advance(0.2)
    assert sorted(pulses(h.replies()), key=str) == [1, "two"]
    h.waiting["a"].callback("done")
    assert h.replies() == [{"jsonrpc": "2.0", "id": 1, "result": "done"}]
    h.clock.advance(9.0)
    assert h.replies() == [{"jsonrpc": "2.0", "method": "infer.progress", "params": {"id": "two"}}]
    h.waiting["b"].callback(1)
    h.waiting["note"].callback(None)
    h.replies()
    assert len(h.dispatcher.pulse) == 0
    # The timer runs out at the next beat that finds nothing pending.
    h.clock.advance(9.0)
    assert h.replies() == []
    assert h.clock.getDelayedCalls() == []


def test_one_pulse_timer_serves_a_stream_of_requests(tmp_path):
    """Requests answered one after another do not schedule (and cancel) a pulse timer each."""
    h = Harness(tmp_path, handler_timeout=100.0)
    scheduled = []
    original = h.clock.callLater

    def counting(delay, f, *a, **kw):
        if getattr(f, "__name__", "") == "_beat":
            scheduled.append(delay)
        return original(delay, f, *a, **kw)

    h.clock.callLater = counting
    for i in range(100):
        h.send(request("t.wait", {"key": f"k{i}"}, i))
        h.waiting[f"k{i}"].callback(i)
        h.clock.advance(0.05)
    assert len(h.replies()) == 100
    assert scheduled == [9.0]
    h.dispatcher.pulse.stop()
    assert h.clock.getDelayedCalls() == []


def test_pulse_skips_a_paused_reader_and_forgets_a_closed_one(tmp_path):
    h = Harness(tmp_path, handler_timeout=100.0)
    h.send(request("t.wait", {"key": "a"}, 1))
    h.session.channel.pause()
    h.clock.advance(9.0)
    assert h.replies() == []
    h.session.channel.resume()
    h.clock.advance(9.0)
    assert pulses(h.replies()) == [1]
    h.sink.writable = False
    h.clock.advance(9.0)
    assert h.replies() == []
    assert len(h.dispatcher.pulse) == 0
    assert all(not c.func.__name__ == "_beat" for c in h.clock.getDelayedCalls())
