"""
The real ``CarServerProtocol`` over an in-memory transport with a Clock:
the bytes of reply frames, the close handshake as the daemon does it, the
read throttle and its stall drop, size limits, invalid frames, ping/pong
and the session's life.  No sockets, no sleeps; every scenario ends with
no delayed call left on the Clock.

Autobahn's own timers (auto-ping, handshake timeouts) run on txaio's loop,
not on the Clock; ``memory_factory`` turns them off so nothing here reaches
the global reactor.
"""

import json

import pytest
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from car_twisted.errors import ChannelClosed
from car_twisted.runtime import SessionRuntime
from support import HANDSHAKE, TOKEN, MemoryConnection, client_frame, make_state, memory_factory

KIB = 1024
TEXT, BINARY, CLOSE, PING, PONG, CONTINUATION = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0


@pytest.fixture
def clock():
    return Clock()


def factory_for(tmp_path, clock, **config):
    return memory_factory(make_state(tmp_path, clock, **config))


def call(conn, method, params=None, rid=1):
    """Send one request and return the reply with its id."""
    msg = {"jsonrpc": "2.0", "id": rid, "method": method}
    if params is not None:
        msg["params"] = params
    conn.send(msg)
    replies = [m for m in conn.messages() if m.get("id") == rid]
    assert replies, f"no reply to {method}"
    return replies[-1]


def authed(factory):
    conn = MemoryConnection.open(factory)
    assert call(conn, "session.auth", {"token": TOKEN}, rid=0)["result"]["ok"] is True
    return conn


class Writes:
    """Records each call the protocol makes on its transport's write side."""

    def __init__(self, transport):
        self.calls = []
        write, write_sequence = transport.write, transport.writeSequence

        def record_write(data):
            self.calls.append(("write", data))
            write(data)

        def record_sequence(parts):
            parts = list(parts)
            self.calls.append(("writeSequence", b"".join(parts)))
            write_sequence(parts)

        transport.write = record_write
        transport.writeSequence = record_sequence

    def data(self):
        return b"".join(data for _, data in self.calls)


# -- the frame of a reply ---------------------------------------------------------------

RESULT_OVERHEAD = len(b'{"jsonrpc":"2.0","id":7,"result":""}')


