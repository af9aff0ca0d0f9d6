"""
Voice through the real dispatcher on a Clock, with a fake recognizer that
reads its "audio" as text (``.`` ends an utterance) and a fake speaker:
the sinks, transcription by push and by binary frame, overrun, speech in
JSON and binary frames, cancel, the providers, and meetings on disk.
"""

import base64
import json

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from car_twisted.config import AdapterRegistration
from car_twisted.interfaces import (
    IClientSession,
    IMemgineIngestSink,
    IRecognition,
    ISpeaker,
    ITranscriber,
    IVoiceEventSink,
)
from car_twisted.memory.graph import MemoryGraph
from car_twisted.voice import frames
from car_twisted.voice.model import Segment, TranscriptUpdate, VoiceEvent
from car_twisted.voice.sinks import WsMemgineIngestSink, WsVoiceEventSink
from support import TOKEN, DispatchConn, make_state

SID = "00112233445566778899aabbccddeeff"


@implementer(IRecognition)
class TextRecognition:
    """Bytes are text; '.' ends an utterance; 2 bytes are one sample at the declared rate."""

    def __init__(self, rate):
        self.rate = rate
        self.pending = ""
        self.offset = 0
        self.start = 0
        self.closed = False

    def accept(self, pcm):
        finals = []
        for ch in pcm.decode():
            self.offset += 1
            if ch == ".":
                if self.pending.strip():
                    finals.append(Segment(self.pending.strip(), self.start / 2 / self.rate, self.offset / 2 / self.rate))
                self.pending, self.start = "", self.offset
            else:
                self.pending += ch
        return TranscriptUpdate(partial=self.pending.strip() or None, finals=tuple(finals))

    def finish(self):
        rest = self.pending.strip()
        self.pending = ""
        return (Segment(rest, self.start / 2 / self.rate, self.offset / 2 / self.rate),) if rest else ()

    def close(self):
        self.closed = True


@implementer(ITranscriber)
class TextTranscriber:
    name = "text"
    description = "reads bytes as text (tests)"

    def __init__(self, why=None):
        self.why = why
        self.opened = []

    def unavailable(self):
        return self.why

    def open(self, sample_rate, channels):
        rec = TextRecognition(sample_rate)
        self.opened.append(rec)
        return rec


@implementer(ISpeaker)
class FakeSpeaker:
    name = "fake-tts"
    description = "held chunks (tests)"
    audio_format = "wav"

    def __init__(self):
        self.calls = []

    def unavailable(self):
        return None

    def speak(self, text, voice, on_chunk):
        d = Deferred(lambda _: self.calls[-1].__setitem__("cancelled", True))
        self.calls.append({"text": text, "voice": voice, "on_chunk": on_chunk, "d": d, "cancelled": False})
        return d


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def speaker():
    return FakeSpeaker()


@pytest.fixture
def state(tmp_path, clock, speaker):
    return make_state(tmp_path, clock, transcribers=(TextTranscriber(),), speakers=(speaker,))


class VoiceConn(DispatchConn):
    """Keeps the notifications that arrive between replies (``call`` pops the sink)."""

    def __init__(self, state, auth):
        self.seen = []
        super().__init__(state, auth)

    def call(self, method, params=None):
        rid = self.send(method, params)
        popped = self.sink.pop()
        self.seen += [m for m in popped if "id" not in m or m.get("id") is None]
        replies = [m for m in popped if m.get("id") == rid]
        assert replies, f"no reply to {method}"
        return replies[0]

    def notes(self):
        popped = self.sink.pop()
        self.seen += [m for m in popped if "id" not in m or m.get("id") is None]
        return self.seen


def conn(state, **auth):
    return VoiceConn(state, {"token": TOKEN, **auth})


def events(c, session_id=None):
    out = [m["params"] for m in c.notes() if m.get("method") == "voice.event"]
    return [e["event"] for e in out if session_id is None or e["session_id"] == session_id]


def start(c, sid=SID, **source):
    return c.result("voice.transcribe_stream.start",
                    {"session_id": sid, "audio_source": {"kind": "pcm_push", "sample_rate": 16000, **source}})


