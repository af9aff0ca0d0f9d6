"""
Offline speech recognition with PocketSphinx (the ``voice`` extra).

The PyPI package ``pocketsphinx`` (5.x) ships a US English acoustic model,
a trigram language model and the CMU dictionary, all at 16 kHz.  It is
imported only inside methods, so this module imports (and
``unavailable()`` answers honestly) where the extra is not installed.

One stream's audio goes through four stages, all in the calling (worker)
thread:

1. 16-bit little-endian PCM at the declared rate and channel count is
   split into whole frames (a trailing odd byte or partial frame waits for
   the next call) and downmixed to mono;
2. a streaming windowed-sinc resampler (numpy) converts it to
   ``MODEL_SAMPLE_RATE``; it keeps the input it still needs between calls,
   so chunk boundaries are seamless and the output's length tracks the
   input's exactly (sample ``n`` of the output is input time
   ``n / MODEL_SAMPLE_RATE``);
3. pocketsphinx's ``Endpointer`` (WebRTC-style voice activity detection
   over a 0.3 s window) splits the audio into utterances on silence.  The
   decoder itself has no voice activity detection in 5.x.  Utterance
   start and end times are the endpointer's, counted in samples of the
   stream's audio (never the wall clock);
4. each utterance is decoded live as its frames arrive, which gives the
   partial hypotheses; when it ends, its audio (kept, at most
   ``MAX_UTTERANCE_SECONDS``) is decoded once more as a whole utterance,
   so cepstral mean normalisation sees the whole utterance rather than a
   running estimate, and the final segment is that second pass's result.
   It roughly doubles the CPU time and, on synthetic test speech, raised
   word accuracy by some 8 points; ``PocketSphinxTranscriber(rescore=False)``
   keeps the live pass's result instead.
"""

from __future__ import annotations

import importlib
import math
import os
from typing import Any

import numpy as np
import numpy.typing as npt
from zope.interface import implementer

from car_twisted.interfaces import IRecognition, ITranscriber
from car_twisted.voice.model import Segment, TranscriptUpdate, VoiceUnavailable

__all__ = [
    "MAX_SAMPLE_RATE",
    "MAX_UTTERANCE_SECONDS",
    "MIN_SAMPLE_RATE",
    "MODEL_SAMPLE_RATE",
    "PocketSphinxRecognition",
    "PocketSphinxTranscriber",
    "StreamResampler",
]

#: The sample rate of pocketsphinx's bundled English model.
MODEL_SAMPLE_RATE = 16000
#: The input rates a stream may declare.
MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 48000
#: An utterance longer than this is ended where it stands and a new one
#: begins (bounds the audio kept for the second pass and the decoder's
#: per-utterance memory).
MAX_UTTERANCE_SECONDS = 30.0

_INSTALL_HINT = "install car-twisted[voice] (pocketsphinx)"
# Words of the decoder's segmentation that are not speech.
_NON_WORDS = frozenset({"<s>", "</s>", "<sil>"})


def _pocketsphinx() -> Any:
    """The pocketsphinx module (untyped, hence Any), imported on first use."""
    return importlib.import_module("pocketsphinx")


