"""
The offline voice backends on real audio: PocketSphinx recognising speech
that espeak-ng says (at 16 kHz, 22.05 kHz, 44.1 kHz stereo; in 20 ms and
odd-sized chunks), and EspeakSpeaker streaming WAV through a real reactor
(chunks before the end, a header ``wave`` reads to the right length,
cancel killing the process, the bounds, a missing program).

Nothing here is skipped: without pocketsphinx (``pip install
'car-twisted[voice]'``) or espeak-ng (``apt-get install espeak-ng``) these
tests fail saying what to install.  CI installs both.
"""

import io
import os
import shutil
import struct
import subprocess
import sys
import time
import wave
from collections import Counter

import numpy as np
import pytest
import pytest_twisted
from scipy.signal import resample_poly
from twisted.internet import defer, task
from zope.interface.verify import verifyObject

from car_twisted.interfaces import IRecognition, ISpeaker, ITranscriber
from car_twisted.voice import espeak_tts, pocketsphinx_stt
from car_twisted.voice.espeak_tts import CHUNK_BYTES, EspeakSpeaker, SpeechFailed
from car_twisted.voice.model import TranscriptUpdate, VoiceUnavailable
from car_twisted.voice.pocketsphinx_stt import MODEL_SAMPLE_RATE, PocketSphinxTranscriber, StreamResampler
from support import alive, espeak_children, until

PHRASES = ("one two three four five", "hello world")
WORDS = " ".join(PHRASES).split()
ODD_CHUNKS = (331, 1001, 77, 4099, 2047)
QUICK_FOX = "The quick brown fox jumps over the lazy dog. "


# -- what the tests need installed ----------------------------------------------------


def espeak_program():
    program = shutil.which("espeak-ng")
    if program is None:
        pytest.fail("espeak-ng is not installed: apt-get install espeak-ng (CI installs it)")
    return program


@pytest.fixture(scope="module")
def espeak():
    return espeak_program()


@pytest.fixture(scope="module")
def transcriber():
    try:
        import pocketsphinx  # noqa: F401
    except ImportError:
        pytest.fail("pocketsphinx is not installed: pip install 'car-twisted[voice]' (CI installs it)")
    t = PocketSphinxTranscriber()
    assert t.unavailable() is None
    return t


def espeak_file(espeak, tmp_dir, text, *args):
    """What espeak-ng writes to a file (with true sizes): (int16 samples, rate)."""
    path = tmp_dir / f"said{len(os.listdir(tmp_dir))}.wav"
    subprocess.run([espeak, "-w", str(path), *args, "--stdin"], input=text.encode(), check=True, capture_output=True, timeout=60)
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth()) == (1, 2)
        return np.frombuffer(w.readframes(w.getnframes()), "<i2"), w.getframerate()


def file_seconds(espeak, tmp_dir, text, *args):
    samples, rate = espeak_file(espeak, tmp_dir, text, *args)
    return len(samples) / rate


# -- recognition ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def speech(espeak, tmp_path_factory):
    """
    The phrases at espeak-ng's 22050 Hz, 1 s of silence before, between and
    after, over a faint noise floor (a microphone never gives digital
    silence, and pocketsphinx's cepstral mean normalisation is thrown by
    it): float samples and the rate.
    """
    tmp_dir = tmp_path_factory.mktemp("speech")
    rate = None
    parts = []
    for text in PHRASES:
        samples, rate = espeak_file(espeak, tmp_dir, text, "-v", "en-us")
        parts += [np.zeros(rate), samples.astype(np.float64)]
    parts.append(np.zeros(rate))
    audio = np.concatenate(parts)
    audio += np.random.default_rng(7).normal(0.0, 50.0, len(audio))
    return audio, rate


def pcm(samples):
    return np.clip(np.rint(samples), -32768, 32767).astype("<i2").tobytes()


