"""WsToolExecutor over a memory sink and a Clock."""

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from car_twisted.interfaces import IToolExecutor
from car_twisted.proposal.ir import ToolCall, ToolError
from car_twisted.ws.tool_executor import WsToolExecutor
from car_twisted.testing import FakeToolExecutor, MemorySink
from car_twisted.ws.channel import WsChannel


class WsToolExecutorTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.sink = MemorySink()
        self.channel = WsChannel(self.sink, self.clock)
        self.executor = WsToolExecutor(self.channel, self.clock, default_timeout_ms=300_000)

    def call(self, **kw):
        fields = dict(action_id="a1", tool="echo", parameters={"x": 1}, timeout_ms=None, attempt=1, session_id=None)
        fields.update(kw)
        return ToolCall(**fields)

    def sent(self):
        return self.sink.pop()

    def answer(self, rid, **kw):
        return self.channel.deliver(rid, **kw)

    def test_interfaces(self):
        verifyObject(IToolExecutor, self.executor)
        verifyObject(IToolExecutor, FakeToolExecutor())

    def test_success_and_wire_shape(self):
        """tools.execute carries the client's fields; request_id equals the string id."""
        d = self.executor.execute(self.call(timeout_ms=5000, attempt=2, session_id="sess-7"))
        (frame,) = self.sent()
        assert frame["method"] == "tools.execute"
        params = frame["params"]
        assert frame["id"] == params["request_id"] and isinstance(frame["id"], str)
        assert params == {
            "action_id": "a1",
            "tool": "echo",
            "parameters": {"x": 1},
            "attempt": 2,
            "request_id": frame["id"],
            "timeout_ms": 5000,
            "session_id": "sess-7",
        }
        self.answer(frame["id"], result={"echo": {"x": 1}})
        assert self.successResultOf(d) == {"echo": {"x": 1}}
        assert self.clock.getDelayedCalls() == []
        assert self.channel.pending_count() == 0

    def test_optional_fields_omitted(self):
        self.executor.execute(self.call())
        params = self.sent()[0]["params"]
        assert "timeout_ms" not in params and "session_id" not in params

    def test_client_error_carries_message_and_terminal(self):
        d = self.executor.execute(self.call())
        rid = self.sent()[0]["id"]
        self.answer(rid, error={"code": -32000, "message": "Python tool callback raised: ValueError: boom"})
        err = self.failureResultOf(d, ToolError).value
        assert err.message == "Python tool callback raised: ValueError: boom" and not err.terminal
        d = self.executor.execute(self.call())
        rid = self.sent()[0]["id"]
        self.answer(rid, error={"code": -32000, "message": "fatal", "data": {"terminal": True}})
        assert self.failureResultOf(d, ToolError).value.terminal

    def test_unknown_tool_and_missing_handler_are_not_terminal(self):
        """Only data.terminal halts: -32601 and "unknown tool" are ordinary failures."""
        d = self.executor.execute(self.call(tool="nope"))
        self.answer(self.sent()[0]["id"], error={"code": -32000, "message": "unknown tool: nope"})
        err = self.failureResultOf(d, ToolError).value
        assert err.kind == "unknown_tool" and "unknown tool 'nope'" in err.message
        assert not err.terminal
        d = self.executor.execute(self.call())
        self.answer(self.sent()[0]["id"], error={"code": -32601, "message": "no handler registered on FFI client for `tools.execute`"})
        err = self.failureResultOf(d, ToolError).value
        assert err.kind == "unknown_tool" and not err.terminal
        d = self.executor.execute(self.call())
        self.answer(self.sent()[0]["id"], error={"code": -32601, "message": "gone", "data": {"terminal": True}})
        assert self.failureResultOf(d, ToolError).value.terminal

    def test_action_budget_sends_cancel_with_request_id(self):
        """Past timeout_ms the call fails and tools.cancel names its request_id; a late reply is ignored."""
        d = self.executor.execute(self.call(timeout_ms=2000))
        rid = self.sent()[0]["id"]
        self.clock.advance(1.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        err = self.failureResultOf(d, ToolError).value
        assert err.kind == "timeout" and "timeout_ms (2000ms)" in err.message
        (cancel,) = self.sent()
        assert cancel == {
            "jsonrpc": "2.0",
            "method": "tools.cancel",
            "params": {"request_id": rid, "action_id": "a1", "reason": err.message},
        }
        assert not self.answer(rid, result="late")
        assert self.clock.getDelayedCalls() == [] and self.channel.pending_count() == 0

    def test_default_wait_sends_cancel(self):
        """With no budget the daemon waits DEFAULT_TOOL_TIMEOUT_MS, then cancels."""
        d = self.executor.execute(self.call())
        rid = self.sent()[0]["id"]
        self.clock.advance(299.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        assert self.failureResultOf(d, ToolError).value.kind == "timeout"
        (cancel,) = self.sent()
        assert cancel["method"] == "tools.cancel" and cancel["params"]["request_id"] == rid
        assert "callback timed out (300s)" in cancel["params"]["reason"]

    def test_one_timer_per_attempt(self):
        """The action's budget, else the daemon's wait: one timer, on the clock."""
        self.executor.execute(self.call(timeout_ms=1000))
        self.executor.execute(self.call(action_id="a2"))
        self.sent()
        assert sorted(c.getTime() for c in self.clock.getDelayedCalls()) == [1.0, 300.0]

    def test_external_cancel_sends_cancel_and_stays_cancelled(self):
        """The handler deadline cancels the call: tools.cancel goes out, the failure stays CancelledError."""
        d = self.executor.execute(self.call(timeout_ms=60_000))
        rid = self.sent()[0]["id"]
        d.cancel()
        self.failureResultOf(d, CancelledError)
        (cancel,) = self.sent()
        assert cancel["params"]["request_id"] == rid
        assert self.clock.getDelayedCalls() == [] and self.channel.pending_count() == 0

    def test_disconnect_fails_pending_without_cancel(self):
        d1 = self.executor.execute(self.call(timeout_ms=5000))
        d2 = self.executor.execute(self.call(action_id="a2"))
        self.sent()
        self.channel.close()
        for d in (d1, d2):
            assert self.failureResultOf(d, ToolError).value.kind == "disconnected"
        assert self.sent() == []
        assert self.clock.getDelayedCalls() == []

    def test_garbage_and_duplicate_replies(self):
        """A malformed error, then a duplicate reply: one clean failure, nothing leaked."""
        d = self.executor.execute(self.call())
        rid = self.sent()[0]["id"]
        self.answer(rid, error="garbage")
        self.failureResultOf(d, ToolError)
        assert not self.answer(rid, result=1)
        assert self.channel.pending_count() == 0 and self.clock.getDelayedCalls() == []

    def test_request_ids_are_unique(self):
        for i in range(3):
            self.executor.execute(self.call(action_id=f"a{i}"))
        ids = [f["id"] for f in self.sent()]
        assert len(set(ids)) == 3 and all(i.startswith("cb-") for i in ids)


@pytest.mark.parametrize("attempts", [3])
def test_retry_attempts_counted_on_the_wire(tmp_path, attempts):
    """The engine retries through the executor; the wire shows attempt 1, 2, 3."""
    from car_twisted.proposal.engine import ProposalEngine
    from car_twisted.proposal.ir import ToolSchema, parse_proposal
    from car_twisted.runtime import KeyValueStore

    clock = Clock()
    sink = MemorySink()
    channel = WsChannel(sink, clock)
    engine = ProposalEngine(clock, WsToolExecutor(channel, clock), KeyValueStore().view(None), {"flaky": ToolSchema("flaky")}, [])
    proposal = parse_proposal(
        {"actions": [{"id": "a1", "type": "tool_call", "tool": "flaky", "failure_behavior": "retry", "max_retries": attempts - 1}]}
    )
    d = engine.run(proposal)
    seen = []
    for n in range(attempts):
        (frame,) = sink.pop()
        seen.append(frame["params"]["attempt"])
        if n < attempts - 1:
            channel.deliver(frame["id"], error={"code": -32000, "message": f"fail {n}"})
        else:
            channel.deliver(frame["id"], result="ok")
    result = d.result
    assert seen == [1, 2, 3]
    assert result.results[0].status == "succeeded" and result.results[0].attempts == 3
    assert result.cost["retries"] == 2 and result.cost["tool_calls"] == 3
