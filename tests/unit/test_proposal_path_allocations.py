"""
What one ``proposal.submit`` round trip allocates and schedules, counted
(not timed): the proposal path's structural costs stay where they are.

A one-action proposal whose ``tools.execute`` callback the client answers
makes two Deferreds (the proposal's and the callback request's), no
coroutine, and two timers (the handler deadline and the callback
timeout); a session without a run records nothing and waits for nothing.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from support import TOKEN, DispatchConn, make_state


class Counting:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, clock: Clock) -> None:
        self.deferreds = 0
        self.coroutines = 0
        self.timers: list[str] = []
        init = defer.Deferred.__init__
        from_coroutine = defer.Deferred.fromCoroutine.__func__  # type: ignore[attr-defined]
        call_later = clock.callLater

        def counted_init(d, *a, **kw):
            self.deferreds += 1
            init(d, *a, **kw)

        def counted_from_coroutine(cls, coro):
            self.coroutines += 1
            return from_coroutine(cls, coro)

        def counted_call_later(delay, f, *a, **kw):
            self.timers.append(getattr(f, "__name__", repr(f)))
            return call_later(delay, f, *a, **kw)

        monkeypatch.setattr(defer.Deferred, "__init__", counted_init)
        monkeypatch.setattr(defer.Deferred, "fromCoroutine", classmethod(counted_from_coroutine))
        monkeypatch.setattr(clock, "callLater", counted_call_later)

    def reset(self) -> None:
        self.deferreds = self.coroutines = 0
        self.timers.clear()


def proposal(n: int) -> dict:
    return {"proposal": {"id": f"p{n}", "actions": [
        {"id": "a", "type": "tool_call", "tool": "echo", "parameters": {"x": n}}]}}


def round_trip(conn: DispatchConn, n: int) -> dict:
    """Submit, answer the callback, return the proposal's reply."""
    rid = conn.send("proposal.submit", proposal(n))
    (callback,) = [m for m in conn.sink.pop() if m.get("method") == "tools.execute"]
    conn.dispatcher.dispatch_text(conn.session, json.dumps(
        {"jsonrpc": "2.0", "id": callback["id"], "result": callback["params"]["parameters"]}).encode())
    (reply,) = [m for m in conn.sink.pop() if m.get("id") == rid]
    return reply


@pytest.fixture
def conn(tmp_path):
    clock = Clock()
    c = DispatchConn(make_state(tmp_path, clock), auth={"token": TOKEN})
    c.result("tools.register", [{"name": "echo"}])
    return c


def test_a_one_action_proposal_makes_two_deferreds_two_timers_and_no_coroutine(conn, monkeypatch):
    round_trip(conn, 0)  # warm: the pulse timer, adapters, caches
    counting = Counting(monkeypatch, conn.state.clock)
    for n in range(1, 21):
        counting.reset()
        reply = round_trip(conn, n)
        assert reply["result"]["results"][0]["status"] == "succeeded"
        assert reply["result"]["results"][0]["output"] == {"x": n}
        assert counting.coroutines == 0
        assert counting.deferreds == 2
        # The handler deadline and the callback's timeout; the progress
        # pulse timer is not scheduled per request.
        assert counting.timers == ["timeItOut", "timeItOut"]


def test_every_timer_of_a_proposal_is_gone_after_its_reply(conn):
    for n in range(5):
        round_trip(conn, n)
    clock = conn.state.clock
    assert [c for c in clock.getDelayedCalls() if c.active() and c.func.__name__ != "_beat"] == []
