"""
Voice over real sockets, with the real backends: speech that espeak-ng
says (offline, before the test) is pushed to the daemon on loopback as
binary frames ``0x01`` and as base64 ``voice.transcribe_stream.push``, and
PocketSphinx in the daemon recognises it; a meeting's transcript is on
disk and a fresh daemon on the same ``CAR_HOME`` reads it back; speech
out comes as binary frames ``0x02``/``0x03`` and as ``tts_chunk`` events,
and a cancel kills espeak-ng with nothing sent after its reply; a frame
for another connection's stream is refused.

The daemon runs in this process, so its espeak-ng children are children
of the test process.  Everything waits on replies and events; only the
end of a child process is polled (``until``).  Nothing here is skipped:
without pocketsphinx (``pip install 'car-twisted[voice]'``) or espeak-ng
(``apt-get install espeak-ng``) these tests fail saying what to install.
"""

import base64
import io
import json
import os
import shutil
import stat
import subprocess
import uuid
import wave
from collections import Counter

import numpy as np
import pytest
import pytest_twisted
from scipy.signal import resample_poly

from car_twisted.voice import frames
from support import alive, espeak_children, start_server, until

PHRASES = ("one two three four five", "hello world")
WORDS = " ".join(PHRASES).split()
RATE = 16000
FRAME_BYTES = RATE * 2 // 10  # 100 ms of 16-bit mono
QUICK_FOX = "The quick brown fox jumps over the lazy dog. "
SPOKEN = "one two three four five six seven eight nine ten"


# -- what the tests need installed, and the speech they push ---------------------------


@pytest.fixture(scope="module")
def espeak():
    program = shutil.which("espeak-ng")
    if program is None:
        pytest.fail("espeak-ng is not installed: apt-get install espeak-ng (CI installs it)")
    return program


@pytest.fixture(scope="module", autouse=True)
def pocketsphinx_installed():
    try:
        import pocketsphinx  # noqa: F401
    except ImportError:
        pytest.fail("pocketsphinx is not installed: pip install 'car-twisted[voice]' (CI installs it)")


def espeak_wav(espeak, path, text, *args):
    """What ``espeak-ng -w`` writes (true sizes): (int16 samples, rate)."""
    subprocess.run([espeak, "-w", str(path), *args, "--stdin"], input=text.encode(), check=True,
                   capture_output=True, timeout=60)
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth()) == (1, 2)
        return np.frombuffer(w.readframes(w.getnframes()), "<i2"), w.getframerate()