def push(c, text, sid=SID):
    return c.call("voice.transcribe_stream.push", {"session_id": sid, "pcm_b64": base64.b64encode(text.encode()).decode()})


def test_interfaces(state):
    c = conn(state)
    sink = WsVoiceEventSink(c.session)
    assert verifyObject(IVoiceEventSink, sink)
    assert verifyObject(IMemgineIngestSink, WsMemgineIngestSink(sink, MemoryGraph(Clock())))
    assert verifyObject(ITranscriber, TextTranscriber()) and verifyObject(IRecognition, TextRecognition(16000))
    assert verifyObject(ISpeaker, FakeSpeaker())
    # The registry's defaults.
    assert isinstance(c.session.component(IVoiceEventSink), WsVoiceEventSink)
    ingest = state.multi_component((sink, MemoryGraph(Clock())), IMemgineIngestSink)
    assert isinstance(ingest, WsMemgineIngestSink)


@implementer(IVoiceEventSink)
class Recorder:
    def __init__(self, session=None):
        self.got = []

    def send(self, event):
        self.got.append(event)


def test_ingest_sink_forwards_every_event_unchanged_and_remembers_only_finals(clock):
    upstream = Recorder()
    graph = MemoryGraph(clock)
    ingested = []
    sink = WsMemgineIngestSink(upstream, graph)
    sink.on_ingest = ingested.append
    sent = [
        VoiceEvent("s1", {"type": "partial", "text": "hello"}),
        VoiceEvent("s1", {"type": "final", "text": "hello world", "start": 0.0, "end": 1.2, "segment": 0, "speaker": "ada"}),
        VoiceEvent("s1", {"type": "tts_chunk", "seq": 0}, audio=b"RIFF", binary=True),
        VoiceEvent("s1", {"type": "final", "text": "  ", "segment": 1}),
        VoiceEvent("s1", {"type": "final", "text": "second thought", "start": 1.5, "end": 2.0, "segment": 2,
                          "meeting_id": "m1"}),
        VoiceEvent("s1", {"type": "error", "message": "x"}),
    ]
    for event in sent:
        sink.send(event)
    assert len(upstream.got) == len(sent) and all(a is b for a, b in zip(upstream.got, sent))
    facts = graph.facts()
    assert [f.body for f in facts] == ["hello world", "second thought"]
    assert [f.id for f in ingested] == [f.id for f in facts] == ["voice-s1-0", "voice-s1-2"]
    assert facts[0].kind == "conversation" and facts[0].metadata["speaker"] == "ada"
    assert facts[1].metadata["meeting_id"] == "m1" and "meeting" in facts[1].tags
    # A replayed final replaces its fact.
    sink.send(sent[1])
    assert graph.count() == 2


def test_an_embedders_sink_replaces_the_default_for_its_daemon_only(tmp_path, clock):
    made = []

    def mine(session):
        made.append(Recorder(session))
        return made[-1]

    custom = make_state(tmp_path / "a", clock, transcribers=(TextTranscriber(),),
                        adapters=[AdapterRegistration(IClientSession, IVoiceEventSink, mine)])
    plain = make_state(tmp_path / "b", clock, transcribers=(TextTranscriber(),))
    a, b = conn(custom), conn(plain)
    start(a)
    start(b)
    push(a, "hello there.")
    push(b, "hello there.")
    assert events(a) == [] and [e.type for e in made[0].got] == ["final"]
    assert [e["type"] for e in events(b)] == ["final"]
    # The ingest sink still wraps the embedder's sink: the final was remembered.
    assert a.result("memory.query", {"query": "hello there"})[0]["body"] == "hello there"


