"""
Keep-alive pings from one timer (``ws.keepalive``): the rules on fakes, and
the real protocol over an in-memory transport with a Clock.
"""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from car_twisted.ws.keepalive import TICKS_PER_INTERVAL, KeepAlive
from support import TOKEN, MemoryConnection, client_frame, make_state, memory_factory

PING, PONG = 0x9, 0xA


class Conn:
    def __init__(self, name: str) -> None:
        self.name = name
        self.heard_at = 0.0
        self.pinged_at: float | None = None
        self.pings = 0
        self.dropped = False

    def send_keepalive_ping(self) -> None:
        self.pings += 1

    def keepalive_timed_out(self) -> None:
        self.dropped = True


def test_a_silent_connection_is_pinged_then_dropped_without_an_answer():
    clock = Clock()
    keep = KeepAlive(clock, interval=30.0, timeout=10.0)
    quiet, chatty, answering = Conn("quiet"), Conn("chatty"), Conn("answering")
    for c in (quiet, chatty, answering):
        keep.add(c)
    for _ in range(TICKS_PER_INTERVAL - 1):
        clock.advance(3.0)
        chatty.heard_at = clock.seconds()
    assert (quiet.pings, chatty.pings, answering.pings) == (0, 0, 0)  # 27 s: nobody silent for 30 s yet
    clock.advance(3.0)
    assert (quiet.pings, chatty.pings, answering.pings) == (1, 0, 1)
    answering.heard_at = clock.seconds() + 0.5  # its pong
    for _ in range(4):
        clock.advance(3.0)
        chatty.heard_at = clock.seconds()
    assert quiet.dropped and quiet not in keep.connections  # 12 s without an answer
    assert not answering.dropped and answering.pinged_at is None and answering.pings == 1
    assert not chatty.dropped and chatty.pings == 0
    keep.discard(chatty)
    keep.discard(answering)
    assert clock.getDelayedCalls() == []  # the timer stops with the last connection


def test_one_timer_and_pings_spread_over_the_interval():
    clock = Clock()
    keep = KeepAlive(clock, interval=30.0, timeout=30.0)
    conns = [Conn(str(i)) for i in range(3000)]
    for c in conns:
        keep.add(c)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(30.0)  # all fell silent at once: a tenth are pinged this tick
    assert sum(c.pings for c in conns) == 3000 // TICKS_PER_INTERVAL
    for _ in range(TICKS_PER_INTERVAL - 1):
        clock.advance(3.0)
    assert all(c.pings == 1 for c in conns)
    assert len(clock.getDelayedCalls()) == 1
    keep.stop()
    assert clock.getDelayedCalls() == []


def test_off_when_the_interval_is_zero():
    clock = Clock()
    keep = KeepAlive(clock, interval=0, timeout=30.0)
    keep.add(Conn("a"))
    assert clock.getDelayedCalls() == [] and not keep.connections


@pytest.fixture
def clock():
    return Clock()


def live_factory(tmp_path, clock, **config):
    factory = memory_factory(make_state(tmp_path, clock, ping_interval=30.0, ping_timeout=10.0, **config))
    factory.keepalive.interval = 30.0
    return factory


def authed(factory, port=40000):
    conn = MemoryConnection.open(factory, port=port)
    conn.send({"jsonrpc": "2.0", "id": 0, "method": "session.auth", "params": {"token": TOKEN}})
    assert conn.messages()[-1]["result"]["ok"] is True
    return conn


def test_the_protocol_pings_and_a_pong_keeps_it(tmp_path, clock):
    factory = live_factory(tmp_path, clock)
    conn = authed(factory)
    clock.advance(30.0)
    assert conn.frames()[-1] == (PING, b"")
    conn.feed(client_frame(b"", opcode=PONG))
    clock.advance(15.0)
    assert not conn.dropped
    # Traffic of any kind postpones the next ping.
    for _ in range(3):
        clock.advance(12.0)
        conn.feed(client_frame(b"hi", opcode=PING))
    assert [f for f in conn.frames() if f[0] == PING] == [(PING, b"")]
    conn.transport.loseConnection()
    assert clock.getDelayedCalls() == []


def test_the_protocol_drops_a_peer_that_never_answers(tmp_path, clock):
    factory = live_factory(tmp_path, clock)
    conn = authed(factory)
    clock.advance(30.0)
    assert conn.frames()[-1] == (PING, b"")
    clock.advance(12.0)
    assert conn.dropped
    assert factory.state.sessions == {}
    assert factory.keepalive.connections == {}
    assert clock.getDelayedCalls() == []


def test_no_autobahn_timer_per_connection(tmp_path, clock):
    """Autobahn's own auto-ping stays off: no per-connection ping call."""
    factory = live_factory(tmp_path, clock)
    conns = [authed(factory, port=41000 + i) for i in range(20)]
    assert all(c.protocol.autoPingPendingCall is None for c in conns)
    assert len(clock.getDelayedCalls()) == 1  # the keep-alive's, for all twenty
    assert clock.getDelayedCalls() == [factory.keepalive._loop.call]
    for c in conns:
        c.transport.loseConnection()
    assert clock.getDelayedCalls() == []
