"""
Interop: voice transcription with the real ``car-runtime`` 0.58.0 client
against a live ``twist car`` daemon.

The client has no typed binding for a daemon-side stream: it is reached
with the generic wrappers ``voice_transcribe_stream_start`` / ``_push`` /
``_stop`` (params sent verbatim as a JSON string), and the client never
sends binary frames, so audio goes as base64 ``pcm_b64``.  The daemon's
``voice.event`` notifications reach ``register_voice_event_handler``'s
callable (process-wide) as ``fn(session_id, event_json)``, on a thread of
the client's own.

The speech is espeak-ng's, made before the test (see
``tests/integration/test_voice_e2e.py``); the daemon recognises it with
pocketsphinx (the ``voice`` extra, which ``tox -e interop`` installs).
The daemon fixtures come from ``test_car_runtime``.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import threading
import time
import wave
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

car_runtime = pytest.importorskip("car_runtime")

from test_car_runtime import (  # noqa: E402,F401  (fixtures are used by name)
    Daemon,
    client_env,
    daemon,
    start_daemon,
)

PHRASES = ("one two three four five", "hello world")
WORDS = " ".join(PHRASES).split()
RATE = 16000
PUSH_BYTES = RATE  # half a second of 16-bit mono per push
EVENT_TIMEOUT = 30.0


def speech_pcm(tmp_path: Path) -> bytes:
    """
    The phrases as 16 kHz mono s16le: espeak-ng's 22050 Hz resampled, 1 s
    of silence around each, over a faint noise floor (pocketsphinx is
    thrown by espeak-ng's exact-zero pauses).
    """
    from scipy.signal import resample_poly

    program = shutil.which("espeak-ng")
    if program is None:
        pytest.fail("espeak-ng is not installed: apt-get install espeak-ng (CI installs it)")
    parts = []
    for n, text in enumerate(PHRASES):
        path = tmp_path / f"phrase{n}.wav"
        subprocess.run([program, "-w", str(path), "-v", "en-us", "--stdin"], input=text.encode(), check=True,
                       capture_output=True, timeout=60)
        with wave.open(str(path)) as w:
            rate = w.getframerate()
            samples = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64)
        g = np.gcd(RATE, rate)
        parts += [np.zeros(RATE), resample_poly(samples, RATE // g, rate // g)]
    parts.append(np.zeros(RATE))
    audio = np.concatenate(parts)
    audio += np.random.default_rng(7).normal(0.0, 50.0, len(audio))
    return np.clip(np.rint(audio), -32768, 32767).astype("<i2").tobytes()


class VoiceEvents:
    """What the process-wide voice handler was called with, from the client's thread."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self._cond = threading.Condition()

    def __call__(self, session_id: str, event_json: str) -> None:
        with self._cond:
            self.calls.append((session_id, event_json))
            self._cond.notify_all()

    def of(self, session_id: str) -> list[Any]:
        with self._cond:
            return [json.loads(e) for s, e in self.calls if s == session_id]

    def wait(self, what: str, predicate: Any, timeout: float = EVENT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                assert left > 0, f"{what} not within {timeout:g}s; got {self.calls}"
                self._cond.wait(left)


@pytest.fixture
def voice_events():
    events = VoiceEvents()
    car_runtime.register_voice_event_handler(events)
    yield events
    # The slot is process-wide: leave a handler that holds nothing.
    car_runtime.register_voice_event_handler(lambda session_id, event_json: None)


@pytest.mark.interop
def test_transcript_events_reach_the_voice_handler(daemon: Daemon, client_env, voice_events, tmp_path: Path):
    client_env(daemon)
    pcm = speech_pcm(tmp_path)
    sid = "interop-voice-1"
    rt = car_runtime.CarRuntime()
    started = json.loads(rt.voice_transcribe_stream_start(json.dumps(
        {"session_id": sid, "audio_source": {"kind": "pcm_push", "sample_rate": RATE, "channels": 1}})))
    assert (started["session_id"], started["provider"], started["binary_frames"]) == (sid, "pocketsphinx", False)

    for offset in range(0, len(pcm), PUSH_BYTES):
        piece = pcm[offset : offset + PUSH_BYTES]
        pushed = json.loads(rt.voice_transcribe_stream_push(json.dumps(
            {"session_id": sid, "pcm_b64": base64.b64encode(piece).decode("ascii")})))
        assert pushed["accepted_bytes"] == len(piece), pushed

    result = json.loads(rt.voice_transcribe_stream_stop(json.dumps({"session_id": sid})))
    assert result["status"] == "stopped", result
    assert result["audio_secs"] == round(len(pcm) / (2 * RATE), 3)
    heard = Counter(result["text"].split())
    assert sum((heard & Counter(WORDS)).values()) > len(WORDS) // 2, f"heard {result['text']!r} for {PHRASES}"

    # Every final the stop result holds reached the handler, as an object.
    voice_events.wait("the final events",
                      lambda: len([e for e in voice_events.of(sid) if e.get("type") == "final"]) >= result["segments"])
    events = voice_events.of(sid)
    assert all(isinstance(e, dict) and e["type"] in ("partial", "final") for e in events), events
    partials = [e for e in events if e["type"] == "partial"]
    finals = [e for e in events if e["type"] == "final"]
    assert partials and all(isinstance(e["text"], str) and e["text"] for e in partials), events
    assert [e["text"] for e in finals] == [t["text"] for t in result["transcript"]]
    assert [e["segment"] for e in finals] == list(range(len(finals)))
    assert all(0.0 <= e["start"] < e["end"] for e in finals)
    assert " ".join(e["text"] for e in finals) == result["text"]
    # The first partial came before the first final.
    kinds = [e["type"] for e in events]
    assert kinds.index("partial") < kinds.index("final")
    # No event for any other session.
    assert {s for s, _ in voice_events.calls} == {sid}
    assert json.loads(rt.voice_sessions_list("{}")) == []
    rt.close()
