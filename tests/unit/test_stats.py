"""The daemon's own counters move with what happens (read by /metrics and the dashboard)."""

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from car_twisted.stats import LATENCY_BUCKETS, DaemonStats
from support import TOKEN, DispatchConn, make_state


def test_requests_by_method_and_outcome_with_latency():
    stats = DaemonStats()
    stats.request("a.b", "ok", 0.0002)
    stats.request("a.b", "ok", 100.0)
    stats.request("a.b", "-32602", 0.003)
    stats.request(None, "-32601", 0.0)
    m = stats.methods["a.b"]
    assert m.outcomes == {"ok": 2, "-32602": 1} and m.count == 3
    assert m.buckets[LATENCY_BUCKETS.index(0.00025)] == 1 and m.buckets[-1] == 1  # +Inf
    assert stats.totals() == (4, 2)


def test_the_dispatcher_counts_every_answer_and_what_is_in_flight(tmp_path):
    state = make_state(tmp_path, Clock())
    held = Deferred()
    state.register_method("t.wait", lambda s, p: held)
    c = DispatchConn(state, auth={"token": TOKEN})
    c.call("state.set", {"key": "k", "value": 1})
    c.call("state.get", {"key": 5})
    c.call("no.such.method")
    rid = c.send("t.wait", {})
    assert state.stats.in_flight == 1
    held.callback("done")
    assert any(m.get("id") == rid for m in c.sink.pop())
    assert state.stats.in_flight == 0
    methods = state.stats.methods
    assert methods["state.set"].outcomes == {"ok": 1}
    assert methods["state.get"].outcomes == {"-32602": 1}
    assert methods["(unknown method)"].outcomes == {"-32601": 1}
    assert methods["t.wait"].outcomes == {"ok": 1}
    assert methods["session.auth"].outcomes == {"ok": 1}


def test_dropped_fan_out_frames_are_counted(tmp_path):
    state = make_state(tmp_path, Clock())
    sub = DispatchConn(state, auth={"token": TOKEN})
    sub.call("server.handshake", {"protocol_version": 3})
    sub.call("host.subscribe")
    sub.session.channel.pause()
    writer = DispatchConn(state, auth={"token": TOKEN})
    for i in range(2000):
        writer.call("host.notify", {"message": "x" * 1000})
    assert state.stats.subscriber_drops > 0