def at_rate(speech, rate):
    audio, source = speech
    g = np.gcd(rate, source)
    return resample_poly(audio, rate // g, source // g) if rate != source else audio


def chunks(data, sizes):
    i = n = 0
    while i < len(data):
        size = sizes[n % len(sizes)]
        yield data[i : i + size]
        i += size
        n += 1


def recognise(transcriber, data, rate, channels, sizes):
    """Feed C{data} in chunks of C{sizes} (cycled): (finals, partials, CPU seconds)."""
    rec = transcriber.open(rate, channels)
    verifyObject(IRecognition, rec)
    finals, partials = [], []
    start = time.process_time()
    try:
        for piece in chunks(data, sizes):
            update = rec.accept(piece)
            assert isinstance(update, TranscriptUpdate)
            finals += update.finals
            if update.partial is not None:
                partials.append(update.partial)
        finals += rec.finish()
    finally:
        rec.close()
    return finals, partials, time.process_time() - start


def check_recognised(finals, partials, seconds):
    heard = Counter(" ".join(f.text for f in finals).split())
    hits = sum((heard & Counter(WORDS)).values())
    assert hits > len(WORDS) // 2, f"heard {[f.text for f in finals]} for {PHRASES}"
    assert partials, "no partial hypothesis before the finals"
    assert finals
    previous_end = 0.0
    for seg in finals:
        assert seg.text.strip()
        assert previous_end <= seg.start < seg.end <= seconds + 0.05, (seg, seconds)
        assert seg.confidence is None or 0.0 <= seg.confidence <= 1.0
        previous_end = seg.end
    # The first phrase starts after the first second of silence.
    assert 0.6 <= finals[0].start <= 1.4, finals[0]


def test_recognises_16khz_in_20ms_chunks(transcriber, speech):
    audio = at_rate(speech, MODEL_SAMPLE_RATE)
    finals, partials, _ = recognise(transcriber, pcm(audio), MODEL_SAMPLE_RATE, 1, (int(MODEL_SAMPLE_RATE * 0.02) * 2,))
    check_recognised(finals, partials, len(audio) / MODEL_SAMPLE_RATE)


def test_recognises_22050hz_in_odd_chunks(transcriber, speech):
    audio, rate = speech
    assert rate == 22050
    finals, partials, _ = recognise(transcriber, pcm(audio), rate, 1, ODD_CHUNKS)
    check_recognised(finals, partials, len(audio) / rate)


def test_recognises_stereo_at_44100hz(transcriber, speech):
    audio = at_rate(speech, 44100)
    # Two different channels: the right one quieter, with noise of its own.
    right = 0.7 * audio + np.random.default_rng(8).normal(0.0, 40.0, len(audio))
    stereo = np.stack([audio, right], axis=1).reshape(-1)
    finals, partials, _ = recognise(transcriber, pcm(stereo), 44100, 2, ODD_CHUNKS + (int(44100 * 0.02) * 4,))
    check_recognised(finals, partials, len(audio) / 44100)


def test_chunking_does_not_change_what_is_recognised(transcriber, speech):
    """The same audio whole, in 20 ms chunks and in odd ones (a byte split off a sample): the same segments."""
    data = pcm(at_rate(speech, 44100))
    results = [recognise(transcriber, data, 44100, 1, sizes)[0] for sizes in ((len(data),), (882 * 2,), (1, 3) + ODD_CHUNKS)]
    assert results[0] and results[0] == results[1] == results[2]


def test_finish_in_the_middle_of_an_utterance(transcriber, speech):
    """Audio that stops mid-phrase: finish ends the utterance at the end of the audio."""
    audio, rate = speech
    data = pcm(audio[: int(rate * 1.8)])
    finals, partials, _ = recognise(transcriber, data, rate, 1, (4410,))
    assert partials and len(finals) == 1
    assert 0.6 <= finals[0].start < finals[0].end <= 1.8 + 0.01
    assert finals[0].text


def test_a_long_utterance_is_cut_at_the_bound(transcriber, speech, monkeypatch):
    """Past MAX_UTTERANCE_SECONDS an utterance ends where it stands and the next starts there."""
    monkeypatch.setattr(pocketsphinx_stt, "MAX_UTTERANCE_SECONDS", 0.5)
    audio, rate = speech
    finals, _, _ = recognise(transcriber, pcm(audio), rate, 1, (4410,))
    assert len(finals) >= 4
    assert all(seg.end - seg.start <= 0.5 + 1e-6 for seg in finals)
    assert any(a.end == b.start for a, b in zip(finals, finals[1:]))


def test_close_in_the_middle_of_an_utterance(transcriber, speech):
    audio, rate = speech
    rec = transcriber.open(rate, 1)
    data = pcm(audio[: int(rate * 1.8)])  # into the first phrase
    partials = [u.partial for u in map(rec.accept, chunks(data, (4410,))) if u.partial]
    assert partials
    rec.close()
    with pytest.raises(RuntimeError):
        rec.accept(b"\x00\x00")


def test_recognition_after_finish_and_close(transcriber, speech):
    rec = transcriber.open(16000, 1)
    assert rec.accept(b"") == TranscriptUpdate()
    assert rec.accept(b"\x01") == TranscriptUpdate()  # half a sample waits
    assert rec.finish() == ()
    assert rec.finish() == ()
    with pytest.raises(RuntimeError):
        rec.accept(b"\x00\x00")
    rec.close()
    rec.close()


def test_open_refuses_rates_and_channels_it_cannot_take(transcriber):
    for rate, channels in ((7999, 1), (48001, 1), (0, 1), (16000, 0), (16000, 3), (16000.0, 1), (True, 1)):
        with pytest.raises(ValueError):
            transcriber.open(rate, channels)


def test_without_pocketsphinx_it_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pocketsphinx", None)  # import raises ImportError
    t = PocketSphinxTranscriber()
    why = t.unavailable()
    assert why is not None and "install car-twisted[voice] (pocketsphinx)" in why
    with pytest.raises(VoiceUnavailable, match=r"car-twisted\[voice\]"):
        t.open(16000, 1)


def test_transcriber_and_recognition_provide_their_interfaces(transcriber):
    assert verifyObject(ITranscriber, transcriber)
    rec = transcriber.open(22050, 2)
    try:
        assert verifyObject(IRecognition, rec)
    finally:
        rec.close()


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44100, 48000, 47999, 16000])
def test_resampler_is_seamless_across_chunks(rate):
    """Chunked output equals one-shot output exactly; the length is exact; a tone comes through clean."""
    tone = 10000.0 * np.sin(2 * np.pi * 440.0 * np.arange(rate) / rate)
    whole = StreamResampler(rate, MODEL_SAMPLE_RATE)
    one_shot = np.concatenate([whole.feed(tone), whole.flush()])
    piecewise = StreamResampler(rate, MODEL_SAMPLE_RATE)
    out = [piecewise.feed(piece) for piece in chunks(tone, (1, 7, 160, 333, 2))]
    out.append(piecewise.flush())
    streamed = np.concatenate(out)
    assert len(streamed) == MODEL_SAMPLE_RATE == piecewise.outputs
    assert np.array_equal(streamed, one_shot)
    ideal = 10000.0 * np.sin(2 * np.pi * 440.0 * np.arange(MODEL_SAMPLE_RATE) / MODEL_SAMPLE_RATE)
    middle = slice(200, -200)  # the ends meet the silence around the tone
    assert np.max(np.abs(streamed[middle] - ideal[middle])) < 10.0