def test_transcription_by_push(state):
    c = conn(state, memory_namespace="team")
    reply = start(c, sid="plain-id")
    assert reply["status"] == "streaming" and reply["binary_frames"] is False and reply["provider"] == "text"
    assert push(c, "one two ", sid="plain-id")["result"]["accepted_bytes"] == 8
    push(c, "three. four ", sid="plain-id")
    got = events(c, "plain-id")
    assert got[0] == {"type": "partial", "text": "one two"}
    assert got[1]["type"] == "final" and got[1]["text"] == "one two three" and got[1]["segment"] == 0
    assert got[2] == {"type": "partial", "text": "four"}
    listed = c.result("voice.sessions.list")
    assert [s["session_id"] for s in listed] == ["plain-id"]
    result = c.result("voice.transcribe_stream.stop", {"session_id": "plain-id"})
    assert result["status"] == "stopped" and result["text"] == "one two three four"
    assert [s["text"] for s in result["transcript"]] == ["one two three", "four"]
    assert events(c, "plain-id")[-1]["text"] == "four"
    assert c.result("voice.sessions.list") == []
    assert {f["body"] for f in c.result("memory.query", {"query": "three four", "k": 5})} == {"one two three", "four"}
    assert conn(state).result("memory.query", {"query": "three four"}) == []  # another scope
    err = push(c, "late", sid="plain-id")["error"]
    assert err["code"] == -32602 and "no voice stream" in err["message"]


def test_bad_starts(state):
    c = conn(state)
    bad = [
        ({"session_id": "x", "audio_source": {"kind": "mic"}}, "audio_source.kind"),
        ({"session_id": "x", "audio_source": {"kind": "pcm_push", "sample_rate": 100}}, "audio_source.sample_rate"),
        ({"session_id": "x", "audio_source": {"kind": "pcm_push", "channels": 3}}, "audio_source.channels"),
        ({"session_id": "x", "audio_source": {"kind": "pcm_push"}, "options": {"provider": "nope"}}, None),
    ]
    for params, field in bad:
        err = c.call("voice.transcribe_stream.start", params)["error"]
        assert err["code"] == -32602, err
        if field:
            assert err["data"]["field"] == field
    start(c, sid="dup")
    assert c.call("voice.transcribe_stream.start", {"session_id": "dup", "audio_source": {"kind": "pcm_push"}})["error"][
        "data"]["reason"] == "duplicate_stream"
    assert push(c, "odd", sid="dup")["error"]["data"]["field"] == "pcm_b64"


def test_unavailable_provider_is_reported_and_named(tmp_path, clock):
    state = make_state(tmp_path, clock, transcribers=(TextTranscriber("install car-twisted[voice] (pocketsphinx)"),),
                       speakers=(FakeSpeaker(),))
    c = conn(state)
    rows = c.result("voice.providers.list")
    assert rows[0] == {"id": "text", "kind": "stt", "available": False, "description": "reads bytes as text (tests)",
                       "reason": "install car-twisted[voice] (pocketsphinx)"}
    assert rows[1]["kind"] == "tts" and rows[1]["available"] is True
    err = c.call("voice.transcribe_stream.start", {"session_id": "x", "audio_source": {"kind": "pcm_push"}})["error"]
    assert "car-twisted[voice]" in err["message"] and err["data"]["reason"] == "provider_unavailable"
    assert state.voice.live == 0


def test_binary_frames_reach_only_the_owners_stream(state):
    owner, other = conn(state), conn(state)
    start(owner)
    owner.dispatcher.dispatch_binary(owner.session, frames.build_frame(frames.FRAME_PCM, SID, 0, 0, b"alpha."))
    owner.dispatcher.dispatch_binary(owner.session, frames.build_frame(frames.FRAME_PCM, SID, 0, 0, b"dup."))
    owner.dispatcher.dispatch_binary(owner.session, frames.build_frame(frames.FRAME_PCM, SID, 5, 0, b"beta."))
    other.dispatcher.dispatch_binary(other.session, frames.build_frame(frames.FRAME_PCM, SID, 9, 0, b"intruder."))
    assert [e["text"] for e in events(owner) if e["type"] == "final"] == ["alpha", "beta"]
    (refusal,) = other.notes()
    assert refusal["error"]["code"] == -32602 and f"no voice stream {SID} on this connection" in refusal["error"]["message"]
    owner.dispatcher.dispatch_binary(owner.session, b"\x09" + b"\x00" * 30)
    owner.dispatcher.dispatch_binary(owner.session, frames.tts_final(SID, 1))
    errors = [m["error"]["message"] for m in owner.notes() if "error" in m]
    assert len(errors) == 2 and all(e.startswith("binary frame refused") for e in errors)


