"""The outbox every fan-out (host events, run traces, A2UI events) sends through."""

from car_twisted.outbox import Outbox
from car_twisted.testing import MemorySink
from car_twisted.ws.channel import WsChannel
from twisted.internet.task import Clock


def channel():
    sink = MemorySink()
    return WsChannel(sink, Clock()), sink


def test_sent_at_once_while_output_flows():
    ch, sink = channel()
    box = Outbox(ch, 100)
    assert box.push(b"a") and sink.frames == [b"a"] and not box.backlog


def test_queued_while_paused_then_dropped_past_the_bound_and_reported_once():
    ch, sink = channel()
    box = Outbox(ch, 10)
    ch.pause()
    assert box.push(b"12345") and box.push(b"67890")
    assert not box.push(b"x")  # 11 bytes would pass the bound
    assert sink.frames == [] and box.backlog_bytes == 10 and box.dropped == 1
    ch.resume()
    assert box.drain() == 1  # drained: the drop is reported ...
    assert sink.frames == [b"12345", b"67890"]
    assert box.drain() == 0  # ... once


def test_later_frames_get_in_as_room_frees_unless_holding():
    for hold, expected in ((False, [b"aaaa", b"bb"]), (True, [b"aaaa"])):
        ch, sink = channel()
        box = Outbox(ch, 6, hold_after_drop=hold)
        ch.pause()
        box.push(b"aaaa")
        box.push(b"cccc")  # dropped: no room
        box.push(b"bb")  # fits; a holding outbox drops it to keep the stream consistent after a gap
        ch.resume()
        assert box.drain() == (1 if not hold else 2)
        assert sink.frames == expected


def test_a_drain_that_pauses_again_keeps_the_rest_and_reports_nothing_yet():
    ch, sink = channel()
    box = Outbox(ch, 100, hold_after_drop=True)
    ch.pause()
    box.push(b"1")
    box.push(b"2")
    box.dropped = 3
    sent = []
    ch.sink.send_text = lambda frame: (sent.append(frame), ch.pause(), True)[-1]
    ch.paused = False
    assert box.drain() == 0 and sent == [b"1"] and list(box.backlog) == [b"2"]