# -- speech out -------------------------------------------------------------------------


def wav_seconds(data):
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 22050)
        frames = w.readframes(w.getnframes())
        return len(frames) / (w.getsampwidth() * w.getframerate())


async def failure_of(d):
    try:
        await d
    except BaseException as e:  # noqa: B036
        return e
    raise AssertionError("it succeeded")


def test_speaker_provides_its_interface(reactor, espeak):
    speaker = EspeakSpeaker(reactor)
    assert verifyObject(ISpeaker, speaker)
    assert (speaker.name, speaker.audio_format) == ("espeak-ng", "wav")
    assert speaker.unavailable() is None


@pytest_twisted.ensureDeferred
async def test_speech_streams_and_decodes_to_its_length(reactor, espeak, tmp_path):
    text = QUICK_FOX * 25
    got = []
    running_at_first = []

    def on_chunk(data):
        if not got:
            running_at_first.append(bool(espeak_children()))
        got.append((reactor.seconds(), data))

    await EspeakSpeaker(reactor).speak(text, None, on_chunk)
    ended = reactor.seconds()
    assert len(got) > 1
    # The first chunk came while espeak-ng was still at work (it cannot
    # finish minutes of audio into a pipe nobody has read yet).
    assert running_at_first == [True]
    assert got[0][0] <= ended
    assert all(len(data) >= CHUNK_BYTES for _, data in got[:-1])
    audio = b"".join(data for _, data in got)
    expected = file_seconds(espeak, tmp_path, text)
    assert expected * 0.7 <= wav_seconds(audio) <= expected * 1.3
    assert not espeak_children()


