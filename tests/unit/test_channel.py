"""WsChannel: server-to-client requests over a fake sink and a Clock."""

import json

from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from car_twisted.errors import CallbackTimeout, ChannelClosed, ClientRpcError
from car_twisted.interfaces import IWsSink
from car_twisted.ws.channel import WsChannel
from support import FakeSink


class WsChannelTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.sink = FakeSink()
        self.channel = WsChannel(self.sink, self.clock, max_pending=4)

    def sent(self):
        return [json.loads(f) for f in self.sink.frames]

    def test_fake_sink_provides_interface(self):
        """The test sink is a faithful IWsSink."""
        verifyObject(IWsSink, self.sink)

    def test_request_sends_string_id_and_fires_with_result(self):
        """A request goes out with a string id and fires with the client's result."""
        d = self.channel.request("tools.execute", {"tool": "x"}, timeout=5)
        (frame,) = self.sent()
        self.assertEqual(frame["method"], "tools.execute")
        self.assertIsInstance(frame["id"], str)
        self.assertTrue(self.channel.deliver(frame["id"], result={"ok": 1}))
        self.assertEqual(self.successResultOf(d), {"ok": 1})
        self.assertEqual(self.channel.pending_count(), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_explicit_request_id(self):
        """A caller-chosen id (the tool executor's cb-N) is used verbatim."""
        self.channel.request("tools.execute", {}, timeout=5, request_id="cb-7")
        self.assertEqual(self.sent()[0]["id"], "cb-7")

    def test_client_error_fails_with_its_message(self):
        """An error response fails the call with the client's code, message and data."""
        d = self.channel.request("tools.execute", {}, timeout=5)
        rid = self.sent()[0]["id"]
        self.channel.deliver(rid, error={"code": -32000, "message": "boom", "data": {"terminal": True}})
        err = self.failureResultOf(d, ClientRpcError).value
        self.assertEqual((err.code, err.message, err.data), (-32000, "boom", {"terminal": True}))

    def test_timeout_fails_and_late_reply_is_ignored(self):
        """No answer in time fails the call; a reply after that is ignored."""
        d = self.channel.request("tools.execute", {}, timeout=5)
        rid = self.sent()[0]["id"]
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.failureResultOf(d, CallbackTimeout)
        self.assertFalse(self.channel.deliver(rid, result=1))
        self.assertEqual(self.channel.pending_count(), 0)

    def test_duplicate_reply_is_ignored(self):
        """A second reply to the same id changes nothing."""
        d = self.channel.request("m", {}, timeout=5)
        rid = self.sent()[0]["id"]
        self.assertTrue(self.channel.deliver(rid, result=1))
        self.assertFalse(self.channel.deliver(rid, result=2))
        self.assertEqual(self.successResultOf(d), 1)

    def test_integer_reply_id_does_not_match_string_request(self):
        """Ids keep their JSON type: 1 is not "srv-1"."""
        self.channel.request("m", {}, timeout=None)
        self.assertFalse(self.channel.deliver(1, result=1))
        self.assertEqual(self.channel.pending_count(), 1)

    def test_close_fails_all_pending_and_cancels_timers(self):
        """A disconnect fails every pending call and leaves no timer behind."""
        d1 = self.channel.request("a", {}, timeout=5)
        d2 = self.channel.request("b", {}, timeout=None)
        self.channel.close()
        self.failureResultOf(d1, ChannelClosed)
        self.failureResultOf(d2, ChannelClosed)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        d3 = self.channel.request("c", {}, timeout=5)
        self.failureResultOf(d3, ChannelClosed)

    def test_cancel_forgets_the_call(self):
        """Cancelling the Deferred removes the entry and its timer."""
        d = self.channel.request("a", {}, timeout=5)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.channel.pending_count(), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_pending_calls_are_bounded(self):
        """Past max_pending a request fails at once instead of growing the table."""
        for _ in range(4):
            self.channel.request("a", {}, timeout=None)
        d = self.channel.request("a", {}, timeout=None)
        self.failureResultOf(d, ChannelClosed)
        self.assertEqual(self.channel.pending_count(), 4)

    def test_send_to_gone_client_fails_immediately(self):
        """A request on a sink that stopped accepting frames fails, not hangs."""
        self.sink.writable = False
        d = self.channel.request("a", {}, timeout=5)
        self.failureResultOf(d, ChannelClosed)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_notify(self):
        """A notification has no id."""
        self.assertTrue(self.channel.notify("host.event", {"x": 1}))
        self.assertEqual(self.sent(), [{"jsonrpc": "2.0", "method": "host.event", "params": {"x": 1}}])

    def test_malformed_error_reply(self):
        """An error that is not an object still fails the call cleanly."""
        d = self.channel.request("a", {}, timeout=5)
        self.channel.deliver(self.sent()[0]["id"], error="nope")
        self.failureResultOf(d, ClientRpcError)