@pytest.fixture(scope="module")
def speech(espeak, tmp_path_factory):
    """
    The phrases as 16 kHz mono s16le PCM: espeak-ng's 22050 Hz resampled,
    1 s of silence before, between and after, over a faint noise floor
    (espeak-ng's pauses are exact zeros, which no microphone gives and
    which throw pocketsphinx's cepstral mean normalisation).
    """
    tmp_dir = tmp_path_factory.mktemp("speech")
    parts = []
    for n, text in enumerate(PHRASES):
        samples, rate = espeak_wav(espeak, tmp_dir / f"phrase{n}.wav", text, "-v", "en-us")
        g = np.gcd(RATE, rate)
        parts += [np.zeros(RATE), resample_poly(samples.astype(np.float64), RATE // g, rate // g)]
    parts.append(np.zeros(RATE))
    audio = np.concatenate(parts)
    audio += np.random.default_rng(7).normal(0.0, 50.0, len(audio))
    return np.clip(np.rint(audio), -32768, 32767).astype("<i2").tobytes()


def pieces(pcm, size=FRAME_BYTES):
    return [pcm[i : i + size] for i in range(0, len(pcm), size)]


def hits(text):
    """How many of the spoken words C{text} holds (each counted at most as often as it was said)."""
    return sum((Counter(text.split()) & Counter(WORDS)).values())


# -- the connection ----------------------------------------------------------------------


async def connect(server):
    client = await server.client("tcp")
    await client.authenticate()
    return client


async def error_of(client, method, params=None):
    reply = await client.call(method, params)
    assert "error" in reply, reply
    return reply["error"]


def voice_events(client, session_id):
    """The ``voice.event`` bodies this client got for C{session_id}, in order."""
    out = []
    for msg in client.notifications:
        if msg.get("method") == "voice.event":
            params = msg["params"]
            assert set(params) == {"session_id", "event"}, params
            if params["session_id"] == session_id:
                out.append(params["event"])
    return out


def frames_of(client, stream_id):
    """The binary frames this client got for C{stream_id}, parsed, in order."""
    parsed = [frames.parse_frame(data) for data in client.binary]
    return [f for f in parsed if f.stream_id == stream_id]


async def push_frames(client, session_id, pcm, first_seq=1000):
    """
    C{pcm} as 100 ms ``0x01`` frames with increasing seq; the eleventh frame
    is sent twice (the copy must be dropped).  Returns once the daemon has
    taken them all (a round trip after the last frame).
    """
    for n, piece in enumerate(pieces(pcm)):
        data = frames.build_frame(frames.FRAME_PCM, session_id, first_seq + n, 0, piece)
        client.send_raw(data, binary=True)
        if n == 10:
            client.send_raw(data, binary=True)
    await client.result("voice.sessions.list")


async def push_base64(client, session_id, pcm):
    for piece in pieces(pcm):
        result = await client.result("voice.transcribe_stream.push",
                                     {"session_id": session_id, "pcm_b64": base64.b64encode(piece).decode()})
        assert result["accepted_bytes"] == len(piece), result


def check_transcript(client, session_id, result, pcm):
    """The stream's events and its stop result, for C{pcm} of the phrases."""
    events = voice_events(client, session_id)
    kinds = [e["type"] for e in events]
    assert "error" not in kinds, events
    partials = [e for e in events if e["type"] == "partial"]
    finals = [e for e in events if e["type"] == "final"]
    assert partials and finals, events
    assert all(isinstance(e["text"], str) and e["text"].strip() for e in partials)
    # The first partial comes before the first final.
    assert kinds.index("partial") < kinds.index("final")
    assert [e["segment"] for e in finals] == list(range(len(finals)))
    seconds = len(pcm) / (2 * RATE)
    previous_end = 0.0
    for e in finals:
        assert e["text"].strip()
        assert previous_end <= e["start"] < e["end"] <= seconds + 0.05, e
        previous_end = e["end"]
    # The first phrase begins after the first second of silence.
    assert 0.6 <= finals[0]["start"] <= 1.4, finals[0]
    # The stop result: every final, in order, and a majority of the words.
    assert result["status"] == "stopped", result
    assert result["segments"] == len(finals)
    assert [t["text"] for t in result["transcript"]] == [e["text"] for e in finals]
    assert result["text"] == " ".join(e["text"] for e in finals)
    assert hits(result["text"]) > len(WORDS) // 2, f"heard {result['text']!r} for {PHRASES}"
    assert result["audio_secs"] == round(seconds, 3)
    return finals


# -- transcription --------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["frames", "push"])
@pytest_twisted.ensureDeferred
async def test_speech_is_transcribed_and_remembered(reactor, tmp_path, speech, how):
    """Partials and finals as ``voice.event``; the stop result; each final a conversation fact."""
    server = await start_server(reactor, tmp_path)
    try:
        client = await connect(server)
        sid = uuid.uuid4().hex if how == "frames" else "b64-stream-1"
        started = await client.result("voice.transcribe_stream.start",
                                      {"session_id": sid, "audio_source": {"kind": "pcm_push", "sample_rate": RATE}})
        assert started["binary_frames"] is (how == "frames"), started
        assert (started["session_id"], started["provider"], started["sample_rate"], started["channels"]) == (
            sid, "pocketsphinx", RATE, 1)
        if how == "frames":
            await push_frames(client, sid, speech)
        else:
            await push_base64(client, sid, speech)
        # Recognition runs while audio waits: a final arrives before stop is asked.
        await client.when(lambda: any(e["type"] == "final" for e in voice_events(client, sid)), "a final segment")
        reply_at = []
        stop = client.send("voice.transcribe_stream.stop", {"session_id": sid})
        stop.addCallback(lambda msg: reply_at.append(len(client.notifications)) or msg)
        reply = await stop
        assert "result" in reply, reply
        # Every event of the stream went out before the stop reply.
        before_reply = client.notifications[: reply_at[0]]
        assert len(voice_events(client, sid)) == sum(
            1 for m in before_reply if m["method"] == "voice.event" and m["params"]["session_id"] == sid)
        finals = check_transcript(client, sid, reply["result"], speech)
        assert await client.result("voice.sessions.list") == []

        # Each final is a conversation fact in the connection's (shared) graph.
        word = next(w for w in finals[0]["text"].split() if w in WORDS)
        found = await client.result("memory.query", {"query": word, "k": 5})
        ours = [f for f in found if f["fact_id"] == f"voice-{sid}-0"]
        assert ours, found
        assert ours[0]["kind"] == "conversation"
        assert ours[0]["body"] == finals[0]["text"]
        assert ours[0]["subject"] == f"speaker in voice session {sid}"
        assert "voice" in ours[0]["tags"] and "meeting" not in ours[0]["tags"]
        assert await client.result("memory.fact_count") == len(finals)
    finally:
        await server.stop()


# -- meetings ---------------------------------------------------------------------------------


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest_twisted.ensureDeferred
async def test_meeting_transcript_on_disk_and_after_a_restart(reactor, tmp_path, speech):
    server = await start_server(reactor, tmp_path)
    try:
        client = await connect(server)
        started = await client.result("meeting.start", {"audio_source": {"kind": "pcm_push"}, "title": "Counting",
                                                        "speaker": "alice"})
        mid = started["id"]
        assert frames.is_stream_id(mid) and started["binary_frames"] is True, started
        assert (started["session_id"], started["status"], started["title"]) == (mid, "recording", "Counting")
        directory = tmp_path / "car-home" / ".car" / "meetings" / mid
        await push_frames(client, mid, speech)
        stopped = await client.result("meeting.stop", {"meeting_id": mid})
        assert (stopped["id"], stopped["status"], stopped["title"]) == (mid, "stopped", "Counting")
        finals = [e for e in voice_events(client, mid) if e["type"] == "final"]
        assert finals and all((e["meeting_id"], e["speaker"]) == (mid, "alice") for e in finals)
        assert [t["text"] for t in stopped["transcript"]] == [e["text"] for e in finals]
        assert stopped["segments"] == len(finals)
        assert hits(stopped["text"]) > len(WORDS) // 2, stopped["text"]
        assert stopped["summary"] and set(stopped["summary"].split()) <= set(stopped["text"].split())
        assert stopped["audio_secs"] == round(len(speech) / (2 * RATE), 3)

        # On disk once stop has answered: the metadata and one line per segment, owner-only.
        meta_file, transcript_file = directory / "meeting.json", directory / "transcript.jsonl"
        assert mode(meta_file) == 0o600 and mode(transcript_file) == 0o600
        meta = json.loads(meta_file.read_text())
        assert (meta["id"], meta["status"], meta["segments"], meta["summary"]) == (
            mid, "stopped", len(finals), stopped["summary"])
        lines = [json.loads(line) for line in transcript_file.read_text().splitlines()]
        assert [(r["segment"], r["text"], r["speaker"]) for r in lines] == [
            (e["segment"], e["text"], "alice") for e in finals]

        found = await client.result("memory.query", {"query": stopped["text"], "k": 10})
        meeting_facts = [f for f in found if f["fact_id"].startswith(f"voice-{mid}-")]
        assert meeting_facts and all(f["subject"] == f"alice in meeting {mid}" for f in meeting_facts)
        assert all({"voice", "meeting"} <= set(f["tags"]) for f in meeting_facts)
    finally:
        await server.stop()

    # A fresh daemon on the same CAR_HOME reads the meeting back.
    again = await start_server(reactor, tmp_path)
    try:
        client = await connect(again)
        got = await client.result("meeting.get", {"meeting_id": mid})
        assert (got["id"], got["status"], got["title"], got["summary"]) == (mid, "stopped", "Counting", stopped["summary"])
        assert [(r["text"], r["start"], r["end"]) for r in got["transcript"]] == [
            (t["text"], t["start"], t["end"]) for t in stopped["transcript"]]
        assert got["text"] == stopped["text"]
        listed = await client.result("meeting.list")
        assert [m["id"] for m in listed["meetings"]] == [mid]
        assert listed["meetings"][0]["status"] == "stopped" and "transcript" not in listed["meetings"][0]
    finally:
        await again.stop()


# -- speech out -------------------------------------------------------------------------------


def wav_seconds(data):
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getsampwidth()) == (1, 2)
        audio = w.readframes(w.getnframes())
        return len(audio) / (w.getsampwidth() * w.getframerate())


@pytest.fixture(scope="module")
def spoken_seconds(espeak, tmp_path_factory):
    """How long espeak-ng's own file of SPOKEN is (the daemon runs it with the default voice too)."""
    samples, rate = espeak_wav(espeak, tmp_path_factory.mktemp("tts") / "spoken.wav", SPOKEN)
    return len(samples) / rate


@pytest_twisted.ensureDeferred
async def test_speech_as_binary_frames(reactor, tmp_path, spoken_seconds):
    server = await start_server(reactor, tmp_path)
    try:
        client = await connect(server)
        sid = uuid.uuid4().hex
        started = await client.result("voice.tts_stream.start",
                                      {"stream_id": sid, "text": SPOKEN, "options": {"binary_frames": True}})
        assert started == {"stream_id": sid, "binary_frames": True, "provider": "espeak-ng", "format": "wav"}
        await client.when(lambda: any(f.type != frames.FRAME_TTS_CHUNK for f in frames_of(client, sid)),
                          "the end of the speech")
        # A round trip: anything the daemon sent before its reply has arrived.
        assert await client.result("voice.tts_stream.list") == {"streams": []}
        got = frames_of(client, sid)
        assert [f.type for f in got] == [frames.FRAME_TTS_CHUNK] * (len(got) - 1) + [frames.FRAME_TTS_FINAL], got
        assert len(got) >= 2
        assert [f.seq for f in got] == list(range(len(got)))
        assert all(f.format_name == "wav" for f in got[:-1]) and got[-1].payload == b""
        seconds = wav_seconds(b"".join(f.payload for f in got[:-1]))
        assert spoken_seconds * 0.6 <= seconds <= spoken_seconds * 1.4, (seconds, spoken_seconds)
        # Binary frames in place of JSON events, not beside them.
        assert voice_events(client, sid) == []
        assert not espeak_children()
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_speech_as_json_events(reactor, tmp_path, spoken_seconds):
    server = await start_server(reactor, tmp_path)
    try:
        client = await connect(server)
        sid = "tts-json-1"
        started = await client.result("voice.tts_stream.start", {"stream_id": sid, "text": SPOKEN})
        assert started["binary_frames"] is False and started["format"] == "wav"
        await client.when(lambda: any(e.get("is_final") for e in voice_events(client, sid)), "the final tts_chunk")
        assert await client.result("voice.tts_stream.list") == {"streams": []}
        events = voice_events(client, sid)
        assert all(e["type"] == "tts_chunk" and e["stream_id"] == sid and e["format"] == "wav" for e in events), events
        assert [e["seq"] for e in events] == list(range(len(events)))
        assert [e["is_final"] for e in events] == [False] * (len(events) - 1) + [True]
        assert len(events) >= 2
        assert not base64.b64decode(events[-1].get("audio_b64", ""))
        audio = b"".join(base64.b64decode(e["audio_b64"], validate=True) for e in events[:-1])
        seconds = wav_seconds(audio)
        assert spoken_seconds * 0.6 <= seconds <= spoken_seconds * 1.4, (seconds, spoken_seconds)
        assert client.binary == []
        assert not espeak_children()
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_cancel_mid_speech(reactor, tmp_path):
    """
    Cancel after the first frame of minutes of speech.  The daemon writes
    frames and replies on one ordered connection, so every frame it sent
    before it handled the cancel (those in flight) arrives before the
    cancel's reply: after that reply, no frame of the stream arrives at
    all, and no 0x03 / 0x04 ever does.  espeak-ng is gone.
    """
    server = await start_server(reactor, tmp_path)
    try:
        client = await connect(server)
        sid = uuid.uuid4().hex
        await client.result("voice.tts_stream.start",
                            {"stream_id": sid, "text": QUICK_FOX * 200, "options": {"binary_frames": True}})
        await client.when(lambda: frames_of(client, sid), "the first frame")
        [pid] = espeak_children()
        at_reply = []
        cancel = client.send("voice.tts_stream.cancel", {"stream_id": sid})
        cancel.addCallback(lambda msg: at_reply.append(len(frames_of(client, sid))) or msg)
        reply = await cancel
        assert reply["result"] == {"stream_id": sid, "cancelled": True}, reply
        await until(reactor, lambda: not alive(pid), "espeak-ng to be gone", timeout=10)
        assert not espeak_children()
        # Cancelling again, once it has ended: idempotent.
        assert await client.result("voice.tts_stream.cancel", {"stream_id": sid}) == {"stream_id": sid, "cancelled": False}
        assert await client.result("voice.tts_stream.list") == {"streams": []}
        got = frames_of(client, sid)
        assert len(got) == at_reply[0] >= 1
        assert all(f.type == frames.FRAME_TTS_CHUNK for f in got)
        assert [f.seq for f in got] == list(range(len(got)))
        assert voice_events(client, sid) == []
    finally:
        await server.stop()


# -- ownership ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_frame_for_another_connections_stream_is_refused(reactor, tmp_path, speech):
    server = await start_server(reactor, tmp_path)
    try:
        owner, other = await connect(server), await connect(server)
        sid = uuid.uuid4().hex
        await owner.result("voice.transcribe_stream.start", {"session_id": sid, "audio_source": {"kind": "pcm_push"}})

        other.send_raw(frames.build_frame(frames.FRAME_PCM, sid, 1, 0, speech[:FRAME_BYTES]), binary=True)
        refusal = await other.when(lambda: [m for m in other.received if "error" in m and m.get("id") is None],
                                   "the refusal")
        [error] = refusal
        assert error["error"]["code"] == -32602
        assert f"no voice stream {sid} on this connection" in error["error"]["message"]
        # Nor by push or stop, by id.
        push = await error_of(other, "voice.transcribe_stream.push",
                              {"session_id": sid, "pcm_b64": base64.b64encode(speech[:FRAME_BYTES]).decode()})
        assert push["code"] == -32602 and push["data"]["field"] == "session_id"
        assert (await error_of(other, "voice.transcribe_stream.stop", {"session_id": sid}))["code"] == -32602
        # The connection stays, and the owner's stream got nothing.
        assert await other.result("voice.sessions.list") == []
        [described] = await owner.result("voice.sessions.list")
        assert (described["session_id"], described["audio_secs"], described["queued_bytes"]) == (sid, 0.0, 0)
        stopped = await owner.result("voice.transcribe_stream.stop", {"session_id": sid})
        assert (stopped["audio_secs"], stopped["text"], stopped["transcript"]) == (0.0, "", [])
        assert [m for m in owner.received if "error" in m] == []
        assert voice_events(owner, sid) == [] and voice_events(other, sid) == []
    finally:
        await server.stop()