@pytest.mark.parametrize(
    "size,header",
    [
        (40, b"\x81\x28"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (5000, b"\x81\x7e\x13\x88"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
        (70000, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x11\x70"),
    ],
    ids=["40", "125", "126", "5000", "65535", "65536", "70000"],
)
def test_reply_frame_bytes(tmp_path, clock, size, header):
    """A reply of N bytes goes out as one unmasked FIN text frame whose header encodes N, followed by exactly the JSON-RPC reply."""
    conn = authed(factory_for(tmp_path, clock))
    value = "x" * (size - RESULT_OVERHEAD)
    assert call(conn, "state.set", {"key": "k", "value": value}, rid=6)["result"] == "ok"
    writes = Writes(conn.transport)
    conn.send({"jsonrpc": "2.0", "id": 7, "method": "state.get", "params": {"key": "k"}})
    reply = b'{"jsonrpc":"2.0","id":7,"result":"%s"}' % value.encode()
    assert len(reply) == size
    assert writes.data() == header + reply
    assert json.loads(reply) == {"jsonrpc": "2.0", "id": 7, "result": value}
    if size < 64 * KIB:
        # One bytes object, one write.
        assert writes.calls == [("write", header + reply)]
    assert clock.getDelayedCalls() == []


def test_auth_reply_is_one_small_frame(tmp_path, clock):
    """The session.auth reply is a single write of a 2-byte-header text frame carrying the reply."""
    conn = MemoryConnection.open(factory_for(tmp_path, clock))
    writes = Writes(conn.transport)
    conn.send({"jsonrpc": "2.0", "id": 0, "method": "session.auth", "params": {"token": TOKEN}})
    ((kind, data),) = writes.calls
    assert kind == "write" and data[0] == 0x81 and data[1] == len(data) - 2 < 126
    assert json.loads(data[2:]) == {"jsonrpc": "2.0", "id": 0, "result": {"ok": True, "auth_enabled": True}}
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize(
    "rid,raw",
    [(7, b'"id":7,'), (2**62, b'"id":4611686018427387904,'), (-3, b'"id":-3,'),
     ("7", b'"id":"7",'), ("req-\u00e9", '"id":"req-\u00e9",'.encode())],
    ids=["int", "int-2**62", "negative", "digit-string", "non-ascii-string"],
)
def test_request_ids_keep_their_json_type(tmp_path, clock, rid, raw):
    """Integer ids are answered with the same integer and string ids with the same string."""
    conn = authed(factory_for(tmp_path, clock))
    conn.send({"jsonrpc": "2.0", "id": rid, "method": "state.get", "params": {"key": "none"}})
    (op, payload) = conn.frames()[-1]
    assert op == TEXT and raw in payload
    reply = json.loads(payload)
    assert reply == {"jsonrpc": "2.0", "id": rid, "result": None}
    assert type(reply["id"]) is type(rid)
    assert clock.getDelayedCalls() == []


# -- the close handshake ------------------------------------------------------------------


def test_daemon_close_writes_one_close_frame_then_drops(tmp_path, clock):
    """session.disconnect writes one Close frame (0x88, the code, the reason) and drops at once; a second close writes nothing."""
    state = make_state(tmp_path, clock)
    conn = authed(memory_factory(state))
    session = conn.protocol.session
    writes = Writes(conn.transport)
    session.disconnect(4001, "going away")
    assert writes.calls == [("write", b"\x88\x0c\x0f\xa1going away")]
    assert conn.dropped
    # Dropped without waiting for the peer's Close: the session is gone already.
    assert session.closed and session.client_id not in state.sessions
    session.disconnect(4002, "again")
    conn.protocol.close(1000, "and again")
    assert writes.calls == [("write", b"\x88\x0c\x0f\xa1going away")]
    assert clock.getDelayedCalls() == []


def test_close_reason_is_truncated_to_120_bytes(tmp_path, clock):
    """A long close reason is cut to 120 bytes, so the Close frame stays a 122-byte control frame."""
    conn = authed(factory_for(tmp_path, clock))
    writes = Writes(conn.transport)
    conn.protocol.close(1001, "r" * 500)
    ((_, data),) = writes.calls
    assert data == b"\x88\x7a\x03\xe9" + b"r" * 120
    assert conn.close_code() == 1001 and conn.dropped
    assert clock.getDelayedCalls() == []


def test_client_close_is_answered_and_closes_the_session(tmp_path, clock):
    """A client Close frame is answered with a Close and the session is closed, its features with it."""
    state = make_state(tmp_path, clock)
    conn = authed(memory_factory(state))
    session = conn.protocol.session
    assert call(conn, "state.set", {"key": "k", "value": "v" * 100}, rid=3)["result"] == "ok"
    runtime = session.existing_feature(SessionRuntime)
    assert len(runtime.keyvalue) == 1 and state.state_budget.used > 0
    conn.feed(client_frame(b"\x03\xe8bye", opcode=CLOSE))
    assert conn.frames()[-1][0] == CLOSE and conn.close_code() == 1000
    assert conn.dropped
    assert session.closed and session.client_id not in state.sessions
    assert len(runtime.keyvalue) == 0 and state.state_budget.used == 0
    assert clock.getDelayedCalls() == []


# -- the read throttle ----------------------------------------------------------------------


def test_stalled_output_drops_the_connection(tmp_path, clock):
    """Paused by the transport and never resumed, the channel reads as paused and the connection is aborted after write_stall_timeout."""
    state = make_state(tmp_path, clock, write_stall_timeout=10.0)
    conn = authed(memory_factory(state))
    session = conn.protocol.session
    conn.protocol._throttle.pauseProducing()  # what the transport does when its buffer is full
    assert session.channel.paused and conn.transport.producerState == "paused"
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(9.9)
    assert not conn.dropped and session.client_id in state.sessions
    clock.advance(0.1)
    assert conn.dropped and getattr(conn.transport, "disconnected", False), "aborted, not closed"
    assert session.closed and session.client_id not in state.sessions
    assert clock.getDelayedCalls() == []


def test_resume_before_the_stall_window_cancels_the_drop(tmp_path, clock):
    """A resume inside write_stall_timeout cancels the stall timer; the connection stays and answers."""
    state = make_state(tmp_path, clock, write_stall_timeout=10.0)
    conn = authed(memory_factory(state))
    session = conn.protocol.session
    conn.protocol._throttle.pauseProducing()
    clock.advance(9.0)
    conn.protocol._throttle.resumeProducing()
    assert not session.channel.paused and conn.transport.producerState == "producing"
    assert clock.getDelayedCalls() == []
    clock.advance(60.0)
    assert not conn.dropped
    assert call(conn, "state.exists", {"key": "k"}, rid=4)["result"] is False
    assert clock.getDelayedCalls() == []


# -- size limits and invalid frames ------------------------------------------------------------


def test_oversized_message_after_auth_closes_1009(tmp_path, clock):
    """After auth the limit is max_message_bytes: a message under it passes, a frame over it gets 1009 and a drop."""
    state = make_state(tmp_path, clock, max_message_bytes=16 * KIB)
    conn = authed(memory_factory(state))
    session = conn.protocol.session
    # Larger than a guest may send, within the authenticated limit.
    assert call(conn, "state.set", {"key": "k", "value": "v" * (12 * KIB)}, rid=5)["result"] == "ok"
    conn.feed(client_frame(b'"' + b"x" * (16 * KIB) + b'"'))
    assert conn.close_code() == 1009 and conn.dropped
    assert session.client_id not in state.sessions
    assert clock.getDelayedCalls() == []


def test_oversized_fragmented_message_closes_1009(tmp_path, clock):
    """Fragments each under max_message_bytes are refused with 1009 once together they pass it."""
    state = make_state(tmp_path, clock, max_message_bytes=16 * KIB)
    conn = authed(memory_factory(state))
    conn.feed(client_frame(b'"' + b"x" * (10 * KIB), fin=False))
    assert conn.close_code() is None and not conn.dropped
    conn.feed(client_frame(b"x" * (10 * KIB), opcode=CONTINUATION, fin=False))
    assert conn.close_code() == 1009 and conn.dropped
    assert not state.sessions
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize("authenticate", [False, True], ids=["guest", "authenticated"])
def test_text_frame_not_utf8_closes_1007(tmp_path, clock, authenticate):
    """A text frame that is not UTF-8 gets Close 1007 and a drop, and no reply."""
    state = make_state(tmp_path, clock)
    factory = memory_factory(state)
    conn = authed(factory) if authenticate else MemoryConnection.open(factory)
    before = len(conn.messages())
    conn.feed(client_frame(b'{"jsonrpc":"2.0","id":1,"method":"\xff"}'))
    assert conn.close_code() == 1007 and conn.dropped
    assert len(conn.messages()) == before
    assert not state.sessions
    assert clock.getDelayedCalls() == []


def test_binary_frame_before_auth_is_refused(tmp_path, clock):
    """A binary frame from a guest is answered -32001 with id null and the connection closed 1008."""
    state = make_state(tmp_path, clock)
    conn = MemoryConnection.open(memory_factory(state))
    conn.feed(client_frame(b"\x00\x01\x02", opcode=BINARY))
    (reply,) = conn.messages()
    assert reply["id"] is None and reply["error"]["code"] == -32001
    assert conn.close_code() == 1008 and conn.dropped
    assert not state.sessions
    assert clock.getDelayedCalls() == []


def test_binary_frame_that_is_not_a_voice_frame_is_refused_not_fatal(tmp_path, clock):
    """After auth, a binary frame that is no CAR voice frame gets a "binary frame refused" error with id null; the connection stays."""
    conn = authed(factory_for(tmp_path, clock))
    conn.feed(client_frame(b"\x00\xff" * 50, opcode=BINARY))
    reply = conn.messages()[-1]
    assert reply["id"] is None and reply["error"]["code"] == -32602
    assert reply["error"]["message"].startswith("binary frame refused")
    assert conn.close_code() is None and not conn.dropped
    assert call(conn, "state.exists", {"key": "k"}, rid=8)["result"] is False
    assert clock.getDelayedCalls() == []


# -- ping / pong --------------------------------------------------------------------------------


@pytest.mark.parametrize("authenticate", [False, True], ids=["guest", "authenticated"])
def test_ping_is_answered_with_the_same_payload(tmp_path, clock, authenticate):
    """A client Ping is answered with a Pong carrying its payload, and the connection stays open."""
    factory = factory_for(tmp_path, clock)
    conn = authed(factory) if authenticate else MemoryConnection.open(factory)
    writes = Writes(conn.transport)
    conn.feed(client_frame(b"are you there?", opcode=PING))
    assert writes.data() == b"\x8a\x0eare you there?"
    assert conn.frames()[-1] == (PONG, b"are you there?")
    assert not conn.dropped and conn.close_code() is None
    conn.transport.loseConnection()
    assert clock.getDelayedCalls() == []


# -- the session's life -------------------------------------------------------------------------


def test_session_opens_on_upgrade(tmp_path, clock):
    """A session exists from the upgrade on, not before."""
    state = make_state(tmp_path, clock)
    conn = MemoryConnection.open(memory_factory(state), upgrade=False)
    assert state.sessions == {} and conn.protocol.session is None
    conn.feed(HANDSHAKE)
    assert conn.http_response().startswith(b"HTTP/1.1 101")
    session = conn.protocol.session
    assert state.sessions == {session.client_id: session} and not session.authenticated
    conn.transport.loseConnection()
    assert state.sessions == {} and clock.getDelayedCalls() == []


def test_connection_loss_closes_the_session_once_and_fails_pending_requests(tmp_path, clock):
    """On connection loss the session is closed exactly once and its pending server-to-client requests fail with ChannelClosed."""
    state = make_state(tmp_path, clock)
    conn = authed(memory_factory(state))
    session = conn.protocol.session
    closes = []
    session.on_close(lambda: closes.append(session.client_id))
    timed = session.channel.request("tools.execute", {"tool": "t"}, timeout=30)
    untimed = session.channel.request("agent.chat", {"text": "hi"}, timeout=None)
    sent = [m for m in conn.messages() if "method" in m]
    assert [m["method"] for m in sent] == ["tools.execute", "agent.chat"]
    assert session.channel.pending_count() == 2 and len(clock.getDelayedCalls()) == 1
    failures = []
    timed.addErrback(failures.append)
    untimed.addErrback(failures.append)

    conn.transport.connected = False  # the peer reset the connection
    conn.protocol.connectionLost(Failure(ConnectionLost("reset by peer")))

    assert [f.type for f in failures] == [ChannelClosed, ChannelClosed]
    assert closes == [session.client_id]
    assert session.closed and state.sessions == {}
    assert session.channel.pending_count() == 0
    # Nothing more happens on a later close attempt.
    session.disconnect(1000, "late")
    state.close_session(session)
    assert closes == [session.client_id]
    assert clock.getDelayedCalls() == []


def test_refused_upgrade_half_closes_and_discards_until_the_peer_goes(tmp_path):
    """A 431 is written, our side half-closed, further input discarded, and the connection aborted after the linger."""
    from car_twisted.ws.protocol import LINGER_SECS

    clock = Clock()
    factory = memory_factory(make_state(tmp_path, clock, ping_interval=0))
    conn = MemoryConnection.open(factory, upgrade=False)
    half_closed = []
    conn.transport.loseWriteConnection = lambda: half_closed.append(True)
    for _ in range(20):
        conn.feed(b"X-Filler: " + b"a" * 1000 + b"\r\n")
    assert conn.http_response().startswith(b"HTTP/1.1 431")
    assert half_closed == [True] and not conn.dropped
    written = len(conn.transport.value())
    conn.feed(b"X-More: " + b"b" * 5000 + b"\r\n")  # discarded, not parsed, not buffered
    assert conn.protocol.data == b"" and len(conn.transport.value()) == written
    clock.advance(LINGER_SECS)
    assert conn.dropped and clock.getDelayedCalls() == []


def test_close_reason_is_cut_on_a_character_and_bad_codes_are_not_sent(tmp_path):
    """The Close reason stays valid UTF-8 within 120 bytes; a code the protocol forbids becomes 1011."""
    clock = Clock()
    factory = memory_factory(make_state(tmp_path, clock, ping_interval=0))
    conn = MemoryConnection.open(factory)
    conn.protocol.close(1000, "a" + "é" * 100)
    (op, payload), = [f for f in conn.frames() if f[0] == 8]
    reason = payload[2:]
    assert len(reason) <= 120 and reason.decode("utf-8") == "a" + "é" * 59
    other = MemoryConnection.open(factory, port=40001)
    other.protocol.close(1006, "x")
    assert other.close_code() == 1011
    third = MemoryConnection.open(factory, port=40002)
    third.protocol.close(70000, "x")
    assert third.close_code() == 1011 and third.dropped


# -- what a connection keeps ----------------------------------------------------------------------


def test_an_open_connection_keeps_no_upgrade_leftovers(tmp_path, clock):
    """The upgrade request and response are dropped once the connection is open."""
    conn = authed(factory_for(tmp_path, clock))
    proto = conn.protocol
    assert proto.http_request_data is None and proto.http_response_data is None and proto.http_headers is None
    assert call(conn, "state.exists", {"key": "k"}, rid=2)["result"] is False
    conn.transport.loseConnection()
    assert clock.getDelayedCalls() == []


def test_a_handshake_without_required_capabilities_lists_no_methods(tmp_path, clock, monkeypatch):
    """server.handshake builds the capability names only when the client requires some."""
    factory = factory_for(tmp_path, clock)
    conn = authed(factory)
    built = []
    original = factory.state.capability_names
    monkeypatch.setattr(factory.state, "capability_names", lambda: built.append(1) or original())
    assert call(conn, "server.handshake", {"protocol_version": 3}, rid=2)["result"]["protocol_version"] == 3
    assert built == []
    conn2 = authed(factory)
    reply = call(conn2, "server.handshake", {"protocol_version": 3, "required_capabilities": ["state", "nope"]}, rid=3)
    assert reply["error"]["data"]["missing_capabilities"] == ["nope"] and built == [1]
    conn.transport.loseConnection()
    conn2.transport.loseConnection()
    assert clock.getDelayedCalls() == []