def test_a_client_pushing_faster_than_recognition_is_told(tmp_path):
    from twisted.internet.defer import Deferred as D

    held = []

    class SlowPool:
        size = 1
        reactor = Clock()

        def run(self, fn, *args):
            d = D()
            held.append((d, fn, args))
            return d

    state = make_state(tmp_path, Clock(), transcribers=(TextTranscriber(),))
    state.voice.pool = SlowPool()
    c = conn(state)
    c.send("voice.transcribe_stream.start", {"session_id": SID, "audio_source": {"kind": "pcm_push", "sample_rate": 8000}})
    d, fn, args = held.pop(0)
    d.callback(fn(*args))  # the recognizer opens; recognition then hangs
    limit = int(8000 * 2 * 30)
    ok = push(c, "a" * (limit // 2))
    queued = ok["result"]["queued_bytes"]
    assert queued < limit // 2  # one chunk went to the (hung) recognizer
    err = push(c, "b" * (limit - queued + 2))["error"]
    assert err["code"] == -32603 and err["data"]["reason"] == "overrun" and err["data"]["limit"] == limit
    too_much = limit - queued + 2
    c.dispatcher.dispatch_binary(c.session, frames.build_frame(frames.FRAME_PCM, SID, 1, 0, b"c" * too_much))
    (warning,) = [e for e in events(c) if e["type"] == "error"]
    assert warning["reason"] == "overrun" and warning["dropped_bytes"] == too_much


def test_speech_as_json_events_then_cancel(state, speaker):
    c = conn(state)
    assert c.result("voice.tts_stream.start", {"stream_id": "s1", "text": "hello"}) == {
        "stream_id": "s1", "binary_frames": False, "provider": "fake-tts", "format": "wav"}
    call = speaker.calls[0]
    call["on_chunk"](b"RIFF1234")
    call["on_chunk"](b"data")
    assert c.result("voice.tts_stream.list") == {"streams": ["s1"]}
    call["d"].callback(None)
    got = events(c, "s1")
    assert [(e["seq"], e["is_final"], base64.b64decode(e["audio_b64"])) for e in got] == [
        (0, False, b"RIFF1234"), (1, False, b"data"), (2, True, b"")]
    assert c.result("voice.tts_stream.list") == {"streams": []}
    assert c.result("voice.tts_stream.cancel", {"stream_id": "s1"}) == {"stream_id": "s1", "cancelled": False}

    c.result("voice.tts_stream.start", {"stream_id": "s2", "text": "a long story"})
    second = speaker.calls[1]
    assert c.result("voice.tts_stream.cancel", {"stream_id": "s2"}) == {"stream_id": "s2", "cancelled": True}
    assert second["cancelled"] is True
    second["on_chunk"](b"late")
    assert events(c, "s2") == []
    assert c.result("voice.tts_stream.cancel", {"stream_id": "s2"})["cancelled"] is False


def test_speech_as_binary_frames(state, speaker):
    c = conn(state)
    err = c.call("voice.tts_stream.start", {"stream_id": "not-hex", "text": "x", "options": {"binary_frames": True}})
    assert err["error"]["data"]["field"] == "stream_id"
    c.result("voice.tts_stream.start", {"stream_id": SID, "text": "hello", "options": {"binary_frames": True}})
    speaker.calls[0]["on_chunk"](b"RIFFxxxx")
    speaker.calls[0]["d"].callback(None)
    parsed = [frames.parse_frame(b) for b in c.sink.binary]
    assert [(f.type, f.seq, f.payload) for f in parsed] == [(frames.FRAME_TTS_CHUNK, 0, b"RIFFxxxx"),
                                                            (frames.FRAME_TTS_FINAL, 1, b"")]
    assert parsed[0].format == frames.FORMAT_WAV and events(c) == []
    c.result("voice.tts_stream.start", {"stream_id": SID, "text": "again", "options": {"binary_frames": True}})
    speaker.calls[1]["d"].errback(RuntimeError("espeak-ng exited 1"))
    last = frames.parse_frame(c.sink.binary[-1])
    assert last.type == frames.FRAME_TTS_ERROR and "espeak-ng exited 1" in last.payload.decode()


def test_meeting_on_disk_and_after_a_restart(tmp_path, clock):
    state = make_state(tmp_path, clock, transcribers=(TextTranscriber(),))
    c = conn(state)
    started = c.result("meeting.start", {"audio_source": {"kind": "pcm_push"}, "title": "Standup", "speaker": "ada"})
    mid = started["id"]
    assert frames.is_stream_id(mid) and started["binary_frames"] is True and started["status"] == "recording"
    push(c, "the build is green. deploy the release today. lunch at noon.  ", sid=mid)
    finals = [e for e in events(c, mid) if e["type"] == "final"]
    assert [e["meeting_id"] for e in finals] == [mid] * 3 and finals[0]["speaker"] == "ada"
    stopped = c.result("meeting.stop", {"meeting_id": mid})
    assert stopped["status"] == "stopped" and stopped["segments"] == 3
    assert stopped["text"] == "the build is green deploy the release today lunch at noon".replace("green ", "green ")
    assert stopped["summary"]
    directory = state.config.paths.home / ".car" / "meetings" / mid
    lines = (directory / "transcript.jsonl").read_text().splitlines()
    assert [json.loads(line)["text"] for line in lines] == ["the build is green", "deploy the release today", "lunch at noon"]
    assert oct((directory / "meeting.json").stat().st_mode & 0o777) == "0o600"
    # A torn last line (a crash mid-write) is skipped.
    with open(directory / "transcript.jsonl", "a") as f:
        f.write('{"segment": 3, "te')
    again = make_state(tmp_path, Clock(), transcribers=(TextTranscriber(),))
    c2 = conn(again)
    record = c2.result("meeting.get", {"meeting_id": mid})
    assert record["title"] == "Standup" and record["status"] == "stopped" and len(record["transcript"]) == 3
    assert [m["id"] for m in c2.result("meeting.list")["meetings"]] == [mid]
    # The segments were remembered, and the memory journal is on disk too.
    assert c2.result("memory.query", {"query": "deploy release"})[0]["body"] == "deploy the release today"


def test_meeting_root_is_confined_and_owner_only(state):
    c, other = conn(state), conn(state)
    for root in ("../out", "/etc", "a\0b"):
        err = c.call("meeting.start", {"audio_source": {"kind": "pcm_push"}, "root": root})["error"]
        assert err["code"] == -32602 and err["message"].startswith("meeting.start rejected path"), err
    started = c.result("meeting.start", {"id": "m-1", "audio_source": {"kind": "pcm_push"}, "root": "proj"})
    assert (state.config.paths.home / "meeting-roots" / "proj" / ".car" / "meetings" / "m-1" / "meeting.json").exists()
    assert started["root"] == "proj"
    assert other.call("meeting.stop", {"meeting_id": "m-1"})["error"]["data"]["reason"] == "forbidden"
    assert c.call("meeting.get", {"meeting_id": "m-1"})["error"]["code"] == -32602  # not under $CAR_HOME
    assert c.result("meeting.get", {"meeting_id": "m-1", "root": "proj"})["status"] == "recording"
    assert c.call("meeting.get", {"meeting_id": "../x"})["error"]["data"]["field"] == "meeting_id"


def test_a_meeting_whose_connection_goes_is_interrupted(state):
    c = conn(state)
    c.result("meeting.start", {"id": "m-2", "audio_source": {"kind": "pcm_push"}})
    push(c, "first point. second ", sid="m-2")
    c.close()
    record = conn(state).result("meeting.get", {"meeting_id": "m-2"})
    assert record["status"] == "interrupted" and [s["text"] for s in record["transcript"]] == ["first point"]
    assert state.voice.live == 0