@pytest_twisted.ensureDeferred
async def test_short_speech_is_one_wav(reactor, espeak, tmp_path):
    got = []
    await EspeakSpeaker(reactor).speak("one two three four five", "en-us", got.append)
    expected = file_seconds(espeak, tmp_path, "one two three four five", "-v", "en-us")
    assert expected * 0.7 <= wav_seconds(b"".join(got)) <= expected * 1.3
    # The streamed header's sizes say "unknown length" (see espeak_tts).
    header = got[0][:44]
    assert struct.unpack_from("<I", header, 40)[0] == espeak_tts.UNKNOWN_DATA_SIZE


@pytest_twisted.ensureDeferred
async def test_text_starting_with_a_dash_is_spoken(reactor, espeak, tmp_path):
    text = "--help -v xx me please"
    got = []
    await EspeakSpeaker(reactor).speak(text, None, got.append)
    expected = file_seconds(espeak, tmp_path, text)
    assert expected > 1.0
    assert expected * 0.7 <= wav_seconds(b"".join(got)) <= expected * 1.3


@pytest_twisted.ensureDeferred
async def test_cancel_kills_the_process_and_no_chunk_follows(reactor, espeak):
    got = []
    pids = []
    d = EspeakSpeaker(reactor).speak(QUICK_FOX * 200, None, lambda data: (got.append(data), pids or pids.extend(espeak_children())))
    await until(reactor, lambda: got, "the first chunk")
    assert len(pids) == 1
    d.cancel()
    delivered = len(got)
    assert isinstance(await failure_of(d), defer.CancelledError)
    await until(reactor, lambda: not alive(pids[0]), "espeak-ng to be gone", timeout=10)
    await task.deferLater(reactor, 0.3, lambda: None)
    assert len(got) == delivered


@pytest_twisted.ensureDeferred
async def test_unknown_voice_fails_with_what_espeak_said(reactor, espeak):
    got = []
    e = await failure_of(EspeakSpeaker(reactor).speak("hello", "xx-no-such-voice", got.append))
    assert isinstance(e, SpeechFailed) and "exited with status 1" in str(e) and "voice" in str(e)
    assert got == []


@pytest_twisted.ensureDeferred
async def test_bad_voice_and_oversized_text_are_refused(reactor, espeak):
    speaker = EspeakSpeaker(reactor)
    for voice in ("-x", "en us", "../en", "a" * 65, ""):
        assert isinstance(await failure_of(speaker.speak("hello", voice, lambda _: None)), ValueError), voice
    too_long = "a" * (espeak_tts.MAX_TEXT_BYTES + 1)
    assert isinstance(await failure_of(speaker.speak(too_long, None, lambda _: None)), ValueError)
    assert not espeak_children()


@pytest_twisted.ensureDeferred
async def test_output_past_the_bound_is_stopped(reactor, espeak):
    got = []
    d = EspeakSpeaker(reactor, max_output_bytes=200_000).speak(QUICK_FOX * 100, None, got.append)
    e = await failure_of(d)
    assert isinstance(e, SpeechFailed) and "more than 200000 bytes" in str(e)
    assert sum(map(len, got)) <= 200_000
    await until(reactor, lambda: not espeak_children(), "espeak-ng to be gone", timeout=10)