class StreamResampler:
    """
    Converts a stream of mono samples from one rate to another, a chunk at
    a time, as one continuous signal.

    A Kaiser-windowed sinc interpolator: output sample ``n`` is input time
    ``n * in_rate / out_rate`` exactly (integer arithmetic, so nothing
    drifts over a long stream).  When downsampling, the kernel's cutoff
    follows the output's Nyquist frequency so nothing aliases.  An output
    sample needs ``half`` input samples past its position, so ``feed``
    holds back that much until more input (or ``flush``) arrives;
    ``flush`` pads the end with silence and completes the output to
    ``ceil(inputs * out_rate / in_rate)`` samples.
    """

    #: Zero crossings of the sinc kept on each side of the centre.
    ZERO_CROSSINGS = 16
    #: Cutoff as a fraction of the lower Nyquist frequency (the rest is the
    #: transition band).
    ROLLOFF = 0.94
    KAISER_BETA = 8.6
    # Phase tables up to this many coefficients are computed once; beyond
    # it (rates whose ratio to the output has a large denominator) each
    # block's coefficients are computed as needed.
    _TABLE_LIMIT = 1 << 20
    _BLOCK = 4096

    def __init__(self, in_rate: int, out_rate: int) -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError("sample rates must be positive")
        g = math.gcd(in_rate, out_rate)
        self.in_rate, self.out_rate = in_rate, out_rate
        # Output n sits at input position n * down / up.
        self._up, self._down = out_rate // g, in_rate // g
        self._identity = self._up == self._down
        # Cutoff in cycles per input sample.
        self._cutoff = 0.5 * min(1.0, out_rate / in_rate) * self.ROLLOFF
        self._half = self.ZERO_CROSSINGS / (2.0 * self._cutoff)
        self._taps_half = math.ceil(self._half)
        self._taps = 2 * self._taps_half
        self._table: npt.NDArray[np.float64] | None = None
        if not self._identity and self._up * self._taps <= self._TABLE_LIMIT:
            self._table = self._coefficients(np.arange(self._up, dtype=np.int64))
        # Input history: _buf[0] is input sample number _buf_start; samples
        # before the stream began are silence.
        self._buf = np.zeros(self._taps_half, dtype=np.float64)
        self._buf_start = -self._taps_half
        self._inputs = 0
        self._outputs = 0

    @property
    def inputs(self) -> int:
        """Input samples fed so far."""
        return self._inputs

    @property
    def outputs(self) -> int:
        """Output samples produced so far."""
        return self._outputs

    def _coefficients(self, phases: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        """Normalised kernel rows for output phases ``phases`` (in ``0 .. up-1``)."""
        frac = phases.astype(np.float64) / self._up
        # Distance from the output position to each tap, tap j being input
        # sample floor(position) - taps_half + 1 + j.
        x = frac[:, None] + (self._taps_half - 1) - np.arange(self._taps, dtype=np.float64)[None, :]
        inside = np.abs(x) < self._half
        ratio = np.clip(x / self._half, -1.0, 1.0)
        window = np.i0(self.KAISER_BETA * np.sqrt(1.0 - ratio * ratio)) / np.i0(self.KAISER_BETA)
        kernel = np.where(inside, 2.0 * self._cutoff * np.sinc(2.0 * self._cutoff * x) * window, 0.0)
        # Unit gain at DC for every phase (no ripple from truncation).
        result: npt.NDArray[np.float64] = kernel / kernel.sum(axis=1, keepdims=True)
        return result

    def feed(self, samples: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Resample the next input samples; returns every output now computable."""
        if self._identity:
            self._inputs += len(samples)
            self._outputs += len(samples)
            return np.asarray(samples, dtype=np.float64)
        if len(samples):
            self._buf = np.concatenate((self._buf, np.asarray(samples, dtype=np.float64)))
            self._inputs += len(samples)
        # Output n is computable once input floor(n*down/up) + taps_half exists.
        limit = self._inputs - self._taps_half
        ready = 0 if limit <= 0 else -(-limit * self._up // self._down)
        return self._produce(ready)

    def flush(self) -> npt.NDArray[np.float64]:
        """The end of the input: every remaining output, the tail padded with silence."""
        if self._identity:
            return np.zeros(0, dtype=np.float64)
        self._buf = np.concatenate((self._buf, np.zeros(self._taps_half, dtype=np.float64)))
        total = -(-self._inputs * self._up // self._down)
        return self._produce(total)

    def _produce(self, end: int) -> npt.NDArray[np.float64]:
        pieces: list[npt.NDArray[np.float64]] = []
        offsets = np.arange(self._taps, dtype=np.int64)[None, :]
        while self._outputs < end:
            n = np.arange(self._outputs, min(end, self._outputs + self._BLOCK), dtype=np.int64)
            scaled = n * self._down
            base = scaled // self._up
            phase = scaled % self._up
            coeffs = self._table[phase] if self._table is not None else self._coefficients(phase)
            index = (base - self._taps_half + 1 - self._buf_start)[:, None] + offsets
            pieces.append(np.einsum("ij,ij->i", self._buf[index], coeffs))
            self._outputs = int(n[-1]) + 1
        # Drop history no later output needs.
        keep_from = (self._outputs * self._down) // self._up - self._taps_half + 1
        drop = keep_from - self._buf_start
        if drop > 0:
            self._buf = self._buf[drop:]
            self._buf_start = keep_from
        if not pieces:
            return np.zeros(0, dtype=np.float64)
        return np.concatenate(pieces)


def _to_pcm16(samples: npt.NDArray[np.float64]) -> bytes:
    return np.clip(np.rint(samples), -32768, 32767).astype("<i2").tobytes()


@implementer(IRecognition)
class PocketSphinxRecognition:
    """
    One stream's recognizer (see the module docstring for the stages).

    Not thread-safe: one call at a time, from any one thread at a time.
    """

    def __init__(self, sample_rate: int, channels: int, decoder: Any, endpointer: Any, rescore: bool = True) -> None:
        self.sample_rate = sample_rate
        self.rescore = rescore
        self.worker_options = {"rescore": rescore}
        self.channels = channels
        self._frame_bytes = 2 * channels
        self._pending = b""  # an incomplete input frame (odd byte, half a stereo frame)
        self._resampler = StreamResampler(sample_rate, MODEL_SAMPLE_RATE)
        self._decoder: Any = decoder
        self._endpointer: Any = endpointer
        self._ep_frame = int(endpointer.frame_bytes)
        self._ep_pending = bytearray()  # 16 kHz PCM short of one endpointer frame
        self._max_utterance_bytes = int(MAX_UTTERANCE_SECONDS * MODEL_SAMPLE_RATE) * 2
        # The utterance in progress: its start (seconds) and audio so far.
        self._utt_start: float | None = None
        self._utt_audio = bytearray()
        self._last_end = 0.0  # where the last utterance ended
        self._last_partial = ""
        self._finished = False

    # -- IRecognition -------------------------------------------------------------

    def accept(self, pcm: bytes) -> TranscriptUpdate:
        self._check_open()
        data = self._pending + bytes(pcm)
        whole = len(data) - len(data) % self._frame_bytes
        self._pending = data[whole:]
        finals: list[Segment] = []
        if whole:
            mono = np.frombuffer(data, dtype="<i2", count=whole // 2).astype(np.float64)
            if self.channels > 1:
                mono = mono.reshape(-1, self.channels).mean(axis=1)
            self._endpoint(_to_pcm16(self._resampler.feed(mono)), finals)
        partial: str | None = None
        if self._utt_start is not None:
            text = self._hypothesis()
            if text and text != self._last_partial:
                partial = self._last_partial = text
        return TranscriptUpdate(partial=partial, finals=tuple(finals))

    def finish(self) -> tuple[Segment, ...]:
        if self._finished:
            return ()
        self._check_open()
        finals: list[Segment] = []
        # A trailing odd byte or half frame is not a sample: dropped.
        self._pending = b""
        self._endpoint(_to_pcm16(self._resampler.flush()), finals)
        ep = self._endpointer
        tail = bytes(self._ep_pending)
        self._ep_pending.clear()
        if ep.in_speech:
            # end_stream refuses an empty buffer: one sample of silence
            # stands in (the segment's end is clamped to the audio's).
            speech = ep.end_stream(tail or b"\0\0")
            if speech is not None:
                self._speech(bytes(speech), ep.speech_start, finals)
        if self._utt_start is not None:
            self._end_utterance(finals)
        self._finished = True
        return tuple(finals)

    def close(self) -> None:
        # Dropping the last references frees the decoder (an utterance in
        # progress is abandoned, not decoded).
        self._decoder = None
        self._endpointer = None
        self._utt_audio = bytearray()
        self._ep_pending = bytearray()
        self._utt_start = None
        self._finished = True

    # -- the stages ----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._decoder is None:
            raise RuntimeError("this recognition is closed")
        if self._finished:
            raise RuntimeError("this recognition has finished")

    def _endpoint(self, pcm16k: bytes, finals: list[Segment]) -> None:
        """Feed 16 kHz mono PCM to the endpointer, frame by frame."""
        self._ep_pending += pcm16k
        ep, size = self._endpointer, self._ep_frame
        usable = len(self._ep_pending) - len(self._ep_pending) % size
        view = memoryview(self._ep_pending)
        try:
            for offset in range(0, usable, size):
                was_in_speech = ep.in_speech
                speech = ep.process(bytes(view[offset : offset + size]))
                if speech is None:
                    continue
                self._speech(bytes(speech), ep.speech_start if not was_in_speech else None, finals)
                if not ep.in_speech:
                    self._end_utterance(finals)
        finally:
            view.release()
        del self._ep_pending[:usable]

    def _speech(self, speech: bytes, region_start: float | None, finals: list[Segment]) -> None:
        """Speech audio from the endpointer: into the utterance in progress."""
        if self._utt_start is None:
            # A region that is already under way continues an utterance
            # that was cut at the length bound: it starts where that ended.
            self._start_utterance(region_start if region_start is not None else self._last_end)
        elif len(self._utt_audio) + len(speech) > self._max_utterance_bytes:
            end = self._utt_end_time()
            self._end_utterance(finals)
            self._start_utterance(end)
        self._utt_audio += speech
        self._decoder.process_raw(speech, False, False)

    def _start_utterance(self, start: float) -> None:
        self._decoder.start_utt()
        self._utt_start = max(0.0, float(start))
        self._utt_audio = bytearray()
        self._last_partial = ""

    def _utt_end_time(self) -> float:
        start = self._utt_start if self._utt_start is not None else self._last_end
        end = start + len(self._utt_audio) / (2.0 * MODEL_SAMPLE_RATE)
        return min(end, self._resampler.outputs / MODEL_SAMPLE_RATE)

    def _end_utterance(self, finals: list[Segment]) -> None:
        """End the utterance in progress; its segment (if it said anything) joins C{finals}."""
        if self._utt_start is None:
            return
        start, end = self._utt_start, self._utt_end_time()
        decoder, audio = self._decoder, bytes(self._utt_audio)
        decoder.end_utt()
        self._utt_start = None
        self._utt_audio = bytearray()
        self._last_partial = ""
        self._last_end = end
        if not audio:
            return
        if self.rescore:
            # The second pass: the whole utterance at once (see the module docstring).
            decoder.start_utt()
            decoder.process_raw(audio, False, True)
            decoder.end_utt()
        text = self._hypothesis()
        if not text:
            return
        finals.append(Segment(text=text, start=round(start, 3), end=round(end, 3), confidence=self._confidence()))

    def _hypothesis(self) -> str:
        hyp = self._decoder.hyp()
        if hyp is None:
            return ""
        return " ".join(str(hyp.hypstr).split())

    def _confidence(self) -> float | None:
        """The mean posterior probability of the recognised words (fillers and silence aside)."""
        probs = []
        for seg in self._decoder.seg():
            word = str(seg.word)
            if word in _NON_WORDS or word.startswith("["):
                continue
            probs.append(float(seg.prob))
        if not probs:
            return None
        mean = sum(probs) / len(probs)
        return round(min(1.0, max(0.0, mean)), 4) if math.isfinite(mean) else None


@implementer(ITranscriber)
class PocketSphinxTranscriber:
    """Offline speech recognition with pocketsphinx and its bundled US English model."""

    name = "pocketsphinx"
    description = "Offline speech recognition (PocketSphinx, US English, 8-48 kHz mono or stereo 16-bit PCM)"
    #: pocketsphinx holds the GIL while it decodes: each stream's recognizer
    #: runs in a worker process of its own (car_twisted.voice.recognizers).
    worker_factory = "car_twisted.voice.pocketsphinx_stt:PocketSphinxTranscriber"

    def __init__(self, rescore: bool = True) -> None:
        #: Decode each finished utterance a second time as a whole (see
        #: the module docstring); False halves the CPU time.
        self.rescore = rescore

    def unavailable(self) -> str | None:
        try:
            ps = _pocketsphinx()
        except ImportError:
            return f"pocketsphinx is not installed: {_INSTALL_HINT}"
        try:
            model = ps.get_model_path()
        except Exception as e:  # an install too broken to say where its model is
            return f"pocketsphinx cannot find its model ({e}): {_INSTALL_HINT}"
        if not os.path.isdir(model):
            return f"pocketsphinx's model directory {model} is missing: {_INSTALL_HINT}"
        return None

    def open(self, sample_rate: int, channels: int) -> IRecognition:
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int):
            raise ValueError("sample_rate must be an integer")
        if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
            raise ValueError(f"sample_rate must be {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz, not {sample_rate}")
        if isinstance(channels, bool) or channels not in (1, 2):
            raise ValueError(f"channels must be 1 or 2, not {channels!r}")
        why = self.unavailable()
        if why is not None:
            raise VoiceUnavailable(why)
        ps = _pocketsphinx()
        try:
            decoder = ps.Decoder(samprate=MODEL_SAMPLE_RATE, loglevel="FATAL")
            endpointer = ps.Endpointer(sample_rate=MODEL_SAMPLE_RATE)
        except (RuntimeError, ValueError, OSError) as e:
            raise VoiceUnavailable(f"pocketsphinx could not load its model: {e}") from e
        return PocketSphinxRecognition(sample_rate, channels, decoder, endpointer, rescore=self.rescore)