@pytest_twisted.ensureDeferred
async def test_a_failing_on_chunk_stops_the_synthesis(reactor, espeak):
    def on_chunk(data):
        raise OSError("the client went away")

    e = await failure_of(EspeakSpeaker(reactor).speak(QUICK_FOX * 100, None, on_chunk))
    assert isinstance(e, OSError) and "went away" in str(e)
    await until(reactor, lambda: not espeak_children(), "espeak-ng to be gone", timeout=10)


@pytest_twisted.ensureDeferred
async def test_a_missing_program_is_unavailable(reactor, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    speaker = EspeakSpeaker(reactor)
    assert speaker.unavailable() == "espeak-ng not found on PATH (apt-get install espeak-ng)"
    e = await failure_of(speaker.speak("hello", None, lambda _: None))
    assert isinstance(e, VoiceUnavailable) and "apt-get install espeak-ng" in str(e)
    named = EspeakSpeaker(reactor, executable=str(tmp_path / "espeak-ng"))
    assert "apt-get install espeak-ng" in named.unavailable()
    assert isinstance(await failure_of(named.speak("hello", None, lambda _: None)), VoiceUnavailable)


def fake_program(tmp_path, body):
    """An executable standing in for espeak-ng: a Python script."""
    path = tmp_path / "fake-espeak"
    path.write_text(f"#!{sys.executable}\nimport os, signal, sys, time\n{body}\n")
    path.chmod(0o755)
    return str(path)


def riff(data_size, audio):
    fmt = struct.pack("<HHIIHH", 1, 1, 22050, 44100, 2, 16)
    return b"RIFF" + struct.pack("<I", 36 + data_size) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", data_size) + audio


@pytest_twisted.ensureDeferred
async def test_a_zero_size_header_is_made_readable(reactor, tmp_path):
    """A header whose sizes say 0 (which ``wave`` would read as no audio) is set to the unknown-length sizes."""
    audio = bytes(range(256)) * 100
    source = tmp_path / "out.bin"
    source.write_bytes(riff(0, audio))
    program = fake_program(tmp_path, f"sys.stdout.buffer.write(open({str(source)!r}, 'rb').read())")
    got = []
    await EspeakSpeaker(reactor, executable=program).speak("hi", None, got.append)
    with wave.open(io.BytesIO(b"".join(got))) as w:
        assert w.readframes(w.getnframes()) == audio
    assert all(len(c) >= CHUNK_BYTES for c in got[:-1])


@pytest_twisted.ensureDeferred
async def test_output_that_is_not_wav_fails(reactor, tmp_path):
    program = fake_program(tmp_path, "sys.stdout.write('Usage: espeak-ng [options]\\n' * 100)")
    got = []
    e = await failure_of(EspeakSpeaker(reactor, executable=program).speak("hi", None, got.append))
    assert isinstance(e, SpeechFailed) and "not a WAV stream" in str(e)
    assert got == []


@pytest_twisted.ensureDeferred
async def test_cancel_escalates_to_sigkill(reactor, tmp_path):
    """A process that ignores SIGTERM is killed after the grace period."""
    program = fake_program(
        tmp_path,
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"sys.stdout.buffer.write({riff(0x7FFFF000, bytes(20000))!r}); sys.stdout.flush()\n"
        "open(sys.argv[0] + '.pid', 'w').write(str(os.getpid()))\n"
        "time.sleep(60)",
    )
    got = []
    d = EspeakSpeaker(reactor, executable=program, kill_grace=0.3).speak("hi", None, got.append)
    await until(reactor, lambda: got and os.path.exists(program + ".pid"), "the first chunk")
    pid = int(open(program + ".pid").read())
    d.cancel()
    assert isinstance(await failure_of(d), defer.CancelledError)
    await task.deferLater(reactor, 0.1, lambda: None)
    assert alive(pid), "SIGTERM is ignored: it should still be running within the grace"
    await until(reactor, lambda: not alive(pid), "SIGKILL after the grace", timeout=10)
